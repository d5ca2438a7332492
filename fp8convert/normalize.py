"""Pure normalization of canonical linears to the AIU target (DESIGN.md 3). No I/O.

Target: weights e4m3fn with BF16 scales, either per-channel ``[out, 1]`` with dynamic per-token
activations (the primary scheme) or per-tensor ``[1]`` with per-tensor activations (dynamic, or static
with a BF16 ``input_scale [1]``). Every change is recorded with its exactness; lossy ones carry SQNR and
max relative error of the dequantized weight against the source's dequantized weight.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from fp8convert.errors import UnsupportedSchemeError
from fp8convert.numerics import (
    E4M3_MAX,
    ErrorStats,
    bf16_round_up,
    channel_scale,
    dequantize,
    dequantize_linear,
    is_exact_bf16,
    quantize,
    row_chunks,
)
from fp8convert.spec import AIU_SCHEMES, ActScheme, Granularity, LinearPlan, QuantizedLinear, WeightScheme

CHANNEL = WeightScheme(granularity=Granularity.CHANNEL)
TENSOR = WeightScheme(granularity=Granularity.TENSOR)
PRIMARY = (Granularity.CHANNEL, ActScheme.DYNAMIC_TOKEN)


@dataclass(frozen=True, slots=True, kw_only=True)
class Normalized:
    """A linear in the target form. ``linear.weight_scale`` / ``input_scale`` / ``bias`` are BF16 tensors
    of the target shapes (``[out,1]`` or ``[1]``); ``weight_unchanged`` says the fp8 codes equal the source's
    (so the writer may copy bytes)."""

    linear: QuantizedLinear
    weight_unchanged: bool
    actions: list[str] = field(default_factory=list)
    exact: bool = True
    changed_codes: int = 0
    sqnr_db: float | None = None
    max_rel_error: float | None = None

    def record(self) -> dict[str, object]:
        """The per-layer entry of the report."""
        return {
            "target": f"{self.linear.scheme.describe()} + {self.linear.activation}",
            "exact": self.exact,
            "actions": self.actions or ["kept"],
            "changed_codes": self.changed_codes,
            "sqnr_db": _finite(self.sqnr_db),
            "max_rel_error": self.max_rel_error,
        }


def _finite(x: float | None) -> float | str | None:
    if x is None:
        return None
    return x if x not in (float("inf"), float("-inf")) else ("inf" if x > 0 else "-inf")


def choose_target(linears: Iterable[LinearPlan]) -> tuple[Granularity, ActScheme]:
    """One scheme for the whole model (the AIU config has one group): per-tensor only if every linear is
    per-tensor with the same per-tensor activations; otherwise per-channel + dynamic per-token."""
    pairs = {(lin.scheme.granularity, lin.activation) for lin in linears}
    if len(pairs) == 1:
        (pair,) = pairs
        if pair in AIU_SCHEMES and pair[0] is Granularity.TENSOR:
            return pair
    return PRIMARY


def _to_e4m3fn(ql: QuantizedLinear, actions: list[str]) -> tuple[torch.Tensor, bool]:
    """fp8 codes as e4m3fn, converted by value; returns (codes, whether they needed requantization)."""
    w = ql.weight
    if w.dtype == torch.float8_e4m3fn:
        return w, False
    if w.dtype == torch.float8_e4m3fnuz:
        actions.append("e4m3fnuz -> e4m3fn by value (same scale)")
        return torch.clamp(w.to(torch.float32), -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), False
    if w.dtype in (torch.float8_e5m2, torch.float8_e5m2fnuz):
        actions.append(f"{str(w.dtype).removeprefix('torch.')} -> e4m3fn: requantized by value per channel")
        return w, True
    raise UnsupportedSchemeError(f"{ql.module}.weight has dtype {w.dtype}, not an fp8 dtype")


def _dequant_rows(q: torch.Tensor, scale: torch.Tensor, scheme: WeightScheme, r0: int, r1: int) -> torch.Tensor:
    """fp32 rows ``[r0, r1)`` of the dequantized weight (r0 aligned to the block height for BLOCK)."""
    if scheme.granularity is Granularity.BLOCK:
        assert scheme.block is not None
        bo = scheme.block[0]
        return dequantize(q[r0:r1], scale[r0 // bo : -(-r1 // bo)], scheme)
    if scheme.granularity is Granularity.CHANNEL:
        return q[r0:r1].to(torch.float32) * scale.reshape(-1, 1)[r0:r1].to(torch.float32)
    return q[r0:r1].to(torch.float32) * scale.reshape(1, 1).to(torch.float32)


def _requantize(
    q: torch.Tensor, old_scale: torch.Tensor, old: WeightScheme, new_scale: torch.Tensor | None, stats: ErrorStats
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantize with ``old`` and requantize to e4m3fn, in row chunks.

    ``new_scale`` (bf16 ``[out,1]`` or ``[1]``) is computed per channel from the dequantized rows when None.
    Returns (codes e4m3fn, new scale bf16).
    """
    out_f, in_f = q.shape
    codes = torch.empty((out_f, in_f), dtype=torch.float8_e4m3fn)
    scales = []
    for r0, r1 in row_chunks(out_f, in_f, old.block[0] if old.block else 1):
        hp = _dequant_rows(q, old_scale, old, r0, r1)
        if new_scale is None:
            s_new = channel_scale(hp)
            scales.append(s_new)
        else:
            s_new = new_scale[r0:r1] if new_scale.numel() > 1 else new_scale.reshape(1, 1)
        codes[r0:r1] = quantize(hp, s_new.to(torch.float32))
        stats.add(hp, codes[r0:r1].to(torch.float32) * s_new.to(torch.float32))
    return codes, (torch.cat(scales) if new_scale is None else new_scale)


