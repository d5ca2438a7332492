"""IBM's own loader (ibm-fms get_model + fms-model-optimizer FP8Linear) on every AIU artifact the converter
writes, and bit-exactness of every FP8Linear against the CPU variant's FakeQuantLinear."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from fp8convert.fakequant import FakeQuantLinear, load_cpu_model
from fp8convert.pipeline import convert
from fp8convert.spec import Numerics
from fp8convert.verify import FMS_TO_HF, fms_linear_check, verify

pytestmark = pytest.mark.aiu

CASES = [
    ("llama", "FP8_DYNAMIC", False),
    ("llama", "FP8_DYNAMIC", True),
    ("granite", "FP8_DYNAMIC", False),
    ("granite", "FP8_DYNAMIC", True),
    ("llama", "FP8", False),
    ("granite", "FP8", True),
    ("llama", "FP8_TENSOR_DYNAMIC", True),
    ("granite", "FP8_TENSOR_DYNAMIC", False),
    ("llama", "FP8_BLOCK", False),  # requantized per channel
    ("llama", "FP8_TENSOR_TOKEN", True),  # broadcast to per channel
    ("granite", "W8A16_CHANNEL", False),  # activations become dynamic per token
]


def _load(fms, path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fms.get_model(
            "hf_pretrained", model_path=str(path), device_type="cpu", data_type=None, fused_weights=False
        )


def _hf_name(fms_name: str) -> str:
    # base_model.layers.N.<fms suffix> -> model.layers.N.<hf suffix>
    parts = fms_name.split(".")
    layer = parts.index("layers")
    return f"model.layers.{parts[layer + 1]}." + FMS_TO_HF[".".join(parts[layer + 2 :])]


def _meta_rope_rows(t: torch.Tensor, heads: int) -> torch.Tensor:
    """HF -> Meta rope layout of the last dim (fms permutes q/k rows on load: AIU_TARGET.md 2.3)."""
    n = t.shape[-1]
    return t.reshape(*t.shape[:-1], heads, 2, n // heads // 2).transpose(-1, -2).reshape(*t.shape[:-1], n)


@pytest.mark.parametrize(
    ("arch", "scheme", "bias"), CASES, ids=[f"{a}-{s}-{'bias' if b else 'nobias'}" for a, s, b in CASES]
)
def test_ibm_loader_and_bit_exact(fms, make_ct, tmp_path: Path, arch: str, scheme: str, bias: bool) -> None:
    src = make_ct(scheme, arch=arch, hidden=128, intermediate=256, vocab=128, heads=4, kv_heads=2, bias=bias)
    convert(src, tmp_path / "out")
    model = _load(fms, tmp_path / "out" / "aiu")
    with torch.inference_mode():
        logits = model(torch.tensor([[1, 5, 9, 30, 3, 7, 2]]))
    assert logits.shape == (1, 7, 128) and bool(torch.isfinite(logits).all())

    # 1) every fms-mo FP8Linear == FakeQuantLinear on its own tensors, both numerics, incl. a zero token
    compared, bad = fms_linear_check(model)
    assert compared == 2 * 14 and not bad

    # 2) and == the CPU variant's FakeQuantLinear (HF names; q/k outputs permuted as fms permutes rows)
    from fms_mo.aiu_addons.fp8.fp8_linear import FP8Linear

    for numerics in (Numerics.FALLBACK, Numerics.FMS_MO):
        cpu = load_cpu_model(tmp_path / "out" / "cpu", numerics=numerics)
        g = torch.Generator().manual_seed(1)
        checked = 0
        for name, module in model.named_modules():
            if not isinstance(module, FP8Linear):
                continue
            hf = _hf_name(name)
            ours = cpu.get_submodule(hf)
            assert isinstance(ours, FakeQuantLinear)
            x = (torch.randn(2, 5, module.in_features, generator=g) * 3).to(torch.bfloat16)
            x[1, 2] = 0
            want, got = module(x), ours(x)
            if hf.endswith(("q_proj", "k_proj")):
                heads = 4 if hf.endswith("q_proj") else 2
                got = _meta_rope_rows(got, heads)
            assert torch.equal(want, got), f"{hf} ({numerics})"
            checked += 1
        assert checked == 14


def test_verify_runs_ibm_loader(fms, make_ct, tmp_path: Path) -> None:
    src = make_ct("FP8_DYNAMIC", hidden=64, intermediate=128, vocab=64)
    convert(src, tmp_path / "out")
    result = verify(tmp_path / "out", aiu_check=True)
    names = {c["check"]: c for c in result["checks"]}
    assert names["IBM loader"]["ok"] and names["fms-mo FP8Linear == FakeQuantLinear (bit-exact)"]["ok"]
    assert "28 comparisons bit-identical" in names["fms-mo FP8Linear == FakeQuantLinear (bit-exact)"]["detail"]
