"""MoE and non-AIU architectures: auto target writes the CPU variant alone; load_cpu_model runs them with
fused-expert fake-quant modules, and agrees with transformers' own model on the dequantized weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fp8convert.errors import CheckpointError
from fp8convert.examples import TinyModel
from fp8convert.fakequant import FakeQuantExperts, FakeQuantLinear, load_cpu_model
from fp8convert.pipeline import ConvertOptions, convert
from fp8convert.spec import Target

from cpu_reference import cosine, logits_vs_transformers

pytestmark = pytest.mark.cpu_model
transformers = pytest.importorskip("transformers", reason="the cpu extra (transformers) is part of the test install")

DIMS = {"hidden": 64, "intermediate": 128, "vocab": 64, "experts": 4, "moe_intermediate": 32}


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "deepseek_v3", "qwen3", "mistral"])
def test_non_aiu_architectures_get_the_cpu_variant(make_ct, tmp_path: Path, arch: str) -> None:
    src = make_ct("FP8_DYNAMIC", arch=arch, **DIMS)
    report = convert(src, tmp_path / "out")
    assert not (tmp_path / "out" / "aiu").exists() and (tmp_path / "out" / "cpu").is_dir()
    assert "not loadable as FP8 by the AIU stack" in report["options"]["aiu_skipped"]
    model = load_cpu_model(tmp_path / "out" / "cpu")
    fq = [n for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    plan = json.loads((tmp_path / "out" / "cpu" / "fp8convert.json").read_text())
    assert len(fq) == len(plan["modules"])  # names as transformers renames them (Mixtral: block_sparse_moe -> mlp)
    if arch in ("qwen3_moe", "mixtral", "deepseek_v3"):  # deepseek: layer 0 is dense
        assert sum(isinstance(m, FakeQuantExperts) for m in model.modules()) == (1 if arch == "deepseek_v3" else 2)
    got, ref = logits_vs_transformers(tmp_path / "out" / "cpu", tmp_path / "dense", TinyModel(arch=arch, **DIMS))
    cos = cosine(got, ref)
    # W8A8 vs weight-only bf16 on a random tiny model: a few % relative error (NUMERICS.md), cosine ~0.999
    assert float(cos) > 0.99, float(cos)
    assert float((got.argmax(-1) == ref.argmax(-1)).float().mean()) >= 0.75


def test_explicit_aiu_target_is_refused_for_moe(make_ct, tmp_path: Path) -> None:
    src = make_ct("FP8_DYNAMIC", arch="qwen3_moe", **DIMS)
    with pytest.raises(CheckpointError, match="Qwen3MoeForCausalLM.*not loadable as FP8 by the AIU stack"):
        convert(src, tmp_path / "out", ConvertOptions(targets=frozenset({Target.AIU})))
    assert not (tmp_path / "out").exists()


def test_router_stays_bf16(make_ct, tmp_path: Path) -> None:
    src = make_ct("FP8_DYNAMIC", arch="qwen3_moe", ignore=["lm_head", "re:.*mlp.gate$"], **DIMS)
    report = convert(src, tmp_path / "out")
    assert report["passthrough"]["model.layers.0.mlp.gate.weight"] == "copied"
    assert "model.layers.0.mlp.gate" not in report["layers"]
    assert len(report["layers"]) == 2 * (4 + 3 * 4)
