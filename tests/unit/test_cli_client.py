"""The command shell against a tiny fake management node: exact wire JSON, output, exit codes."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from nimbostack.cli import main

VM_UUID = "9cd68155905e47b5b0698ecba9126242"
SESSION = "5c1f4b6dc0d34b5c9a2c1f3e2d4b6a8c"


def done(name: str, inner: dict[str, Any]) -> dict[str, Any]:
    return {"state": "Done", "result": json.dumps({name: inner})}


def processing(job: str) -> dict[str, Any]:
    return {"state": "Processing", "uuid": job}


class FakeApi:
    """Records every request; answers them in order from ``answers`` (dicts as JSON, or raw)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, Any]] = []
        self.answers: list[dict[str, Any] | tuple[int, str]] = []
        self.lock = threading.Lock()

    @property
    def bodies(self) -> list[Any]:
        return [body for method, _, body in self.requests if method == "POST"]

    def answer(self, method: str, path: str, body: Any) -> tuple[int, str]:
        with self.lock:
            self.requests.append((method, path, body))
            if not self.answers:
                return 500, "no answer scripted"
            nxt = self.answers.pop(0)
        return nxt if isinstance(nxt, tuple) else (200, json.dumps(nxt))


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeApi]:
    api = FakeApi()

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, status: int, text: str) -> None:
            data = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:  # noqa: N802
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self._reply(*api.answer("POST", self.path, json.loads(raw)))

        def do_GET(self) -> None:  # noqa: N802
            self._reply(*api.answer("GET", self.path, None))

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    monkeypatch.setenv("NIMBOSTACK_CLI_HOME", str(tmp_path / "clihome"))
    monkeypatch.setenv("NIMBOSTACK_HOST", "127.0.0.1")
    monkeypatch.setenv("NIMBOSTACK_PORT", str(server.server_address[1]))
    try:
        yield api
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def session_file() -> Path:
    return Path(os.environ["NIMBOSTACK_CLI_HOME"]) / "cli-session.json"


def login(fake: FakeApi, uuid: str = SESSION) -> None:
    fake.answers.append(
        done(
            "org.zstack.header.identity.APILogInReply",
            {"success": True, "inventory": {"uuid": uuid, "accountUuid": "a1"}},
        )
    )
    assert main(["LogInByAccount", "accountName=admin", "password=password"]) == 0


