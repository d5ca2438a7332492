"""AMD Quark (FORMATS.md L8): detection, scale direction and shapes, fnuz by value, KV scales, exclude and
layer overrides, per-block, and a message naming tensor and file for every refusal."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from fp8convert.errors import CheckpointError, MissingTensorError, UnsupportedSchemeError
from fp8convert.examples import TinyModel, dense_tensors, write_checkpoint
from fp8convert.formats import open_source
from fp8convert.normalize import normalize_linear
from fp8convert.numerics import dequantize, dequantize_linear
from fp8convert.pipeline import ConvertOptions, convert, inspect_checkpoint
from fp8convert.spec import ActScheme, Granularity, Target

from fixtures.quark_mistral import build_quark, quark_config, quark_spec, quark_tensors
from tolerances import E4M3_REL, REQUANT_SQNR_FLOOR_DB, SQNR_DB_ABS

DIMS: dict[str, Any] = {"hidden": 64, "intermediate": 128, "vocab": 64}
CPU = ConvertOptions(targets=frozenset({Target.CPU}))


def _tensors(out: Path, variant: str = "aiu") -> dict[str, torch.Tensor]:
    result = {}
    for path in sorted((out / variant).glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            result.update({k: f.get_tensor(k) for k in f.keys()})
    return result


def _dequant(t: dict[str, torch.Tensor], module: str) -> tuple[torch.Tensor, torch.Tensor]:
    s = t[f"{module}.weight_scale"].float()
    s = s.reshape(-1, 1) if s.numel() > 1 else s.reshape(1, 1)
    return t[f"{module}.weight"].float() * s, s


def _write(path: Path, tensors: dict[str, torch.Tensor], qc: dict, **dims: object) -> Path:
    config = TinyModel(**dims).config()  # type: ignore[arg-type]
    config["quantization_config"] = qc
    return write_checkpoint(path, tensors, config)


def test_fixture_config_has_quarks_keys() -> None:
    """The key set Quark 0.11 exports (QuantizationSpec and top level), as quoted from Quark-exported configs."""
    qc = quark_config("kv")
    assert qc["quant_method"] == "quark" and qc["export"]["weight_format"] == "real_quantized"
    assert set(qc) >= {"global_quant_config", "layer_quant_config", "layer_type_quant_config", "exclude", "export"}
    assert set(qc["export"]) == {
        "kv_cache_group",
        "min_kv_scale",
        "pack_method",
        "weight_format",
        "weight_merge_groups",
    }
    assert qc["global_quant_config"]["weight"]["dtype"] == "fp8_e4m3"
    assert qc["layer_quant_config"]["*k_proj"]["output_tensors"]["qscheme"] == "per_tensor"


def test_detection_names_rule_and_evidence(tmp_path: Path) -> None:
    r = inspect_checkpoint(build_quark(tmp_path / "src", **DIMS))
    assert r["format"] == "quark" and "quant_method is quark" in r["rule"]
    assert any("quant_method='quark'" in e for e in r["evidence"])
    assert any("weight_format='real_quantized'" in e for e in r["evidence"])
    assert any("weight float8_e4m3fn x14" in e for e in r["evidence"])
    assert {lin["activation"] for lin in r["linears"]} == {"static-tensor"}


TARGETS = {
    "per-tensor": (Granularity.TENSOR, ActScheme.STATIC_TENSOR),
    "per-channel": (Granularity.CHANNEL, ActScheme.DYNAMIC_TOKEN),
    "dynamic": (Granularity.TENSOR, ActScheme.DYNAMIC_TENSOR),
}


@pytest.mark.parametrize("variant", sorted(TARGETS))
def test_scale_direction_and_exactness(tmp_path: Path, variant: str) -> None:
    """The scale multiplies: the converted weight dequantizes to the bf16 original within one e4m3 rounding,
    and to exactly the source's dequantized weight (nothing is requantized: atol=0)."""
    src = build_quark(tmp_path / "src", variant=variant, **DIMS)
    report = convert(src, tmp_path / "out")
    assert (Granularity(report["target"]["weights"]), ActScheme(report["target"]["activations"])) == TARGETS[variant]
    assert report["summary"]["lossy"] == 0 and not report["lossy_steps"]
    original = dense_tensors(TinyModel(**DIMS))
    ckpt, _, reader, plan = open_source(src)
    out = _tensors(tmp_path / "out")
    assert len(plan.linears) == 14
    for lin in plan.linears:
        got, scale = _dequant(out, lin.module)
        w = original[f"{lin.module}.weight"].float()
        assert bool(((got - w).abs() <= E4M3_REL * w.abs() + scale * 2.0**-10).all()), lin.module
        # a divided scale would be off by scale^2 (~1e-8): far outside one rounding
        torch.testing.assert_close(got, dequantize_linear(reader.read_linear(ckpt, lin)), atol=0, rtol=0)
        assert (f"{lin.module}.input_scale" in out) is (TARGETS[variant][1] is ActScheme.STATIC_TENSOR)


