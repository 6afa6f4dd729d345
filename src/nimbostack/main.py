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
        default="https://127.0.0.1:7071",
        help="the simulator agent serving every AddSimulatorHost host",
    )
    p.add_argument("--agent-port", type=int, default=7070, help="port of KVM host agents (default 7070)")
    p.add_argument("--wire-port", type=int, default=8081,
                   help="HTTPS port (mutual TLS) where host agents push their events (default 8081)")
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
        wire_port=a.wire_port,
        simulator_agent_url=a.simulator_agent_url,
    )


def agent_credentials(state_dir: str, credentials: str | None = None, wait: bool = True) -> Any:
    """The agent's bundle (default ``<state dir>/agent.pem``). A new host has none until the
    operator installs it (README: "Adding a host by hand"): the agent waits for it."""
    import time

    from nimbostack.wire.pki import Credentials, CredentialsError

    path = Path(credentials or Path(state_dir) / "agent.pem")
    said = False
    while True:
        try:
            return Credentials(path)
        except CredentialsError as err:
            if not wait:
                raise SystemExit(f"nimbostack agent: {err}") from None
            if not said:
                logging.getLogger("nimbostack").warning(
                    "no credentials yet (%s): waiting for %s (on the management node: "
                    "nimbostack agent-credentials --address THIS_HOST:PORT)", err, path)
                said = True
            time.sleep(1)


def agent_app(
    driver: str,
    domain_type: str,
    host_ip: str,
    state_dir: str,
    credentials: Any,
    path_map: list[tuple[str, str]] | None = None,
    migrate_bandwidth: int = 0,
    guest_nice: int = 5,
) -> Any:
    """The agent's server (agent/server.AgentServer), not yet listening."""
    from nimbostack.agent.host import Agent
    from nimbostack.agent.server import AgentServer
    from nimbostack.agent.storage import LocalStorage

    if driver == "simulator":
        from nimbostack.agent.drivers.simulator import SimulatorDriver

        def make(host_uuid: str, body: dict[str, Any]) -> Any:
            sim = body.get("simulator") or {}
            cpu, mem = int(sim.get("cpuCapacity") or 8 * 2600), int(sim.get("memoryCapacity") or 16 << 30)
            return SimulatorDriver(cpu_num=max(1, cpu // 2600), cpu_speed=2600, memory=mem, host_ip=host_ip)

        return AgentServer(Agent(make, LocalStorage(simulate=True), True, credentials, state_dir))
    from nimbostack.agent.drivers.libvirt.driver import LibvirtDriver

    def make_libvirt(host_uuid: str, body: dict[str, Any]) -> Any:
        return LibvirtDriver(domain_type=domain_type, host_ip=host_ip, owner=host_uuid, guest_nice=guest_nice)

    storage = LocalStorage(simulate=False, bandwidth=migrate_bandwidth)
    return AgentServer(Agent(make_libvirt, storage, False, credentials, state_dir, path_map=path_map))


def local_agent_credentials(data_dir: Path, agent_dir: Path, port: int) -> Any:
    """The all-in-one's (and the test harness's) agent on this machine gets its bundle from the
    node's CA directly: the same file an operator installs on a host by hand."""
    from nimbostack.wire import pki

    return pki.agent_bundle(pki.Authority(data_dir / "pki"), agent_dir / "agent.pem", f"127.0.0.1:{port}",
                            ["127.0.0.1"])


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


async def _serve(node: tuple[Any, str, int] | None, agent: tuple[Any, str, int] | None = None,
                 after_start: Any = None) -> None:
    """Serve the node's API (uvicorn) and/or an agent (agent/server.AgentServer) until SIGINT/SIGTERM."""
    import uvicorn

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if agent is not None:
        await agent[0].start(agent[1], agent[2])
    server = None
    if node is not None:
        app, host, port = node
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                host=host,
                port=port,
                log_level="warning",
                access_log=False,
                lifespan="on",
                # far longer than any client keeps an idle connection, so that a busy client never
                # sends a request on a connection the server is closing at that moment
                timeout_keep_alive=60,
                # httptools (C) parses HTTP at a fraction of h11's (pure Python) cost per request
                http="httptools" if _has("httptools") else "h11",
            )
        )
        server.install_signal_handlers = lambda: None  # type: ignore[method-assign]

    async def then() -> None:
        while server is not None and not server.started:
            if server.should_exit:
                return
            await asyncio.sleep(0.05)
        try:
            await after_start()
        except Exception as err:  # the servers keep running; the operator reads why
            logging.getLogger("nimbostack").error("start-up step failed: %s", err)

    async def until_stopped() -> None:
        await stop.wait()
        if server is not None:
            server.should_exit = True

    try:
        tasks = [asyncio.ensure_future(until_stopped())]
        if after_start:
            tasks.append(asyncio.ensure_future(then()))
        if server is not None:
            await server.serve()
        else:
            await stop.wait()
        for t in tasks:
            t.cancel()
    finally:
        if agent is not None:
            await agent[0].stop()


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


