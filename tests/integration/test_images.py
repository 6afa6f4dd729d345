"""Images on a backup storage kept by an agent: real files, checksums, sizes, clear failures."""

from __future__ import annotations

import hashlib
import http.server
import shutil
import subprocess
import threading
from functools import partial
from pathlib import Path

import pytest

from tests.conftest import Api

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None,
                                reason="qemu-img missing: .ci/run installs qemu-utils")


@pytest.fixture
def store(api: Api, node, tmp_path: Path) -> dict:  # noqa: ANN001
    bs = api.call("AddSftpBackupStorage", name="bs", hostname="127.0.0.1", username="root", password="x",
                  url=str(tmp_path / "bs"), systemTags=[f"agentPort::{node.agent_port}"])["inventory"]
    assert bs["type"] == "Sftp" and bs["totalCapacity"] > 0
    image = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(image), "64M"], check=True, capture_output=True)
    return {"bs": bs, "image": image, "root": tmp_path / "bs"}


def test_add_image_from_a_local_file(api: Api, store: dict) -> None:
    md5 = hashlib.md5(store["image"].read_bytes()).hexdigest()
    img = api.call("AddImage", name="tiny", url=str(store["image"]), format="qcow2",
                   backupStorageUuids=[store["bs"]["uuid"]])["inventory"]
    assert img["status"] == "Ready" and img["size"] == 64 << 20 and img["md5Sum"] == md5
    (ref,) = img["backupStorageRefs"]
    assert Path(ref["installPath"]).read_bytes() == store["image"].read_bytes()
    assert Path(ref["installPath"]).is_relative_to(store["root"])


def test_add_image_over_http_with_checksum(api: Api, store: dict) -> None:
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(store["image"].parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/src.qcow2"
        err = api.fails("AddImage", name="bad", url=url, format="qcow2", backupStorageUuids=[store["bs"]["uuid"]],
                        systemTags=["md5::" + "0" * 32])
        assert "checksum" in err["description"]
        md5 = hashlib.md5(store["image"].read_bytes()).hexdigest()
        img = api.call("AddImage", name="good", url=url, format="qcow2", backupStorageUuids=[store["bs"]["uuid"]],
                       systemTags=[f"md5::{md5}"])["inventory"]
        assert img["status"] == "Ready" and img["md5Sum"] == md5 and img["actualSize"] == store["image"].stat().st_size
    finally:
        server.shutdown()


def test_failures_are_clear_and_leave_nothing(api: Api, store: dict, tmp_path: Path) -> None:
    err = api.fails("AddImage", name="missing", url=str(tmp_path / "nope.qcow2"), format="qcow2",
                    backupStorageUuids=[store["bs"]["uuid"]])
    assert err["code"] == "HOST.1001" and "does not exist" in err["description"] and "nope.qcow2" in err["details"]
    notqcow = tmp_path / "text.qcow2"
    notqcow.write_text("hello")
    err = api.fails("AddImage", name="wrong", url=str(notqcow), format="qcow2",
                    backupStorageUuids=[store["bs"]["uuid"]])
    assert "raw" in err["description"] or "qcow2" in err["description"]
    assert api.query("QueryImage") == []
    assert list((store["root"] / "images").iterdir()) == []


class _CountingServer:
    """An HTTP server on loopback that counts what it was asked (nothing, if a URL was refused)."""

    def __init__(self, directory: Path) -> None:
        hits = self.hits = []

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                hits.append(self.path)
                super().do_GET()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(directory)))
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def test_a_tenant_names_no_local_file_and_no_address_of_this_machine(api: Api, node, store: dict) -> None:  # noqa: ANN001
    api.call("CreateAccount", name="eve", password=hashlib.sha512(b"eve").hexdigest())
    eve = Api(node.url)
    eve.login("eve", "eve")
    web = _CountingServer(store["image"].parent)
    try:
        for url in (
            str(store["image"]),
            f"file://{store['image']}",
            "file:///etc/shadow",
            f"http://127.0.0.1:{web.port}/src.qcow2",
            f"http://localhost:{web.port}/src.qcow2",
            f"http://[::1]:{web.port}/src.qcow2",
            "http://169.254.169.254/latest/meta-data/",
            "ftp://example.org/x.qcow2",
        ):
            err = eve.fails("AddImage", name="x", url=url, format="qcow2", backupStorageUuids=[store["bs"]["uuid"]])
            assert err["code"] == "SYS.1005", (url, err)
            assert "md5" not in err["details"], err  # nothing of the file comes back
        assert web.hits == [] and eve.query("QueryImage") == [] and api.query("QueryImage") == []
        assert not any((store["root"] / "images").glob("*"))
        # the admin may, from a local file as from this machine's web server
        bs = [store["bs"]["uuid"]]
        api.call("AddImage", name="a", url=str(store["image"]), format="qcow2", backupStorageUuids=bs)
        api.call("AddImage", name="b", url=f"http://127.0.0.1:{web.port}/src.qcow2", format="qcow2",
                 backupStorageUuids=[store["bs"]["uuid"]])
        assert web.hits == ["/src.qcow2"]
    finally:
        web.close()


def test_an_admin_names_local_files_only_below_image_local_dirs(api: Api, store: dict, tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    inside = allowed / "in.qcow2"
    shutil.copy(store["image"], inside)
    (allowed / "escape.qcow2").symlink_to(store["image"])  # a link out of the listed directory
    api.call("UpdateGlobalConfig", category="image", name="localDirs", value=f"{allowed},/nonexistent")
    bs = [store["bs"]["uuid"]]
    err = api.fails("AddImage", name="out", url=str(store["image"]), format="qcow2", backupStorageUuids=bs)
    assert err["code"] == "SYS.1005" and "image/localDirs" in err["details"]
    err = api.fails("AddImage", name="dots", url=f"{allowed}/../src.qcow2", format="qcow2", backupStorageUuids=bs)
    assert err["code"] == "SYS.1005"
    err = api.fails("AddImage", name="link", url=str(allowed / "escape.qcow2"), format="qcow2", backupStorageUuids=bs)
    assert "refused" in err["description"] and "image/localDirs" in err["details"]
    assert api.call("AddImage", name="in", url=str(inside), format="qcow2", backupStorageUuids=bs)["inventory"][
        "status"
    ] == "Ready"
    api.call("UpdateGlobalConfig", category="image", name="localDirs", value="")
    err = api.fails("AddImage", name="none", url=str(inside), format="qcow2", backupStorageUuids=bs)
    assert err["code"] == "SYS.1005" and "not allowed" in err["details"]
