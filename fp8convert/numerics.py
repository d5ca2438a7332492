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
#: Elements per row chunk when requantizing: fp32 working memory stays bounded (DESIGN.md 6) and a chunk's
#: temporaries stay near the CPU caches (4 MB of fp32 each).
CHUNK_ELEMENTS = 1 << 20
_E4M3_REBIAS = 2.0**120  # 2^(127 - 7): bf16/fp32 exponent bias minus e4m3 exponent bias


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


_SUBNORMAL = torch.tensor([2.0**-130])


def denormals_flushed() -> bool:
    """True when the CPU flushes denormals (``torch.set_flush_denormal(True)``): the integer decodes of fp8
    codes go through fp32/bf16 subnormals and would then read zero."""
    return float(_SUBNORMAL * 2.0) == 0.0


def fp8_decode(codes: torch.Tensor) -> torch.Tensor:
    """fp32 values of fp8 codes, as a new tensor. Precondition: no NaN codes (callers check them first).

    e4m3fn is decoded with integer ops, several times faster than torch's CPU cast: the 7 magnitude bits
    shifted into a bf16's exponent/mantissa give ``value * 2^-120`` for normal and subnormal codes alike, and
    the multiplication by ``2^120`` is exact. Identical to ``codes.to(torch.float32)`` for every non-NaN code
    (tested on all 256); NaN codes would decode to +-480. Where denormals are flushed
    (``torch.set_flush_denormal(True)``) the trick would zero subnormal codes, so torch's cast is used.
    """
    if codes.dtype != torch.float8_e4m3fn or denormals_flushed():
        return codes.to(torch.float32)
    bits = codes.view(torch.int8).to(torch.int16)  # sign-extended: bit 15 is the sign
    sign = bits & -(2**15)
    bits.bitwise_left_shift_(4).bitwise_and_(0x7F << 4).bitwise_or_(sign)
    return bits.view(torch.bfloat16).mul_(_E4M3_REBIAS).to(torch.float32)


def dequantize(weight: torch.Tensor, scale: torch.Tensor, scheme: WeightScheme) -> torch.Tensor:
    """fp32 ``[out, in]`` = ``fp32(weight) * scale`` (exact for bf16/fp16 scales; one rounding for fp32)."""
    out_features, in_features = weight.shape
    return weight.to(torch.float32) * expand_scale(scale, scheme, out_features, in_features)


def dequantize_linear(linear: QuantizedLinear) -> torch.Tensor:
    """The high-precision weight ``[out, in]`` fp32 of a canonical linear."""
    return dequantize(linear.weight, linear.weight_scale, linear.scheme)


