"""What the benchmark scripts share: timing a child process and reading its peak RSS from outside."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path


def timed(cmd: list[str], log: Path) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child process (os.wait4: that child's own rusage); its output
    goes to ``log``, shown when it fails."""
    with log.open("wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{' '.join(cmd)} failed:\n{tail}")
    return wall, usage.ru_maxrss * 1024
