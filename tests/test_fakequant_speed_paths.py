"""fp8convert.dequant: the fast weight dequantization and activation fake-quant give the reference formulas' bits.

Exhaustive where it is cheap: every e4m3fn code against every bf16 and fp16 scale, and the activation rounding at
every fp32 rounding boundary. Then FakeQuantLinear on real 8B shapes against the plain formula at atol=0, and the
memory and cache rules (no resident high-precision copy unless ``cache_dequantized``; caches follow the tensors).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from fp8convert import dequant, numerics
from fp8convert.dequant import (
    dequantize_weight,
    dequantize_weight_plain,
    fake_quantize_activation,
    quantize_activation,
    round_to_e4m3,
)
from fp8convert.fakequant import FakeQuantLinear
from fp8convert.spec import ActScheme, Granularity, Numerics

CODES = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
NAN_CODES = (0x7F, 0xFF)
PLAIN = dequantize_weight_plain  # the plain formula, also while no_plain has replaced dequant's own
INT = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(INT[t.dtype])


@pytest.fixture
def no_plain(monkeypatch):
    """Make the plain formula raise inside fp8convert.dequant: proves a result came from the fast path."""

    def refuse(*args, **kwargs):
        raise AssertionError("the fast path was expected, the plain formula ran")

    monkeypatch.setattr(dequant, "dequantize_weight_plain", refuse)


def _all_scales(dtype: torch.dtype) -> torch.Tensor:
    """Every bit pattern of a 16-bit float dtype, ``[65536, 1]``."""
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).reshape(-1, 1)


# ---- weights: every code x every scale -------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_code_times_every_scale_is_bit_exact(dtype, no_plain) -> None:
    """Every non-NaN code x every scale whose shifted copy ``scale * 2**bias`` is finite (|scale| < 2**8: the
    fast path's domain; real weight scales are far below 1) in one call that must not fall back."""
    scales = _all_scales(dtype)
    bias = dequant._LAYOUT[dtype][-1]
    s64 = scales.to(torch.float64).squeeze(1)
    rows = scales[torch.isfinite(s64) & (s64.abs() * 2.0**bias <= torch.finfo(dtype).max)]
    assert rows.numel() == {torch.bfloat16: 2 * 135 * 128, torch.float16: 2 * 23 * 1024}[dtype]
    weight = CODES[[c for c in range(256) if c not in NAN_CODES]].repeat(rows.shape[0], 1)
    got = dequantize_weight(weight, rows, dtype)
    want = (weight.to(dtype) * rows.to(torch.float32)).to(dtype)
    assert torch.equal(_bits(got), _bits(want))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_code_and_scale_through_the_public_function(dtype) -> None:
    """NaN codes, NaN/inf/huge scales: the public function falls back and still gives the formula's bits."""
    scales = _all_scales(dtype)
    weight = CODES.repeat(scales.shape[0], 1)
    got = dequantize_weight(weight, scales, dtype)
    want = dequantize_weight_plain(weight, scales, dtype)
    assert torch.equal(_bits(got), _bits(want))
    finite = scales[torch.isfinite(scales.float()).squeeze(1) & (scales.float().abs() < 8).squeeze(1)]
    weight = CODES.repeat(finite.shape[0], 1)  # NaN codes present: the plain formula, still exact
    assert torch.equal(
        _bits(dequantize_weight(weight, finite, dtype)), _bits(dequantize_weight_plain(weight, finite, dtype))
    )


def test_fp32_target_with_fp32_scales(no_plain) -> None:
    """The fp32 layout (hardware numerics, fp32 scales): every code x fp32 scales of both signs, one for each
    exponent/top-mantissa pattern below 2**7 with random low bits (the products round in fp32 here)."""
    g = torch.Generator().manual_seed(0)
    high = torch.arange(0, 2**15, dtype=torch.int32) << 16  # every positive exponent/top-mantissa pattern
    low = torch.randint(0, 2**16, (2**15,), generator=g, dtype=torch.int32)
    scales = (high | low).view(torch.float32)
    scales = scales[scales < 2**7]
    scales = torch.cat([scales, -scales]).reshape(-1, 1)
    weight = CODES[[c for c in range(256) if c not in NAN_CODES]].repeat(scales.shape[0], 1)
    got = dequantize_weight(weight, scales, torch.float32)
    want = weight.to(torch.float32) * scales
    assert torch.equal(_bits(got), _bits(want))


def test_per_tensor_scale_and_out_buffer(no_plain) -> None:
    weight = CODES[[c for c in range(256) if c not in NAN_CODES]].repeat(300, 3)
    scale = torch.tensor([3.0e-3], dtype=torch.bfloat16)
    out = torch.full(weight.shape, 7.0, dtype=torch.bfloat16)
    got = dequantize_weight(weight, scale, torch.bfloat16, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(_bits(got), _bits((weight.to(torch.bfloat16) * scale.float()).to(torch.bfloat16)))


def test_scales_that_are_not_exact_in_the_target_dtype_fall_back() -> None:
    """An fp32 scale with more than bf16's 8 bits, an overflow after the shift, flushed denormals: plain path."""
    weight = CODES[[c for c in range(256) if c not in NAN_CODES]].repeat(64, 1)
    for scale in (torch.full((64, 1), 1.0 + 2.0**-20), torch.full((64, 1), 300.0, dtype=torch.bfloat16)):
        want = dequantize_weight_plain(weight, scale, torch.bfloat16)
        assert torch.equal(_bits(dequantize_weight(weight, scale, torch.bfloat16)), _bits(want))
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        assert numerics.denormals_flushed()
        scale = torch.full((64, 1), 2.0**-3, dtype=torch.bfloat16)
        want = dequantize_weight_plain(weight, scale, torch.bfloat16)
        assert torch.equal(_bits(dequantize_weight(weight, scale, torch.bfloat16)), _bits(want))
    finally:
        torch.set_flush_denormal(False)
    assert not numerics.denormals_flushed()


def test_a_scale_that_does_not_fit_the_rows_raises() -> None:
    weight = CODES[[c for c in range(256) if c not in NAN_CODES]].repeat(4, 1)
    with pytest.raises(RuntimeError):
        dequantize_weight(weight, torch.ones(8, 1, dtype=torch.bfloat16), torch.bfloat16)


# ---- activations ---------------------------------------------------------------------------------------
def test_round_to_e4m3_at_every_rounding_boundary() -> None:
    """e4m3fn keeps at most fp32 mantissa bits 22..20, so its rounding point (and its ties) always sits in the
    upper 16 bits of an fp32: every upper half x lower halves {0, 1, 0x7FFF, 0x8000, 0xFFFF} covers each tie,
    each value just above and just below one, in every binade and in e4m3fn's subnormal range."""
    high = torch.arange(0, 2**16, dtype=torch.int64) << 16
    low = torch.tensor([0, 1, 0x7FFF, 0x8000, 0xFFFF], dtype=torch.int64)
    y = (high[:, None] | low[None, :]).reshape(-1).to(torch.int64)
    y = torch.where(y >= 2**31, y - 2**32, y).to(torch.int32).view(torch.float32)
    y = y[~(y.abs() > 448)]  # the domain after the clamp, NaN included
    got, want = round_to_e4m3(y.clone()), y.to(torch.float8_e4m3fn).to(torch.float32)
    nan = torch.isnan(want)
    assert bool(nan.any()) and torch.equal(torch.isnan(got), nan)
    assert torch.equal(_bits(got[~nan]), _bits(want[~nan]))  # -0 included


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("act", [ActScheme.DYNAMIC_TOKEN, ActScheme.DYNAMIC_TENSOR, ActScheme.STATIC_TENSOR])
def test_fake_quantize_activation_equals_quantize_activation(dt, act, monkeypatch) -> None:
    """Every finite bf16 value, in 1200 tokens of 256 (several chunks, a partial last one), some of them tiny,
    zero, all negative, or holding a NaN or an inf; the codes' values and the activation fms-mo dequantizes from
    them, ``(q.to(dt) * s).to(dt)``."""
    g = torch.Generator().manual_seed(1)
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).to(torch.float32)
    every = every[torch.isfinite(every)]
    x = torch.cat([every, torch.randn(1200 * 256 - every.numel(), generator=g)]).reshape(100, 12, 256).to(dt)
    monkeypatch.setattr(dequant, "ACT_CHUNK", 256 * 500)  # 500 tokens a chunk: 3 chunks, the last one partial
    x[0, 0] = 0
    x[1, 2, :] *= 1e-30  # a tiny token
    x[2, 3, 5], x[3, 1, 7], x[4, 4, :] = float("nan"), float("-inf"), -x[4, 4, :].abs()  # NaN, inf, all negative
    input_scale = torch.tensor([0.05], dtype=torch.bfloat16) if act is ActScheme.STATIC_TENSOR else None
    values, s = fake_quantize_activation(x, act, input_scale)
    q, s_ref = quantize_activation(x, act, input_scale)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0, equal_nan=True)
    ref = q.reshape(-1, 256).to(torch.float32)
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(values), nan)
    assert torch.equal(_bits(values[~nan]), _bits(ref[~nan]))
    x_dq, _ = fake_quantize_activation(x, act, input_scale, dtype=dt)
    scale = s.reshape(-1, 1) if act is ActScheme.DYNAMIC_TOKEN else s.reshape(())
    want = (q.reshape(-1, 256).to(dt) * scale).to(dt)  # fms-mo's dequantization, verbatim
    assert x_dq.dtype == dt and torch.equal(torch.isnan(x_dq), torch.isnan(want))
    assert torch.equal(_bits(x_dq[~torch.isnan(want)]), _bits(want[~torch.isnan(want)]))


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("act", [ActScheme.DYNAMIC_TOKEN, ActScheme.DYNAMIC_TENSOR])
def test_every_amax_of_a_dynamic_scale(dt, act) -> None:
    """Every positive finite bf16/fp16 value (fp32: one per sign/exponent/top-mantissa pattern, random low bits)
    as a token's amax: the largest |x| * recip, which the fast path does not clamp for bf16 and fp32 inputs."""
    if dt is torch.float32:
        high = torch.arange(1, 2**15 - 2**7, dtype=torch.int32) << 16  # below inf
        low = torch.randint(0, 2**16, high.shape, generator=torch.Generator().manual_seed(3), dtype=torch.int32)
        amax = (high | low).view(torch.float32)
    else:
        amax = torch.arange(1, 2**15, dtype=torch.int32).to(torch.int16).view(dt)
        amax = amax[torch.isfinite(amax)]
    x = torch.stack([amax, -amax, (amax.float() / 3).to(dt), (amax.float() * -0.75).to(dt)], dim=-1)
    if act is ActScheme.DYNAMIC_TENSOR:  # one token per tensor: [n, 1, 4]
        values = torch.cat([fake_quantize_activation(t, act)[0] for t in x[::97].unsqueeze(1)])
        q = torch.cat([quantize_activation(t, act)[0].reshape(-1, 4) for t in x[::97].unsqueeze(1)])
    else:
        values, q = fake_quantize_activation(x, act)[0], quantize_activation(x, act)[0]
    assert torch.equal(_bits(values), _bits(q.to(torch.float32)))