@pytest.mark.parametrize(("variant", "stored", "canonical"), [("per-tensor", (), (1,)), ("per-channel", "out", "out1")])
def test_scale_shapes_reshaped(tmp_path: Path, variant: str, stored: object, canonical: object) -> None:
    """0-d per-tensor and [out] per-channel scales come back in the canonical [1] / [out, 1] shapes."""
    ckpt, _, reader, plan = open_source(build_quark(tmp_path / "src", variant=variant, **DIMS))
    for lin in plan.linears:
        out_f = lin.out_features
        assert lin.weight_scale.shape == (() if stored == () else (out_f,))
        ql = reader.read_linear(ckpt, lin)
        assert ql.weight_scale.shape == ((1,) if canonical == (1,) else (out_f, 1))
        assert ql.weight_scale.dtype == torch.float32
        if ql.input_scale is not None:
            assert ql.input_scale.shape == (1,)


def test_fnuz_weights_are_converted_by_value(tmp_path: Path) -> None:
    """F8_E4M3FNUZ weights come back as stored; normalization converts them by value with the same scale:
    every code >= 2^-6 (fp8 units) keeps its value, the 16 smaller ones move by at most 2^-10 (reported as
    lossy), and the fnuz codes 0x7F/0xFF become 240.0/-240.0, not NaN (bit reinterpretation would be wrong)."""
    tensors = quark_tensors("fnuz", **DIMS)
    q = tensors["model.layers.0.self_attn.q_proj.weight"]
    codes = torch.tensor([c for c in range(256) if c != 0x80], dtype=torch.uint8)
    q.view(torch.uint8).reshape(-1)[: codes.numel()] = codes  # all 255 non-NaN fnuz codes
    src = _write(tmp_path / "src", tensors, quark_config("fnuz"), **DIMS)
    ckpt, _, reader, plan = open_source(src)
    lin = next(lin for lin in plan.linears if lin.module == "model.layers.0.self_attn.q_proj")
    assert lin.weight.dtype == torch.float8_e4m3fnuz
    ql = reader.read_linear(ckpt, lin)
    assert ql.weight.dtype == torch.float8_e4m3fnuz and torch.equal(ql.weight.view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(ql.weight_scale, tensors["model.layers.0.self_attn.q_proj.weight_scale"].reshape(1))

    report = convert(src, tmp_path / "out")
    out = _tensors(tmp_path / "out")
    new = out["model.layers.0.self_attn.q_proj.weight"]
    assert new.dtype == torch.float8_e4m3fn
    before, after = q.float().reshape(-1), new.float().reshape(-1)
    assert not bool(after.isnan().any())
    n = codes.numel()
    assert after[:n][codes == 0x7F].item() == 240.0 and after[:n][codes == 0xFF].item() == -240.0
    big = before.abs() >= 2.0**-6
    assert torch.equal(after[big], before[big])
    assert int((after[:n] != before[:n]).sum()) == 16  # the fnuz values below 2^-6, once each
    assert float((after - before).abs().max()) <= 2.0**-10
    assert not torch.equal(new.view(torch.uint8), q.view(torch.uint8))  # values kept, bits changed
    assert torch.equal(out["model.layers.0.self_attn.q_proj.weight_scale"].float().reshape(1), ql.weight_scale)
    rec = report["layers"]["model.layers.0.self_attn.q_proj"]
    assert rec["exact"] is False and rec["changed_codes"] == int((after != before).sum())
    assert "e4m3fnuz -> e4m3fn by value (same scale)" in rec["actions"]


def test_fnuz_normalization_is_not_a_bit_reinterpretation(tmp_path: Path) -> None:
    """A normal fnuz value keeps its value through reader + normalize with the scale unchanged."""
    ckpt, _, reader, plan = open_source(build_quark(tmp_path / "src", variant="fnuz", **DIMS))
    for lin in plan.linears:
        ql = reader.read_linear(ckpt, lin)
        norm = normalize_linear(ql, (Granularity.TENSOR, ActScheme.STATIC_TENSOR))
        hp, got = dequantize_linear(ql), dequantize_linear(norm.linear)
        assert float((got - hp).abs().max()) <= float(ql.weight_scale) * 2.0**-10, lin.module


def test_fake_quantized_export_is_refused(tmp_path: Path) -> None:
    src = build_quark(tmp_path / "src", variant="fake-quantized", **DIMS)
    with pytest.raises(UnsupportedSchemeError) as exc:
        convert(src, tmp_path / "out", CPU)
    msg = str(exc.value)
    assert "model.layers.0.self_attn.q_proj.weight (model.safetensors) is bfloat16 but has weight_scale" in msg
    assert "fake_quantized" in msg and 'weight_format="real_quantized"' in msg
    assert msg.count("fake_quantized (QDQ)") == 14 and "export the quantized one" not in msg
    assert not (tmp_path / "out").exists()


def test_fake_quantized_is_decided_by_the_header_not_the_config(tmp_path: Path) -> None:
    """A config saying fake_quantized over real fp8 tensors converts; a config saying real_quantized over bf16
    weights with scales is refused."""
    src = build_quark(tmp_path / "a", **DIMS)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"]["export"]["weight_format"] = "fake_quantized"
    (src / "config.json").write_text(json.dumps(config))
    assert convert(src, tmp_path / "out-a", CPU)["summary"]["exact"] == 14
    src = build_quark(tmp_path / "b", variant="fake-quantized", **DIMS)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"]["export"]["weight_format"] = "real_quantized"
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedSchemeError, match="fake_quantized \\(QDQ\\) export"):
        inspect_checkpoint(src)


