"""fp8convert.normalize: canonical linears -> the AIU target (bf16 scales, channel or tensor), on hand-built
QuantizedLinear objects. Exact paths are checked with torch.equal / atol=0; lossy ones against the bound of one
e4m3 rounding (tolerances.py)."""

from __future__ import annotations

import math

import pytest
import torch

from fp8convert import numerics
from fp8convert.errors import UnsupportedSchemeError
from fp8convert.normalize import choose_target, dequantize_to_bf16, normalize_linear, quantize_unquantized
from fp8convert.numerics import E4M3_MAX, bf16_round_up, dequantize, dequantize_linear
from fp8convert.spec import ActScheme, Granularity, LinearPlan, QuantizedLinear, TensorRef, WeightScheme

from tolerances import BF16_REL, E4M3_REL, REQUANT_SQNR_FLOOR_DB

TENSOR = WeightScheme(granularity=Granularity.TENSOR)
CHANNEL = WeightScheme(granularity=Granularity.CHANNEL)
BLOCK = WeightScheme(granularity=Granularity.BLOCK, block=(128, 128))
PRIMARY = (Granularity.CHANNEL, ActScheme.DYNAMIC_TOKEN)
E4M3_HALF_SUBNORMAL = 2.0**-10  # half of the smallest e4m3 step 2^-9, in fp8 units
FP32_SLACK = 2.0**-22  # the fp32 division before the e4m3 cast rounds once (2^-24 relative); generous margin


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _codes(out_f: int, in_f: int, seed: int) -> torch.Tensor:
    g = _gen(seed)
    spread = torch.pow(2.0, torch.randint(-8, 2, (out_f, 1), generator=g).float())  # some rows reach subnormals
    return (torch.randn(out_f, in_f, generator=g) * 120 * spread).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def _ql(weight, scale, scheme=CHANNEL, act=ActScheme.DYNAMIC_TOKEN, **kw) -> QuantizedLinear:
    kw.setdefault("scale_dtype", scale.dtype)
    return QuantizedLinear(module="layer.proj", weight=weight, weight_scale=scale, scheme=scheme, activation=act, **kw)


