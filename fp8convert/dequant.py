"""Fast, exact dequantization for the CPU runtime: e4m3fn weights into bf16/fp16/fp32, activation fake-quant.

torch's e4m3fn casts run one element at a time on CPU (about 2 ns per element here): a per-call
``weight.to(bf16) * scale`` made FakeQuantLinear 10-60x slower than the bf16 matmul it feeds. The functions
below give the same bits with vectorized integer and float ops (tests/test_fakequant_speed_paths.py checks
every e4m3fn code against every bf16 and fp16 scale, and the activation rounding at every rounding boundary):

- ``dequantize_weight(weight, scale, dtype)`` = ``(weight.to(dtype) * fp32(scale)).to(dtype)``. It rebuilds each
  code's bits in the target layout (sign-extend the byte, shift, mask: every non-NaN code, subnormals included,
  then reads as ``value * 2**-bias``) and multiplies by ``scale * 2**bias`` in the target dtype: the same exact
  product, rounded the same way. It works in row chunks of ~1 M elements so the integer scratch stays in cache.
  Inputs it cannot prove exact (NaN codes, a scale that is not exact in the target dtype after the shift,
  flushed denormals, non-CPU tensors) take the plain formula.
- ``fake_quantize_activation(x, ...)`` = the fp32 value of ``quantize_activation``'s codes, without the cast:
  round-to-nearest-even to e4m3fn's grid by adding and subtracting ``1.5 * 2**(e + 20)``.

Nothing here computes a matmul: callers run ``F.linear``/``torch.mm`` on the full dequantized weight, exactly as
fms-model-optimizer does. Splitting that matmul by output rows is not bit-exact on CPU (oneDNN picks kernels and
K-blocking by shape), so the weight is dequantized whole into a reusable per-thread workspace.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch

from fp8convert.numerics import denormals_flushed, fp8_nan_count
from fp8convert.spec import ActScheme

E4M3_MAX = 448.0
_EPS = torch.finfo(torch.float32).eps
#: elements per dequantization chunk: its int16 scratch (2 MiB) stays in the cores' L2 between the passes; few
#: chunks also mean few parallel regions (each torch op is one), which matters on a busy machine
CHUNK = 1 << 20
#: elements per activation chunk: three fp32 buffers of 1 MiB
ACT_CHUNK = 1 << 18


def _signed(value: int, bits: int) -> int:
    return value - (1 << bits) if value >= 1 << (bits - 1) else value


#: target dtype -> (integer dtype of its bits, twice as wide, shift, mask, bias): the e4m3fn byte sign-extended,
#: shifted left and masked (sign bit + the shifted exponent/mantissa bits) reads in the target layout as
#: ``value * 2**-bias``, e4m3fn subnormals included (as target subnormals: 2**-bias rescales both ranges alike).
#: The shift and mask run on pairs of elements viewed as one twice-wide integer: the mask also clears the low
#: ``shift`` bits, where the lower element's sign extension spills into the upper one.
_LAYOUT: dict[torch.dtype, tuple[torch.dtype, torch.dtype, int, int, int]] = {
    torch.bfloat16: (torch.int16, torch.int32, 4, _signed(0x87F0_87F0, 32), 120),
    torch.float16: (torch.int16, torch.int32, 7, _signed(0xBF80_BF80, 32), 8),
    torch.float32: (torch.int32, torch.int64, 20, _signed(0x87F0_0000_87F0_0000, 64), 120),
}
_local = threading.local()


# ---- activations ------------------------------------------------------------------------------------
def activation_scale(x: torch.Tensor, activation: ActScheme, input_scale: torch.Tensor | None) -> torch.Tensor:
    """torchao 0.11's activation scale: fp32, ``[..., 1]`` per token or ``[1] * x.dim()`` per tensor."""
    if activation is ActScheme.STATIC_TENSOR:
        assert input_scale is not None
        return input_scale.squeeze().to(torch.float32).reshape([1] * x.dim())
    if activation is ActScheme.DYNAMIC_TENSOR:
        flat = x.reshape(-1)
        mn, mx = flat.amin(0), flat.amax(0)
    elif activation is ActScheme.DYNAMIC_TOKEN:
        mn, mx = x.amin(-1), x.amax(-1)
    else:
        raise ValueError(f"no activation quantization for {activation}")
    s = _dynamic_scale(mn, mx, x.dtype)
    return s.unsqueeze(-1) if activation is ActScheme.DYNAMIC_TOKEN else s.reshape([1] * x.dim())


