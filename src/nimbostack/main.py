"""``nimbostack``: the management node, the host agent, the all-in-one and the shell."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from nimbostack import units

EPILOG = """\
examples:
  nimbostack up                                  all-in-one: management node + local agent
  nimbostack server --data-dir /var/lib/nimbostack --port 8080
  nimbostack server --db postgresql+asyncpg://nimbo:pw@localhost/nimbo
  nimbostack agent --driver simulator --port 7071   one process for many simulated hosts
  nimbostack agent --driver libvirt --port 7070     a real KVM host
  nimbostack cli LogInByAccount accountName=admin password=password
  nimbostack cli QueryVmInstance state=Running fields=uuid,name
"""


def _server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir",
        default=os.environ.get("NIMBOSTACK_DATA_DIR", "./data"),
        help="where the SQLite database, zstack.properties and logs live (default ./data)",
    )
    p.add_argument("--port", type=int, default=8080, help="HTTP port of the API (default 8080)")
    p.add_argument("--listen", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument(
        "--db",
        default=os.environ.get("NIMBOSTACK_DB") or None,
        help="SQLAlchemy async URL; default an SQLite file in the data dir, e.g. postgresql+asyncpg://user:pw@host/db",
    )
    p.add_argument(
        "--simulator-agent-url",
        default="http://127.0.0.1:7071",
        help="the simulator agent serving every AddSimulatorHost host",
    )
    p.add_argument("--agent-port", type=int, default=7070, help="port of KVM host agents (default 7070)")
    p.add_argument(
        "--management-url", default="", help="URL agents use to reach this node (default http://127.0.0.1:PORT)"
    )


def _settings(a: argparse.Namespace) -> Any:
    from nimbostack.core.platform import Settings
    from nimbostack.db.engine import sqlite_url

    data = Path(a.data_dir).resolve()
    return Settings(
        data_dir=data,
        db_url=a.db or sqlite_url(data),
        port=a.port,
        host=a.listen,
        management_url=a.management_url,
        agent_port=a.agent_port,
        simulator_agent_url=a.simulator_agent_url,
    )


def agent_app(
    driver: str,
    domain_type: str,
    host_ip: str,
    state_dir: str | None = None,
    path_map: list[tuple[str, str]] | None = None,
    migrate_bandwidth: int = 0,
    guest_nice: int = 5,
) -> Any:
    from nimbostack.agent.host import Agent
    from nimbostack.agent.server import create_app
    from nimbostack.agent.storage import LocalStorage

    if driver == "simulator":
        from nimbostack.agent.drivers.simulator import SimulatorDriver

        def make(host_uuid: str, body: dict[str, Any]) -> Any:
            sim = body.get("simulator") or {}
            cpu, mem = int(sim.get("cpuCapacity") or 8 * 2600), int(sim.get("memoryCapacity") or 16 << 30)
            return SimulatorDriver(cpu_num=max(1, cpu // 2600), cpu_speed=2600, memory=mem, host_ip=host_ip)

        return create_app(Agent(make, LocalStorage(simulate=True), multi_host=True))
    from nimbostack.agent.drivers.libvirt.driver import LibvirtDriver

    def make_libvirt(host_uuid: str, body: dict[str, Any]) -> Any:
        return LibvirtDriver(domain_type=domain_type, host_ip=host_ip, owner=host_uuid, guest_nice=guest_nice)

    console = str(Path(state_dir or "/var/lib/nimbostack-agent") / "console")
    storage = LocalStorage(simulate=False, bandwidth=migrate_bandwidth)
    return create_app(Agent(make_libvirt, storage, multi_host=False, console_dir=console, path_map=path_map))


def _path_map(items: list[str]) -> list[tuple[str, str]]:
    out = []
    for item in items:
        logical, sep, local = item.partition("=")
        if not sep or not logical.startswith("/") or not local.startswith("/"):
            raise SystemExit(f"--path-map {item!r}: expected /PATH=/LOCAL/PATH")
        out.append((logical, local))
    return out


def _bytes(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = text[-1:] if text[-1:] in units else ""
    return int(float(text[: len(text) - len(unit)]) * units[unit])


async def _serve(apps: list[tuple[Any, str, int]], after_start: Any = None) -> None:
    import uvicorn

    servers = [
        uvicorn.Server(
            uvicorn.Config(
                app,
                host=host,
                port=port,
                log_level="warning",
                access_log=False,
                lifespan="on",
                # far longer than any client keeps an idle connection (the node's agent client: 2 s):
                # with uvicorn's 5 s, a busy client could send a command on a connection the server
                # was closing at that moment, and the command failed with a connection reset
                timeout_keep_alive=60,
                # httptools (C) parses HTTP at a fraction of h11's (pure Python) cost per request
                http="httptools" if _has("httptools") else "h11",
            )
        )
        for app, host, port in apps
    ]
    for srv in servers:
        srv.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: [setattr(s, "should_exit", True) for s in servers])

    async def then() -> None:
        while not all(s.started for s in servers):
            if any(s.should_exit for s in servers):
                return
            await asyncio.sleep(0.05)
        try:
            await after_start()
        except Exception as err:  # the servers keep running; the operator reads why
            logging.getLogger("nimbostack").error("start-up step failed: %s", err)

    extra = [then()] if after_start else []
    await asyncio.gather(*(s.serve() for s in servers), *extra)


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _run(main: Any) -> None:
    """Run the servers' coroutine on uvloop where it is installed: libuv's loop costs far less per
    socket event and callback than asyncio's, and every API call is several of each."""
    if _has("uvloop"):
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main)
    else:
        asyncio.run(main)


