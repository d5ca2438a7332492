"""fbgemm_fp8 (FORMATS.md L6, Meta Llama 3.1 405B FP8): fixtures, detection, row-wise scale direction,
activation_scale_ub carried and reported as dropped, FFN-only checkpoints and the AIU target, and refusals."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fp8convert.errors import MissingTensorError, UnsupportedSchemeError
from fp8convert.examples import TinyModel, dense_tensors
from fp8convert.formats import detect_format, open_source
from fp8convert.numerics import dequantize_linear
from fp8convert.pipeline import ConvertOptions, convert, inspect_checkpoint
from fp8convert.shards import Checkpoint
from fp8convert.spec import ActScheme, Granularity, Target

from fixtures.modelopt_fbgemm import build_fbgemm
from tolerances import E4M3_REL, REQUANT_SQNR_FLOOR_DB

CPU = ConvertOptions(targets=frozenset({Target.CPU}))
UB_DROPPED = "activation scale upper bound 1200.0 dropped"


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _within_one_rounding(got: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor) -> bool:
    bound = (E4M3_REL * ref.abs() + scale * 2.0**-10) * (1 + 2.0**-20)
    return bool(((got - ref).abs() <= bound).all())


def test_fixture_layout(tmp_path: Path) -> None:
    """Meta's scope: only the MLPs of the middle layers are fp8 with F32 [out, 1] scales; the config lists the other
    decoder linears as full leaf paths (no globs, no lm_head), as the real 405B config does."""
    src = build_fbgemm(tmp_path / "src")
    refs = Checkpoint(src).tensors
    assert refs["model.layers.1.mlp.down_proj.weight"].dtype == torch.float8_e4m3fn
    s = refs["model.layers.1.mlp.down_proj.weight_scale"]
    assert (s.dtype, s.shape) == (torch.float32, (256, 1))
    assert refs["model.layers.1.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert refs["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
    assert not [k for k in refs if k.endswith(("input_scale", "input_scale_ub"))]
    qc = json.loads((src / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "fbgemm_fp8" and qc["activation_scale_ub"] == 1200.0
    assert qc["modules_to_not_convert"][:3] == [
        f"model.layers.0.mlp.{p}" for p in ("down_proj", "gate_proj", "up_proj")
    ]
    assert len(qc["modules_to_not_convert"]) == 6 + 3 * 4 and "lm_head" not in qc["modules_to_not_convert"]


@pytest.mark.parametrize("variant", ["ffn-only", "all"])
def test_detection_and_plan(tmp_path: Path, variant: str) -> None:
    src = build_fbgemm(tmp_path / "src", variant)
    ckpt = Checkpoint(src)
    reader, det = detect_format(ckpt, ckpt.config())
    assert reader.name == det.format == "fbgemm" and "fbgemm_fp8" in det.rule
    assert "activation_scale_ub=1200.0" in det.evidence
    plan = open_source(src)[3]
    assert len(plan.linears) == (3 if variant == "ffn-only" else 21)
    for lin in plan.linears:
        assert lin.scheme.granularity is Granularity.CHANNEL and lin.activation is ActScheme.DYNAMIC_TOKEN
        assert lin.act_upper_bound == 1200.0
    unquantized = [m for m in plan.unquantized_linears if m != "lm_head"]
    assert len(unquantized) == (18 if variant == "ffn-only" else 0)


@pytest.mark.parametrize("variant", ["ffn-only", "all"])
def test_row_scales_multiply(tmp_path: Path, variant: str) -> None:
    """bf16-valued F32 row scales: fp8 * scale is the bf16 original within one e4m3 rounding; the converted weight
    dequantizes to exactly the source's (atol=0); [out, 1] F32 becomes [out, 1] bf16. The bound is dropped and
    reported as a lossy step (the AIU path has none)."""
    src = build_fbgemm(tmp_path / "src", variant, exact_scales=True)
    report = convert(src, tmp_path / "out", CPU if variant == "ffn-only" else ConvertOptions())
    original = dense_tensors(TinyModel(layers=3))
    ckpt, _, reader, plan = open_source(src)
    out = _tensors(tmp_path / "out" / "cpu")
    for lin in plan.linears:
        ref = reader.read_linear(ckpt, lin)
        assert ref.act_upper_bound == 1200.0 and ref.weight_scale.shape == (lin.out_features, 1)
        hp = dequantize_linear(ref)
        assert _within_one_rounding(hp, original[f"{lin.module}.weight"].float(), ref.weight_scale), lin.module
        s = out[f"{lin.module}.weight_scale"]
        assert s.dtype == torch.bfloat16 and s.shape == (lin.out_features, 1)
        torch.testing.assert_close(out[f"{lin.module}.weight"].float() * s.float(), hp, atol=0, rtol=0)
        rec = report["layers"][lin.module]
        assert rec["changed_codes"] == 0 and any(UB_DROPPED in a for a in rec["actions"])
        assert rec["exact"] is False  # the activation numerics change for tokens whose amax exceeds the bound
    assert len(report["lossy_steps"]) == len(plan.linears)
    assert all(UB_DROPPED in step for step in report["lossy_steps"])


def test_f32_row_scales_rounded_up(tmp_path: Path) -> None:
    """Real fbgemm scales are F32 amax/448: rounded up to bf16 (no code moves), SQNR above the floor, reported."""
    src = build_fbgemm(tmp_path / "src", "all")
    report = convert(src, tmp_path / "out")
    ckpt, _, reader, plan = open_source(src)
    out = _tensors(tmp_path / "out" / "aiu")
    for lin in plan.linears:
        ref = reader.read_linear(ckpt, lin)
        hp = dequantize_linear(ref)
        s = out[f"{lin.module}.weight_scale"].float()
        assert _within_one_rounding(out[f"{lin.module}.weight"].float() * s, hp, s), lin.module
        rec = report["layers"][lin.module]
        assert "rounded up" in rec["actions"][0] and rec["sqnr_db"] >= REQUANT_SQNR_FLOOR_DB
        assert any(UB_DROPPED in a for a in rec["actions"])
    qc = json.loads((tmp_path / "out" / "aiu" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and "activation_scale_ub" not in qc
    assert qc["config_groups"]["group_0"]["input_activations"]["strategy"] == "token"


def test_ffn_only_needs_quantize_unquantized_for_the_aiu(tmp_path: Path) -> None:
    """Attention (and the first/last MLP) is bf16 in these checkpoints: the AIU stack cannot keep decoder linears in
    full precision, so the AIU target is refused unless --quantize-unquantized; the CPU target keeps them."""
    src = build_fbgemm(tmp_path / "src")
    r = inspect_checkpoint(src)
    assert r["aiu_problems"] and "18 decoder linear(s) are not quantized" in r["aiu_problems"][0]
    with pytest.raises(Exception, match="--quantize-unquantized") as info:
        convert(src, tmp_path / "a", ConvertOptions(targets=frozenset({Target.AIU, Target.CPU})))
    assert "model.layers.0.mlp.down_proj" in str(info.value)
    assert not (tmp_path / "a").exists()
    cpu = convert(src, tmp_path / "b", CPU)
    assert cpu["passthrough"]["model.layers.1.self_attn.q_proj.weight"] == "copied"
    q = convert(src, tmp_path / "c", ConvertOptions(quantize_unquantized=True))
    assert q["summary"]["linears"] == 21
    rec = q["layers"]["model.layers.2.self_attn.o_proj"]
    assert rec["source"] == "bf16 (unquantized)" and rec["sqnr_db"] >= REQUANT_SQNR_FLOOR_DB
    aiu = _tensors(tmp_path / "c" / "aiu")
    assert aiu["model.layers.2.self_attn.o_proj.weight"].dtype == torch.float8_e4m3fn
    assert aiu["model.layers.1.mlp.up_proj.weight_scale"].shape == (512, 1)


# ---- refusals ----------------------------------------------------------------------------------------------------
Edit = Callable[[dict[str, torch.Tensor]], None]
D = "model.layers.1.mlp.down_proj"


def _edit(key: str, value: torch.Tensor | None) -> Edit:
    def edit(t: dict[str, torch.Tensor]) -> None:
        if value is None:
            del t[key]
        else:
            t[key] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "error", "message"),
    [
        (
            _edit(f"{D}.weight_scale", None),
            MissingTensorError,
            f"{D}.weight \\(model.safetensors\\) is float8_e4m3fn but has no scale \\(looked for {D}.weight_scale, "
            "row-wise \\[256, 1\\]\\); if this layer should stay in full precision it must be in "
            "modules_to_not_convert",
        ),
        (
            _edit(f"{D}.weight_scale", torch.ones(1)),
            UnsupportedSchemeError,
            f"{D}.weight_scale \\(model.safetensors\\) has shape \\[1\\], but row-wise scales for weight "
            "\\[256, 512\\] must be \\[256, 1\\]",
        ),
        (
            _edit(f"{D}.weight_scale", torch.ones(256, 4)),
            UnsupportedSchemeError,
            "has shape \\[256, 4\\], but row-wise scales",
        ),
        (
            _edit(f"{D}.weight_scale", torch.ones(256, 1, dtype=torch.float64)),
            UnsupportedSchemeError,
            "has dtype float64; expected f32 \\(fbgemm\\), bf16 or f16",
        ),
        (
            _edit(f"{D}.input_scale", torch.ones(1)),
            UnsupportedSchemeError,
            f"{D}.input_scale \\(model.safetensors\\): a stored activation scale",
        ),
        (
            _edit("model.layers.0.mlp.down_proj.weight", torch.zeros(256, 512).to(torch.float8_e4m3fn)),
            UnsupportedSchemeError,
            "model.layers.0.mlp.down_proj.weight \\(model.safetensors\\) is fp8 but the module is in the config's "
            "ignore list",
        ),
    ],
    ids=["missing-scale", "tensor-scale", "group-scale", "scale-dtype", "input-scale", "fp8-in-not-convert"],
)
def test_broken_tensors_are_refused(tmp_path: Path, edit: Edit, error: type, message: str) -> None:
    src = build_fbgemm(tmp_path / "src", edit=edit)
    with pytest.raises(error, match=message):
        inspect_checkpoint(src)
    with pytest.raises(error, match=message):
        convert(src, tmp_path / "out", CPU)
    assert not (tmp_path / "out").exists()


def test_row_scale_of_shape_out_is_read(tmp_path: Path) -> None:
    """A 1-D [out] row scale (some exports squeeze it) is the same scale."""

    def squeeze(t: dict[str, torch.Tensor]) -> None:
        t[f"{D}.weight_scale"] = t[f"{D}.weight_scale"].reshape(-1)

    src = build_fbgemm(tmp_path / "src", edit=squeeze)
    ckpt, _, reader, plan = open_source(src)
    lin = next(lin for lin in plan.linears if lin.module == D)
    assert reader.read_linear(ckpt, lin).weight_scale.shape == (256, 1)


@pytest.mark.parametrize("ub", [None, 0, -1.0, "1200", True])
def test_activation_scale_ub_must_be_a_positive_number(tmp_path: Path, ub: object) -> None:
    src = build_fbgemm(tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    if ub is None:
        del config["quantization_config"]["activation_scale_ub"]
    else:
        config["quantization_config"]["activation_scale_ub"] = ub
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedSchemeError, match="activation_scale_ub is .*; fbgemm_fp8 needs a positive number"):
        inspect_checkpoint(src)


def test_modules_to_not_convert_must_be_a_list(tmp_path: Path) -> None:
    src = build_fbgemm(tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"]["modules_to_not_convert"] = "lm_head"
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedSchemeError, match="modules_to_not_convert must be a list of module names"):
        inspect_checkpoint(src)
