"""FakeQuantLinear (fallback numerics) against a plain bf16 F.linear of the same shape, measured in the same run.

    python benchmarks/cpu_runtime.py [--shapes 4096x4096,4096x14336,14336x4096] [--tokens 1,16,512] [--rounds 9]
                                     [--n-split]

For each weight shape ``KxN`` (in x out features, Llama-3-8B's by default: q/o, gate/up, down) and each number of
tokens M, times in interleaved rounds: bf16 ``F.linear`` on the dequantized weight (the baseline), FakeQuantLinear
with its default fp8 weight (dequantized on each call), the same with ``cache_dequantized=True``, and the plain
formula it replaced (``F.linear`` on ``(weight.to(bf16) * fp32 scale).to(bf16)``, fewer rounds). Prints the median
times, the ratios to the baseline, and the module's resident weight bytes over the fp8 weight bytes. The fp8
module also uses one dequantization workspace per thread and dtype, shared by every layer (it holds the largest
layer's bf16 weight): listed apart, since in a model it is paid once, not per layer.

``--n-split`` also checks, for the same shapes and token counts plus a few odd ones, with and without bias,
whether ``F.linear`` on row chunks of a bf16 weight (output features split in 64..1024-row blocks, the chunked
GEMM that would keep each dequantized block in cache) is bit-identical to ``F.linear`` on the whole weight on this
machine. It is not here (torch 2.13, oneDNN, 2 cores): FakeQuantLinear never splits the matmul.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fp8convert.dequant import dequantize_weight_plain, quantize_activation, workspace_bytes
from fp8convert.fakequant import FakeQuantLinear
from fp8convert.spec import ActScheme, Numerics


def _module(weight: torch.Tensor, scale: torch.Tensor, cache: bool) -> FakeQuantLinear:
    n, k = weight.shape
    m = FakeQuantLinear(k, n, numerics=Numerics.FALLBACK, cache_dequantized=cache)
    m.weight, m.weight_scale = weight, scale
    return m


def _resident(m: FakeQuantLinear) -> int:
    """Bytes the module keeps between calls: its buffers plus a cached dequantized weight, if any."""
    cached = m._state.cache[1].nbytes if m._state.cache is not None else 0
    return sum(b.nbytes for b in m.buffers()) + cached


def _time(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _measure(
    weight: torch.Tensor, scale: torch.Tensor, x: torch.Tensor, rounds: int, plain_rounds: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Median ms of bf16 F.linear, the fp8 module, the cached module and the plain formula; resident ratios."""
    w_bf16 = dequantize_weight_plain(weight, scale, torch.bfloat16)
    fp8, cached = _module(weight, scale, False), _module(weight, scale, True)

    def plain() -> torch.Tensor:
        q, s = quantize_activation(x, ActScheme.DYNAMIC_TOKEN)
        x_dq = (q.to(torch.bfloat16) * s).to(torch.bfloat16)
        return F.linear(x_dq, dequantize_weight_plain(weight, scale, torch.bfloat16))

    runs: dict[str, Callable[[], object]] = {
        "bf16": lambda: F.linear(x, w_bf16),
        "fp8": lambda: fp8(x),
        "cached": lambda: cached(x),
        "plain": plain,
    }
    with torch.inference_mode():
        got = fp8(x)
        if not torch.equal(got, cached(x)) or (plain_rounds and not torch.equal(got, plain())):
            raise SystemExit(f"{tuple(weight.shape)} M={x.shape[0]}: the fp8, cached and plain outputs differ")
        times: dict[str, list[float]] = {name: [] for name in runs}
        for r in range(rounds):  # interleaved: the machine's drift hits every contender alike
            for name, run in runs.items():
                if name != "plain" or r < plain_rounds:
                    times[name].append(_time(run))
    med = {name: statistics.median(v) * 1e3 if v else float("nan") for name, v in times.items()}
    mem = {"fp8": _resident(fp8) / weight.nbytes, "cached": _resident(cached) / weight.nbytes}
    return med, mem


