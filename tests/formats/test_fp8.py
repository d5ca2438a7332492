"""quant_method "fp8" (FORMATS.md L1 AutoFP8 per-tensor, L2 DeepSeek/Qwen block, L3 Mistral-HF per-tensor):
detection, scale direction, block padding, ignore lists, pass-through, KV scales, MoE, and every refusal.
Tolerances come from the formats' precision (tests/tolerances.py)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fp8convert import spec
from fp8convert.errors import CheckpointError, MissingTensorError, UnsupportedSchemeError
from fp8convert.examples import TinyModel, dense_tensors, write_checkpoint
from fp8convert.formats import detect_format, open_source
from fp8convert.formats.fp8 import Fp8Reader
from fp8convert.numerics import dequantize, dequantize_linear, expand_scale
from fp8convert.pipeline import ConvertOptions, convert, inspect_checkpoint
from fp8convert.shards import Checkpoint
from fp8convert.spec import ActScheme, Granularity, Target

from fixtures.fp8_family import DEFAULT_DIMS, build, fp8_tensors
from tolerances import BF16_REL, E4M3_REL, REQUANT_SQNR_FLOOR_DB, SQNR_DB_ABS

CPU = ConvertOptions(targets=frozenset({Target.CPU}))
SMALL = {"hidden": 64, "intermediate": 128, "vocab": 64}
#: fp32 products and quotients round once more (2^-24 relative each); a slack for the exact half-ulp cases
FP32_SLACK = 2.0**-22


@pytest.fixture
def make(tmp_path: Path) -> Callable[..., Path]:
    """``make(variant, **options)``: an fp8-family fixture checkpoint in a fresh directory."""
    counter = iter(range(1000))

    def _make(variant: str = "block", **options: object) -> Path:
        return build(tmp_path / f"src{next(counter)}", variant, **options)

    return _make


@pytest.fixture
def write(tmp_path: Path) -> Callable[..., Path]:
    """``write(tensors, config, shards=1)``: a hand-edited checkpoint in a fresh directory."""
    counter = iter(range(1000))

    def _write(tensors: dict[str, torch.Tensor], config: dict, shards: int = 1) -> Path:
        return write_checkpoint(tmp_path / f"edited{next(counter)}", tensors, config, shards=shards)

    return _write


def _original(variant: str, **options: object) -> dict[str, torch.Tensor]:
    """The bf16 weights the fixture quantized (same seed, same dims)."""
    dims = {k: v for k, v in options.items() if k in TinyModel.__dataclass_fields__}
    return dense_tensors(TinyModel(**{**DEFAULT_DIMS.get(variant, {}), **dims}), int(options.get("seed", 0)))  # type: ignore[call-overload]


def _tensors(target: Path) -> dict[str, torch.Tensor]:
    result = {}
    for path in sorted(target.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            result.update({k: f.get_tensor(k) for k in f.keys()})
    return result


def _out(out: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """The tensors of the first written target (aiu if written, else cpu)."""
    target = out / "aiu" if (out / "aiu").is_dir() else out / "cpu"
    return target, _tensors(target)


def _dequant_out(tensors: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    w, s = tensors[f"{module}.weight"], tensors[f"{module}.weight_scale"].float()
    return w.float() * (s.reshape(-1, 1) if s.numel() > 1 else s.reshape(1, 1))


def _within_one_rounding(got: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor) -> bool:
    """|got - ref| <= half an e4m3 ulp of ref (normal range) or half the subnormal step (2^-10 * scale)."""
    bound = (E4M3_REL + FP32_SLACK) * ref.abs() + scale * 2.0**-10
    return bool(((got - ref).abs() <= bound).all())


def _sqnr(ref: torch.Tensor, got: torch.Tensor) -> float:
    noise = float((got.double() - ref.double()).pow(2).sum())
    return math.inf if noise == 0 else 10 * math.log10(float(ref.double().pow(2).sum()) / noise)


def _gain(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Least-squares factor between x and ref: ~1 when x reproduces ref."""
    return float((x.double() * ref.double()).sum() / ref.double().pow(2).sum())


def _file_of(src: Path, key: str) -> str:
    return Checkpoint(src).ref(key).file