def _tensor_scale(q: torch.Tensor, scale: torch.Tensor, scheme: WeightScheme) -> torch.Tensor:
    """One bf16 scale ``[1]`` for the whole dequantized weight: amax / 448 rounded up (1.0 if all zero)."""
    out_f, in_f = q.shape
    amax = max(
        (
            float(_dequant_rows(q, scale, scheme, r0, r1).abs().max())
            for r0, r1 in row_chunks(out_f, in_f, scheme.block[0] if scheme.block else 1)
        ),
        default=0.0,
    )
    return bf16_round_up(torch.tensor([amax / E4M3_MAX if amax > 0 else 1.0]))


def normalize_linear(ql: QuantizedLinear, target: tuple[Granularity, ActScheme]) -> Normalized:
    """Bring one linear to the target scheme with BF16 scales (DESIGN.md 3)."""
    gran, act = target
    actions: list[str] = []
    q, needs_requant = _to_e4m3fn(ql, actions)
    out_f, in_f = q.shape
    src = ql.scheme
    stats = ErrorStats()
    weight_unchanged = q is ql.weight
    lossy = False
    changed = 0
    if ql.weight.dtype == torch.float8_e4m3fnuz:  # by value: values below 2^-6 (fp8 units) may move
        for r0, r1 in row_chunks(out_f, in_f, src.block[0] if src.block else 1):
            stats.add(
                _dequant_rows(ql.weight, ql.weight_scale, src, r0, r1), _dequant_rows(q, ql.weight_scale, src, r0, r1)
            )
        changed, lossy = stats.changed, stats.changed > 0

    if gran is Granularity.TENSOR and src.granularity is not Granularity.TENSOR:
        raise UnsupportedSchemeError(f"{ql.module}: cannot target per-tensor weights from {src.describe()}")
    if src.granularity is Granularity.BLOCK or needs_requant:
        if src.granularity is Granularity.BLOCK:
            actions.append(
                f"{src.describe()} -> channel: dequantized and requantized per channel (amax/448, "
                "scale rounded up to bf16)"
            )
        per_tensor = _tensor_scale(ql.weight, ql.weight_scale, src) if gran is Granularity.TENSOR else None
        q, scale = _requantize(ql.weight, ql.weight_scale, src, per_tensor, stats)
        changed, weight_unchanged, lossy = stats.changed, False, True
        scale = scale.reshape(1) if gran is Granularity.TENSOR else scale.reshape(out_f, 1)
    else:
        s32 = ql.weight_scale.to(torch.float32)
        if is_exact_bf16(s32):
            scale = s32.to(torch.bfloat16)
            if ql.scale_dtype != torch.bfloat16:
                actions.append(f"scale {str(ql.scale_dtype).removeprefix('torch.')} -> bf16 (exact)")
        else:
            scale = bf16_round_up(s32)
            # from the source codes (fnuz ones by value), so the error figures are against the source, once
            stats = ErrorStats()
            q_new, _ = _requantize(
                ql.weight,
                s32,
                src,
                scale.reshape(-1, 1) if src.granularity is Granularity.CHANNEL else scale.reshape(1),
                stats,
            )
            changed = int((q_new.view(torch.uint8) != q.view(torch.uint8)).sum()) + changed
            actions.append(
                f"scale {str(ql.scale_dtype).removeprefix('torch.')} -> bf16 rounded up; "
                f"{changed} fp8 codes requantized"
            )
            q, weight_unchanged, lossy = q_new, weight_unchanged and changed == 0, True
        if gran is Granularity.CHANNEL:
            if src.granularity is Granularity.TENSOR:
                actions.append("per-tensor scale broadcast to per-channel [out,1] (exact)")
            scale = scale.reshape(-1, 1).expand(out_f, 1).contiguous()
        else:
            scale = scale.reshape(1)

    input_scale = None
    if act is not ql.activation:
        verb = "added" if ql.activation is ActScheme.NONE else "changed"
        actions.append(
            f"activations {ql.activation} -> {act}: activation quantization {verb} "
            "(fms-model-optimizer runs no other combination; numerics change)"
        )
    elif act is ActScheme.STATIC_TENSOR:
        assert ql.input_scale is not None
        if is_exact_bf16(ql.input_scale):
            input_scale = ql.input_scale.to(torch.bfloat16).reshape(1)
        else:
            input_scale = bf16_round_up(ql.input_scale).reshape(1)
            rel = float((input_scale.float() - ql.input_scale).abs().max() / ql.input_scale.abs().max())
            actions.append(f"input_scale -> bf16 rounded up (relative change {rel:.2e}; activation numerics change)")
            lossy = True
    if ql.act_upper_bound is not None:
        actions.append(
            f"activation scale upper bound {ql.act_upper_bound} dropped (the AIU path has none; "
            "activation numerics change for tokens whose amax exceeds it)"
        )
        lossy = True
    bias = None
    if ql.bias is not None:
        bias = ql.bias.to(torch.bfloat16)
        if ql.bias.dtype != torch.bfloat16:
            exact = torch.equal(bias.to(ql.bias.dtype), ql.bias)
            actions.append(
                f"bias {str(ql.bias.dtype).removeprefix('torch.')} -> bf16 ({'exact' if exact else 'rounded'})"
            )
            lossy = lossy or not exact
    out = QuantizedLinear(
        module=ql.module,
        weight=q,
        weight_scale=scale,
        activation=act,
        scale_dtype=torch.bfloat16,
        scheme=CHANNEL if gran is Granularity.CHANNEL else TENSOR,
        input_scale=input_scale,
        bias=bias,
    )
    weights_changed = lossy and stats.signal > 0  # SQNR only where weight values were requantized
    return Normalized(
        linear=out,
        weight_unchanged=weight_unchanged,
        actions=actions,
        exact=not lossy and act is ql.activation,
        changed_codes=changed,
        sqnr_db=stats.sqnr_db if weights_changed else None,
        max_rel_error=stats.max_rel if weights_changed else None,
    )


