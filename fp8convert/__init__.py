"""fp8convert: turn FP8 checkpoints from the Hugging Face Hub into AIU-ready artifacts and bit-exact
CPU fake-quant variants."""

__version__ = "0.1.0"

from fp8convert import errors  # noqa: E402
from fp8convert.fakequant import FakeQuantLinear, load_cpu_model, swap_linears  # noqa: E402
from fp8convert.pipeline import ConvertOptions, convert, inspect_checkpoint  # noqa: E402

__all__ = [
    "ConvertOptions",
    "FakeQuantLinear",
    "__version__",
    "convert",
    "errors",
    "inspect_checkpoint",
    "load_cpu_model",
    "swap_linears",
]
