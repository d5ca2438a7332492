"""Whole-model CPU runtime: ``load_cpu_model`` on a converted ~1B Llama against the same model in bf16 (transformers).

    python benchmarks/cpu_model.py [--hidden 2048] [--intermediate 8192] [--layers 16] [--vocab 32000]
                                   [--prompt 128] [--decode 16] [--rounds 1] [--threads N] [--keep DIR]

Builds a seeded llm-compressor FP8_DYNAMIC Llama (by default Llama-3.2-1B's shapes with a 32k vocabulary and an
untied head: 1.1 B parameters), converts it with ``fp8convert convert --target cpu`` and writes the same model in
bf16 (each linear's weight dequantized exactly as FakeQuantLinear dequantizes it) for transformers. Then, each in
its own child process, rounds interleaved:

- ``bf16``: ``AutoModelForCausalLM.from_pretrained(bf16 copy, dtype=bf16)``, the baseline;
- ``fp8``: ``load_cpu_model(cpu/)``, fallback numerics, weights kept fp8 (dequantized on each call);
- ``fp8 cached``: the same with ``cache_dequantized=True`` (bf16 copies kept after the first call).

Each child reports load time, prefill tokens/s (one forward of ``--prompt`` tokens, after a short warm-up
forward) and decode tokens/s (``--decode`` greedy steps on the KV cache); the parent takes the child's peak RSS
from ``os.wait4`` (its own rusage) and prints it above the RSS of importing torch + transformers + fp8convert
(same run). Every figure is printed with its ratio to bf16 from the same run. The fp8 and fp8-cached children
must decode the same tokens (same numerics, bit for bit).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import timed

KINDS = ("bf16", "fp8", "fp8 cached")


# ---- children: each runs in its own process, invoked as `cpu_model.py _child NAME ARGS...` -----------------------
def _child_build(path: str, dims_json: str) -> None:
    from fp8convert.examples import build_compressed_tensors

    build_compressed_tensors(path, scheme="FP8_DYNAMIC", shards=2, **json.loads(dims_json))


def _child_bf16(cpu_dir: str, out: str) -> None:
    """The cpu/ variant as a plain bf16 checkpoint: each planned linear's weight dequantized to bf16."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from fp8convert.dequant import dequantize_weight
    from fp8convert.fakequant import read_cpu_plan

    src, dst = Path(cpu_dir), Path(out)
    dst.mkdir(parents=True)
    plan = read_cpu_plan(src)
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(src.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (safe_open is not a dict)
    for name, spec in plan["modules"].items():
        scale = tensors.pop(f"{name}.weight_scale")
        tensors.pop(f"{name}.input_scale", None)
        scale = scale.reshape(-1, 1) if spec["weight"] == "channel" else scale.reshape(1)
        tensors[f"{name}.weight"] = dequantize_weight(tensors[f"{name}.weight"], scale, scale.dtype)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config", None)
    (dst / "config.json").write_text(json.dumps(config, indent=2))


def _child_run(kind: str, path: str, result: str, prompt: str, decode: str, threads: str) -> None:
    """Load one contender, run a warm-up, a timed prefill and a timed greedy decode; write the figures as JSON."""
    import torch

    if int(threads):
        torch.set_num_threads(int(threads))
    t0 = time.perf_counter()
    model: Any
    if kind == "bf16":
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    else:
        from fp8convert.fakequant import load_cpu_model

        model = load_cpu_model(path, cache_dequantized=kind == "fp8 cached")
    load = time.perf_counter() - t0
    model.eval()
    vocab = model.config.vocab_size
    ids = torch.randint(4, vocab, (1, int(prompt)), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        t0 = time.perf_counter()
        model(ids[:, :8])  # warm-up: first-call work (fp8: NaN-code checks, workspace; cached: the bf16 copies)
        warmup = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        prefill = time.perf_counter() - t0
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        tokens = [int(token)]
        t0 = time.perf_counter()
        for _ in range(int(decode)):
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            tokens.append(int(token))
        steps = time.perf_counter() - t0
    Path(result).write_text(
        json.dumps(
            {
                "load": load,
                "warmup": warmup,
                "prefill_tps": int(prompt) / prefill,
                "decode_tps": int(decode) / steps,
                "tokens": tokens,
            }
        )
    )


def _child_imports() -> None:
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import fp8convert.fakequant  # noqa: F401


# ---- parent: no torch here, so forked children start small -------------------------------------------------------
def _child_cmd(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "_child", *args]


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--prompt", type=int, default=128, help="prefill tokens (prompt + decode <= 256)")
    ap.add_argument("--decode", type=int, default=16, help="greedy decode steps")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds per contender (median reported)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in the children (0: torch's default)")
    ap.add_argument("--keep", type=Path, help="build into (and reuse) this directory instead of a temporary one")
    args = ap.parse_args()
    if args.prompt + args.decode > 256:
        ap.error("--prompt + --decode must be at most 256 (the model's max_position_embeddings)")
    dims = {
        "hidden": args.hidden,
        "intermediate": args.intermediate,
        "layers": args.layers,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "vocab": args.vocab,
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        logs = Path(tmp)
        src, out, bf16 = root / "src", root / "out", root / "bf16"
        if not (out / "cpu").exists():
            shutil.rmtree(src, ignore_errors=True)
            t0 = time.perf_counter()
            timed(_child_cmd("build", str(src), json.dumps(dims)), logs / "build.log")
            build = time.perf_counter() - t0
            exe = str(Path(sys.executable).with_name("fp8convert"))
            convert, _ = timed([exe, "convert", str(src), str(out), "--target", "cpu", "-q"], logs / "convert.log")
            print(f"built the FP8_DYNAMIC source in {build:.0f} s; fp8convert convert --target cpu: {convert:.0f} s")
        if not bf16.exists():
            timed(_child_cmd("bf16", str(out / "cpu"), str(bf16)), logs / "bf16.log")
        fp8_size, bf16_size = _size(out / "cpu"), _size(bf16)
        params = (bf16_size // 2) / 1e9
        _, base_rss = timed(_child_cmd("imports"), logs / "imports.log")
        figures: dict[str, list[dict]] = {k: [] for k in KINDS}
        for r in range(args.rounds):
            for kind in KINDS:
                result = logs / f"{kind}-{r}.json"
                path = bf16 if kind == "bf16" else out / "cpu"
                cmd = _child_cmd("run", kind, str(path), str(result), str(args.prompt), str(args.decode))
                _, rss = timed([*cmd, str(args.threads)], logs / "run.log")
                figures[kind].append({**json.loads(result.read_text()), "rss": rss - base_rss})
        if args.keep is None:
            shutil.rmtree(src, ignore_errors=True)
    _report(figures, params, fp8_size, bf16_size, base_rss, args)


def _report(
    figures: dict[str, list[dict]],
    params: float,
    fp8_size: int,
    bf16_size: int,
    base_rss: int,
    args: argparse.Namespace,
) -> None:
    med = {
        k: {f: statistics.median(r[f] for r in runs) for f in runs[0] if f != "tokens"} for k, runs in figures.items()
    }
    print(
        f"Llama {params:.2f} B parameters (hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} "
        f"layers, vocab {args.vocab}); cpu/ {fp8_size / 1e9:.2f} GB, bf16 {bf16_size / 1e9:.2f} GB; prefill "
        f"{args.prompt} tokens, decode {args.decode}; median of {args.rounds} round(s); RSS above the "
        f"{base_rss / 1e6:.0f} MB of importing torch + transformers"
    )
    header = (
        f"{'':>11} | {'load s':>7} {'x bf16':>6} | {'prefill tok/s':>13} {'x bf16':>6} | "
        f"{'decode tok/s':>12} {'x bf16':>6} | {'peak RSS MB':>11} {'x bf16':>6} | {'warm-up s':>9}"
    )
    print(header)
    print("-" * len(header))
    base = med["bf16"]
    for kind in KINDS:
        m = med[kind]
        print(
            f"{kind:>11} | {m['load']:7.2f} {m['load'] / base['load']:5.2f}x | {m['prefill_tps']:13.1f} "
            f"{m['prefill_tps'] / base['prefill_tps']:5.2f}x | {m['decode_tps']:12.2f} "
            f"{m['decode_tps'] / base['decode_tps']:5.2f}x | {m['rss'] / 1e6:11.0f} {m['rss'] / base['rss']:5.2f}x | "
            f"{m['warmup']:9.2f}"
        )
    same = all(a["tokens"] == b["tokens"] for a, b in zip(figures["fp8"], figures["fp8 cached"], strict=True))
    print(
        "x bf16: time and memory ratios (lower is better), throughput ratios (higher is better). "
        f"fp8 and fp8 cached decoded the same tokens: {'yes' if same else 'NO'}"
    )
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_child":
        name, rest = sys.argv[2], sys.argv[3:]
        children: dict[str, Callable[..., None]] = {
            "build": _child_build,
            "bf16": _child_bf16,
            "run": _child_run,
            "imports": _child_imports,
        }
        children[name](*rest)
    else:
        main()
