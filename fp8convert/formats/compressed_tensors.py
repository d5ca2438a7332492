"""Reader for compressed-tensors FP8 checkpoints (llm-compressor; FORMATS.md L5).

Handles weights ``tensor`` / ``channel`` / ``block``; activations none, static per-tensor, dynamic
per-tensor, dynamic per-token (and the per-token-group activations of FP8_BLOCK); ``ignore`` lists with
names and ``re:`` patterns; ``kv_cache_scheme`` with ``k_scale``/``v_scale`` (``[1]`` or per head) and the
pre-2024-09 ``k_proj.output_scale`` names; scale dtypes bf16/f16/f32; formats float-quantized and
naive-quantized. Everything else in the family is refused with a message, never guessed.
"""

from __future__ import annotations

import re

from fp8convert.errors import UnsupportedSchemeError
from fp8convert.formats import register
from fp8convert.formats.base import (
    Detection,
    LayoutRules,
    check_bias,
    find_quant_config,
    linear_dims,
    matches,
    plan_modules,
    read_linear_default,
    required_scale,
    scale_shapes,
    static_input_scale,
    suffix_summary,
)
from fp8convert.shards import Checkpoint
from fp8convert.spec import (
    ActScheme,
    CheckpointPlan,
    Granularity,
    LinearPlan,
    QuantizedLinear,
    TensorRef,
    WeightScheme,
)

NAME = "compressed-tensors"
SUPPORTED_FORMATS = ("float-quantized", "naive-quantized")
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


def _name_list_problems(value: object, what: str) -> list[str]:
    """``ignore`` and ``targets`` are lists of module names, ``re:`` patterns or class names."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(e, str) for e in value):
        return [f"{what} must be a list of module names or 're:' patterns, found {value!r:.80}"]
    problems = []
    for e in value:
        if e.startswith("re:"):
            try:
                re.compile(e[3:])
            except re.error as exc:
                problems.append(f"{what} entry {e!r} is not a valid regular expression ({exc})")
    return problems


class CompressedTensorsReader:
    name = NAME
    description = "compressed-tensors / llm-compressor (FP8, FP8_DYNAMIC, FP8_BLOCK, W8A16-FP8)"

    def detect(self, ckpt: Checkpoint, config: dict) -> Detection | None:
        qc, where = find_quant_config(config, legacy_compression_config=True)
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
        summary = suffix_summary(ckpt.tensors, ("weight", "weight_scale", "input_scale", "k_scale", "v_scale"))
        evidence.append("tensors: " + summary)
        return Detection(
            format=NAME, rule="quant_method is compressed-tensors (FORMATS.md 7, step 3)", evidence=evidence
        )

    # ---- planning (headers only) -------------------------------------------------------------
    def plan(self, ckpt: Checkpoint, config: dict, detection: Detection) -> CheckpointPlan:
        qc, where = find_quant_config(config, legacy_compression_config=True)
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
        problems += _name_list_problems(qc.get("ignore"), "ignore")
        groups = []
        for gname, g in groups_cfg.items():
            if not isinstance(g, dict):
                problems.append(f"group {gname}: expected an object (targets, weights, ...), found {g!r:.80}")
                continue
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
            if a is not None and not isinstance(a, dict):
                problems.append(f"group {gname}: input_activations must be an object or null, found {a!r:.80}")
                continue
            if a is not None:
                problems += [f"group {gname}: {p}" for p in self._check_acts(a)]
            if g.get("output_activations") is not None:
                problems.append(f"group {gname}: output activation quantization is not supported")
            targets = g.get("targets") or []
            if target_problems := _name_list_problems(targets, "targets"):
                problems += [f"group {gname}: {p}" for p in target_problems]
                continue
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
        out_f, in_f = linear_dims(w)
        strategy = wargs["strategy"]
        if strategy == "block":
            scheme = WeightScheme(granularity=Granularity.BLOCK, block=tuple(wargs["block_structure"]))
        else:
            scheme = WeightScheme(granularity=Granularity(strategy))
        s = required_scale(parts, "weight_scale", w, looked=f"{module}.weight_scale, group {gname} strategy {strategy}")
        want = scheme.scale_shape(out_f, in_f)
        if s.shape not in scale_shapes(scheme, out_f, in_f):
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
        static = act is ActScheme.STATIC_TENSOR
        says = f"group {gname} has {'static per-tensor' if static else act} input activations"
        inp = static_input_scale(module, "input_scale", parts.get("input_scale"), static=static, says=says, weight=w)
        return LinearPlan(
            module=module,
            weight=w,
            weight_scale=s,
            scheme=scheme,
            activation=act,
            input_scale=inp,
            bias=check_bias(parts, (out_f,)),
        )

    # ---- reading -------------------------------------------------------------------------------
    def read_linear(self, ckpt: Checkpoint, linear: LinearPlan) -> QuantizedLinear:
        return read_linear_default(ckpt, linear)


register(CompressedTensorsReader())