def _bf16_scale(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return (torch.rand(shape, generator=_gen(seed)) * 0.02 + 1e-4).to(torch.bfloat16)


def _u8(w: torch.Tensor) -> torch.Tensor:
    return w.view(torch.uint8)


def _assert_one_rounding(new: torch.Tensor, old: torch.Tensor, new_scale: torch.Tensor) -> None:
    """|new - old| <= 2^-4 |old| + 2^-10 * new_scale (per row), elementwise, in fp64."""
    new64, old64 = new.to(torch.float64), old.to(torch.float64)
    bound = (E4M3_REL + FP32_SLACK) * old64.abs() + E4M3_HALF_SUBNORMAL * new_scale.to(torch.float64)
    assert bool(((new64 - old64).abs() <= bound).all())


# ---- exact paths ------------------------------------------------------------------------------------
def test_channel_bf16_dynamic_token_is_kept_unchanged() -> None:
    w, s = _codes(48, 64, 1), _bf16_scale((48, 1), 2)
    n = normalize_linear(_ql(w, s), PRIMARY)
    assert n.weight_unchanged and n.exact and n.actions == [] and n.changed_codes == 0 and n.sqnr_db is None
    assert torch.equal(_u8(n.linear.weight), _u8(w))
    assert n.linear.weight_scale.dtype == torch.bfloat16 and n.linear.weight_scale.shape == (48, 1)
    assert torch.equal(n.linear.weight_scale, s)
    assert n.linear.scheme == CHANNEL and n.linear.activation is ActScheme.DYNAMIC_TOKEN
    assert n.record()["actions"] == ["kept"] and n.record()["exact"] is True


def test_channel_scale_stored_1d_is_the_same() -> None:
    w, s = _codes(48, 64, 1), _bf16_scale((48, 1), 2)
    a, b = normalize_linear(_ql(w, s), PRIMARY), normalize_linear(_ql(w, s.reshape(48)), PRIMARY)
    assert b.exact and b.weight_unchanged and b.linear.weight_scale.shape == (48, 1)
    assert torch.equal(a.linear.weight_scale, b.linear.weight_scale)
    assert torch.equal(_u8(a.linear.weight), _u8(b.linear.weight))


def test_per_tensor_scale_broadcast_to_channel_is_exact() -> None:
    w, s = _codes(40, 72, 3), torch.tensor([0.0068359375], dtype=torch.bfloat16)
    src = _ql(w, s, TENSOR)
    n = normalize_linear(src, PRIMARY)
    assert n.exact and n.weight_unchanged and any("broadcast" in a for a in n.actions)
    assert n.linear.weight_scale.shape == (40, 1) and n.linear.weight_scale.dtype == torch.bfloat16
    torch.testing.assert_close(dequantize_linear(n.linear), dequantize_linear(src), atol=0, rtol=0)


def test_per_tensor_target_keeps_tensor_scale() -> None:
    w, s = _codes(16, 32, 4), torch.tensor([0.5], dtype=torch.bfloat16)
    n = normalize_linear(_ql(w, s, TENSOR, ActScheme.DYNAMIC_TENSOR), (Granularity.TENSOR, ActScheme.DYNAMIC_TENSOR))
    assert n.exact and n.linear.weight_scale.shape == (1,) and n.linear.scheme == TENSOR
    with pytest.raises(UnsupportedSchemeError):
        normalize_linear(_ql(w, _bf16_scale((16, 1), 5)), (Granularity.TENSOR, ActScheme.DYNAMIC_TENSOR))


def test_f32_scale_exactly_bf16_is_cast() -> None:
    w, s = _codes(32, 48, 5), _bf16_scale((32, 1), 6).float()
    n = normalize_linear(_ql(w, s), PRIMARY)
    assert n.exact and n.weight_unchanged and n.actions == ["scale float32 -> bf16 (exact)"]
    assert n.linear.weight_scale.dtype == torch.bfloat16 and torch.equal(n.linear.weight_scale.float(), s)
    assert torch.equal(_u8(n.linear.weight), _u8(w))


# ---- scale rounded up ------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", [CHANNEL, TENSOR])
def test_f32_scale_not_bf16_is_rounded_up(scheme: WeightScheme) -> None:
    w = _codes(64, 96, 7)
    s = torch.rand(scheme.scale_shape(64, 96), generator=_gen(8)) * 0.01 + 1e-4  # fp32, not bf16-representable
    assert not numerics.is_exact_bf16(s)
    src = _ql(w, s, scheme)
    n = normalize_linear(src, PRIMARY)
    new_s = n.linear.weight_scale
    assert new_s.dtype == torch.bfloat16 and new_s.shape == (64, 1)
    assert bool((new_s.float() >= s.reshape(-1, 1)).all())
    assert not n.exact and n.sqnr_db is not None and n.sqnr_db >= REQUANT_SQNR_FLOOR_DB
    old, new = dequantize_linear(src), dequantize_linear(n.linear)
    _assert_one_rounding(new, old, new_s.float())
    differing = int((_u8(n.linear.weight) != _u8(w)).sum())
    assert n.changed_codes == differing
    # Rounding a scale up by less than one bf16 ulp (2^-7) moves q * s / s' by less than half an e4m3 step, so
    # no code can change: the requantization reproduces the source codes and the bytes may be copied.
    assert differing == 0 and n.weight_unchanged
    assert "rounded up" in n.actions[0] and f"{differing} fp8 codes requantized" in n.actions[0]
    assert n.max_rel_error is not None and 0 < n.max_rel_error <= 2.0**-7


# ---- block -> channel ------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(200, 320), (256, 256)])
def test_block_to_channel(shape: tuple[int, int]) -> None:
    out_f, in_f = shape
    w, s = _codes(out_f, in_f, 9), _bf16_scale(BLOCK.scale_shape(out_f, in_f), 10) * 4
    src = _ql(w, s, BLOCK)
    n = normalize_linear(src, PRIMARY)
    new_s = n.linear.weight_scale
    assert new_s.dtype == torch.bfloat16 and new_s.shape == (out_f, 1)
    assert n.linear.scheme == CHANNEL and n.linear.weight.dtype == torch.float8_e4m3fn
    old = dequantize(w, s, BLOCK)
    row_amax = old.abs().amax(dim=1, keepdim=True) / E4M3_MAX
    assert bool((new_s.float() >= row_amax).all())  # nothing clips
    assert bool(((new_s.view(torch.int16) - 1).view(torch.bfloat16).float() < row_amax).all())  # smallest such
    new = dequantize_linear(n.linear)
    _assert_one_rounding(new, old, new_s.float())
    assert not n.exact and not n.weight_unchanged and n.changed_codes > 0
    assert n.sqnr_db is not None and n.sqnr_db >= REQUANT_SQNR_FLOOR_DB
    # per-row fp32 norms (thread-count independent) vs an fp64 sum: 1e-6 relative in S/N, ~4e-6 dB
    assert abs(n.sqnr_db - numerics.sqnr_db(old, new)) <= 1e-5
    assert n.max_rel_error is not None and 0 < n.max_rel_error <= E4M3_REL + 2.0**-16
    assert "block 128x128 -> channel" in n.actions[0]


def test_block_requantization_is_the_same_in_row_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    w, s = _codes(300, 320, 11), _bf16_scale(BLOCK.scale_shape(300, 320), 12)
    whole = normalize_linear(_ql(w, s, BLOCK), PRIMARY)
    monkeypatch.setattr(numerics, "CHUNK_ELEMENTS", 64 * 320)  # -> 128-row chunks (block-aligned)
    chunked = normalize_linear(_ql(w, s, BLOCK), PRIMARY)
    assert torch.equal(_u8(whole.linear.weight), _u8(chunked.linear.weight))
    assert torch.equal(whole.linear.weight_scale, chunked.linear.weight_scale)
    assert whole.changed_codes == chunked.changed_codes and whole.max_rel_error == chunked.max_rel_error
    assert math.isclose(whole.sqnr_db, chunked.sqnr_db, rel_tol=1e-12)


# ---- other fp8 dtypes ------------------------------------------------------------------------------
def _all_fnuz_codes() -> torch.Tensor:
    c = torch.arange(256, dtype=torch.uint8)
    return c[c != 0x80].reshape(15, 17).view(torch.float8_e4m3fnuz)  # the 255 finite codes


def test_e4m3fnuz_converted_by_value() -> None:
    w = _all_fnuz_codes()
    n = normalize_linear(_ql(w, _bf16_scale((15, 1), 13)), PRIMARY)
    new, old = n.linear.weight, w.float()
    assert new.dtype == torch.float8_e4m3fn and not n.weight_unchanged
    assert numerics.fp8_nan_count(new) == 0
    big = old.abs() >= 2.0**-6
    assert torch.equal(new.float()[big], old[big])  # includes +-240, which as bits would be e4m3fn NaN
    assert int((new.float() == old).sum()) == 239  # NUMERICS.md: 16 codes below 2^-6 move
    assert float((new.float() - old).abs().max()) <= 2.0**-10
    assert any("e4m3fnuz" in a for a in n.actions)


def test_e4m3fnuz_lossy_conversion_is_reported() -> None:
    n = normalize_linear(_ql(_all_fnuz_codes(), torch.ones(15, 1, dtype=torch.bfloat16)), PRIMARY)
    assert not n.exact and n.changed_codes == 16


def test_e5m2_per_tensor_target_keeps_tensor_scale_shape() -> None:
    w = (torch.randn(8, 16, generator=_gen(14)) * 100).to(torch.float8_e5m2)
    src = _ql(w, torch.tensor([0.5]), TENSOR, ActScheme.DYNAMIC_TENSOR)
    n = normalize_linear(src, (Granularity.TENSOR, ActScheme.DYNAMIC_TENSOR))
    assert n.linear.scheme == TENSOR and n.linear.weight_scale.shape == (1,)


# ---- activations, input scale, bias ----------------------------------------------------------------
def test_static_tensor_activation_changed_to_dynamic_token() -> None:
    w, s = _codes(16, 32, 15), _bf16_scale((16, 1), 16)
    n = normalize_linear(_ql(w, s, act=ActScheme.STATIC_TENSOR, input_scale=torch.tensor([0.25])), PRIMARY)
    assert not n.exact and n.weight_unchanged and n.linear.input_scale is None
    assert n.linear.activation is ActScheme.DYNAMIC_TOKEN
    assert any("static-tensor -> dynamic-token" in a and "numerics change" in a for a in n.actions)


def test_weight_only_gets_dynamic_token_activations() -> None:
    n = normalize_linear(_ql(_codes(16, 32, 17), _bf16_scale((16, 1), 18), act=ActScheme.NONE), PRIMARY)
    assert not n.exact and n.linear.activation is ActScheme.DYNAMIC_TOKEN
    assert any("added" in a for a in n.actions)


def test_static_tensor_target_keeps_input_scale() -> None:
    target = (Granularity.TENSOR, ActScheme.STATIC_TENSOR)
    w, s = _codes(16, 32, 19), torch.tensor([0.125], dtype=torch.bfloat16)
    n = normalize_linear(_ql(w, s, TENSOR, ActScheme.STATIC_TENSOR, input_scale=torch.tensor([0.03125])), target)
    assert n.exact and n.linear.input_scale.dtype == torch.bfloat16 and n.linear.input_scale.shape == (1,)
    assert n.linear.input_scale.item() == 0.03125
    odd = torch.tensor([0.0301])  # not bf16-representable
    n = normalize_linear(_ql(w, s, TENSOR, ActScheme.STATIC_TENSOR, input_scale=odd), target)
    got = n.linear.input_scale
    assert got.dtype == torch.bfloat16 and got.shape == (1,) and got.float().item() > odd.item()
    assert (got.view(torch.int16) - 1).view(torch.bfloat16).float().item() < odd.item()
    assert not n.exact and any("input_scale" in a and "rounded up" in a for a in n.actions)


def test_bias_f32_to_bf16() -> None:
    w, s = _codes(16, 32, 20), _bf16_scale((16, 1), 21)
    exact_bias = torch.randn(16, generator=_gen(22)).to(torch.bfloat16).float()
    n = normalize_linear(_ql(w, s, bias=exact_bias), PRIMARY)
    assert n.exact and n.linear.bias.dtype == torch.bfloat16 and torch.equal(n.linear.bias.float(), exact_bias)
    assert "bias float32 -> bf16 (exact)" in n.actions
    odd_bias = torch.randn(16, generator=_gen(23))
    n = normalize_linear(_ql(w, s, bias=odd_bias), PRIMARY)
    assert not n.exact and "bias float32 -> bf16 (rounded)" in n.actions
    assert torch.equal(n.linear.bias, odd_bias.to(torch.bfloat16))


# ---- choose_target ---------------------------------------------------------------------------------
def _plan(name: str, gran: Granularity, act: ActScheme) -> LinearPlan:
    scheme = BLOCK if gran is Granularity.BLOCK else WeightScheme(granularity=gran)

    def ref(key: str, dtype: torch.dtype, shape: tuple[int, ...]) -> TensorRef:
        return TensorRef(key=key, file="model.safetensors", dtype=dtype, shape=shape, nbytes=0)

    return LinearPlan(
        module=name,
        weight=ref(f"{name}.weight", torch.float8_e4m3fn, (256, 256)),
        weight_scale=ref(f"{name}.weight_scale", torch.float32, scheme.scale_shape(256, 256)),
        scheme=scheme,
        activation=act,
    )


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        ([("tensor", "static-tensor")] * 3, ("tensor", "static-tensor")),
        ([("tensor", "dynamic-tensor")] * 2, ("tensor", "dynamic-tensor")),
        ([("tensor", "static-tensor"), ("tensor", "dynamic-tensor")], PRIMARY),
        ([("tensor", "static-tensor"), ("channel", "dynamic-token")], PRIMARY),
        ([("channel", "dynamic-token")] * 2, PRIMARY),
        ([("channel", "static-tensor")], PRIMARY),
        ([("tensor", "dynamic-token")], PRIMARY),
        ([("tensor", "none")], PRIMARY),
        ([("block", "dynamic-group")], PRIMARY),
        ([], PRIMARY),
    ],
)
def test_choose_target(pairs: list[tuple[str, str]], expected: tuple[str, str]) -> None:
    plans = [_plan(f"m{i}", Granularity(g), ActScheme(a)) for i, (g, a) in enumerate(pairs)]
    assert choose_target(plans) == (Granularity(expected[0]), ActScheme(expected[1]))


