"""compressed-tensors (FORMATS.md L5): fixtures against real llm-compressor output, detection, and
read -> canonical -> AIU -> reload for every scheme, with tolerances from FP8/bf16 precision."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fp8convert.errors import UnsupportedSchemeError
from fp8convert.examples import TinyModel, build_tensors, quantization_config
from fp8convert.formats import open_source
from fp8convert.numerics import dequantize, dequantize_linear
from fp8convert.pipeline import ConvertOptions, convert, inspect_checkpoint
from fp8convert.spec import ActScheme, Granularity, Target

from tolerances import E4M3_REL, REQUANT_SQNR_FLOOR_DB, SQNR_DB_ABS

GOLDEN = json.loads((Path(__file__).parent / "golden" / "llmcompressor_0_14.json").read_text())
#: real llm-compressor 0.14.0.1 checkpoint (tests/golden) -> the fixture call that must reproduce it
REAL = {
    "llama256-fp8dynamic": {"scheme": "FP8_DYNAMIC"},
    "llama256-fp8static": {"scheme": "FP8"},
    "llama256-fp8block": {"scheme": "FP8_BLOCK"},
    "llama192-fp8block": {"scheme": "FP8_BLOCK", "hidden": 192, "intermediate": 320},
    "llama256-fp8static-kvtensor": {"scheme": "FP8", "kv_cache": "tensor"},
    "llama256-fp8static-kvhead": {"scheme": "FP8", "kv_cache": "attn_head"},
    "llama256-fp8w8a16": {"scheme": "W8A16_CHANNEL"},
    "granite256-fp8dynamic": {"scheme": "FP8_DYNAMIC", "arch": "granite"},
    "llama256bias-fp8dynamic": {"scheme": "FP8_DYNAMIC", "bias": True},
}
ST = {torch.float8_e4m3fn: "F8_E4M3", torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


@pytest.mark.parametrize("name", sorted(REAL))
def test_fixture_reproduces_llm_compressor(name: str) -> None:
    """Key set, dtypes, shapes and the quantization_config block equal what llm-compressor 0.14 wrote."""
    kwargs = dict(REAL[name])
    scheme = kwargs.pop("scheme")
    tensors = build_tensors(scheme=scheme, **kwargs)  # type: ignore[arg-type]
    got = {k: [ST[v.dtype], list(v.shape)] for k, v in tensors.items()}
    assert got == GOLDEN[name]["tensors"]
    assert quantization_config(scheme, kv_cache=kwargs.get("kv_cache")) == GOLDEN[name]["quantization_config"]  # type: ignore[arg-type]


def test_fixture_config_has_the_architecture_keys() -> None:
    config = TinyModel(arch="granite").config()
    assert config["architectures"] == ["GraniteForCausalLM"] and config["tie_word_embeddings"] is True


def test_detection_names_rule_and_evidence(make_ct) -> None:
    r = inspect_checkpoint(make_ct("FP8_DYNAMIC", hidden=64, intermediate=128, vocab=64))
    assert r["format"] == "compressed-tensors"
    assert "quant_method" in r["rule"]
    assert any("quant_method='compressed-tensors'" in e for e in r["evidence"])
    assert any("weight_scale bfloat16 x14" in e for e in r["evidence"])
    assert {lin["action"] for lin in r["linears"]} == {"keep (exact)"}


def _dequant_out(out: Path, module: str) -> torch.Tensor:
    with safe_open(str(next((out / "aiu").glob("*.safetensors"))), "pt") as f:
        w, s = f.get_tensor(f"{module}.weight"), f.get_tensor(f"{module}.weight_scale")
    return w.float() * (s.float().reshape(-1, 1) if s.numel() > 1 else s.float().reshape(1, 1))


def _aiu_tensors(out: Path) -> dict[str, torch.Tensor]:
    result = {}
    for path in sorted((out / "aiu").glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            result.update({k: f.get_tensor(k) for k in f.keys()})
    return result


EXACT_TARGET = {
    "FP8_DYNAMIC": (Granularity.CHANNEL, ActScheme.DYNAMIC_TOKEN),
    "FP8": (Granularity.TENSOR, ActScheme.STATIC_TENSOR),
    "FP8_TENSOR_DYNAMIC": (Granularity.TENSOR, ActScheme.DYNAMIC_TENSOR),
    "FP8_TENSOR_TOKEN": (Granularity.CHANNEL, ActScheme.DYNAMIC_TOKEN),
    "FP8_CHANNEL_STATIC": (Granularity.CHANNEL, ActScheme.DYNAMIC_TOKEN),
    "W8A16_CHANNEL": (Granularity.CHANNEL, ActScheme.DYNAMIC_TOKEN),
    "W8A16_TENSOR": (Granularity.CHANNEL, ActScheme.DYNAMIC_TOKEN),
}


@pytest.mark.parametrize("scheme", sorted(EXACT_TARGET))
def test_exact_schemes_round_trip(make_ct, tmp_path: Path, scheme: str) -> None:
    """Weights whose scheme only changes shape: dequantized AIU weight == dequantized source (atol=0)."""
    src = make_ct(scheme, hidden=192, intermediate=320, bias=True, shards=2)
    report = convert(src, tmp_path / "out")
    assert (Granularity(report["target"]["weights"]), ActScheme(report["target"]["activations"])) == EXACT_TARGET[
        scheme
    ]
    ckpt, _, reader, plan = open_source(src)
    out = _aiu_tensors(tmp_path / "out")
    for lin in plan.linears:
        ref = reader.read_linear(ckpt, lin)
        torch.testing.assert_close(_dequant_out(tmp_path / "out", lin.module), dequantize_linear(ref), atol=0, rtol=0)
        assert out[f"{lin.module}.weight_scale"].dtype == torch.bfloat16
        assert torch.equal(out[f"{lin.module}.bias"], ref.bias)
        rec = report["layers"][lin.module]
        assert rec["sqnr_db"] is None and rec["changed_codes"] == 0
        static = EXACT_TARGET[scheme][1] is ActScheme.STATIC_TENSOR
        assert (f"{lin.module}.input_scale" in out) is static
        if static:
            assert torch.equal(out[f"{lin.module}.input_scale"].float(), ref.input_scale)
    changes_activation = scheme in ("FP8_CHANNEL_STATIC", "W8A16_CHANNEL", "W8A16_TENSOR")
    assert bool(report["lossy_steps"]) is changes_activation
    assert all("numerics change" in s for s in report["lossy_steps"])


@pytest.mark.parametrize("dims", [(256, 512), (192, 320)], ids=["multiple-of-128", "not-multiple-of-128"])
def test_block_requantized_per_channel(make_ct, tmp_path: Path, dims: tuple[int, int]) -> None:
    """FP8_BLOCK -> per channel: every element within one e4m3 rounding of the block-dequantized source,
    SQNR above the floor, and the report states the measured SQNR of each layer."""
    hidden, inter = dims
    src = make_ct("FP8_BLOCK", hidden=hidden, intermediate=inter)
    report = convert(src, tmp_path / "out")
    assert report["target"]["weights"] == "channel"
    ckpt, _, reader, plan = open_source(src)
    out = _aiu_tensors(tmp_path / "out")
    for lin in plan.linears:
        ref = reader.read_linear(ckpt, lin)
        hp = dequantize(ref.weight, ref.weight_scale, ref.scheme)
        scale = out[f"{lin.module}.weight_scale"].float()
        assert scale.shape == (lin.out_features, 1)
        got = out[f"{lin.module}.weight"].float() * scale
        bound = E4M3_REL * hp.abs() + scale * 2.0**-10  # half an ulp: normal range, or the subnormal step
        assert bool(((got - hp).abs() <= bound).all()), lin.module
        noise = float((got.double() - hp.double()).pow(2).sum())
        sqnr = 10 * math.log10(float(hp.double().pow(2).sum()) / noise)
        rec = report["layers"][lin.module]
        assert rec["sqnr_db"] == pytest.approx(sqnr, abs=SQNR_DB_ABS)
        assert sqnr >= REQUANT_SQNR_FLOOR_DB
        assert rec["exact"] is False and "requantized per channel" in rec["actions"][0]
    assert len(report["lossy_steps"]) == len(plan.linears)


def test_block_scale_uses_config_block_not_shape(make_ct, tmp_path: Path) -> None:
    """[192, 320] with block 128: grid [2, 3]; deriving the block from 192 // 2 = 96 would be wrong."""
    src = make_ct("FP8_BLOCK", hidden=192, intermediate=320)
    ckpt, _, reader, plan = open_source(src)
    down = next(lin for lin in plan.linears if lin.module.endswith("down_proj"))
    assert down.weight_scale.shape == (2, 3) and down.scheme.block == (128, 128)
    ref = reader.read_linear(ckpt, down)
    rows_96 = ref.weight_scale.repeat_interleave(96, 0).repeat_interleave(107, 1)[:192, :320]
    assert not torch.equal(dequantize(ref.weight, ref.weight_scale, ref.scheme), ref.weight.float() * rows_96)