def _edit_qc(src: Path, **changes: object) -> None:
    config = json.loads((src / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            config["quantization_config"].pop(k, None)
        else:
            config["quantization_config"][k] = v
    (src / "config.json").write_text(json.dumps(config))


# ---- fixtures reproduce the producers' key sets ---------------------------------------------------------
def test_fixture_key_sets_dtypes_shapes_and_configs() -> None:
    """The keys, dtypes and shapes FORMATS.md quotes for each producer (L1 README, L2 README_WEIGHTS, L3 script)."""
    t, c = fp8_tensors("pertensor-kv")
    mod = "model.layers.0.mlp.down_proj"
    assert (t[mod + ".weight"].dtype, t[mod + ".weight"].shape) == (torch.float8_e4m3fn, (256, 512))
    for key in (mod + ".weight_scale", mod + ".input_scale", "model.layers.0.self_attn.k_scale"):
        assert (t[key].dtype, t[key].shape) == (torch.float32, ()), key
    assert c["quantization_config"] == {
        "quant_method": "fp8",
        "activation_scheme": "static",
        "ignored_layers": ["lm_head"],
        "kv_cache_scheme": "static",
    }
    assert t["lm_head.weight"].dtype == torch.bfloat16
    t, c = fp8_tensors("block")
    assert (t[mod + ".weight_scale_inv"].dtype, t[mod + ".weight_scale_inv"].shape) == (torch.float32, (2, 3))
    assert c["quantization_config"] == {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    }
    assert not [k for k in t if k.endswith(("input_scale", "activation_scale"))]
    t, c = fp8_tensors("mistral-hf")
    assert {t[mod + s].shape for s in (".weight_scale_inv", ".activation_scale")} == {()}
    assert c["quantization_config"] == {
        "activation_scheme": "static",
        "dequantize": False,
        "modules_to_not_convert": ["model.vision_tower", "model.multi_modal_projector", "lm_head"],
        "quant_method": "fp8",
        "weight_block_size": None,
    }
    t, c = fp8_tensors("qwen3-moe-block")
    assert t["model.layers.1.mlp.experts.3.down_proj.weight_scale_inv"].dtype == torch.bfloat16
    assert t["model.layers.1.mlp.experts.3.down_proj.weight_scale_inv"].shape == (2, 1)  # [256, 64] weight
    assert "model.layers.1.mlp.gate" in c["quantization_config"]["modules_to_not_convert"]
    t, c = fp8_tensors("mixtral")
    assert t["model.layers.0.block_sparse_moe.experts.2.w2.input_scale"].shape == ()
    assert t["model.layers.0.block_sparse_moe.gate.weight"].dtype == torch.bfloat16
    t, c = fp8_tensors("deepseek-moe")
    assert t["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert t["model.layers.1.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (1, 2)  # MLA [40, 192], block 128
    assert "modules_to_not_convert" not in c["quantization_config"]


# ---- detection ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("variant", "label", "suffix"),
    [
        ("pertensor-static", "L1 per-tensor", "weight_scale float32 x14"),
        ("pertensor-dynamic", "L1 per-tensor", "weight_scale float32 x14"),
        ("mistral-hf", "L3 per-tensor (weight_scale_inv)", "weight_scale_inv float32 x14"),
        ("block", "L2 block 128x128", "weight_scale_inv float32 x14"),
        ("qwen3-moe-block", "L2 block 128x128", "weight_scale_inv bfloat16 x32"),
    ],
)
def test_detection_rule_and_evidence(make, variant: str, label: str, suffix: str) -> None:
    src = make(variant, **SMALL)
    ckpt = Checkpoint(src)
    reader, det = detect_format(ckpt, ckpt.config())
    assert reader.name == det.format == "fp8"
    assert label in det.rule and "FORMATS.md 7, step 3 fp8" in det.rule
    assert "config.json quantization_config.quant_method='fp8'" in det.evidence
    assert any(suffix in e for e in det.evidence), det.evidence
    assert any(e.startswith("sub-layout: " + label.split(" (")[0]) for e in det.evidence)
    if label.startswith("L2"):
        assert "weight_block_size=[128, 128]" in det.evidence
        assert "fp8 b" in det.rule
    else:
        assert "fp8 c" in det.rule


def test_l1_and_l3_are_told_apart_by_tensor_names_not_config(make, write) -> None:
    """Third-party L3 readers guessed weight_scale/input_scale: the names decide, whatever the ignore key."""
    tensors, config = fp8_tensors("pertensor-static", **SMALL)
    config["quantization_config"] = fp8_tensors("mistral-hf", **SMALL)[1]["quantization_config"]
    ckpt = Checkpoint(write(tensors, config))
    assert "L1 per-tensor" in detect_format(ckpt, ckpt.config())[1].rule
    tensors, config = fp8_tensors("mistral-hf", **SMALL)
    config["quantization_config"] = {"quant_method": "FP8", "activation_scheme": "static"}  # no block key at all
    src = write(tensors, config)
    ckpt = Checkpoint(src)
    assert "L3 per-tensor (weight_scale_inv)" in detect_format(ckpt, ckpt.config())[1].rule
    r = inspect_checkpoint(src, targets=frozenset({Target.CPU}))
    assert {lin["activation"] for lin in r["linears"]} == {"static-tensor"} and len(r["linears"]) == 14


def test_text_config_quantization_config(make) -> None:
    src = make("block", **SMALL)
    config = json.loads((src / "config.json").read_text())
    config["text_config"] = {"quantization_config": config.pop("quantization_config")}
    (src / "config.json").write_text(json.dumps(config))
    r = inspect_checkpoint(src)
    assert r["format"] == "fp8" and len(r["linears"]) == 14
    assert "config.json text_config.quantization_config.quant_method='fp8'" in r["evidence"]


def test_both_spellings_fail_loudly(write) -> None:
    tensors, config = fp8_tensors("pertensor-dynamic", **SMALL)
    mod = "model.layers.1.self_attn.o_proj"
    tensors[mod + ".weight_scale_inv"] = tensors.pop(mod + ".weight_scale")
    src = write(tensors, config)
    with pytest.raises(UnsupportedSchemeError, match="uses both scale spellings") as info:
        open_source(src)
    text = info.value.render()
    assert "weight_scale (L1, AutoFP8) on model.layers.0.mlp.down_proj" in text
    assert f"weight_scale_inv (L3, transformers/Mistral HF) on {mod}" in text
    assert "13 with weight_scale, 1 with weight_scale_inv" in text and "Fix: " in text


def test_neither_spelling_fails_loudly(write) -> None:
    tensors, config = fp8_tensors("pertensor-dynamic", **SMALL)
    for key in [k for k in tensors if k.endswith(".weight_scale")]:
        tensors[key.replace(".weight_scale", ".scale")] = tensors.pop(key)
    with pytest.raises(UnsupportedSchemeError, match="no fp8 weight has a weight_scale .L1. or weight_scale_inv") as i:
        open_source(write(tensors, config))
    assert "14 fp8 weight(s); 0 with weight_scale, 0 with weight_scale_inv" in i.value.render()


@pytest.mark.parametrize(
    ("qc", "extra"),
    [
        ({"expert_dtype": "fp4", "scale_fmt": "ue8m0"}, {}),
        ({"scale_fmt": "ue8m0"}, {"model_type": "deepseek_v4"}),
    ],
    ids=["expert-fp4", "model-type"],
)
def test_deepseek_v4_is_not_claimed(make, qc: dict, extra: dict) -> None:
    src = make("block", **SMALL)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"].update(qc)
    config.update(extra)
    (src / "config.json").write_text(json.dumps(config))
    assert Fp8Reader().detect(Checkpoint(src), config) is None
    with pytest.raises(UnsupportedSchemeError, match="DeepSeek-V4"):  # refused by name, before any reader
        open_source(src)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"weight_block_size": [128]}, "weight_block_size=\\[128\\]: expected null .per-tensor. or \\[rows, cols\\]"),
        ({"activation_scheme": "per-token"}, "activation_scheme='per-token' is not supported"),
        ({"scale_fmt": "e4m3"}, "scale_fmt='e4m3' is not a known scale format"),
        ({"modules_to_not_convert": "lm_head"}, "modules_to_not_convert must be a list"),
        (
            {"activation_scheme": "static"},
            "weight_block_size with activation_scheme 'static': block-wise fp8 checkpoints have dynamic",
        ),
    ],
)
def test_config_problems_are_refused(make, change: dict, message: str) -> None:
    src = make("block", **SMALL)
    _edit_qc(src, **change)
    with pytest.raises(UnsupportedSchemeError, match=message):
        open_source(src)


