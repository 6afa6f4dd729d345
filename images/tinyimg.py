#!/usr/bin/env python3
"""Small helpers for images/build-tiny (stdlib only, no root needed).

Subcommands:
  modules KMODDIR DESTDIR LOADLIST NAME...
      Copy the named kernel modules and everything they depend on
      (read from each .ko's ``depends=`` modinfo entry) from the extracted
      kernel package's /lib/modules/<ver> tree KMODDIR into DESTDIR, keeping
      the relative paths, and write LOADLIST: one relative path a line, in an
      order in which ``insmod`` can load them (dependencies first).
      Names that are built into the kernel (modules.builtin) or absent are
      reported on stderr and skipped.
  cpio SRCDIR OUT [--dev PATH:c|b:MAJOR:MINOR:MODE]...
      Write a newc cpio archive of SRCDIR (owner root:root, mtime 0) plus the
      given device nodes, so that an initramfs can hold /dev/console without
      mknod (and without being root).
  mbr IMAGE START_SECTOR NUM_SECTORS TYPE_HEX
      Write an MBR partition table with one bootable primary partition into
      IMAGE (the boot code area, bytes 0..439, is left untouched).
"""
from __future__ import annotations

import os
import stat
import struct
import sys


# --------------------------------------------------------------------- modules
def _modname(path: str) -> str:
    base = os.path.basename(path)
    for suffix in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def _depends(path: str) -> list[str]:
    with open(path, "rb") as f:
        data = f.read()
    key = b"\0depends="
    i = data.find(key)
    if i < 0:
        return []
    j = data.index(b"\0", i + len(key))
    value = data[i + len(key):j].decode()
    return [d.replace("-", "_") for d in value.split(",") if d]


def cmd_modules(kmoddir: str, destdir: str, loadlist: str, names: list[str]) -> int:
    index: dict[str, str] = {}
    for root, _dirs, files in os.walk(os.path.join(kmoddir, "kernel")):
        for fn in files:
            if ".ko" in fn:
                full = os.path.join(root, fn)
                index[_modname(fn)] = os.path.relpath(full, kmoddir)
    builtin: set[str] = set()
    bfile = os.path.join(kmoddir, "modules.builtin")
    if os.path.exists(bfile):
        with open(bfile) as f:
            builtin = {_modname(line.strip()) for line in f if line.strip()}

    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str, stack: tuple[str, ...] = ()) -> None:
        name = name.replace("-", "_")
        if name in seen:
            return
        if name not in index:
            what = "built-in" if name in builtin else "not found"
            print(f"tinyimg: module {name}: {what}, skipped", file=sys.stderr)
            seen.add(name)
            return
        if name in stack:
            return
        for dep in _depends(os.path.join(kmoddir, index[name])):
            visit(dep, stack + (name,))
        seen.add(name)
        order.append(index[name])

    for n in names:
        visit(n)

    for rel in order:
        src = os.path.join(kmoddir, rel)
        dst = os.path.join(destdir, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        with open(src, "rb") as fi, open(dst, "wb") as fo:
            fo.write(fi.read())
    with open(loadlist, "w") as f:
        for rel in order:
            f.write(rel + "\n")
    print(f"tinyimg: {len(order)} modules", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------ cpio
def _cpio_entry(out, ino: int, name: str, mode: int, data: bytes = b"",
                rdevmajor: int = 0, rdevminor: int = 0, nlink: int = 1) -> None:
    namebytes = name.encode() + b"\0"
    hdr = "070701" + "".join(
        f"{v:08X}"
        for v in (ino, mode, 0, 0, nlink, 0, len(data), 0, 0,
                  rdevmajor, rdevminor, len(namebytes), 0)
    )
    out.write(hdr.encode())
    out.write(namebytes)
    out.write(b"\0" * ((4 - (110 + len(namebytes)) % 4) % 4))
    out.write(data)
    out.write(b"\0" * ((4 - len(data) % 4) % 4))


def cmd_cpio(srcdir: str, outpath: str, devs: list[str]) -> int:
    ino = 1
    with open(outpath, "wb") as out:
        entries = []
        for root, dirs, files in os.walk(srcdir):
            dirs.sort()
            for name in sorted(dirs) + sorted(files):
                entries.append(os.path.join(root, name))
        entries.sort()
        for full in entries:
            rel = os.path.relpath(full, srcdir)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                data = os.readlink(full).encode()
                _cpio_entry(out, ino, rel, stat.S_IFLNK | 0o777, data)
            elif stat.S_ISDIR(st.st_mode):
                _cpio_entry(out, ino, rel, stat.S_IFDIR | stat.S_IMODE(st.st_mode), nlink=2)
            elif stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    data = f.read()
                _cpio_entry(out, ino, rel, stat.S_IFREG | stat.S_IMODE(st.st_mode), data)
            else:
                continue
            ino += 1
        for spec in devs:
            path, kind, major, minor, mode = spec.split(":")
            fmt = stat.S_IFCHR if kind == "c" else stat.S_IFBLK
            _cpio_entry(out, ino, path.lstrip("/"), fmt | int(mode, 8),
                        rdevmajor=int(major), rdevminor=int(minor))
            ino += 1
        _cpio_entry(out, 0, "TRAILER!!!", 0)
        # pad to a 512-byte boundary like GNU cpio does
        pos = out.tell()
        out.write(b"\0" * ((512 - pos % 512) % 512))
    return 0


# ------------------------------------------------------------------------- mbr
def _chs(lba: int) -> bytes:
    heads, sectors = 255, 63
    cyl = lba // (heads * sectors)
    if cyl > 1023:
        return b"\xfe\xff\xff"
    head = (lba // sectors) % heads
    sect = lba % sectors + 1
    return bytes([head, ((cyl >> 2) & 0xC0) | sect, cyl & 0xFF])


def cmd_mbr(image: str, start: int, count: int, ptype: int) -> int:
    entry = (bytes([0x80]) + _chs(start) + bytes([ptype]) + _chs(start + count - 1)
             + struct.pack("<II", start, count))
    table = entry + b"\0" * 48 + b"\x55\xaa"
    with open(image, "r+b") as f:
        f.seek(440)
        f.write(struct.pack("<I", 0x4E494D42) + b"\0\0")  # disk signature "BMIN"
        f.write(table)
    return 0


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, args = argv[1], argv[2:]
    if cmd == "modules" and len(args) >= 4:
        return cmd_modules(args[0], args[1], args[2], args[3:])
    if cmd == "cpio" and len(args) >= 2:
        devs, rest = [], []
        it = iter(args)
        for a in it:
            if a == "--dev":
                devs.append(next(it))
            else:
                rest.append(a)
        return cmd_cpio(rest[0], rest[1], devs)
    if cmd == "mbr" and len(args) == 4:
        return cmd_mbr(args[0], int(args[1]), int(args[2]), int(args[3], 16))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