# ---- full precision in and out ---------------------------------------------------------------------
def test_dequantize_to_bf16() -> None:
    w = _codes(32, 48, 24)
    src = _ql(w, torch.rand(32, 1, generator=_gen(25)) * 0.01 + 1e-3)
    hp = dequantize_linear(src)
    bf, rec = dequantize_to_bf16(src)
    assert bf.dtype == torch.bfloat16 and bf.shape == (32, 48)
    assert bool(((bf.float() - hp).abs() <= BF16_REL * hp.abs()).all())
    assert rec["exact"] is False and "one bf16 rounding" in rec["actions"][0]
    assert rec["sqnr_db"] >= 20 * math.log10(1 / BF16_REL) and rec["max_rel_error"] <= BF16_REL
    pow2 = _ql(w, torch.full((32, 1), 2.0**-5))  # fp8 * 2^k is exact in bf16
    bf2, rec2 = dequantize_to_bf16(pow2)
    assert rec2["exact"] is True and rec2["sqnr_db"] == "inf" and torch.equal(bf2.float(), dequantize_linear(pow2))


def test_quantize_unquantized() -> None:
    weight = (torch.randn(40, 80, generator=_gen(26)) * 0.05).to(torch.bfloat16)
    weight[3] = 0
    bias = torch.randn(40, generator=_gen(27))
    n = quantize_unquantized("layer.proj", weight, bias)
    lin = n.linear
    assert lin.weight.dtype == torch.float8_e4m3fn and lin.weight.shape == (40, 80)
    assert lin.weight_scale.dtype == torch.bfloat16 and lin.weight_scale.shape == (40, 1)
    assert lin.scheme == CHANNEL and lin.activation is ActScheme.DYNAMIC_TOKEN and lin.bias.dtype == torch.bfloat16
    assert lin.weight_scale[3].item() == 1.0 and torch.equal(lin.weight[3].float(), torch.zeros(80))
    _assert_one_rounding(dequantize_linear(lin), weight.float(), lin.weight_scale.float())
    assert not n.exact and n.changed_codes == 40 * 80
    assert n.sqnr_db >= REQUANT_SQNR_FLOOR_DB and n.max_rel_error <= E4M3_REL + 2.0**-16
    expected_scale = bf16_round_up(weight.float().abs().amax(1, keepdim=True) / E4M3_MAX)
    expected_scale[3] = 1.0
    assert torch.equal(lin.weight_scale, expected_scale)