def test_fake_quantize_activation_keeps_the_reference_graph_under_autograd() -> None:
    x = _x((4, 64)).float().requires_grad_(True)
    values, _ = fake_quantize_activation(x, ActScheme.DYNAMIC_TOKEN)
    q, _ = quantize_activation(x.detach(), ActScheme.DYNAMIC_TOKEN)
    assert values.requires_grad and torch.equal(values.detach(), q.to(torch.float32))


# ---- FakeQuantLinear on real shapes vs the plain formula (atol=0) -------------------------------------
def _plain_fallback(m: FakeQuantLinear, x: torch.Tensor) -> torch.Tensor:
    """The formula FakeQuantLinear's fallback implemented before the fast path, verbatim."""
    dt, wd = x.dtype, m.weight_scale.dtype
    q, s = quantize_activation(x, m.activation, m.input_scale)
    k = q.shape[-1]
    scale = s.reshape(()) if m.activation is not ActScheme.DYNAMIC_TOKEN else s.reshape(-1, 1)
    x_dq = (q.reshape(-1, k).to(dt) * scale).to(dt).reshape(x.shape)
    s_rows = m.weight_scale.to(torch.float32)
    s_rows = s_rows.reshape(-1, 1) if m.weight_granularity is Granularity.CHANNEL else s_rows.reshape(1, 1)
    w = (m.weight.to(wd) * s_rows).to(wd)
    bias = None if m.bias is None else m.bias.to(wd)
    return F.linear(x_dq.to(wd), w, bias).to(dt)