def dequantize_to_bf16(ql: QuantizedLinear) -> tuple[torch.Tensor, dict[str, object]]:
    """A quantized linear kept in full precision (``lm_head``): bf16 ``[out, in]`` plus its report entry."""
    hp = dequantize_linear(ql)
    w = hp.to(torch.bfloat16)
    stats = ErrorStats()
    stats.add(hp, w)
    exact = stats.noise == 0
    return w, {
        "target": "bf16 (dequantized)",
        "exact": exact,
        "actions": [
            "dequantized to bf16 (the AIU stack keeps this layer in full precision)"
            + ("" if exact else "; one bf16 rounding")
        ],
        "changed_codes": 0,
        "sqnr_db": _finite(stats.sqnr_db),
        "max_rel_error": stats.max_rel,
    }


def quantize_unquantized(module: str, weight: torch.Tensor, bias: torch.Tensor | None) -> Normalized:
    """Quantize a full-precision decoder linear per channel (opt-in: ``--quantize-unquantized``)."""
    stats = ErrorStats()
    hp = weight.to(torch.float32)
    scale = channel_scale(hp)
    q = quantize(hp, scale.to(torch.float32))
    stats.add(hp, q.to(torch.float32) * scale.to(torch.float32))
    lin = QuantizedLinear(
        module=module,
        weight=q,
        weight_scale=scale,
        scheme=CHANNEL,
        activation=PRIMARY[1],
        scale_dtype=torch.bfloat16,
        bias=None if bias is None else bias.to(torch.bfloat16),
    )
    return Normalized(
        linear=lin,
        weight_unchanged=False,
        exact=False,
        sqnr_db=stats.sqnr_db,
        max_rel_error=stats.max_rel,
        changed_codes=q.numel(),
        actions=[
            f"{str(weight.dtype).removeprefix('torch.')} linear quantized per channel "
            "(--quantize-unquantized); activations dynamic per-token"
        ],
    )
