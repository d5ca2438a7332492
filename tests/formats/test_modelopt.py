"""NVIDIA ModelOpt (FORMATS.md L7): fixtures as ModelOpt writes them, detection (config.json, legacy
hf_quant_config.json, AngelSlim, the modelopt-with-config_groups trap), scale direction and exactness per variant,
fused-expert splitting, KV scales, and the message of every refusal."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fp8convert.errors import MissingTensorError, UnsupportedSchemeError
from fp8convert.examples import TinyModel, dense_tensors
from fp8convert.formats import REGISTRY, detect_format, open_source
from fp8convert.formats.base import matches
from fp8convert.numerics import dequantize_linear, expand_scale
from fp8convert.pipeline import ConvertOptions, convert, inspect_checkpoint
from fp8convert.shards import Checkpoint
from fp8convert.spec import ActScheme, Granularity, Target

from fixtures.modelopt_fbgemm import MODELOPT_VARIANTS, build_modelopt
from tolerances import E4M3_REL, REQUANT_SQNR_FLOOR_DB, SQNR_DB_ABS

CPU = ConvertOptions(targets=frozenset({Target.CPU}))
MOE = {"qwen3-moe", "fused-experts"}


def _model(variant: str, **dims: object) -> TinyModel:
    return TinyModel(**({"arch": "qwen3_moe"} if variant in MOE else {}) | dims)  # type: ignore[arg-type]


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _header(src: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    return {k: (r.dtype, r.shape) for k, r in Checkpoint(src).tensors.items()}


def _within_one_rounding(got: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor) -> bool:
    """|got - ref| <= half an e4m3 ulp of ref (normal range) or half the subnormal step (2^-10 in fp8 units),
    with 2^-20 relative slack for the fp32 products."""
    bound = (E4M3_REL * ref.abs() + scale * 2.0**-10) * (1 + 2.0**-20)
    return bool(((got - ref).abs() <= bound).all())


def _sqnr(ref: torch.Tensor, got: torch.Tensor) -> float:
    noise = float((got.double() - ref.double()).pow(2).sum())
    return math.inf if noise == 0 else 10 * math.log10(float(ref.double().pow(2).sum()) / noise)


# ---- the fixtures are what ModelOpt writes ---------------------------------------------------------------------
def test_fixture_keys_dtypes_shapes(tmp_path: Path) -> None:
    f32, f8 = torch.float32, torch.float8_e4m3fn
    q = "model.layers.0.self_attn.q_proj"
    fp8 = _header(build_modelopt(tmp_path / "fp8", "fp8"))
    assert fp8[f"{q}.weight"] == (f8, (256, 256)) and fp8[f"{q}.weight_scale"] == (f32, ())
    assert fp8[f"{q}.input_scale"] == (f32, ()) and fp8["lm_head.weight"] == (torch.bfloat16, (512, 256))
    pcpt = _header(build_modelopt(tmp_path / "pcpt", "pcpt"))
    assert pcpt[f"{q}.weight_scale"] == (f32, (256,)) and f"{q}.input_scale" not in pcpt
    pb = _header(build_modelopt(tmp_path / "pb", "pb_wo", kv_heads=1))
    assert pb["model.layers.0.mlp.down_proj.weight_scale"] == (f32, (2, 1, 4, 1))  # [ceil(256/128), 1, 512/128, 1]
    assert pb["model.layers.0.self_attn.k_proj.weight_scale"] == (f32, (1, 1, 2, 1))  # out 64: one padded row block
    kv = _header(build_modelopt(tmp_path / "kv", "kv"))
    assert kv["model.layers.1.self_attn.k_proj.k_scale"] == (f32, ()) and "model.layers.1.self_attn.k_scale" not in kv
    fused = _header(build_modelopt(tmp_path / "fused", "fused-experts"))
    e = "model.layers.0.mlp.experts"
    assert fused[f"{e}.gate_up_proj"] == (f8, (4, 256, 128)) and fused[f"{e}.down_proj"] == (f8, (4, 64, 256))
    assert fused[f"{e}.gate_up_proj_weight_scale"] == (f32, ()) and fused[f"{e}.down_proj_input_scale"] == (f32, ())
    assert not [k for k in fused if ".experts.0." in k]


def test_fixture_config_files(tmp_path: Path) -> None:
    """config.json as convert_hf_quant_config_format writes it, next to hf_quant_config.json (ModelOpt >= 0.31);
    legacy and AngelSlim exports have only the latter (AngelSlim without producer)."""
    src = build_modelopt(tmp_path / "fp8", "kv")
    qc = json.loads((src / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "modelopt" and qc["quant_algo"] == "FP8" and qc["ignore"] == ["lm_head"]
    assert qc["config_groups"]["group_0"]["weights"] == {"dynamic": False, "num_bits": 8, "type": "float"}
    assert qc["kv_cache_scheme"] == {"dynamic": False, "num_bits": 8, "type": "float"}
    hq = json.loads((src / "hf_quant_config.json").read_text())
    assert hq["producer"]["name"] == "modelopt" and hq["quantization"]["kv_cache_quant_algo"] == "FP8"
    for variant in ("legacy", "angelslim"):
        s = build_modelopt(tmp_path / variant, variant)
        assert "quantization_config" not in json.loads((s / "config.json").read_text())
        assert ("producer" in json.loads((s / "hf_quant_config.json").read_text())) is (variant == "legacy")


# ---- detection -------------------------------------------------------------------------------------------------
RULES = {
    "fp8": "quant_method starts with modelopt",
    "legacy": "producer.name is modelopt",
    "angelslim": "no producer",
    "mixed-with-config-groups": "quant_method starts with modelopt",
}


@pytest.mark.parametrize("variant", MODELOPT_VARIANTS)
def test_detection(tmp_path: Path, variant: str) -> None:
    src = build_modelopt(tmp_path / "src", variant)
    ckpt = Checkpoint(src)
    reader, det = detect_format(ckpt, ckpt.config())
    assert reader.name == det.format == "modelopt"
    assert RULES.get(variant, "quant_method starts with modelopt") in det.rule


def test_modelopt_with_config_groups_is_not_compressed_tensors(tmp_path: Path) -> None:
    """The trap of FORMATS.md 7: quant_method modelopt *and* compressed-tensors-looking config_groups."""
    src = build_modelopt(tmp_path / "src", "mixed-with-config-groups")
    ckpt = Checkpoint(src)
    config = ckpt.config()
    assert "config_groups" in config["quantization_config"] and config["quantization_config"]["format"]
    assert REGISTRY["compressed-tensors"].detect(ckpt, config) is None
    reader, det = detect_format(ckpt, config)
    assert reader.name == "modelopt" and any("config_groups present but ignored" in e for e in det.evidence)
    plan = open_source(src)[3]
    kinds = {(lin.module.split(".")[3], lin.scheme.granularity, lin.activation) for lin in plan.linears}
    assert kinds == {
        ("self_attn", Granularity.TENSOR, ActScheme.STATIC_TENSOR),
        ("mlp", Granularity.CHANNEL, ActScheme.DYNAMIC_TOKEN),
    }


def test_hf_quant_config_is_not_read_when_config_json_names_another_method(tmp_path: Path) -> None:
    """FORMATS.md 7 step 2: hf_quant_config.json is the fallback only when config.json has no quantization block."""
    src = build_modelopt(tmp_path / "src", "angelslim")
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "static"}
    (src / "config.json").write_text(json.dumps(config))
    ckpt = Checkpoint(src)
    assert REGISTRY["modelopt"].detect(ckpt, ckpt.config()) is None
    (src / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": "other"}, "quantization": {}}))
    config.pop("quantization_config")
    (src / "config.json").write_text(json.dumps(config))
    assert REGISTRY["modelopt"].detect(Checkpoint(src), config) is None


def test_config_json_spellings(tmp_path: Path) -> None:
    """config.json alone, with the hf_quant_config.json key names and a lower-case algorithm, reads the same."""
    src = build_modelopt(tmp_path / "src", "kv")
    (src / "hf_quant_config.json").unlink()
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "modelopt",
        "quant_algo": "fp8",
        "kv_cache_quant_algo": None,
        "exclude_modules": ["lm_head"],
    }
    (src / "config.json").write_text(json.dumps(config))
    r = inspect_checkpoint(src)
    assert r["format"] == "modelopt" and len(r["linears"]) == 14 and len(r["kv_cache_scales"]) == 4
    assert r["target"] == {"weights": "tensor", "activations": "static-tensor"}


# ---- scale direction and exactness ------------------------------------------------------------------------------
NUMERIC = ("fp8", "legacy", "angelslim", "pcpt", "kv", "mixed-with-config-groups", "qwen3-moe", "fused-experts")


@pytest.mark.parametrize("variant", NUMERIC)
def test_exact_scales_dequantize_to_the_original(tmp_path: Path, variant: str) -> None:
    """bf16-valued scales: the source dequantizes (fp8 * scale) to the bf16 original within one e4m3 rounding, and
    the converted weight dequantizes to exactly the source's (atol=0): the multiplier direction, end to end."""
    src = build_modelopt(tmp_path / "src", variant, exact_scales=True)
    report = convert(src, tmp_path / "out", CPU)
    original = dense_tensors(_model(variant))
    ckpt, _, reader, plan = open_source(src)
    out = _tensors(tmp_path / "out" / "cpu")
    assert plan.linears
    if variant != "mixed-with-config-groups":  # there, static per-tensor activations become dynamic per token
        assert report["summary"]["exact"] == len(plan.linears)
    for lin in plan.linears:
        ref = reader.read_linear(ckpt, lin)
        hp = dequantize_linear(ref)
        scale = expand_scale(ref.weight_scale, ref.scheme, lin.out_features, lin.in_features)
        assert _within_one_rounding(hp, original[f"{lin.module}.weight"].float(), scale), lin.module
        got = out[f"{lin.module}.weight"].float() * out[f"{lin.module}.weight_scale"].float().reshape(-1, 1)
        torch.testing.assert_close(got, hp, atol=0, rtol=0)
        assert report["layers"][lin.module]["changed_codes"] == 0


