"""Reader for AMD Quark FP8 checkpoints (``quant_method: "quark"``; FORMATS.md L8).

Handles ``fp8_e4m3`` weights ``per_tensor`` (0-d or ``[1]`` scale), ``per_channel`` (``[out]`` or ``[out, 1]``,
``ch_axis`` 0) and ``per_block`` (``[ceil(out/b0), ceil(in/b1)]``, block from ``block_size``, vLLM's default
128x128); input activations none, static per-tensor (``input_scale``), dynamic per-tensor, per-token
(``qscheme: per_channel``) or per-group 128; ``exclude`` lists (exact names, ``*`` wildcards, ``re:`` regexes);
``layer_quant_config`` per-layer overrides (resolved per module as vLLM does: the first matching pattern wins,
else ``global_quant_config``); KV-cache scales ``k_proj/v_proj/q_proj.output_scale`` (``export.kv_cache_group``)
and ``self_attn.prob_output_scale``, listed and dropped; weights stored ``F8_E4M3`` (what Quark writes) or
``F8_E4M3FNUZ`` (returned as stored with the stored scale: normalization converts by value).

Refused with a message: ``fp8_e5m2`` and non-FP8 dtypes, two-stage weight specs (W4A8 lists), output and bias
quantization (``bias_scale``), e8m0 scales, ``layer_type_quant_config`` overrides, online rotations
(``input_rotation``), the ``fake_quantized`` export (high-precision weights next to their scales: decided from
the header dtype, not the config), and DBRX experts merged by Quark (``w1_weight`` + stacked scales).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch

from fp8convert.errors import CheckpointError, UnsupportedSchemeError
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
    FP8_DTYPES,
    ActScheme,
    CheckpointPlan,
    Granularity,
    LinearPlan,
    QuantizedLinear,
    TensorRef,
    WeightScheme,
    dtype_name,
)

NAME = "quark"
#: Quark's ``fp8_e4m3`` is ``torch.float8_e4m3fn`` on disk; an fnuz file (not seen on the Hub) is read as stored.
WEIGHT_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)
DEFAULT_BLOCK = (128, 128)  # vLLM QuarkW8A8Fp8Block: weight_config.get("block_size") or [128, 128]
KV_SUFFIXES = {
    "self_attn.k_proj.output_scale": "k",  # export.kv_cache_group, custom_mode "quark"
    "self_attn.v_proj.output_scale": "v",
    "self_attn.q_proj.output_scale": "q",  # vLLM maps it to attn.q_scale
    "self_attn.prob_output_scale": "prob",  # vLLM maps it to attn.prob_scale
    "self_attn.k_scale": "k",  # Quark's legacy custom_mode "fp8" names, accepted if mixed in
    "self_attn.v_scale": "v",
}
KV_PROJ = re.compile(r"\.self_attn\.[qkv]_proj$")
ZERO_POINT_SUFFIXES = ("weight_zero_point", "input_zero_point", "output_zero_point")
FORBIDDEN_SUFFIXES = {
    "bias_scale": "the bias is quantized (Quark bias_quantizer); only full-precision biases are supported",
    "bias_zero_point": "the bias is quantized (Quark bias_quantizer); only full-precision biases are supported",
    "input_rotation": "an online input rotation (Quark rotation/QuaRot transform) is applied before the linear; "
    "fp8convert cannot carry it",
}
#: DBRX experts as Quark merges them (``_merge_params_for_DbrxExperts``): ``experts.mlp.{w1,v1,w2}_weight``.
DBRX_MERGED = re.compile(
    r"\.experts\.mlp\.(w1|v1|w2)_(weight|weight_scale|input_scale|output_scale|weight_zero_point)$"
)
REEXPORT_HINT = (
    "re-export with Quark's real-quantized format: quark.torch.export_safetensors(model, output_dir, "
    'custom_mode="quark", weight_format="real_quantized")'
)


def quant_config(config: dict) -> tuple[dict | None, str]:
    """The Quark block and where it was found.

    A config re-saved through transformers' ``QuarkConfig`` nests the Quark config under ``quant_config`` and
    the export config under ``json_export_config``; both spellings are read the same.
    """
    qc, where = find_quant_config(config)
    if qc is not None and "global_quant_config" not in qc and isinstance(qc.get("quant_config"), dict):
        qc = {**qc["quant_config"], "export": qc.get("json_export_config") or qc.get("export")}
        where += ".quant_config"
    return qc, where


def excluded(module: str, entries: list[str]) -> bool:
    """Quark ``exclude``: exact names and ``*`` wildcards (fnmatch, Quark's own matching), and ``re:`` regexes
    matched at the start (vLLM ``check_equal_or_regex_match``)."""
    for e in entries:
        if e.startswith("re:"):
            if re.match(e[3:], module):
                return True
        elif matches(module, [e], style="fnmatch"):
            return True
    return False


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class _Scheme:
    """One Quark QuantizationConfig (global or a layer override), checked and translated."""

    where: str
    quantized: bool  # weight spec present
    scheme: WeightScheme | None = None
    activation: ActScheme = ActScheme.NONE


def _spec_problems(spec: Any, what: str) -> list[str]:
    """Problems of one tensor QuantizationSpec (weight, input_tensors or output_tensors)."""
    if isinstance(spec, list):
        return [
            f"{what} is a list of {len(spec)} specs (two-stage quantization such as W4A8 fp8+int4); "
            "only single-stage FP8 is supported"
        ]
    if not isinstance(spec, dict):
        return [f"{what} is {type(spec).__name__}, expected a quantization spec object"]
    p = []
    dtype = spec.get("dtype")
    if dtype == "fp8_e5m2":
        p.append(
            f"{what}.dtype is 'fp8_e5m2': no Hub producer of e5m2 weights was found (FORMATS.md Q8) and vLLM "
            "loads only fp8_e4m3; fp8convert refuses it rather than guess"
        )
    elif dtype != "fp8_e4m3":
        p.append(f"{what}.dtype is {dtype!r}; only 'fp8_e4m3' is FP8 (int, fp4, fp6 and MX types are not)")
    if spec.get("symmetric") is False:
        p.append(f"{what} is asymmetric (zero points); only symmetric FP8 is supported")
    if spec.get("scale_format") not in (None, "float") or spec.get("scale_type") not in (None, "float", "pof2"):
        p.append(
            f"{what} has scale_type={spec.get('scale_type')!r} scale_format={spec.get('scale_format')!r}; "
            "only float scales are supported (e8m0 scales are MX-style)"
        )
    return p


def _weight_scheme(spec: dict, what: str) -> tuple[WeightScheme | None, list[str]]:
    qscheme = spec.get("qscheme")
    if spec.get("is_dynamic"):
        return None, [f"{what}.is_dynamic is true: dynamic weight quantization is not a stored checkpoint"]
    if qscheme == "per_tensor":
        return WeightScheme(granularity=Granularity.TENSOR), []
    if qscheme == "per_channel":
        if spec.get("ch_axis") not in (None, 0):
            return None, [f"{what}: per_channel with ch_axis={spec.get('ch_axis')!r}; weights [out, in] need ch_axis 0"]
        return WeightScheme(granularity=Granularity.CHANNEL), []
    if qscheme == "per_block":
        block = spec.get("block_size")
        if block is None:
            block = list(DEFAULT_BLOCK)
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(v, int) and v > 0 for v in block)):
            return None, [f"{what}: per_block needs block_size [rows, cols], found {block!r}"]
        return WeightScheme(granularity=Granularity.BLOCK, block=(block[0], block[1])), []
    if qscheme == "per_group":
        return None, [
            f"{what}: per_group (group_size {spec.get('group_size')!r}) is not supported; FP8 checkpoints use "
            "per_tensor, per_channel or per_block"
        ]
    return None, [f"{what}: qscheme {qscheme!r} is not supported"]


def _act_scheme(spec: Any, what: str) -> tuple[ActScheme, list[str]]:
    if spec is None:
        return ActScheme.NONE, []
    p = _spec_problems(spec, what)
    if p:
        return ActScheme.NONE, p
    qscheme, dynamic = spec.get("qscheme"), spec.get("is_dynamic")
    if not dynamic:
        if qscheme != "per_tensor":
            return ActScheme.NONE, [f"{what}: static {qscheme} input quantization is not supported (only per_tensor)"]
        return ActScheme.STATIC_TENSOR, []
    if qscheme == "per_tensor":
        return ActScheme.DYNAMIC_TENSOR, []
    if qscheme == "per_channel":  # vLLM QuarkW8A8Fp8: dynamic per_channel input = per token
        return ActScheme.DYNAMIC_TOKEN, []
    if qscheme == "per_group" and spec.get("group_size") == 128:
        return ActScheme.DYNAMIC_GROUP, []
    return ActScheme.NONE, [f"{what}: dynamic {qscheme} input quantization (group_size {spec.get('group_size')!r})"]


def _output_problems(spec: Any, what: str) -> list[str]:
    p = _spec_problems(spec, what)
    if not p and spec.get("qscheme") != "per_tensor":
        p.append(f"{what}: KV-cache quantization must be per_tensor, found {spec.get('qscheme')!r}")
    return p


class QuarkReader:
    name = NAME
    description = "AMD Quark (quant_method quark: fp8_e4m3 per-tensor, per-channel, per-block)"

    def detect(self, ckpt: Checkpoint, config: dict) -> Detection | None:
        qc, where = quant_config(config)
        if qc is None or str(qc.get("quant_method", "")).lower() != "quark":
            return None
        glob = qc.get("global_quant_config") or {}
        weight = glob.get("weight") if isinstance(glob, dict) else None
        wdesc = (
            f"{weight.get('dtype')!r} {weight.get('qscheme')!r}"
            if isinstance(weight, dict)
            else f"{type(weight).__name__}"
        )
        inp = glob.get("input_tensors") if isinstance(glob, dict) else None
        idesc = (
            f"{inp.get('dtype')!r} {inp.get('qscheme')!r} is_dynamic={inp.get('is_dynamic')!r}"
            if isinstance(inp, dict)
            else repr(inp)
        )
        export = qc.get("export")
        if not isinstance(export, dict):
            export = {}
        evidence = [
            f"config.json {where}.quant_method='quark'",
            f"global weight {wdesc}; input_tensors {idesc}",
            f"export.weight_format={export.get('weight_format')!r} kv_cache_group={export.get('kv_cache_group')!r}",
        ]
        summary = suffix_summary(ckpt.tensors, ("weight", "weight_scale", "input_scale", "output_scale"))
        evidence.append("tensors: " + summary)
        return Detection(format=NAME, rule="quant_method is quark (FORMATS.md 7, step 3)", evidence=evidence)

    # ---- configuration ---------------------------------------------------------------------------
    def _schemes(self, qc: dict, where: str) -> tuple[list[tuple[str, _Scheme]], _Scheme]:
        """Check the global config and every layer override once; return (overrides in order, global)."""
        problems: list[str] = []
        glob = qc.get("global_quant_config")
        if not isinstance(glob, dict):
            problems.append(f"{where}.global_quant_config is missing or not an object")
            glob = {}
        if ltq := qc.get("layer_type_quant_config"):
            shown = sorted(ltq) if isinstance(ltq, dict) else ltq
            problems.append(
                f"layer_type_quant_config {shown!r:.120} overrides the scheme per module "
                "class, which the checkpoint does not record; not supported"
            )
        export = qc.get("export") or {}
        if not isinstance(export, dict):
            problems.append(f"export is {export!r:.80}, expected an object")
            export = {}
        kv_group = export.get("kv_cache_group") or []
        if not isinstance(kv_group, list) or not all(isinstance(g, str) for g in kv_group):
            problems.append(f"export.kv_cache_group is {kv_group!r:.80}, expected a list of name patterns")
            kv_group = []
        exclude = qc.get("exclude")
        if exclude is not None and (not isinstance(exclude, list) or not all(isinstance(e, str) for e in exclude)):
            problems.append(f"exclude is {exclude!r:.80}, expected a list of module names or patterns")
        regexes = (
            [e for e in exclude if isinstance(e, str) and e.startswith("re:")] if isinstance(exclude, list) else []
        )
        for e in regexes:
            try:
                re.compile(e[3:])
            except re.error as exc:
                problems.append(f"exclude entry {e!r} is not a valid regular expression ({exc})")
        layer_cfg = qc.get("layer_quant_config") or {}
        if not isinstance(layer_cfg, dict):
            problems.append(f"layer_quant_config is {type(layer_cfg).__name__}, expected an object")
            layer_cfg = {}

        def scheme(cfg: Any, what: str, *, kv: bool) -> _Scheme:
            if not isinstance(cfg, dict):
                problems.append(f"{what} is {type(cfg).__name__}, expected an object")
                return _Scheme(where=what, quantized=False)
            if cfg.get("bias") is not None:
                problems.append(f"{what}.bias is set: bias quantization is not supported")
            out = cfg.get("output_tensors")
            if out is not None:
                if kv:
                    problems.extend(_output_problems(out, f"{what}.output_tensors"))
                else:
                    problems.append(
                        f"{what}.output_tensors is set on layers outside export.kv_cache_group {kv_group}: output "
                        "activation quantization is not supported"
                    )
            weight = cfg.get("weight")
            if weight is None:
                return _Scheme(where=what, quantized=False)
            found = _spec_problems(weight, f"{what}.weight")
            ws = None
            if not found:
                ws, found = _weight_scheme(weight, f"{what}.weight")
            problems.extend(found)
            act, found = _act_scheme(cfg.get("input_tensors"), f"{what}.input_tensors")
            problems.extend(found)
            return _Scheme(where=what, quantized=True, scheme=ws, activation=act)

        overrides = []
        for pattern, cfg in layer_cfg.items():
            # vLLM: entries matched by a kv_cache_group pattern (and *q_proj) carry the KV output spec
            kv = any(matches(pattern, [g], style="fnmatch") for g in kv_group) or pattern == "*q_proj"
            overrides.append((str(pattern), scheme(cfg, f"layer_quant_config[{pattern!r}]", kv=kv)))
        global_scheme = scheme(glob, "global_quant_config", kv=False)
        if problems:
            raise UnsupportedSchemeError(
                "unsupported Quark configuration",
                where=f"config.json {where}",
                problems=sorted(set(problems), key=problems.index),
                hint="fp8convert converts Quark fp8_e4m3 weights (per_tensor, per_channel, per_block) with static "
                "per-tensor or dynamic input quantization",
            )
        return overrides, global_scheme

    # ---- planning (headers only) -------------------------------------------------------------
    def plan(self, ckpt: Checkpoint, config: dict, detection: Detection) -> CheckpointPlan:
        qc, where = quant_config(config)
        assert qc is not None
        overrides, global_scheme = self._schemes(qc, where)
        exclude = [str(e) for e in (qc.get("exclude") or [])]
        weight_format = qc["export"].get("weight_format") if isinstance(qc.get("export"), dict) else None

        def scheme_for(module: str) -> _Scheme:
            for pattern, s in overrides:
                if matches(module, [pattern], style="fnmatch"):
                    return s
            return global_scheme

        def linears(module: str, parts: dict[str, TensorRef]) -> list[LinearPlan]:
            return [self._linear(module, parts, scheme_for(module))]

        rules = LayoutRules(
            quant_suffixes=("weight_scale", "input_scale", "output_scale"),
            linears=linears,
            ignored=lambda module: excluded(module, exclude),
            kv_suffixes=KV_SUFFIXES,
            dropped_suffixes=dict.fromkeys(ZERO_POINT_SUFFIXES, "zero point of a symmetric scheme (checked all-zero)"),
            forbidden_suffixes=FORBIDDEN_SUFFIXES,
        )
        plan = plan_modules(ckpt, rules, format_name=NAME, detection=detection)
        return self._refine(ckpt, plan, weight_format)

    @staticmethod
    def _refine(ckpt: Checkpoint, plan: CheckpointPlan, weight_format: object) -> CheckpointPlan:
        """Replace generic problems with Quark-specific ones: the fake_quantized export and DBRX merged experts."""
        specific: dict[str, CheckpointError] = {}
        merged: set[str] = set()  # DBRX merged tensors: never copied through
        for key, ref in sorted(ckpt.tensors.items()):
            module, _, suffix = key.rpartition(".")
            if suffix == "weight" and ref.dtype not in FP8_DTYPES:
                has = [s for s in ("weight_scale", "input_scale", "output_scale") if ckpt.has(f"{module}.{s}")]
                if has:
                    specific[key] = UnsupportedSchemeError(
                        f"{key} ({ref.file}) is {dtype_name(ref.dtype)} but has {', '.join(has)}: this is Quark's "
                        f"fake_quantized (QDQ) export (export.weight_format={weight_format!r}), whose weights stay in "
                        f"high precision next to their scales, not FP8; {REEXPORT_HINT}"
                    )
            m = DBRX_MERGED.search(key)
            if m:
                merged.add(key)
            if m and m.group(2) == "weight" and ref.dtype in FP8_DTYPES:
                specific[key] = UnsupportedSchemeError(
                    f"{key} ({ref.file}): DBRX experts merged by Quark (all experts' {m.group(1)} concatenated into "
                    f"one {dtype_name(ref.dtype)} {list(ref.shape)} tensor with stacked {m.group(1)}_weight_scale / "
                    f"{m.group(1)}_input_scale) are not supported; export without weight merging "
                    "(quantize_quark.py --no_weight_matrix_merge) or convert the per-expert checkpoint"
                )
        if not specific and not merged:
            return plan

        def prefix(p: CheckpointError) -> str:
            return p.message.split(" ", 1)[0]

        problems = [p for p in plan.problems if prefix(p) not in specific and prefix(p) not in merged]
        problems += [specific[k] for k in sorted(specific)]
        return dataclasses.replace(
            plan,
            problems=problems,
            passthrough=[r for r in plan.passthrough if r.key not in merged],
            dropped={**plan.dropped, **dict.fromkeys(sorted(merged), "DBRX experts merged by Quark (refused)")},
        )

    @staticmethod
    def _linear(module: str, parts: dict[str, TensorRef], cfg: _Scheme) -> LinearPlan:
        w = parts["weight"]
        where = f"{module}.weight ({w.file})"
        if not cfg.quantized or cfg.scheme is None:
            raise UnsupportedSchemeError(
                f"{where} is {dtype_name(w.dtype)} but the Quark config does not quantize it "
                f"({cfg.where}.weight is null; config and tensors disagree)"
            )
        if w.dtype not in WEIGHT_DTYPES:
            raise UnsupportedSchemeError(
                f"{where} is stored as {dtype_name(w.dtype)}, but {cfg.where}.weight.dtype is 'fp8_e4m3' "
                "(config and tensors disagree)"
            )
        out_f, in_f = linear_dims(w, refused="only 2-D [out, in] linear weights are supported")
        scheme = cfg.scheme
        s = required_scale(
            parts, "weight_scale", w, looked=f"{module}.weight_scale, {cfg.where} qscheme {scheme.describe()}"
        )
        allowed = scale_shapes(scheme, out_f, in_f)
        if s.shape not in allowed:
            raise UnsupportedSchemeError(
                f"{module}.weight_scale ({s.file}) has shape {list(s.shape)}, but {cfg.where} says "
                f"{scheme.describe()}, whose scales for weight {[out_f, in_f]} are "
                + " or ".join(str(list(a)) for a in sorted(allowed, key=len))
            )
        static = cfg.activation is ActScheme.STATIC_TENSOR
        says = f"{cfg.where}.input_tensors is {'static per_tensor' if static else cfg.activation}"
        inp = static_input_scale(module, "input_scale", parts.get("input_scale"), static=static, says=says, weight=w)
        out = parts.get("output_scale")
        if out is not None and not KV_PROJ.search(module):  # q/k/v_proj output scales are KV scales (as in vLLM)
            raise UnsupportedSchemeError(
                f"{module}.output_scale ({out.file}): output activation quantization is not supported (only the "
                "q_proj/k_proj/v_proj output scales, which are attention/KV-cache scales)"
            )
        return LinearPlan(
            module=module,
            weight=w,
            weight_scale=s,
            scheme=scheme,
            activation=cfg.activation,
            input_scale=inp,
            bias=check_bias(parts, (out_f,)),
        )

    # ---- reading -------------------------------------------------------------------------------
    def read_linear(self, ckpt: Checkpoint, linear: LinearPlan) -> QuantizedLinear:
        """The stored codes and scales as they are; an e4m3fnuz weight stays e4m3fnuz with its own scale
        (normalize.py converts it to e4m3fn by value, never by reinterpreting bits)."""
        return read_linear_default(ckpt, linear)


register(QuarkReader())
