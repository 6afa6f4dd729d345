"""Which image URLs may be fetched, as both sides check them: the management node before it asks
an agent to download, the agent again at every redirect and against the address it reached.

A fetch policy travels with the command (``policy`` in ``/bs/download``): ``localDirs``, the
directories a local path may lie in (none: no local file at all), and ``forbid``, the networks an
http(s) fetch may not reach (for a tenant: loopback, link-local and so the metadata address, the
management node's own addresses). An admin's fetch carries no ``forbid``."""

from __future__ import annotations

import functools
import ipaddress
import posixpath
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlparse

# what a tenant's URL may never reach, wherever the fetch runs
ALWAYS_FORBIDDEN = (
    "0.0.0.0/8",
    "127.0.0.0/8",
    "169.254.0.0/16",  # link-local, with the metadata address 169.254.169.254
    "::/128",
    "::1/128",
    "fe80::/10",
    "::ffff:127.0.0.0/104",
    "::ffff:169.254.0.0/112",
)
MAX_REDIRECTS = 10


class UrlRefused(ValueError):
    """The URL, a redirect or the address it reached is not allowed by the policy."""


@dataclass(frozen=True)
class FetchPolicy:
    local_dirs: tuple[str, ...] = ()
    forbid: tuple[str, ...] = ()

    @functools.cached_property
    def _nets(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(n, strict=False) for n in self.forbid)

    def to_wire(self) -> dict[str, Any]:
        return {"localDirs": list(self.local_dirs), "forbid": list(self.forbid)}

    @classmethod
    def from_wire(cls, body: dict[str, Any] | None) -> FetchPolicy:
        body = body or {}
        return cls(tuple(str(d) for d in body.get("localDirs") or ()), tuple(str(n) for n in body.get("forbid") or ()))

    def local_path(self, url: str) -> str | None:
        """The local path a file:// URL or bare path names, checked against ``local_dirs``; None
        for an http(s) URL. The caller resolves symlinks and asks ``inside_local_dirs`` again."""
        parsed = urlparse(url)
        if parsed.scheme in ("http", "https"):
            if not parsed.hostname:
                raise UrlRefused(f"{url}: no host")
            return None
        if parsed.scheme not in ("", "file"):
            raise UrlRefused(f"{url}: use http(s)://, file:// or a path")
        path = posixpath.normpath(unquote(parsed.path))
        if not path.startswith("/"):
            raise UrlRefused(f"{url}: a local path must be absolute")
        if not self.inside_local_dirs(path):
            raise UrlRefused(
                f"{path} is not below a directory listed in image/localDirs"
                if self.local_dirs
                else f"{url}: local files are not allowed here"
            )
        return path

    def inside_local_dirs(self, path: str) -> bool:
        return any(path == d or path.startswith(d.rstrip("/") + "/") for d in self.local_dirs)

    def check_address(self, address: str, url: str) -> None:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        for net in self._nets:
            if ip.version == net.version and ip in net:
                raise UrlRefused(f"{url} reaches {ip}, which image URLs may not reach ({net})")

    def check_host(self, url: str) -> None:
        """Every address the URL's host resolves to is allowed (blocking: DNS; run it in a thread)."""
        if not self._nets:
            return
        parsed = urlparse(url)
        host = parsed.hostname or ""
        try:
            infos = socket.getaddrinfo(host, parsed.port or (443 if parsed.scheme == "https" else 80))
        except (socket.gaierror, UnicodeError) as err:
            raise UrlRefused(f"{url}: cannot resolve {host}: {err}") from None
        for info in infos:
            self.check_address(str(info[4][0]), url)


def tenant_forbidden(own_addresses: Iterable[str]) -> tuple[str, ...]:
    """The networks a tenant's URL may not reach: ALWAYS_FORBIDDEN and these hosts' own addresses."""
    out = list(ALWAYS_FORBIDDEN)
    for a in own_addresses:
        try:
            ip = ipaddress.ip_address(a.split("%", 1)[0])
        except ValueError:
            continue
        out.append(f"{ip}/{ip.max_prefixlen}")
    return tuple(dict.fromkeys(out))
