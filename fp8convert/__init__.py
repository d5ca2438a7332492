"""fp8convert: turn FP8 checkpoints from the Hugging Face Hub into AIU-ready artifacts and bit-exact
CPU fake-quant variants.

The public names are imported on first use, so ``fp8convert --help`` does not pay for importing torch.
(``verify`` is not re-exported: it would shadow the ``fp8convert.verify`` module; use ``fp8convert.verify.verify``.)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {
    "ConvertOptions": "fp8convert.pipeline",
    "convert": "fp8convert.pipeline",
    "inspect_checkpoint": "fp8convert.pipeline",
    "pull_and_convert": "fp8convert.pipeline",
    "smoke_test": "fp8convert.verify",
    "FakeQuantLinear": "fp8convert.fakequant",
    "load_cpu_model": "fp8convert.fakequant",
    "swap_linears": "fp8convert.fakequant",
    "errors": "fp8convert.errors",
}

__all__ = [
    "ConvertOptions",
    "FakeQuantLinear",
    "__version__",
    "convert",
    "errors",
    "inspect_checkpoint",
    "load_cpu_model",
    "pull_and_convert",
    "smoke_test",
    "swap_linears",
]

if TYPE_CHECKING:
    from fp8convert import errors
    from fp8convert.fakequant import FakeQuantLinear, load_cpu_model, swap_linears
    from fp8convert.pipeline import ConvertOptions, convert, inspect_checkpoint, pull_and_convert
    from fp8convert.verify import smoke_test


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fp8convert' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    value = module if name == "errors" else getattr(module, name)
    globals()[name] = value
    return value