def dequant_rows(codes: torch.Tensor, scale: torch.Tensor, scheme: WeightScheme, r0: int) -> torch.Tensor:
    """fp32 rows ``[r0, r0 + len(codes))`` of the dequantized weight, ``fp32(q) * scale`` elementwise (one
    rounding; exact for bf16 scales). ``scale`` is fp32 in ``scheme.scale_shape(out, in)``; for BLOCK, r0 is
    a multiple of the block height and edge tiles are cropped (FORMATS.md 2.4). No NaN codes (checked first)."""
    x = fp8_decode(codes)
    rows, cols = x.shape
    if scheme.granularity is Granularity.TENSOR:
        return x.mul_(scale.reshape(1, 1))
    if scheme.granularity is Granularity.CHANNEL:
        return x.mul_(scale.reshape(-1, 1)[r0 : r0 + rows])
    assert scheme.block is not None
    bo, bi = scheme.block
    s = scale[r0 // bo : -(-(r0 + rows) // bo)]
    if rows % bo == 0 and cols % bi == 0:  # whole tiles: broadcast, no expanded copy of the scales
        x.view(rows // bo, bo, cols // bi, bi).mul_(s.reshape(rows // bo, 1, cols // bi, 1))
        return x
    return x.mul_(s.repeat_interleave(bo, 0)[:rows].repeat_interleave(bi, 1)[:, :cols])


def requantize_rows(hp: torch.Tensor, scale: torch.Tensor, stats: ErrorStats, amax: torch.Tensor) -> torch.Tensor:
    """``quantize(hp, scale)`` that consumes ``hp`` (divided in place) and adds the error to ``stats``, measured in
    fp8 units (decoded codes minus ``hp / scale``) and scaled back per row: no second dequantized copy."""
    signal = torch.linalg.vector_norm(hp, 2, dim=1)
    t = hp.div_(scale).clamp_(-E4M3_MAX, E4M3_MAX)
    codes = t.to(torch.float8_e4m3fn)
    stats.add_units(signal, fp8_decode(codes).sub_(t), scale, amax)
    return codes


def row_amax(codes: torch.Tensor, scale: torch.Tensor, scheme: WeightScheme, r0: int) -> torch.Tensor | None:
    """``max|dequantized|`` per row ``[rows, 1]`` from the codes' bytes: for e4m3fn the magnitude bits order
    like the values and ``|q| * s`` rounds monotonically, so the max of the products is the product of the
    max (per block tile). None where that does not apply (other dtypes, partial tiles)."""
    if codes.dtype != torch.float8_e4m3fn or codes.dim() != 2:
        return None
    rows, cols = codes.shape
    mags = codes.view(torch.uint8) & 0x7F
    g = scheme.granularity
    if g is not Granularity.BLOCK:
        top = fp8_decode(mags.amax(dim=1, keepdim=True).view(torch.float8_e4m3fn))
        s = scale.reshape(1, 1) if g is Granularity.TENSOR else scale.reshape(-1, 1)[r0 : r0 + rows]
        return top * s
    assert scheme.block is not None
    bo, bi = scheme.block
    if rows % bo or cols % bi:
        return None
    top = fp8_decode(mags.view(rows, cols // bi, bi).amax(dim=-1).view(torch.float8_e4m3fn))  # [rows, tiles]
    s = scale[r0 // bo : (r0 + rows) // bo]
    return (top.view(rows // bo, bo, cols // bi) * s.reshape(rows // bo, 1, cols // bi)).amax(dim=-1).view(rows, 1)


def channel_scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """Per-row fp32 scale from per-row ``max|w|``: ``amax / 448`` rounded up to bf16, 1.0 for all-zero rows."""
    s = bf16_round_up(amax.to(torch.float32) / E4M3_MAX).to(torch.float32)
    return torch.where(s > 0, s, torch.ones_like(s))


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


#: Largest usable scale: ``448 x scale`` (the largest dequantized value) must stay finite in bf16.
HUGE_SCALE = float(torch.finfo(torch.bfloat16).max) / E4M3_MAX


def scale_problems(scale: torch.Tensor) -> list[str]:
    """What is wrong with a scale tensor: NaN, Inf, zero, negative or huge entries (empty list: fine)."""
    s = scale.to(torch.float32)
    found = []
    huge = torch.isfinite(s) & (s > HUGE_SCALE)
    for label, mask in (
        ("NaN", torch.isnan(s)),
        ("Inf", torch.isinf(s)),
        ("zero", s == 0),
        ("negative", s < 0),
        (f"huge (> {HUGE_SCALE:.2e}: 448 x scale overflows bf16)", huge),
    ):
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
    """Accumulates SQNR, max relative error and changed values over row chunks of one tensor.

    Sums are taken per row (each row reduced by one thread, in a fixed order), exactly across the rows of a
    chunk (``math.fsum``), then chunk by chunk in row order: the figures do not depend on the thread count;
    the chunking is fixed (``CHUNK_ELEMENTS``).
    """

    def __init__(self) -> None:
        self.signal = 0.0
        self.noise = 0.0
        self.max_rel = 0.0
        self.changed = 0

    def add(self, ref: torch.Tensor, test: torch.Tensor, ref_amax: torch.Tensor | None = None) -> None:
        """``ref`` / ``test``: the same rows before and after (any float dtype); ``ref_amax``: ``max|ref|`` per
        row if the caller has it."""
        width = ref.shape[-1] if ref.dim() else 1
        ref32 = ref.to(torch.float32).reshape(-1, width)
        err = test.to(torch.float32).reshape(-1, width) - ref32
        self.signal += _sum_squares(ref32)
        self.noise += _sum_squares(err)
        err_max = err.abs().amax(dim=1)
        amax = ref32.abs().amax(dim=1) if ref_amax is None else ref_amax.reshape(-1).to(torch.float32)
        rel = torch.where(amax > 0, err_max / torch.where(amax > 0, amax, torch.ones_like(amax)), err_max)
        if rel.numel():
            self.max_rel = max(self.max_rel, float(rel.max()))
        self.changed += int(torch.count_nonzero(err))

    def add_units(self, signal: torch.Tensor, err: torch.Tensor, scale: torch.Tensor, ref_amax: torch.Tensor) -> None:
        """The same figures from what requantization has at hand: per-row norms of the reference rows,
        the rounding error in fp8 units ``[rows, k]`` (consumed), the new scale per row (or one) and
        ``max|ref|`` per row. Error in weight units = error in fp8 units x scale (to fp32 rounding)."""
        rows = err.shape[0]
        s = scale.reshape(-1).to(torch.float64).expand(rows)
        self.signal += _fsum_squares(signal)
        self.noise += _fsum_squares(torch.linalg.vector_norm(err, 2, dim=1).to(torch.float64) * s)
        self.changed += int(torch.count_nonzero(err.view(torch.int32)))  # x - y is never -0.0 (round to nearest)
        if rows:
            err_max = err.abs_().amax(dim=1).to(torch.float64) * s
            amax = ref_amax.reshape(-1).to(torch.float64)
            rel = torch.where(amax > 0, err_max / torch.where(amax > 0, amax, torch.ones_like(amax)), err_max)
            self.max_rel = max(self.max_rel, float(rel.max()))

    def merge(self, other: ErrorStats) -> None:
        """Add another chunk's figures (in row order: the sums are then the same whatever the threads)."""
        self.signal += other.signal
        self.noise += other.noise
        self.max_rel = max(self.max_rel, other.max_rel)
        self.changed += other.changed

    @property
    def sqnr_db(self) -> float:
        if self.noise == 0:
            return math.inf
        return -math.inf if self.signal == 0 else 10.0 * math.log10(self.signal / self.noise)


def _fsum_squares(norms: torch.Tensor) -> float:
    n = norms.to(torch.float64)
    return math.fsum((n * n).tolist())


def _sum_squares(rows: torch.Tensor) -> float:
    """Sum of squares of a ``[rows, k]`` fp32 tensor: per-row norms, squared and summed exactly in fp64."""
    if not rows.numel():
        return 0.0
    return _fsum_squares(torch.linalg.vector_norm(rows, 2, dim=1))