# ---- scale direction ------------------------------------------------------------------------------
DIRECTION = {
    "pertensor-static": ("pertensor-static", {}),
    "pertensor-dynamic": ("pertensor-dynamic", {}),
    "mistral-hf": ("mistral-hf", {}),
    "block-f32": ("block", {}),
    "block-bf16": ("block", {"scale_dtype": torch.bfloat16}),
    "block-f16": ("block", {"scale_dtype": torch.float16}),
    "ue8m0-f32": ("ue8m0", {}),
    "ue8m0-u8": ("ue8m0", {"ue8m0_storage": "U8"}),
    "mixtral": ("mixtral", {}),
    "qwen3-moe-block": ("qwen3-moe-block", {}),
}


@pytest.mark.parametrize("case", sorted(DIRECTION))
def test_scale_multiplies(make, tmp_path: Path, case: str) -> None:
    """Source dequantized (``fp8 * scale``) is within one e4m3 rounding of the bf16 weights the fixture started
    from; a reader that divided by the scale would be off by 1/scale^2 (~1e6). The converted weight agrees with
    the source's: within one extra rounding (SQNR above the floor) where a scale changes, exactly otherwise."""
    variant, options = DIRECTION[case]
    src = make(variant, **options)
    original = _original(variant, **options)
    report = convert(src, tmp_path / "out", CPU if variant in ("mixtral", "qwen3-moe-block") else ConvertOptions())
    _, out = _out(tmp_path / "out")
    ckpt, _, reader, plan = open_source(src)
    assert plan.linears
    for lin in plan.linears:
        ref = reader.read_linear(ckpt, lin)
        orig = original[lin.module + ".weight"].float()
        hp = dequantize_linear(ref)
        s = expand_scale(ref.weight_scale, ref.scheme, lin.out_features, lin.in_features)
        assert _within_one_rounding(hp, orig, s), lin.module
        assert abs(_gain(hp, orig) - 1) < E4M3_REL
        divided = ref.weight.float() / s
        assert _gain(divided, orig) > 1e3, lin.module  # `_inv` read as "divide": wrong by orders of magnitude
        got = _dequant_out(out, lin.module)
        s_new = out[f"{lin.module}.weight_scale"].float()
        assert _within_one_rounding(got, hp, s_new.reshape(-1, 1) if s_new.numel() > 1 else s_new), lin.module
        assert abs(_gain(got, orig) - 1) < E4M3_REL
        rec = report["layers"][lin.module]
        if rec["changed_codes"]:
            assert rec["sqnr_db"] == pytest.approx(_sqnr(hp, got), abs=SQNR_DB_ABS)
            assert _sqnr(hp, got) >= REQUANT_SQNR_FLOOR_DB
        else:  # only the scale's dtype changed (bf16 rounding up, codes kept)
            assert torch.equal(out[f"{lin.module}.weight"], ref.weight)


@pytest.mark.parametrize("variant", ["pertensor-static", "pertensor-dynamic", "mistral-hf"])
def test_per_tensor_with_bf16_exact_scales_is_exact(make, tmp_path: Path, variant: str) -> None:
    """Per-tensor sources whose fp32 scales are bf16 values: codes and scales carried unchanged (atol=0), and the
    converted weight is within one e4m3 rounding of the original."""
    src = make(variant, exact_bf16_scales=True)
    original = _original(variant)
    report = convert(src, tmp_path / "out")
    _, out = _out(tmp_path / "out")
    assert report["target"]["weights"] == "tensor"
    ckpt, _, reader, plan = open_source(src)
    for lin in plan.linears:
        ref = reader.read_linear(ckpt, lin)
        got = _dequant_out(out, lin.module)
        torch.testing.assert_close(got, dequantize_linear(ref), atol=0, rtol=0)
        assert torch.equal(out[f"{lin.module}.weight"], ref.weight)
        assert _within_one_rounding(got, original[lin.module + ".weight"].float(), ref.weight_scale)
        rec = report["layers"][lin.module]
        assert rec["changed_codes"] == 0
        if variant == "pertensor-dynamic":
            assert rec["exact"] is True and rec["actions"] == ["scale float32 -> bf16 (exact)"]
        else:  # the calibrated input scale is an arbitrary fp32 value: rounded up to bf16, reported
            got_in, src_in = out[f"{lin.module}.input_scale"].float(), ref.input_scale
            assert src_in is not None and bool((got_in >= src_in).all())
            assert bool(((got_in - src_in) <= 2 * BF16_REL * src_in).all())
    expected = "dynamic-tensor" if variant == "pertensor-dynamic" else "static-tensor"
    assert report["target"]["activations"] == expected


