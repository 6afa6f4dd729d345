"""A tenant's image URL that redirects to this machine is refused at the redirect (issue 12, item 4).

A web server in a network namespace of its own (198.18.77.2, behind a veth pair whose host end is
198.18.77.1) stands for a site elsewhere: a tenant may fetch an image from it, but when it answers
with a redirect to the machine's loopback, the agent checks the new URL before following it, and
the loopback server is never asked. Needs root and ip; nothing leaves the machine."""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import httpx
import pytest

from tests.conftest import Api, Running

pytestmark = pytest.mark.e2e

NS, HOST_IF, NS_IF = "nbimgweb", "nbimgh", "nbimgn"
HOST_IP, WEB_IP = "198.18.77.1", "198.18.77.2"


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    if check and done.returncode:
        raise AssertionError(f"{argv}: {done.stdout}{done.stderr}")
    return done


def _teardown() -> None:
    sh("ip", "netns", "del", NS, check=False)
    sh("ip", "link", "del", HOST_IF, check=False)


@pytest.fixture
def elsewhere(tmp_path: Path) -> Iterator[dict[str, object]]:
    """A web server "elsewhere" serving src.qcow2 and /away, a redirect to a loopback server."""
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("qemu-img"):
        pytest.skip("needs root, ip and qemu-img (.ci/run runs the tests as root with them installed)")
    _teardown()
    site = tmp_path / "site"
    site.mkdir()
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(site / "src.qcow2"), "16M"], check=True)
    hits: list[str] = []

    class Loopback(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            hits.append(self.path)
            super().do_GET()

    loopback = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Loopback, directory=str(site)))
    threading.Thread(target=loopback.serve_forever, daemon=True).start()
    target = f"http://127.0.0.1:{loopback.server_address[1]}/src.qcow2"
    server = textwrap.dedent(f"""
        import http.server, functools
        class H(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                if self.path == "/away":
                    self.send_response(302); self.send_header("Location", {target!r}); self.end_headers()
                else:
                    super().do_GET()
        handler = functools.partial(H, directory={str(site)!r})
        http.server.ThreadingHTTPServer(({WEB_IP!r}, 8080), handler).serve_forever()
    """)
    sh("ip", "netns", "add", NS)
    proc = None
    try:
        sh("ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", NS_IF)
        sh("ip", "link", "set", NS_IF, "netns", NS)
        sh("ip", "addr", "add", f"{HOST_IP}/30", "dev", HOST_IF)
        sh("ip", "link", "set", HOST_IF, "up")
        sh("ip", "-n", NS, "addr", "add", f"{WEB_IP}/30", "dev", NS_IF)
        sh("ip", "-n", NS, "link", "set", NS_IF, "up")
        proc = subprocess.Popen(["ip", "netns", "exec", NS, sys.executable, "-c", server])
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"http://{WEB_IP}:8080/src.qcow2", timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield {"url": f"http://{WEB_IP}:8080", "hits": hits, "image": site / "src.qcow2"}
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        loopback.shutdown()
        _teardown()


def test_a_redirect_to_this_machine_is_refused_before_it_is_followed(
    api: Api, node: Running, tmp_path: Path, elsewhere: dict[str, object]
) -> None:
    bs = api.call("AddSftpBackupStorage", name="bs", hostname="127.0.0.1", username="root", password="x",
                  url=str(tmp_path / "bs"), systemTags=[f"agentPort::{node.agent_port}"])["inventory"]
    api.call("CreateAccount", name="eve", password=hashlib.sha512(b"eve").hexdigest())
    eve = Api(node.url)
    eve.login("eve", "eve")
    base = elsewhere["url"]
    image = eve.call("AddImage", name="ok", url=f"{base}/src.qcow2", format="qcow2",
                     backupStorageUuids=[bs["uuid"]])["inventory"]
    assert image["status"] == "Ready" and image["size"] == 16 << 20
    err = eve.fails("AddImage", name="away", url=f"{base}/away", format="qcow2", backupStorageUuids=[bs["uuid"]])
    assert "refused" in err["description"] and "127.0.0.1" in err["details"], err
    assert elsewhere["hits"] == []  # the loopback server was never asked
    assert [i["name"] for i in eve.query("QueryImage")] == ["ok"]
