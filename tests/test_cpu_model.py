"""The CPU variant as a whole model: load_cpu_model, smoke test, and what plain transformers does with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fp8convert.errors import CheckpointError, VerificationError
from fp8convert.fakequant import FakeQuantLinear, load_cpu_model
from fp8convert.pipeline import ConvertOptions, convert
from fp8convert.spec import Target
from fp8convert.verify import smoke_test

pytestmark = pytest.mark.cpu_model
transformers = pytest.importorskip("transformers", reason="the cpu extra (transformers) is part of the test install")


@pytest.fixture
def converted(make_ct, tmp_path: Path) -> Path:
    src = make_ct("FP8_DYNAMIC", hidden=64, intermediate=128, vocab=64, bias=True)
    convert(src, tmp_path / "out")
    return tmp_path / "out"


def test_load_cpu_model_swaps_every_planned_linear(converted: Path) -> None:
    model = load_cpu_model(converted / "cpu")
    fq = {n for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
    plan = json.loads((converted / "cpu" / "fp8convert.json").read_text())
    assert fq == set(plan["modules"])
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.dtype == torch.bfloat16
    assert not [n for n, p in model.named_parameters() if p.is_meta]
    logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.dtype == torch.bfloat16 and bool(torch.isfinite(logits).all())


def test_fake_quant_model_matches_manual_linears(converted: Path) -> None:
    """Swapping the FakeQuantLinears back for nn.Linear with the same (fallback) arithmetic written out
    by hand gives identical logits: the model is wired correctly, not just runnable."""
    model = load_cpu_model(converted / "cpu")
    x = torch.tensor([[5, 9, 11, 2, 7]])
    want = model(x).logits
    calls = []

    def hook(mod, inp, out):
        calls.append(mod)

    for m in model.modules():
        if isinstance(m, FakeQuantLinear):
            m.register_forward_hook(hook)
    assert torch.equal(model(x).logits, want) and len(calls) == 14


def test_fp16_activations(converted: Path) -> None:
    model = load_cpu_model(converted / "cpu", activation_dtype=torch.float16)
    layer = model.get_submodule("model.layers.0.mlp.up_proj")
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.dtype == torch.float16
    assert model.get_submodule("model.embed_tokens").weight.dtype == torch.float16
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.dtype == torch.float16 and bool(torch.isfinite(logits).all())


def test_smoke_test_agreement(converted: Path) -> None:
    result = smoke_test(converted / "cpu")
    assert result["ok"] and result["token_source"] == "tokenizer.json" and result["tokens"] == 5
    assert 0.99 <= result["cosine"] <= 1.0 and result["rel_l2"] < 0.1
    with pytest.raises(VerificationError, match="cosine"):
        smoke_test(converted / "cpu", min_cosine=1.01)


def test_cpu_only_target(make_ct, tmp_path: Path) -> None:
    src = make_ct("FP8", hidden=64, intermediate=128, vocab=64)
    convert(src, tmp_path / "out", ConvertOptions(targets=frozenset({Target.CPU})))
    assert not (tmp_path / "out" / "aiu").exists()
    model = load_cpu_model(tmp_path / "out" / "cpu", numerics="hardware")
    assert bool(torch.isfinite(model(torch.tensor([[1, 2]])).logits).all())


def test_load_cpu_model_refuses_other_directories(make_ct, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="fp8convert.json not found"):
        load_cpu_model(make_ct("FP8_DYNAMIC", hidden=64, intermediate=128, vocab=64))


def test_plain_transformers_never_silently_wrong(converted: Path) -> None:
    """OUT/cpu is a valid compressed-tensors checkpoint: transformers either loads it through the
    compressed-tensors integration (then the numbers must agree with the dequantized weights) or refuses."""
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(converted / "cpu"))
    except (ImportError, ValueError) as exc:
        assert "compressed" in str(exc).lower()
        return
    ours = load_cpu_model(converted / "cpu")
    x = torch.tensor([[1, 2, 3, 4]])
    cos = torch.nn.functional.cosine_similarity(
        model(x).logits.float().reshape(1, -1), ours(x).logits.float().reshape(1, -1)
    )
    assert float(cos) > 0.99


def test_fp16_keeps_fp32_rotary_tables(converted: Path) -> None:
    """The AIU stack casts bf16 tensors to fp16; fp32 buffers (rotary inv_freq) stay fp32."""
    model = load_cpu_model(converted / "cpu", activation_dtype=torch.float16)
    fp32 = {n: b.dtype for n, b in model.named_buffers() if "inv_freq" in n}
    assert fp32 and set(fp32.values()) == {torch.float32}


def test_plan_and_tensors_that_disagree_are_refused(converted: Path) -> None:
    plan_path = converted / "cpu" / "fp8convert.json"
    plan = json.loads(plan_path.read_text())
    plan["modules"]["model.layers.0.self_attn.q_proj"]["weight"] = "tensor"  # the stored scale is [out, 1]
    plan_path.unlink()  # a hardlink-free copy: the report's checksum of the original stays as it was
    plan_path.write_text(json.dumps(plan))
    with pytest.raises(CheckpointError, match=r"q_proj.weight_scale has shape \[64, 1\], the model expects \[1\]"):
        load_cpu_model(converted / "cpu")