# ---- block padding --------------------------------------------------------------------------------
def test_block_edge_tiles_use_their_own_scale(make) -> None:
    """[192, 320] with block 128: a [2, 3] grid, edge tiles 64 rows / 64 columns wide. Each tile's scale is the
    amax of its real part (zero padding does not count) / 448 and dequantizes exactly that tile; deriving the
    block from the shape (192 // 2 = 96 rows) mixes tiles and misses the original by far more than a rounding."""
    src = make("block")
    original = _original("block")
    ckpt, _, reader, plan = open_source(src)
    down = next(lin for lin in plan.linears if lin.module == "model.layers.0.mlp.down_proj")
    assert (down.out_features, down.in_features) == (192, 320)
    assert down.weight_scale.shape == (2, 3) and down.scheme.block == (128, 128)
    ref = reader.read_linear(ckpt, down)
    hp = dequantize(ref.weight, ref.weight_scale, ref.scheme)
    orig = original[down.module + ".weight"].float()
    for i, (r0, r1) in enumerate([(0, 128), (128, 192)]):
        for j, (c0, c1) in enumerate([(0, 128), (128, 256), (256, 320)]):
            tile = (slice(r0, r1), slice(c0, c1))
            torch.testing.assert_close(hp[tile], ref.weight[tile].float() * ref.weight_scale[i, j], atol=0, rtol=0)
            assert float(ref.weight_scale[i, j]) == float(orig[tile].abs().amax() / 448)
    assert _within_one_rounding(hp, orig, expand_scale(ref.weight_scale, ref.scheme, 192, 320))
    wrong_s = ref.weight_scale.repeat_interleave(96, 0).repeat_interleave(107, 1)[:192, :320]
    wrong = ref.weight.float() * wrong_s
    assert not torch.equal(wrong, hp)
    assert not _within_one_rounding(wrong, orig, wrong_s)
    assert _sqnr(orig, wrong) < REQUANT_SQNR_FLOOR_DB < _sqnr(orig, hp)


def test_block_size_comes_from_the_config(make) -> None:
    """weight_block_size [64, 64] with a [2, 3] grid is refused with the expected [3, 5]; the grid is never
    used to guess the block."""
    src = make("block")
    _edit_qc(src, weight_block_size=[64, 64])
    with pytest.raises(UnsupportedSchemeError) as info:
        convert(src, src.parent / "out")
    text = info.value.render()
    assert (
        f"model.layers.0.mlp.down_proj.weight_scale_inv ({_file_of(src, 'model.layers.0.mlp.down_proj.weight')}) "
        "has shape [2, 3], but block 64x64 scales (weight_block_size [64, 64] in config.json) of weight [192, 320] "
        "must be [3, 5] = [ceil(192/64), ceil(320/64)]" in text
    )
    assert "never derived from the scale grid" in text and "Fix: correct weight_block_size" in text
    assert not (src.parent / "out").exists()


# ---- ue8m0 ----------------------------------------------------------------------------------------
def test_ue8m0_u8_bytes_decode_to_powers_of_two(make) -> None:
    """U8 e8m0 bytes b mean 2**(b-127): same values, same codes as the float-stored power-of-two scales."""
    a, b = make("ue8m0", ue8m0_storage="U8"), make("ue8m0", pow2_everywhere=True)
    ca, _, ra, pa = open_source(a)
    cb, _, rb, pb = open_source(b)
    assert {lin.weight_scale.dtype for lin in pa.linears} == {torch.uint8}
    for la, lb in zip(pa.linears, pb.linears, strict=True):
        qa, qb = ra.read_linear(ca, la), rb.read_linear(cb, lb)
        raw = ca.load(la.weight_scale.key).to(torch.float64)
        torch.testing.assert_close(qa.weight_scale.double(), torch.pow(2.0, raw - 127), atol=0, rtol=0)
        torch.testing.assert_close(qa.weight_scale, qb.weight_scale, atol=0, rtol=0)
        assert torch.equal(qa.weight, qb.weight)


def test_ue8m0_f32_scales_are_not_assumed_powers_of_two(make) -> None:
    """DeepSeek-V3.1: scale_fmt ue8m0, F32 scales, o_proj not powers of two: read as stored, never rounded."""
    src = make("ue8m0")
    ckpt, _, reader, plan = open_source(src)
    for lin in plan.linears:
        s = reader.read_linear(ckpt, lin).weight_scale
        assert torch.equal(s, ckpt.load(lin.weight_scale.key))
        is_pow2 = torch.equal(torch.exp2(torch.log2(s).round()), s)
        assert is_pow2 is (not lin.module.endswith("o_proj")), lin.module


def test_ue8m0_nan_byte_is_reported(write, tmp_path: Path) -> None:
    tensors, config = fp8_tensors("ue8m0", ue8m0_storage="U8", **SMALL)
    key = "model.layers.1.mlp.up_proj.weight_scale_inv"
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = 255
    src = write(tensors, config)
    with pytest.raises(CheckpointError, match=f"{key} \\(model.safetensors\\): 1 NaN scale value"):
        convert(src, tmp_path / "out")


def test_e8m0_header_dtype(tmp_path: Path, monkeypatch) -> None:
    """safetensors writes float8_e8m0fnu as "F8_E8M0" (DeepSeek-V4 style). spec.ST_TO_DTYPE does not map it yet,
    so the header is refused naming the tensor; once mapped, the reader decodes it like U8 bytes."""
    tensors, config = fp8_tensors("ue8m0", ue8m0_storage="U8", **SMALL)
    tensors = {k: (v.view(torch.float8_e8m0fnu) if v.dtype == torch.uint8 else v) for k, v in tensors.items()}
    src = tmp_path / "e8m0"
    src.mkdir()
    save_file(tensors, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps(config))
    key = "model.layers.0.mlp.down_proj.weight_scale_inv"
    if "F8_E8M0" not in spec.ST_TO_DTYPE:
        with pytest.raises(CheckpointError, match=f"tensor {key}: malformed header entry .*F8_E8M0"):
            open_source(src)
    monkeypatch.setitem(spec.ST_TO_DTYPE, "F8_E8M0", torch.float8_e8m0fnu)
    ckpt, _, reader, plan = open_source(src)
    lin = next(lin for lin in plan.linears if lin.weight_scale.key == key)
    expected = torch.pow(2.0, tensors[key].view(torch.uint8).double() - 127).float()
    torch.testing.assert_close(reader.read_linear(ckpt, lin).weight_scale, expected, atol=0, rtol=0)