def _n_split_check(shapes: list[tuple[int, int]], tokens: list[int]) -> None:
    """Count the configurations where F.linear over output-row chunks differs from F.linear on the whole weight."""
    g = torch.Generator().manual_seed(1)
    differ: dict[int, list[str]] = {m: [] for m in tokens}
    total = 0
    for k, n in [*shapes, (1000, 777), (3072, 8192), (11008, 4096)]:
        w = (torch.randn(n, k, generator=g) * 0.05).to(torch.bfloat16)
        b = torch.randn(n, generator=g).to(torch.bfloat16)
        for m in tokens:
            x = torch.randn(m, k, generator=g).to(torch.bfloat16)
            for bias in (None, b):
                full = F.linear(x, w, bias).view(torch.int16)
                for rows in (64, 128, 256, 1024):
                    if rows >= n:
                        continue
                    parts = [
                        F.linear(x, w[i : i + rows], None if bias is None else bias[i : i + rows])
                        for i in range(0, n, rows)
                    ]
                    total += 1
                    if not torch.equal(torch.cat(parts, -1).view(torch.int16), full):
                        differ[m].append(f"{k}x{n}{'+bias' if bias is not None else ''}/{rows}")
    bad = sum(len(v) for v in differ.values())
    print(f"N-split F.linear == whole F.linear (bf16, bit for bit): {total - bad} of {total} configurations")
    for m, cases in differ.items():
        if cases:
            print(f"  M={m}: {len(cases)} differ, e.g. {', '.join(cases[:6])} (KxN[+bias]/rows per chunk)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4096x4096,4096x14336,14336x4096", help="KxN list (in x out features)")
    ap.add_argument("--tokens", default="1,16,512", help="numbers of tokens M")
    ap.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds (median reported)")
    ap.add_argument("--plain-rounds", type=int, default=3, help="rounds for the plain formula (0: skip it)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--n-split", action="store_true", help="also check whether a row-chunked F.linear is bit-exact")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; times in ms (median of {args.rounds})")
    header = (
        f"{'K x N':>12} {'M':>4} | {'bf16':>8} {'fp8':>8} {'cached':>8} {'plain':>8} | "
        f"{'fp8/bf16':>8} {'cached/bf16':>11} {'plain/bf16':>10} | {'fp8 mem':>7} {'cached mem':>10} {'workspace':>9}"
    )
    print(header)
    print("-" * len(header))
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.lower().split("x"))
        weight = (torch.randn(n, k, generator=g) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
        scale = (torch.rand(n, 1, generator=g) * 2e-3 + 1e-4).to(torch.bfloat16)
        for m in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(m, k, generator=g).to(torch.bfloat16)
            med, mem = _measure(weight, scale, x, args.rounds, args.plain_rounds)
            print(
                f"{shape:>12} {m:>4} | {med['bf16']:8.2f} {med['fp8']:8.2f} {med['cached']:8.2f} {med['plain']:8.2f} | "
                f"{med['fp8'] / med['bf16']:7.2f}x {med['cached'] / med['bf16']:10.2f}x "
                f"{med['plain'] / med['bf16']:9.2f}x | {mem['fp8']:6.3f}x {mem['cached']:9.3f}x "
                f"{workspace_bytes() / weight.nbytes:8.2f}x"
            )
    print(
        "fp8 mem / cached mem: the module's resident bytes over its fp8 weight bytes. workspace: this thread's "
        "dequantization buffers, shared by all layers (they hold the largest layer so far), over this layer's fp8 bytes"
    )
    if args.n_split:
        shapes = [(int(a), int(b)) for a, b in (s.lower().split("x") for s in args.shapes.split(","))]
        _n_split_check(shapes, [int(t) for t in args.tokens.split(",")])


if __name__ == "__main__":
    main()
