"""fp8convert.fakequant: FakeQuantLinear against the fms-mo 0.8.2-0.8.7 CPU reference (bit for bit), the PR #200
fallback, the fp32-accumulation "hardware" numerics, activation quantization, caching and module swapping."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fp8convert.errors import CheckpointError
from fp8convert.fakequant import FakeQuantLinear, quantize_activation, swap_linears
from fp8convert.spec import ActScheme, Granularity, Numerics

from tolerances import bf16_ulp

CH, TE = Granularity.CHANNEL, Granularity.TENSOR
TOKEN, DYN_T, STATIC = ActScheme.DYNAMIC_TOKEN, ActScheme.DYNAMIC_TENSOR, ActScheme.STATIC_TENSOR
SCHEMES = [(CH, TOKEN), (TE, DYN_T), (TE, STATIC)]
SHAPES = [((3, 7, 64), 96), ((5, 256), 384)]
DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ---- test-local reference: AIU_TARGET.md "CPU fallback semantics, bit-exact" (copied verbatim) ---------
def fp8_linear_cpu_ref(x, w, ws, bias=None, w_strategy="channel", a_strategy="token", a_dynamic=True, input_scale=None):
    dt = x.dtype
    # 1) activation scale: amax in dt, /448 in dt (=> dt-rounded scale), clamp eps, to fp32
    if a_dynamic:
        if a_strategy == "tensor":
            xa = x.reshape(-1)
            mn, mx = xa.amin(0), xa.amax(0)
        else:  # "token" (fms-mo treats every non-"tensor" strategy as per-row)
            mn, mx = x.amin(-1), x.amax(-1)
        amax = torch.max(-torch.min(mn, torch.zeros_like(mn)), torch.max(mx, torch.zeros_like(mx)))
        s = torch.clamp(amax / 448.0, min=torch.finfo(torch.float32).eps).to(torch.float32)
    else:  # static per-tensor
        s = input_scale.squeeze().to(torch.float32)
    s = s.unsqueeze(-1) if (a_dynamic and a_strategy != "tensor") else s.reshape([1] * x.dim())
    # 2) quantize: fp32 multiply by reciprocal, clamp, RNE cast
    q = torch.clamp(x * s.reciprocal(), -448.0, 448.0).to(torch.float8_e4m3fn)
    # 3) dequantize activation and weight into dt (one rounding each)
    K, N = x.shape[-1], w.shape[0]
    x_dq = (q.reshape(-1, K).to(dt) * (s.reshape(()) if w_strategy == "tensor" else s.reshape(-1, 1))).to(dt)
    wsf = ws.squeeze().to(torch.float32)
    w_dq_t = (w.T.to(dt) * (wsf if w_strategy == "tensor" else wsf.unsqueeze(-1).T)).to(dt)  # [K,N] column-major view
    # 4) matmul (+bias) in dt; fp32 with bias adds the bias after the mm (torchao)
    if bias is None:
        out = torch.mm(x_dq, w_dq_t)
    elif dt == torch.float32:
        out = torch.mm(x_dq, w_dq_t)
        out += bias
    else:
        out = torch.addmm(bias.to(dt), x_dq, w_dq_t)
    return out.reshape(*x.shape[:-1], N)  # dtype dt


def fp8_linear_pr200_ref(x, w, ws, bias=None, *, x_scale_rows, **kwargs):
    """The PR #200 variant of the same section: same x_dq, weight dequantized into ws.dtype, F.linear there."""
    dt, k = x.dtype, x.shape[-1]
    q, s = quantize_activation(x, kwargs["act"], kwargs["input_scale"])
    x_dq = (q.reshape(-1, k).to(dt) * (s.reshape(-1, 1) if x_scale_rows else s.reshape(()))).to(dt).reshape(x.shape)
    w_dq = (w.to(ws.dtype) * ws.float().reshape(-1, 1)).to(ws.dtype)
    return F.linear(x_dq.to(ws.dtype), w_dq, bias).to(dt)


def _ref(case: dict) -> torch.Tensor:
    gran, act = case["scheme"]
    strategy = "channel" if gran is CH else "tensor"
    return fp8_linear_cpu_ref(
        case["x"],
        case["w"],
        case["ws"],
        case["bias"],
        w_strategy=strategy,
        a_strategy="token" if act is TOKEN else "tensor",
        a_dynamic=act is not STATIC,
        input_scale=case["input_scale"],
    )