# ---- ignore lists, pass-through, KV -------------------------------------------------------------------
def test_ignore_lists_prefix_and_substring_semantics(write, tmp_path: Path) -> None:
    """modules_to_not_convert (transformers: a module, a parent or a substring) and ignored_layers (vLLM: names)
    are checked against the tensors; the bf16 linears they name pass through."""
    tensors, config = fp8_tensors(
        "block",
        unquantized=("0.mlp.down_proj", "1.mlp.down_proj", "1.self_attn.o_proj"),
        modules_to_not_convert=["lm_head", "mlp.down_proj", "model.layers.1.self_attn.o_proj"],
        ignored_layers=["model.embed_tokens", "model.layers.0.input_layernorm"],
        **SMALL,
    )
    src = write(tensors, config)
    r = inspect_checkpoint(src, targets=frozenset({Target.CPU}))
    assert "modules_to_not_convert: 3 entries" in r["evidence"] and "ignored_layers: 2 entries" in r["evidence"]
    assert r["unquantized_linears"] == [
        "lm_head",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
        "model.layers.1.self_attn.o_proj",
    ]
    report = convert(src, tmp_path / "out", CPU)
    assert len(report["layers"]) == 11
    assert report["passthrough"]["model.layers.1.mlp.down_proj.weight"] == "copied"
    with pytest.raises(CheckpointError, match="--quantize-unquantized"):  # AIU cannot keep decoder linears bf16
        convert(src, tmp_path / "aiu")


@pytest.mark.parametrize(
    ("key", "entries"),
    [
        ("modules_to_not_convert", ["lm_head", "model.layers.1.self_attn"]),  # a parent of fp8 q/k/v/o
        ("ignored_layers", ["lm_head", "model.layers.0.mlp.up_proj"]),
        ("modules_to_not_convert", ["gate_proj"]),  # a substring
    ],
)
def test_fp8_module_in_an_ignore_list_is_refused(write, key: str, entries: list[str]) -> None:
    tensors, config = fp8_tensors("pertensor-dynamic", **SMALL)
    config["quantization_config"][key] = entries
    src = write(tensors, config, shards=2)
    with pytest.raises(UnsupportedSchemeError, match="in the config.s ignore list") as info:
        inspect_checkpoint(src)
    first = info.value.problems[0].split(" ")[0]
    assert f"({_file_of(src, first)}) is fp8" in info.value.problems[0]


def test_qwen_style_lists_name_norms_and_routers(make, tmp_path: Path) -> None:
    """Qwen3-30B-A3B lists per-layer mlp.gate and norms: non-linear names are harmless, the router stays bf16."""
    src = make("qwen3-moe-block")
    report = convert(src, tmp_path / "out", CPU)
    assert report["passthrough"]["model.layers.0.mlp.gate.weight"] == "copied"
    assert report["passthrough"]["model.layers.1.input_layernorm.weight"] == "copied"
    assert "model.layers.0.mlp.gate" not in report["layers"]


def test_deepseek_router_and_bias_pass_through_unchanged(make, tmp_path: Path) -> None:
    """No ignore list: fp8 + scale decides per tensor. The bf16 router and the F32 e_score_correction_bias are
    copied byte for byte in the CPU variant (the AIU target would cast float passthrough to bf16, reported)."""
    src = make("deepseek-moe")
    r = inspect_checkpoint(src, targets=frozenset({Target.CPU}))
    assert "model.layers.1.mlp.gate" in r["unquantized_linears"]  # layer 0 is dense (first_k_dense_replace)
    report = convert(src, tmp_path / "out", CPU)
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    assert report["passthrough"][bias] == "copied"
    assert report["passthrough"]["model.layers.1.mlp.gate.weight"] == "copied"
    assert not [s for s in report["lossy_steps"] if "e_score_correction_bias" in s]
    _, out = _out(tmp_path / "out")
    ckpt = Checkpoint(src)
    assert out[bias].dtype == torch.float32 and torch.equal(out[bias], ckpt.load(bias))
    assert torch.equal(out["model.layers.1.mlp.gate.weight"], ckpt.load("model.layers.1.mlp.gate.weight"))
    shared = [m for m in report["layers"] if ".shared_experts." in m]
    assert len(shared) == 3 and len(report["layers"]) == (5 + 3) + (5 + 3 * 4 + 3)  # MLA: 5 attention linears


@pytest.mark.parametrize(("variant", "kinds"), [("pertensor-kv", {"k", "v"}), ("legacy-kv", {"kv"})])
def test_kv_scales_listed_and_dropped(make, tmp_path: Path, variant: str, kinds: set[str]) -> None:
    src = make(variant, **SMALL)
    report = convert(src, tmp_path / "out")
    kvs = report["kv_cache_scales"]
    assert {k["kind"] for k in kvs} == kinds and len(kvs) == 2 * len(kinds)
    assert {k["module"] for k in kvs} == {"model.layers.0.self_attn", "model.layers.1.self_attn"}
    assert all(k["shape"] == [] and k["dtype"] == "float32" for k in kvs)
    assert f"{len(kvs)} KV-cache scale(s) dropped" in report["lossy_steps"][-1]
    for target in ("aiu", "cpu"):
        assert not [k for k in _tensors(tmp_path / "out" / target) if k.endswith(("k_scale", "v_scale"))]
        config = json.loads((tmp_path / "out" / target / "config.json").read_text())
        assert config["quantization_config"]["kv_cache_scheme"] is None


