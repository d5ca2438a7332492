"""Conversion throughput and peak memory against `cp` of the same files, measured in the same run.

    python benchmarks/convert_speed.py [--sizes 0.5,2,8] [--schemes FP8_DYNAMIC,FP8_BLOCK] [--repeat 2]

For each size (GB) it writes a seeded compressed-tensors Llama checkpoint with the layer shapes of a real
8B model (hidden 4096, intermediate 14336, 32/8 heads; as many layers as fit the size; vocab 8k / 32k /
128k so that the embeddings grow too, up to 1 GB tensors; shards of ~2-5 GB) straight to disk in a child
process, then, alternating, times `cp -r --reflink=never` of it (the baseline) and `fp8convert convert`
(in a child process; peak RSS from outside via wait4). FP8_DYNAMIC with bf16 scales is the pass-through
path (codes copied as bytes); FP8_BLOCK is the requantizing path (block -> channel).

Both commands read the source from the page cache (it was just written) and write into it; `sync` runs
before each command (not timed) and after it (timed separately), so the table shows throughput with and
without the writeback to disk. Ratios are cp time / convert time (1.0 = as fast as cp); medians of the
repeats.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS = 4096, 14336, 32, 8
LAYER_BYTES = HIDDEN * (2 * HIDDEN + 2 * HIDDEN * KV_HEADS // HEADS) + 3 * HIDDEN * INTERMEDIATE  # fp8 codes

BUILD = r"""
import sys, json, torch
from pathlib import Path
from fp8convert.examples import TinyModel, quantization_config, write_tokenizer
from fp8convert.writer import OutTensor, write_sharded
path, scheme = Path(sys.argv[1]), sys.argv[2]
layers, vocab, shard = (int(a) for a in sys.argv[3:6])
H, I = 4096, 14336
model = TinyModel(arch="llama", hidden=H, intermediate=I, layers=layers, heads=32, kv_heads=8, vocab=vocab)
ROWS = 1 << 20  # elements per generated chunk

def gen(seed, shape, kind):
    def produce(sink):
        g = torch.Generator().manual_seed(seed)
        n = 1
        for d in shape:
            n *= d
        for e0 in range(0, n, ROWS):
            m = min(ROWS, n - e0)
            if kind == "fp8":  # random codes without NaN (0x7f / 0xff)
                c = torch.randint(0, 0x7F, (m,), generator=g, dtype=torch.uint8)
                c |= torch.randint(0, 2, (m,), generator=g, dtype=torch.uint8) << 7
                sink.write(c)
            elif kind == "scale":
                sink.write((torch.rand(m, generator=g) * 0.01 + 1e-3).to(torch.bfloat16))
            elif kind == "ones":
                sink.write(torch.ones(m, dtype=torch.bfloat16))
            else:
                sink.write((torch.randn(m, generator=g) * 0.02).to(torch.bfloat16))
    return produce

outs = []
def add(key, shape, kind, dtype):
    outs.append(OutTensor(key, dtype, tuple(shape), gen(len(outs), shape, kind)))

add("model.embed_tokens.weight", (vocab, H), "dense", torch.bfloat16)
add("model.norm.weight", (H,), "ones", torch.bfloat16)
add("lm_head.weight", (vocab, H), "dense", torch.bfloat16)
for i in range(layers):
    p = f"model.layers.{i}."
    add(p + "input_layernorm.weight", (H,), "ones", torch.bfloat16)
    add(p + "post_attention_layernorm.weight", (H,), "ones", torch.bfloat16)
    for name, (o, n) in model.linear_shapes(i).items():
        add(p + name + ".weight", (o, n), "fp8", torch.float8_e4m3fn)
        scale = (o, 1) if scheme == "FP8_DYNAMIC" else (-(-o // 128), -(-n // 128))
        add(p + name + ".weight_scale", scale, "scale", torch.bfloat16)
path.mkdir(parents=True)
write_sharded(path, outs, max_shard_bytes=shard)
config = model.config()
config["quantization_config"] = quantization_config(scheme)
(path / "config.json").write_text(json.dumps(config, indent=2))
write_tokenizer(path, 64)
"""


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _run(cmd: list[str]) -> tuple[float, float, int]:
    """(command seconds, following sync seconds, peak RSS bytes of the child via wait4)."""
    subprocess.run(["sync"], check=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd} failed")
    t1 = time.perf_counter()
    subprocess.run(["sync"], check=True)
    return wall, time.perf_counter() - t1, usage.ru_maxrss * 1024


def _layout(gb: float) -> tuple[int, int]:
    """(layers, vocab) for a checkpoint of about ``gb`` GB."""
    vocab = 8192 if gb < 1 else 32000 if gb < 4 else 128256
    rest = gb * 1e9 - 2 * vocab * HIDDEN * 2
    return max(1, round(rest / LAYER_BYTES)), vocab


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0.5,2,8", help="checkpoint sizes in GB, comma-separated")
    ap.add_argument("--schemes", default="FP8_DYNAMIC,FP8_BLOCK")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = ap.parse_args()
    exe = str(Path(sys.executable).with_name("fp8convert"))
    _, _, base_rss = _run([sys.executable, "-c", "import fp8convert.pipeline"])
    print(f"baseline: importing torch + fp8convert = {base_rss / 1e6:.0f} MB peak RSS")
    print(
        f"{'scheme':12s} {'size':>8s} {'cp':>7s} {'convert':>8s} {'ratio':>6s} {'cp+sync':>8s} {'conv+sync':>9s} "
        f"{'ratio':>6s} {'MB/s':>6s} {'peak RSS':>9s}"
    )
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        for scheme in args.schemes.split(","):
            for gb in (float(s) for s in args.sizes.split(",")):
                layers, vocab = _layout(gb)
                src = root / "src"
                shard = 2_000_000_000 if gb < 4 else 5_000_000_000
                cmd = [sys.executable, "-c", BUILD, str(src), scheme, str(layers), str(vocab), str(shard)]
                subprocess.run(cmd, check=True)
                size = _size(src)
                cps, convs, rss = [], [], []
                for _ in range(args.repeat):
                    cps.append(_run(["cp", "-r", "--reflink=never", str(src), str(root / "cp")]))
                    shutil.rmtree(root / "cp")
                    convs.append(_run([exe, "convert", str(src), str(root / "out"), "-q"]))
                    rss.append(convs[-1][2])
                    shutil.rmtree(root / "out")
                cp, conv = statistics.median(c[0] for c in cps), statistics.median(c[0] for c in convs)
                cp_s = statistics.median(c[0] + c[1] for c in cps)
                conv_s = statistics.median(c[0] + c[1] for c in convs)
                print(
                    f"{scheme:12s} {size / 1e9:6.2f}GB {cp:6.2f}s {conv:7.2f}s {cp / conv:6.2f} {cp_s:7.2f}s "
                    f"{conv_s:8.2f}s {cp_s / conv_s:6.2f} {size / conv / 1e6:6.0f} {max(rss) / 1e6:7.0f}MB",
                    flush=True,
                )
                shutil.rmtree(src)


if __name__ == "__main__":
    main()