def test_done_reply_spec_example(fake: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    fake.answers.append(
        done(
            "org.zstack.header.vm.APIGetVmConsoleAddressReply",
            {"success": True, "hostIp": "192.168.199.136", "port": 5902, "protocol": "spice"},
        )
    )
    assert main(["GetVmConsoleAddress", f"uuid={VM_UUID}"]) == 0
    assert fake.requests == [
        ("POST", "/zstack/api", {"org.zstack.header.vm.APIGetVmConsoleAddressMsg": {"uuid": VM_UUID}})
    ]
    assert capsys.readouterr().out == (
        '{\n    "hostIp": "192.168.199.136",\n    "port": 5902,\n    "protocol": "spice",\n    "success": true\n}\n'
    )


def test_processing_then_done(fake: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    zone = {"uuid": "z1", "name": "zone1", "state": "Enabled"}
    fake.answers += [
        processing("job1"),
        processing("job1"),
        done("org.zstack.header.zone.APICreateZoneEvent", {"success": True, "inventory": zone}),
    ]
    assert main(["CreateZone", "name=zone1", "description=first zone"]) == 0
    assert fake.requests == [
        (
            "POST",
            "/zstack/api",
            {"org.zstack.header.zone.APICreateZoneMsg": {"name": "zone1", "description": "first zone"}},
        ),
        ("GET", "/zstack/api/result/job1", None),
        ("GET", "/zstack/api/result/job1", None),
    ]
    assert json.loads(capsys.readouterr().out) == {"success": True, "inventory": zone}


def test_api_error_exit_1(fake: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    error = {"code": "SYS.1007", "description": "One or more API argument is invalid", "details": "bad"}
    fake.answers.append(done("org.zstack.header.zone.APIDeleteZoneEvent", {"success": False, "error": error}))
    assert main(["DeleteZone", "uuid=nope"]) == 1
    out = capsys.readouterr().out
    assert json.loads(out) == {"success": False, "error": error}
    assert out.startswith('{\n    "error": {\n        "code": "SYS.1007"')


def test_query_wire(fake: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    inv = [{"uuid": "p1", "type": "Flat", "name": "Flat Network Service Provider"}]
    fake.answers += [
        done(
            "org.zstack.header.network.service.APIQueryNetworkServiceProviderReply",
            {"success": True, "inventories": inv},
        ),
        done("org.zstack.header.network.l3.APIQueryL3NetworkReply", {"success": True, "inventories": []}),
        done("org.zstack.header.vm.APIQueryVmInstanceReply", {"success": True, "total": 3}),
    ]
    assert main(["QueryNetworkServiceProvider", "type=Flat"]) == 0
    assert json.loads(capsys.readouterr().out) == {"inventories": inv, "success": True}
    assert (
        main(
            [
                "QueryL3Network",
                "fields=l2NetworkUuid,",
                "uuid=1a82",
                "name~=pub",
                "dnsDomain=null",
                "l2NetworkUuid?=a,b",
                "zoneUuid!?=c",
                "l2Network.zone.name!~=x%",
                "limit=2",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "QueryVmInstance",
                "count=true",
                "state!=Destroyed",
                "memorySize>=1024",
                "cpuNum<4",
                "createDate>2016-01-01",
                "lastOpDate<=2017-01-01",
                "name!=null",
            ]
        )
        == 0
    )
    assert fake.bodies == [
        {
            "org.zstack.header.network.service.APIQueryNetworkServiceProviderMsg": {
                "conditions": [{"name": "type", "op": "=", "value": "Flat"}]
            }
        },
        {
            "org.zstack.header.network.l3.APIQueryL3NetworkMsg": {
                "fields": ["l2NetworkUuid"],
                "limit": 2,
                "conditions": [
                    {"name": "uuid", "op": "=", "value": "1a82"},
                    {"name": "name", "op": "like", "value": "%pub%"},
                    {"name": "dnsDomain", "op": "is null"},
                    {"name": "l2NetworkUuid", "op": "in", "value": "a,b"},
                    {"name": "zoneUuid", "op": "not in", "value": "c"},
                    {"name": "l2Network.zone.name", "op": "not like", "value": "x%"},
                ],
            }
        },
        {
            "org.zstack.header.vm.APIQueryVmInstanceMsg": {
                "count": True,
                "conditions": [
                    {"name": "state", "op": "!=", "value": "Destroyed"},
                    {"name": "memorySize", "op": ">=", "value": "1024"},
                    {"name": "cpuNum", "op": "<", "value": "4"},
                    {"name": "createDate", "op": ">", "value": "2016-01-01"},
                    {"name": "lastOpDate", "op": "<=", "value": "2017-01-01"},
                    {"name": "name", "op": "is not null"},
                ],
            }
        },
    ]


def test_login_session_logout(fake: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    login(fake)
    assert fake.bodies[0] == {
        "org.zstack.header.identity.APILogInByAccountMsg": {
            "accountName": "admin",
            "password": hashlib.sha512(b"password").hexdigest(),
        }
    }
    path = session_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    port = os.environ["NIMBOSTACK_PORT"]
    assert json.loads(path.read_text()) == {f"127.0.0.1:{port}": {"uuid": SESSION, "accountName": "admin"}}
    capsys.readouterr()

    # a later invocation carries the session
    fake.answers.append(done("org.zstack.header.zone.APICreateZoneEvent", {"success": True}))
    assert main(["CreateZone", "name=z"]) == 0
    assert fake.bodies[1] == {"org.zstack.header.zone.APICreateZoneMsg": {"name": "z", "session": {"uuid": SESSION}}}

    # LogOut names the stored session and forgets it
    fake.answers.append(done("org.zstack.header.identity.APILogOutReply", {"success": True}))
    fake.answers.append(done("org.zstack.header.identity.APILogOutReply", {"success": True}))
    assert main(["LogOut"]) == 0
    assert fake.bodies[2] == {
        "org.zstack.header.identity.APILogOutMsg": {"sessionUuid": SESSION, "session": {"uuid": SESSION}}
    }
    assert json.loads(path.read_text()) == {}
    assert main(["LogOut"]) == 0  # logged out already: the bare message, the server judges
    assert fake.bodies[3] == {"org.zstack.header.identity.APILogOutMsg": {}}


def test_session_expired_hint(fake: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    login(fake)
    capsys.readouterr()
    error = {"code": "SESSION_EXPIRED", "description": "Session expired", "details": "session expired"}
    fake.answers.append(done("org.zstack.header.zone.APICreateZoneEvent", {"success": False, "error": error}))
    assert main(["CreateZone", "name=z"]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["error"]["code"] == "SESSION_EXPIRED"
    assert "log in again: LogInByAccount" in captured.err
    assert json.loads(session_file().read_text()) == {}

    error["code"] = "INVALID_SESSION"
    fake.answers.append(done("org.zstack.header.zone.APICreateZoneEvent", {"success": False, "error": error}))
    assert main(["CreateZone", "name=z"]) == 1
    assert "not logged in" in capsys.readouterr().err
    assert fake.bodies[-1] == {"org.zstack.header.zone.APICreateZoneMsg": {"name": "z"}}


def test_usage_errors_send_nothing(fake: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["CreateZon", "name=z"]) == 2
    assert main(["CreateZone", "nam=z"]) == 2
    assert main(["CreateZone"]) == 2
    assert main(["QueryZone", "nme=z"]) == 2
    assert fake.requests == []
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4 and all(line.startswith("error: ") for line in err)


def test_connection_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("NIMBOSTACK_CLI_HOME", str(tmp_path))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["--port", str(port), "QueryZone"]) == 1
    err = capsys.readouterr().err
    assert f"cannot connect to the management node at http://127.0.0.1:{port}" in err
    assert "is it running?" in err


def test_http_error_without_api_answer(fake: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    fake.answers.append((500, "Internal Server Error"))
    assert main(["QueryZone"]) == 1
    assert "HTTP 500" in capsys.readouterr().err


def test_host_and_port_options_win_over_env(
    fake: FakeApi, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    port = os.environ["NIMBOSTACK_PORT"]
    monkeypatch.setenv("NIMBOSTACK_PORT", "9")
    fake.answers.append(done("org.zstack.header.zone.APIQueryZoneReply", {"success": True, "inventories": []}))
    assert main(["--host", "127.0.0.1", "--port", port, "QueryZone"]) == 0
    assert len(fake.requests) == 1


def test_file_of_commands(fake: FakeApi, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = tmp_path / "setup.zcli"
    script.write_text(
        "# create a zone and a VM\n"
        "\n"
        "CreateZone name=zone1 description='first zone'\n"
        "CreateVmInstance name=vm1 instanceOfferingUuid=io imageUuid=im l3NetworkUuids=l1,l2 "
        "systemTags='userdata::a\\nb'\n"
        "DeleteZone uuid=z1\n"
        "CreateZone name=never-sent\n"
    )
    fake.answers += [
        done("org.zstack.header.zone.APICreateZoneEvent", {"success": True}),
        processing("j2"),
        done("org.zstack.header.vm.APICreateVmInstanceEvent", {"success": True}),
        done(
            "org.zstack.header.zone.APIDeleteZoneEvent",
            {"success": False, "error": {"code": "SYS.1001", "description": "x", "details": "y"}},
        ),
    ]
    assert main(["-f", str(script)]) == 1
    assert fake.bodies == [
        {"org.zstack.header.zone.APICreateZoneMsg": {"name": "zone1", "description": "first zone"}},
        {
            "org.zstack.header.vm.APICreateVmInstanceMsg": {
                "name": "vm1",
                "instanceOfferingUuid": "io",
                "imageUuid": "im",
                "l3NetworkUuids": ["l1", "l2"],
                "systemTags": ["userdata::a\\nb"],
            }
        },
        {"org.zstack.header.zone.APIDeleteZoneMsg": {"uuid": "z1"}},
    ]
    assert f"{script}:5: stopped, exit status 1: DeleteZone uuid=z1" in capsys.readouterr().err


def test_file_stops_on_usage_error(fake: FakeApi, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = tmp_path / "bad.zcli"
    script.write_text("CreateZone nam=z\nCreateZone name=never\n")
    assert main(["-f", str(script)]) == 2
    assert fake.requests == []
    assert main(["-f", str(tmp_path / "missing.zcli")]) == 2
    script.write_text("CreateZone name='open\n")
    assert main(["-f", str(script)]) == 2
    assert "bad.zcli:1: error: cannot parse line" in capsys.readouterr().err


def test_interactive_shell(fake: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    from nimbostack.cli.client import ApiClient
    from nimbostack.cli.runner import Runner
    from nimbostack.cli.session import SessionStore
    from nimbostack.cli.shell import interactive
    from nimbostack.cli.spec import load_spec

    fake.answers += [
        done("org.zstack.header.identity.APILogInReply", {"success": True, "inventory": {"uuid": SESSION}}),
        done("org.zstack.header.zone.APICreateZoneEvent", {"success": True}),
    ]
    with create_pipe_input() as pipe, ApiClient("127.0.0.1", int(os.environ["NIMBOSTACK_PORT"])) as client:
        pipe.send_text(
            "CreateZone nam=z\r"  # usage error: reported, the shell goes on
            "LogInByAccount accountName=admin password=secret\r"
            "CreateZone name=z\r"
            "exit\r"
        )
        assert interactive(Runner(load_spec(), client, SessionStore()), pipe, DummyOutput()) == 0
    assert fake.bodies[1] == {"org.zstack.header.zone.APICreateZoneMsg": {"name": "z", "session": {"uuid": SESSION}}}
    captured = capsys.readouterr()
    assert "did you mean name" in captured.err
    history = (Path(os.environ["NIMBOSTACK_CLI_HOME"]) / "cli-history").read_text()
    assert "LogInByAccount accountName=admin password=\n" in history
    assert "secret" not in history


def test_a_jobs_progress_lines_are_shown_while_it_runs(fake: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    """AddKVMHost's deployment (and AddImage's download) say where they are: each new line once, on stderr."""
    step = {"state": "Processing", "uuid": "job1", "progress": "task 3/9 install packages: start"}
    fake.answers += [
        processing("job1"),
        step,
        step,
        {**step, "progress": "task 4/9 install the agent: start"},
        done("org.zstack.header.zone.APICreateZoneEvent", {"success": True, "inventory": {"uuid": "z1"}}),
    ]
    assert main(["CreateZone", "name=zone1"]) == 0
    err = capsys.readouterr().err
    assert err.splitlines() == ["... task 3/9 install packages: start", "... task 4/9 install the agent: start"]
