"""The web UI in Debian's Chromium (issue 15): log in, create a VM through the wizard, see it turn
Running and then Stopped — stopped on the agent's side, as a guest halting or virsh would — without
a reload; the three languages; a tenant sees none of the admin's VMs. Screenshots of the main pages
in each language go to the test's output dir.

A simulator host serves the wizard's VM: the console test (test_console.py) already shows a real
guest's screen, and a real guest would cost this test a minute of boot for nothing it checks."""

from __future__ import annotations

import hashlib
import re
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Api, Running, build_zone
from tests.integration.test_webui import agent_says

pytestmark = pytest.mark.e2e

# as test_console.py (not imported from there: its module skips itself without libvirtd, which a
# simulator host does not need)
CHROMIUM = "/usr/bin/chromium"

SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE2e0j1eG5zbWNvbnNvbGV0ZXN0a2V5 ui@test"
HOSTILE = "<img src=x onerror=window.pwned=1><b>tenant</b>"
LABELS = {  # what the VM list's page is called, and its Stop button, in each language
    "en": ("Virtual machines", "Stop"),
    "zh_CN": ("云主机", "停止"),
    "zh_TW": ("雲端主機", "停止"),
}


def _login(page: Any, url: str, name: str, password: str) -> None:
    page.goto(f"{url}/")
    page.fill("#account", name)
    page.fill("#password", password)
    page.click("#login-submit")
    page.wait_for_selector("#dashboard .summary", timeout=10_000)



def _wizard(page: Any, env: dict[str, Any], name: str) -> None:
    page.click("#create")
    page.fill("dialog[open] [name=name]", name)
    page.click("dialog[open] #submit")
    page.wait_for_selector("dialog[open] [name=imageUuid]")
    page.select_option("dialog[open] [name=imageUuid]", env["image"]["uuid"])
    page.click("dialog[open] #submit")
    page.wait_for_selector("dialog[open] [name=instanceOfferingUuid]")
    page.select_option("dialog[open] [name=instanceOfferingUuid]", env["offering"]["uuid"])
    page.click("dialog[open] #submit")
    page.wait_for_selector("dialog[open] [name=l3NetworkUuids]")
    page.select_option("dialog[open] [name=l3NetworkUuids]", [env["l3"]["uuid"]])
    page.click("dialog[open] #submit")
    page.wait_for_selector("dialog[open] [name=userdata]")
    page.fill("dialog[open] [name=userdata]", "#cloud-config\nhostname: from-the-wizard\n")
    page.fill("dialog[open] [name=sshKey]", SSH_KEY)
    page.click("dialog[open] #submit")