def test_kv_cache_scheme_without_scales_is_noted(make) -> None:
    src = make("pertensor-static", **SMALL)
    _edit_qc(src, kv_cache_scheme="static")
    r = inspect_checkpoint(src)
    assert "note: kv_cache_scheme is set but no k_scale/v_scale/kv_scale tensor was found" in r["evidence"]


# ---- MoE --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("variant", "count", "experts"), [("mixtral", 32, 24), ("qwen3-moe-block", 32, 24), ("deepseek-moe", 28, 12)]
)
def test_moe_every_expert_converted(make, tmp_path: Path, variant: str, count: int, experts: int) -> None:
    src = make(variant)
    report = convert(src, tmp_path / "out", CPU)
    ckpt, _, reader, plan = open_source(src)
    found = [lin.module for lin in plan.linears if ".experts." in lin.module]
    assert len(found) == experts and set(report["layers"]) == {lin.module for lin in plan.linears}
    assert len(plan.linears) == count
    _, out = _out(tmp_path / "out")
    for lin in plan.linears:
        ref = reader.read_linear(ckpt, lin)
        hp = dequantize_linear(ref)
        got = _dequant_out(out, lin.module)
        s_new = out[f"{lin.module}.weight_scale"].float()
        assert _within_one_rounding(got, hp, s_new.reshape(-1, 1) if s_new.numel() > 1 else s_new), lin.module
        rec = report["layers"][lin.module]
        if lin.scheme.granularity is Granularity.BLOCK:
            assert rec["sqnr_db"] >= REQUANT_SQNR_FLOOR_DB and "requantized per channel" in rec["actions"][0]
        if ref.input_scale is not None:  # per-expert static input scales stay per expert
            got_in = out[f"{lin.module}.input_scale"].float()
            assert bool((got_in >= ref.input_scale).all())
            assert bool(((got_in - ref.input_scale) <= 2 * BF16_REL * ref.input_scale).all())
    if variant == "mixtral":
        inputs = {float(ckpt.load(f"model.layers.0.block_sparse_moe.experts.{e}.w2.input_scale")) for e in range(4)}
        assert len(inputs) == 4  # one calibrated scale per expert, not collapsed to the max as vLLM does
        assert {lin.activation for lin in plan.linears} == {ActScheme.STATIC_TENSOR}


# ---- fp8 dtypes other than e4m3fn -----------------------------------------------------------------------
def test_fnuz_weights_convert_by_value(write, tmp_path: Path) -> None:
    """e4m3fnuz codes with a doubled scale mean the same values as e4m3fn (FORMATS.md 2.2). The reader hands
    them over as they are; normalization converts by value with the same scale, so only values below e4m3fn's
    subnormal step move (within half that step), and the report says so."""
    tensors, config = fp8_tensors("pertensor-dynamic", exact_bf16_scales=True)
    mod = "model.layers.0.mlp.up_proj"
    q_fn = tensors[mod + ".weight"]
    tensors[mod + ".weight"] = (q_fn.float() / 2).to(torch.float8_e4m3fnuz)
    tensors[mod + ".weight_scale"] = tensors[mod + ".weight_scale"] * 2
    assert torch.equal(tensors[mod + ".weight"].float() * 2, q_fn.float())  # exact re-encoding
    src = write(tensors, config)
    ckpt, _, reader, plan = open_source(src)
    lin = next(lin for lin in plan.linears if lin.module == mod)
    assert lin.weight.dtype == torch.float8_e4m3fnuz
    hp = dequantize_linear(reader.read_linear(ckpt, lin))
    torch.testing.assert_close(hp, q_fn.float() * (tensors[mod + ".weight_scale"] / 2), atol=0, rtol=0)
    report = convert(src, tmp_path / "out")
    _, out = _out(tmp_path / "out")
    got = _dequant_out(out, mod)
    scale = out[mod + ".weight_scale"].float()
    big = hp.abs() >= 2.0**-6 * scale  # e4m3fn normal range: unchanged
    assert torch.equal(got[big], hp[big])
    assert bool(((got - hp).abs() <= scale * 2.0**-10).all())
    rec = report["layers"][mod]
    assert "e4m3fnuz -> e4m3fn by value" in rec["actions"][0] and rec["changed_codes"] == int((got != hp).sum())


def test_e5m2_weights_are_requantized(write, tmp_path: Path) -> None:
    """No LLM checkpoint with e5m2 weights is known (FORMATS.md Q8); accepted all the same, requantized by value."""
    tensors, config = fp8_tensors("pertensor-dynamic", exact_bf16_scales=True)
    mod = "model.layers.1.self_attn.q_proj"
    tensors[mod + ".weight"] = tensors[mod + ".weight"].float().to(torch.float8_e5m2)
    src = write(tensors, config)
    report = convert(src, tmp_path / "out")
    ckpt, _, reader, plan = open_source(src)
    lin = next(lin for lin in plan.linears if lin.module == mod)
    hp = dequantize_linear(reader.read_linear(ckpt, lin))
    _, out = _out(tmp_path / "out")
    got = _dequant_out(out, mod)
    assert _within_one_rounding(got, hp, out[mod + ".weight_scale"].float())
    rec = report["layers"][mod]
    assert "float8_e5m2 -> e4m3fn: requantized by value" in rec["actions"][0]
    assert rec["sqnr_db"] == "inf" or rec["sqnr_db"] >= REQUANT_SQNR_FLOOR_DB  # e5m2 values mostly fit e4m3


