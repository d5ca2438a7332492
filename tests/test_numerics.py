"""fp8convert.numerics: scale rounding, quantize/dequantize, block expansion, NaN/scale checks, error metrics.

Expected values are built independently (explicit loops, bit patterns, hand arithmetic), never by calling
the function under test a second time.
"""

from __future__ import annotations

import math

import pytest
import torch

from fp8convert.numerics import (
    E4M3_MAX,
    ErrorStats,
    bf16_round_up,
    channel_scale,
    dequantize,
    expand_scale,
    fp8_nan_count,
    is_exact_bf16,
    max_rel_error,
    quantize,
    scale_problems,
    sqnr_db,
)
from fp8convert.spec import Granularity, WeightScheme

from tolerances import E4M3_REL

TENSOR = WeightScheme(granularity=Granularity.TENSOR)
CHANNEL = WeightScheme(granularity=Granularity.CHANNEL)
BLOCK = WeightScheme(granularity=Granularity.BLOCK, block=(128, 128))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _prev_bf16(b: torch.Tensor) -> torch.Tensor:
    """The next smaller bf16 of positive non-zero bf16 values (bit pattern minus one)."""
    return (b.view(torch.int16) - 1).view(torch.bfloat16)


def _positive_f32(n: int, seed: int) -> torch.Tensor:
    """Positive fp32 values over ~60 binades, most of them not bf16-representable."""
    g = _gen(seed)
    return torch.pow(2.0, torch.empty(n).uniform_(-40, 20, generator=g)) * (1 + torch.rand(n, generator=g))


# ---- bf16 rounding ------------------------------------------------------------------------------------
def test_bf16_round_up_is_the_smallest_bf16_not_below_input() -> None:
    x = _positive_f32(20000, 1)
    edges = torch.tensor([1 + 2**-20, 1 - 2**-20, 2**-130 * 1.5, 3.0e38, 1.00390625, 1.01171875])  # incl. ties
    x = torch.cat([x, edges])
    r = bf16_round_up(x)
    assert r.dtype == torch.bfloat16 and r.shape == x.shape
    assert bool((r.float() >= x).all())
    assert bool((_prev_bf16(r).float() < x).all())
    assert int((r.float() > x).sum()) > 19000  # the values really needed rounding up
    assert r[-6].item() == 1 + 2**-7 and r[-5].item() == 1.0  # just above 1 -> next bf16; just below -> 1
    assert r[-2].item() == 1.0078125 and r[-1].item() == 1.015625  # ties go up, not to even


def test_bf16_round_up_keeps_exact_values() -> None:
    exact = _positive_f32(5000, 2).to(torch.bfloat16)
    exact = torch.cat([exact, torch.tensor([1.0, 2**-133, 448.0, 2**-9], dtype=torch.bfloat16)])  # subnormal too
    for src in (exact.float(), exact, torch.tensor([1.0, 0.5, 3.0, 2**-20], dtype=torch.float16)):
        r = bf16_round_up(src)
        assert r.dtype == torch.bfloat16
        assert torch.equal(r.to(torch.float32), src.to(torch.float32))


def test_bf16_round_up_fp64_input_is_not_rounded_down() -> None:
    x = torch.tensor([1 + 2**-30], dtype=torch.float64)
    assert float(bf16_round_up(x)) >= float(x)


def test_is_exact_bf16() -> None:
    assert is_exact_bf16(torch.tensor([1.0, 0.5, 448.0, 2**-20, 3.0 * 2**-126]))
    assert is_exact_bf16(torch.tensor([1.5], dtype=torch.bfloat16))
    assert not is_exact_bf16(torch.tensor([1.0, 1 + 2**-8]))  # one element off is enough
    assert not is_exact_bf16(torch.tensor([0.1]))
    assert not is_exact_bf16(torch.tensor([1 + 2**-30], dtype=torch.float64))


def test_channel_scale() -> None:
    g = _gen(3)
    hp = torch.randn(64, 96, generator=g) * torch.pow(10.0, torch.randint(-4, 4, (64, 1), generator=g).float())
    hp[5] = 0.0
    s = channel_scale(hp)
    assert s.dtype == torch.bfloat16 and s.shape == (64, 1)
    amax = hp.abs().amax(dim=1, keepdim=True)
    nonzero = amax > 0
    assert bool((s.float()[nonzero] >= (amax / E4M3_MAX)[nonzero]).all())
    assert bool((_prev_bf16(s).float()[nonzero] < (amax / E4M3_MAX)[nonzero]).all())  # smallest such bf16
    assert s[5].item() == 1.0
    q = quantize(hp, s.float())
    assert bool((q.float().abs() <= E4M3_MAX).all()) and fp8_nan_count(q) == 0
    assert torch.equal(q[5].float(), torch.zeros(96))


