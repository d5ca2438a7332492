"""Peers side by side: fp8convert against what users do today for the same job, measured in the same run.

    python benchmarks/peers.py [--quick] [--hidden 2048] [--intermediate 5632] [--layers 4] [--repeat 1]
                               [--ct-python PATH] [--threads N] [--no-load]

Builds two seeded block-FP8 checkpoints of the same bf16 model (Llama shapes, two shards): a DeepSeek/Qwen-style
one (``quant_method: fp8``, F32 ``weight_scale_inv`` per 128x128 tile) and an llm-compressor ``FP8_BLOCK`` one
(compressed-tensors, BF16 ``weight_scale``). Every contender runs in its own child process (wall time and peak
RSS from ``os.wait4``: the child's own rusage), rounds interleaved, medians printed; every figure is a ratio to
fp8convert measured in the same run. RSS is printed above the RSS of ``python -c "import torch"`` (same run).

1. Dequantizing the block checkpoint: ``fp8convert convert`` (the job users want: the AIU + CPU artifact) against
   DeepSeek-V3's ``inference/fp8_cast_bf16.py`` ported to torch on CPU (their ``weight_dequant`` is a Triton
   kernel), compressed-tensors' ``convert_checkpoint`` with ``FP8BlockDequantizer`` / ``CompressedTensorsDequantizer``,
   and fp8convert's own dequantization (``open_source`` + ``read_linear`` + ``dequantize_linear``) streamed to bf16
   shards, the like-for-like. The bf16 outputs are then compared tensor by tensor (OK: all bit-identical).
2. Loading the converted artifact on CPU: ``load_cpu_model(OUT/cpu)`` against IBM's loader (ibm-fms ``get_model``
   + fms-model-optimizer ``FP8Linear``) on ``OUT/aiu`` and transformers on the bf16 copy; load time, a forward of
   a few tokens, peak RSS. ``load_cpu_model(cache_dequantized=True)`` shows the forward with bf16 weights kept.

The default (hidden 2048, intermediate 5632, 4 layers, vocab 32000: a 443 MB checkpoint) takes about 3 minutes on
2 cores; ``--quick`` about 1 minute. On a shared box use ``--repeat 3 --threads 1``: with other processes on the
cores, two OpenMP threads make some contenders (fp8convert convert, the forwards) several times slower, run to run.

compressed-tensors is optional: without it those lines say "skipped: pip install compressed-tensors".
``--ct-python`` runs them with another interpreter (one with the same torch) instead of installing it here.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from _common import timed

BLOCK = 128
#: DeepSeek-V3's config block (4 keys); Qwen3-FP8 adds modules_to_not_convert
DEEPSEEK_QC = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
#: the linears of the Llama-shaped model, as compressed-tensors' own docs write FP8BlockDequantizer targets
CT_TARGETS = [r"re:.*self_attn\.(q|k|v|o)_proj$", r"re:.*mlp\.(gate|up|down)_proj$"]
#: what CompressedTensorsDequantizer must be told to ignore on a real llm-compressor checkpoint (see _child_ct)
CT_NOT_LINEAR = [r"re:.*embed_tokens$", r"re:.*norm$"]
PROMPT = [1, 5, 9, 30, 3, 7, 2, 11]


# ---- children: each runs in its own process, invoked as `peers.py _child NAME ARGS...` ---------------------------
def _child_build(kind: str, path: str, dims_json: str) -> None:
    """Write the seeded source checkpoint (``ct``: llm-compressor FP8_BLOCK; ``fp8``: DeepSeek-style)."""
    import torch

    from fp8convert.examples import (
        TinyModel,
        build_compressed_tensors,
        dense_tensors,
        quantize_weight,
        weight_scale,
        write_checkpoint,
    )

    dims = json.loads(dims_json)
    if kind == "ct":
        build_compressed_tensors(path, scheme="FP8_BLOCK", shards=2, **dims)
        return
    # DeepSeek / Qwen3 L2 (FORMATS.md): e4m3 weight + F32 weight_scale_inv [ceil(out/128), ceil(in/128)], the
    # dequantization multiplier (amax / 448 per zero-padded tile); embeddings, norms and lm_head bf16
    model = TinyModel(**dims)
    tensors = dense_tensors(model, seed=0)
    for key in [k for k in tensors if k.startswith("model.layers.") and k.endswith("_proj.weight")]:
        scale = weight_scale(tensors[key], "block", torch.float32, BLOCK)
        tensors[key] = quantize_weight(tensors[key], scale, "block", BLOCK)
        tensors[key + "_scale_inv"] = scale
    config = model.config()
    config["quantization_config"] = dict(DEEPSEEK_QC)
    write_checkpoint(Path(path), tensors, config, shards=2)


def _child_fp8_cast_bf16(src: str, out: str) -> None:
    """DeepSeek-V3 ``inference/fp8_cast_bf16.py``, same algorithm on CPU: per shard ``load_file``; every 1-byte
    tensor with a ``<name>_scale_inv`` (looked up through the index, the last 2 loaded shards cached) becomes
    ``fp32(w) * scale`` per 128x128 tile, stored bf16; ``*_scale_inv`` dropped; shards saved under their
    names; a new index without the scales. Like the original it writes no config.json."""
    import torch
    from safetensors.torch import load_file, save_file

    torch.set_default_dtype(torch.bfloat16)
    src_dir, out_dir = Path(src), Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    weight_map = json.loads((src_dir / "model.safetensors.index.json").read_text())["weight_map"]
    cache: dict[str, dict[str, torch.Tensor]] = {}

    def lookup(name: str) -> torch.Tensor:
        file = weight_map[name]  # KeyError when there is no scale, as in the original
        if file not in cache:
            cache[file] = load_file(str(src_dir / file))
        return cache[file][name]

    def dequant(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        # the Triton kernel's y = x.to(float32) * s for each BLOCK x BLOCK tile, stored in the default dtype
        rows, cols = w.shape
        tiles = s.repeat_interleave(BLOCK, 0)[:rows].repeat_interleave(BLOCK, 1)[:, :cols]
        return (w.to(torch.float32) * tiles.to(torch.float32)).to(torch.get_default_dtype())

    converted = []
    for shard in sorted(src_dir.glob("*.safetensors")):
        state = load_file(str(shard))
        cache[shard.name] = state
        new = {}
        for name, w in state.items():
            if name.endswith("_scale_inv"):
                continue
            if w.element_size() == 1:
                try:
                    new[name] = dequant(w, lookup(f"{name}_scale_inv"))
                    converted.append(name)
                except KeyError:
                    print(f"Warning: missing scale_inv for {name}, kept as is", file=sys.stderr)
                    new[name] = w
            else:
                new[name] = w
        save_file(new, str(out_dir / shard.name))
        while len(cache) > 2:
            del cache[next(iter(cache))]
    for name in converted:
        weight_map.pop(f"{name}_scale_inv", None)
    index = {"metadata": {}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _child_fp8convert_dequant(src: str, out: str) -> None:
    """fp8convert's own dequantization as a bf16 writer: the format reader's plan and ``read_linear`` (canonical
    ``fp32(fp8) * scale``), ``dequantize_linear`` -> bf16, streamed tensor by tensor with ``write_sharded``."""
    import torch

    from fp8convert.formats import open_source
    from fp8convert.numerics import dequantize_linear
    from fp8convert.shards import copy_aux_files
    from fp8convert.writer import OutTensor, write_sharded

    ckpt, config, reader, plan = open_source(src)
    outs = []

    def weight(lin):
        return lambda sink: sink.write(dequantize_linear(reader.read_linear(ckpt, lin)).to(torch.bfloat16))

    def raw(ref):
        return lambda sink: sink.copy(ckpt.root / ref.file, ref.offset, ref.nbytes)

    for lin in plan.linears:
        shape = (lin.out_features, lin.in_features)
        outs.append(OutTensor(f"{lin.module}.weight", torch.bfloat16, shape, weight(lin)))
        if lin.bias is not None:
            outs.append(OutTensor(lin.bias.key, lin.bias.dtype, lin.bias.shape, raw(lin.bias)))
    for ref in plan.passthrough:
        outs.append(OutTensor(plan.rename.get(ref.key, ref.key), ref.dtype, ref.shape, raw(ref)))
    out_dir = Path(out)
    out_dir.mkdir(parents=True)
    write_sharded(out_dir, outs, max_shard_bytes=5 * 10**9)
    config.pop("quantization_config", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    copy_aux_files(Path(src), out_dir)


def _child_ct(kind: str, src: str, out: str) -> None:
    """compressed-tensors' converter entry point: ``convert_checkpoint`` with ``FP8BlockDequantizer`` (DeepSeek-style
    source) or ``CompressedTensorsDequantizer`` (llm-compressor source), to bf16, on CPU, one worker."""
    import torch
    from compressed_tensors.entrypoints.convert import convert_checkpoint
    from compressed_tensors.entrypoints.convert.converters import CompressedTensorsDequantizer, FP8BlockDequantizer

    if kind == "fp8block":
        converter = FP8BlockDequantizer(targets=CT_TARGETS, weight_block_size=(BLOCK, BLOCK))
    else:
        # with the "Linear" target, 0.19.0 asks every other `.weight` (embeddings, norms) for a weight_scale
        # ("Dependency weight model.embed_tokens.weight_scale not found in weight map"): ignore them
        converter = CompressedTensorsDequantizer(src, ignore=CT_NOT_LINEAR)
    convert_checkpoint(src, out, converter=converter, max_workers=1, device=torch.device("cpu"))


def _forward_times(run: Callable[[], object], n: int = 3) -> float:
    import torch

    with torch.inference_mode():
        run()  # warm-up
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _child_load(kind: str, path: str, result: str) -> None:
    """Load a converted model on CPU and run a forward of ``PROMPT``; write import/load/forward seconds as JSON."""
    import warnings

    t0 = time.perf_counter()
    import torch

    ids = torch.tensor([PROMPT])
    if kind in ("cpu", "cpu-cached"):
        from fp8convert.fakequant import load_cpu_model

        t1 = time.perf_counter()
        model = load_cpu_model(path, cache_dequantized=kind == "cpu-cached")
        forward = lambda: model(ids).logits  # noqa: E731
    elif kind == "fms":
        import logging

        logging.getLogger("torchao").setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import fms.models
            import fms_mo.aiu_addons.fp8.fp8_linear  # noqa: F401  (registers the fp8 checkpoint adapter)

            t1 = time.perf_counter()
            model = fms.models.get_model(
                "hf_pretrained", model_path=path, device_type="cpu", data_type=None, fused_weights=False
            )
        forward = lambda: model(ids)  # noqa: E731
    else:
        import transformers

        t1 = time.perf_counter()
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
        forward = lambda: model(ids).logits  # noqa: E731
    t2 = time.perf_counter()
    fwd = _forward_times(forward)
    Path(result).write_text(json.dumps({"import": t1 - t0, "load": t2 - t1, "forward": fwd}))


def _child_check(ds_src: str, ct_src: str, outs_json: str) -> None:
    """Every bf16 output against fp8convert's dequantization of its source: the same keys, every tensor equal."""
    import torch
    from safetensors import safe_open

    from fp8convert.examples import TinyModel, dense_tensors
    from fp8convert.formats import open_source
    from fp8convert.numerics import dequantize_linear, sqnr_db

    def load_dir(path: Path) -> dict[str, torch.Tensor]:
        tensors = {}
        for file in sorted(path.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                tensors |= {k: f.get_tensor(k) for k in f.keys()}
        return tensors

    def reference(src: str) -> tuple[dict[str, torch.Tensor], float]:
        ckpt, _, reader, plan = open_source(src)
        ref = {ref.key: ckpt.load(ref.key) for ref in plan.passthrough}
        worst = float("inf")
        cfg = json.loads((Path(src) / "config.json").read_text())
        dense = dense_tensors(
            TinyModel(
                hidden=cfg["hidden_size"],
                intermediate=cfg["intermediate_size"],
                layers=cfg["num_hidden_layers"],
                heads=cfg["num_attention_heads"],
                kv_heads=cfg["num_key_value_heads"],
                vocab=cfg["vocab_size"],
            ),
            seed=0,
        )
        for lin in plan.linears:
            w = dequantize_linear(reader.read_linear(ckpt, lin)).to(torch.bfloat16)
            ref[f"{lin.module}.weight"] = w
            worst = min(worst, sqnr_db(dense[f"{lin.module}.weight"].float(), w.float()))
        return ref, worst

    refs = {"fp8": reference(ds_src), "ct": reference(ct_src)}
    for label, (src_kind, out) in json.loads(outs_json).items():
        ref, worst = refs[src_kind]
        got = load_dir(Path(out))
        same_keys = set(got) == set(ref)
        equal = sum(torch.equal(got[k], ref[k]) for k in ref if k in got)
        diff = max((float((got[k].float() - ref[k].float()).abs().max()) for k in ref if k in got), default=0.0)
        verdict = "OK" if same_keys and equal == len(ref) else "MISMATCH"
        print(
            f"  {verdict:8s} {label:48s} {equal}/{len(ref)} tensors bit-identical to fp8convert's dequantization"
            f"{'' if same_keys else ', key sets differ'}, max |diff| {diff:.3g}; "
            f"linears vs the original bf16 model: SQNR >= {worst:.1f} dB"
        )


CHILDREN: dict[str, Callable[..., None]] = {
    "build": _child_build,
    "fp8_cast_bf16": _child_fp8_cast_bf16,
    "fp8convert_dequant": _child_fp8convert_dequant,
    "ct": _child_ct,
    "load": _child_load,
    "check": _child_check,
}


# ---- parent: no torch here, so forked children start small -------------------------------------------------------
def _size(path: Path) -> int:
    """Bytes of the files under ``path``, hardlinks counted once."""
    seen: dict[tuple[int, int], int] = {}
    for p in path.rglob("*"):
        if p.is_file():
            st = p.stat()
            seen[(st.st_dev, st.st_ino)] = st.st_size
    return sum(seen.values())


@dataclass
class Contender:
    label: str
    cmd: list[str] | None  # None: skipped
    out: Path | None = None  # output directory, removed after each run (the last run's kept if keep)
    python: str = sys.executable
    keep: bool = False
    result: Path | None = None  # JSON written by load children
    skip: str = ""
    walls: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    inner: list[dict[str, float]] = field(default_factory=list)
    out_size: int = 0

    def run(self, log: Path) -> None:
        assert self.cmd is not None
        if self.out is not None and self.out.exists():
            shutil.rmtree(self.out)
        wall, rss = timed(self.cmd, log)
        self.walls.append(wall)
        self.rss.append(rss)
        if self.result is not None:
            self.inner.append(json.loads(self.result.read_text()))
        if self.out is not None:
            self.out_size = _size(self.out)


def _med(xs: list[float]) -> float:
    return statistics.median(xs)


def _child_cmd(python: str, *args: str) -> list[str]:
    return [python, str(Path(__file__).resolve()), "_child", *args]


def _ct_status(python: str) -> tuple[str, str]:
    """(version, "") when compressed-tensors' convert entry point imports in ``python``, else ("", why)."""
    probe = (
        "import importlib.metadata as m, importlib.util as u\n"
        "if u.find_spec('compressed_tensors') is None: print('missing')\n"
        "else:\n"
        "    v = m.version('compressed-tensors')\n"
        "    try:\n"
        "        from compressed_tensors.entrypoints.convert import convert_checkpoint\n"
        "        print('ok', v)\n"
        "    except ImportError as e: print('old', v, e)\n"
    )
    try:
        out = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError) as exc:
        return "", f"skipped: {python} does not run ({exc})"
    if out[:1] == ["ok"]:
        return out[1], ""
    if out[:1] == ["old"]:
        return "", f"skipped: compressed-tensors {out[1]} has no convert_checkpoint (pip install -U compressed-tensors)"
    return "", "skipped: pip install compressed-tensors"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _rounds(contenders: list[Contender], repeat: int, logs: Path) -> None:
    """``repeat`` interleaved rounds (one run of each contender per round), so drift hits every contender alike."""
    for r in range(repeat):
        for c in contenders:
            if c.cmd is None:
                continue
            c.run(logs / f"{len(c.walls)}-{abs(hash(c.label))}.log")
            last = r == repeat - 1
            if c.out is not None and not (c.keep and last):
                shutil.rmtree(c.out, ignore_errors=True)
        print(f"  round {r + 1}/{repeat} done", file=sys.stderr)