# ---- refusals, each naming tensor + shard file -------------------------------------------------------------
def _refused(src: Path, tmp_path: Path, cls: type[CheckpointError], *fragments: str) -> str:
    with pytest.raises(cls) as info:
        convert(src, tmp_path / "refused")
    text = info.value.render()
    for fragment in fragments:
        assert fragment in text, text
    assert not (tmp_path / "refused").exists()
    return text


def test_missing_block_scale_deepseek_style(write, tmp_path: Path) -> None:
    """An fp8 weight without its scale (sgl-project DeepSeek-V4-Flash-FP8 mtp tensors) is never passed through."""
    tensors, config = fp8_tensors("block")
    mod = "model.layers.1.mlp.down_proj"
    del tensors[mod + ".weight_scale_inv"]
    src = write(tensors, config, shards=3)
    _refused(
        src,
        tmp_path,
        MissingTensorError,
        f"{mod}.weight ({_file_of(src, mod + '.weight')}) is float8_e4m3fn but has no scale: expected "
        f"{mod}.weight_scale_inv [2, 3] (L2 block 128x128)",
        "never passed through without its scale",
        "Fix: if the download is partial",
    )


def test_missing_per_tensor_scale(write, tmp_path: Path) -> None:
    tensors, config = fp8_tensors("pertensor-static", **SMALL)
    mod = "model.layers.0.self_attn.k_proj"
    del tensors[mod + ".weight_scale"]
    src = write(tensors, config, shards=2)
    _refused(
        src,
        tmp_path,
        MissingTensorError,
        f"{mod}.weight ({_file_of(src, mod + '.weight')}) is float8_e4m3fn but has no scale: expected "
        f"{mod}.weight_scale [] (L1 per-tensor)",
    )


def test_missing_static_input_scale(write, tmp_path: Path) -> None:
    tensors, config = fp8_tensors("mistral-hf", **SMALL)
    mod = "model.layers.1.mlp.gate_proj"
    del tensors[mod + ".activation_scale"]
    src = write(tensors, config)
    _refused(
        src,
        tmp_path,
        MissingTensorError,
        f"{mod}.activation_scale is missing for {mod}.weight (model.safetensors): config.json activation_scheme "
        "is 'static'",
        "set activation_scheme to 'dynamic'",
    )


@pytest.mark.parametrize(
    ("variant", "shape", "fragment"),
    [
        ("block", (2, 2), "has shape [2, 2], but block 128x128 scales (weight_block_size [128, 128] in config.json) "),
        ("pertensor-static", (256, 1), "It looks per-channel (fbgemm_fp8 / compressed-tensors store [out, 1])"),
        ("mistral-hf", (2, 4), "config.json lost its weight_block_size"),
    ],
)
def test_bad_scale_shape(write, tmp_path: Path, variant: str, shape: tuple[int, ...], fragment: str) -> None:
    tensors, config = fp8_tensors(variant, hidden=256 if variant != "block" else 192)
    mod = "model.layers.0.mlp.down_proj"
    name = "weight_scale" if variant == "pertensor-static" else "weight_scale_inv"
    tensors[f"{mod}.{name}"] = torch.ones(shape) * 1e-3
    src = write(tensors, config, shards=2)
    _refused(
        src, tmp_path, UnsupportedSchemeError, f"{mod}.{name} ({_file_of(src, f'{mod}.{name}')}) has shape", fragment
    )


@pytest.mark.parametrize(
    ("variant", "dtype", "fragment"),
    [
        ("block", torch.float64, "has dtype float64; expected float32, bfloat16 or float16 (or uint8 e8m0 bytes"),
        ("pertensor-dynamic", torch.int32, "has dtype int32; expected float32, bfloat16 or float16. Fix:"),
        ("block", torch.uint8, "has dtype uint8 (e8m0 exponent bytes?), but config.json does not declare"),
    ],
)
def test_bad_scale_dtype(write, tmp_path: Path, variant: str, dtype: torch.dtype, fragment: str) -> None:
    tensors, config = fp8_tensors(variant, **SMALL)
    key = "model.layers.1.self_attn.v_proj." + ("weight_scale_inv" if variant == "block" else "weight_scale")
    tensors[key] = tensors[key].to(dtype) if dtype.is_floating_point else torch.ones_like(tensors[key], dtype=dtype)
    src = write(tensors, config)
    _refused(src, tmp_path, UnsupportedSchemeError, f"{key} (model.safetensors) {fragment}")


def test_both_spellings_on_one_block_module(write, tmp_path: Path) -> None:
    tensors, config = fp8_tensors("block", **SMALL)
    mod = "model.layers.0.self_attn.q_proj"
    tensors[mod + ".weight_scale"] = tensors[mod + ".weight_scale_inv"].clone()
    src = write(tensors, config)
    _refused(
        src,
        tmp_path,
        UnsupportedSchemeError,
        f"{mod}.weight_scale (model.safetensors): this checkpoint's layout (L2 block 128x128) names the weight "
        f"scale weight_scale_inv, and {mod} has both spellings",
    )


@pytest.mark.parametrize(
    ("variant", "extra", "fragment"),
    [
        ("pertensor-dynamic", "input_scale", "activation_scheme is 'dynamic', which stores no input scale"),
        ("block", "input_scale", "activation_scheme is 'dynamic', which stores no input scale"),
        ("mistral-hf", "input_scale", "names its static input scale activation_scale: mixed spellings"),
        ("pertensor-static", "output_scale", "not a tensor of the L1 per-tensor layout with static activations"),
    ],
)
def test_tensors_the_layout_does_not_have(write, tmp_path: Path, variant: str, extra: str, fragment: str) -> None:
    tensors, config = fp8_tensors(variant, **SMALL)
    mod = "model.layers.0.mlp.up_proj"
    tensors[f"{mod}.{extra}"] = torch.tensor(0.01)
    src = write(tensors, config)
    _refused(src, tmp_path, UnsupportedSchemeError, f"{mod}.{extra} (model.safetensors): ", fragment)


