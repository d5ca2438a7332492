"""The conversion pipeline: open -> detect -> plan -> validate all -> convert tensor by tensor -> write
atomically -> report. Returns plain dicts (the CLI renders them as text or JSON); owns the progress bars.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from fp8convert import __version__
from fp8convert.errors import CheckpointError, Fp8ConvertError, combine
from fp8convert.formats import open_source
from fp8convert.formats.base import FormatReader
from fp8convert.normalize import PRIMARY, choose_target
from fp8convert.numerics import scale_problems
from fp8convert.outdir import (
    COMMIT_MARKER,
    REPORT_NAME,
    STATE,
    TMP_PREFIX,
    check_output,
    commit,
    discard,
    fingerprint,
    locked,
    os_error,
    workdir,
)
from fp8convert.produce import BadValues, Producer, count_nan_codes, full_precision, plan_outputs, read_scales
from fp8convert.report import build_report
from fp8convert.shards import Checkpoint, copy_aux_files, read_json, write_json
from fp8convert.spec import ActScheme, CheckpointPlan, Granularity, Target, dtype_name
from fp8convert.writer import Journal, write_sharded
from fp8convert.writers import aiu
from fp8convert.writers.cpu import cpu_plan, write_cpu_variant

logger = logging.getLogger(__name__)

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
    return choose_target(lin for lin in plan.linears if not full_precision(lin))


def _model_dtype(config: dict, to_bf16: bool) -> str:
    """The dtype the CPU variant's non-fp8 tensors have: bfloat16 with the AIU target, else the source's."""
    return "bfloat16" if to_bf16 else str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")


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


def validate_scales(ckpt: Checkpoint, reader: FormatReader, plan: CheckpointPlan) -> list[str]:
    """Every scale finite, > 0 and not huge; zero points zero. Reads the small tensors only (the fp8 codes
    are checked for NaN as they stream through the conversion)."""
    problems = []
    for lin in plan.linears:
        ql = read_scales(reader, ckpt, lin)
        if found := scale_problems(ql.weight_scale):
            problems.append(f"{lin.weight_scale.key} ({lin.weight_scale.file}): {', '.join(found)} scale value(s)")
        if ql.input_scale is not None and (found := scale_problems(ql.input_scale)):
            assert lin.input_scale is not None
            problems.append(f"{lin.input_scale.key} ({lin.input_scale.file}): {', '.join(found)} scale value(s)")
    for kv in plan.kv_scales:
        if found := scale_problems(ckpt.load(kv.key)):
            problems.append(f"{kv.key} ({ckpt.ref(kv.key).file}): {', '.join(found)} KV-cache scale value(s)")
    for key in plan.dropped:
        if key.endswith("zero_point") and bool((ckpt.load(key).to(torch.float32) != 0).any()):
            problems.append(
                f"{key} ({ckpt.ref(key).file}): non-zero zero point; asymmetric quantization is not supported"
            )
    return problems


def weight_problems(ckpt: Checkpoint, reader: FormatReader, plan: CheckpointPlan) -> list[str]:
    """fp8 NaN (and e5m2 Inf) codes in every quantized weight: reads all of them, row chunk by row chunk (the
    error path). A weight that cannot be read is skipped: the header problems already say why."""
    problems = []
    for lin in plan.linears:
        try:
            nan = count_nan_codes(ckpt, reader, lin)
        except CheckpointError:
            continue
        if nan:
            kind = "NaN" if lin.weight.dtype != torch.float8_e5m2 else "NaN/Inf"
            problems.append(f"{lin.weight.key} ({lin.weight.file}): {nan} fp8 {kind} code(s) in the weight")
    return problems


# ---- conversion -----------------------------------------------------------------------------------
def _fingerprint(src: Path, options: ConvertOptions) -> str:
    """Key of this conversion (its resumable temporary directory): source files and output-shaping options."""
    settings = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
    for not_in_the_bytes in ("overwrite", "progress", "repo", "revision", "requested_revision"):
        settings.pop(not_in_the_bytes)  # the report, which records them, is rebuilt by every run
    settings["targets"] = sorted(str(t) for t in options.targets or ())
    settings.update(fp8convert=__version__, torch=torch.__version__)
    return fingerprint([p for p in src.iterdir() if p.is_file()], settings)


def _bar(options: ConvertOptions, desc: str, total: int) -> tqdm:
    return tqdm(
        total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr, disable=not options.progress, leave=False
    )


def convert(source: str | Path, out: str | Path, options: ConvertOptions = ConvertOptions()) -> dict:
    """Convert a local checkpoint into ``out/aiu``, ``out/cpu`` and ``out/fp8convert-report.json``.

    Headers and scales are validated before anything is written, fp8 codes as they stream through; all
    problems are reported in one error. The output appears atomically (written under
    ``out/.fp8convert-tmp-*`` and renamed into place); a killed run resumes from its last finished shard.
    """
    src, dst = Path(source).resolve(), Path(out).resolve()
    check_output(src, dst, options.overwrite)
    ckpt, source_config, reader, plan = open_source(src, options.format)
    config = plan.hf_config or source_config
    options, aiu_skipped = resolve_targets(options, config)
    assert options.targets is not None
    key = _fingerprint(src, options)
    if aiu_skipped:
        logger.warning("writing the CPU variant only: %s", aiu_skipped)
    problems: list[CheckpointError | str] = [*plan.problems, *target_problems(config, plan, options)]
    problems += validate_scales(ckpt, reader, plan)
    if problems:  # report the weights' problems too, so one run lists everything
        problems += weight_problems(ckpt, reader, plan)
        raise combine(problems, where=str(src), hint=FIX_HINT)
    target = _target(plan, options)
    created = not dst.exists() or all(p.name.startswith(TMP_PREFIX) for p in dst.iterdir())
    try:
        with locked(dst):
            check_output(src, dst, options.overwrite, key)  # again: another run may have finished meanwhile
            tmp = workdir(dst, key)
            if not (tmp / STATE / COMMIT_MARKER).exists():  # else: killed while committing, finish that
                try:
                    report = _write(src, tmp, ckpt, reader, plan, config, options, target, key)
                    report["options"]["aiu_skipped"] = aiu_skipped
                    write_json(tmp / REPORT_NAME, report)
                    if _fingerprint(src, options) != key:
                        raise CheckpointError(
                            "the source checkpoint changed during the conversion; nothing was written",
                            where=str(src),
                            hint="run the command again once the source is complete and no longer changing",
                        )
                except BadValues as bad:
                    discard(tmp, dst, created)
                    found: list[CheckpointError | str] = [*weight_problems(ckpt, reader, plan)] or [str(bad)]
                    raise combine(found, where=str(src), hint=FIX_HINT) from None
                except KeyboardInterrupt:
                    raise  # the temporary directory stays: the same command resumes from it
                except BaseException:
                    discard(tmp, dst, created)
                    raise
            commit(tmp, dst)
    except OSError as exc:
        if isinstance(exc, Fp8ConvertError):
            raise
        if exc.filename and not Path(str(exc.filename)).resolve().is_relative_to(dst):
            raise CheckpointError(
                f"cannot read the source: {exc.strerror or exc}",
                where=str(exc.filename),
                hint="check the source files (deleted, unreadable or on a failing disk?) and run again",
            ) from exc
        raise os_error(exc, dst) from exc
    logger.info("wrote %s", ", ".join(str(dst / str(t)) for t in sorted(options.targets)))
    return read_json(dst / REPORT_NAME, what="report")


def _write(
    src: Path,
    tmp: Path,
    ckpt: Checkpoint,
    reader: FormatReader,
    plan: CheckpointPlan,
    config: dict,
    options: ConvertOptions,
    target: tuple[Granularity, ActScheme],
    key: str,
) -> dict:
    """Everything into ``tmp``: shards (resuming finished ones), config, tokenizer, CPU variant, report."""
    assert options.targets is not None
    to_bf16 = Target.AIU in options.targets  # the CPU variant alone keeps the source's dtypes
    producer = Producer(ckpt, reader, target)
    outs, fake, passthrough = plan_outputs(ckpt, plan, producer, quantize=_to_quantize(plan, options), to_bf16=to_bf16)
    first = Target.AIU if Target.AIU in options.targets else Target.CPU
    work = tmp / str(first)
    journal = Journal(tmp / STATE / "journal.json", key)
    for entry in tmp.iterdir():  # a killed run's partial files go; its finished shards are checked and kept
        if entry.name not in (STATE, work.name):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    work.mkdir(exist_ok=True)
    for entry in work.iterdir():
        if entry.name not in journal.shards:
            entry.unlink()
    with producer, _bar(options, "Convert", sum(t.nbytes for t in outs)) as bar:
        known = write_sharded(
            work,
            outs,
            max_shard_bytes=options.max_shard_bytes,
            on_bytes=bar.update,
            journal=journal,
            notes=producer.take_notes,
            resumed=producer.resume,
        )
    write_json(work / "config.json", aiu.target_config(config, *target, bf16=to_bf16))
    aux = copy_aux_files(src, work)
    links: dict[str, str] = {}
    cpu = cpu_plan(fake, model_dtype=_model_dtype(config, to_bf16))
    if first is Target.AIU and Target.CPU in options.targets:
        links = write_cpu_variant(work, tmp / "cpu", cpu)
    elif first is Target.CPU:
        write_json(work / "fp8convert.json", cpu)
    return build_report(src, config, plan, options, target, producer.records, passthrough, aux, links, tmp, known)


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
        if full_precision(lin):
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