@pytest.mark.parametrize("variant", ["fp8", "pcpt", "qwen3-moe", "fused-experts"])
def test_f32_scales_are_rounded_up_and_reported(tmp_path: Path, variant: str) -> None:
    """ModelOpt's F32 amax/448 scales are rarely bf16 values: rounded up to bf16 (by less than 2^-8, which moves no
    e4m3 code: half a code step is 2^-4), so each layer is within one rounding of the source, with its SQNR above
    the floor and stated in the report."""
    src = build_modelopt(tmp_path / "src", variant)
    report = convert(src, tmp_path / "out", CPU)
    ckpt, _, reader, plan = open_source(src)
    out = _tensors(tmp_path / "out" / "cpu")
    for lin in plan.linears:
        ref = reader.read_linear(ckpt, lin)
        hp = dequantize_linear(ref)
        s_new = out[f"{lin.module}.weight_scale"].float().reshape(-1, 1)
        assert bool((s_new.reshape(-1) >= ref.weight_scale.reshape(-1)).all())
        got = out[f"{lin.module}.weight"].float() * s_new
        assert _within_one_rounding(got, hp, s_new), lin.module
        assert torch.equal(out[f"{lin.module}.weight"].view(torch.uint8), ref.weight.view(torch.uint8))
        rec = report["layers"][lin.module]
        assert rec["exact"] is False and rec["changed_codes"] == 0 and "rounded up" in rec["actions"][0]
        assert (
            rec["sqnr_db"] == pytest.approx(_sqnr(hp, got), abs=SQNR_DB_ABS) and rec["sqnr_db"] >= REQUANT_SQNR_FLOOR_DB
        )
    assert len(report["lossy_steps"]) == len(plan.linears)