def _fuse_experts(tensors: dict[str, torch.Tensor], scale_name: str, layers: int, experts: int) -> None:
    """Rewrite per-expert tensors into transformers 5's fused layout (gate_up_proj [E, 2I, H], down_proj)."""
    for i in range(layers):
        p = f"model.layers.{i}.mlp.experts"
        for fused, parts in (("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",))):
            ws, ss = [], []
            for e in range(experts):
                ws.append(torch.cat([tensors.pop(f"{p}.{e}.{q}.weight").view(torch.uint8) for q in parts]))
                ss.append(torch.cat([tensors.pop(f"{p}.{e}.{q}.weight_scale_inv") for q in parts]))
            tensors[f"{p}.{fused}"] = torch.stack(ws).view(torch.float8_e4m3fn)
            tensors[f"{p}.{fused}_{scale_name}"] = torch.stack(ss)


@pytest.mark.parametrize("scale_name", ["scale_inv", "weight_scale_inv"])
def test_fused_3d_experts_split_per_expert(write, tmp_path: Path, scale_name: str, monkeypatch) -> None:
    """transformers 5 fused `experts.gate_up_proj [E, 2I, H]` + `_scale_inv [E, ...]` (block 128): split into
    per-expert gate/up/down linears, giving byte-identical outputs to the per-expert checkpoint; each expert's
    weight and scales are read alone, never the whole fused tensor (E^2 bytes over a layer)."""
    dims = {"hidden": 128, "moe_intermediate": 128, "intermediate": 256, "vocab": 64}
    tensors, config = fp8_tensors("qwen3-moe-block", **dims)
    per_expert = write(tensors, config)
    _fuse_experts(tensors, scale_name, layers=2, experts=4)
    fused = write(tensors, config)
    a = convert(per_expert, tmp_path / "a", CPU)
    whole: list[str] = []
    load = Checkpoint.load
    monkeypatch.setattr(
        Checkpoint, "load", lambda self, k, index=None: (index is None and whole.append(k)) or load(self, k, index)
    )
    b = convert(fused, tmp_path / "b", CPU)
    assert not [k for k in whole if ".experts." in k and "proj" in k]
    assert a["layers"] == b["layers"] and len(b["layers"]) == 2 * (4 + 4 * 3)
    _, out_a = _out(tmp_path / "a")
    _, out_b = _out(tmp_path / "b")
    assert out_a.keys() == out_b.keys() and all(torch.equal(out_a[k], out_b[k]) for k in out_a)


def test_fused_3d_experts_not_splittable_are_refused(write, tmp_path: Path) -> None:
    """gate_up rows that do not split at a 128-row scale block, and fused tensors with other names."""
    tensors, config = fp8_tensors("qwen3-moe-block", **SMALL)
    tensors["model.layers.0.mlp.experts.gate_up_proj"] = torch.zeros(4, 64, 64).to(torch.float8_e4m3fn)
    tensors["model.layers.0.mlp.experts.gate_up_proj_scale_inv"] = torch.ones(4, 1, 1)
    tensors["model.layers.0.mlp.mixer"] = torch.zeros(4, 8, 8).to(torch.float8_e4m3fn)
    src = write(tensors, config)
    _refused(
        src,
        tmp_path,
        UnsupportedSchemeError,
        "model.layers.0.mlp.experts.gate_up_proj (model.safetensors): gate_up rows 64 do not split",
        "model.layers.0.mlp.mixer (model.safetensors): a fused 3-D fp8 tensor that is not experts.gate_up_proj",
    )


def test_scale_without_fp8_weight(write, tmp_path: Path) -> None:
    tensors, config = fp8_tensors("block", unquantized=("0.mlp.up_proj",), **SMALL)
    tensors["model.layers.0.mlp.up_proj.weight_scale_inv"] = torch.ones(1, 1)
    src = write(tensors, config)
    _refused(
        src,
        tmp_path,
        UnsupportedSchemeError,
        "model.layers.0.mlp.up_proj.weight (model.safetensors) is bfloat16 but has weight_scale_inv",
    )


def test_per_tensor_scales_of_shape_one_are_read_like_scalars(write, tmp_path: Path) -> None:
    """vLLM accepts [] or [1] per-tensor scales; so does the reader (same values, same output)."""
    tensors, config = fp8_tensors("pertensor-static", exact_bf16_scales=True, **SMALL)
    a = write(tensors, config)
    reshaped = {k: (v.reshape(1) if k.endswith(("weight_scale", "input_scale")) else v) for k, v in tensors.items()}
    b = write(reshaped, config)
    convert(a, tmp_path / "a")
    convert(b, tmp_path / "b")
    ta, tb = _tensors(tmp_path / "a" / "aiu"), _tensors(tmp_path / "b" / "aiu")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.cpu_model
@pytest.mark.parametrize("variant", ["mixtral", "qwen3-moe-block", "mistral-hf"])
def test_cpu_variant_runs_like_the_dequantized_model(make, tmp_path: Path, variant: str) -> None:
    """The CPU variant of each non-AIU fp8-family fixture loads and agrees with transformers' own model on the
    dequantized weights (W8A8 vs weight-only on a random tiny model: cosine ~0.999, NUMERICS.md)."""
    pytest.importorskip("transformers")
    from cpu_reference import cosine, logits_vs_transformers

    dims = {**SMALL, "moe_intermediate": 32}
    convert(make(variant, **dims), tmp_path / "out", CPU)
    model = TinyModel(**{**DEFAULT_DIMS.get(variant, {}), **dims})
    got, ref = logits_vs_transformers(tmp_path / "out" / "cpu", tmp_path / "dense", model)
    cos = cosine(got, ref)
    assert float(cos) > 0.99, float(cos)
