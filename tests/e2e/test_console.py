"""The browser console of a real guest (issue 15 item 5): RequestConsoleAccess → the node's
/console/ws → the agent's /vm/vnc tunnel (mutual TLS) → QEMU's VNC server on the host's loopback;
then the noVNC page in headless Chromium, with a screenshot of the connected console."""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

# test_real_vm's module-scoped real zone, as a fixture of this module (its tests are not imported)
from tests.e2e.test_real_vm import Zone, virsh
from tests.e2e.test_real_vm import zone as real_zone  # noqa: F401  (pytest fixture)

sys.path.insert(0, os.path.dirname(__file__))
from image_fixtures import tiny_image_dir  # noqa: E402, F401  (pytest fixture)

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"


def _vnc_listen(vm_uuid: str) -> tuple[str, int]:
    graphics = ET.fromstring(virsh("dumpxml", f"nimbo-{vm_uuid}").stdout).find("devices/graphics")
    assert graphics is not None and graphics.get("type") == "vnc"
    return graphics.get("listen", ""), int(graphics.get("port", "-1"))


def test_the_browser_console_reaches_the_guests_vnc_through_the_node(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    zone: Zone = request.getfixturevalue("real_zone")
    vm = zone.create("console")
    u = vm["uuid"]
    zone.wait_console(u, r"NIMBO-BOOT")
    listen, vnc_port = _vnc_listen(u)
    assert listen == "127.0.0.1" and vnc_port > 0  # the host's VNC is not on any outside address

    inv = zone.api.call("RequestConsoleAccess", vmInstanceUuid=u)["inventory"]
    assert (inv["hostname"], inv["port"]) == ("127.0.0.1", zone.node.port) and inv["port"] != vnc_port
    assert str(vnc_port) not in str(inv)
    with connect(inv["webSocketUrl"], open_timeout=15) as ws:
        # QEMU's own greeting, relayed by the node and the agent
        assert ws.recv(timeout=15) == b"RFB 003.008\n"
        ws.send(b"RFB 003.008\n")
        security = ws.recv(timeout=15)
        assert isinstance(security, bytes) and security[0] >= 1 and 1 in security[1:1 + security[0]]  # None
    with connect(inv["webSocketUrl"], open_timeout=15) as ws, pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=15)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    assert "already used" in closed.value.rcvd.reason

    _screenshot(zone, u, tmp_path)
    zone.api.call("DestroyVmInstance", uuid=u)


def _screenshot(zone: Zone, vm_uuid: str, tmp_path: Path) -> None:
    """The noVNC page connected to the guest in headless Chromium; its canvas shows the guest."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")
    if not shutil.which(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (scripts/libvirt-packages.txt)")
    url = zone.api.call("RequestConsoleAccess", vmInstanceUuid=vm_uuid)["inventory"]["url"]
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1024, "height": 768})
            problems: list[str] = []
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.goto(url)
            page.wait_for_selector("body[data-state=connected]", timeout=30_000)
            # the token left the address bar once the page had it
            assert "token=" not in page.url
            colours = 0
            deadline = time.monotonic() + 30
            while colours < 2 and time.monotonic() < deadline:
                time.sleep(0.5)
                colours = page.evaluate(_CANVAS_COLOURS)
            shot = tmp_path / "console.png"
            page.screenshot(path=str(shot))
            assert shot.stat().st_size > 0
            print(f"console screenshot: {shot}")
            assert colours >= 2, f"the console canvas stayed blank ({colours} colour); see {shot}"
            assert not [p for p in problems if re.search(r"Content Security Policy|Refused to", p)], problems
        finally:
            browser.close()


# distinct colours on noVNC's canvas (a sample of its pixels): one means nothing was drawn
_CANVAS_COLOURS = """() => {
    const canvas = document.querySelector("#screen canvas");
    if (!canvas || !canvas.width || !canvas.height) return 0;
    const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
    const seen = new Set();
    for (let i = 0; i < data.length && seen.size < 16; i += 4 * 97) {
        seen.add((data[i] << 16) | (data[i + 1] << 8) | data[i + 2]);
    }
    return seen.size;
}"""