def test_kv_cache_scales_listed_and_dropped(tmp_path: Path) -> None:
    report = convert(build_quark(tmp_path / "src", variant="kv", **DIMS), tmp_path / "out")
    kvs = report["kv_cache_scales"]
    assert sorted((k["module"], k["kind"]) for k in kvs) == [
        (f"model.layers.{i}.self_attn", kind) for i in (0, 1) for kind in ("k", "v")
    ]
    assert {k["key"].rsplit(".", 2)[-2] + "." + k["key"].rsplit(".", 1)[-1] for k in kvs} == {
        "k_proj.output_scale",
        "v_proj.output_scale",
    }
    assert all(k["shape"] == [] for k in kvs)
    for variant in ("aiu", "cpu"):
        assert not [k for k in _tensors(tmp_path / "out", variant) if k.endswith("output_scale")]
    assert report["lossy_steps"] == [
        "4 KV-cache scale(s) dropped: the AIU stack uses KV scale 1.0 (listed under kv_cache_scales)"
    ]


def test_exclude_exact_wildcard_and_regex(tmp_path: Path) -> None:
    src = build_quark(tmp_path / "src", variant="exclude-patterns", **DIMS)
    r = inspect_checkpoint(src)
    assert r["unquantized_linears"] == ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert len(r["linears"]) == 12
    with pytest.raises(CheckpointError, match="--quantize-unquantized"):
        convert(src, tmp_path / "a")
    report = convert(src, tmp_path / "b", CPU)
    assert report["passthrough"]["model.layers.1.mlp.down_proj.weight"] == "copied"