def test_activation_upper_bound_dropped_is_reported() -> None:
    import dataclasses

    w = (torch.randn(8, 16, generator=_gen(21)) * 10).to(torch.float8_e4m3fn)
    src = dataclasses.replace(_ql(w, torch.full((8, 1), 0.01, dtype=torch.bfloat16)), act_upper_bound=1200.0)
    n = normalize_linear(src, PRIMARY)
    assert not n.exact and n.sqnr_db is None and n.weight_unchanged
    assert any("upper bound 1200.0 dropped" in a for a in n.actions)


def test_fnuz_with_f32_scale_reports_error_against_the_source_once() -> None:
    w = _all_fnuz_codes()
    scale = torch.full((w.shape[0], 1), 0.0123457, dtype=torch.float32)  # not a bf16 value
    n = normalize_linear(_ql(w, scale), PRIMARY)
    hp = w.float() * scale
    got = n.linear.weight.float() * n.linear.weight_scale.float()
    noise = float((got.double() - hp.double()).pow(2).sum())
    assert n.sqnr_db == pytest.approx(10 * math.log10(float(hp.double().pow(2).sum()) / noise), abs=1e-5)
    assert n.changed_codes >= 16 and not n.exact


@pytest.mark.parametrize("scheme", [TENSOR, CHANNEL, BLOCK])
def test_row_amax_from_the_codes_equals_the_dequantized_amax(scheme: WeightScheme) -> None:
    from fp8convert.numerics import dequant_rows, row_amax

    w = _codes(256, 384, 30)
    s = torch.rand(scheme.scale_shape(256, 384), generator=_gen(31)) * 0.01 + 1e-4  # fp32: products round
    for r0, r1 in ((0, 256), (128, 256)):
        got = row_amax(w[r0:r1], s, scheme, r0)
        assert torch.equal(got, dequant_rows(w[r0:r1], s, scheme, r0).abs().amax(dim=1, keepdim=True))
    assert row_amax(w[:100], s, BLOCK, 0) is None if scheme == BLOCK else True  # partial tiles: the caller's amax
