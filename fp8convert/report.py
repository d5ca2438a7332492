"""The conversion report (``fp8convert-report.json``): source, layout and evidence, per-layer actions and
errors, every lossy step, KV-cache scales found, sha256 and size of every file, versions."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fp8convert import __version__
from fp8convert.shards import natural_key, sha256_file
from fp8convert.spec import ActScheme, CheckpointPlan, Granularity

if TYPE_CHECKING:
    from fp8convert.pipeline import ConvertOptions


def build_report(
    src: Path,
    config: dict,
    plan: CheckpointPlan,
    options: ConvertOptions,
    target: tuple[Granularity, ActScheme],
    records: dict[str, dict[str, object]],
    passthrough: dict[str, str],
    aux: list[str],
    links: dict[str, str],
    tmp: Path,
    known: dict[str, str],
) -> dict:
    """The report: source and evidence, per-layer actions and errors, every lossy step, file checksums."""
    import safetensors

    layers = {m: records[m] for m in sorted(records, key=natural_key)}
    lossy = [f"{m}: {'; '.join(map(str, r['actions']))}" for m, r in layers.items() if not r["exact"]]  # type: ignore[call-overload]
    lossy += [f"{k}: {v}" for k, v in passthrough.items() if v != "copied"]
    if plan.kv_scales:
        lossy.append(
            f"{len(plan.kv_scales)} KV-cache scale(s) dropped: the AIU stack uses KV scale 1.0 (listed under "
            "kv_cache_scales)"
        )
    sqnrs = [r["sqnr_db"] for r in layers.values() if isinstance(r["sqnr_db"], float)]
    files: dict[str, dict[str, object]] = {}
    for path in sorted(p for p in tmp.rglob("*") if p.is_file() and not p.relative_to(tmp).parts[0].startswith(".")):
        digest = known.get(path.name) or sha256_file(path)  # shards were hashed while written
        files[str(path.relative_to(tmp))] = {"sha256": digest, "size": path.stat().st_size}
    return {
        "fp8convert_report_version": 1,
        "versions": {
            "fp8convert": __version__,
            "torch": torch.__version__.split("+")[0],
            "safetensors": safetensors.__version__,
            "python": sys.version.split()[0],
        },
        "source": {
            "path": str(src),
            "repo": options.repo,
            "revision": options.revision,
            "requested_revision": options.requested_revision,
            "format": plan.format,
            "rule": plan.rule,
            "evidence": plan.evidence,
            "architecture": (config.get("architectures") or [None])[0],
            "quantization_config": config.get("quantization_config") or config.get("compression_config"),
        },
        "options": {
            "targets": sorted(str(t) for t in options.targets or ()),
            "format": options.format,
            "quantize_unquantized": options.quantize_unquantized,
            "max_shard_bytes": options.max_shard_bytes,
        },
        "target": {
            "weights": str(target[0]),
            "activations": str(target[1]),
            "scale_dtype": "bfloat16",
            "weight_dtype": "float8_e4m3fn",
        },
        "summary": {
            "linears": len(layers),
            "exact": sum(bool(r["exact"]) for r in layers.values()),
            "lossy": sum(not r["exact"] for r in layers.values()),
            "min_sqnr_db": min(sqnrs) if sqnrs else None,
            "kv_cache_scales_dropped": len(plan.kv_scales),
        },
        "lossy_steps": lossy,
        "layers": layers,
        "kv_cache_scales": [
            {
                "module": k.module,
                "kind": k.kind,
                "key": k.key,
                "shape": list(k.shape),
                "dtype": k.dtype,
                "action": "dropped (the AIU stack uses KV scale 1.0)",
            }
            for k in plan.kv_scales
        ],
        "dropped": dict(sorted(plan.dropped.items())),
        "passthrough": dict(sorted(passthrough.items(), key=lambda kv: natural_key(kv[0]))),
        "copied_files": aux,
        "cpu_links": links,
        "files": files,
    }
