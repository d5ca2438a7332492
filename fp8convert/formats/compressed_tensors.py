"""Reader for compressed-tensors FP8 checkpoints (llm-compressor; FORMATS.md L5).

Handles weights ``tensor`` / ``channel`` / ``block``; activations none, static per-tensor, dynamic
per-tensor, dynamic per-token (and the per-token-group activations of FP8_BLOCK); ``ignore`` lists with
names and ``re:`` patterns; ``kv_cache_scheme`` with ``k_scale``/``v_scale`` (``[1]`` or per head) and the
pre-2024-09 ``k_proj.output_scale`` names; scale dtypes bf16/f16/f32; formats float-quantized and
naive-quantized. Everything else in the family is refused with a message, never guessed.
"""

from __future__ import annotations

from collections import Counter

import torch

from fp8convert.errors import MissingTensorError, UnsupportedSchemeError
from fp8convert.formats import register
from fp8convert.formats.base import Detection, LayoutRules, matches, plan_modules, read_linear_default
from fp8convert.shards import Checkpoint
from fp8convert.spec import (
    FLOAT_DTYPES,
    ActScheme,
    CheckpointPlan,
    Granularity,
    LinearPlan,
    QuantizedLinear,
    TensorRef,
    WeightScheme,
    dtype_name,
)

NAME = "compressed-tensors"
SUPPORTED_FORMATS = ("float-quantized", "naive-quantized")
SCALE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
ZERO_POINT_SUFFIXES = ("weight_zero_point", "input_zero_point", "output_zero_point")
KV_SUFFIXES = {
    "self_attn.q_scale": "q",  # attention (query) quantization: not used by the AIU stack either
    "self_attn.k_scale": "k",
    "self_attn.v_scale": "v",
    "self_attn.k_proj.output_scale": "k",
    "self_attn.v_proj.output_scale": "v",
}
#: Per-module tensors this reader understands; anything else on a quantized module is an error.
LINEAR_SUFFIXES = ("weight", "weight_scale", "input_scale", "bias")
FORBIDDEN_SUFFIXES = {
    "weight_packed": "packed integer weights (pack-quantized format)",
    "weight_shape": "packed integer weights (pack-quantized format)",
    "weight_g_idx": "activation-ordered group quantization (g_idx)",
    "weight_global_scale": "two-level (nvfp4-style) scales",
}


def quant_config(config: dict) -> tuple[dict | None, str]:
    """The compressed-tensors block and where it was found."""
    for where, qc in (
        ("quantization_config", config.get("quantization_config")),
        ("text_config.quantization_config", (config.get("text_config") or {}).get("quantization_config")),
        ("compression_config", config.get("compression_config")),
    ):
        if isinstance(qc, dict):
            return qc, where
    return None, ""


