"""Host-side storage of primary storages kept as files (LocalStorage, SharedMountPoint): an image
cache and qcow2 volumes backed by it, qcow2 snapshots, and the copy of a volume's files from
another host's agent (LocalStorageMigrateVolume). The simulated variant records paths only.

A file that is being written is named ``<file>.part`` and renamed when it is complete, so a
killed agent leaves no file that looks whole; ``clean_partials`` removes the leftovers."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import ssl
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from nimbostack.agent.driver import DriverError

log = logging.getLogger(__name__)
CHUNK = 1 << 20
PART = ".part"


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


def part_of(path: str | Path) -> Path:
    return Path(str(path) + PART)


@dataclass
class PullFile:
    """One file of a volume copied from another host: ``backing`` is the (local) path of the file
    it is backed by here, or None; ``skip_if_exists``: the image cache, kept if already here."""

    install_path: str
    source_path: str
    backing: str | None = None
    skip_if_exists: bool = False


class LocalStorage:
    def __init__(self, simulate: bool = False, bandwidth: int = 0) -> None:
        self.simulate = simulate
        self.files: dict[str, int] = {}  # simulated: path → size
        self.backing: dict[str, str] = {}  # simulated: path → the file it is backed by
        self.bandwidth = bandwidth  # bytes/s a volume copy may take from the network; 0: no limit
        self.writing: set[Path] = set()  # .part files this process is writing now
        self._cache_locks: dict[Path, asyncio.Lock] = {}
        # images and volumes come from other agents (backup storage, source host), over the
        # agent wire's mutual TLS: the Agent sets its client context here
        self.tls: ssl.SSLContext | bool = True

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
        key = _inside(root, str(path))
        # one download per image at a time: a second VM from the same image waits for the first's
        async with self._cache_locks.setdefault(key, asyncio.Lock()):
            if path.exists():
                return str(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = part_of(path)
            self.writing.add(tmp)
            try:
                await self._fetch_image(url, tmp, md5)
                tmp.rename(path)
            finally:
                self.writing.discard(tmp)
                tmp.unlink(missing_ok=True)
        return str(path)

    async def _fetch_image(self, url: str, tmp: Path, md5: str | None) -> None:
        parsed = urllib.parse.urlparse(url)
        digest = hashlib.md5()
        if parsed.scheme in ("http", "https"):
            async with httpx.AsyncClient(timeout=None, verify=self.tls) as client, client.stream("GET", url) as resp:
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
            raise DriverError("IMAGE_CHECKSUM", "image checksum mismatch", f"expected md5 {md5}")

    async def create_from_image(self, root: str, install_path: str, backing: str, size: int) -> int:
        if self.simulate:
            self.files[install_path] = 0
            self.backing[install_path] = backing
            return 0
        target = _inside(root, install_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        await _run("qemu-img", "create", "-f", "qcow2", "-F", "qcow2", "-b", backing, str(target))
        if size:
            info = await _run("qemu-img", "info", "--output=json", str(target))
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
            self.backing.pop(install_path, None)
            return
        target = _inside(root, install_path)
        target.unlink(missing_ok=True)
        if part_of(target) not in self.writing:
            part_of(target).unlink(missing_ok=True)
        # the volume's own directory goes with it; the storage root never does
        if target.parent != Path(root).resolve() and target.parent.exists() and not any(target.parent.iterdir()):
            target.parent.rmdir()

    def exists(self, install_path: str) -> bool:
        if self.simulate:
            return install_path in self.files
        return Path(install_path).exists()

    def actual_size(self, install_path: str) -> int:
        if self.simulate:
            return self.files.get(install_path, 0)
        try:
            return Path(install_path).stat().st_blocks * 512
        except FileNotFoundError:
            return 0

    # --- snapshots --------------------------------------------------------------------------

    async def overlay(self, root: str, backing: str, install_path: str) -> None:
        """A new empty qcow2 file on top of ``backing``: the volume's file after a snapshot (the
        old file becomes the snapshot) or after a revert (on top of the snapshot)."""
        if self.simulate:
            if backing not in self.files:
                raise DriverError("VOLUME_NOT_FOUND", "the backing file does not exist", backing)
            self.files[install_path] = 0
            self.backing[install_path] = backing
            return
        base = _inside(root, backing)
        target = _inside(root, install_path)
        if not base.is_file():
            raise DriverError("VOLUME_NOT_FOUND", "the backing file does not exist", backing)
        if target.exists():
            raise DriverError("STORAGE_ERROR", "the new file exists already", install_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = part_of(target)
        self.writing.add(tmp)
        try:
            await _run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(tmp))
            tmp.rename(target)
        finally:
            self.writing.discard(tmp)
            tmp.unlink(missing_ok=True)

    async def rebase(self, root: str, install_path: str, backing: str | None) -> int:
        """Safe rebase: ``install_path`` keeps its content but is backed by ``backing`` (None: by
        nothing), the data of the files in between copied into it. The file must not be in use."""
        if self.simulate:
            if backing:
                self.backing[install_path] = backing
            else:
                self.backing.pop(install_path, None)
            return self.files.get(install_path, 0)
        target = _inside(root, install_path)
        base = str(_inside(root, backing)) if backing else ""
        cmd = ["qemu-img", "rebase", "-q", "-f", "qcow2", "-b", base]
        if base:
            cmd[4:4] = ["-F", "qcow2"]
        await _run(*cmd, str(target))
        return self.actual_size(str(target))

    # --- templates -----------------------------------------------------------------------------

    async def export(self, root: str, install_path: str, export_path: str) -> dict[str, int]:
        """A standalone qcow2 of ``install_path`` with its whole backing chain merged in
        (``qemu-img convert``), written to ``export_path`` for a backup storage to fetch: what
        an image made from a volume or snapshot is. The source must not be written meanwhile
        (its VM stopped, or a snapshot's frozen file)."""
        if self.simulate:
            if install_path not in self.files:
                raise DriverError("VOLUME_NOT_FOUND", "the volume's file does not exist", install_path)
            self.files[export_path] = self.files[install_path]
            return {"size": 0, "actualSize": self.files[export_path]}
        source = _inside(root, install_path)
        target = _inside(root, export_path)
        if not source.is_file():
            raise DriverError("VOLUME_NOT_FOUND", "the volume's file does not exist", install_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = part_of(target)
        self.writing.add(tmp)
        try:
            await _run("qemu-img", "convert", "-U", "-O", "qcow2", str(source), str(tmp))
            info = json.loads(await _run("qemu-img", "info", "--output=json", str(tmp)))
            tmp.rename(target)
        finally:
            self.writing.discard(tmp)
            tmp.unlink(missing_ok=True)
        return {"size": int(info["virtual-size"]), "actualSize": target.stat().st_size}

    # --- copying from another host ------------------------------------------------------------

    async def pull(self, root: str, files: list[PullFile], fetch: Callable[[PullFile], str],
                   source: LocalStorage | None = None) -> dict[str, int]:
        """Copy a volume's files from another host, parents first: each into ``<file>.part``,
        re-pointed at its backing file here (``qemu-img rebase -u``), checked, then renamed.
        ``fetch(file)`` names the source agent's URL of a file; a simulated store copies from
        ``source``. Returns the actual sizes by install path."""
        sizes: dict[str, int] = {}
        if self.simulate:
            if source is None:
                raise DriverError("STORAGE_ERROR", "the source host is not on this simulator agent")
            for f in files:
                if f.skip_if_exists and f.install_path in self.files:
                    continue
                if f.source_path not in source.files:
                    raise DriverError("VOLUME_NOT_FOUND", "the source host has no such file", f.source_path)
                self.files[f.install_path] = sizes[f.install_path] = source.files[f.source_path]
                if f.backing:
                    self.backing[f.install_path] = f.backing
            return sizes
        for f in files:
            target = _inside(root, f.install_path)
            if f.skip_if_exists:  # the image cache: shared with cache_image, one writer at a time
                async with self._cache_locks.setdefault(target, asyncio.Lock()):
                    if not target.is_file():
                        await self._pull_one(root, f, target, fetch)
                continue
            await self._pull_one(root, f, target, fetch)
            sizes[f.install_path] = self.actual_size(str(target))
        return sizes

    async def _pull_one(self, root: str, f: PullFile, target: Path, fetch: Callable[[PullFile], str]) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = part_of(target)
        self.writing.add(tmp)
        try:
            await self._download(fetch(f), tmp)
            if f.backing:
                backing = _inside(root, f.backing)
                if not backing.is_file():
                    raise DriverError("VOLUME_NOT_FOUND", "the backing file is missing here", f.backing)
                await _run("qemu-img", "rebase", "-q", "-u", "-f", "qcow2", "-F", "qcow2", "-b", str(backing), str(tmp))
            if not f.skip_if_exists:  # an image cache may be raw; volumes are qcow2 chains
                await _run("qemu-img", "info", "-U", "--backing-chain", "--output=json", str(tmp))
            await asyncio.to_thread(_fsync, tmp)
            tmp.rename(target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            self.writing.discard(tmp)

    async def _download(self, url: str, tmp: Path) -> None:
        started, done = time.monotonic(), 0
        try:
            async with (
                httpx.AsyncClient(timeout=httpx.Timeout(60, read=300), verify=self.tls) as client,
                client.stream("GET", url) as resp,
            ):
                if resp.status_code != 200:
                    body = (await resp.aread()).decode(errors="replace")[:300]
                    raise DriverError("VOLUME_COPY", "the source host did not send the file",
                                      f"HTTP {resp.status_code} {body}")
                with tmp.open("wb") as out:
                    async for chunk in resp.aiter_bytes(CHUNK):
                        out.write(chunk)
                        done += len(chunk)
                        if self.bandwidth:  # stay under the configured migration bandwidth
                            ahead = done / self.bandwidth - (time.monotonic() - started)
                            if ahead > 0:
                                await asyncio.sleep(ahead)
        except httpx.HTTPError as err:
            raise DriverError("VOLUME_COPY", "cannot copy the file from the source host", f"{url}: {err}") from None

    def clean_partials(self, root: str) -> int:
        """Remove ``*.part`` files a killed agent left under ``root`` (not the ones being written)."""
        if self.simulate or not Path(root).is_dir():
            return 0
        gone = 0
        for path in Path(root).rglob("*" + PART):
            if path.is_file() and path not in self.writing:
                path.unlink(missing_ok=True)
                gone += 1
        if gone:
            log.info("removed %d partial files under %s", gone, root)
        return gone

    def file(self, root: str, install_path: str) -> Path:
        """A file another host's agent copies (GET /storage/file)."""
        path = _inside(root, install_path)
        if not path.is_file():
            raise DriverError("VOLUME_NOT_FOUND", "no such file on this host's primary storage", install_path)
        return path

    async def info(self, root: str, install_path: str) -> dict[str, object]:
        if self.simulate:
            return {"exists": install_path in self.files, "backing": self.backing.get(install_path),
                    "actualSize": self.files.get(install_path, 0)}
        path = _inside(root, install_path)
        if not path.is_file():
            return {"exists": False}
        out = json.loads(await _run("qemu-img", "info", "-U", "--output=json", str(path)))
        return {"exists": True, "backing": out.get("full-backing-filename") or out.get("backing-filename"),
                "virtualSize": out.get("virtual-size"), "actualSize": self.actual_size(str(path))}


def _fsync(path: Path) -> None:
    with path.open("rb+") as f:
        os.fsync(f.fileno())
