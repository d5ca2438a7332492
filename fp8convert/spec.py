"""The canonical form between readers and writers: scheme enums and frozen dataclasses.

One scale convention everywhere: a scale is the dequantization multiplier, ``hp = fp32(fp8) * scale``.
Readers convert whatever their layout calls its tensors into this form; nothing downstream knows the
on-disk names.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from fp8convert.errors import CheckpointError, UnsupportedSchemeError

#: The per-module fake-quant plan written next to the CPU variant's tensors.
CPU_PLAN_NAME = "fp8convert.json"


class Granularity(enum.StrEnum):
    """How a weight scale is shared. Shapes for a weight ``[out, in]``:

    - ``TENSOR``: one scale, ``[1]``;
    - ``CHANNEL``: one scale per output row, ``[out, 1]``;
    - ``BLOCK``: one scale per ``(bo, bi)`` tile, ``[ceil(out/bo), ceil(in/bi)]``, edge tiles zero-padded.
    """

    TENSOR = "tensor"
    CHANNEL = "channel"
    BLOCK = "block"


class ActScheme(enum.StrEnum):
    """How input activations are quantized at run time."""

    NONE = "none"  # weight-only: activations stay in the model dtype
    STATIC_TENSOR = "static-tensor"  # one stored input_scale [1]
    DYNAMIC_TENSOR = "dynamic-tensor"  # amax over the whole input
    DYNAMIC_TOKEN = "dynamic-token"  # amax per token (last dim)
    DYNAMIC_GROUP = "dynamic-group"  # amax per token and group of input channels (compressed-tensors FP8_BLOCK)


class Numerics(enum.StrEnum):
    """Which arithmetic ``FakeQuantLinear`` uses (see fakequant.py)."""

    FALLBACK = "fallback"
    FMS_MO = "fms-mo"
    HARDWARE = "hardware"


class Target(enum.StrEnum):
    AIU = "aiu"
    CPU = "cpu"


#: The AIU schemes fms-model-optimizer runs (AIU_TARGET.md 1.2). Everything else is normalized to one.
AIU_SCHEMES = frozenset(
    {
        (Granularity.CHANNEL, ActScheme.DYNAMIC_TOKEN),
        (Granularity.TENSOR, ActScheme.DYNAMIC_TENSOR),
        (Granularity.TENSOR, ActScheme.STATIC_TENSOR),
    }
)

#: torch dtype <-> safetensors header string, the one mapping table used at every edge.
DTYPE_TO_ST: dict[torch.dtype, str] = {
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fnuz: "F8_E4M3FNUZ",
    torch.float8_e5m2fnuz: "F8_E5M2FNUZ",
    torch.float8_e8m0fnu: "F8_E8M0",  # block-scale exponents (DeepSeek ue8m0, MX); never a weight
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.bool: "BOOL",
}
ST_TO_DTYPE: dict[str, torch.dtype] = {v: k for k, v in DTYPE_TO_ST.items()}
FP8_DTYPES = frozenset({torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz})
FLOAT_DTYPES = frozenset({torch.bfloat16, torch.float16, torch.float32, torch.float64})


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the spelling of config.json and reports)."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True, slots=True, kw_only=True)
class WeightScheme:
    """A weight scheme: granularity plus the block shape for ``BLOCK``."""

    granularity: Granularity
    block: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if (self.granularity is Granularity.BLOCK) != (self.block is not None):
            raise UnsupportedSchemeError(f"block size {self.block} does not go with granularity {self.granularity}")
        if self.block is not None and (len(self.block) != 2 or min(self.block) < 1):
            raise UnsupportedSchemeError(f"block size must be two positive ints, got {self.block}")

    def scale_shape(self, out_features: int, in_features: int) -> tuple[int, ...]:
        if self.granularity is Granularity.TENSOR:
            return (1,)
        if self.granularity is Granularity.CHANNEL:
            return (out_features, 1)
        assert self.block is not None
        bo, bi = self.block
        return (-(-out_features // bo), -(-in_features // bi))

    def describe(self) -> str:
        if self.block is not None:
            return f"block {self.block[0]}x{self.block[1]}"
        return str(self.granularity)


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorRef:
    """Where a tensor lives, read from a safetensors header without loading it."""

    key: str
    file: str  # path relative to the checkpoint directory
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    offset: int = 0  # absolute byte offset of the data in the file


@dataclass(frozen=True, slots=True, kw_only=True)
class LinearPlan:
    """One quantized linear as found in the source (headers only, no tensor data).

    ``weight`` is ``[out, in]`` fp8, or a slice of a stored tensor: ``expert`` selects index ``e`` of dim 0
    of fused ``[E, out, in]`` expert tensors (and of their ``[E, ...]`` scales); ``rows`` selects a row range
    of the weight (e.g. the gate half of a fused ``gate_up_proj``), with per-channel and block scales sliced
    alike; ``transposed`` says the stored weight is ``[in, out]``. ``weight_scale`` holds the scales in
    whatever shape the layout stores; the reader turns them into ``scheme.scale_shape(out, in)``.
    """

    module: str
    weight: TensorRef
    weight_scale: TensorRef
    scheme: WeightScheme
    activation: ActScheme
    input_scale: TensorRef | None = None
    bias: TensorRef | None = None
    act_upper_bound: float | None = None
    expert: int | None = None
    rows: tuple[int, int] | None = None
    transposed: bool = False

    @property
    def out_features(self) -> int:
        if self.rows is not None:
            return self.rows[1] - self.rows[0]
        return self.weight.shape[-1] if self.transposed else self.weight.shape[-2]

    @property
    def in_features(self) -> int:
        return self.weight.shape[-2] if self.transposed else self.weight.shape[-1]

    @property
    def weight_nbytes(self) -> int:
        return self.out_features * self.in_features * self.weight.dtype.itemsize

    @property
    def is_slice(self) -> bool:
        return self.expert is not None or self.rows is not None or self.transposed


@dataclass(frozen=True, slots=True, kw_only=True)
class QuantizedLinear:
    """A quantized linear with its tensors, in the canonical convention.

    - ``weight``: ``[out, in]`` float8 (e4m3fn after normalization);
    - ``weight_scale``: fp32 of shape ``scheme.scale_shape(out, in)``, the dequantization multiplier;
    - ``input_scale``: fp32 ``[1]`` for ``STATIC_TENSOR``, else None;
    - ``bias``: ``[out]`` in the model dtype, or None.
    ``scale_dtype`` is the dtype the scales are stored in on disk (source or target).
    """

    module: str
    weight: torch.Tensor
    weight_scale: torch.Tensor
    scheme: WeightScheme
    activation: ActScheme
    scale_dtype: torch.dtype
    input_scale: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    act_upper_bound: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class KVScale:
    """A KV-cache scale found in the source: attention module, which cache, values (fp32)."""

    module: str  # e.g. model.layers.0.self_attn
    kind: str  # "k" | "v" | "q" | "kv" (legacy single K/V scale) | "prob" (Quark softmax output)
    key: str  # source tensor name
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointPlan:
    """Everything a reader found: the linears, the KV scales, and the pass-through tensors."""

    format: str
    evidence: list[str]
    rule: str
    linears: list[LinearPlan]
    kv_scales: list[KVScale] = field(default_factory=list)
    passthrough: list[TensorRef] = field(default_factory=list)  # copied unchanged (embeddings, norms, ...)
    dropped: dict[str, str] = field(default_factory=dict)  # key -> reason
    unquantized_linears: list[str] = field(default_factory=list)  # modules with a bf16 [out,in] weight
    problems: list[CheckpointError] = field(default_factory=list)  # per-tensor problems, reported with the rest
    hf_config: dict | None = None  # config.json derived by the reader (Mistral native: from params.json)
    rename: dict[str, str] = field(default_factory=dict)  # source key -> HF output key for pass-through tensors
    model_dtype: torch.dtype = torch.bfloat16