class CompressedTensorsReader:
    name = NAME
    description = "compressed-tensors / llm-compressor (FP8, FP8_DYNAMIC, FP8_BLOCK, W8A16-FP8)"

    def detect(self, ckpt: Checkpoint, config: dict) -> Detection | None:
        qc, where = quant_config(config)
        if qc is None:
            return None
        method = str(qc.get("quant_method", "")).lower().replace("_", "-")
        if method not in ("compressed-tensors", "sparseml"):
            return None
        evidence = [
            f"config.json {where}.quant_method={qc.get('quant_method')!r}",
            f"format={qc.get('format')!r}",
            f"quantization_status={qc.get('quantization_status')!r}",
        ]
        suffixes = Counter(
            f"{k.rsplit('.', 1)[-1]} {dtype_name(r.dtype)}"
            for k, r in ckpt.tensors.items()
            if k.rsplit(".", 1)[-1] in ("weight", "weight_scale", "input_scale", "k_scale", "v_scale")
        )
        evidence.append("tensors: " + ", ".join(f"{s} x{n}" for s, n in sorted(suffixes.items())))
        return Detection(
            format=NAME, rule="quant_method is compressed-tensors (FORMATS.md 7, step 3)", evidence=evidence
        )

    # ---- planning (headers only) -------------------------------------------------------------
    def plan(self, ckpt: Checkpoint, config: dict, detection: Detection) -> CheckpointPlan:
        qc, where = quant_config(config)
        assert qc is not None
        groups = self._groups(qc, where)
        ignore = [str(e) for e in (qc.get("ignore") or [])]

        def linears(module: str, parts: dict[str, TensorRef]) -> list[LinearPlan]:
            group = self._group_for(module, groups)
            if group is None:
                raise UnsupportedSchemeError(
                    f"{module}.weight ({parts['weight'].file}) is fp8 but no config group targets it"
                )
            gname, wargs, aargs = group
            return [self._linear(module, parts, wargs, aargs, gname)]

        rules = LayoutRules(
            quant_suffixes=("weight_scale", "input_scale", "output_scale"),
            linears=linears,
            ignored=lambda module: matches(module, ignore, style="ct"),
            kv_suffixes=KV_SUFFIXES,
            dropped_suffixes=dict.fromkeys(ZERO_POINT_SUFFIXES, "zero point of a symmetric scheme (checked all-zero)"),
            forbidden_suffixes={k: f"{v} is not FP8 and not supported" for k, v in FORBIDDEN_SUFFIXES.items()},
        )
        return plan_modules(ckpt, rules, format_name=NAME, detection=detection)

    def _groups(self, qc: dict, where: str) -> list[tuple[str, list[str], dict, dict | None]]:
        """Validate the config block; return (name, targets, weights args, input args) per FP8 group."""
        problems = []
        status = qc.get("quantization_status")
        if status not in (None, "compressed"):
            problems.append(f"quantization_status is {status!r}: only 'compressed' checkpoints store fp8 weights")
        fmt = qc.get("format")
        sparsity = qc.get("sparsity_config") or {}
        if isinstance(sparsity, dict) and sparsity.get("format") not in (None, "dense"):
            problems.append(
                f"sparsity_config format {sparsity.get('format')!r}: sparse-compressed weights are not supported"
            )
        groups_cfg = qc.get("config_groups")
        if not isinstance(groups_cfg, dict) or not groups_cfg:
            problems.append(f"{where}.config_groups is missing or empty")
            groups_cfg = {}
        groups = []
        for gname, g in groups_cfg.items():
            # the group's own format wins (newer compressed-tensors); "dense" means "not compressed by a
            # sparsity compressor": the header dtypes then decide (fp8 weights + scales, or an error)
            gfmt = g.get("format") or fmt
            if gfmt not in (*SUPPORTED_FORMATS, "dense"):
                problems.append(
                    f"group {gname}: format {gfmt!r} is not supported (FP8 checkpoints use "
                    f"{' or '.join(SUPPORTED_FORMATS)})"
                )
            w = g.get("weights")
            if not isinstance(w, dict):
                problems.append(f"group {gname}: no weights scheme")
                continue
            problems += [f"group {gname}: {p}" for p in self._check_weights(w)]
            a = g.get("input_activations")
            if a is not None:
                problems += [f"group {gname}: {p}" for p in self._check_acts(a)]
            if g.get("output_activations") is not None:
                problems.append(f"group {gname}: output activation quantization is not supported")
            targets = g.get("targets") or []
            groups.append((gname, [str(t) for t in targets], w, a))
        if problems:
            raise UnsupportedSchemeError(
                "unsupported compressed-tensors configuration",
                where=f"config.json {where}",
                problems=sorted(set(problems), key=problems.index),
                hint="fp8convert converts FP8 (float, 8-bit, symmetric) weights with tensor, channel or block scales",
            )
        return groups

    @staticmethod
    def _check_weights(w: dict) -> list[str]:
        p = []
        if w.get("type") != "float" or w.get("num_bits") != 8:
            p.append(
                f"weights are type={w.get('type')!r} num_bits={w.get('num_bits')!r}; only 8-bit float (FP8) "
                "is supported (int and 4-bit schemes are not FP8)"
            )
        if w.get("symmetric") is False:
            p.append("asymmetric weights (zero points) are not supported")
        if w.get("dynamic"):
            p.append("dynamic weight quantization is not a stored checkpoint")
        strategy = w.get("strategy")
        if strategy == "group":
            p.append(
                f"weight strategy 'group' (group_size {w.get('group_size')}) is not supported; "
                "FP8 checkpoints use tensor, channel or block"
            )
        elif strategy not in ("tensor", "channel", "block"):
            p.append(f"weight strategy {strategy!r} is not supported")
        if strategy == "block":
            bs = w.get("block_structure")
            if not (isinstance(bs, list) and len(bs) == 2 and all(isinstance(v, int) and v > 0 for v in bs)):
                p.append(f"block strategy needs block_structure [rows, cols], found {bs!r}")
        if w.get("actorder") not in (None, False):
            p.append(f"actorder={w.get('actorder')!r} is not supported")
        if w.get("scale_dtype") not in (
            None,
            "bfloat16",
            "float16",
            "float32",
            "torch.bfloat16",
            "torch.float16",
            "torch.float32",
        ):
            p.append(f"weights scale_dtype={w.get('scale_dtype')!r} is not supported (MXFP8-style scales)")
        return p

    @staticmethod
    def _check_acts(a: dict) -> list[str]:
        p = []
        if a.get("type") != "float" or a.get("num_bits") != 8:
            p.append(f"input activations are type={a.get('type')!r} num_bits={a.get('num_bits')!r}; only FP8")
        if a.get("symmetric") is False:
            p.append("asymmetric input activations are not supported")
        strategy, dynamic = a.get("strategy"), a.get("dynamic")
        if strategy not in ("tensor", "token", "group"):
            p.append(f"input activation strategy {strategy!r} is not supported")
        elif strategy != "tensor" and dynamic is False:
            p.append(f"static per-{strategy} input activations are not supported")
        if dynamic not in (True, False, "local"):
            p.append(f"input activations dynamic={dynamic!r} is not supported")
        elif dynamic == "local":
            p.append("dynamic='local' input activations are not supported")
        return p

    @staticmethod
    def _group_for(
        module: str, groups: list[tuple[str, list[str], dict, dict | None]]
    ) -> tuple[str, dict, dict | None] | None:
        """compressed-tensors precedence: exact name, then regex, then class name (only ``Linear`` is known)."""
        for test in (
            lambda t: t == module,
            lambda t: t.startswith("re:") and matches(module, [t], style="ct"),
            lambda t: t == "Linear",
        ):
            hits = [(n, w, a) for n, targets, w, a in groups if any(test(t) for t in targets)]
            if hits:
                return hits[0]
        return None

    @staticmethod
    def _linear(module: str, parts: dict[str, TensorRef], wargs: dict, aargs: dict | None, gname: str) -> LinearPlan:
        w = parts["weight"]
        where = f"{module}.weight ({w.file})"
        if len(w.shape) != 2:
            raise UnsupportedSchemeError(
                f"{where}: fp8 weight of shape {list(w.shape)}; only 2-D [out, in] linear "
                "weights are supported (fused 3-D experts are not)"
            )
        out_f, in_f = w.shape
        strategy = wargs["strategy"]
        if strategy == "block":
            scheme = WeightScheme(granularity=Granularity.BLOCK, block=tuple(wargs["block_structure"]))
        else:
            scheme = WeightScheme(granularity=Granularity(strategy))
        s = parts.get("weight_scale")
        if s is None:
            raise MissingTensorError(
                f"{where} is {dtype_name(w.dtype)} but has no scale (looked for "
                f"{module}.weight_scale, group {gname} strategy {strategy}); if the download is "
                "partial, download it again"
            )
        if s.dtype not in SCALE_DTYPES:
            raise UnsupportedSchemeError(
                f"{module}.weight_scale ({s.file}) has dtype {dtype_name(s.dtype)}; expected bf16, f16 or f32"
            )
        want = scheme.scale_shape(out_f, in_f)
        allowed = {want, (out_f,)} if scheme.granularity is Granularity.CHANNEL else {want}
        if scheme.granularity is Granularity.TENSOR:
            allowed.add(())
        if s.shape not in allowed:
            raise UnsupportedSchemeError(
                f"{module}.weight_scale ({s.file}) has shape {list(s.shape)}, but "
                f"{scheme.describe()} scales for weight {[out_f, in_f]} must be {list(want)}"
            )
        if aargs is None:
            act = ActScheme.NONE
        elif aargs["strategy"] == "tensor":
            act = ActScheme.DYNAMIC_TENSOR if aargs["dynamic"] else ActScheme.STATIC_TENSOR
        else:
            act = ActScheme.DYNAMIC_TOKEN if aargs["strategy"] == "token" else ActScheme.DYNAMIC_GROUP
        inp = parts.get("input_scale")
        if act is ActScheme.STATIC_TENSOR:
            if inp is None:
                raise MissingTensorError(
                    f"{module}.input_scale is missing, but group {gname} has static per-tensor "
                    f"input activations (weight in {w.file})"
                )
            if inp.shape not in ((1,), ()) or inp.dtype not in SCALE_DTYPES:
                raise UnsupportedSchemeError(
                    f"{module}.input_scale ({inp.file}) is {dtype_name(inp.dtype)} "
                    f"{list(inp.shape)}; a static per-tensor scale must be [1] bf16/f16/f32"
                )
        elif inp is not None:
            raise UnsupportedSchemeError(
                f"{module}.input_scale ({inp.file}) is present, but group {gname} has "
                f"{act} input activations (config and tensors disagree)"
            )
        bias = parts.get("bias")
        if bias is not None and (bias.shape != (out_f,) or bias.dtype not in FLOAT_DTYPES):
            raise UnsupportedSchemeError(
                f"{module}.bias ({bias.file}) is {dtype_name(bias.dtype)} {list(bias.shape)}; "
                f"expected a float [{out_f}]"
            )
        return LinearPlan(
            module=module,
            weight=w,
            weight_scale=s,
            scheme=scheme,
            activation=act,
            input_scale=inp if act is ActScheme.STATIC_TENSOR else None,
            bias=bias,
        )

    # ---- reading -------------------------------------------------------------------------------
    def read_linear(self, ckpt: Checkpoint, linear: LinearPlan) -> QuantizedLinear:
        return read_linear_default(ckpt, linear)


register(CompressedTensorsReader())