def test_fp8_module_in_exclude_is_refused(tmp_path: Path) -> None:
    qc = quark_config("per-tensor", exclude=["lm_head", "*q_proj"])
    src = _write(tmp_path / "src", quark_tensors("per-tensor", **DIMS), qc, **DIMS)
    with pytest.raises(UnsupportedSchemeError, match="q_proj.weight \\(model.safetensors\\) is fp8 but the module is"):
        inspect_checkpoint(src)


def test_layer_quant_config_overrides_per_module(tmp_path: Path) -> None:
    """`*down_proj` per-channel with dynamic per-token inputs over a per-tensor static global config."""
    tensors = quark_tensors("per-tensor", **DIMS)
    per_channel = quark_tensors("per-channel", **DIMS)
    for i in (0, 1):
        mod = f"model.layers.{i}.mlp.down_proj"
        tensors[f"{mod}.weight"] = per_channel[f"{mod}.weight"]
        tensors[f"{mod}.weight_scale"] = per_channel[f"{mod}.weight_scale"]
        del tensors[f"{mod}.input_scale"]
    qc = quark_config("per-tensor")
    qc["layer_quant_config"]["*down_proj"] = copy.deepcopy(quark_config("per-channel")["global_quant_config"])
    src = _write(tmp_path / "src", tensors, qc, **DIMS)
    _, _, _, plan = open_source(src)
    schemes = {lin.module: (lin.scheme.granularity, lin.activation) for lin in plan.linears}
    assert schemes["model.layers.1.mlp.down_proj"] == (Granularity.CHANNEL, ActScheme.DYNAMIC_TOKEN)
    assert schemes["model.layers.1.mlp.up_proj"] == (Granularity.TENSOR, ActScheme.STATIC_TENSOR)
    report = convert(src, tmp_path / "out", CPU)
    assert report["target"]["weights"] == "channel" and report["target"]["activations"] == "dynamic-token"


def test_transformers_nested_config_spelling(tmp_path: Path) -> None:
    """A config re-saved through transformers' QuarkConfig (quant_config + json_export_config) reads the same."""
    src = build_quark(tmp_path / "src", **DIMS)
    config = json.loads((src / "config.json").read_text())
    qc = config.pop("quantization_config")
    export = qc.pop("export")
    config["quantization_config"] = {"quant_method": "quark", "quant_config": qc, "json_export_config": export}
    (src / "config.json").write_text(json.dumps(config))
    assert convert(src, tmp_path / "out", CPU)["summary"]["exact"] == 14


def _block_checkpoint(path: Path, scale_rows: int | None = None) -> Path:
    """Per-block 128x128 weights ([192, 320] linears: a 2x3 grid with padded edge blocks), dynamic per-group
    inputs, as vLLM's QuarkW8A8Fp8Block reads them (weight_scale [ceil(out/128), ceil(in/128)])."""
    from fp8convert.examples import quantize_weight, weight_scale

    dims: dict[str, Any] = {"hidden": 192, "intermediate": 320, "vocab": 64}
    t = dense_tensors(TinyModel(**dims))
    for key in [k for k in t if k.startswith("model.layers.") and k.endswith("_proj.weight")]:
        s = weight_scale(t[key], "block", torch.float32)
        if scale_rows is not None:
            s = s[:scale_rows]
        t[key] = quantize_weight(t[key], weight_scale(t[key], "block", torch.float32), "block")
        t[key.removesuffix("weight") + "weight_scale"] = s
    qc = quark_config("dynamic")
    qc["global_quant_config"]["weight"] = {**quark_spec("per_block", dynamic=False), "block_size": [128, 128]}
    qc["global_quant_config"]["input_tensors"] = {**quark_spec("per_group", dynamic=True), "group_size": 128}
    return _write(path, t, qc, **dims)