@pytest.mark.parametrize("kv", ["tensor", "attn_head", "legacy"])
def test_kv_cache_scales_read_and_dropped(make_ct, tmp_path: Path, kv: str) -> None:
    src = make_ct(
        "FP8",
        hidden=64,
        intermediate=128,
        vocab=64,
        kv_cache="tensor" if kv == "legacy" else kv,
        legacy_kv_names=kv == "legacy",
    )
    report = convert(src, tmp_path / "out")
    kvs = report["kv_cache_scales"]
    assert len(kvs) == 4 and {k["kind"] for k in kvs} == {"k", "v"}
    assert {k["module"] for k in kvs} == {"model.layers.0.self_attn", "model.layers.1.self_attn"}
    assert all(k["shape"] == ([2, 1, 1] if kv == "attn_head" else [1]) for k in kvs)
    out = _aiu_tensors(tmp_path / "out")
    assert not [k for k in out if k.endswith(("k_scale", "v_scale", "output_scale"))]
    config = json.loads((tmp_path / "out" / "aiu" / "config.json").read_text())
    assert config["quantization_config"]["kv_cache_scheme"] is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_scale_dtypes(make_ct, tmp_path: Path, dtype: torch.dtype) -> None:
    """f16/f32 scales: cast to bf16 when exact, else rounded up with codes requantized (reported)."""
    src = make_ct("FP8_DYNAMIC", hidden=64, intermediate=128, vocab=64, scale_dtype=dtype)
    report = convert(src, tmp_path / "out")
    ckpt, _, reader, plan = open_source(src)
    out = _aiu_tensors(tmp_path / "out")
    for lin in plan.linears:
        ref = reader.read_linear(ckpt, lin)
        s_new = out[f"{lin.module}.weight_scale"]
        assert s_new.dtype == torch.bfloat16 and bool((s_new.float() >= ref.weight_scale).all())
        rec = report["layers"][lin.module]
        exact = torch.equal(ref.weight_scale.to(torch.bfloat16).float(), ref.weight_scale)
        assert rec["exact"] is exact
        got = out[f"{lin.module}.weight"].float() * s_new.float()
        hp = dequantize_linear(ref)
        assert bool(((got - hp).abs() <= E4M3_REL * hp.abs() + s_new.float() * 2.0**-10).all())
        if not exact:
            assert "rounded up" in rec["actions"][0] and rec["sqnr_db"] is not None
    assert report["layers"]  # every layer checked above


