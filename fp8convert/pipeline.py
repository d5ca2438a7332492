"""The conversion pipeline: open -> detect -> plan -> validate all -> convert tensor by tensor -> write
atomically -> report. Returns plain dicts (the CLI renders them as text or JSON); owns the progress bars.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import shutil
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from fp8convert.errors import CheckpointError, OutputError, combine
from fp8convert.formats import open_source
from fp8convert.formats.base import FormatReader
from fp8convert.normalize import (
    PRIMARY,
    Normalized,
    choose_target,
    dequantize_to_bf16,
    normalize_linear,
    quantize_unquantized,
)
from fp8convert.numerics import fp8_nan_count, scale_problems
from fp8convert.report import build_report
from fp8convert.shards import (
    Checkpoint,
    OutTensor,
    copy_aux_files,
    tensor_bytes,
    write_json,
    write_sharded,
)
from fp8convert.spec import (
    FLOAT_DTYPES,
    ActScheme,
    CheckpointPlan,
    Granularity,
    LinearPlan,
    Target,
    dtype_name,
)
from fp8convert.writers import aiu
from fp8convert.writers.cpu import cpu_plan, write_cpu_variant

logger = logging.getLogger(__name__)

REPORT_NAME = "fp8convert-report.json"
TMP_PREFIX = ".fp8convert-tmp-"
DEFAULT_SHARD_BYTES = 5_000_000_000
FIX_HINT = (
    "fix or re-export the checkpoint (README 'Supported formats' lists what converts); if the download is "
    "partial, download it again"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class ConvertOptions:
    #: None = auto: aiu + cpu when the AIU stack can load the architecture, else cpu alone (reported)
    targets: frozenset[Target] | None = None
    overwrite: bool = False
    format: str | None = None
    quantize_unquantized: bool = False
    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    progress: bool = False
    #: where the source came from (pull-and-convert): Hub repo id, resolved commit sha, revision as requested
    repo: str | None = None
    revision: str | None = None
    requested_revision: str | None = None


# ---- opening and planning ---------------------------------------------------------------------------
def _to_quantize(plan: CheckpointPlan, options: ConvertOptions) -> list[str]:
    """The full-precision decoder linears that --quantize-unquantized quantizes per channel."""
    return [m for m in plan.unquantized_linears if aiu.DECODER_LINEAR.match(m)] if options.quantize_unquantized else []


def _target(plan: CheckpointPlan, options: ConvertOptions) -> tuple[Granularity, ActScheme]:
    """The model-wide target scheme. Heads kept in full precision do not vote; linears quantized here
    (--quantize-unquantized) are per channel, so the whole model is."""
    if _to_quantize(plan, options):
        return PRIMARY
    return choose_target(lin for lin in plan.linears if not _full_precision(lin))


def _running(pid: str) -> bool:
    """Whether the process that named a temporary directory is still alive (not this one)."""
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _model_dtype(config: dict, to_bf16: bool) -> str:
    """The dtype the CPU variant's non-fp8 tensors have: bfloat16 with the AIU target, else the source's."""
    return "bfloat16" if to_bf16 else str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")


def _full_precision(linear: LinearPlan) -> bool:
    return linear.module in aiu.FULL_PRECISION_MODULES or linear.module.endswith(".lm_head")


def resolve_targets(options: ConvertOptions, config: dict) -> tuple[ConvertOptions, str | None]:
    """Fill in ``targets`` when auto; returns the options and why the AIU artifact was skipped (or None)."""
    if options.targets is not None:
        return options, None
    why = aiu.architecture_problems(config)
    if why:
        return dataclasses.replace(options, targets=frozenset({Target.CPU})), "; ".join(why)
    return dataclasses.replace(options, targets=frozenset({Target.AIU, Target.CPU})), None


def target_problems(config: dict, plan: CheckpointPlan, options: ConvertOptions) -> list[str]:
    """What stops the AIU target (architecture, decoder linears left in full precision)."""
    if options.targets is None or Target.AIU not in options.targets:
        return []
    problems = aiu.architecture_problems(config)
    left = [m for m in plan.unquantized_linears if aiu.DECODER_LINEAR.match(m)]
    if left and not options.quantize_unquantized:
        problems.append(
            f"{len(left)} decoder linear(s) are not quantized ({', '.join(left[:4])}"
            f"{' ...' if len(left) > 4 else ''}); fms-model-optimizer cannot keep them in full precision. "
            "Pass --quantize-unquantized to quantize them per channel (reported), or --target cpu"
        )
    return problems


def validate_values(
    ckpt: Checkpoint, reader: FormatReader, plan: CheckpointPlan, on_bytes: Callable[[int], None] | None = None
) -> list[str]:
    """Read every quantized tensor once: scales finite and > 0, no fp8 NaN codes, zero points zero."""
    problems = []
    for lin in plan.linears:
        ql = reader.read_linear(ckpt, lin)
        found = scale_problems(ql.weight_scale)
        if found:
            problems.append(f"{lin.weight_scale.key} ({lin.weight_scale.file}): {', '.join(found)} scale value(s)")
        if ql.input_scale is not None and (found := scale_problems(ql.input_scale)):
            assert lin.input_scale is not None
            problems.append(f"{lin.input_scale.key} ({lin.input_scale.file}): {', '.join(found)} scale value(s)")
        if nan := fp8_nan_count(ql.weight):
            kind = "NaN" if lin.weight.dtype != torch.float8_e5m2 else "NaN/Inf"
            problems.append(f"{lin.weight.key} ({lin.weight.file}): {nan} fp8 {kind} code(s) in the weight")
        if on_bytes:
            on_bytes(lin.weight_nbytes)
    for kv in plan.kv_scales:
        if found := scale_problems(ckpt.load(kv.key)):
            problems.append(f"{kv.key} ({ckpt.ref(kv.key).file}): {', '.join(found)} KV-cache scale value(s)")
    for key in plan.dropped:
        if key.endswith("zero_point") and bool((ckpt.load(key).to(torch.float32) != 0).any()):
            problems.append(
                f"{key} ({ckpt.ref(key).file}): non-zero zero point; asymmetric quantization is not supported"
            )
    return problems


# ---- output directory -------------------------------------------------------------------------------
def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_output(source: Path, out: Path, overwrite: bool) -> None:
    src, dst = source.resolve(), out.resolve()
    if _inside(dst, src):
        raise OutputError(
            "the output directory is inside the source checkpoint",
            where=str(out),
            hint="choose an output directory outside the source; the source is never modified",
        )
    if _inside(src, dst):
        raise OutputError(
            "the source checkpoint is inside the output directory",
            where=str(out),
            hint="choose an output directory that does not contain the source",
        )
    if dst.exists() and not dst.is_dir():
        raise OutputError(
            "the output path exists and is not a directory",
            where=str(out),
            hint="choose a directory path (it is created if missing)",
        )
    if dst.is_dir():
        leftovers = [p for p in dst.iterdir() if not p.name.startswith(TMP_PREFIX)]
        if leftovers and not overwrite:
            raise OutputError(
                f"the output directory is not empty ({len(leftovers)} entries)",
                where=str(out),
                hint="pass --overwrite to replace aiu/, cpu/ and the report, or choose an empty directory",
            )


# ---- conversion -----------------------------------------------------------------------------------
class _Producer:
    """Normalizes each linear once, when its first output tensor is written, and frees it after the last."""

    def __init__(self, ckpt: Checkpoint, reader: FormatReader, target: tuple[Granularity, ActScheme]) -> None:
        self.ckpt, self.reader, self.target = ckpt, reader, target
        self.records: dict[str, dict[str, object]] = {}
        self._live: dict[str, tuple[dict[str, torch.Tensor], set[str]]] = {}

    def _tensors(self, lin: LinearPlan | None, module: str, keys: set[str]) -> dict[str, torch.Tensor]:
        if module in self._live:
            return self._live[module][0]
        if lin is None:  # unquantized decoder linear, quantized on request
            weight = self.ckpt.load(f"{module}.weight")
            bias = self.ckpt.load(f"{module}.bias") if self.ckpt.has(f"{module}.bias") else None
            norm: Normalized = quantize_unquantized(module, weight, bias)
        elif _full_precision(lin):
            ql = self.reader.read_linear(self.ckpt, lin)
            w, record = dequantize_to_bf16(ql)
            self.records[module] = {"source": _describe(lin), **record}
            out = {f"{module}.weight": w}
            if ql.bias is not None:
                out[f"{module}.bias"] = ql.bias.to(torch.bfloat16)
            self._live[module] = (out, set(keys))
            return out
        else:
            norm = normalize_linear(self.reader.read_linear(self.ckpt, lin), self.target)
            logger.debug("%s: %s", module, "; ".join(norm.actions) or "kept")
        q = norm.linear
        self.records[module] = {"source": _describe(lin) if lin else "bf16 (unquantized)", **norm.record()}
        out = {f"{module}.weight": q.weight, f"{module}.weight_scale": q.weight_scale.to(torch.bfloat16)}
        if q.input_scale is not None:
            out[f"{module}.input_scale"] = q.input_scale.to(torch.bfloat16)
        if q.bias is not None:
            out[f"{module}.bias"] = q.bias.to(torch.bfloat16)
        self._live[module] = (out, set(keys))
        return out

    def tensor(self, lin: LinearPlan | None, module: str, key: str, keys: set[str]) -> Callable[[], Iterable[bytes]]:
        def produce() -> Iterable[bytes]:
            tensors = self._tensors(lin, module, keys)
            data = tensor_bytes(tensors[key])
            pending = self._live[module][1]
            pending.discard(key)
            if not pending:
                del self._live[module]
            yield data

        return produce


def _describe(lin: LinearPlan) -> str:
    return (
        f"{dtype_name(lin.weight.dtype)} {lin.scheme.describe()} ({dtype_name(lin.weight_scale.dtype)} scale) + "
        f"{lin.activation} activations"
    )


def _plan_outputs(
    ckpt: Checkpoint, plan: CheckpointPlan, producer: _Producer, options: ConvertOptions
) -> tuple[list[OutTensor], dict[str, tuple[Granularity, ActScheme, bool]], dict[str, str]]:
    """Every output tensor (name, dtype, shape, producer), the fake-quant plan, and pass-through actions."""
    target_gran, target_act = producer.target
    outs: list[OutTensor] = []
    fake: dict[str, tuple[Granularity, ActScheme, bool]] = {}
    passthrough: dict[str, str] = {}
    replaced: set[str] = set()
    quantize_these = _to_quantize(plan, options)

    def add_linear(lin: LinearPlan | None, module: str, out_f: int, in_f: int, has_bias: bool) -> None:
        if lin is not None and _full_precision(lin):
            keys = [f"{module}.weight"] + ([f"{module}.bias"] if has_bias else [])
            for key in keys:
                shape = (out_f, in_f) if key.endswith(".weight") else (out_f,)
                outs.append(OutTensor(key, torch.bfloat16, shape, producer.tensor(lin, module, key, set(keys))))
            return
        gran, act = target_gran, target_act  # per channel + per token whenever linears are quantized here
        static = act is ActScheme.STATIC_TENSOR
        keys = aiu.tensor_names(module, static_input=static, bias=has_bias)
        for key in keys:
            suffix = key.rsplit(".", 1)[-1]
            dtype, shape = {
                "weight": (torch.float8_e4m3fn, (out_f, in_f)),
                "weight_scale": (torch.bfloat16, (out_f, 1) if gran is Granularity.CHANNEL else (1,)),
                "input_scale": (torch.bfloat16, (1,)),
                "bias": (torch.bfloat16, (out_f,)),
            }[suffix]
            outs.append(OutTensor(key, dtype, shape, producer.tensor(lin, module, key, set(keys))))
        fake[module] = (gran, act, has_bias)

    for lin in plan.linears:
        add_linear(lin, lin.module, lin.out_features, lin.in_features, lin.bias is not None)
    for module in quantize_these:
        w = ckpt.ref(f"{module}.weight")
        has_bias = ckpt.has(f"{module}.bias")
        add_linear(None, module, w.shape[0], w.shape[1], has_bias)
        replaced.update({f"{module}.weight", f"{module}.bias"})
    to_bf16 = Target.AIU in (options.targets or ())
    for ref in plan.passthrough:
        if ref.key in replaced:
            continue
        name = plan.rename.get(ref.key, ref.key)
        if to_bf16 and ref.dtype in FLOAT_DTYPES and ref.dtype != torch.bfloat16:
            passthrough[name] = f"{dtype_name(ref.dtype)} -> bfloat16 (the AIU target is bf16)"
            outs.append(OutTensor(name, torch.bfloat16, ref.shape, functools.partial(_cast_bf16, ckpt, ref.key)))
        else:
            passthrough[name] = "copied"
            outs.append(OutTensor(name, ref.dtype, ref.shape, functools.partial(ckpt.raw_chunks, ref.key)))
    return outs, fake, passthrough


def _cast_bf16(ckpt: Checkpoint, key: str) -> list[bytes]:
    return [tensor_bytes(ckpt.load(key).to(torch.bfloat16))]


def _bar(options: ConvertOptions, desc: str, total: int) -> tqdm:
    return tqdm(
        total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr, disable=not options.progress, leave=False
    )


def convert(source: str | Path, out: str | Path, options: ConvertOptions = ConvertOptions()) -> dict:
    """Convert a local checkpoint into ``out/aiu``, ``out/cpu`` and ``out/fp8convert-report.json``.

    Everything is validated before anything is written; all problems are reported in one error. The
    output appears atomically (written under ``out/.fp8convert-tmp-*`` and renamed into place).
    """
    src, dst = Path(source).resolve(), Path(out).resolve()
    check_output(src, dst, options.overwrite)
    ckpt, source_config, reader, plan = open_source(src, options.format)
    config = plan.hf_config or source_config
    options, aiu_skipped = resolve_targets(options, config)
    assert options.targets is not None
    if aiu_skipped:
        logger.warning("writing the CPU variant only: %s", aiu_skipped)
    problems: list[CheckpointError | str] = [*plan.problems, *target_problems(config, plan, options)]
    total = sum(lin.weight_nbytes for lin in plan.linears)
    with _bar(options, "Validate", total) as bar:
        problems += validate_values(ckpt, reader, plan, bar.update)
    if problems:
        raise combine(problems, where=str(src), hint=FIX_HINT)
    target = _target(plan, options)
    producer = _Producer(ckpt, reader, target)
    outs, fake, passthrough = _plan_outputs(ckpt, plan, producer, options)

    created = not dst.exists()
    dst.mkdir(parents=True, exist_ok=True)
    for stale in dst.glob(TMP_PREFIX + "*"):  # left by a killed run; a live run's is refused
        if _running(stale.name.removeprefix(TMP_PREFIX)):
            raise OutputError(
                "another fp8convert run is writing into this directory",
                where=str(stale),
                hint="wait for it to finish, or choose another output directory",
            )
        shutil.rmtree(stale, ignore_errors=True)
    tmp = dst / f"{TMP_PREFIX}{os.getpid()}"
    tmp.mkdir()
    try:
        first = Target.AIU if Target.AIU in options.targets else Target.CPU
        work = tmp / str(first)
        work.mkdir()
        with _bar(options, "Convert", sum(t.nbytes for t in outs)) as bar:
            known = write_sharded(work, outs, max_shard_bytes=options.max_shard_bytes, on_bytes=bar.update)
        to_bf16 = Target.AIU in options.targets  # the CPU variant alone keeps the source's dtypes
        write_json(work / "config.json", aiu.target_config(config, *target, bf16=to_bf16))
        aux = copy_aux_files(src, work)
        links: dict[str, str] = {}
        if first is Target.AIU and Target.CPU in options.targets:
            links = write_cpu_variant(work, tmp / "cpu", cpu_plan(fake, model_dtype=_model_dtype(config, to_bf16)))
        elif first is Target.CPU:
            write_json(work / "fp8convert.json", cpu_plan(fake, model_dtype=_model_dtype(config, to_bf16)))
        report = build_report(src, config, plan, options, target, producer.records, passthrough, aux, links, tmp, known)
        report["options"]["aiu_skipped"] = aiu_skipped
        write_json(tmp / REPORT_NAME, report)
        for name in [str(t) for t in Target] + [REPORT_NAME]:  # also drops a previous run's other target
            final = dst / name
            if not (tmp / name).exists():
                if final.is_dir():
                    shutil.rmtree(final)
                continue
            if final.is_dir():
                shutil.rmtree(final)
            elif final.exists():
                final.unlink()
            os.replace(tmp / name, final)
        tmp.rmdir()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created and dst.exists() and not any(dst.iterdir()):
            dst.rmdir()
        raise
    finally:
        ckpt.close()
    logger.info("wrote %s", ", ".join(str(dst / str(t)) for t in sorted(options.targets)))
    return report


def inspect_checkpoint(
    source: str | Path, fmt: str | None = None, *, targets: frozenset[Target] = frozenset({Target.AIU, Target.CPU})
) -> dict:
    """Layout, evidence, per-linear scheme, and what conversion would do (headers only)."""
    ckpt, config, _reader, plan = open_source(source, fmt)
    config = plan.hf_config or config
    if plan.problems:
        raise combine(list(plan.problems), where=str(source), hint=FIX_HINT)
    options = ConvertOptions(targets=targets)
    target = _target(plan, options)
    linears = []
    for lin in plan.linears:
        if _full_precision(lin):
            action = "dequantize to bf16"
        elif lin.scheme.granularity is Granularity.BLOCK:
            action = "requantize per channel (lossy; error reported)"
        elif lin.weight.dtype != torch.float8_e4m3fn:
            action = f"{dtype_name(lin.weight.dtype)} -> e4m3fn by value (reported)"
        elif (lin.scheme.granularity, lin.activation) == target and lin.weight_scale.dtype == torch.bfloat16:
            action = "keep (exact)"
        else:
            action = f"to {target[0]} + {target[1]}"
        linears.append(
            {
                "module": lin.module,
                "weight": dtype_name(lin.weight.dtype),
                "shape": [lin.out_features, lin.in_features],
                "scheme": lin.scheme.describe(),
                "scale_dtype": dtype_name(lin.weight_scale.dtype),
                "activation": str(lin.activation),
                "bias": lin.bias is not None,
                "action": action,
            }
        )
    ckpt.close()
    return {
        "source": str(Path(source).resolve()),
        "format": plan.format,
        "rule": plan.rule,
        "evidence": plan.evidence,
        "architecture": (config.get("architectures") or [None])[0],
        "target": {"weights": str(target[0]), "activations": str(target[1])},
        "aiu_problems": target_problems(config, plan, options),
        "linears": linears,
        "unquantized_linears": plan.unquantized_linears,
        "kv_cache_scales": [{"key": k.key, "shape": list(k.shape), "dtype": k.dtype} for k in plan.kv_scales],
        "tensors": len(ckpt.tensors),
        "files": ckpt.files,
    }


def pull_and_convert(
    repo_id: str,
    out: str | Path,
    options: ConvertOptions = ConvertOptions(),
    *,
    revision: str | None = None,
    token: str | None = None,
    local_dir: str | Path | None = None,
    offline: bool = False,
) -> dict:
    """Download what conversion needs from a Hub repo (revision resolved to its commit sha) and convert it;
    the report records the repo and the sha. ``out`` is checked before anything is downloaded."""
    from fp8convert import hub

    check_output(Path(local_dir) if local_dir else hub.storage_dir(repo_id), Path(out).resolve(), options.overwrite)
    pulled = hub.pull(
        repo_id, revision=revision, local_dir=local_dir, offline=offline, token=token, progress=options.progress
    )
    options = dataclasses.replace(options, repo=pulled.repo, revision=pulled.sha, requested_revision=pulled.revision)
    return convert(pulled.path, out, options)


__all__ = ["ConvertOptions", "convert", "inspect_checkpoint", "pull_and_convert"]
