"""Reader for Mistral-native FP8 checkpoints: ``params.json`` + ``consolidated*.safetensors`` (FORMATS.md L4).

Claims a directory only when its safetensors are all ``consolidated*`` files (``shards.Checkpoint`` reads the
consolidated files only when no other safetensors exist; a repo that also ships HF files is read by the HF
reader) and ``params.json`` has a ``quantization`` block. Handles ``qformat_weight: fp8_e4m3`` with
``qscheme_act`` ``TENSOR`` (static ``qscale_act``) or ``NO_SCALES`` (dynamic per-tensor, vLLM's reading);
``qscale_weight`` per tensor (0-d / ``[1]``) or per row (``[out]`` / ``[out, 1]``); KV/attention scales
``attention.{k,v,q,kv}_fake_quantizer.qscale_act`` (listed and dropped).

Names become the HF Llama/Mistral layout (``hf_name``; vLLM ``MistralForCausalLM.mistral_mapping``): linears
are planned under their HF module name while ``TensorRef.key`` stays the native key, pass-through tensors are
renamed through ``CheckpointPlan.rename``, and ``config.json`` is derived from ``params.json``
(``derive_config``, handed over as ``CheckpointPlan.hf_config``). ``wq``/``wk`` rows are permuted from
Mistral's interleaved rotary layout to HF's half-split layout on reading (transformers
``convert_mistral_weights_to_hf.permute_for_rope``; a per-row ``qscale_weight`` is permuted with them, as vLLM
``maybe_remap_mistral`` does). A per-tensor scale is unaffected by the permutation.

Refused with a message naming what is missing: MoE (``moe``), vision/audio (``vision_encoder``,
``multimodal``), YaRN / Llama-4 rope scaling (``yarn``, ``llama_4_scaling``: the HF conversion writes
Ministral3 configs this reader does not derive), MLA, list-valued ``sliding_window``, a compressed-tensors dict
in ``params.json``, block-shaped ``qscale_weight``, unquantized decoder linears, and tensors without an HF name.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import torch

from fp8convert.errors import CheckpointError, UnsupportedSchemeError
from fp8convert.formats import register
from fp8convert.formats.base import (
    Detection,
    LayoutRules,
    linear_dims,
    plan_modules,
    read_linear_default,
    required_scale,
    static_input_scale,
    suffix_summary,
)
from fp8convert.shards import Checkpoint, read_json
from fp8convert.spec import (
    ActScheme,
    CheckpointPlan,
    Granularity,
    LinearPlan,
    QuantizedLinear,
    TensorRef,
    WeightScheme,
    dtype_name,
)

NAME = "mistral"
PARAMS = "params.json"
CONSOLIDATED = "consolidated"
#: transformers ``convert_mistral_weights_to_hf.py --max_position_embeddings`` default, used when params.json
#: has neither ``max_position_embeddings`` nor ``max_seq_len``.
DEFAULT_MAX_POSITIONS = 32768

#: Within ``layers.N.``: native module -> HF module (vLLM ``mistral_mapping``; transformers STATE_DICT_MAPPING).
LAYER_MODULES = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attention": "self_attn",
}
TOP_MODULES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
#: Native tensor suffix -> HF suffix (vLLM: qscale_weight -> weight_scale, qscale_act -> input_scale).
SUFFIXES = {"weight": "weight", "qscale_weight": "weight_scale", "qscale_act": "input_scale"}
#: KV/attention scales within ``layers.N.`` -> (HF name within the layer, kind); vLLM mistral_mapping.
KV_TENSORS = {
    "attention.k_fake_quantizer.qscale_act": ("self_attn.k_scale", "k"),
    "attention.v_fake_quantizer.qscale_act": ("self_attn.v_scale", "v"),
    "attention.q_fake_quantizer.qscale_act": ("self_attn.q_scale", "q"),
    "attention.kv_fake_quantizer.qscale_act": ("self_attn.kv_scale", "kv"),  # legacy: one scale for k and v
}
ROPE_MODULES = {"attention.wq": "n_heads", "attention.wk": "n_kv_heads"}
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_DECODER = re.compile(r"^layers\.\d+\.(attention\.w[qkvo]|feed_forward\.w[123])$")
#: params.json keys that describe something a MistralForCausalLM config cannot express.
REFUSED_PARAMS = {
    "moe": "a mixture-of-experts model (Mixtral / Mistral Large 3 native layouts are not supported)",
    "vision_encoder": "a vision encoder (Pixtral / Mistral 3 multimodal)",
    "multimodal": "a multimodal (vision or audio) model",
    "yarn": "YaRN rope scaling (the HF conversion writes a Ministral3 config with yarn rope_parameters)",
    "llama_4_scaling": "Llama-4 attention scaling (Ministral3 / Mistral Large 3)",
    "q_lora_rank": "multi-head latent attention (MLA)",
    "kv_lora_rank": "multi-head latent attention (MLA)",
}
UNMAPPED_HELP = (
    "layers.N.attention.w{q,k,v,o}, feed_forward.w{1,2,3}, attention_norm, ffn_norm, the k/v/q fake-quantizer "
    "scales, tok_embeddings, norm, output"
)
HF_FILES_HINT = "convert the repository's HF-format files instead (config.json + model*.safetensors)"


def hf_name(native: str) -> str:
    """The HF Llama/Mistral name of a native tensor key or module name.

    ``layers.3.attention.wq.qscale_weight`` -> ``model.layers.3.self_attn.q_proj.weight_scale``;
    ``layers.3.attention.wk`` -> ``model.layers.3.self_attn.k_proj``; ``output.weight`` -> ``lm_head.weight``;
    ``layers.3.attention.k_fake_quantizer.qscale_act`` -> ``model.layers.3.self_attn.k_scale``.
    Raises ``UnsupportedSchemeError`` for names outside the dense text model.
    """
    m = _LAYER.match(native)
    if m:
        layer, rest = m.groups()
        prefix = f"model.layers.{layer}."
        if rest in KV_TENSORS:
            return prefix + KV_TENSORS[rest][0]
        mapped = _map(rest, LAYER_MODULES)
        if mapped is not None:
            return prefix + mapped
    else:
        mapped = _map(native, TOP_MODULES)
        if mapped is not None:
            return mapped
    raise UnsupportedSchemeError(
        f"{native}: no Hugging Face name for this Mistral-native tensor (only the dense text model maps: "
        f"{UNMAPPED_HELP})"
    )


def _map(name: str, table: dict[str, str]) -> str | None:
    """``name`` is a module of ``table`` or a module + a known suffix."""
    if name in table:
        return table[name]
    module, _, suffix = name.rpartition(".")
    if module in table and suffix in SUFFIXES:
        return f"{table[module]}.{SUFFIXES[suffix]}"
    return None


def derive_config(params: dict, *, where: str = PARAMS) -> dict:
    """config.json (transformers ``MistralForCausalLM``) from params.json, as transformers'
    ``convert_mistral_weights_to_hf.convert_config`` and vLLM's ``_remap_general_mistral_args`` map it."""
    problems = [f"params.json has {key!r}: {why}" for key, why in REFUSED_PARAMS.items() if params.get(key)]
    required = ("dim", "n_layers", "n_heads", "hidden_dim", "norm_eps", "vocab_size")
    missing = [k for k in required if params.get(k) is None]
    if missing:
        problems.append(f"params.json lacks {', '.join(missing)} (needed for config.json)")
    sliding = params.get("sliding_window")
    if isinstance(sliding, list):
        problems.append(f"params.json sliding_window is a per-layer list {sliding!r}; not supported")
    ints = (*required[:4], "vocab_size", "head_dim", "n_kv_heads", "max_position_embeddings", "max_seq_len")
    for key in ints + (() if isinstance(sliding, list) else ("sliding_window",)):
        value = params.get(key)
        if value is not None and (type(value) is not int or value <= 0):
            problems.append(f"params.json {key} is {value!r:.60}; expected a positive integer")
    for key in ("norm_eps", "rope_theta"):
        value = params.get(key)
        if value is not None and (type(value) not in (int, float) or not 0 < value < math.inf):
            problems.append(f"params.json {key} is {value!r:.60}; expected a positive number")
    if problems:
        raise UnsupportedSchemeError(
            "cannot derive a MistralForCausalLM config.json from params.json",
            where=where,
            problems=problems,
            hint=HF_FILES_HINT,
        )
    dim, n_heads = int(params["dim"]), int(params["n_heads"])
    head_dim = int(params.get("head_dim") or dim // n_heads)
    rope_theta = float(params.get("rope_theta") or 10000.0)
    max_pos = params.get("max_position_embeddings") or params.get("max_seq_len") or DEFAULT_MAX_POSITIONS
    return {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "attention_dropout": 0.0,
        "dtype": "bfloat16",
        "head_dim": head_dim,
        "hidden_act": str(params.get("activation", "silu")),
        "hidden_size": dim,
        "initializer_range": 0.02,
        "intermediate_size": int(params["hidden_dim"]),
        "max_position_embeddings": int(max_pos),
        "num_attention_heads": n_heads,
        "num_hidden_layers": int(params["n_layers"]),
        "num_key_value_heads": int(params.get("n_kv_heads") or n_heads),
        "rms_norm_eps": float(params["norm_eps"]),
        "rope_parameters": {"rope_theta": rope_theta, "rope_type": "default"},  # transformers >= 5
        "rope_theta": rope_theta,  # transformers 4
        "sliding_window": int(sliding) if sliding is not None else None,
        "tie_word_embeddings": bool(params.get("tied_embeddings", False)),
        "use_cache": True,
        "vocab_size": int(params["vocab_size"]),
    }


def permute_rows_for_rope(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a ``wq``/``wk`` weight (or per-row scale) from Mistral's interleaved rotary layout to HF's:
    ``t.view(n_heads, head_dim // 2, 2, ...).transpose(1, 2)`` (transformers ``permute_for_rope``). Exact:
    fp8 codes are moved as bytes."""
    out = t.shape[0]
    if n_heads <= 0 or out % (2 * n_heads):
        raise UnsupportedSchemeError(f"cannot split {out} rows into {n_heads} rotary heads of even size")
    raw = t.view(torch.uint8) if t.dtype.itemsize == 1 and t.is_floating_point() else t
    rest = raw.shape[1:]
    moved = raw.reshape(n_heads, out // n_heads // 2, 2, -1).transpose(1, 2).reshape(out, *rest).contiguous()
    return moved.view(t.dtype) if moved.dtype != t.dtype else moved


def unpermute_rows_for_rope(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of ``permute_rows_for_rope`` (HF -> Mistral-native rows); used to build fixtures."""
    out = t.shape[0]
    raw = t.view(torch.uint8) if t.dtype.itemsize == 1 and t.is_floating_point() else t
    rest = raw.shape[1:]
    moved = raw.reshape(n_heads, 2, out // n_heads // 2, -1).transpose(1, 2).reshape(out, *rest).contiguous()
    return moved.view(t.dtype) if moved.dtype != t.dtype else moved


class MistralReader:
    name = NAME
    description = "Mistral native (params.json + consolidated*.safetensors, qformat_weight fp8_e4m3)"

    def __init__(self) -> None:
        self._params_cache: dict[Path, dict] = {}

    def _params(self, ckpt: Checkpoint) -> dict:
        root = ckpt.root.resolve()
        if root not in self._params_cache:
            self._params_cache[root] = read_json(ckpt.root / PARAMS, what=PARAMS)
        return self._params_cache[root]

    @staticmethod
    def native_only(ckpt: Checkpoint) -> bool:
        """The safetensors being read are all ``consolidated*`` (no HF files next to them)."""
        return bool(ckpt.files) and all(Path(f).name.startswith(CONSOLIDATED) for f in ckpt.files)

    def detect(self, ckpt: Checkpoint, config: dict) -> Detection | None:
        if not (ckpt.root / PARAMS).is_file() or not self.native_only(ckpt):
            return None
        self._params_cache.pop(ckpt.root.resolve(), None)  # re-read: the file may have changed
        params = self._params(ckpt)
        quant = params.get("quantization")
        if not quant:
            return None
        return Detection(
            format=NAME,
            rule="params.json quantization + consolidated*.safetensors only (FORMATS.md 7, step 1)",
            evidence=[
                f"params.json quantization={quant!r}",
                f"safetensors: {', '.join(ckpt.files)} (no HF-format files)",
                "tensors: " + suffix_summary(ckpt.tensors, ("weight", "qscale_weight", "qscale_act")),
            ],
        )

    def derived_config(self, ckpt: Checkpoint) -> dict:
        """config.json for the HF layout, derived from params.json (also in ``plan(...).hf_config``)."""
        return derive_config(self._params(ckpt), where=str(ckpt.root / PARAMS))

    # ---- planning (headers only) -------------------------------------------------------------
    def _activation(self, params: dict, where: str) -> ActScheme:
        quant = params.get("quantization")
        if not isinstance(quant, dict):
            raise UnsupportedSchemeError(f"params.json quantization is {quant!r}, expected an object", where=where)
        method = str(quant.get("quant_method", "")).replace("_", "-")
        if method == "compressed-tensors":
            raise UnsupportedSchemeError(
                "params.json holds a compressed-tensors quantization block (llm-compressor on Mistral-native "
                "names); this reader handles qformat_weight fp8_e4m3 only",
                where=where,
                hint=HF_FILES_HINT,
            )
        if quant.get("qformat_weight") != "fp8_e4m3":
            raise UnsupportedSchemeError(
                f"params.json quantization.qformat_weight is {quant.get('qformat_weight')!r}; only 'fp8_e4m3' is FP8",
                where=where,
            )
        act = quant.get("qscheme_act")
        if act in ("TENSOR", None):  # vLLM: None means TENSOR (static)
            return ActScheme.STATIC_TENSOR
        if act == "NO_SCALES":  # vLLM: activation_scheme "dynamic" (per-tensor)
            return ActScheme.DYNAMIC_TENSOR
        raise UnsupportedSchemeError(
            f"params.json quantization.qscheme_act is {act!r}; vLLM accepts TENSOR (static) or NO_SCALES (dynamic)",
            where=where,
        )

    def plan(self, ckpt: Checkpoint, config: dict, detection: Detection) -> CheckpointPlan:
        where = str(ckpt.root / PARAMS)
        params = self._params(ckpt)
        hf_config = derive_config(params, where=where)
        act = self._activation(params, where)

        def linears(module: str, parts: dict[str, TensorRef]) -> list[LinearPlan]:
            return [self._linear(module, parts, act)]

        rules = LayoutRules(
            quant_suffixes=("qscale_weight", "qscale_act"),
            linears=linears,
            kv_suffixes={k: kind for k, (_, kind) in KV_TENSORS.items()},
        )
        plan = plan_modules(ckpt, rules, format_name=NAME, detection=detection)
        problems: list[CheckpointError] = list(plan.problems)
        rename: dict[str, str] = {}
        for ref in plan.passthrough:
            try:
                rename[ref.key] = hf_name(ref.key)
            except UnsupportedSchemeError:
                problems.append(
                    UnsupportedSchemeError(
                        f"{ref.key} ({ref.file}): no Hugging Face name for this Mistral-native tensor (only the "
                        f"dense text model maps: {UNMAPPED_HELP}); {HF_FILES_HINT}"
                    )
                )
        unquantized = []
        for module in plan.unquantized_linears:
            if _DECODER.match(module):
                w = ckpt.ref(f"{module}.weight")
                problems.append(
                    UnsupportedSchemeError(
                        f"{module}.weight ({w.file}) is {dtype_name(w.dtype)}: unquantized decoder linears are not "
                        "supported in the Mistral-native layout (wq/wk need a rotary permutation a byte copy cannot "
                        f"do); {HF_FILES_HINT}"
                    )
                )
            else:
                try:
                    unquantized.append(hf_name(module))
                except UnsupportedSchemeError:
                    pass  # reported above with its tensors (no HF name)
        kv_scales = [dataclasses.replace(k, module=hf_name(k.module)) for k in plan.kv_scales]
        problems += self._shape_problems(ckpt, hf_config, where)
        return dataclasses.replace(
            plan,
            problems=problems,
            rename=rename,
            kv_scales=kv_scales,
            unquantized_linears=unquantized,
            hf_config=hf_config,
        )

    @staticmethod
    def _shape_problems(ckpt: Checkpoint, config: dict, where: str) -> list[CheckpointError]:
        """The derived config must describe the tensors (a wrong head count would permute wq/wk wrongly)."""
        h, hd = config["hidden_size"], config["head_dim"]
        expect = {
            "tok_embeddings.weight": (config["vocab_size"], h),
            "attention.wq.weight": (config["num_attention_heads"] * hd, h),
            "attention.wk.weight": (config["num_key_value_heads"] * hd, h),
            "attention.wv.weight": (config["num_key_value_heads"] * hd, h),
            "attention.wo.weight": (h, config["num_attention_heads"] * hd),
            "feed_forward.w1.weight": (config["intermediate_size"], h),
            "feed_forward.w3.weight": (config["intermediate_size"], h),
            "feed_forward.w2.weight": (h, config["intermediate_size"]),
        }
        problems: list[CheckpointError] = []
        if hd % 2:
            problems.append(UnsupportedSchemeError(f"{where}: head_dim {hd} is odd; rotary heads need an even size"))
        layers = set()
        for key, ref in sorted(ckpt.tensors.items()):
            m = _LAYER.match(key)
            if m:
                layers.add(int(m.group(1)))
            tail = m.group(2) if m else key
            if tail in expect and tuple(ref.shape) != expect[tail]:
                problems.append(
                    UnsupportedSchemeError(
                        f"{key} ({ref.file}) has shape {list(ref.shape)}, but params.json implies {list(expect[tail])} "
                        "(dim, n_heads, n_kv_heads, head_dim, hidden_dim, vocab_size)"
                    )
                )
        if layers != set(range(config["num_hidden_layers"])):
            problems.append(
                UnsupportedSchemeError(
                    f"{where}: n_layers is {config['num_hidden_layers']} but the tensors hold layers "
                    f"{sorted(layers)[:8]}{' ...' if len(layers) > 8 else ''}"
                )
            )
        return problems

    @staticmethod
    def _linear(module: str, parts: dict[str, TensorRef], act: ActScheme) -> LinearPlan:
        w = parts["weight"]
        where = f"{module}.weight ({w.file})"
        try:
            hf = hf_name(module)
        except UnsupportedSchemeError:
            raise UnsupportedSchemeError(
                f"{where}: no Hugging Face name for this Mistral-native linear (only the dense text model maps: "
                f"{UNMAPPED_HELP}); {HF_FILES_HINT}"
            ) from None
        if w.dtype != torch.float8_e4m3fn:
            raise UnsupportedSchemeError(
                f"{where} is stored as {dtype_name(w.dtype)}, but params.json says qformat_weight fp8_e4m3"
            )
        out_f, in_f = linear_dims(w, refused="only 2-D [out, in] weights")
        s = required_scale(parts, "qscale_weight", w, looked=f"{module}.qscale_weight", stored_as="fp8")
        if s.shape in ((), (1,)):
            scheme = WeightScheme(granularity=Granularity.TENSOR)
        elif s.shape in ((out_f,), (out_f, 1)):
            scheme = WeightScheme(granularity=Granularity.CHANNEL)
        else:
            raise UnsupportedSchemeError(
                f"{module}.qscale_weight ({s.file}) has shape {list(s.shape)} for weight {[out_f, in_f]}; only "
                "per-tensor ([] or [1]) and per-row ([out] or [out, 1]) scales are supported (block-shaped native "
                f"scales, e.g. Mistral Large 3/4, are unconfirmed); {HF_FILES_HINT}"
            )
        static = act is ActScheme.STATIC_TENSOR
        says = f"params.json qscheme_act is {'TENSOR (static)' if static else 'NO_SCALES'}"
        inp = static_input_scale(module, "qscale_act", parts.get("qscale_act"), static=static, says=says, weight=w)
        bias = parts.get("bias")
        if bias is not None:
            raise UnsupportedSchemeError(
                f"{module}.bias ({bias.file}): MistralForCausalLM linears have no bias; not supported"
            )
        return LinearPlan(
            module=hf,
            weight=w,
            weight_scale=s,
            scheme=scheme,
            activation=act,
            input_scale=inp,
        )

    # ---- reading -------------------------------------------------------------------------------
    def permutes_rows(self, linear: LinearPlan) -> bool:
        """``wq``/``wk`` rows come back in another order than stored (so their bytes are never copied as is)."""
        m = _LAYER.match(linear.weight.key.rpartition(".")[0])
        return bool(m and m.group(2) in ROPE_MODULES)

    def read_linear(self, ckpt: Checkpoint, linear: LinearPlan) -> QuantizedLinear:
        """Load the native tensors; ``wq``/``wk`` rows (and per-row scales) are permuted to the HF layout."""
        ql = read_linear_default(ckpt, linear)
        native_module = linear.weight.key.rpartition(".")[0]
        m = _LAYER.match(native_module)
        heads_key = ROPE_MODULES.get(m.group(2)) if m else None
        if heads_key is None:
            return ql
        config = self.derived_config(ckpt)
        n_heads = config["num_attention_heads"] if heads_key == "n_heads" else config["num_key_value_heads"]
        scale = ql.weight_scale
        if ql.scheme.granularity is Granularity.CHANNEL:
            scale = permute_rows_for_rope(scale, n_heads)
        return dataclasses.replace(ql, weight=permute_rows_for_rope(ql.weight, n_heads), weight_scale=scale)


register(MistralReader())