def test_ignore_patterns_and_unquantized_decoder_linears(make_ct, tmp_path: Path) -> None:
    """`re:` ignore entries: the listed modules stay bf16. The AIU stack cannot keep decoder linears in bf16:
    error unless --quantize-unquantized; the CPU-only target keeps them as plain linears."""
    src = make_ct(
        "FP8_DYNAMIC",
        hidden=64,
        intermediate=128,
        vocab=64,
        ignore=["lm_head", "re:.*mlp\\.down_proj$"],
        unquantized=("0.mlp.down_proj", "1.mlp.down_proj"),
    )
    r = inspect_checkpoint(src)
    assert r["unquantized_linears"] == ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    with pytest.raises(Exception, match="--quantize-unquantized"):
        convert(src, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    cpu = convert(src, tmp_path / "b", ConvertOptions(targets=frozenset({Target.CPU})))
    plan = json.loads((tmp_path / "b" / "cpu" / "fp8convert.json").read_text())
    assert "model.layers.0.mlp.down_proj" not in plan["modules"] and len(plan["modules"]) == 12
    assert cpu["passthrough"]["model.layers.0.mlp.down_proj.weight"] == "copied"
    q = convert(src, tmp_path / "c", ConvertOptions(quantize_unquantized=True))
    rec = q["layers"]["model.layers.1.mlp.down_proj"]
    assert rec["source"] == "bf16 (unquantized)" and rec["sqnr_db"] >= REQUANT_SQNR_FLOOR_DB


def test_fp8_module_in_ignore_list_is_refused(make_ct) -> None:
    src = make_ct("FP8_DYNAMIC", hidden=64, intermediate=128, vocab=64, ignore=["lm_head", "re:.*q_proj$"])
    with pytest.raises(UnsupportedSchemeError, match="in the config.s ignore list"):
        inspect_checkpoint(src)
    with pytest.raises(UnsupportedSchemeError, match="in the config.s ignore list"):
        convert(src, src.parent / "out")
    assert not (src.parent / "out").exists()


def test_quantized_lm_head_is_dequantized(make_ct, tmp_path: Path) -> None:
    """A quantized head becomes bf16 (fms keeps the head in full precision); one bf16 rounding, reported."""
    from fp8convert.examples import write_checkpoint

    tensors = build_tensors(scheme="FP8_DYNAMIC", hidden=64, intermediate=128, vocab=64)
    w = tensors["lm_head.weight"].float()
    scale = (w.abs().amax(1, keepdim=True) / 448).to(torch.bfloat16)
    tensors["lm_head.weight"] = (w / scale.float()).clamp(-448, 448).to(torch.float8_e4m3fn)
    tensors["lm_head.weight_scale"] = scale
    config = TinyModel(hidden=64, intermediate=128, vocab=64).config()
    config["quantization_config"] = quantization_config("FP8_DYNAMIC", ignore=[])
    src = write_checkpoint(tmp_path / "src", tensors, config)
    report = convert(src, tmp_path / "out")
    out = _aiu_tensors(tmp_path / "out")
    assert out["lm_head.weight"].dtype == torch.bfloat16 and "lm_head.weight_scale" not in out
    hp = tensors["lm_head.weight"].float() * scale.float()
    assert torch.equal(out["lm_head.weight"], hp.to(torch.bfloat16))
    assert report["layers"]["lm_head"]["target"] == "bf16 (dequantized)"
    cpu_plan = json.loads((tmp_path / "out" / "cpu" / "fp8convert.json").read_text())
    assert "lm_head" not in cpu_plan["modules"]


def test_granite_tied_and_config_block(make_ct, tmp_path: Path) -> None:
    src = make_ct("FP8_DYNAMIC", arch="granite", hidden=64, intermediate=128, vocab=64)
    convert(src, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "aiu" / "config.json").read_text())
    source = json.loads((src / "config.json").read_text())
    assert config["architectures"] == ["GraniteForCausalLM"] and config["tie_word_embeddings"] is True
    assert config["logits_scaling"] == source["logits_scaling"]
    assert "lm_head.weight" not in _aiu_tensors(tmp_path / "out")
    qc = config["quantization_config"]
    assert list(qc["config_groups"]) == ["group_0"] and qc["ignore"] == ["lm_head"]
    assert qc["config_groups"]["group_0"]["weights"]["strategy"] == "channel"
    assert qc["config_groups"]["group_0"]["input_activations"]["strategy"] == "token"
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "out" / "aiu" / name).read_bytes() == (src / name).read_bytes()


