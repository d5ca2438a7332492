"""verify: each check can fail on its own, and IBM's loader is optional unless asked for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fp8convert import verify as verify_module
from fp8convert.errors import VerificationError
from fp8convert.pipeline import convert
from fp8convert.verify import verify


@pytest.fixture
def out(make_ct, tmp_path: Path) -> Path:
    convert(make_ct("FP8_DYNAMIC", hidden=64, intermediate=128, vocab=64), tmp_path / "out")
    return tmp_path / "out"


def _names(result: dict) -> dict[str, dict]:
    return {c["check"]: c for c in result["checks"]}


def test_no_aiu_check_does_not_load(out: Path, monkeypatch) -> None:
    monkeypatch.setattr(verify_module, "_check_fms", lambda *a: pytest.fail("IBM loader called"))
    assert "IBM loader" not in _names(verify(out, aiu_check=False))


def test_loader_missing_is_skipped_by_default_and_fails_when_asked(out: Path, monkeypatch) -> None:
    monkeypatch.setattr(verify_module, "_fms_available", lambda: False)
    check = _names(verify(out))["IBM loader"]
    assert check["ok"] and check["detail"].startswith("skipped") and check["severity"] == "warning"
    with pytest.raises(VerificationError, match=r"IBM loader: not installed: pip install"):
        verify(out, aiu_check=True)


def test_numbers_against_a_different_source_fail(out: Path, make_ct) -> None:
    """The report says the weights are exact: a source whose scales differ must fail the numbers check."""
    other = make_ct("FP8_DYNAMIC", hidden=64, intermediate=128, vocab=64, seed=1)
    with pytest.raises(VerificationError) as info:
        verify(out, source=other, aiu_check=False)
    assert any(
        p.startswith("numbers against the source: model.layers.0.mlp.down_proj: the report says the weights are exact")
        for p in info.value.problems
    )
    assert not any(p.startswith("checksums") for p in info.value.problems)


def test_spec_violations_are_named(out: Path) -> None:
    """A [out] (1-D) scale and an f32 scale in the AIU artifact: named even after the report is updated."""
    shard = next((out / "aiu").glob("*.safetensors"))
    tensors = load_file(str(shard))
    key = "model.layers.1.self_attn.o_proj.weight_scale"
    tensors[key] = tensors[key].reshape(-1)
    tensors["model.layers.0.mlp.up_proj.weight_scale"] = tensors["model.layers.0.mlp.up_proj.weight_scale"].float()
    shard.unlink()  # the cpu/ hardlink keeps the original
    save_file(tensors, str(shard), metadata={"format": "pt"})
    config = json.loads((out / "aiu" / "config.json").read_text())
    config["quantization_config"]["ignore"] = ["lm_head", "model.layers.0.mlp.down_proj"]
    (out / "aiu" / "config.json").write_text(json.dumps(config))
    with pytest.raises(VerificationError) as info:
        verify(out, aiu_check=False)
    text = "\n".join(info.value.problems)
    assert f"{key}: shape [64], expected [64, 1]" in text
    assert "model.layers.0.mlp.up_proj.weight_scale: torch.float32, expected bfloat16" in text
    assert "AIU quantization_config: differs from the AIU spec block" in text
    assert "checksums: aiu/config.json differs from the report" in text
    assert info.value.exit_code == 3


def test_nan_code_in_artifact_is_named(out: Path) -> None:
    shard = next((out / "aiu").glob("*.safetensors"))
    tensors = load_file(str(shard))
    w = tensors["model.layers.0.self_attn.v_proj.weight"].view(torch.uint8).clone()
    w[0, 0] = 0x7F
    tensors["model.layers.0.self_attn.v_proj.weight"] = w.view(torch.float8_e4m3fn)
    shard.unlink()
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(VerificationError, match=r"v_proj.weight: 1 fp8 NaN codes"):
        verify(out, aiu_check=False)