def _dynamic_scale(mn: torch.Tensor, mx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 scale from the min and max (exact values of ``dtype``, in any float dtype) of a token or tensor."""
    # torchao: max(-min(mn, 0), max(mx, 0)); the same value (NaN included; a zero's sign is lost to the clamp)
    amax = torch.maximum(mx, -mn).clamp_(min=0).to(dtype)
    return torch.clamp(amax / E4M3_MAX, min=_EPS).to(torch.float32)  # amax / 448 evaluated in x.dtype


def quantize_activation(
    x: torch.Tensor, activation: ActScheme, input_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """torchao 0.11's activation quantization as fms-mo calls it (the reference the fast path is tested on).

    Returns (codes e4m3fn shaped like x, fp32 scale shaped ``[..., 1]`` per token or ``[1]*x.dim()``).
    """
    s = activation_scale(x, activation, input_scale)
    q = torch.clamp(x * s.reciprocal(), -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, s


def round_to_e4m3(
    y: torch.Tensor, *, out: torch.Tensor | None = None, spare: torch.Tensor | None = None
) -> torch.Tensor:
    """``y.to(float8_e4m3fn).to(float32)`` for fp32 ``y`` in [-464, 464] (or NaN), without the slow cast.

    Adding ``c = 1.5 * 2**(e + 20)`` (``2**e`` = y's binade, at least 2**-6, e4m3fn's smallest normal) puts
    ``y + c`` in a binade whose spacing is e4m3fn's spacing at ``y``, so the fp32 add rounds to nearest even
    on e4m3fn's grid and subtracting ``c`` is exact. ``copysign`` keeps the sign of values that round to zero.
    Values in (448, 464] round to 448, as the cast of a clamped value does (480 is e4m3fn's NaN code).
    ``out`` receives the result, ``spare`` holds ``2**e`` (both fp32 like ``y``; new tensors when None).
    """
    p = torch.bitwise_and(y.view(torch.int32), 0x7F800000, out=None if spare is None else spare.view(torch.int32))
    p = p.view(torch.float32).clamp_(min=2.0**-6)
    magic = 1.5 * 2.0**20  # alpha * p is exact: a power of two times 1.5
    r = torch.add(y, p, alpha=magic, out=out) if out is not None else torch.add(y, p, alpha=magic)
    r.sub_(p, alpha=magic)
    return torch.copysign(r, y, out=r)


def fake_quantize_activation(
    x: torch.Tensor,
    activation: ActScheme,
    input_scale: torch.Tensor | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_activation``'s codes ``q`` without the slow cast, as ``[-1, K]`` (x flattened), and the scale.

    With ``dtype`` None: the codes' exact fp32 values ``fp32(q)``. With a ``dtype``: the activation dequantized
    as fms-mo does, ``(q.to(dtype) * s).to(dtype)`` (one fp32 product, one rounding). Runs in row chunks of
    ~256 K elements through per-thread buffers, so its ~10 passes stay in cache for prefill-sized inputs.
    """
    k = x.shape[-1]
    per_row = activation is ActScheme.DYNAMIC_TOKEN
    if torch.is_grad_enabled() and x.requires_grad:  # the reference ops, with their autograd graph
        q, s = quantize_activation(x, activation, input_scale)
        values = q.reshape(-1, k).to(torch.float32)
        return (values, s) if dtype is None else ((values * _rows(s, activation)).to(dtype), s)
    x2 = x.reshape(-1, k)
    rows = x2.shape[0]
    if per_row:  # each chunk's scales from its own fp32 copy, while it is in cache
        scale = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    else:
        scale = _rows(activation_scale(x, activation, input_scale), activation)
        recip = scale.reciprocal()  # x * s.reciprocal(), as torchao: a multiply, not a divide
    # A dynamic scale is amax / 448 rounded to x.dtype (relative error <= 2**-9 for bf16 and fp32 as it is >= 2**-23,
    # their normal range) or clamped up to 2**-23, so |x| * recip <= 448.9 and rounds to at most 448: the clamp
    # changes nothing. fp16 rounds amax / 448 in its subnormal range (below 2**-14) with up to 25% error: clamped.
    clamp = activation is ActScheme.STATIC_TENSOR or x.dtype not in (torch.bfloat16, torch.float32)
    out = torch.empty(rows, k, dtype=dtype or torch.float32, device=x.device)
    step = max(1, ACT_CHUNK // max(k, 1)) if x.device.type == "cpu" else max(rows, 1)
    n = min(rows, step) * k
    y_buf, c_buf = _buffer("act_y", n, x.device), _buffer("act_c", n, x.device)
    r_buf = _buffer("act_r", n, x.device) if dtype not in (None, torch.float32) else None
    for a in range(0, rows, step):
        b = min(rows, a + step)
        y, c = y_buf[: (b - a) * k].view(b - a, k), c_buf[: (b - a) * k].view(b - a, k)
        y.copy_(x2[a:b])  # fp32(x): exact
        if per_row:
            scale[a:b, 0] = _dynamic_scale(y.amin(-1), y.amax(-1), x.dtype)
            y.mul_(scale[a:b].reciprocal())
        else:
            y.mul_(recip)
        if clamp:
            y.clamp_(-E4M3_MAX, E4M3_MAX)
        r = out[a:b] if r_buf is None else r_buf[: (b - a) * k].view(b - a, k)
        round_to_e4m3(y, out=r, spare=c)
        if dtype is not None:
            r.mul_(scale[a:b] if per_row else scale)
            if r_buf is not None:
                out[a:b].copy_(r)  # round to dtype
    return out, scale.reshape(*x.shape[:-1], 1) if per_row else scale.reshape([1] * x.dim())


def _rows(s: torch.Tensor, activation: ActScheme) -> torch.Tensor:
    """The activation scale against ``[-1, K]``: ``[rows, 1]`` per token, 0-dim per tensor."""
    return s.reshape(-1, 1) if activation is ActScheme.DYNAMIC_TOKEN else s.reshape(())


def _buffer(name: str, numel: int, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return workspace(numel, torch.float32, name=name)
    return torch.empty(numel, dtype=torch.float32, device=device)


# ---- weights ----------------------------------------------------------------------------------------
def _shifted_scale(scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``scale * 2**bias`` in ``dtype`` (bias: ``dtype``'s in ``_LAYOUT``; scale None: 1), or None where that is
    not exact (overflow, NaN, or a scale with more precision than ``dtype``)."""
    if scale is None:
        scale = torch.ones(1, dtype=dtype)
    exact = scale.to(torch.float64) * 2.0 ** _LAYOUT[dtype][-1]
    shifted = exact.to(dtype)
    return shifted if torch.equal(shifted.to(torch.float64), exact) else None


def workspace(numel: int, dtype: torch.dtype, *, name: str = "weight") -> torch.Tensor:
    """This thread's reusable CPU buffer ``[numel]`` (grown to the largest request, never shrunk): one per
    name and dtype, shared by every layer, so a model holds one dequantized weight at a time, not one each."""
    pool: dict[tuple[str, torch.dtype], torch.Tensor] = _local.__dict__.setdefault("pool", {})
    buf = pool.get((name, dtype))
    if buf is None or buf.numel() < numel:
        pool.pop((name, dtype), None)
        with torch.inference_mode(False):  # a normal tensor: writable in and out of inference mode
            buf = pool[(name, dtype)] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def workspace_bytes() -> int:
    """Bytes held by this thread's workspaces."""
    return sum(t.nbytes for t in _local.__dict__.get("pool", {}).values())


def release_workspaces() -> None:
    """Free this thread's dequantization workspaces (they are reused across layers and calls otherwise)."""
    _local.__dict__.pop("pool", None)


def dequantize_weight_plain(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The reference formula: ``round_dtype(fp32(weight) * fp32(scale))``; ``scale`` broadcasts over rows
    (None: the codes' own values, ``weight.to(dtype)``)."""
    if scale is None:
        return weight.to(dtype)
    return (weight.to(dtype) * scale.to(torch.float32)).to(dtype)


def fast_path_ok(weight: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether ``dequantize_weight`` may use the bit trick for this weight (before the scale check)."""
    return (
        dtype in _LAYOUT
        and weight.device.type == "cpu"
        and weight.dtype == torch.float8_e4m3fn
        and weight.dim() == 2
        and weight.is_contiguous()
        and not denormals_flushed()
    )


def dequantize_weight(
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    dtype: torch.dtype,
    *,
    out: torch.Tensor | None = None,
    state: WeightState | None = None,
) -> torch.Tensor:
    """``round_dtype(fp32(weight) * fp32(scale))`` as a contiguous ``[out, in]`` tensor, bit for bit.

    Args:
        weight: ``[out, in]`` e4m3fn.
        scale: ``[out, 1]`` (per row) or one element (per tensor), any float dtype; None: no scale (the codes'
            own values, as ``weight.to(dtype)``).
        dtype: the result dtype.
        out: where to write (``[out, in]`` contiguous, ``dtype``); a new tensor when None.
        state: the module's ``WeightState`` for these tensors, which remembers the NaN-code check and the
            shifted scale between calls; both are computed here when None.
    """
    layout = _LAYOUT.get(dtype)
    shifted = None
    if layout is not None and fast_path_ok(weight, dtype):
        shifted = state.shifted_for(scale, dtype) if state is not None else _shifted_scale(scale, dtype)
        if shifted is not None and shifted.numel() not in (1, weight.shape[0]):
            shifted = None  # a scale that does not fit the rows: the plain formula raises the broadcasting error
        if shifted is not None and not (state.nan_free_for(weight) if state is not None else not fp8_nan_count(weight)):
            shifted = None
    if layout is None or shifted is None:
        w = dequantize_weight_plain(weight, scale, dtype)
        return w if out is None else out.copy_(w)
    rows, cols = weight.shape
    result = torch.empty(rows, cols, dtype=dtype) if out is None else out
    itype, pair, shift, mask, _ = layout
    step = max(1, CHUNK // max(cols, 1))
    size = min(rows, step) * cols
    scratch = workspace(size + size % 2, itype, name="scratch")  # even: the pair view may cover one spare element
    codes = weight.view(torch.int8)
    per_row = shifted.numel() != 1
    shifted = shifted.reshape(-1, 1) if per_row else shifted.reshape(())
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        n = (r1 - r0) * cols
        bits = scratch[:n].view(r1 - r0, cols)
        bits.copy_(codes[r0:r1])  # sign-extends
        wide = scratch[: n + n % 2].view(pair)  # a spare last element only receives spilled bits: unused
        torch.bitwise_left_shift(wide, shift, out=wide)
        wide.bitwise_and_(mask)
        torch.mul(bits.view(dtype), shifted[r0:r1] if per_row else shifted, out=result[r0:r1])
    return result


class WeightState:
    """What a module knows about its current weight: whether it holds NaN codes, and the optional cached
    dequantized copy ``(dtype, tensor)``. Both are tied to the weight and scale tensors themselves (weak
    references and version counters): assigning, loading or modifying either in place drops them."""

    def __init__(self) -> None:
        self.key: tuple[Any, ...] | None = None
        self.nan_free: bool | None = None
        self.cache: tuple[torch.dtype, torch.Tensor] | None = None
        self.shifted: dict[tuple[torch.dtype, bool], torch.Tensor | None] = {}

    @staticmethod
    def _version(t: torch.Tensor) -> int | None:
        try:
            return t._version
        except RuntimeError:  # inference tensors have no version counter: identity only
            return None

    def refresh(self, weight: torch.Tensor, scale: torch.Tensor) -> None:
        """Forget everything if ``weight`` or ``scale`` is not the tensor (or version) seen last time."""
        key = (self._version(weight), self._version(scale))
        if self.key is not None:
            w_ref, s_ref, versions = self.key
            if w_ref() is weight and s_ref() is scale and versions == key:
                return
        self.clear()
        self.key = (weakref.ref(weight), weakref.ref(scale), key)

    def clear(self) -> None:
        self.key, self.nan_free, self.cache, self.shifted = None, None, None, {}

    def shifted_for(self, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """``_shifted_scale(scale, dtype)``, computed once per scale tensor (or None) and dtype."""
        key = (dtype, scale is None)
        if key not in self.shifted:
            self.shifted[key] = _shifted_scale(scale, dtype)
        return self.shifted[key]

    def nan_free_for(self, weight: torch.Tensor) -> bool:
        """Whether ``weight`` (a CPU e4m3fn tensor) has no NaN code, checked once per weight tensor."""
        if self.nan_free is None:
            self.nan_free = not fp8_nan_count(weight)
        return self.nan_free
