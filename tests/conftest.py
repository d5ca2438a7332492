"""Shared fixtures: seeded tiny checkpoints built in code (never downloaded)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fp8convert.examples import build_compressed_tensors

torch.manual_seed(0)


@pytest.fixture
def make_ct(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_ct(scheme="FP8_DYNAMIC", **kwargs)`` writes a compressed-tensors checkpoint as
    llm-compressor 0.14 does (see fp8convert.examples) into a fresh directory and returns it."""
    counter = iter(range(1000))

    def make(scheme: str = "FP8_DYNAMIC", **kwargs: object) -> Path:
        return build_compressed_tensors(tmp_path / f"src{next(counter)}", scheme=scheme, **kwargs)  # type: ignore[arg-type]

    return make


@pytest.fixture(scope="session")
def fms() -> object:
    """IBM's loader (ibm-fms + fms-model-optimizer[fp8-infer]); the aiu-check extra must be installed."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import fms.models
        import fms_mo.aiu_addons.fp8.fp8_linear  # noqa: F401
    return fms.models
