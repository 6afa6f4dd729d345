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