def test_the_web_ui_end_to_end(node: Running, api: Api, tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")
    if not shutil.which(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (scripts/libvirt-packages.txt)")
    env = build_zone(api)
    api.call("CreateAccount", name="tenant", password=hashlib.sha512(b"tenant-pw").hexdigest())
    tenant_api = Api(node.url)
    tenant_api.login("tenant", "tenant-pw")
    # a name that would run a script if a page ever put it on the page as HTML
    tenants_vm = tenant_api.call("CreateVmInstance", name=HOSTILE, imageUuid=env["image"]["uuid"],
                                 instanceOfferingUuid=env["offering"]["uuid"],
                                 l3NetworkUuids=[env["l3"]["uuid"]])["inventory"]
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 800}, locale="en-US")
            page = context.new_page()
            problems: list[str] = []
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            _login(page, node.url, "admin", "password")
            page.wait_for_selector("#dashboard .card [data-meter=cpu] progress")
            assert page.locator("#live.on").count() == 1, "the event stream is not open"

            # the wizard: image, offering, L3 network, userdata and SSH key; then the new VM's page
            page.goto(f"{node.url}/#/r/vm")
            page.wait_for_selector("#list[data-resource=vm]")
            _wizard(page, env, "from-the-wizard")
            page.wait_for_url(re.compile(r"#/r/vm/[0-9a-f]{32}$"), timeout=15_000)
            vm_uuid = page.url.rsplit("/", 1)[1]
            page.wait_for_selector("#detail td[data-field=state] [data-state=Running]", timeout=10_000)
            made = api.query("QueryVmInstance", ("uuid", "=", vm_uuid))[0]
            assert made["name"] == "from-the-wizard" and made["state"] == "Running"
            tags = [t["tag"] for t in api.query("QuerySystemTag", ("resourceUuid", "=", vm_uuid))]
            assert any(t.startswith("userdata::") for t in tags) and any(t.startswith("sshkey::") for t in tags)

            # the list, then the agent says the VM stopped: Stopped appears within 2 s, no reload
            page.goto(f"{node.url}/#/r/vm")
            row = f"#list tr[data-uuid='{vm_uuid}']"
            page.wait_for_selector(f"{row} [data-state=Running]")
            assert page.locator(f"#list tr[data-uuid='{tenants_vm['uuid']}']").count() == 1  # the admin sees all
            page.evaluate("() => { window.notReloaded = true; }")
            sent = time.monotonic()
            agent_says(node, made["hostUuid"], vm_uuid, "Stopped")
            page.wait_for_selector(f"{row} [data-state=Stopped]", timeout=2_000)
            print(f"Stopped shown {time.monotonic() - sent:.3f} s after the agent's event")
            assert page.evaluate("() => window.notReloaded") is True
            # started again from the page: its job, then Running
            page.click(f"{row} button[data-action=start]")
            page.wait_for_selector(f"{row} [data-state=Running]", timeout=10_000)

            # an API error shows the API's code and sentence
            page.goto(f"{node.url}/#/r/zone")
            page.wait_for_selector("#list[data-resource=zone]")
            page.click("#create")
            page.fill("dialog[open] [name=name]", "x" * 300)
            page.click("dialog[open] #submit")
            failed = page.wait_for_selector("#jobs .job.failed .error[data-code]", timeout=10_000)
            assert "SYS.1007" in failed.inner_text() and "longer than" in failed.inner_text()

            for lang in ("en", "zh_CN", "zh_TW"):
                title, stop = LABELS[lang]
                page.goto(f"{node.url}/#/")
                page.wait_for_selector("#dashboard .card")
                page.select_option("#language", lang)
                page.wait_for_selector(f"#nav a[data-page=vm]:text-is('{title}')")
                page.screenshot(path=str(shots / f"dashboard-{lang}.png"))
                page.click("#nav a[data-page=vm]")
                page.wait_for_selector(f"h1#title:text-is('{title}')")
                page.wait_for_selector(f"{row} button[data-action=stop]:text-is('{stop}')")
                page.screenshot(path=str(shots / f"vms-{lang}.png"))
                page.goto(f"{node.url}/#/r/vm/{vm_uuid}")
                page.wait_for_selector("#detail td[data-field=state] [data-state]")
                page.screenshot(path=str(shots / f"vm-detail-{lang}.png"))
                for resource in ("host", "image", "l3", "volume"):
                    page.goto(f"{node.url}/#/r/{resource}")
                    page.wait_for_selector(f"#list[data-resource={resource}] tbody tr")
                    page.screenshot(path=str(shots / f"{resource}-{lang}.png"))
            # the choice is remembered across a reload
            page.reload()
            page.wait_for_selector("#nav a[data-page=vm]:text-is('雲端主機')")
            assert not problems, problems

            # a tenant's browser: its own VM, none of the admin's
            tenant_page = browser.new_context(viewport={"width": 1280, "height": 800}, locale="zh-CN").new_page()
            _login(tenant_page, node.url, "tenant", "tenant-pw")
            assert tenant_page.locator("#nav a[data-page=vm]").inner_text() == "云主机"  # the browser's language
            assert tenant_page.locator("#nav a[data-page=host]").count() == 0
            tenant_page.click("#nav a[data-page=vm]")
            tenant_page.wait_for_selector(f"#list tr[data-uuid='{tenants_vm['uuid']}']")
            assert tenant_page.locator(f"#list tr[data-uuid='{vm_uuid}']").count() == 0
            assert tenant_page.locator("#list tbody tr").count() == 1
            name_cell = tenant_page.locator(f"#list tr[data-uuid='{tenants_vm['uuid']}'] td[data-field=name]")
            assert name_cell.inner_text() == HOSTILE and name_cell.locator("img, b").count() == 0
            assert tenant_page.evaluate("() => window.pwned") is None
            tenant_page.screenshot(path=str(shots / "tenant-vms-zh_CN.png"))
        finally:
            browser.close()
    print(f"screenshots: {shots}")
    assert len(list(shots.glob("*.png"))) == 3 * 7 + 1
