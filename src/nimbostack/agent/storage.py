"""Host-side storage for LocalStorage primary storage: an image cache and qcow2 volumes backed by it.
The simulated variant records paths and sizes only."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import urllib.parse
from pathlib import Path

import httpx

from nimbostack.agent.driver import DriverError


async def _run(*cmd: str) -> str:
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise DriverError("STORAGE_ERROR", f"{cmd[0]} failed", err.decode(errors="replace").strip())
    return out.decode()


def _inside(root: str, path: str) -> Path:
    """Refuse paths outside the storage root: the management node names files, but a bug there
    must never make the agent write or delete elsewhere."""
    resolved = Path(path).resolve()
    if not resolved.is_relative_to(Path(root).resolve()):
        raise DriverError("STORAGE_ERROR", "path outside the primary storage", f"{path} is not under {root}")
    return resolved


class LocalStorage:
    def __init__(self, simulate: bool = False) -> None:
        self.simulate = simulate
        self.files: dict[str, int] = {}  # simulated: path → size

    async def capacity(self, root: str, simulated_total: int = 1 << 40) -> tuple[int, int]:
        if self.simulate:
            return simulated_total, simulated_total - sum(self.files.values())
        Path(root).mkdir(parents=True, exist_ok=True)
        st = os.statvfs(root)
        return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize

    async def cache_image(self, root: str, image_uuid: str, url: str, md5: str | None = None) -> str:
        """Download (once) the image into ``root/imagecache`` and return the cached file's path."""
        path = Path(root) / "imagecache" / f"{image_uuid}.img"
        if self.simulate:
            self.files.setdefault(str(path), 0)
            return str(path)
        _inside(root, str(path))
        if path.exists():
            return str(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        parsed = urllib.parse.urlparse(url)
        digest = hashlib.md5()
        if parsed.scheme in ("http", "https"):
            async with httpx.AsyncClient(timeout=None) as client, client.stream("GET", url) as resp:
                if resp.status_code != 200:
                    raise DriverError("IMAGE_DOWNLOAD", f"cannot download {url}", f"HTTP {resp.status_code}")
                with tmp.open("wb") as f:
                    async for chunk in resp.aiter_bytes(1 << 20):
                        f.write(chunk)
                        digest.update(chunk)
        else:
            src = Path(parsed.path if parsed.scheme == "file" else url)
            if not src.is_file():
                raise DriverError("IMAGE_NOT_FOUND", "image file missing", f"{src} does not exist")
            await asyncio.to_thread(shutil.copyfile, src, tmp)
        if md5 and parsed.scheme in ("http", "https") and digest.hexdigest() != md5:
            tmp.unlink(missing_ok=True)
            raise DriverError("IMAGE_CHECKSUM", "image checksum mismatch", f"expected md5 {md5}")
        tmp.rename(path)
        return str(path)

    async def create_from_image(self, root: str, install_path: str, backing: str, size: int) -> int:
        if self.simulate:
            self.files[install_path] = 0
            return 0
        target = _inside(root, install_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        await _run("qemu-img", "create", "-f", "qcow2", "-F", "qcow2", "-b", backing, str(target))
        if size:
            info = await _run("qemu-img", "info", "--output=json", str(target))
            import json

            if json.loads(info)["virtual-size"] < size:
                await _run("qemu-img", "resize", str(target), str(size))
        return target.stat().st_size

    async def create_empty(self, root: str, install_path: str, size: int) -> int:
        if self.simulate:
            self.files[install_path] = 0
            return 0
        target = _inside(root, install_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        await _run("qemu-img", "create", "-f", "qcow2", str(target), str(size))
        return target.stat().st_size

    async def delete(self, root: str, install_path: str) -> None:
        if self.simulate:
            self.files.pop(install_path, None)
            return
        target = _inside(root, install_path)
        target.unlink(missing_ok=True)
        # the volume's own directory goes with it; the storage root never does
        if target.parent != Path(root).resolve() and target.parent.exists() and not any(target.parent.iterdir()):
            target.parent.rmdir()

    def exists(self, install_path: str) -> bool:
        if self.simulate:
            return install_path in self.files
        return Path(install_path).exists()
