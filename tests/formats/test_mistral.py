"""Mistral native (FORMATS.md L4): detection next to HF files, the consolidated -> HF name map and the rotary
permutation of wq/wk (checked against transformers' conversion formula and against the equivalent HF
checkpoint), the derived config.json, scale direction, KV scales, and refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from fp8convert.errors import MissingTensorError, UnknownFormatError, UnsupportedSchemeError
from fp8convert.examples import TinyModel, dense_tensors
from fp8convert.formats import REGISTRY, detect_format, open_source
from fp8convert.formats.mistral import derive_config, hf_name, permute_rows_for_rope, unpermute_rows_for_rope
from fp8convert.numerics import dequantize_linear
from fp8convert.pipeline import ConvertOptions, convert, inspect_checkpoint
from fp8convert.shards import Checkpoint
from fp8convert.spec import ActScheme, Granularity, Target

from fixtures.quark_mistral import _write, build_mistral, mistral_hf_tensors, mistral_params, to_native
from tolerances import E4M3_REL

DIMS: dict[str, Any] = {"hidden": 64, "intermediate": 128, "vocab": 64}
MODEL = TinyModel(arch="mistral", **DIMS)
CPU = ConvertOptions(targets=frozenset({Target.CPU}))


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    result = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            result.update({k: f.get_tensor(k) for k in f.keys()})
    return result


def _native(path: Path, tensors: dict[str, torch.Tensor], params: dict | None = None) -> Path:
    """A consolidated-only checkpoint from native tensors (and params.json)."""
    path.mkdir(parents=True)
    _write(path / "consolidated.safetensors", tensors)
    (path / "params.json").write_text(json.dumps(params or mistral_params(MODEL, "TENSOR")))
    return path


# ---- names and permutation ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("native", "hf"),
    [
        ("layers.3.attention.wq.weight", "model.layers.3.self_attn.q_proj.weight"),
        ("layers.3.attention.wk.qscale_weight", "model.layers.3.self_attn.k_proj.weight_scale"),
        ("layers.3.attention.wv.qscale_act", "model.layers.3.self_attn.v_proj.input_scale"),
        ("layers.3.attention.wo", "model.layers.3.self_attn.o_proj"),
        ("layers.12.feed_forward.w1.weight", "model.layers.12.mlp.gate_proj.weight"),
        ("layers.12.feed_forward.w2.weight", "model.layers.12.mlp.down_proj.weight"),
        ("layers.12.feed_forward.w3.weight", "model.layers.12.mlp.up_proj.weight"),
        ("layers.0.attention_norm.weight", "model.layers.0.input_layernorm.weight"),
        ("layers.0.ffn_norm.weight", "model.layers.0.post_attention_layernorm.weight"),
        ("layers.0.attention.k_fake_quantizer.qscale_act", "model.layers.0.self_attn.k_scale"),
        ("layers.0.attention.kv_fake_quantizer.qscale_act", "model.layers.0.self_attn.kv_scale"),
        ("layers.0.attention", "model.layers.0.self_attn"),
        ("tok_embeddings.weight", "model.embed_tokens.weight"),
        ("norm.weight", "model.norm.weight"),
        ("output.weight", "lm_head.weight"),
        ("output", "lm_head"),
    ],
)
def test_hf_name(native: str, hf: str) -> None:
    assert hf_name(native) == hf


@pytest.mark.parametrize("native", ["vision_encoder.ln_pre.weight", "layers.0.experts.1.w1.weight", "layers.0.x.y"])
def test_hf_name_refuses_what_has_no_hf_name(native: str) -> None:
    with pytest.raises(UnsupportedSchemeError, match="no Hugging Face name"):
        hf_name(native)


def _transformers_permute_for_rope(tensor: torch.Tensor, n_heads: int, dim1: int, dim2: int) -> torch.Tensor:
    """transformers src/transformers/models/mistral/convert_mistral_weights_to_hf.py ``permute_for_rope``
    (the same body in ministral3's converter and vLLM ``maybe_remap_mistral``), verbatim."""
    tensor = tensor.view(n_heads, dim1 // n_heads // 2, 2, dim2)
    tensor = tensor.transpose(1, 2)
    tensor = tensor.reshape(dim1, dim2)
    return tensor


@pytest.mark.parametrize(("n_heads", "head_dim", "dim"), [(4, 16, 64), (2, 16, 64), (8, 128, 5120)])
def test_permutation_matches_transformers_and_round_trips(n_heads: int, head_dim: int, dim: int) -> None:
    """head_dim * n_heads need not equal dim (Mistral Small: 32 x 128 = 4096 rows for dim 5120)."""
    rows = n_heads * head_dim
    w = torch.randn(rows, dim)
    hf = permute_rows_for_rope(w, n_heads)
    assert torch.equal(hf, _transformers_permute_for_rope(w, n_heads, rows, dim))
    assert not torch.equal(hf, w)
    assert torch.equal(unpermute_rows_for_rope(hf, n_heads), w)
    q = (w / w.abs().max() * 400).to(torch.float8_e4m3fn)  # fp8: the bytes move, nothing is rounded
    assert torch.equal(
        permute_rows_for_rope(q, n_heads).view(torch.uint8),
        hf.div(w.abs().max()).mul(400).to(torch.float8_e4m3fn).view(torch.uint8),
    )
    s = torch.rand(rows, 1)  # a per-row scale follows its row
    assert torch.equal(permute_rows_for_rope(s, n_heads), _transformers_permute_for_rope(s, n_heads, rows, 1))


# ---- the native checkpoint gives the HF tensors -----------------------------------------------------
def test_reader_gives_the_hf_tensors(tmp_path: Path) -> None:
    """Every linear read from the native checkpoint equals the HF-layout tensor the fixture started from
    (wq/wk permuted back, bytes identical); the plan names modules in HF form and tensors by native key."""
    hf = mistral_hf_tensors(MODEL, static=True, kv=True)
    ckpt, _, reader, plan = open_source(build_mistral(tmp_path / "src", **DIMS))
    assert len(plan.linears) == 14
    for lin in plan.linears:
        assert lin.module.startswith("model.layers.") and lin.weight.key.startswith("layers.")
        assert hf_name(lin.weight.key) == f"{lin.module}.weight"
        ql = reader.read_linear(ckpt, lin)
        assert torch.equal(ql.weight.view(torch.uint8), hf[f"{lin.module}.weight"].view(torch.uint8)), lin.module
        assert torch.equal(ql.weight_scale, hf[f"{lin.module}.weight_scale"].reshape(1))
        assert ql.input_scale is not None and torch.equal(ql.input_scale, hf[f"{lin.module}.input_scale"].reshape(1))
    q = next(lin for lin in plan.linears if lin.module == "model.layers.0.self_attn.q_proj")
    stored = ckpt.load(q.weight.key)
    assert not torch.equal(stored.view(torch.uint8), hf["model.layers.0.self_attn.q_proj.weight"].view(torch.uint8))


def test_conversion_output_is_the_hf_checkpoint(tmp_path: Path) -> None:
    """The CPU variant holds exactly the HF tensors (names, dtypes, values): linears (scales now bf16, same
    values), norms, embeddings and head renamed; no native name and no KV scale survives."""
    hf = mistral_hf_tensors(MODEL, static=True, kv=True)
    report = convert(build_mistral(tmp_path / "src", **DIMS), tmp_path / "out", CPU)
    out = _tensors(tmp_path / "out" / "cpu")
    expected = {k: v for k, v in hf.items() if not k.endswith(("k_scale", "v_scale"))}
    assert set(out) == set(expected)
    for key, v in expected.items():
        got = out[key]
        if v.dtype == torch.float8_e4m3fn:
            assert torch.equal(got.view(torch.uint8), v.view(torch.uint8)), key
        else:
            assert torch.equal(got.float().reshape(v.shape), v.float()), key
    assert report["summary"] == {**report["summary"], "linears": 14, "exact": 14, "lossy": 0}
    config = json.loads((tmp_path / "out" / "cpu" / "config.json").read_text())
    assert config["architectures"] == ["MistralForCausalLM"] and config["num_key_value_heads"] == 2


def test_native_and_hf_files_convert_identically(tmp_path: Path) -> None:
    """The same model shipped as consolidated + params.json and as HF files (read by the fp8-family reader:
    the HF files win when both exist) converts to identical tensors."""
    if "fp8" not in REGISTRY:
        pytest.skip("the fp8-family reader (FORMATS.md L3) is not registered")
    both = build_mistral(tmp_path / "both", variant="with-hf-files", **DIMS)
    native = tmp_path / "native"
    native.mkdir()
    for name in ("consolidated.safetensors", "params.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(both / name, native / name)
    a = convert(both, tmp_path / "out-hf", CPU)
    b = convert(native, tmp_path / "out-native", CPU)
    assert a["source"]["format"] == "fp8" and b["source"]["format"] == "mistral"
    ta, tb = _tensors(tmp_path / "out-hf" / "cpu"), _tensors(tmp_path / "out-native" / "cpu")
    assert set(ta) == set(tb)
    for key in ta:
        assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key].view(torch.uint8), tb[key].view(torch.uint8)), key


# ---- detection ----------------------------------------------------------------------------------------
def test_detected_when_only_consolidated_files(tmp_path: Path) -> None:
    for variant in ("tensor", "native-only"):
        r = inspect_checkpoint(build_mistral(tmp_path / variant, variant=variant, **DIMS))
        assert r["format"] == "mistral" and "consolidated" in r["rule"]
        assert any("qformat_weight': 'fp8_e4m3'" in e for e in r["evidence"])
        assert r["files"] == ["consolidated.safetensors"]


def test_hf_files_win_when_both_exist(tmp_path: Path) -> None:
    src = build_mistral(tmp_path / "src", variant="with-hf-files", **DIMS)
    ckpt = Checkpoint(src)
    assert ckpt.files == ["model.safetensors"]
    assert REGISTRY["mistral"].detect(ckpt, ckpt.config()) is None
    try:
        reader, _ = detect_format(ckpt, ckpt.config())
    except UnknownFormatError:  # the HF reader is not registered in this build
        return
    assert reader.name != "mistral"


def test_params_without_quantization_is_not_claimed(tmp_path: Path) -> None:
    src = build_mistral(tmp_path / "src", variant="native-only", **DIMS)
    params = json.loads((src / "params.json").read_text())
    del params["quantization"]
    (src / "params.json").write_text(json.dumps(params))
    assert REGISTRY["mistral"].detect(Checkpoint(src), {}) is None


# ---- derived config ------------------------------------------------------------------------------------
def test_derived_config_matches_the_model(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    src = build_mistral(tmp_path / "src", variant="native-only", **DIMS)
    ckpt, config, reader, plan = open_source(src)
    assert config == {} and plan.hf_config == reader.derived_config(ckpt)  # type: ignore[attr-defined]
    derived = plan.hf_config
    assert derived is not None
    want = MODEL.config()
    for key in (
        "architectures",
        "model_type",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "vocab_size",
        "max_position_embeddings",
        "tie_word_embeddings",
        "sliding_window",
        "rope_parameters",
    ):
        assert derived[key] == want[key], key
    hf_config = transformers.MistralConfig(**{k: v for k, v in derived.items() if k != "architectures"})
    assert hf_config.rope_parameters["rope_theta"] == 10000.0 and hf_config.head_dim == MODEL.head_dim


def test_derived_config_defaults() -> None:
    """Mistral-7B-v0.1-style params.json: no head_dim, n_kv_heads, rope_theta or max length."""
    c = derive_config({"dim": 64, "n_layers": 2, "n_heads": 4, "hidden_dim": 128, "norm_eps": 1e-5, "vocab_size": 64})
    assert (c["head_dim"], c["num_key_value_heads"], c["rope_theta"]) == (16, 4, 10000.0)
    assert c["max_position_embeddings"] == 32768 and c["tie_word_embeddings"] is False
    c = derive_config({**mistral_params(MODEL, "TENSOR"), "max_seq_len": 1024, "tied_embeddings": True})
    assert c["max_position_embeddings"] == 256 and c["tie_word_embeddings"] is True


@pytest.mark.parametrize(
    ("change", "text"),
    [
        ({"moe": {"num_experts": 8}}, "params.json has 'moe'"),
        ({"vision_encoder": {"hidden_size": 16}}, "params.json has 'vision_encoder'"),
        ({"yarn": {"factor": 16.0}}, "params.json has 'yarn'"),
        ({"sliding_window": [None, 4096]}, "sliding_window is a per-layer list"),
        ({"dim": None, "vocab_size": None}, "params.json lacks dim, vocab_size"),
    ],
)
def test_underivable_configs_are_refused(tmp_path: Path, change: dict, text: str) -> None:
    src = build_mistral(tmp_path / "src", variant="native-only", **DIMS)
    params = {**json.loads((src / "params.json").read_text()), **change}
    (src / "params.json").write_text(json.dumps(params))
    with pytest.raises(UnsupportedSchemeError) as exc:
        inspect_checkpoint(src)
    assert "cannot derive a MistralForCausalLM config.json" in str(exc.value) and text in str(exc.value)
    assert str(src / "params.json") in str(exc.value)


# ---- numerics -----------------------------------------------------------------------------------------
def test_scale_direction_and_exactness(tmp_path: Path) -> None:
    """qscale_weight multiplies: the converted weight is the bf16 original within one e4m3 rounding, and
    exactly the source's dequantized (permuted) weight."""
    src = build_mistral(tmp_path / "src", **DIMS)
    convert(src, tmp_path / "out", CPU)
    out = _tensors(tmp_path / "out" / "cpu")
    original = dense_tensors(MODEL)
    ckpt, _, reader, plan = open_source(src)
    for lin in plan.linears:
        s = out[f"{lin.module}.weight_scale"].float().reshape(1, 1)
        got = out[f"{lin.module}.weight"].float() * s
        w = original[f"{lin.module}.weight"].float()
        assert bool(((got - w).abs() <= E4M3_REL * w.abs() + s * 2.0**-10).all()), lin.module
        torch.testing.assert_close(got, dequantize_linear(reader.read_linear(ckpt, lin)), atol=0, rtol=0)


def test_per_row_qscale_weight_is_permuted_with_its_rows(tmp_path: Path) -> None:
    """A per-row qscale_weight (vLLM slices it with wq/wk) follows the permutation."""
    hf = mistral_hf_tensors(MODEL, static=True, kv=False)
    for key in [k for k in hf if k.endswith(".weight_scale")]:
        mod = key.removesuffix(".weight_scale")
        w = hf[f"{mod}.weight"].float() * hf[key]
        rows = (w.abs().amax(dim=1) / 448).clamp(min=1e-12)
        rows = rows.to(torch.bfloat16).float()
        hf[f"{mod}.weight"] = (w / rows.reshape(-1, 1)).clamp(-448, 448).to(torch.float8_e4m3fn)
        hf[key] = rows
    src = _native(tmp_path / "src", to_native(hf, MODEL))
    ckpt, _, reader, plan = open_source(src)
    for lin in plan.linears:
        assert lin.scheme.granularity is Granularity.CHANNEL
        ql = reader.read_linear(ckpt, lin)
        assert torch.equal(ql.weight.view(torch.uint8), hf[f"{lin.module}.weight"].view(torch.uint8))
        assert torch.equal(ql.weight_scale, hf[f"{lin.module}.weight_scale"].reshape(-1, 1)), lin.module


def test_no_scales_is_dynamic_per_tensor(tmp_path: Path) -> None:
    report = convert(build_mistral(tmp_path / "src", variant="no-scales", **DIMS), tmp_path / "out", CPU)
    assert (report["target"]["weights"], report["target"]["activations"]) == ("tensor", "dynamic-tensor")
    assert report["summary"]["exact"] == 14 and not report["kv_cache_scales"]
    assert not [k for k in _tensors(tmp_path / "out" / "cpu") if k.endswith("input_scale")]


def test_kv_scales_listed_under_hf_names_and_dropped(tmp_path: Path) -> None:
    report = convert(build_mistral(tmp_path / "src", **DIMS), tmp_path / "out", CPU)
    kvs = report["kv_cache_scales"]
    assert sorted((k["module"], k["kind"]) for k in kvs) == [
        (f"model.layers.{i}.self_attn", kind) for i in (0, 1) for kind in ("k", "v")
    ]
    assert {k["key"] for k in kvs} == {
        f"layers.{i}.attention.{c}_fake_quantizer.qscale_act" for i in (0, 1) for c in "kv"
    }
    assert not [k for k in _tensors(tmp_path / "out" / "cpu") if "scale" in k and "proj" not in k]


@pytest.mark.cpu_model
def test_cpu_variant_loads_in_transformers(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from fp8convert.fakequant import FakeQuantLinear, load_cpu_model

    convert(build_mistral(tmp_path / "src", **DIMS), tmp_path / "out", CPU)
    model = load_cpu_model(tmp_path / "out" / "cpu")
    assert sum(isinstance(m, FakeQuantLinear) for m in model.modules()) == 14
    with torch.inference_mode():
        logits = model(torch.tensor([[1, 5, 9, 13]])).logits
    assert logits.shape == (1, 4, MODEL.vocab) and bool(logits.isfinite().all())


# ---- refusals name tensor and file ----------------------------------------------------------------
def _native_tensors(**kw: bool) -> dict[str, torch.Tensor]:
    return to_native(mistral_hf_tensors(MODEL, static=True, kv=True, **kw), MODEL)


REFUSALS = {
    "unquantized-wq": (UnsupportedSchemeError, "layers.0.attention.wq.weight (consolidated.safetensors) is bfloat16"),
    "block-scale": (
        UnsupportedSchemeError,
        "layers.0.attention.wo.qscale_weight (consolidated.safetensors) has shape [1, 1, 1]",
    ),
    "no-scale": (
        MissingTensorError,
        "layers.0.feed_forward.w2.weight (consolidated.safetensors) is fp8 but has no scale",
    ),
    "no-act-scale": (MissingTensorError, "layers.1.feed_forward.w3.qscale_act is missing"),
    "unmapped": (UnsupportedSchemeError, "vision_encoder.ln_pre.weight (consolidated.safetensors): no Hugging Face"),
    "bias": (UnsupportedSchemeError, "layers.0.attention.wv.bias (consolidated.safetensors)"),
    "moe-linear": (UnsupportedSchemeError, "layers.0.experts.0.w1.weight (consolidated.safetensors): no Hugging Face"),
    "head-count": (
        UnsupportedSchemeError,
        "layers.0.attention.wk.weight (consolidated.safetensors) has shape [32, 64]",
    ),
    "compressed-tensors": (UnsupportedSchemeError, "params.json holds a compressed-tensors quantization block"),
    "act-with-no-scales": (
        UnsupportedSchemeError,
        "layers.0.attention.wq.qscale_act (consolidated.safetensors) is "
        "present, but params.json qscheme_act is NO_SCALES",
    ),
}


@pytest.mark.parametrize("change", sorted(REFUSALS))
def test_refusals_name_tensor_and_file(tmp_path: Path, change: str) -> None:
    t = _native_tensors()
    params = mistral_params(MODEL, "TENSOR")
    if change == "unquantized-wq":
        t["layers.0.attention.wq.weight"] = torch.zeros(64, 64, dtype=torch.bfloat16)
        del t["layers.0.attention.wq.qscale_weight"], t["layers.0.attention.wq.qscale_act"]
    elif change == "block-scale":
        t["layers.0.attention.wo.qscale_weight"] = t["layers.0.attention.wo.qscale_weight"].reshape(1, 1, 1)
    elif change == "no-scale":
        del t["layers.0.feed_forward.w2.qscale_weight"]
    elif change == "no-act-scale":
        del t["layers.1.feed_forward.w3.qscale_act"]
    elif change == "unmapped":
        t["vision_encoder.ln_pre.weight"] = torch.ones(8, dtype=torch.bfloat16)
    elif change == "moe-linear":
        t["layers.0.experts.0.w1.weight"] = t["layers.0.feed_forward.w1.weight"]
        t["layers.0.experts.0.w1.qscale_weight"] = t["layers.0.feed_forward.w1.qscale_weight"]
        t["layers.0.experts.0.w1.qscale_act"] = t["layers.0.feed_forward.w1.qscale_act"]
    elif change == "bias":
        t["layers.0.attention.wv.bias"] = torch.zeros(32, dtype=torch.bfloat16)
    elif change == "head-count":
        params["n_kv_heads"] = 4
    elif change == "compressed-tensors":
        params["quantization"] = {"quant_method": "compressed-tensors", "config_groups": {}}
    elif change == "act-with-no-scales":
        params["quantization"]["qscheme_act"] = "NO_SCALES"
    src = _native(tmp_path / "src", t, params)
    kind, text = REFUSALS[change]
    with pytest.raises(kind) as exc:
        convert(src, tmp_path / "out", CPU)
    assert text in str(exc.value)
    assert not (tmp_path / "out").exists()


def test_unquantized_output_head_is_kept(tmp_path: Path) -> None:
    """A bf16 `output` (lm_head left unquantized, as Mistral's FP8 exports do) is renamed and copied."""
    r = inspect_checkpoint(build_mistral(tmp_path / "src", **DIMS))
    assert r["unquantized_linears"] == ["lm_head"]
    report = convert(tmp_path / "src", tmp_path / "out", CPU)
    assert report["passthrough"]["lm_head.weight"] == "copied"
    assert isinstance(report["layers"], dict) and "lm_head" not in report["layers"]


def test_activation_and_scheme_in_plan(tmp_path: Path) -> None:
    _, _, _, plan = open_source(build_mistral(tmp_path / "src", **DIMS))
    assert {(lin.scheme.granularity, lin.activation) for lin in plan.linears} == {
        (Granularity.TENSOR, ActScheme.STATIC_TENSOR)
    }
    assert all(lin.input_scale is not None and lin.input_scale.key.endswith("qscale_act") for lin in plan.linears)
    assert not plan.problems