# ---- cases -------------------------------------------------------------------------------------------
def _case(scheme, x_shape, n, x_dtype, ws_dtype, with_bias, seed=0) -> dict:
    """Seeded weights/scales/activations; the input has an all-zero token and outlier tokens and channels."""
    g = torch.Generator().manual_seed(seed)
    gran, act = scheme
    k = x_shape[-1]
    w = (torch.randn(n, k, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    ws_shape = (n, 1) if gran is CH else (1,)
    ws = (torch.rand(ws_shape, generator=g) * 0.01 + 1e-4).to(ws_dtype)
    x = torch.randn(x_shape, generator=g)
    flat = x.view(-1, k)
    flat[0] = 0.0  # all-zero token
    flat[1] *= 300.0  # outlier token
    flat[:, 3] *= 40.0  # outlier channel
    bias = (torch.randn(n, generator=g) * 0.5).to(ws_dtype) if with_bias else None
    input_scale = torch.tensor([flat.abs().max() / 448 / 8]).to(ws_dtype) if act is STATIC else None  # clips
    return {"scheme": scheme, "x": x.to(x_dtype), "w": w, "ws": ws, "bias": bias, "input_scale": input_scale}


def _module(case: dict, numerics: Numerics, cache: bool = False) -> FakeQuantLinear:
    gran, act = case["scheme"]
    n, k = case["w"].shape
    m = FakeQuantLinear(
        k,
        n,
        bias=case["bias"] is not None,
        weight_granularity=gran,
        activation=act,
        numerics=numerics,
        scale_dtype=case["ws"].dtype,
        cache_dequantized=cache,
    )
    m.weight, m.weight_scale = case["w"], case["ws"]
    if case["bias"] is not None:
        m.bias = case["bias"]
    if case["input_scale"] is not None:
        m.input_scale = case["input_scale"]
    return m


ALL = list(itertools.product(SCHEMES, SHAPES, ["bf16", "fp16", "fp32"], ["bf16", "fp32"], [False, True]))


@pytest.mark.parametrize(("scheme", "shape", "xd", "wd", "with_bias"), ALL)
def test_fms_mo_numerics_equal_reference_bit_for_bit(scheme, shape, xd, wd, with_bias) -> None:
    case = _case(scheme, shape[0], shape[1], DT[xd], DT[wd], with_bias)
    got = _module(case, Numerics.FMS_MO)(case["x"])
    want = _ref(case)
    assert got.dtype == DT[xd] and got.shape == (*shape[0][:-1], shape[1])
    assert torch.equal(got, want)


def test_fms_mo_all_zero_input_gives_bias() -> None:
    case = _case((CH, TOKEN), (4, 64), 96, torch.bfloat16, torch.bfloat16, True)
    case["x"] = torch.zeros(4, 64, dtype=torch.bfloat16)
    got = _module(case, Numerics.FMS_MO)(case["x"])
    assert torch.equal(got, _ref(case)) and torch.equal(got, case["bias"].expand(4, 96))


@pytest.mark.parametrize(
    ("scheme", "shape", "xd", "with_bias"), itertools.product(SCHEMES, SHAPES, ["bf16", "fp16"], [False, True])
)
def test_fallback_equals_fms_mo_when_scale_dtype_is_activation_dtype(scheme, shape, xd, with_bias) -> None:
    case = _case(scheme, shape[0], shape[1], DT[xd], DT[xd], with_bias)
    assert torch.equal(_module(case, Numerics.FALLBACK)(case["x"]), _module(case, Numerics.FMS_MO)(case["x"]))


@pytest.mark.parametrize(("scheme", "shape", "xd", "wd", "with_bias"), ALL)
def test_fallback_equals_pr200_reference(scheme, shape, xd, wd, with_bias) -> None:
    case = _case(scheme, shape[0], shape[1], DT[xd], DT[wd], with_bias)
    want = fp8_linear_pr200_ref(
        case["x"],
        case["w"],
        case["ws"],
        case["bias"],
        x_scale_rows=scheme[1] is TOKEN,
        act=scheme[1],
        input_scale=case["input_scale"],
    )
    assert torch.equal(_module(case, Numerics.FALLBACK)(case["x"]), want)


def test_fallback_differs_from_fms_mo_with_fp32_scales() -> None:
    """PR #200 dequantizes the weight into fp32 (the scale dtype) and multiplies in fp32: not the shipped path."""
    case = _case((CH, TOKEN), (5, 256), 384, torch.bfloat16, torch.float32, True)
    fallback, fms_mo = _module(case, Numerics.FALLBACK)(case["x"]), _module(case, Numerics.FMS_MO)(case["x"])
    assert fallback.dtype == fms_mo.dtype == torch.bfloat16
    assert not torch.equal(fallback, fms_mo)


# ---- hardware numerics ---------------------------------------------------------------------------------
def _ref64(case: dict) -> torch.Tensor:
    """fp64 result of the SAME activation codes and scales (the exact value hardware rounds once)."""
    gran, act = case["scheme"]
    x = case["x"]
    q, s = quantize_activation(x, act, case["input_scale"])
    k = x.shape[-1]
    xs = (q.to(torch.float64) * s.to(torch.float64)).reshape(-1, k)
    ws = case["ws"].to(torch.float64).reshape(-1, 1)
    out = xs @ (case["w"].to(torch.float64) * ws).T
    if case["bias"] is not None:
        out = out + case["bias"].to(torch.float64)
    return out.reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize(("scheme", "shape", "with_bias"), itertools.product(SCHEMES, SHAPES, [False, True]))
def test_hardware_is_within_one_bf16_ulp_of_fp64(scheme, shape, with_bias) -> None:
    case = _case(scheme, shape[0], shape[1], torch.bfloat16, torch.bfloat16, with_bias, seed=1)
    hw = _module(case, Numerics.HARDWARE)(case["x"])
    ref = _ref64(case)
    assert hw.dtype == torch.bfloat16 and hw.shape == ref.shape
    assert bool(((hw.to(torch.float64) - ref).abs() <= bf16_ulp(ref)).all())
    fallback = _module(case, Numerics.FALLBACK)(case["x"])
    hw_err = (hw.to(torch.float64) - ref).abs().mean()
    fb_err = (fallback.to(torch.float64) - ref).abs().mean()
    assert hw_err < fb_err


# ---- weight-only -------------------------------------------------------------------------------------
@pytest.mark.parametrize("numerics", [Numerics.FALLBACK, Numerics.FMS_MO])
@pytest.mark.parametrize(("xd", "wd"), [("bf16", "bf16"), ("bf16", "fp32"), ("fp16", "bf16")])
def test_weight_only_path(numerics, xd, wd) -> None:
    case = _case((CH, TOKEN), (3, 7, 64), 96, DT[xd], DT[wd], True)
    case["scheme"] = (CH, ActScheme.NONE)
    got = _module(case, numerics)(case["x"])
    ws = case["ws"]
    dequant_w = (case["w"].to(torch.float32) * ws.to(torch.float32)).to(ws.dtype)
    want = F.linear(case["x"].to(ws.dtype), dequant_w, case["bias"]).to(case["x"].dtype)
    assert got.dtype == case["x"].dtype and torch.equal(got, want)


# ---- activation quantization -----------------------------------------------------------------------
def test_quantize_activation_zero_token_and_bf16_scale() -> None:
    x = torch.randn(6, 128, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16) * 3
    x[2] = 0
    q, s = quantize_activation(x, TOKEN)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and s.dtype == torch.float32 and s.shape == (6, 1)
    assert s[2].item() == 2.0**-23 == torch.finfo(torch.float32).eps
    assert torch.equal(q[2].float(), torch.zeros(128))
    amax = x.float().abs().amax(-1, keepdim=True)
    in_bf16 = (amax / 448).to(torch.bfloat16).float()
    rows = torch.arange(6) != 2
    assert torch.equal(s[rows], in_bf16[rows])
    assert not torch.equal(s[rows], (amax / 448)[rows])  # really the bf16-rounded value, not the fp32 one
    qt, st = quantize_activation(x, DYN_T)
    assert st.shape == (1, 1) and st.item() == (x.float().abs().max() / 448).to(torch.bfloat16).item()
    qs, ss = quantize_activation(x, STATIC, torch.tensor([0.001]))
    assert ss.shape == (1, 1) and ss.item() == torch.tensor(0.001).item()
    assert qs.float().abs().max().item() == 448.0  # clamped, not NaN


def test_quantize_activation_multiplies_by_reciprocal() -> None:
    x = torch.randn(512, 512, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    q, s = quantize_activation(x, TOKEN)
    by_recip = torch.clamp(x.float() * s.reciprocal(), -448, 448).to(torch.float8_e4m3fn)
    by_div = torch.clamp(x.float() / s, -448, 448).to(torch.float8_e4m3fn)
    differ = by_recip.view(torch.uint8) != by_div.view(torch.uint8)
    assert int(differ.sum()) > 0  # the seeded case separates the two
    assert torch.equal(q.view(torch.uint8), by_recip.view(torch.uint8))
    # and the module's output is built on those codes: hardware numerics from reciprocal codes, by hand
    w = (torch.randn(32, 512, generator=torch.Generator().manual_seed(4)) * 50).to(torch.float8_e4m3fn)
    m = FakeQuantLinear(512, 32, numerics=Numerics.HARDWARE)
    m.weight = w
    want = ((by_recip.float() @ w.float().T) * s).to(torch.bfloat16)
    assert torch.equal(m(x), want)


# ---- cache -------------------------------------------------------------------------------------------
def test_cache_dequantized() -> None:
    case = _case((CH, TOKEN), (5, 256), 384, torch.bfloat16, torch.bfloat16, True)
    plain, cached = _module(case, Numerics.FMS_MO), _module(case, Numerics.FMS_MO, cache=True)
    first = cached(case["x"])
    assert cached._state.cache is not None and plain._state.cache is None
    assert torch.equal(first, plain(case["x"])) and torch.equal(cached(case["x"]), first)
    x16 = case["x"].to(torch.float16)  # the cache is per dtype
    assert torch.equal(cached(x16), plain(x16)) and cached._state.cache[0] == torch.float16
    other = _case((CH, TOKEN), (5, 256), 384, torch.bfloat16, torch.bfloat16, True, seed=9)
    cached.load_state_dict(_module(other, Numerics.FMS_MO).state_dict())
    assert torch.equal(cached(case["x"]), _ref(other | {"x": case["x"]}))
    assert not torch.equal(cached(case["x"]), first)


# ---- swap_linears and the constructor ------------------------------------------------------------
def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.ModuleDict({"proj": nn.Linear(32, 8, bias=False)}))


def test_swap_linears_replaces_named_linears() -> None:
    model = _model()
    plan = {
        "modules": {
            "0": {"weight": "channel", "activation": "dynamic-token", "bias": True},
            "2.proj": {"weight": "tensor", "activation": "static-tensor", "bias": False},
        }
    }
    assert swap_linears(model, plan, numerics="fms-mo") == ["0", "2.proj"]
    first, proj = model[0], model[2]["proj"]
    assert isinstance(first, FakeQuantLinear) and isinstance(proj, FakeQuantLinear)
    assert (first.in_features, first.out_features, first.bias.shape) == (16, 32, (32,))
    assert first.weight_scale.shape == (32, 1) and first.numerics is Numerics.FMS_MO
    assert proj.bias is None and proj.weight_scale.shape == (1,) and proj.input_scale.shape == (1,)
    assert isinstance(model[1], nn.ReLU)


def test_swap_linears_lists_every_problem() -> None:
    plan = {
        "modules": {
            "0": {"weight": "channel", "activation": "dynamic-token"},
            "1": {"weight": "channel", "activation": "dynamic-token"},
            "2.missing": {"weight": "channel", "activation": "dynamic-token"},
        }
    }
    with pytest.raises(CheckpointError) as exc:
        swap_linears(_model(), plan)
    problems = exc.value.problems
    assert len(problems) == 2
    assert any(p.startswith("1:") and "ReLU" in p for p in problems)
    assert any(p.startswith("2.missing:") and "no such module" in p for p in problems)


@pytest.mark.parametrize("kwargs", [{"weight_granularity": Granularity.BLOCK}, {"activation": ActScheme.DYNAMIC_GROUP}])
def test_constructor_rejects_unsupported_schemes(kwargs) -> None:
    with pytest.raises(ValueError):
        FakeQuantLinear(16, 8, **kwargs)