def _ratio(x: float, base: float) -> str:
    return f"{x / base:6.2f}x" if base > 0 else "     -"


def _convert_table(title: str, size: int, contenders: list[Contender], base_rss: dict[str, int]) -> None:
    print(f"\n{title}\n  source {size / 1e6:.1f} MB; median of {len(contenders[0].walls)} run(s); x = / fp8convert")
    print(f"  {'contender':66s} {'wall s':>7s} {'x':>7s} {'MB/s':>7s} {'RSS MB':>8s} {'x':>7s} {'out MB':>8s}")
    base = contenders[0]
    b_wall, b_rss = _med(base.walls), _med(base.rss) - base_rss[base.python]
    for c in contenders:
        if c.cmd is None:
            print(f"  {c.label:66s} {c.skip}")
            continue
        wall, rss = _med(c.walls), _med(c.rss) - base_rss[c.python]
        print(
            f"  {c.label:66s} {wall:7.2f} {_ratio(wall, b_wall)} {size / wall / 1e6:7.1f} {rss / 1e6:8.1f} "
            f"{_ratio(rss, b_rss)} {c.out_size / 1e6:8.1f}"
        )


def _load_table(contenders: list[Contender], sizes: dict[str, int], base_rss: dict[str, int]) -> None:
    n = len(contenders[0].walls)
    print(
        f"\nLoading on CPU + forward of {len(PROMPT)} tokens (median of 3 after a warm-up), median of {n} run(s); "
        "x = / load_cpu_model"
    )
    print(
        f"  {'contender':66s} {'proc s':>7s} {'load s':>7s} {'x':>7s} {'MB/s':>7s} {'fwd ms':>8s} {'x':>7s} "
        f"{'RSS MB':>8s} {'x':>7s}"
    )
    base = contenders[0]

    def figures(c: Contender) -> tuple[float, float, float, float]:
        load = _med([i["load"] for i in c.inner])
        fwd = _med([i["forward"] for i in c.inner])
        return _med(c.walls), load, fwd, _med(c.rss) - base_rss[c.python]

    _, b_load, b_fwd, b_rss = figures(base)
    for c in contenders:
        if c.cmd is None:
            print(f"  {c.label:66s} {c.skip}")
            continue
        wall, load, fwd, rss = figures(c)
        print(
            f"  {c.label:66s} {wall:7.2f} {load:7.2f} {_ratio(load, b_load)} {sizes[c.label] / load / 1e6:7.1f} "
            f"{fwd * 1e3:8.1f} {_ratio(fwd, b_fwd)} {rss / 1e6:8.1f} {_ratio(rss, b_rss)}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeat", type=int, default=1, help="interleaved rounds, medians printed (3 on a busy box)")
    ap.add_argument("--quick", action="store_true", help="hidden 1024, intermediate 2816, 2 layers, vocab 8000")
    ap.add_argument("--ct-python", default=sys.executable, help="interpreter for compressed-tensors (default: this)")
    ap.add_argument("--no-load", action="store_true", help="skip the loading comparison")
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS for every child (default: torch's own choice)")
    args = ap.parse_args()
    if args.threads:  # children inherit it; steadier forward timings on a shared box
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.vocab = 1024, 2816, 2, 8000
    dims = {
        "hidden": args.hidden,
        "intermediate": args.intermediate,
        "layers": args.layers,
        "vocab": args.vocab,
        "heads": args.hidden // BLOCK,
        "kv_heads": max(1, args.hidden // 512),
    }
    py, exe = sys.executable, str(Path(sys.executable).with_name("fp8convert"))
    ct_version, ct_skip = _ct_status(args.ct_python)
    fms_skip = "" if importlib.util.find_spec("fms") and importlib.util.find_spec("fms_mo") else "skipped: pip "
    fms_skip += "install 'fp8convert[aiu-check]'" if fms_skip else ""
    print(
        f"fp8convert {_version('fp8convert')}, torch {_version('torch')}, safetensors {_version('safetensors')}, "
        f"transformers {_version('transformers')}, ibm-fms {_version('ibm-fms')}, "
        f"fms-model-optimizer {_version('fms-model-optimizer')}, "
        f"compressed-tensors {ct_version or 'not available'}"
        + (f" (via {args.ct_python})" if ct_version and args.ct_python != py else "")
        + f"; {os.cpu_count()} CPU(s), threads {args.threads or 'default'}"
        + f"\nmodel: Llama {json.dumps(dims)}, 2 shards per checkpoint"
    )
    with tempfile.TemporaryDirectory(prefix="fp8convert-peers-") as tmp:
        root = Path(tmp)
        logs = root / "logs"
        logs.mkdir()
        srcs = {"fp8": root / "src-deepseek", "ct": root / "src-ct"}
        for kind, src in srcs.items():  # built in a child: a child forked from a large parent reports its RSS
            subprocess.run(_child_cmd(py, "build", kind, str(src), json.dumps(dims)), check=True)
            subprocess.run(["cat", *map(str, src.glob("*.safetensors"))], check=True, stdout=subprocess.DEVNULL)
        base_rss: dict[str, int] = {}
        for python in {py, args.ct_python} if ct_version else {py}:
            base_rss[python] = int(_med([timed([python, "-c", "import torch"], logs / "base.log")[1] for _ in "123"]))

        def ct_line(kind: str, src: Path, label: str) -> Contender:
            cmd = _child_cmd(args.ct_python, "ct", kind, str(src), str(root / f"ct-{kind}")) if ct_version else None
            return Contender(label, cmd, root / f"ct-{kind}", python=args.ct_python, keep=True, skip=ct_skip)

        ds, ct = srcs["fp8"], srcs["ct"]
        ds_lines = [
            Contender("fp8convert convert (AIU + CPU artifact)", [exe, "convert", str(ds), str(root / "fc-ds"), "-q"],
                      root / "fc-ds", keep=True),
            Contender("fp8convert dequantize_linear -> bf16 (like-for-like)",
                      _child_cmd(py, "fp8convert_dequant", str(ds), str(root / "fd-ds")), root / "fd-ds"),
            Contender("DeepSeek-V3 fp8_cast_bf16 (torch CPU port)",
                      _child_cmd(py, "fp8_cast_bf16", str(ds), str(root / "ds-bf16")), root / "ds-bf16", keep=True),
            ct_line("fp8block", ds, "compressed-tensors convert_checkpoint(FP8BlockDequantizer)"),
        ]  # fmt: skip
        ct_lines = [
            Contender("fp8convert convert (AIU + CPU artifact)", [exe, "convert", str(ct), str(root / "fc-ct"), "-q"],
                      root / "fc-ct"),
            Contender("fp8convert dequantize_linear -> bf16 (like-for-like)",
                      _child_cmd(py, "fp8convert_dequant", str(ct), str(root / "fd-ct")), root / "fd-ct"),
            ct_line("dequant", ct, "compressed-tensors convert_checkpoint(CompressedTensorsDequantizer)"),
        ]  # fmt: skip
        print("dequantization rounds ...", file=sys.stderr)
        _rounds(ds_lines + ct_lines, args.repeat, logs)
        _convert_table(
            "DeepSeek-style block FP8 (quant_method fp8, F32 weight_scale_inv per 128x128 tile)",
            _size(ds),
            ds_lines,
            base_rss,
        )
        _convert_table(
            "llm-compressor FP8_BLOCK (compressed-tensors, BF16 weight_scale per 128x128 tile)",
            _size(ct),
            ct_lines,
            base_rss,
        )

        # numerics: the DeepSeek port (and compressed-tensors' converters) against fp8convert's dequantization
        outs = {"DeepSeek fp8_cast_bf16 port": ("fp8", str(root / "ds-bf16"))}
        if ct_version:
            outs["compressed-tensors FP8BlockDequantizer"] = ("fp8", str(root / "ct-fp8block"))
            outs["compressed-tensors CompressedTensorsDequantizer"] = ("ct", str(root / "ct-dequant"))
        print("\nbf16 outputs checked tensor by tensor:")
        sys.stdout.flush()
        subprocess.run(_child_cmd(py, "check", str(ds), str(ct), json.dumps(outs)), check=True)
        summary = json.loads((root / "fc-ds" / "fp8convert-report.json").read_text())["summary"]
        print(
            f"  (fp8convert convert requantizes the {summary['linears']} block linears per channel for the AIU: "
            f"SQNR >= {summary['min_sqnr_db']:.1f} dB against their block dequantization, from its report)"
        )
        if args.no_load:
            return

        # loading: the DeepSeek-source artifact fp8convert wrote, and a bf16 copy (fp8_cast_bf16 output + config)
        bf16 = root / "ds-bf16"
        config = json.loads((ds / "config.json").read_text())
        config.pop("quantization_config")
        (bf16 / "config.json").write_text(json.dumps(config, indent=2))
        for aux in ds.iterdir():
            if aux.suffix == ".json" and aux.name not in ("config.json", "model.safetensors.index.json"):
                shutil.copy(aux, bf16 / aux.name)
        out = root / "fc-ds"
        if not (out / "aiu").exists():
            fms_skip = "skipped: fp8convert wrote no AIU artifact for this architecture"
        res = root / "load.json"
        load_lines = [
            Contender("fp8convert load_cpu_model(OUT/cpu)", _child_cmd(py, "load", "cpu", str(out / "cpu"), str(res)),
                      result=res),
            Contender("fp8convert load_cpu_model(OUT/cpu, cache_dequantized=True)",
                      _child_cmd(py, "load", "cpu-cached", str(out / "cpu"), str(res)), result=res),
            Contender("ibm-fms get_model(OUT/aiu) + fms-mo FP8Linear",
                      None if fms_skip else _child_cmd(py, "load", "fms", str(out / "aiu"), str(res)),
                      result=res, skip=fms_skip),
            Contender("transformers from_pretrained(bf16 copy)", _child_cmd(py, "load", "bf16", str(bf16), str(res)),
                      result=res),
        ]  # fmt: skip
        loaded = (out / "cpu", out / "cpu", out / "aiu", bf16)
        sizes = {c.label: _size(p) if p.exists() else 0 for c, p in zip(load_lines, loaded, strict=True)}
        print("load rounds ...", file=sys.stderr)
        _rounds(load_lines, args.repeat, logs)
        _load_table(load_lines, sizes, base_rss)
        print(
            f"\nRSS MB: peak RSS above `python -c 'import torch'` "
            f"({', '.join(f'{v / 1e6:.0f} MB' for v in base_rss.values())}), measured in this run. "
            "proc s: the whole child process (imports included); MB/s: source (or loaded artifact) MB / wall s."
        )


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_child":
        CHILDREN[sys.argv[2]](*sys.argv[3:])
    else:
        main()