def test_cpu_variant_is_hardlinked(make_ct, tmp_path: Path) -> None:
    src = make_ct("FP8_DYNAMIC", hidden=64, intermediate=128, vocab=64)
    report = convert(src, tmp_path / "out")
    for shard in (tmp_path / "out" / "aiu").glob("*.safetensors"):
        assert shard.stat().st_ino == (tmp_path / "out" / "cpu" / shard.name).stat().st_ino
    assert set(report["cpu_links"].values()) == {"hardlink"}


@pytest.mark.parametrize("spelling", ["compression_config", "sparseml", "text_config"])
def test_legacy_and_nested_config_spellings(make_ct, tmp_path: Path, spelling: str) -> None:
    """Pre-2024-09 `compression_config`, pre-2024-06 `quant_method: sparseml`, and a multimodal
    `text_config.quantization_config` are read like the current spelling (same tensors)."""
    src = make_ct("FP8_DYNAMIC", hidden=64, intermediate=128, vocab=64)
    config = json.loads((src / "config.json").read_text())
    qc = config.pop("quantization_config")
    if spelling == "compression_config":
        config["compression_config"] = qc
    elif spelling == "sparseml":
        config["quantization_config"] = {**qc, "quant_method": "sparseml"}
    else:
        config["text_config"] = {"quantization_config": qc}
    (src / "config.json").write_text(json.dumps(config))
    r = inspect_checkpoint(src)
    assert r["format"] == "compressed-tensors" and len(r["linears"]) == 14
    report = convert(src, tmp_path / "out")
    out_config = json.loads((tmp_path / "out" / "aiu" / "config.json").read_text())
    assert "compression_config" not in out_config
    assert out_config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert report["summary"]["exact"] == 14