def test_per_block_is_requantized_per_channel(tmp_path: Path) -> None:
    src = _block_checkpoint(tmp_path / "src")
    ckpt, _, reader, plan = open_source(src)
    down = next(lin for lin in plan.linears if lin.module.endswith("0.mlp.down_proj"))
    assert down.scheme.block == (128, 128) and down.weight_scale.shape == (2, 3)
    assert down.activation is ActScheme.DYNAMIC_GROUP
    report = convert(src, tmp_path / "out")
    out = _tensors(tmp_path / "out")
    for lin in plan.linears:
        ref = reader.read_linear(ckpt, lin)
        hp = dequantize(ref.weight, ref.weight_scale, ref.scheme)
        got, scale = _dequant(out, lin.module)
        assert bool(((got - hp).abs() <= E4M3_REL * hp.abs() + scale * 2.0**-10).all()), lin.module
        noise = float((got.double() - hp.double()).pow(2).sum())
        sqnr = 10 * math.log10(float(hp.double().pow(2).sum()) / noise)
        assert sqnr >= REQUANT_SQNR_FLOOR_DB
        assert report["layers"][lin.module]["sqnr_db"] == pytest.approx(sqnr, abs=SQNR_DB_ABS)


def test_per_block_wrong_grid_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedSchemeError) as exc:
        inspect_checkpoint(_block_checkpoint(tmp_path / "src", scale_rows=1))
    assert "model.layers.0.mlp.down_proj.weight_scale (model.safetensors) has shape [1, 3]" in str(exc.value)
    assert "block 128x128" in str(exc.value) and "[2, 3]" in str(exc.value)


# ---- every refusal names what it refuses --------------------------------------------------------------
def _edit_config(qc: dict, change: str) -> dict:
    g = qc["global_quant_config"]
    if change == "e5m2":
        g["weight"]["dtype"] = "fp8_e5m2"
    elif change == "w4a8":
        g["weight"] = [g["weight"], {**g["weight"], "dtype": "int4", "qscheme": "per_channel", "ch_axis": 0}]
    elif change == "per-group":
        g["weight"].update(qscheme="per_group", group_size=128)
    elif change == "output":
        g["output_tensors"] = quark_spec("per_tensor", dynamic=False)
    elif change == "bias":
        g["bias"] = quark_spec("per_tensor", dynamic=False)
    elif change == "e8m0":
        g["weight"]["scale_format"] = "e8m0"
    elif change == "layer-type":
        qc["layer_type_quant_config"] = {"Linear": copy.deepcopy(g)}
    elif change == "int8":
        g["weight"]["dtype"] = "int8"
    return qc


CONFIG_REFUSALS = {
    "e5m2": "global_quant_config.weight.dtype is 'fp8_e5m2'",
    "w4a8": "two-stage quantization",
    "per-group": "per_group (group_size 128) is not supported",
    "output": "output activation quantization is not supported",
    "bias": "bias quantization is not supported",
    "e8m0": "only float scales are supported",
    "layer-type": "layer_type_quant_config ['Linear']",
    "int8": "only 'fp8_e4m3' is FP8",
}


@pytest.mark.parametrize("change", sorted(CONFIG_REFUSALS))
def test_unsupported_configs_are_refused(tmp_path: Path, change: str) -> None:
    qc = _edit_config(quark_config("per-tensor"), change)
    src = _write(tmp_path / "src", quark_tensors("per-tensor", **DIMS), qc, **DIMS)
    with pytest.raises(UnsupportedSchemeError) as exc:
        inspect_checkpoint(src)
    assert "config.json quantization_config: unsupported Quark configuration" in str(exc.value)
    assert CONFIG_REFUSALS[change] in str(exc.value)


