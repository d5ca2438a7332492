"""Pure FP8 tensor math: limits, dequantization, per-channel quantization, scale rounding, error metrics.

Facts this module relies on (NUMERICS.md): fp8 -> fp32 is exact; ``fp32(q) * s`` is exact for a bf16
scale; the cast fp32 -> e4m3fn rounds to nearest even and must be preceded by an explicit clamp.
"""

from __future__ import annotations

import ctypes
import math

import torch

from fp8convert.spec import Granularity, QuantizedLinear, WeightScheme

E4M3_MAX = 448.0
E4M3FNUZ_MAX = 240.0
#: Rows per chunk when requantizing, so fp32 working memory stays bounded (DESIGN.md 6).
CHUNK_ELEMENTS = 1 << 22


def fp8_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def expand_scale(scale: torch.Tensor, scheme: WeightScheme, out_features: int, in_features: int) -> torch.Tensor:
    """Broadcastable fp32 scale for a weight ``[out, in]``: ``[1,1]``, ``[out,1]`` or ``[out,in]``.

    Block scales ``[ceil(out/bo), ceil(in/bi)]`` are expanded over full tiles, then cropped: the edge
    tiles were zero-padded by the producer before their amax was taken (FORMATS.md 2.4). The block size
    comes from the scheme, never from ``out // rows``.
    """
    s = scale.to(torch.float32)
    if scheme.granularity is Granularity.TENSOR:
        return s.reshape(1, 1)
    if scheme.granularity is Granularity.CHANNEL:
        return s.reshape(out_features, 1)
    assert scheme.block is not None
    bo, bi = scheme.block
    return s.repeat_interleave(bo, 0)[:out_features].repeat_interleave(bi, 1)[:, :in_features]


def dequantize(weight: torch.Tensor, scale: torch.Tensor, scheme: WeightScheme) -> torch.Tensor:
    """fp32 ``[out, in]`` = ``fp32(weight) * scale`` (exact for bf16/fp16 scales; one rounding for fp32)."""
    out_features, in_features = weight.shape
    return weight.to(torch.float32) * expand_scale(scale, scheme, out_features, in_features)


def dequantize_linear(linear: QuantizedLinear) -> torch.Tensor:
    """The high-precision weight ``[out, in]`` fp32 of a canonical linear."""
    return dequantize(linear.weight, linear.weight_scale, linear.scheme)


def row_chunks(out_features: int, in_features: int, align: int = 1) -> list[tuple[int, int]]:
    """Row ranges of about CHUNK_ELEMENTS elements each, starting on multiples of ``align``."""
    rows = max(align, (CHUNK_ELEMENTS // max(in_features, 1)) // align * align)
    return [(r, min(r + rows, out_features)) for r in range(0, out_features, rows)]


def quantize(hp: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3fn codes of ``hp / scale`` (fp32 division, explicit clamp to +-448, round-to-nearest-even)."""
    return torch.clamp(hp.to(torch.float32) / scale.to(torch.float32), -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def bf16_round_up(x: torch.Tensor) -> torch.Tensor:
    """Smallest bf16 value >= x, for positive finite x; returned as bf16."""
    b = x.to(torch.bfloat16)
    low = b.to(torch.float64) < x.to(torch.float64)  # fp64 holds every bf16/fp16/fp32 value exactly
    if bool(low.any()):
        bits = b.view(torch.int16).clone()
        bits[low] += 1  # positive values: the next bit pattern is the next larger bf16
        b = bits.view(torch.bfloat16)
    return b


def is_exact_bf16(x: torch.Tensor) -> bool:
    return bool(torch.equal(x.to(torch.bfloat16).to(x.dtype), x))


def channel_scale(hp: torch.Tensor) -> torch.Tensor:
    """Per-row scale ``[out, 1]`` bf16: ``amax / 448`` rounded up to bf16 (so nothing clips).

    An all-zero row gets scale 1.0 (any positive scale quantizes it to zeros exactly).
    """
    amax = hp.abs().amax(dim=1, keepdim=True).to(torch.float32)
    s = bf16_round_up(amax / E4M3_MAX)
    return torch.where(s > 0, s, torch.ones_like(s))


def fp8_nan_count(weight: torch.Tensor) -> int:
    """Number of non-finite codes in an fp8 tensor (e4m3fn: NaN 0x7F/0xFF; fnuz: NaN 0x80; e5m2: NaN and inf,
    exponent all ones).

    e4m3fn and fnuz are counted with ``bytes.count`` (memchr speed; a torch mask is ~10x slower).
    """
    w = weight.detach().contiguous()
    if weight.dtype == torch.float8_e5m2:  # exponent all ones: NaN, and +-inf (0x7C/0xFC), non-finite too
        u = w.view(torch.uint8)
        return int(((u & 0x7C) == 0x7C).sum())
    data = ctypes.string_at(w.data_ptr(), w.numel()) if w.numel() else b""
    if weight.dtype == torch.float8_e4m3fn:
        return data.count(b"\x7f") + data.count(b"\xff")
    if weight.dtype in (torch.float8_e4m3fnuz, torch.float8_e5m2fnuz):
        return data.count(b"\x80")
    return 0


def scale_problems(scale: torch.Tensor) -> list[str]:
    """What is wrong with a scale tensor: NaN, Inf, zero or negative entries (empty list: fine)."""
    s = scale.to(torch.float32)
    found = []
    for label, mask in (("NaN", torch.isnan(s)), ("Inf", torch.isinf(s)), ("zero", s == 0), ("negative", s < 0)):
        n = int(mask.sum())
        if n:
            found.append(f"{n} {label}")
    return found


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when equal)."""
    ref64, err = ref.to(torch.float64), (test.to(torch.float64) - ref.to(torch.float64))
    noise = float(err.pow(2).sum())
    signal = float(ref64.pow(2).sum())
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def max_rel_error(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Largest ``|test - ref|`` in a row relative to that row's ``max|ref|``, over all rows."""
    ref32, test32 = ref.to(torch.float32).reshape(ref.shape[0], -1), test.to(torch.float32).reshape(ref.shape[0], -1)
    err = (test32 - ref32).abs().amax(dim=1)
    amax = ref32.abs().amax(dim=1)
    rel = torch.where(amax > 0, err / torch.where(amax > 0, amax, torch.ones_like(amax)), err)
    return float(rel.max()) if rel.numel() else 0.0


class ErrorStats:
    """Accumulates SQNR and max relative error over row chunks of one tensor."""

    def __init__(self) -> None:
        self.signal = 0.0
        self.noise = 0.0
        self.max_rel = 0.0
        self.changed = 0

    def add(self, ref: torch.Tensor, test: torch.Tensor) -> None:
        ref64 = ref.to(torch.float64)
        self.signal += float(ref64.pow(2).sum())
        self.noise += float((test.to(torch.float64) - ref64).pow(2).sum())
        self.max_rel = max(self.max_rel, max_rel_error(ref, test))
        self.changed += int((ref != test).sum())

    @property
    def sqnr_db(self) -> float:
        if self.noise == 0:
            return math.inf
        return -math.inf if self.signal == 0 else 10.0 * math.log10(self.signal / self.noise)