def test_kv_scale_drop_is_a_reported_lossy_step(make_ct, tmp_path: Path) -> None:
    report = convert(make_ct("FP8", hidden=64, intermediate=128, vocab=64, kv_cache="tensor"), tmp_path / "out")
    assert report["lossy_steps"] == [
        "4 KV-cache scale(s) dropped: the AIU stack uses KV scale 1.0 (listed under kv_cache_scales)"
    ]


def test_dense_format_is_decided_by_the_header(make_ct, tmp_path: Path) -> None:
    """`format: dense` (sparsity compressor off): fp8 weights with scales convert; a sparse-compressed
    sparsity_config is refused."""
    src = make_ct("FP8_DYNAMIC", hidden=64, intermediate=128, vocab=64)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"]["format"] = "dense"
    config["quantization_config"]["config_groups"]["group_0"]["format"] = None
    (src / "config.json").write_text(json.dumps(config))
    assert convert(src, tmp_path / "out")["summary"]["exact"] == 14
    config["quantization_config"]["sparsity_config"] = {"format": "sparse-24-bitmask"}
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedSchemeError, match="sparse-compressed weights are not supported"):
        inspect_checkpoint(src)


def test_quantize_unquantized_makes_the_whole_model_per_channel(make_ct, tmp_path: Path) -> None:
    """A per-tensor static model with bf16 decoder linears: quantizing them per channel switches the model to
    the per-channel target (one AIU group), so every scale is [out, 1] and no input_scale remains."""
    src = make_ct(
        "FP8",
        hidden=64,
        intermediate=128,
        vocab=64,
        ignore=["lm_head", "re:.*down_proj$"],
        unquantized=("0.mlp.down_proj", "1.mlp.down_proj"),
    )
    report = convert(src, tmp_path / "out", ConvertOptions(quantize_unquantized=True))
    assert (report["target"]["weights"], report["target"]["activations"]) == ("channel", "dynamic-token")
    out = _aiu_tensors(tmp_path / "out")
    scales = {k: v for k, v in out.items() if k.endswith(".weight_scale")}
    assert len(scales) == 14 and all(v.shape == (out[k[: -len("_scale")]].shape[0], 1) for k, v in scales.items())
    assert not [k for k in out if k.endswith("input_scale")]


def test_overwrite_drops_the_previous_runs_other_target(make_ct, tmp_path: Path) -> None:
    convert(make_ct("FP8_DYNAMIC", hidden=64, intermediate=128, vocab=64), tmp_path / "out")
    qwen = make_ct("FP8_DYNAMIC", arch="qwen3", hidden=64, intermediate=128, vocab=64)
    report = convert(qwen, tmp_path / "out", ConvertOptions(overwrite=True))
    assert report["options"]["targets"] == ["cpu"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cpu", "fp8convert-report.json"]


def test_cpu_only_variant_keeps_the_source_dtype() -> None:
    from fp8convert.writers.aiu import target_config

    source = {"architectures": ["Qwen3ForCausalLM"], "torch_dtype": "float16"}
    assert target_config(source, Granularity.CHANNEL, ActScheme.DYNAMIC_TOKEN, bf16=False)["torch_dtype"] == "float16"
    assert target_config(source, Granularity.CHANNEL, ActScheme.DYNAMIC_TOKEN)["torch_dtype"] == "bfloat16"


def test_load_one_expert_reads_only_its_slice(tmp_path: Path) -> None:
    from fp8convert.examples import write_checkpoint
    from fp8convert.shards import Checkpoint

    fused = torch.randn(4, 8, 16).to(torch.float8_e4m3fn)
    src = write_checkpoint(tmp_path / "src", {"experts.gate_up_proj": fused}, {"vocab_size": 8}, tokenizer=False)
    ckpt = Checkpoint(src)
    for e in range(4):
        assert torch.equal(ckpt.load("experts.gate_up_proj", index=e).view(torch.uint8), fused[e].view(torch.uint8))