def _layer(k: int, n: int, *, bias: bool, gran=Granularity.CHANNEL, act=ActScheme.DYNAMIC_TOKEN, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    m = FakeQuantLinear(k, n, bias=bias, weight_granularity=gran, activation=act, **kw)
    m.weight = (torch.randn(n, k, generator=g) * 80).clamp(-448, 448).to(torch.float8_e4m3fn)
    shape = (n, 1) if gran is Granularity.CHANNEL else (1,)
    m.weight_scale = (torch.rand(shape, generator=g) * 2e-3 + 1e-5).to(m.weight_scale.dtype)
    if bias:
        m.bias = torch.randn(n, generator=g).to(m.weight_scale.dtype)
    if act is ActScheme.STATIC_TENSOR:
        m.input_scale = torch.tensor([0.02], dtype=m.weight_scale.dtype)
    return m


def _x(shape, seed=1, dtype=torch.bfloat16) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    x.view(-1, shape[-1])[0, :7] *= 50  # an outlier token
    return x.to(dtype)


REAL = [(4096, 4096), (4096, 14336), (14336, 4096)]


@pytest.fixture(scope="module")
def real_layers():
    """Llama-3-8B-shaped layers, built once per shape, with their plain-formula bf16 weights."""
    built: dict[tuple[int, int], tuple[FakeQuantLinear, torch.Tensor]] = {}
    yield built
    built.clear()


@pytest.mark.parametrize(("k", "n"), REAL)
@pytest.mark.parametrize("m_tokens", [1, 16, 512])
def test_real_shapes_equal_plain_formula(k, n, m_tokens, real_layers, no_plain) -> None:
    if (k, n) not in real_layers:
        layer = _layer(k, n, bias=False)
        real_layers[(k, n)] = layer, PLAIN(layer.weight, layer.weight_scale, torch.bfloat16)
    layer, w_plain = real_layers[(k, n)]
    x = _x((m_tokens, k))
    with torch.inference_mode():
        got = layer(x)
    q, s = quantize_activation(x, ActScheme.DYNAMIC_TOKEN)
    x_dq = (q.to(torch.bfloat16) * s).to(torch.bfloat16)  # the plain formula, as _plain_fallback
    assert torch.equal(got, F.linear(x_dq, w_plain))


CASES = list(
    itertools.product(
        # (K, N): odd N, N not a multiple of 64, one output; odd K x odd N, in one chunk and in several
        [(1000, 777), (512, 1), (96, 64), (3000, 4099), (777, 333), (4097, 301)],
        [(1,), (3, 5), (2, 1, 7)],  # token dims before K: 2-D and 3-D inputs
        [False, True],
        [
            (Granularity.CHANNEL, ActScheme.DYNAMIC_TOKEN),
            (Granularity.TENSOR, ActScheme.DYNAMIC_TENSOR),
            (Granularity.TENSOR, ActScheme.STATIC_TENSOR),
        ],
    )
)


@pytest.mark.parametrize(("kn", "lead", "bias", "scheme"), CASES)
def test_shapes_schemes_bias_equal_plain_formula(kn, lead, bias, scheme, no_plain, monkeypatch) -> None:
    """Small chunks (an odd number of rows, elements, tokens each), so every layer and input spans several."""
    monkeypatch.setattr(dequant, "CHUNK", 9999)
    monkeypatch.setattr(dequant, "ACT_CHUNK", 2999)
    k, n = kn
    layer = _layer(k, n, bias=bias, gran=scheme[0], act=scheme[1])
    x = _x((*lead, k))
    assert torch.equal(layer(x), _plain_fallback(layer, x))


@pytest.mark.parametrize(("xd", "wd"), [(torch.float16, torch.float16), (torch.bfloat16, torch.float32)])
def test_other_dtypes_equal_plain_formula(xd, wd) -> None:
    """fp16 everywhere (the AIU's activation dtype) takes the fp16 layout; fp32 scales take the fp32 layout."""
    layer = _layer(2048, 1536, bias=True, scale_dtype=wd)
    x = _x((9, 2048), dtype=xd)
    assert torch.equal(layer(x), _plain_fallback(layer, x))


def test_nan_codes_and_large_scales_take_the_plain_formula() -> None:
    layer = _layer(256, 128, bias=True)
    layer.weight.view(torch.uint8)[3, 5] = 0x7F
    x = _x((4, 256))
    got, want = layer(x), _plain_fallback(layer, x)
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and bool(torch.isnan(got[:, 3]).all())
    assert torch.equal(got[:, torch.arange(128) != 3], want[:, torch.arange(128) != 3])
    layer = _layer(256, 128, bias=False)
    layer.weight_scale = torch.full((128, 1), 512.0, dtype=torch.bfloat16)
    assert torch.equal(layer(x), _plain_fallback(layer, x))


@pytest.mark.parametrize("numerics", [Numerics.FMS_MO, Numerics.HARDWARE])
def test_other_numerics_use_the_fast_path_too(numerics, no_plain) -> None:
    """fms-mo and hardware numerics on the fast path: equal to the same module with the plain formula forced."""
    layer = _layer(1024, 768, bias=True, numerics=numerics)
    x = _x((2, 3, 1024))
    got = layer(x)
    plain = PLAIN
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dequant, "_LAYOUT", {})  # no layout: every dequantization takes the plain formula
        mp.setattr(dequant, "dequantize_weight_plain", plain)
        want = layer(x)
    assert torch.equal(got, want)