# ---- quantize ------------------------------------------------------------------------------------------
def test_quantize_clamps_and_rounds_to_nearest_even() -> None:
    hp = torch.tensor([1.0625, 1.1875, -1.0625, 500.0, -1e9, 448.0, 3.0, float("inf"), -float("inf")])
    q = quantize(hp, torch.tensor(1.0))
    assert q.dtype == torch.float8_e4m3fn and fp8_nan_count(q) == 0
    assert q.float().tolist() == [1.0, 1.25, -1.0, 448.0, -448.0, 448.0, 3.0, 448.0, -448.0]
    # division by the scale: 2.125 / 2 = 1.0625 -> tie -> 1.0 (even), not 1.125
    assert quantize(torch.tensor([2.125]), torch.tensor([2.0])).float().item() == 1.0
    # a per-row scale [out, 1]
    q2 = quantize(torch.tensor([[4.0, -4.0], [4.0, 1000.0]]), torch.tensor([[2.0], [0.5]]))
    assert q2.float().tolist() == [[2.0, -2.0], [8.0, 448.0]]


# ---- dequantize / expand_scale ---------------------------------------------------------------------
def _codes(shape: tuple[int, int], seed: int) -> torch.Tensor:
    return (torch.randn(shape, generator=_gen(seed)) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)


def test_dequantize_tensor_and_channel() -> None:
    w = _codes((24, 40), 4)
    s_t = torch.tensor([0.75], dtype=torch.bfloat16)
    assert expand_scale(s_t, TENSOR, 24, 40).shape == (1, 1)
    assert torch.equal(dequantize(w, s_t, TENSOR), w.float() * 0.75)
    s_c = torch.rand(24, 1, generator=_gen(5)).to(torch.bfloat16) + 0.01
    expected = torch.stack([w[r].float() * s_c[r].float() for r in range(24)])
    assert torch.equal(dequantize(w, s_c, CHANNEL), expected)
    assert torch.equal(dequantize(w, s_c.reshape(24), CHANNEL), expected)  # 1-D [out] scale too