@pytest.mark.parametrize("dims", [{}, {"kv_heads": 1}], ids=["aligned", "k_v-out-64"])
def test_pb_wo_block_scales_requantized_per_channel(tmp_path: Path, dims: dict) -> None:
    """4-D [ceil(out/128), 1, in/128, 1] grids decode to 128x128 tiles (edge row tiles padded); weight-only becomes
    per channel + per token: one extra rounding, SQNR above the floor, reported."""
    src = build_modelopt(tmp_path / "src", "pb_wo", exact_scales=True, **dims)
    report = convert(src, tmp_path / "out")
    assert report["target"] == {**report["target"], "weights": "channel", "activations": "dynamic-token"}
    original = dense_tensors(TinyModel(**dims))
    ckpt, _, reader, plan = open_source(src)
    out = _tensors(tmp_path / "out" / "aiu")
    for lin in plan.linears:
        assert lin.scheme.block == (128, 128) and lin.activation is ActScheme.NONE
        ref = reader.read_linear(ckpt, lin)
        assert ref.weight_scale.shape == (-(-lin.out_features // 128), lin.in_features // 128)
        hp = dequantize_linear(ref)
        scale = expand_scale(ref.weight_scale, ref.scheme, lin.out_features, lin.in_features)
        assert _within_one_rounding(hp, original[f"{lin.module}.weight"].float(), scale), lin.module
        s_new = out[f"{lin.module}.weight_scale"]
        assert s_new.dtype == torch.bfloat16 and s_new.shape == (lin.out_features, 1)
        got = out[f"{lin.module}.weight"].float() * s_new.float()
        assert _within_one_rounding(got, hp, s_new.float()), lin.module
        rec = report["layers"][lin.module]
        assert rec["sqnr_db"] >= REQUANT_SQNR_FLOOR_DB and "block 128x128 -> channel" in rec["actions"][0]
        assert any("activations none -> dynamic-token" in a for a in rec["actions"])


def test_aiu_tensors_per_tensor_static(tmp_path: Path) -> None:
    """The default export (llama, FP8) converts to the AIU target: 0-d scales become [1] bf16, lm_head stays bf16,
    hf_quant_config.json is not carried over."""
    src = build_modelopt(tmp_path / "src", "fp8", exact_scales=True)
    report = convert(src, tmp_path / "out")
    assert report["target"] == {**report["target"], "weights": "tensor", "activations": "static-tensor"}
    aiu = _tensors(tmp_path / "out" / "aiu")
    q = "model.layers.1.self_attn.q_proj"
    assert aiu[f"{q}.weight"].dtype == torch.float8_e4m3fn and aiu[f"{q}.weight"].shape == (256, 256)
    for suffix in ("weight_scale", "input_scale"):
        assert aiu[f"{q}.{suffix}"].dtype == torch.bfloat16 and aiu[f"{q}.{suffix}"].shape == (1,)
    source = _tensors(src)
    assert torch.equal(aiu[f"{q}.input_scale"].float().reshape(()), source[f"{q}.input_scale"])
    assert aiu["lm_head.weight"].dtype == torch.bfloat16 and "lm_head.weight_scale" not in aiu
    assert not list((tmp_path / "out").rglob("hf_quant_config.json"))
    qc = json.loads((tmp_path / "out" / "aiu" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and "quant_algo" not in qc
    assert report["summary"]["exact"] == 14 and not report["lossy_steps"]


def test_aiu_tensors_per_channel(tmp_path: Path) -> None:
    """FP8_PER_CHANNEL_PER_TOKEN: [out] scales become [out, 1] bf16, no input_scale."""
    src = build_modelopt(tmp_path / "src", "pcpt", exact_scales=True)
    report = convert(src, tmp_path / "out")
    aiu = _tensors(tmp_path / "out" / "aiu")
    for lin in open_source(src)[3].linears:
        s = aiu[f"{lin.module}.weight_scale"]
        assert s.dtype == torch.bfloat16 and s.shape == (lin.out_features, 1)
        assert f"{lin.module}.input_scale" not in aiu
    assert report["summary"]["exact"] == 14


# ---- KV scales ---------------------------------------------------------------------------------------------------
def test_kv_scales_listed_and_dropped(tmp_path: Path) -> None:
    src = build_modelopt(tmp_path / "src", "kv")
    report = convert(src, tmp_path / "out")
    kvs = report["kv_cache_scales"]
    assert sorted((k["module"], k["kind"]) for k in kvs) == [
        (f"model.layers.{i}.self_attn", kind) for i in (0, 1) for kind in ("k", "v")
    ]
    assert all(k["shape"] == [] and k["dtype"] == "float32" for k in kvs)
    assert {k["key"] for k in kvs} == {f"model.layers.{i}.self_attn.{c}_proj.{c}_scale" for i in (0, 1) for c in "kv"}
    source = _tensors(src)
    assert all(float(source[k["key"]]) >= 1.0 for k in kvs)  # ModelOpt clamps FP8 KV scales to >= 1
    for target in ("aiu", "cpu"):
        assert not [k for k in _tensors(tmp_path / "out" / target) if k.endswith(("k_scale", "v_scale"))]
    assert any("4 KV-cache scale(s) dropped" in s for s in report["lossy_steps"])


def test_kv_scales_of_any_attention_module_name(tmp_path: Path) -> None:
    """ModelOpt names KV scales after the attention module that holds the bmm quantizers, whatever its name."""
    src = build_modelopt(
        tmp_path / "src", "kv", edit=_set("model.layers.1.cross_attn.v_proj.v_scale", torch.tensor(1.0))
    )
    r = inspect_checkpoint(src)
    assert len(r["kv_cache_scales"]) == 5
    plan = open_source(src)[3]
    assert ("model.layers.1.cross_attn", "v") in {(k.module, k.kind) for k in plan.kv_scales}
    assert "model.layers.1.cross_attn.v_proj.v_scale" in plan.dropped


# ---- MoE ---------------------------------------------------------------------------------------------------------
def test_per_expert_linears_share_input_scales(tmp_path: Path) -> None:
    src = build_modelopt(tmp_path / "src", "qwen3-moe")
    ckpt, _, reader, plan = open_source(src)
    assert len(plan.linears) == 2 * (4 + 3 * 4)
    assert plan.unquantized_linears == ["lm_head", "model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    gate = [reader.read_linear(ckpt, lin) for lin in plan.linears if lin.module.endswith("mlp.experts.0.gate_proj")]
    ups = [
        reader.read_linear(ckpt, lin)
        for lin in plan.linears
        if lin.module.startswith("model.layers.0.mlp.experts.") and lin.module.endswith(("gate_proj", "up_proj"))
    ]
    assert len(gate) == 2 and len({float(u.input_scale) for u in ups}) == 1  # type: ignore[arg-type]
    report = convert(src, tmp_path / "out", CPU)
    assert report["passthrough"]["model.layers.0.mlp.gate.weight"] == "copied"


FUSED_CASES = {
    "bmm-shared": {},
    "bmm-per-expert": {"expert_scales": "per-expert"},
    "out-in": {"fused_layout": "out-in"},
    "bmm-pcpt": {"algo": "FP8_PER_CHANNEL_PER_TOKEN"},
}


@pytest.mark.parametrize("case", sorted(FUSED_CASES))
def test_fused_experts_split_into_slices(tmp_path: Path, case: str) -> None:
    """Each expert's gate/up/down equals its slice of the fused tensor (codes, scales, dequantized values)."""
    options = FUSED_CASES[case]
    src = build_modelopt(tmp_path / "src", "fused-experts", **options)
    source = _tensors(src)
    ckpt, _, reader, plan = open_source(src)
    linears = {lin.module: lin for lin in plan.linears}
    m = TinyModel(arch="qwen3_moe")
    inter = m.moe_intermediate
    for i in range(m.layers):
        base = f"model.layers.{i}.mlp.experts"
        for proj, rows in (
            ("gate_up_proj", {"gate_proj": (0, inter), "up_proj": (inter, 2 * inter)}),
            ("down_proj", {"down_proj": None}),
        ):
            codes = source[f"{base}.{proj}"]
            codes = codes.transpose(1, 2) if options.get("fused_layout", "bmm") == "bmm" else codes  # [E, out, in]
            scale = source[f"{base}.{proj}_weight_scale"]
            for e in range(m.experts):
                s_e = scale if scale.dim() == 0 else scale[e]
                for name, r in rows.items():
                    lin = linears[f"{base}.{e}.{name}"]
                    assert lin.expert == e and lin.rows == r
                    ref = reader.read_linear(ckpt, lin)
                    want = codes[e] if r is None else codes[e][r[0] : r[1]]
                    assert torch.equal(ref.weight.view(torch.uint8), want.view(torch.uint8))
                    s_want = (s_e if s_e.dim() == 0 or r is None else s_e[r[0] : r[1]]).float()
                    assert torch.equal(ref.weight_scale.reshape(-1), s_want.reshape(-1))
                    full = codes[e].float() * (s_e.reshape(-1, 1) if s_e.dim() else s_e)
                    hp = full if r is None else full[r[0] : r[1]]
                    torch.testing.assert_close(dequantize_linear(ref), hp, atol=0, rtol=0)
                    if "algo" not in options:
                        assert torch.equal(ref.input_scale, source[f"{base}.{proj}_input_scale"].reshape(1))  # type: ignore[arg-type]
    report = convert(src, tmp_path / "out", CPU)
    out = _tensors(tmp_path / "out" / "cpu")
    assert not [k for k in out if k.endswith(("gate_up_proj", "experts.down_proj")) or "_weight_scale" in k]
    assert out["model.layers.1.mlp.experts.3.up_proj.weight"].shape == (inter, m.hidden)
    assert out["model.layers.1.mlp.experts.3.down_proj.weight"].shape == (m.hidden, inter)
    assert report["summary"]["linears"] == 2 * (4 + 3 * 4)


# ---- exclude_modules ---------------------------------------------------------------------------------------------
def test_exclude_modules_are_fnmatch_wildcards(tmp_path: Path) -> None:
    """ModelOpt's `module_path*` wildcards: the excluded layer stays bf16; the AIU target needs
    --quantize-unquantized for it, the CPU target keeps it."""
    model = TinyModel()
    original = dense_tensors(model)

    def keep_layer1_attention_bf16(t: dict[str, torch.Tensor]) -> None:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            mod = f"model.layers.1.self_attn.{name}"
            for suffix in ("weight_scale", "input_scale"):
                t.pop(f"{mod}.{suffix}")
            t[f"{mod}.weight"] = original[f"{mod}.weight"]

    src = build_modelopt(tmp_path / "src", "legacy", edit=keep_layer1_attention_bf16)
    hq = json.loads((src / "hf_quant_config.json").read_text())
    hq["quantization"]["exclude_modules"] = ["lm_head", "model.layers.1.self_attn*"]
    (src / "hf_quant_config.json").write_text(json.dumps(hq))
    assert matches("model.layers.1.self_attn.q_proj", ["model.layers.1.self_attn*"], style="fnmatch")
    r = inspect_checkpoint(src)
    assert len(r["linears"]) == 10
    assert sorted(r["unquantized_linears"]) == ["lm_head"] + [f"model.layers.1.self_attn.{n}_proj" for n in "koqv"]
    with pytest.raises(Exception, match="--quantize-unquantized"):
        convert(src, tmp_path / "a", ConvertOptions(targets=frozenset({Target.AIU, Target.CPU})))
    q = convert(src, tmp_path / "b", ConvertOptions(quantize_unquantized=True))
    assert q["layers"]["model.layers.1.self_attn.o_proj"]["source"] == "bf16 (unquantized)"


# ---- refusals ----------------------------------------------------------------------------------------------------
def _set_algo(src: Path, algo: str, **extra: object) -> None:
    hq = json.loads((src / "hf_quant_config.json").read_text())
    hq["quantization"]["quant_algo"] = algo
    hq["quantization"].update(extra)
    (src / "hf_quant_config.json").write_text(json.dumps(hq))


@pytest.mark.parametrize(
    ("algo", "message"),
    [
        ("NVFP4", "quant_algo 'NVFP4' is not supported: NVFP4 stores 4-bit weights, not FP8"),
        ("W4A8_AWQ", "quant_algo 'W4A8_AWQ' is not supported: W4A8_AWQ stores int4 weights"),
        ("MXFP8", "quant_algo 'MXFP8' is not supported: MXFP8 .* is not supported"),
        ("INT8_SQ", "quant_algo 'INT8_SQ' is not supported: it is not an FP8 weight format"),
    ],
)
def test_non_fp8_algorithms_are_refused_by_name(tmp_path: Path, algo: str, message: str) -> None:
    src = build_modelopt(tmp_path / "src", "legacy")
    _set_algo(src, algo)
    with pytest.raises(UnsupportedSchemeError, match=message) as info:
        convert(src, tmp_path / "out")
    assert "hf_quant_config.json.quantization" in str(info.value.where) and "FP8_PER_CHANNEL_PER_TOKEN" in str(
        info.value.hint
    )
    assert not (tmp_path / "out").exists()


def test_mixed_precision_with_a_non_fp8_layer(tmp_path: Path) -> None:
    src = build_modelopt(tmp_path / "src", "mixed-with-config-groups")
    hq = json.loads((src / "hf_quant_config.json").read_text())
    hq["quantization"]["quantized_layers"]["model.layers.1.mlp.down_proj"] = {"quant_algo": "W4A16_AWQ"}
    (src / "hf_quant_config.json").write_text(json.dumps(hq))
    with pytest.raises(UnsupportedSchemeError, match="1 layer\\(s\\) in a non-FP8 algorithm") as info:
        inspect_checkpoint(src)
    assert info.value.problems == ["model.layers.1.mlp.down_proj: W4A16_AWQ"]


def test_mixed_precision_unlisted_fp8_layer(tmp_path: Path) -> None:
    src = build_modelopt(tmp_path / "src", "mixed-with-config-groups")
    hq = json.loads((src / "hf_quant_config.json").read_text())
    del hq["quantization"]["quantized_layers"]["model.layers.0.mlp.up_proj"]
    (src / "hf_quant_config.json").write_text(json.dumps(hq))
    with pytest.raises(UnsupportedSchemeError, match="quantized_layers does not list model.layers.0.mlp.up_proj"):
        inspect_checkpoint(src)


def test_mixed_precision_needs_the_layer_map(tmp_path: Path) -> None:
    src = build_modelopt(tmp_path / "src", "mixed-with-config-groups")
    (src / "hf_quant_config.json").unlink()
    with pytest.raises(UnsupportedSchemeError, match="MIXED_PRECISION but no quantized_layers map"):
        inspect_checkpoint(src)


def test_config_files_disagree(tmp_path: Path) -> None:
    src = build_modelopt(tmp_path / "src", "fp8")
    _set_algo(src, "FP8_PER_CHANNEL_PER_TOKEN")
    with pytest.raises(UnsupportedSchemeError, match="config.json says quant_algo 'FP8' but hf_quant_config.json"):
        inspect_checkpoint(src)


def test_pb_wo_needs_in_features_multiple_of_128(tmp_path: Path) -> None:
    src = build_modelopt(tmp_path / "src", "pb_wo", hidden=192, intermediate=256)
    with pytest.raises(UnsupportedSchemeError) as info:
        convert(src, tmp_path / "out")
    text = info.value.render()
    assert (
        "model.layers.0.self_attn.q_proj.weight (model.safetensors) has in_features 192, not a multiple of 128" in text
    )
    assert "re-export with this layer in exclude_modules" in text
    assert len(info.value.problems) == 2 * 6  # q, k, v, o, gate, up read the 192-wide hidden state; down is fine
    assert not (tmp_path / "out").exists()


Edit = Callable[[dict[str, torch.Tensor]], None]
Q = "model.layers.0.self_attn.q_proj"
E = "model.layers.1.mlp.experts"


def _pop(key: str) -> Edit:
    def edit(t: dict[str, torch.Tensor]) -> None:
        del t[key]

    return edit


def _set(key: str, value: torch.Tensor) -> Edit:
    return lambda t: t.__setitem__(key, value)


@pytest.mark.parametrize(
    ("variant", "edit", "error", "message"),
    [
        (
            "fp8",
            _pop(f"{Q}.weight_scale"),
            MissingTensorError,
            f"{Q}.weight \\(model.safetensors\\) is float8_e4m3fn but has no scale \\(looked for {Q}.weight_scale; "
            "quant_algo FP8\\)",
        ),
        (
            "fp8",
            _pop(f"{Q}.input_scale"),
            MissingTensorError,
            f"{Q}.weight \\(model.safetensors\\) has no input scale \\(looked for {Q}.input_scale\\), but quant_algo "
            "FP8 has static per-tensor input activations",
        ),
        (
            "fp8",
            _set(f"{Q}.weight_scale", torch.ones(2)),
            UnsupportedSchemeError,
            f"{Q}.weight_scale \\(model.safetensors\\) has shape \\[2\\], but FP8 scales for weight \\[256, 256\\] "
            "must be \\[\\] \\(one value\\)",
        ),
        (
            "pcpt",
            _set(f"{Q}.weight_scale", torch.ones(128)),
            UnsupportedSchemeError,
            "has shape \\[128\\], but FP8_PER_CHANNEL_PER_TOKEN scales for weight \\[256, 256\\] must be \\[256\\]",
        ),
        (
            "pcpt",
            _set(f"{Q}.input_scale", torch.ones(())),
            UnsupportedSchemeError,
            f"{Q}.input_scale \\(model.safetensors\\) is present, but quant_algo FP8_PER_CHANNEL_PER_TOKEN has "
            "dynamic-token input activations",
        ),
        (
            "pb_wo",
            _set(f"{Q}.weight_scale", torch.ones(2, 1, 3, 1)),
            UnsupportedSchemeError,
            "has shape \\[2, 1, 3, 1\\], but FP8_PB_WO scales for weight \\[256, 256\\] must be \\[2, 1, 2, 1\\]",
        ),
        (
            "fp8",
            _set(f"{Q}.weight_scale", torch.ones((), dtype=torch.float64)),
            UnsupportedSchemeError,
            "has dtype float64; expected f32 \\(ModelOpt\\), bf16 or f16",
        ),
        (
            "fp8",
            _set(f"{Q}.weight_scale_2", torch.ones(())),
            UnsupportedSchemeError,
            f"{Q}.weight_scale_2 \\(model.safetensors\\): two-level scales \\(NVFP4 / W4A8\\)",
        ),
        (
            "fused-experts",
            _pop(f"{E}.down_proj_weight_scale"),
            MissingTensorError,
            f"{E}.down_proj \\(model.safetensors\\) is float8_e4m3fn but has no scale \\(looked for "
            f"{E}.down_proj_weight_scale",
        ),
        (
            "fused-experts",
            _pop(f"{E}.gate_up_proj_input_scale"),
            MissingTensorError,
            f"has no input scale \\(looked for {E}.gate_up_proj_input_scale\\)",
        ),
        (
            "fused-experts",
            _set(f"{E}.gate_up_proj_weight_scale", torch.ones(4, 3)),
            UnsupportedSchemeError,
            f"{E}.gate_up_proj_weight_scale \\(model.safetensors\\) has shape \\[4, 3\\]; FP8 scales of fused experts "
            "\\[4, 256, 128\\] must be \\[\\], \\[4\\] or \\[4, 1, 1\\]",
        ),
        (
            "fp8",
            _set("model.layers.0.mlp.up_proj.weight", torch.zeros(2, 256, 256).to(torch.float8_e4m3fn)),
            UnsupportedSchemeError,
            "fp8 weight of shape \\[2, 256, 256\\]; expected a 2-D \\[out, in\\] linear",
        ),
    ],
    ids=[
        "missing-weight-scale",
        "missing-input-scale",
        "fp8-scale-shape",
        "pcpt-scale-shape",
        "pcpt-input-scale",
        "pb-wo-scale-shape",
        "scale-dtype",
        "nvfp4-scale-2",
        "fused-missing-scale",
        "fused-missing-input-scale",
        "fused-scale-shape",
        "3d-weight",
    ],
)
def test_broken_tensors_are_refused(tmp_path: Path, variant: str, edit: Edit, error: type, message: str) -> None:
    src = build_modelopt(tmp_path / "src", variant, edit=edit)
    with pytest.raises(error, match=message):
        inspect_checkpoint(src)
    with pytest.raises(error, match=message):
        convert(src, tmp_path / "out", CPU)
    assert not (tmp_path / "out").exists()


def test_fp8_module_in_exclude_modules_is_refused(tmp_path: Path) -> None:
    src = build_modelopt(tmp_path / "src", "legacy")
    hq = json.loads((src / "hf_quant_config.json").read_text())
    hq["quantization"]["exclude_modules"] = ["lm_head", "model.layers.0.mlp*"]
    (src / "hf_quant_config.json").write_text(json.dumps(hq))
    with pytest.raises(UnsupportedSchemeError, match="model.layers.0.mlp.down_proj.weight .* config's ignore list"):
        inspect_checkpoint(src)


def test_fused_experts_need_hidden_size(tmp_path: Path) -> None:
    src = build_modelopt(tmp_path / "src", "fused-experts")
    config = json.loads((src / "config.json").read_text())
    config["hidden_size"] = 100
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedSchemeError, match="with hidden_size 100 it is neither \\[E, in, out\\]"):
        inspect_checkpoint(src)
