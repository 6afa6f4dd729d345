"""Host-side backup storage: a directory of image files, filled from http(s) URLs or local files
and served over HTTP to the primary storages that cache them."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import ssl
from pathlib import Path

import httpx

from nimbostack.agent.driver import DriverError
from nimbostack.wire.urls import MAX_REDIRECTS, FetchPolicy, UrlRefused

log = logging.getLogger(__name__)
CHUNK = 1 << 20


class BackupStore:
    def __init__(self) -> None:
        self.progress: dict[str, str] = {}  # image uuid → "42%" while downloading
        self.tls: ssl.SSLContext | bool = True  # the Agent's client context, for pulls from host agents

    async def capacity(self, root: str) -> tuple[int, int]:
        Path(root).mkdir(parents=True, exist_ok=True)
        st = os.statvfs(root)
        return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize

    async def download(
        self, root: str, image_uuid: str, url: str, fmt: str, md5: str | None, policy: FetchPolicy
    ) -> dict[str, object]:
        """Fetch ``url`` into ``root/images`` as ``policy`` allows it (wire/urls.py: checked again
        here, at every redirect and against the address reached); verify md5 if given; report
        virtual and actual size."""
        target = Path(root) / "images" / f"{image_uuid}.{fmt}"
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".part")
        digest = hashlib.md5()
        try:
            try:
                local = policy.local_path(url)
                if local is None:
                    await self._http(url, tmp, digest, image_uuid, policy)
                else:
                    real = os.path.realpath(local)  # a symlink may not lead out of the listed dirs
                    if not policy.inside_local_dirs(real):
                        raise UrlRefused(f"{local} leads to {real}, not below a directory listed in image/localDirs")
                    await self._copy(Path(real), tmp, digest, image_uuid)
            except UrlRefused as err:
                raise DriverError("IMAGE_URL_REFUSED", "the image URL is refused", str(err)) from None
            if md5 and digest.hexdigest() != md5.lower():
                raise DriverError(
                    "IMAGE_CHECKSUM",
                    "the image's checksum does not match",
                    f"md5 of {url} is {digest.hexdigest()}, expected {md5}",
                )
            actual = tmp.stat().st_size
            size = await virtual_size(tmp, fmt, actual)  # refuses a file that is not what it claims
            tmp.rename(target)
        finally:
            tmp.unlink(missing_ok=True)
            self.progress.pop(image_uuid, None)
        return {"installPath": str(target), "actualSize": actual, "size": size, "md5": digest.hexdigest()}

    async def pull(self, root: str, image_uuid: str, fmt: str, url: str) -> dict[str, object]:
        """Fetch an image a host agent exported from a volume (``url``: its GET /storage/file)
        into ``root/images``, checked to be the ``fmt`` it claims before it is renamed whole."""
        target = Path(root) / "images" / f"{image_uuid}.{fmt}"
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".part")
        digest = hashlib.md5()
        try:
            try:
                async with (
                    httpx.AsyncClient(timeout=httpx.Timeout(60, read=300), verify=self.tls) as client,
                    client.stream("GET", url) as resp,
                ):
                    if resp.status_code != 200:
                        body = (await resp.aread()).decode(errors="replace")[:300]
                        raise DriverError("IMAGE_DOWNLOAD", "the host did not send the volume's copy",
                                          f"HTTP {resp.status_code} {body}")
                    total, done = int(resp.headers.get("content-length") or 0), 0
                    with tmp.open("wb") as f:
                        async for chunk in resp.aiter_bytes(CHUNK):
                            f.write(chunk)
                            digest.update(chunk)
                            done += len(chunk)
                            self._report(image_uuid, done, total)
            except httpx.HTTPError as err:
                raise DriverError("IMAGE_DOWNLOAD", "cannot fetch the volume's copy from its host",
                                  f"{url}: {err}") from None
            actual = tmp.stat().st_size
            size = await virtual_size(tmp, fmt, actual)
            tmp.rename(target)
        finally:
            tmp.unlink(missing_ok=True)
            self.progress.pop(image_uuid, None)
        return {"installPath": str(target), "actualSize": actual, "size": size, "md5": digest.hexdigest()}

    def info(self, root: str, install_path: str) -> dict[str, object]:
        path = inside(root, install_path)
        if not path.is_file():
            return {"exists": False}
        return {"exists": True, "actualSize": path.stat().st_size}

    async def _http(self, url: str, tmp: Path, digest: "hashlib._Hash", image_uuid: str, policy: FetchPolicy) -> None:
        try:
            async with httpx.AsyncClient(timeout=httpx.Timeout(60, read=300)) as client:
                await self._fetch(client, url, tmp, digest, image_uuid, policy)
        except httpx.HTTPError as err:
            raise DriverError("IMAGE_DOWNLOAD", "cannot download the image", f"{url}: {err}") from None

    async def _fetch(self, client: httpx.AsyncClient, url: str, tmp: Path, digest: "hashlib._Hash",
                     image_uuid: str, policy: FetchPolicy) -> None:
        for _ in range(MAX_REDIRECTS + 1):
            if policy.local_path(url) is not None:
                raise UrlRefused(f"a redirect to {url}: only http(s) may follow http(s)")
            await asyncio.to_thread(policy.check_host, url)
            async with client.stream("GET", url) as resp:
                if policy.forbid:  # the address reached, whatever DNS says now
                    stream = resp.extensions.get("network_stream")
                    peer = stream.get_extra_info("server_addr") if stream is not None else None
                    if not peer:
                        raise UrlRefused(f"{url}: the address reached is unknown")
                    policy.check_address(str(peer[0]), url)
                if resp.is_redirect and resp.has_redirect_location:
                    url = str(resp.url.join(resp.headers["location"]))
                    continue
                if resp.status_code != 200:
                    raise DriverError(
                        "IMAGE_DOWNLOAD", "the image URL did not answer 200", f"{url}: HTTP {resp.status_code}"
                    )
                total = int(resp.headers.get("content-length") or 0)
                done = 0
                with tmp.open("wb") as f:
                    async for chunk in resp.aiter_bytes(CHUNK):
                        f.write(chunk)
                        digest.update(chunk)
                        done += len(chunk)
                        self._report(image_uuid, done, total)
                return
        raise UrlRefused(f"{url}: more than {MAX_REDIRECTS} redirects")

    async def _copy(self, src: Path, tmp: Path, digest: "hashlib._Hash", image_uuid: str) -> None:
        if not src.is_file():
            raise DriverError("IMAGE_NOT_FOUND", "the image file does not exist", str(src))
        total, done = src.stat().st_size, 0

        def copy() -> None:
            nonlocal done
            with src.open("rb") as fin, tmp.open("wb") as fout:
                while chunk := fin.read(CHUNK):
                    fout.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    self._report(image_uuid, done, total)

        await asyncio.to_thread(copy)

    def _report(self, image_uuid: str, done: int, total: int) -> None:
        self.progress[image_uuid] = f"{done * 100 // total}%" if total else f"{done >> 20} MiB"

    async def delete(self, root: str, install_path: str) -> None:
        path = inside(root, install_path)
        path.unlink(missing_ok=True)

    def file(self, root: str, install_path: str) -> Path:
        path = inside(root, install_path)
        if not path.is_file():
            raise DriverError("IMAGE_NOT_FOUND", "no such image file on the backup storage", install_path)
        return path


def inside(root: str, path: str) -> Path:
    resolved = Path(path).resolve()
    if not resolved.is_relative_to(Path(root).resolve()):
        raise DriverError("STORAGE_ERROR", "path outside the backup storage", f"{path} is not under {root}")
    return resolved


async def virtual_size(path: Path, fmt: str, actual: int) -> int:
    if fmt not in ("qcow2", "raw") or shutil.which("qemu-img") is None:
        return actual
    proc = await asyncio.create_subprocess_exec(
        "qemu-img", "info", "--output=json", str(path), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise DriverError("IMAGE_FORMAT", f"the file is not a valid {fmt} image", err.decode(errors="replace").strip())
    info = json.loads(out)
    if info.get("format") != fmt and not (fmt == "raw" and info.get("format") == "raw"):
        raise DriverError("IMAGE_FORMAT", f"the image was declared {fmt} but is {info.get('format')}", str(path))
    return int(info["virtual-size"])