# ---- memory and caches ---------------------------------------------------------------------------------
def test_no_resident_high_precision_copy_and_one_shared_workspace() -> None:
    dequant.release_workspaces()
    a, b = _layer(1024, 3072, bias=False), _layer(3072, 1024, bias=False, seed=2)
    a(_x((4, 1024))), b(_x((4, 3072)))
    for layer in (a, b):
        assert layer._state.cache is None
        assert {t.dtype for t in layer.buffers()} == {torch.float8_e4m3fn, torch.bfloat16}
        assert sum(t.nbytes for t in layer.buffers()) <= 1.01 * layer.weight.nbytes
        big = [v for v in vars(layer).values() if isinstance(v, torch.Tensor) and v.numel() >= layer.weight.numel()]
        assert not big
    pool = dequant._local.pool
    assert pool[("weight", torch.bfloat16)].numel() == 1024 * 3072  # one buffer, the largest layer's size


def test_workspace_made_in_inference_mode_works_outside_it() -> None:
    dequant.release_workspaces()
    layer, x = _layer(256, 64, bias=True), _x((3, 256))
    with torch.inference_mode():
        inside = layer(x)
    assert torch.equal(layer(x), inside) and torch.equal(inside, _plain_fallback(layer, x))


def test_workspace_is_not_reused_under_autograd() -> None:
    layer = _layer(256, 64, bias=False)
    x = _x((3, 256))
    shared = layer._weight_for(torch.bfloat16, x)
    assert shared.data_ptr() == dequant.workspace(1, torch.bfloat16).data_ptr()
    own = layer._weight_for(torch.bfloat16, x.clone().requires_grad_(True))
    assert own.data_ptr() != shared.data_ptr() and torch.equal(own, shared)


def test_caches_follow_the_tensors() -> None:
    layer = _layer(512, 256, bias=True, cache_dequantized=True)
    x = _x((5, 512))
    first = layer(x)
    assert layer._state.cache is not None and layer._state.nan_free is True
    new = _layer(512, 256, bias=True, seed=7)
    layer.weight = new.weight.clone()  # assignment
    assert torch.equal(layer(x), _plain_fallback(layer, x)) and not torch.equal(layer(x), first)
    layer.weight.view(torch.uint8)[0].copy_(torch.tensor(0x7F, dtype=torch.uint8))  # in place, a NaN code
    assert bool(torch.isnan(layer(x)[:, 0]).all()) and layer._state.nan_free is False
    layer.weight_scale.mul_(2)  # in-place scale change
    want = _plain_fallback(layer, x)
    assert torch.equal(layer(x)[:, 1:], want[:, 1:])
    layer.load_state_dict(new.state_dict())  # load
    assert layer._state.cache is None
    assert torch.equal(layer(x), _plain_fallback(new, x))
    assert layer._state.cache is not None and layer._state.cache[1].dtype == torch.bfloat16