def _edit_tensors(t: dict[str, torch.Tensor], change: str) -> tuple[dict[str, torch.Tensor], dict | None]:
    q = "model.layers.0.self_attn.q_proj"
    qc = None
    if change == "no-scale":
        del t[f"{q}.weight_scale"]
    elif change == "scale-shape":
        t[f"{q}.weight_scale"] = t[f"{q}.weight_scale"].reshape(1).expand(64).contiguous()
    elif change == "bias-scale":
        t[f"{q}.bias"] = torch.zeros(64, dtype=torch.bfloat16)
        t[f"{q}.bias_scale"] = torch.ones(())
    elif change == "rotation":
        t[f"{q}.input_rotation"] = torch.eye(64)
    elif change == "o-output-scale":
        t["model.layers.0.self_attn.o_proj.output_scale"] = torch.ones(())
    elif change == "e5m2-weight":
        t[f"{q}.weight"] = t[f"{q}.weight"].float().to(torch.float8_e5m2)
    elif change == "dynamic-with-input-scale":
        qc = quark_config("dynamic")
    elif change == "no-input-scale":
        del t[f"{q}.input_scale"]
    elif change == "dbrx":
        e = "transformer.blocks.0.ffn.experts.mlp"
        t[f"{e}.w1_weight"] = torch.zeros(4 * 32, 64, dtype=torch.float8_e4m3fn)
        t[f"{e}.w1_weight_scale"] = torch.ones(4)
        t[f"{e}.w1_input_scale"] = torch.ones(4)
    return t, qc


TENSOR_REFUSALS = {
    "no-scale": (
        MissingTensorError,
        "model.layers.0.self_attn.q_proj.weight (model.safetensors) is float8_e4m3fn but has no scale",
    ),
    "scale-shape": (UnsupportedSchemeError, "q_proj.weight_scale (model.safetensors) has shape [64]"),
    "bias-scale": (UnsupportedSchemeError, "q_proj.bias_scale (model.safetensors): the bias is quantized"),
    "rotation": (UnsupportedSchemeError, "q_proj.input_rotation (model.safetensors): an online input rotation"),
    "o-output-scale": (UnsupportedSchemeError, "o_proj.output_scale (model.safetensors): output activation"),
    "e5m2-weight": (UnsupportedSchemeError, "q_proj.weight (model.safetensors) is stored as float8_e5m2"),
    "dynamic-with-input-scale": (UnsupportedSchemeError, "q_proj.input_scale (model.safetensors) is present"),
    "no-input-scale": (MissingTensorError, "q_proj.input_scale is missing, but global_quant_config.input_tensors"),
    "dbrx": (UnsupportedSchemeError, "experts.mlp.w1_weight (model.safetensors): DBRX experts merged by Quark"),
}


@pytest.mark.parametrize("change", sorted(TENSOR_REFUSALS))
def test_tensor_refusals_name_tensor_and_file(tmp_path: Path, change: str) -> None:
    tensors, qc = _edit_tensors(quark_tensors("per-tensor", **DIMS), change)
    src = _write(tmp_path / "src", tensors, qc or quark_config("per-tensor"), **DIMS)
    kind, text = TENSOR_REFUSALS[change]
    with pytest.raises(kind) as exc:
        convert(src, tmp_path / "out", CPU)
    assert text in str(exc.value)
    assert not (tmp_path / "out").exists()
    if change == "dbrx":  # the merged scales are not copied through as if they were plain tensors
        _, _, _, plan = open_source(src)
        assert not [r for r in plan.passthrough if "w1_" in r.key]
        assert sum("w1_weight" in str(p) for p in plan.problems) == 1
