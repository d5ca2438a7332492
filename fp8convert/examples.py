"""Tiny, seeded compressed-tensors FP8 checkpoints, written the way llm-compressor 0.14 writes them.

Used by ``fp8convert demo`` (the bundled example) and by the test suite's fixture builder. The key set,
dtypes and shapes reproduce real llm-compressor 0.14.0.1 / compressed-tensors 0.19.0 output (checked
against checkpoints it wrote on CPU): F8_E4M3 ``weight [out, in]``; BF16 ``weight_scale`` ``[out, 1]``
(channel), ``[1]`` (tensor) or ``[ceil(out/128), ceil(in/128)]`` (block); BF16 ``input_scale [1]`` for static
activations; ``self_attn.k_scale``/``v_scale`` ``[1]`` or ``[kv_heads, 1, 1]``; ``lm_head``, embeddings and
norms BF16; the config block with ``version``, ``sparsity_config``, ``transform_config`` and per-args
``scale_dtype``/``zp_dtype``.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fp8convert.numerics import E4M3_MAX
from fp8convert.writer import OutTensor, Sink, write_safetensors, write_sharded

#: llm-compressor preset -> (weights strategy, input activations (strategy, dynamic) or None, format)
SCHEMES: dict[str, tuple[str, tuple[str, bool] | None, str]] = {
    "FP8_DYNAMIC": ("channel", ("token", True), "float-quantized"),
    "FP8": ("tensor", ("tensor", False), "float-quantized"),
    "FP8_BLOCK": ("block", ("group", True), "float-quantized"),
    "FP8_TENSOR_DYNAMIC": ("tensor", ("tensor", True), "float-quantized"),
    "FP8_TENSOR_TOKEN": ("tensor", ("token", True), "float-quantized"),
    "FP8_CHANNEL_STATIC": ("channel", ("tensor", False), "float-quantized"),
    "W8A16_CHANNEL": ("channel", None, "naive-quantized"),
    "W8A16_TENSOR": ("tensor", None, "naive-quantized"),
    "W8A16_BLOCK": ("block", None, "naive-quantized"),
}
PROJ = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def _args(
    strategy: str, dynamic: bool, observer: str | None, *, block: list[int] | None = None, group_size: int | None = None
) -> dict[str, object]:
    return {
        "actorder": None,
        "block_structure": block,
        "dynamic": dynamic,
        "group_size": group_size,
        "num_bits": 8,
        "observer": observer,
        "observer_kwargs": {},
        "scale_dtype": None,
        "strategy": strategy,
        "symmetric": True,
        "type": "float",
        "zp_dtype": None,
    }


def quantization_config(scheme: str, *, kv_cache: str | None = None, ignore: list[str] | None = None) -> dict:
    """The ``quantization_config`` llm-compressor 0.14 writes for a preset."""
    w_strategy, acts, fmt = SCHEMES[scheme]
    weights = _args(w_strategy, False, "memoryless_minmax", block=[128, 128] if w_strategy == "block" else None)
    inputs = None
    if acts is not None:
        a_strategy, dynamic = acts
        inputs = _args(
            a_strategy, dynamic, None if dynamic else "static_minmax", group_size=128 if a_strategy == "group" else None
        )
    kv = None
    if kv_cache:
        kv = _args(kv_cache, False, None)
    return {
        "config_groups": {
            "group_0": {
                "format": fmt,
                "input_activations": inputs,
                "output_activations": None,
                "targets": ["Linear"],
                "weights": weights,
            }
        },
        "format": fmt,
        "global_compression_ratio": None,
        "ignore": ignore if ignore is not None else ["lm_head"],
        "kv_cache_scheme": kv,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": "0.19.0",
    }


#: arch -> (architectures[0], model_type)
ARCHS = {
    "llama": ("LlamaForCausalLM", "llama"),
    "granite": ("GraniteForCausalLM", "granite"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "qwen3_moe"),
    "mixtral": ("MixtralForCausalLM", "mixtral"),
    "deepseek_v3": ("DeepseekV3ForCausalLM", "deepseek_v3"),
}
#: DeepSeek-V3 multi-head latent attention sizes of the tiny model
MLA = {"q_lora_rank": 48, "kv_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16}


@dataclass(frozen=True, slots=True, kw_only=True)
class TinyModel:
    """Architecture and sizes of a tiny test model (bf16; tie defaults to True for Granite).

    MoE archs (``qwen3_moe``, ``mixtral``) have ``experts`` experts of size ``moe_intermediate`` per layer,
    stored per expert as the Hub checkpoints do (``mlp.experts.{e}.{gate,up,down}_proj`` /
    ``block_sparse_moe.experts.{e}.w1/w3/w2``) with a bf16 router (``mlp.gate`` / ``block_sparse_moe.gate``).
    """

    arch: str = "llama"
    hidden: int = 256
    intermediate: int = 512
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 512
    bias: bool = False
    tie: bool | None = None
    experts: int = 4
    experts_per_tok: int = 2
    moe_intermediate: int = 64

    @property
    def tied(self) -> bool:
        return (self.arch == "granite") if self.tie is None else self.tie

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def config(self) -> dict:
        """config.json of the model (transformers 5 keys), without quantization_config."""
        arch, model_type = ARCHS[self.arch]
        config: dict[str, object] = {
            "architectures": [arch],
            "attention_bias": self.bias,
            "attention_dropout": 0.0,
            "bos_token_id": 1,
            "dtype": "bfloat16",
            "eos_token_id": 2,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate,
            "max_position_embeddings": 256,
            "model_type": model_type,
            "num_attention_heads": self.heads,
            "num_hidden_layers": self.layers,
            "num_key_value_heads": self.kv_heads,
            "pad_token_id": 0,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
            "tie_word_embeddings": self.tied,
            "use_cache": True,
            "vocab_size": self.vocab,
        }
        if self.arch in ("llama", "granite"):
            config["mlp_bias"] = self.bias
        if self.arch == "granite":
            config.update(
                {
                    "attention_multiplier": 0.015625,
                    "embedding_multiplier": 12.0,
                    "logits_scaling": 8.0,
                    "residual_multiplier": 0.22,
                }
            )
        if self.arch in ("mistral", "mixtral"):
            config["sliding_window"] = None
        if self.arch == "qwen3_moe":
            config.update(
                {
                    "num_experts": self.experts,
                    "num_experts_per_tok": self.experts_per_tok,
                    "moe_intermediate_size": self.moe_intermediate,
                    "decoder_sparse_step": 1,
                    "mlp_only_layers": [],
                    "norm_topk_prob": True,
                }
            )
        if self.arch == "mixtral":
            config.update(
                {
                    "num_local_experts": self.experts,
                    "num_experts_per_tok": self.experts_per_tok,
                    "intermediate_size": self.moe_intermediate,
                }
            )
        if self.arch == "deepseek_v3":  # layer 0 dense, then MoE with one shared expert (as DeepSeek-V3/R1)
            config.update(
                {
                    **MLA,
                    "n_routed_experts": self.experts,
                    "n_shared_experts": 1,
                    "num_experts_per_tok": self.experts_per_tok,
                    "moe_intermediate_size": self.moe_intermediate,
                    "first_k_dense_replace": 1,
                    "n_group": 1,
                    "topk_group": 1,
                    "routed_scaling_factor": 1.0,
                    "norm_topk_prob": True,
                    "head_dim": MLA["qk_rope_head_dim"],
                }
            )
        return config

    def linear_shapes(self, layer: int = 0) -> dict[str, tuple[int, int]]:
        """Every linear of decoder layer ``layer``, by name within the layer: ``(out, in)``."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        if self.arch == "deepseek_v3":
            n, q_dim = self.heads, MLA["qk_nope_head_dim"] + MLA["qk_rope_head_dim"]
            shapes = {
                "self_attn.q_a_proj": (MLA["q_lora_rank"], h),
                "self_attn.q_b_proj": (n * q_dim, MLA["q_lora_rank"]),
                "self_attn.kv_a_proj_with_mqa": (MLA["kv_lora_rank"] + MLA["qk_rope_head_dim"], h),
                "self_attn.kv_b_proj": (n * (MLA["qk_nope_head_dim"] + MLA["v_head_dim"]), MLA["kv_lora_rank"]),
                "self_attn.o_proj": (h, n * MLA["v_head_dim"]),
            }
        else:
            shapes = {
                "self_attn.q_proj": (h, h),
                "self_attn.k_proj": (kv, h),
                "self_attn.v_proj": (kv, h),
                "self_attn.o_proj": (h, h),
            }
        m = self.moe_intermediate
        if self.arch == "qwen3_moe" or (self.arch == "deepseek_v3" and layer > 0):
            for e in range(self.experts):
                shapes |= {
                    f"mlp.experts.{e}.gate_proj": (m, h),
                    f"mlp.experts.{e}.up_proj": (m, h),
                    f"mlp.experts.{e}.down_proj": (h, m),
                }
            if self.arch == "deepseek_v3":
                shapes |= {
                    "mlp.shared_experts.gate_proj": (m, h),
                    "mlp.shared_experts.up_proj": (m, h),
                    "mlp.shared_experts.down_proj": (h, m),
                }
        elif self.arch == "mixtral":
            for e in range(self.experts):
                shapes |= {
                    f"block_sparse_moe.experts.{e}.w1": (m, h),
                    f"block_sparse_moe.experts.{e}.w3": (m, h),
                    f"block_sparse_moe.experts.{e}.w2": (h, m),
                }
        else:
            i = self.intermediate
            shapes |= {"mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
        return shapes

    def router(self, layer: int = 0) -> str | None:
        if self.arch == "deepseek_v3":
            return "mlp.gate" if layer > 0 else None
        return {"qwen3_moe": "mlp.gate", "mixtral": "block_sparse_moe.gate"}.get(self.arch)


def dense_tensors(model: TinyModel, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor of the model in bf16 (linears unquantized), seeded; linear weights carry an outlier."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

    def norm(n: int) -> torch.Tensor:
        return (1 + randn(n, std=0.1)).to(torch.bfloat16)

    m = model
    t: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": randn(m.vocab, m.hidden, std=1.0),
        "model.norm.weight": norm(m.hidden),
    }
    if not m.tied:
        t["lm_head.weight"] = randn(m.vocab, m.hidden)
    for i in range(m.layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = norm(m.hidden)
        t[p + "post_attention_layernorm.weight"] = norm(m.hidden)
        if m.arch in ("qwen3", "qwen3_moe"):
            t[p + "self_attn.q_norm.weight"] = norm(m.head_dim)
            t[p + "self_attn.k_norm.weight"] = norm(m.head_dim)
        if m.arch == "deepseek_v3":
            t[p + "self_attn.q_a_layernorm.weight"] = norm(MLA["q_lora_rank"])
            t[p + "self_attn.kv_a_layernorm.weight"] = norm(MLA["kv_lora_rank"])
        if (router := m.router(i)) is not None:
            t[p + router + ".weight"] = randn(m.experts, m.hidden)
            if m.arch == "deepseek_v3":  # F32 on disk in DeepSeek-V3/R1 (FORMATS.md 12)
                t[p + router + ".e_score_correction_bias"] = torch.randn(m.experts, generator=g) * 0.01
        for name, (out_f, in_f) in m.linear_shapes(i).items():
            w = randn(out_f, in_f)
            w[0, 0] = 0.2  # an outlier, so scales differ visibly between rows and blocks
            t[p + name + ".weight"] = w
            if m.bias and (name.startswith("self_attn") or m.arch in ("llama", "granite")):
                t[p + name + ".bias"] = randn(out_f)
    return t


def weight_scale(w: torch.Tensor, strategy: str, scale_dtype: torch.dtype, block: int = 128) -> torch.Tensor:
    """Dequantization scale amax / 448: ``[1]`` (tensor), ``[out, 1]`` (channel) or the zero-padded
    ``[ceil(out/block), ceil(in/block)]`` grid (block), computed in fp32 and stored in ``scale_dtype``."""
    out_f, in_f = w.shape
    w32 = w.float().abs()
    if strategy == "tensor":
        amax = w32.amax().reshape(1)
    elif strategy == "channel":
        amax = w32.amax(dim=1, keepdim=True)
    else:
        pad = torch.zeros(-(-out_f // block) * block, -(-in_f // block) * block)
        pad[:out_f, :in_f] = w32
        amax = pad.reshape(pad.shape[0] // block, block, pad.shape[1] // block, block).amax(dim=(1, 3))
    return (amax / E4M3_MAX).clamp(min=1e-12).to(scale_dtype)


def quantize_weight(w: torch.Tensor, scale: torch.Tensor, strategy: str, block: int = 128) -> torch.Tensor:
    """e4m3fn codes of ``w / scale`` (scale broadcast per tensor, row, or block tile)."""
    s = scale.float()
    if strategy == "block":
        s = s.repeat_interleave(block, 0)[: w.shape[0]].repeat_interleave(block, 1)[:, : w.shape[1]]
    return torch.clamp(
        w.float() / s.reshape(-1, 1) if strategy == "channel" else w.float() / s, -E4M3_MAX, E4M3_MAX
    ).to(torch.float8_e4m3fn)


def build_tensors(
    *,
    scheme: str,
    kv_cache: str | None = None,
    scale_dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    legacy_kv_names: bool = False,
    unquantized: tuple[str, ...] = (),
    **dims: Any,
) -> dict[str, torch.Tensor]:
    """All tensors of a tiny seeded compressed-tensors checkpoint (bf16 model, fp8 linears), by HF name.

    ``unquantized``: linears left in bf16, as ``"{layer}.{name}"`` (``"0.mlp.down_proj"``) or full names.
    """
    m = TinyModel(**dims)
    t = dense_tensors(m, seed)
    g = torch.Generator().manual_seed(seed + 1)
    w_strategy, acts, _ = SCHEMES[scheme]
    share_groups = {
        "self_attn.q_proj": "qkv",
        "self_attn.k_proj": "qkv",
        "self_attn.v_proj": "qkv",
        "mlp.gate_proj": "gu",
        "mlp.up_proj": "gu",
    }
    for i in range(m.layers):
        p = f"model.layers.{i}."
        shared_input: dict[str, torch.Tensor] = {}
        for name in m.linear_shapes(i):
            mod = p + name
            if f"{i}.{name}" in unquantized or mod in unquantized:
                continue
            w = t[mod + ".weight"]
            scale = weight_scale(w, w_strategy, scale_dtype)
            t[mod + ".weight"] = quantize_weight(w, scale, w_strategy)
            t[mod + ".weight_scale"] = scale
            if acts is not None and not acts[1]:  # static: q/k/v and gate/up share one observer value
                share = share_groups.get(name, name)
                if share not in shared_input:
                    shared_input[share] = (torch.rand(1, generator=g) * 0.01 + 0.001).to(scale_dtype)
                t[mod + ".input_scale"] = shared_input[share]
        if kv_cache:
            shape = (m.kv_heads, 1, 1) if kv_cache == "attn_head" else (1,)
            for kind in ("k", "v"):
                key = f"{p}self_attn.{kind}_proj.output_scale" if legacy_kv_names else f"{p}self_attn.{kind}_scale"
                t[key] = (torch.rand(*shape, generator=g) * 0.05 + 0.01).to(scale_dtype)
    return t


def write_checkpoint(
    path: Path, tensors: dict[str, torch.Tensor], config: dict, *, shards: int = 1, tokenizer: bool = True
) -> Path:
    """Write tensors + config (+ a tiny tokenizer and generation config) as llm-compressor saves them."""
    path.mkdir(parents=True, exist_ok=True)
    outs = [OutTensor(k, v.dtype, tuple(v.shape), functools.partial(_chunks, v)) for k, v in tensors.items()]
    if shards == 1:
        write_safetensors(path / "model.safetensors", sorted(outs, key=lambda o: o.key))
    else:
        total = sum(o.nbytes for o in outs)
        write_sharded(path, outs, max_shard_bytes=-(-total // shards))
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (path / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}, indent=2) + "\n"
    )
    if tokenizer:
        write_tokenizer(path, int(config["vocab_size"]))
    return path


def _chunks(t: torch.Tensor, sink: Sink) -> None:
    sink.write(t)


def build_compressed_tensors(
    path: str | Path,
    *,
    scheme: str = "FP8_DYNAMIC",
    shards: int = 1,
    ignore: list[str] | None = None,
    kv_cache: str | None = None,
    **kwargs: Any,
) -> Path:
    """Write a tiny seeded compressed-tensors FP8 checkpoint; returns its directory.

    ``kwargs``: the fields of ``TinyModel`` and the options of ``build_tensors``.
    """
    dims = {k: kwargs.pop(k) for k in list(kwargs) if k in TinyModel.__dataclass_fields__}
    tensors = build_tensors(scheme=scheme, kv_cache=kv_cache, **dims, **kwargs)
    config = TinyModel(**dims).config()
    config["quantization_config"] = quantization_config(scheme, kv_cache=kv_cache, ignore=ignore)
    return write_checkpoint(Path(path), tensors, config, shards=shards)


def write_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer (tokenizers' JSON format): specials, then lower-case words, then filler tokens."""
    words = (
        "the capital of france is paris a an and to in on it was for with as by at from this that "
        "what who where when how why hello world model fp8 cpu test one two three four five six seven "
        "eight nine ten"
    ).split()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in words:
        vocab.setdefault(w, len(vocab))
    while len(vocab) < vocab_size:
        vocab[f"tok{len(vocab)}"] = len(vocab)
    specials = [
        {
            "id": i,
            "content": c,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for c, i in list(vocab.items())[:4]
    ]
    tok = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": specials,
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }
    (path / "tokenizer.json").write_text(json.dumps(tok, indent=1) + "\n")
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<s>",
                "eos_token": "</s>",
                "pad_token": "<pad>",
                "unk_token": "<unk>",
                "model_max_length": 128,
                "tokenizer_class": "PreTrainedTokenizerFast",
            },
            indent=2,
        )
        + "\n"
    )
