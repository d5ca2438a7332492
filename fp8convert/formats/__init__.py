"""The registry of layout readers: ``register``, ``get``, ``detect_format``.

Each format module registers its reader once, when imported here.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fp8convert.errors import AmbiguousFormatError, CheckpointError, UnknownFormatError
from fp8convert.formats.base import Detection, FormatReader, config_problems
from fp8convert.shards import Checkpoint
from fp8convert.spec import CheckpointPlan

logger = logging.getLogger(__name__)

REGISTRY: dict[str, FormatReader] = {}


def register(reader: FormatReader) -> FormatReader:
    if reader.name in REGISTRY:
        raise ValueError(f"format {reader.name!r} registered twice")
    REGISTRY[reader.name] = reader
    return reader


def get(name: str) -> FormatReader:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownFormatError(
            f"unknown format {name!r}", hint=f"known formats: {', '.join(sorted(REGISTRY))}"
        ) from None


def _seen(ckpt: Checkpoint, config: dict) -> list[str]:
    """What a checkpoint shows, for error messages when nothing matched."""
    qc = config.get("quantization_config")
    seen = []
    if isinstance(qc, dict):
        seen.append(f"config.json quantization_config.quant_method={qc.get('quant_method')!r}")
    elif "compression_config" in config:
        seen.append("config.json has a legacy 'compression_config'")
    else:
        seen.append("config.json has no quantization_config")
    dtypes: dict[str, int] = {}
    for ref in ckpt.tensors.values():
        dtypes[str(ref.dtype).removeprefix("torch.")] = dtypes.get(str(ref.dtype).removeprefix("torch."), 0) + 1
    seen.append("tensor dtypes: " + ", ".join(f"{k} x{v}" for k, v in sorted(dtypes.items())))
    suffixes = sorted({k.rsplit(".", 1)[-1] for k in ckpt.tensors})
    seen.append("tensor suffixes: " + ", ".join(suffixes[:12]) + (" ..." if len(suffixes) > 12 else ""))
    return seen


def detect_format(ckpt: Checkpoint, config: dict, *, forced: str | None = None) -> tuple[FormatReader, Detection]:
    """Find the reader for a checkpoint (or validate the one forced with ``--format``).

    Layouts that are recognised but not converted (adjacent.py) are refused first, even when forced.
    """
    from fp8convert.formats.adjacent import refusal

    if (refused := refusal(ckpt, config)) is not None:
        raise refused
    if forced:
        reader = get(forced)
        det = reader.detect(ckpt, config)
        if det is None:
            raise UnknownFormatError(
                f"--format {forced} was given, but the checkpoint is not in that layout",
                where=str(ckpt.root),
                problems=_seen(ckpt, config),
                hint="drop --format to let fp8convert detect the layout",
            )
        return reader, det
    found = [(r, d) for r in REGISTRY.values() if (d := r.detect(ckpt, config)) is not None]
    if not found:
        raise UnknownFormatError(
            "no supported FP8 layout recognised",
            where=str(ckpt.root),
            problems=_seen(ckpt, config),
            hint=f"supported layouts: {', '.join(sorted(REGISTRY))}; see README 'Supported formats'",
        )
    if len(found) > 1:
        raise AmbiguousFormatError(
            "several layouts match",
            where=str(ckpt.root),
            problems=[f"{d.format}: {d.rule}" for _, d in found],
            hint="pick one with --format NAME",
        )
    return found[0]


def open_source(source: str | Path, fmt: str | None = None) -> tuple[Checkpoint, dict, FormatReader, CheckpointPlan]:
    """Read config and headers, detect the layout, and plan every tensor (no tensor data read)."""
    ckpt = Checkpoint(Path(source))
    # Mistral-native repos have params.json instead of config.json; their reader derives the config
    config = {} if not (ckpt.root / "config.json").exists() and (ckpt.root / "params.json").exists() else ckpt.config()
    if problems := config_problems(config):
        raise CheckpointError(
            f"config.json has {len(problems)} field(s) no model can have",
            where=str(ckpt.root / "config.json"),
            problems=problems,
            hint="fix config.json (compare it with the original model's) or download it again",
        )
    if ckpt.problems:
        raise CheckpointError(
            f"{len(ckpt.problems)} problem(s) in the safetensors files",
            where=str(ckpt.root),
            problems=ckpt.problems,
            hint="the download is incomplete or corrupt: download the listed files again",
        )
    reader, detection = detect_format(ckpt, config, forced=fmt)
    plan = reader.plan(ckpt, config, detection)
    logger.info(
        "detected %s (%s); %d shard(s); %d quantized linears",
        plan.format,
        detection.rule,
        len(ckpt.files),
        len(plan.linears),
    )
    return ckpt, config, reader, plan


# Importing a format module registers its reader.
from fp8convert.formats import compressed_tensors, fbgemm, fp8, mistral, modelopt, quark  # noqa: E402,F401

__all__ = ["REGISTRY", "Detection", "FormatReader", "detect_format", "get", "open_source", "register"]