def libvirt_available() -> bool:
    try:
        import libvirt  # noqa: F401
    except ImportError:
        return False
    import subprocess

    try:
        return (
            subprocess.run(["virsh", "-c", "qemu:///system", "version"], capture_output=True, timeout=10).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["cli"]:
        from nimbostack.cli import main as cli_main

        return cli_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="nimbostack",
        description="An IaaS cloud platform in the line of ZStack.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser(
        "up",
        help="all-in-one: management node (SQLite) + one local host agent",
        description="Start the management node on an SQLite file in --data-dir and a host agent on "
        "this machine, in one process. Then: nimbostack cli LogInByAccount "
        "accountName=admin password=password",
    )
    _server_args(up)
    up.add_argument(
        "--driver",
        choices=["auto", "simulator", "libvirt"],
        default="auto",
        help="hypervisor driver of the local agent: auto uses libvirt when libvirtd answers "
        "(scripts/start-libvirtd starts it), else the simulator",
    )
    up.add_argument(
        "--domain-type",
        choices=["auto", "kvm", "qemu"],
        default="auto",
        help="libvirt domain type: auto tries KVM and falls back to QEMU/TCG",
    )
    server = sub.add_parser("server", help="the management node only")
    _server_args(server)
    agent = sub.add_parser("agent", help="a host agent")
    agent.add_argument("--driver", choices=["simulator", "libvirt"], default="libvirt")
    agent.add_argument("--port", type=int, default=None, help="default 7070 (libvirt) or 7071 (simulator)")
    agent.add_argument("--listen", default="0.0.0.0", help="the address to serve the management node on")
    agent.add_argument("--host-ip", default="127.0.0.1", help="the IP console clients use to reach this host")
    agent.add_argument(
        "--domain-type",
        choices=["auto", "kvm", "qemu"],
        default="auto",
        help="libvirt domain type: auto tries KVM and falls back to QEMU/TCG",
    )
    agent.add_argument(
        "--state-dir",
        default="/var/lib/nimbostack-agent",
        help="where the agent keeps guests' console logs and network service files",
    )
    agent.add_argument(
        "--path-map",
        action="append",
        default=[],
        metavar="/PATH=/LOCAL/PATH",
        help="use /LOCAL/PATH wherever the management node names /PATH (volumes, images, ISOs), as a "
        "bind mount would: lets several agents on one machine keep their local storage apart",
    )
    agent.add_argument(
        "--migrate-bandwidth",
        default="0",
        metavar="BYTES",
        help="bytes per second a volume copy from another host may take (e.g. 100M); 0: no limit",
    )
    agent.add_argument(
        "--guest-nice",
        type=int,
        default=5,
        choices=range(20),
        metavar="0-19",
        help="CPU niceness of the guests' QEMU processes, so that busy guests do not slow the host's own "
        "services (agent, DHCP, metadata) and the start of other guests; 0: guests compete equally (default 5)",
    )
    sub.add_parser("cli", help="the >>> shell (nimbostack cli --help)", add_help=False)
    service = sub.add_parser(
        "install-service",
        help="write (and where systemd runs, enable and start) the systemd unit of the server or the agent",
    )
    service.add_argument("which", choices=["server", "agent"])
    service.add_argument("--data-dir", default="/var/lib/nimbostack", help="server: its data dir")
    service.add_argument("--port", type=int, default=None, help="default 8080 (server) or 7070 (agent)")
    service.add_argument("--db", default=None, help="server: a database URL, kept in /etc/nimbostack/server.env")
    service.add_argument("--user", default="root", help="server: the user it runs as")
    service.add_argument("--state-dir", default="/var/lib/nimbostack-agent", help="agent: its state dir")
    service.add_argument("--host-ip", default="127.0.0.1", help="agent: the IP console clients use to reach it")
    service.add_argument("--unit-dir", default=str(units.UNIT_DIR), help="where the unit goes")
    service.add_argument("--env-dir", default=str(units.ENV_DIR), help="where the server's environment file goes")
    service.add_argument("--no-enable", action="store_true", help="only write the unit")
    a = parser.parse_args(argv)
    if a.command == "install-service":
        if a.which == "server":
            unit = units.server_unit(Path(a.data_dir).resolve(), a.port or 8080, a.db, a.user, Path(a.env_dir))
            Path(a.data_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
        else:
            unit = units.agent_unit(Path(a.state_dir).resolve(), a.port or 7070, a.host_ip)
            Path(a.state_dir).mkdir(parents=True, exist_ok=True)
        for line in units.install(unit, Path(a.unit_dir), enable=not a.no_enable):
            print(line)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per agent call drowns what matters

    from nimbostack.api.app import create_app

    if a.command == "server":
        _run(_serve([(create_app(_settings(a)), a.listen, a.port)]))
    elif a.command == "agent":
        port = a.port or (7071 if a.driver == "simulator" else 7070)
        app = agent_app(
            a.driver,
            a.domain_type,
            a.host_ip,
            a.state_dir,
            _path_map(a.path_map),
            _bytes(a.migrate_bandwidth),
            a.guest_nice,
        )
        _run(_serve([(app, a.listen, port)]))
    elif a.command == "up":
        from nimbostack.bootstrap import bootstrap

        settings = _settings(a)
        driver = a.driver if a.driver != "auto" else ("libvirt" if libvirt_available() else "simulator")
        agent_port = 7071 if driver == "simulator" else a.agent_port
        settings.simulator_agent_url = f"http://127.0.0.1:{agent_port}"
        print(
            f"nimbostack all-in-one: API http://127.0.0.1:{a.port}/zstack/api, data in {settings.data_dir}, "
            f"{driver} agent on port {agent_port}",
            flush=True,
        )
        hypervisor = "KVM" if driver == "libvirt" else "Simulator"
        _run(
            _serve(
                [
                    (
                        agent_app(driver, a.domain_type, "127.0.0.1", str(settings.data_dir / "agent")),
                        "127.0.0.1",
                        agent_port,
                    ),
                    (create_app(settings), a.listen, a.port),
                ],
                lambda: bootstrap(f"http://127.0.0.1:{a.port}", settings.data_dir, hypervisor, agent_port),
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