def _issue_agent_credentials(data_dir: Path, address: str, out: str) -> int:
    from nimbostack.wire import pki

    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise SystemExit(f"--address {address!r}: expected HOST:PORT")
    bundle = pki.Authority(data_dir / "pki").issue(pki.AGENT, f"{host.strip('[]')}:{port}", [host.strip("[]")])
    if out == "-":
        sys.stdout.write(bundle.decode())
    else:
        pki.write_private(Path(out), bundle)
    return 0


def _database_args(p: argparse.ArgumentParser) -> None:
    """Which database a command works on: a running node's, as its server command names it."""
    p.add_argument("--data-dir", default=os.environ.get("NIMBOSTACK_DATA_DIR", "./data"),
                   help="the node's data dir (its SQLite database, unless --db)")
    p.add_argument("--db", default=os.environ.get("NIMBOSTACK_DB") or None,
                   help="the node's database URL (default $NIMBOSTACK_DB), when it is not the SQLite file "
                   "of the data dir")


def _db_args(sub: Any) -> None:
    db = sub.add_parser("db", help="back the database up (while the node runs) or restore a backup")
    which = db.add_subparsers(dest="db_command", required=True)
    backup = which.add_parser(
        "backup",
        help="back the database up into a new timestamped file and print its name",
        description="A consistent copy of the node's database while the node runs and writes: SQLite "
        "through its online backup API (a .db file), PostgreSQL with pg_dump's custom format (.dump). "
        "The file is 0600 in a 0700 directory.",
    )
    _database_args(backup)
    backup.add_argument("--to", default=None, metavar="DIR", help="where to write it (default DATA_DIR/db-backups)")
    restore = which.add_parser(
        "restore",
        help="restore a backup into a fresh data dir (or an empty database) and migrate it",
        description="Restore FILE (of db backup, or of the node's periodic backups) into the database of "
        "--data-dir/--db, which must be empty unless --force, then bring it to this version's schema; the "
        "node's CA kept beside the backup (pki/) goes into NEWDIR/pki, so that the hosts' agents trust the "
        "restored node. Start it with: nimbostack server --data-dir NEWDIR [--db URL]",
    )
    restore.add_argument("file", metavar="FILE")
    restore.add_argument("--data-dir", required=True, help="the data dir of the node that will run on it")
    restore.add_argument("--db", default=None, help="a PostgreSQL URL, for a pg_dump backup (default: the SQLite "
                                                      "file of the data dir)")
    restore.add_argument("--force", action="store_true", help="replace the database that is there")


def _db(a: argparse.Namespace) -> int:
    from nimbostack.core.platform import keep_private
    from nimbostack.db import backup
    from nimbostack.db.engine import sqlite_url

    data = Path(a.data_dir).resolve()
    url = a.db or sqlite_url(data)
    try:
        if a.db_command == "backup":
            print(backup.backup(url, Path(a.to) if a.to else data / backup.DIR_NAME, data_dir=data))
            return 0
        revision = backup.restore(Path(a.file), url, a.force)
        keep_private(data, url)  # the data dir 0700, as the node would make it
        ca = backup.restore_ca(Path(a.file), data)
    except backup.BackupError as err:
        raise SystemExit(f"nimbostack db {a.db_command}: {err}") from None
    print(f"restored {a.file} into {data if not a.db else backup.shown_url(url)} (schema {revision})")
    if ca is None:
        print(f"nimbostack db restore: no CA beside the backup ({Path(a.file).parent / backup.PKI_DIR}): the node "
              "will make a new one, and each host agent then needs new credentials (nimbostack agent-credentials)",
              file=sys.stderr)
    return 0


