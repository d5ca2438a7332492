"""The CPU variant: the AIU artifact's files (hardlinked, never written twice) plus ``fp8convert.json``,
the per-module fake-quant plan that ``fp8convert.load_cpu_model`` reads."""

from __future__ import annotations

from pathlib import Path

from fp8convert.shards import link_or_copy, write_json
from fp8convert.spec import CPU_PLAN_NAME, ActScheme, Granularity, Numerics


def cpu_plan(modules: dict[str, tuple[Granularity, ActScheme, bool]], *, model_dtype: str = "bfloat16") -> dict:
    """``fp8convert.json``: for every fake-quant module its weight granularity, activations and bias."""
    return {
        "format_version": 1,
        "numerics_default": str(Numerics.FALLBACK),
        "activation_dtype": model_dtype,
        "modules": {name: {"weight": str(g), "activation": str(a), "bias": b} for name, (g, a, b) in modules.items()},
    }


def write_cpu_variant(aiu_dir: Path, cpu_dir: Path, plan: dict) -> dict[str, str]:
    """Link every file of ``aiu_dir`` into ``cpu_dir`` and add the plan; returns file -> "hardlink"/"copy"."""
    cpu_dir.mkdir(parents=True, exist_ok=True)
    how = {p.name: link_or_copy(p, cpu_dir / p.name) for p in sorted(aiu_dir.iterdir()) if p.is_file()}
    write_json(cpu_dir / CPU_PLAN_NAME, plan)
    return how
