"""The AIU artifact: supported architectures, the exact config.json quantization block, tensor names.

This module is the one place that knows what IBM's AIU stack (ibm-fms ``get_model`` + the
fms-model-optimizer FP8 addon, vllm-spyre) accepts (AIU_TARGET.md "The AIU target, as a spec"); a new
fms release that supports another architecture is a one-line change to ``AIU_ARCHITECTURES``.
"""

from __future__ import annotations

import copy
import re

from fp8convert.spec import ActScheme, Granularity

#: architectures[0] -> model_type that fms + fms-mo load as FP8 (fms 1.13 / fms-mo 0.8.7: llama, granite).
AIU_ARCHITECTURES = {"LlamaForCausalLM": "llama", "GraniteForCausalLM": "granite"}
#: Every decoder linear of these architectures must be FP8 (fms-mo cannot keep one in full precision).
DECODER_LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)$")
#: Quantized modules the AIU stack keeps in full precision: dequantized to bf16.
FULL_PRECISION_MODULES = ("lm_head",)


def _args(strategy: str, dynamic: bool, observer: str | None) -> dict[str, object]:
    return {
        "actorder": None,
        "block_structure": None,
        "dynamic": dynamic,
        "group_size": None,
        "num_bits": 8,
        "observer": observer,
        "observer_kwargs": {},
        "strategy": strategy,
        "symmetric": True,
        "type": "float",
    }


def quantization_config(weights: Granularity, activation: ActScheme) -> dict[str, object]:
    """The config.json ``quantization_config`` block, key for key (granite-3.3-8b-instruct-FP8 style)."""
    if (weights, activation) == (Granularity.CHANNEL, ActScheme.DYNAMIC_TOKEN):
        w, a = _args("channel", False, "minmax"), _args("token", True, None)
    elif (weights, activation) == (Granularity.TENSOR, ActScheme.DYNAMIC_TENSOR):
        w, a = _args("tensor", False, "minmax"), _args("tensor", True, None)
    elif (weights, activation) == (Granularity.TENSOR, ActScheme.STATIC_TENSOR):
        w, a = _args("tensor", False, "minmax"), _args("tensor", False, "minmax")
    else:
        raise ValueError(f"not an AIU scheme: {weights} + {activation}")
    return {
        "config_groups": {
            "group_0": {"input_activations": a, "output_activations": None, "targets": ["Linear"], "weights": w}
        },
        "format": "float-quantized",
        "global_compression_ratio": None,
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
    }


def architecture_problems(config: dict) -> list[str]:
    """Why the AIU stack cannot load a model with this config (empty: it can)."""
    archs = config.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in AIU_ARCHITECTURES:
        return [
            f"architecture {arch!r} is not loadable as FP8 by the AIU stack (ibm-fms + fms-model-optimizer "
            f"support {', '.join(AIU_ARCHITECTURES)}); the CPU variant (--target cpu) can still be written"
        ]
    problems = []
    if config.get("model_type") not in (None, AIU_ARCHITECTURES[arch]):
        problems.append(f"model_type {config.get('model_type')!r} does not match {arch}")
    head_dim = config.get("head_dim")
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    if arch == "LlamaForCausalLM" and head_dim is not None and hidden and heads and head_dim != hidden // heads:
        problems.append(
            f"head_dim {head_dim} != hidden_size/num_attention_heads = {hidden // heads}: fms ignores "
            "head_dim for Llama and would build the wrong attention shapes"
        )
    return problems


def target_config(source: dict, weights: Granularity, activation: ActScheme, *, bf16: bool = True) -> dict:
    """config.json of the artifact: the source's, with the AIU quantization block and (``bf16``: the AIU
    target, whose tensors are all cast to bf16) dtype bfloat16."""
    config = copy.deepcopy(source)
    config.pop("compression_config", None)
    config["quantization_config"] = quantization_config(weights, activation)
    if isinstance(config.get("text_config"), dict):
        config["text_config"].pop("quantization_config", None)
    keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
    for k in keys:
        config[k] = "bfloat16" if bf16 else config.get(k, "bfloat16")
    return config


def tensor_names(module: str, *, static_input: bool, bias: bool) -> list[str]:
    names = [f"{module}.weight", f"{module}.weight_scale"]
    if static_input:
        names.append(f"{module}.input_scale")
    if bias:
        names.append(f"{module}.bias")
    return names
