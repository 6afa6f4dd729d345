"""The metadata/userdata HTTP service of one L3 network, run by the agent inside the L3's DHCP
namespace::

    ip netns exec NS python -m nimbostack.plugins.flat.host.metadata --state FILE [--port 80]

It answers on every address of the namespace: the DHCP server's IP (CloudStack style, what
cloud-init's CloudStack datasource reads) and 169.254.169.254 (EC2 style). The caller is
identified by its source IP (the bridge rules on each VM's tap drop spoofed sources), so a VM
only ever sees its own data. The state file is a JSON document the agent replaces atomically;
it is re-read when its mtime changes. Standard library only, so it starts in a few ms."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# Versions an EC2 client may ask for; every one answers like "latest".
VERSIONS = [
    "1.0",
    "2007-01-19",
    "2007-03-01",
    "2007-08-29",
    "2007-10-10",
    "2007-12-15",
    "2008-02-01",
    "2008-09-01",
    "2009-04-04",
    "latest",
]
_VERSION = re.compile(r"latest|1\.0|\d{4}-\d{2}-\d{2}")
_KEY_NAME = re.compile(r"[^A-Za-z0-9@._-]+")


def _key_name(key: str, index: int) -> str:
    parts = key.split(None, 2)
    name = _KEY_NAME.sub("-", parts[2]).strip("-") if len(parts) > 2 else ""
    return name or f"key-{index}"


def meta_tree(vm: dict[str, Any]) -> dict[str, Any]:
    """The meta-data tree of one VM: a leaf is a str, a folder a dict (listed with a '/')."""
    tree: dict[str, Any] = {
        "instance-id": vm["vmUuid"],
        "vm-id": vm["vmUuid"],
        "ami-launch-index": "0",
        "hostname": vm["hostname"],
        "local-hostname": vm["hostname"],
        "local-ipv4": vm["ip"],
        "mac": vm["mac"],
    }
    if vm.get("publicIp"):
        tree["public-ipv4"] = vm["publicIp"]
        tree["public-hostname"] = vm["hostname"]
    if vm.get("zoneUuid"):
        tree["availability-zone"] = vm["zoneUuid"]
        tree["placement"] = {"availability-zone": vm["zoneUuid"]}
    keys = vm.get("sshKeys") or []
    if keys:
        tree["public-keys"] = {}  # a folder; answered by ``answer`` (its index is "0=name" lines)
    return tree


def _listing(folder: dict[str, Any]) -> str:
    return "\n".join(k + ("/" if isinstance(val, dict) else "") for k, val in folder.items())


def answer(vm: dict[str, Any] | None, path: str) -> tuple[int, str]:
    """(status, body) for a GET of ``path`` by ``vm`` (None: the caller is no VM we know)."""
    path = path.split("?", 1)[0].split("#", 1)[0]
    parts = [p for p in path.split("/") if p]
    if not parts:
        return 200, "\n".join(VERSIONS)
    if vm is None:
        return 404, "Not Found"
    if not _VERSION.fullmatch(parts[0]):
        return 404, "Not Found"
    rest = parts[1:]
    if not rest:
        return 200, "meta-data/\nuser-data" if vm.get("userdata") else "meta-data/"
    if rest == ["user-data"]:
        return (200, vm["userdata"]) if vm.get("userdata") else (404, "Not Found")
    tree = meta_tree(vm)
    if rest[0] == "meta-data":
        rest = rest[1:]
    keys = vm.get("sshKeys") or []
    if rest == ["public-keys"] and not path.endswith("/"):
        # CloudStack style: the keys themselves; "public-keys/" is EC2's index
        return (200, "\n".join(keys) + "\n") if keys else (404, "Not Found")
    if rest == ["public-keys"] and keys:
        return 200, "\n".join(f"{i}={_key_name(k, i)}" for i, k in enumerate(keys))
    if rest and rest[0] == "public-keys" and len(rest) > 1 and keys:
        # EC2 clients address a key by its index alone: public-keys/0/openssh-key
        idx = rest[1].split("=", 1)[0]
        if idx.isdigit() and int(idx) < len(keys):
            node: Any = {"openssh-key": keys[int(idx)] + "\n"}
            for p in rest[2:]:
                if not isinstance(node, dict) or p not in node:
                    return 404, "Not Found"
                node = node[p]
            return 200, node if isinstance(node, str) else _listing(node)
        return 404, "Not Found"
    node = tree
    for p in rest:
        if not isinstance(node, dict) or p not in node:
            return 404, "Not Found"
        node = node[p]
    return 200, node if isinstance(node, str) else _listing(node)


class State:
    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._vms: dict[str, Any] = {}
        self._lock = threading.Lock()

    def vm(self, ip: str) -> dict[str, Any] | None:
        with self._lock:
            try:
                st = os.stat(self.path)
                stamp = (st.st_mtime_ns, st.st_ino)
                if stamp != self._stamp:
                    with open(self.path, encoding="utf-8") as f:
                        self._vms = json.load(f).get("vms", {})
                    self._stamp = stamp
            except (OSError, ValueError):
                pass  # keep serving the last good state
            return self._vms.get(ip)


def make_handler(state: State) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "nimbostack-metadata"
        sys_version = ""

        def do_GET(self) -> None:  # noqa: N802
            ip = self.client_address[0]
            if ip.startswith("::ffff:"):
                ip = ip[7:]
            status, body = answer(state.vm(ip), self.path)
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_HEAD(self) -> None:  # noqa: N802
            self.do_GET()

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

    return Handler


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--state", required=True)
    ap.add_argument("--port", type=int, default=80)
    ap.add_argument("--listen", default="0.0.0.0")
    a = ap.parse_args(argv)
    ThreadingHTTPServer.allow_reuse_address = True
    ThreadingHTTPServer.daemon_threads = True
    srv = ThreadingHTTPServer((a.listen, a.port), make_handler(State(a.state)))
    print(f"metadata service on {a.listen}:{a.port} serving {a.state}", file=sys.stderr, flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