def _upgrade_args(sub: Any) -> None:
    up = sub.add_parser(
        "upgrade",
        help="back the database up, then migrate it to this version's schema (stop the node first)",
        description="Take a backup of the node's database (as db backup does, named nimbostack-pre-upgrade-"
        "<time>), then migrate its schema to this version's newest revision. A database that a newer "
        "nimbostack wrote is refused, and nothing is touched. Stop the management node first; start it "
        "again afterwards.",
    )
    _database_args(up)
    up.add_argument("--backup-dir", default=None, metavar="DIR",
                    help="where the backup goes (default DATA_DIR/db-backups)")
    up.add_argument("--force", action="store_true",
                    help="migrate even though a management node beat in the database within 30 s")
    up.add_argument("--check", action="store_true",
                    help="only say whether the database can be upgraded (what would be migrated); touch nothing")


def _upgrade(a: argparse.Namespace) -> int:
    from nimbostack.db import backup, upgrade
    from nimbostack.db.engine import NewerSchema, sqlite_url

    data = Path(a.data_dir).resolve()
    url = a.db or sqlite_url(data)
    try:
        if a.check:
            current, head = upgrade.check(url, a.force)
            print(f"the database can be upgraded: schema {current or 'nothing'} to {head}")
            return 0
        done = upgrade.upgrade(url, Path(a.backup_dir) if a.backup_dir else data / backup.DIR_NAME, data, a.force)
    except (backup.BackupError, NewerSchema, upgrade.NodeRunning) as err:
        raise SystemExit(f"nimbostack upgrade: {err}") from None
    if done.backup is not None:
        print(f"backed up to {done.backup}")
    if done.before == done.after:
        print(f"the database is at schema {done.after} already: nothing to migrate")
    else:
        print(f"upgraded the schema from {done.before or 'nothing'} to {done.after}")
    return 0


def sqlite_url_of(data_dir: str) -> str:
    from nimbostack.db.engine import sqlite_url

    return sqlite_url(Path(data_dir).resolve())


def _refuse_newer_schema(command: str, url: str) -> None:
    """A database a newer version wrote, said in one line before the servers start (the node's own
    migration at its start refuses it too, in a traceback)."""
    from nimbostack.db import backup, upgrade
    from nimbostack.db.engine import NewerSchema

    try:
        upgrade.check(url)
    except NewerSchema as err:
        raise SystemExit(f"nimbostack {command}: {err}") from None
    except backup.BackupError:
        pass  # no database yet (the node makes it), or none reachable (the node says so, and retries)


MIN_ADMIN_PASSWORD = 8


def _admin_password_args(sub: Any) -> None:
    p = sub.add_parser(
        "admin-password",
        help="set the admin account's password in the node's database (read from stdin)",
        description="Read a password from the first line of stdin and make it the admin account's, in the "
        "database of --data-dir/--db (its schema made first, on a new one); the admin's sessions end. "
        "For a first password before the node starts, or one that was lost.",
    )
    _database_args(p)


