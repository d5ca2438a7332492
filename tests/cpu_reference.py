"""An independent reference for the CPU variant: its weights dequantized (weight-only) into a plain bf16
transformers checkpoint, and the cosine of the two models' logits on the same tokens."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from fp8convert.examples import TinyModel, write_checkpoint
from fp8convert.fakequant import load_cpu_model

IDS = torch.tensor([[1, 5, 9, 13, 2, 7, 30, 41]])


def dequantized_checkpoint(cpu_dir: Path, dst: Path, model: TinyModel) -> Path:
    """The CPU variant's weights dequantized to bf16 (weight-only), as a plain transformers checkpoint."""
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(cpu_dir.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    out = {}
    for key, t in tensors.items():
        if key.endswith(("weight_scale", "input_scale")):
            continue
        if t.dtype == torch.float8_e4m3fn:
            s = tensors[key + "_scale"].float()
            t = (t.float() * (s.reshape(-1, 1) if s.numel() > 1 else s)).to(torch.bfloat16)
        out[key] = t
    return write_checkpoint(dst, out, model.config())


def logits_vs_transformers(cpu_dir: Path, dst: Path, model: TinyModel) -> tuple[torch.Tensor, torch.Tensor]:
    """(CPU variant logits, transformers' logits on the dequantized weights), fp32, for ``IDS``."""
    import transformers

    ref_dir = dequantized_checkpoint(cpu_dir, dst, model)
    with torch.inference_mode():
        got = load_cpu_model(cpu_dir)(IDS).logits.float()
        ref = transformers.AutoModelForCausalLM.from_pretrained(str(ref_dir), dtype=torch.bfloat16)(IDS).logits.float()
    return got, ref


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.reshape(1, -1), b.reshape(1, -1)))
