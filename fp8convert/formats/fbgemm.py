"""Reader for transformers/vLLM ``fbgemm_fp8`` checkpoints (Meta Llama 3.1 405B FP8; FORMATS.md L6).

Config: ``quantization_config = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
"modules_to_not_convert": [...]}``. Tensors: ``<module>.weight`` e4m3fn ``[out, in]`` and ``<module>.weight_scale``
f32 ``[out, 1]`` (row-wise dequantization multiplier); no activation-scale tensor. Activations are quantized per
token at run time with the per-token amax clamped to ``activation_scale_ub`` (a config value, carried as
``LinearPlan.act_upper_bound``).

Meta quantized only the FFN linears, and not those of the first and last layers: attention stays bf16, so these
checkpoints have full-precision decoder linears (listed in ``modules_to_not_convert`` as full leaf paths).
``modules_to_not_convert`` is matched the way transformers does (name, parent or substring); the tensors'
dtypes decide what is quantized.
"""

from __future__ import annotations

import math

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

NAME = "fbgemm"
METHODS = ("fbgemm_fp8", "fbgemm-fp8")
CHANNEL = WeightScheme(granularity=Granularity.CHANNEL)


class FbgemmReader:
    name = NAME
    description = "fbgemm_fp8 (Meta Llama 3.1 405B FP8: row-wise weights, dynamic per-token activations with ub)"

    def detect(self, ckpt: Checkpoint, config: dict) -> Detection | None:
        qc, where = find_quant_config(config)
        if qc is None or str(qc.get("quant_method", "")).lower() not in METHODS:
            return None
        not_convert = qc.get("modules_to_not_convert")
        evidence = [
            f"config.json {where}.quant_method={qc.get('quant_method')!r}",
            f"activation_scale_ub={qc.get('activation_scale_ub')!r}",
            f"modules_to_not_convert: {len(not_convert) if isinstance(not_convert, list) else not_convert!r} entries",
            "tensors: " + suffix_summary(ckpt.tensors, ("weight", "weight_scale")),
        ]
        return Detection(format=NAME, rule="quant_method is fbgemm_fp8 (FORMATS.md 7, step 3)", evidence=evidence)

    # ---- planning (headers only) -------------------------------------------------------------
    def plan(self, ckpt: Checkpoint, config: dict, detection: Detection) -> CheckpointPlan:
        qc, where = find_quant_config(config)
        assert qc is not None
        ub = qc.get("activation_scale_ub")
        if isinstance(ub, bool) or not isinstance(ub, int | float) or not math.isfinite(ub) or ub <= 0:
            raise UnsupportedSchemeError(
                f"activation_scale_ub is {ub!r}; fbgemm_fp8 needs a positive number (the per-token activation "
                "amax bound)",
                where=f"config.json {where}",
                hint="Meta's checkpoints use 1200.0; fix the config (vLLM refuses it as well)",
            )
        not_convert = qc.get("modules_to_not_convert") or []
        if not (isinstance(not_convert, list) and all(isinstance(e, str) for e in not_convert)):
            raise UnsupportedSchemeError(
                f"modules_to_not_convert must be a list of module names, found {not_convert!r}",
                where=f"config.json {where}",
            )

        def linears(module: str, parts: dict[str, TensorRef]) -> list[LinearPlan]:
            return [_linear(module, parts, float(ub))]

        rules = LayoutRules(
            quant_suffixes=("weight_scale",),
            linears=linears,
            ignored=lambda module: matches(module, not_convert, style="prefix"),
            dropped_suffixes={"input_scale_ub": "fbgemm activation upper-bound buffer (activation_scale_ub is used)"},
            forbidden_suffixes={
                "input_scale": "a stored activation scale: fbgemm_fp8 activations are dynamic per token (a "
                "checkpoint of another layout with an fbgemm_fp8 config?)"
            },
        )
        return plan_modules(ckpt, rules, format_name=NAME, detection=detection)

    # ---- reading -------------------------------------------------------------------------------
    def read_linear(self, ckpt: Checkpoint, linear: LinearPlan) -> QuantizedLinear:
        return read_linear_default(ckpt, linear)


def _linear(module: str, parts: dict[str, TensorRef], ub: float) -> LinearPlan:
    w = parts["weight"]
    out_f, in_f = linear_dims(w, refused="expected a 2-D [out, in] linear")
    s = required_scale(
        parts,
        "weight_scale",
        w,
        looked=f"{module}.weight_scale, row-wise [{out_f}, 1]",
        keep_in="modules_to_not_convert",
        expected="f32 (fbgemm), bf16 or f16",
    )
    if s.shape not in ((out_f, 1), (out_f,)):
        raise UnsupportedSchemeError(
            f"{s.key} ({s.file}) has shape {list(s.shape)}, but row-wise scales for weight {[out_f, in_f]} "
            f"must be [{out_f}, 1]"
        )
    bias = check_bias(parts, (out_f,))
    return LinearPlan(
        module=module,
        weight=w,
        weight_scale=s,
        scheme=CHANNEL,
        activation=ActScheme.DYNAMIC_TOKEN,
        bias=bias,
        act_upper_bound=ub,
    )


register(FbgemmReader())
