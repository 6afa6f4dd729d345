"""Host tools for the Flat service: finding them (tool) and running them, never through a shell (run)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess

from nimbostack.agent.driver import DriverError


def tool(name: str) -> str | None:
    """Where the host tool is; the sbin directories count even when the agent's PATH lacks them."""
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/bin:/bin")


async def run(argv: list[str], stdin: bytes | None = None, check: bool = True, ok_if: str = "") -> tuple[int, str]:
    """Run a command (never through a shell); DriverError when it fails and ``check``."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await proc.communicate(stdin)
    text = (out + err).decode(errors="replace").strip()
    if proc.returncode and check and not (ok_if and ok_if in text):
        raise DriverError("FLAT_COMMAND_FAILED", f"{os.path.basename(argv[0])} failed", f"{argv}: {text[:500]}")
    return proc.returncode or 0, text