@pytest.mark.parametrize("shape", [(200, 256), (256, 256), (128, 300), (1, 1)])
def test_dequantize_block_applies_each_tile_scale_to_its_rows_and_cols(shape: tuple[int, int]) -> None:
    out_f, in_f = shape
    w = _codes(shape, 6)
    grid = BLOCK.scale_shape(out_f, in_f)
    assert grid == (-(-out_f // 128), -(-in_f // 128))
    scale = (torch.rand(grid, generator=_gen(7)) + 0.1).to(torch.bfloat16)
    expected = torch.full(shape, float("nan"))
    for i in range(grid[0]):
        for j in range(grid[1]):
            rows, cols = slice(i * 128, min((i + 1) * 128, out_f)), slice(j * 128, min((j + 1) * 128, in_f))
            expected[rows, cols] = w[rows, cols].float() * scale[i, j].float()
    assert not bool(expected.isnan().any())  # every element covered by exactly one tile
    exp_scale = expand_scale(scale, BLOCK, out_f, in_f)
    assert exp_scale.shape == shape
    torch.testing.assert_close(dequantize(w, scale, BLOCK), expected, atol=0, rtol=0)


def test_expand_scale_block_uses_block_size_not_grid_ratio() -> None:
    # [200, 256] with (128, 128): 200 // 2 rows = 100 would be wrong; rows 100..127 belong to tile row 0
    scale = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    e = expand_scale(scale, BLOCK, 200, 256)
    assert e[127, 0].item() == 1.0 and e[128, 0].item() == 3.0 and e[199, 255].item() == 4.0
    assert e[0, 127].item() == 1.0 and e[0, 128].item() == 2.0


# ---- checks --------------------------------------------------------------------------------------------
def test_fp8_nan_count() -> None:
    all_codes = torch.arange(256, dtype=torch.uint8)
    fn = all_codes.view(torch.float8_e4m3fn)
    assert fp8_nan_count(fn) == 2 == int(fn.float().isnan().sum())
    assert fp8_nan_count(torch.tensor([0x7F, 0x7E, 0xFF, 0xFE, 0x7F], dtype=torch.uint8).view(fn.dtype)) == 3
    fnuz = all_codes.view(torch.float8_e4m3fnuz)
    assert fp8_nan_count(fnuz) == 1 == int(fnuz.float().isnan().sum())
    e5m2 = all_codes.view(torch.float8_e5m2)
    assert fp8_nan_count(e5m2) == int((~e5m2.float().isfinite()).sum()) == 8  # 6 NaN + 2 inf
    assert fp8_nan_count(torch.tensor([float("nan")])) == 0  # not an fp8 dtype


def test_scale_problems() -> None:
    assert scale_problems(torch.tensor([1.0, 2**-20, 448.0])) == []
    s = torch.tensor([float("nan"), float("inf"), 0.0, -1.0, 1.0, 0.0, -2.0]).to(torch.bfloat16)
    assert scale_problems(s) == ["1 NaN", "1 Inf", "2 zero", "2 negative"]
    assert scale_problems(torch.tensor([-float("inf")])) == ["1 Inf", "1 negative"]


# ---- error metrics ---------------------------------------------------------------------------------
def test_sqnr_db_hand_computed() -> None:
    ref = torch.tensor([3.0, 4.0])  # signal 25
    assert sqnr_db(ref, ref.clone()) == math.inf
    assert abs(sqnr_db(ref, torch.tensor([3.0, 4.5])) - 20.0) <= 1e-9  # noise 0.25 -> 100x -> 20 dB
    assert abs(sqnr_db(ref, torch.tensor([3.5, 4.5])) - 10 * math.log10(50.0)) <= 1e-9  # noise 0.5
    assert sqnr_db(torch.zeros(2), torch.tensor([0.0, 1.0])) == -math.inf
    # computed in fp64, whatever the input dtype
    assert abs(sqnr_db(ref.to(torch.bfloat16), torch.tensor([3.0, 4.5], dtype=torch.bfloat16)) - 20.0) <= 1e-9


def test_max_rel_error_is_per_row() -> None:
    ref = torch.tensor([[1.0, 2.0], [4.0, -8.0]])
    test = torch.tensor([[1.0, 2.5], [4.0, -7.0]])
    assert max_rel_error(ref, test) == 0.25  # row 0: 0.5 / 2; row 1: 1 / 8
    assert max_rel_error(ref, ref) == 0.0
    # an all-zero reference row reports its absolute error
    assert max_rel_error(torch.zeros(1, 3), torch.tensor([[0.0, 0.5, 0.0]])) == 0.5


def test_error_stats_accumulates_over_chunks() -> None:
    st = ErrorStats()
    assert st.sqnr_db == math.inf
    st.add(torch.tensor([[3.0, 4.0]]), torch.tensor([[3.0, 4.5]]))  # signal 25, noise 0.25, rel 0.125
    st.add(torch.tensor([[0.0, 10.0]]), torch.tensor([[0.0, 10.0]]))  # signal 100, exact
    assert st.signal == 125.0 and st.noise == 0.25 and st.changed == 1
    assert abs(st.sqnr_db - 10 * math.log10(500.0)) <= 1e-9
    assert st.max_rel == 0.125
    st.add(torch.tensor([[2.0, 2.0]]), torch.tensor([[1.0, 3.0]]))  # rel 0.5, two changed
    assert st.max_rel == 0.5 and st.changed == 3
    whole = sqnr_db(torch.tensor([3.0, 4.0, 0.0, 10.0, 2.0, 2.0]), torch.tensor([3.0, 4.5, 0.0, 10.0, 1.0, 3.0]))
    assert abs(st.sqnr_db - whole) <= 1e-5  # per-row fp32 norms: ~1e-7 relative in S/N
    zero = ErrorStats()
    zero.add(torch.zeros(1, 2), torch.ones(1, 2))
    assert zero.sqnr_db == -math.inf


def test_quantize_dequantize_round_trip_within_one_e4m3_rounding() -> None:
    hp = torch.randn(48, 80, generator=_gen(8))
    s = channel_scale(hp)
    back = dequantize(quantize(hp, s.float()), s, CHANNEL)
    bound = E4M3_REL * hp.abs() + 2.0**-10 * s.float()  # half an e4m3 ulp (normal) or half a subnormal step
    assert bool(((back - hp).abs() <= bound).all())


# ---- fast decode and thread-independent statistics ----------------------------------------------------------
def test_fp8_decode_equals_torch_cast_for_every_code() -> None:
    from fp8convert.numerics import fp8_decode

    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    ref = codes.to(torch.float32)
    finite = ~torch.isnan(ref)
    got = fp8_decode(codes.reshape(16, 16).T).T.reshape(-1)  # a non-contiguous view too
    assert torch.equal(got[finite], ref[finite])
    assert torch.equal(fp8_decode(codes[finite]).view(torch.int32), ref[finite].view(torch.int32))  # -0.0 kept
    for other in (torch.float8_e4m3fnuz, torch.float8_e5m2):
        c = torch.arange(256, dtype=torch.uint8).view(other)
        r = c.to(torch.float32)
        assert torch.equal(fp8_decode(c)[~torch.isnan(r)], r[~torch.isnan(r)])


def test_fp8_decode_falls_back_when_denormals_are_flushed() -> None:
    from fp8convert.numerics import fp8_decode

    codes = torch.arange(1, 8, dtype=torch.uint8).view(torch.float8_e4m3fn)  # the subnormal codes
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        assert torch.equal(fp8_decode(codes), codes.to(torch.float32)) and bool((fp8_decode(codes) > 0).all())
    finally:
        torch.set_flush_denormal(False)


def test_error_stats_do_not_depend_on_the_thread_count() -> None:
    g = torch.Generator().manual_seed(3)
    ref = torch.randn(512, 8192, generator=g)  # 4M elements: torch splits reductions across threads
    test = ref + torch.randn(512, 8192, generator=g) * 1e-3
    figures = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            st = ErrorStats()
            st.add(ref, test)
            figures.append((st.signal, st.noise, st.max_rel, st.changed))
    finally:
        torch.set_num_threads(before)
    assert figures[0] == figures[1]