def _admin_password(a: argparse.Namespace) -> int:
    from sqlalchemy.exc import DBAPIError

    from nimbostack.core.auth import set_admin_password
    from nimbostack.db.engine import Database, NewerSchema, sqlite_url

    password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < MIN_ADMIN_PASSWORD:
        raise SystemExit(f"nimbostack admin-password: give at least {MIN_ADMIN_PASSWORD} characters on stdin")
    data = Path(a.data_dir).resolve()
    if not a.db:
        data.mkdir(parents=True, exist_ok=True, mode=0o700)

    async def run() -> None:
        db = Database(a.db or sqlite_url(data))
        try:
            await db.migrate()
            await set_admin_password(db, password)
        finally:
            await db.close()

    try:
        asyncio.run(run())
    except NewerSchema as err:
        raise SystemExit(f"nimbostack admin-password: {err}") from None
    except (OSError, DBAPIError) as err:  # the database server is not there, or refuses the role
        raise SystemExit(f"nimbostack admin-password: cannot use the database: {str(err).splitlines()[0]}") from None
    print("the admin password is set")
    return 0


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
    agent.add_argument(
        "--credentials",
        default=None,
        metavar="FILE",
        help="the agent's credentials bundle from the management node (default STATE_DIR/agent.pem; "
        "the agent waits until it is there)",
    )
    cred = sub.add_parser(
        "agent-credentials",
        help="on the management node: issue a host agent its credentials (a PEM bundle on stdout)",
        description="Issue the agent at ADDRESS (host:port, as AddKVMHost will reach it) a key and a "
        "certificate of this management node's CA. Install the output as the agent's "
        "STATE_DIR/agent.pem (0600), e.g.: nimbostack agent-credentials --address 10.0.0.5:7070 | "
        "ssh root@10.0.0.5 'install -D -m 600 /dev/stdin /var/lib/nimbostack-agent/agent.pem'",
    )
    cred.add_argument("--data-dir", default=os.environ.get("NIMBOSTACK_DATA_DIR", "./data"),
                      help="the management node's data dir (its CA is in DATA_DIR/pki)")
    cred.add_argument("--address", required=True, help="HOST:PORT the management node reaches the agent at")
    cred.add_argument("--out", default="-", help="a file to write (0600) instead of stdout")
    sub.add_parser("cli", help="the >>> shell (nimbostack cli --help)", add_help=False)
    _db_args(sub)
    _upgrade_args(sub)
    _admin_password_args(sub)
    service = sub.add_parser(
        "install-service",
        help="write (and where systemd runs, enable and start) the systemd unit of the server or the agent",
    )
    service.add_argument("which", choices=["server", "agent"])
    service.add_argument("--data-dir", default="/var/lib/nimbostack", help="server: its data dir")
    service.add_argument("--port", type=int, default=None, help="default 8080 (server) or 7070 (agent)")
    service.add_argument("--db", default=os.environ.get("NIMBOSTACK_DB") or None,
                         help="server: a database URL (default $NIMBOSTACK_DB), kept in /etc/nimbostack/server.env")
    service.add_argument("--user", default="root", help="server: the user it runs as")
    service.add_argument("--state-dir", default="/var/lib/nimbostack-agent", help="agent: its state dir")
    service.add_argument("--host-ip", default="127.0.0.1", help="agent: the IP console clients use to reach it")
    service.add_argument("--unit-dir", default=str(units.UNIT_DIR), help="where the unit goes")
    service.add_argument("--env-dir", default=str(units.ENV_DIR), help="where the server's environment file goes")
    service.add_argument("--no-enable", action="store_true", help="only write the unit")
    a = parser.parse_args(argv)
    if a.command == "agent-credentials":
        return _issue_agent_credentials(Path(a.data_dir), a.address, a.out)
    if a.command == "db":
        return _db(a)
    if a.command == "upgrade":
        return _upgrade(a)
    if a.command == "admin-password":
        return _admin_password(a)
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
    if a.command in ("server", "up"):
        _refuse_newer_schema(a.command, a.db or sqlite_url_of(a.data_dir))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per agent call drowns what matters

    if a.command == "server":
        from nimbostack.api.app import create_app

        _run(_serve((create_app(_settings(a)), a.listen, a.port)))
    elif a.command == "agent":
        port = a.port or (7071 if a.driver == "simulator" else 7070)
        creds = agent_credentials(a.state_dir, a.credentials)
        app = agent_app(
            a.driver,
            a.domain_type,
            a.host_ip,
            a.state_dir,
            creds,
            _path_map(a.path_map),
            _bytes(a.migrate_bandwidth),
            a.guest_nice,
        )
        _run(_serve(None, (app, a.listen, port)))
    elif a.command == "up":
        # the agent alone imports none of the node's code (a deployed host runs only that)
        from nimbostack.api.app import create_app
        from nimbostack.bootstrap import bootstrap

        settings = _settings(a)
        driver = a.driver if a.driver != "auto" else ("libvirt" if libvirt_available() else "simulator")
        agent_port = 7071 if driver == "simulator" else a.agent_port
        settings.simulator_agent_url = f"https://127.0.0.1:{agent_port}"
        print(
            f"nimbostack all-in-one: API http://127.0.0.1:{a.port}/zstack/api, data in {settings.data_dir}, "
            f"{driver} agent on port {agent_port}",
            flush=True,
        )
        hypervisor = "KVM" if driver == "libvirt" else "Simulator"
        agent_dir = settings.data_dir / "agent"
        creds = local_agent_credentials(settings.data_dir, agent_dir, agent_port)
        _run(
            _serve(
                (create_app(settings), a.listen, a.port),
                (agent_app(driver, a.domain_type, "127.0.0.1", str(agent_dir), creds), "127.0.0.1", agent_port),
                lambda: bootstrap(f"http://127.0.0.1:{a.port}", settings.data_dir, hypervisor, agent_port),
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
