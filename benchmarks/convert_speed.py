"""Conversion speed and peak memory against `cp` of the same files, measured in the same run.

    python benchmarks/convert_speed.py [--hidden 2048] [--layers 4]

Builds a seeded compressed-tensors checkpoint (FP8_DYNAMIC: the pass-through path; FP8_BLOCK: the
requantization path), then times `cp -r` of the source (baseline) and `fp8convert convert` in a subprocess,
and prints wall time, the ratio to `cp`, throughput, and the converter's peak RSS relative to the size of
its largest tensor and of the whole checkpoint.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _timed(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child process (os.wait4: that child's own rusage)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd} failed")
    return wall, usage.ru_maxrss * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    args = ap.parse_args()
    exe = str(Path(sys.executable).with_name("fp8convert"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for scheme in ("FP8_DYNAMIC", "FP8_BLOCK"):
            src = root / f"src-{scheme}"
            # built in a child process: a child forked from a large parent reports the parent's RSS
            build = (
                f"from fp8convert.examples import build_compressed_tensors as b; b({str(src)!r}, "
                f"scheme={scheme!r}, hidden={args.hidden}, intermediate={args.intermediate}, "
                f"layers={args.layers}, vocab={args.vocab}, heads={args.hidden // 128}, "
                f"kv_heads={max(1, args.hidden // 512)}, shards=2)"
            )
            subprocess.run([sys.executable, "-c", build], check=True)
            size = _size(src)
            subprocess.run(["cat", *map(str, src.glob("*.safetensors"))], check=True, stdout=subprocess.DEVNULL)
            cp_wall, _ = _timed(["cp", "-r", "--reflink=never", str(src), str(root / "cp")])
            shutil.rmtree(root / "cp")
            base_wall, base_rss = _timed([sys.executable, "-c", "import fp8convert.pipeline"])
            wall, rss = _timed([exe, "convert", str(src), str(root / f"out-{scheme}"), "-q"])
            rss -= base_rss  # what conversion adds to the interpreter + torch import
            largest = args.intermediate * args.hidden  # biggest fp8 weight, bytes
            print(
                f"{scheme:12s} checkpoint {size / 1e6:7.1f} MB | cp {cp_wall:6.2f} s | convert {wall:6.2f} s "
                f"= {wall / cp_wall:5.1f}x cp, {size / wall / 1e6:6.1f} MB/s | peak RSS {rss / 1e6:7.1f} MB "
                f"above the {base_rss / 1e6:.0f} MB of importing torch = {rss / size:4.2f}x checkpoint, "
                f"{rss / largest:5.1f}x largest fp8 weight"
            )
            shutil.rmtree(root / f"out-{scheme}")
            shutil.rmtree(src)


if __name__ == "__main__":
    main()
