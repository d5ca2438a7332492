"""The reader protocol, the detection result, and the generic planner and loader readers share.

A reader says what its layout looks like (``LayoutRules``: which per-module suffixes are quantization
parameters, where KV-cache scales live, what is ignored, and how a module's tensors become linears);
``plan_modules`` walks the header once, classifies every tensor and collects every problem;
``read_linear_default`` loads one linear's tensors (slicing fused experts / fused rows) into the canonical
convention. Readers override only what their layout does differently.
"""

from __future__ import annotations

import fnmatch
import re
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch

from fp8convert.errors import CheckpointError, MissingTensorError, UnsupportedSchemeError
from fp8convert.shards import Checkpoint
from fp8convert.spec import (
    FLOAT_DTYPES,
    FP8_DTYPES,
    CheckpointPlan,
    Granularity,
    KVScale,
    LinearPlan,
    QuantizedLinear,
    TensorRef,
    WeightScheme,
    dtype_name,
)

#: The dtypes a stored float scale may have, in every layout.
SCALE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True, slots=True, kw_only=True)
class Detection:
    """Why a reader claims a checkpoint: the rule that fired and the evidence seen."""

    format: str
    rule: str
    evidence: list[str] = field(default_factory=list)


class FormatReader(Protocol):
    """One per layout family (FORMATS.md numbering). Readers do no writing and know no target."""

    name: str
    description: str

    def detect(self, ckpt: Checkpoint, config: dict) -> Detection | None:
        """Return a Detection if this layout is recognised, else None. Must not raise for other layouts."""
        ...

    def plan(self, ckpt: Checkpoint, config: dict, detection: Detection) -> CheckpointPlan:
        """Classify every tensor from headers only. Per-tensor problems go into ``plan.problems`` (reported
        with the value checks); a configuration that cannot be read at all raises."""
        ...

    def read_linear(self, ckpt: Checkpoint, linear: LinearPlan) -> QuantizedLinear:
        """Load one linear's tensors in the canonical convention (fp32 multiplier scales). A reader that
        reorders weight rows (beyond ``transposed``) also defines ``permutes_rows(linear) -> bool``."""
        ...


# ---- ignore lists ----------------------------------------------------------------------------------
def matches(module: str, entries: list[str], *, style: str) -> bool:
    """Whether ``module`` is named by an ignore list.

    ``style``: ``"ct"`` (compressed-tensors: exact names and ``re:`` patterns matched at the start),
    ``"fnmatch"`` (ModelOpt/Quark ``*`` wildcards), ``"prefix"`` (transformers ``modules_to_not_convert``:
    the entry names the module or one of its parents, or is a substring of its name).
    """
    for e in entries:
        if style == "ct" and (re.match(e[3:], module) if e.startswith("re:") else module == e):
            return True
        if style == "fnmatch" and fnmatch.fnmatchcase(module, e):
            return True
        if style == "prefix" and (module == e or module.startswith(e + ".") or e in module):
            return True
    return False


# ---- config blocks and detection evidence -----------------------------------------------------------
#: config.json sizes that must be positive integers when present (the AIU config and CPU model are built from them)
CONFIG_SIZES = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
)
#: the model dtypes a config.json may name (``torch_dtype``, or ``dtype`` since transformers 5)
CONFIG_DTYPES = ("bfloat16", "float16", "float32", "float64")


def config_problems(config: dict, prefix: str = "") -> list[str]:
    """Fields of a config.json (or of its ``text_config``) whose type or value no model could have: the
    architecture and sizes fp8convert checks and carries into the artifacts, and the blocks it reads."""
    p = []
    archs = config.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) and a for a in archs)):
        p.append(f"{prefix}architectures is {archs!r:.80}; expected a list of class names such as ['LlamaForCausalLM']")
    if config.get("model_type") is not None and not isinstance(config["model_type"], str):
        p.append(f"{prefix}model_type is {config['model_type']!r:.80}; expected a string such as 'llama'")
    for key in CONFIG_SIZES:
        value = config.get(key)
        if value is not None and (type(value) is not int or value <= 0):
            p.append(f"{prefix}{key} is {value!r:.80}; expected a positive integer")
    for key in ("torch_dtype", "dtype"):
        value = config.get(key)
        if value is not None and value not in CONFIG_DTYPES:
            p.append(f"{prefix}{key} is {value!r:.80}; expected one of {', '.join(CONFIG_DTYPES)}")
    for key in ("quantization_config", "compression_config", "text_config"):
        value = config.get(key)
        if value is not None and not isinstance(value, dict):
            p.append(f"{prefix}{key} is {value!r:.80}; expected an object")
    if isinstance(config.get("text_config"), dict) and not prefix:
        p += config_problems(config["text_config"], "text_config.")
    return p


def find_quant_config(config: dict, *, legacy_compression_config: bool = False) -> tuple[dict | None, str]:
    """The quantization block of a config.json and where it was found: ``quantization_config``, else a
    multimodal model's ``text_config.quantization_config``, else (only with ``legacy_compression_config``, for
    compressed-tensors) the pre-2024 ``compression_config``; ``(None, "")`` when there is none."""
    found = [
        ("quantization_config", config.get("quantization_config")),
        ("text_config.quantization_config", (config.get("text_config") or {}).get("quantization_config")),
    ]
    if legacy_compression_config:
        found.append(("compression_config", config.get("compression_config")))
    for where, qc in found:
        if isinstance(qc, dict):
            return qc, where
    return None, ""


def model_type(config: dict) -> str:
    """The ``model_type`` of a config.json, or of its ``text_config`` (multimodal models); "" when neither says."""
    return str(config.get("model_type") or (config.get("text_config") or {}).get("model_type") or "")


def suffix_summary(tensors: Mapping[str, TensorRef], suffixes: Collection[str]) -> str:
    """``weight float8_e4m3fn x12, weight_scale float32 x12``: how many tensors there are of each of
    ``suffixes`` (the last component of the key) and dtype, for detection evidence; "" when there are none."""
    counts = Counter(
        f"{suffix} {dtype_name(ref.dtype)}"
        for key, ref in tensors.items()
        if (suffix := key.rsplit(".", 1)[-1]) in suffixes
    )
    return ", ".join(f"{s} x{n}" for s, n in sorted(counts.items()))


# ---- per-tensor checks of a linear ------------------------------------------------------------------
def linear_dims(
    weight: TensorRef, *, refused: str = "only 2-D [out, in] linear weights are supported (fused 3-D experts are not)"
) -> tuple[int, int]:
    """``(out, in)`` of an fp8 linear weight; a weight that is not 2-D is refused (``refused`` says why)."""
    if len(weight.shape) != 2:
        raise UnsupportedSchemeError(
            f"{weight.key} ({weight.file}): fp8 weight of shape {list(weight.shape)}; {refused}"
        )
    out_f, in_f = weight.shape
    return out_f, in_f


def required_scale(
    parts: Mapping[str, TensorRef],
    suffix: str,
    weight: TensorRef,
    *,
    looked: str,
    keep_in: str | None = None,
    stored_as: str | None = None,
    expected: str = "bf16, f16 or f32",
) -> TensorRef:
    """The weight scale ``parts[suffix]`` of an fp8 ``weight``, its dtype checked (``check_scale_dtype``).

    A missing one is a ``MissingTensorError``: "{weight} is {stored_as or its dtype} but has no scale (looked for
    {looked}); [if this layer should stay in full precision it must be in {keep_in}; ]if the download is partial,
    download it again".
    """
    scale = parts.get(suffix)
    if scale is None:
        keep = f"if this layer should stay in full precision it must be in {keep_in}; " if keep_in else ""
        raise MissingTensorError(
            f"{weight.key} ({weight.file}) is {stored_as or dtype_name(weight.dtype)} but has no scale (looked for "
            f"{looked}); {keep}if the download is partial, download it again"
        )
    check_scale_dtype(scale, expected=expected)
    return scale


def check_scale_dtype(scale: TensorRef, *, expected: str = "bf16, f16 or f32") -> None:
    """A stored weight (or input) scale must be a float of ``SCALE_DTYPES``; ``expected`` names them."""
    if scale.dtype not in SCALE_DTYPES:
        raise UnsupportedSchemeError(
            f"{scale.key} ({scale.file}) has dtype {dtype_name(scale.dtype)}; expected {expected}"
        )


def scale_shapes(scheme: WeightScheme, out_features: int, in_features: int) -> set[tuple[int, ...]]:
    """The weight-scale shapes a scheme accepts: ``scheme.scale_shape``, and also ``[]`` for per-tensor and
    ``[out]`` for per-channel scales (both as producers write them)."""
    allowed = {scheme.scale_shape(out_features, in_features)}
    if scheme.granularity is Granularity.TENSOR:
        allowed.add(())
    elif scheme.granularity is Granularity.CHANNEL:
        allowed.add((out_features,))
    return allowed


def static_input_scale(
    module: str,
    suffix: str,
    scale: TensorRef | None,
    *,
    static: bool,
    says: str,
    weight: TensorRef,
    missing: str | None = None,
    expected: str = "a static per-tensor scale must be [] or [1] bf16/f16/f32",
) -> TensorRef | None:
    """A linear's stored input (activation) scale, checked against the config: the scale when the activations
    are static per tensor, else None.

    Static activations need one ``[]``/``[1]`` float scale (``MissingTensorError`` when it is missing,
    ``UnsupportedSchemeError`` for another shape or dtype); other activations store none (a scale found is an
    ``UnsupportedSchemeError``). Messages name ``{module}.{suffix}`` (``input_scale``, ``qscale_act``,
    ``activation_scale``) and its file; ``says`` is what the config says about the activations, as in
    "..., but {says} (config and tensors disagree)"; ``missing`` replaces the default text after
    "{module}.{suffix} is missing" (", but {says} (weight in {weight.file})"); ``expected`` follows a wrong shape
    or dtype.
    """
    name = f"{module}.{suffix}"
    if not static:
        if scale is not None:
            raise UnsupportedSchemeError(f"{name} ({scale.file}) is present, but {says} (config and tensors disagree)")
        return None
    if scale is None:
        raise MissingTensorError(
            f"{name} is missing" + (f", but {says} (weight in {weight.file})" if missing is None else missing)
        )
    if scale.shape not in ((), (1,)) or scale.dtype not in SCALE_DTYPES:
        raise UnsupportedSchemeError(
            f"{name} ({scale.file}) is {dtype_name(scale.dtype)} {list(scale.shape)}; {expected}"
        )
    return scale


def check_bias(parts: Mapping[str, TensorRef], shape: tuple[int, ...], *, fix: str = "") -> TensorRef | None:
    """A linear's ``bias``: None, or a float tensor of ``shape`` (``fix`` ends the message when it is not)."""
    bias = parts.get("bias")
    if bias is not None and (bias.shape != shape or bias.dtype not in FLOAT_DTYPES):
        raise UnsupportedSchemeError(
            f"{bias.key} ({bias.file}) is {dtype_name(bias.dtype)} {list(bias.shape)}; expected a float "
            f"{list(shape)}{fix}"
        )
    return bias


# ---- the generic planner ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class LayoutRules:
    """What a layout looks like, for ``plan_modules``.

    - ``quant_suffixes``: per-module tensor suffixes that are quantization parameters (``weight_scale``...);
      one left without an fp8 weight is an error.
    - ``kv_suffixes``: key suffix -> ``"k" | "v" | "q"`` for KV-cache / attention scales (dropped, reported).
    - ``dropped_suffixes``: suffix -> reason, for tensors that are read but not carried (zero points).
    - ``forbidden_suffixes``: suffix -> why the module cannot be converted.
    - ``ignored(module)``: the config says the module stays in full precision.
    - ``linears(module, parts)``: the linears of a module with an fp8 weight (several for fused experts);
      raises ``CheckpointError`` subclasses naming the tensor and the fix.
    """

    quant_suffixes: tuple[str, ...]
    linears: Callable[[str, dict[str, TensorRef]], list[LinearPlan]]
    ignored: Callable[[str], bool] = lambda module: False
    kv_suffixes: dict[str, str] = field(default_factory=dict)
    dropped_suffixes: dict[str, str] = field(default_factory=dict)
    forbidden_suffixes: dict[str, str] = field(default_factory=dict)
    weight_suffix: str = "weight"
    #: ``fused(key, tensors)``: the per-expert linears of a fused 3-D fp8 experts tensor (None: refused)
    fused: Callable[[str, dict[str, TensorRef]], list[LinearPlan]] | None = None


_KV_SUFFIX_MODULE = re.compile(r"\.(?:[qkv]_proj|[qkv]v?_fake_quantizer)$")


def _kv_module(key: str, suffix: str) -> str:
    """The attention module of a KV scale key: ``...self_attn.k_scale``, ``...self_attn.k_proj.k_scale`` and
    ``...self_attn.k_proj.output_scale`` all give ``...self_attn``."""
    return _KV_SUFFIX_MODULE.sub("", key.rpartition(".")[0])


def plan_modules(ckpt: Checkpoint, rules: LayoutRules, *, format_name: str, detection: Detection) -> CheckpointPlan:
    """Classify every tensor of a checkpoint with a layout's rules (headers only)."""
    tensors = ckpt.tensors
    modules: dict[str, dict[str, TensorRef]] = {}
    for key, ref in tensors.items():
        module, _, suffix = key.rpartition(".")
        modules.setdefault(module, {})[suffix] = ref
    problems: list[CheckpointError] = []
    linears: list[LinearPlan] = []
    kv_scales: list[KVScale] = []
    claimed: set[str] = set()
    dropped: dict[str, str] = {}
    unquantized: list[str] = []

    for key, ref in sorted(tensors.items()):
        for suffix, kind in rules.kv_suffixes.items():
            if key.endswith("." + suffix):
                if ref.dtype not in FLOAT_DTYPES:
                    problems.append(
                        UnsupportedSchemeError(
                            f"{key} ({ref.file}): KV-cache scale has dtype {dtype_name(ref.dtype)}, expected a float"
                        )
                    )
                kv_scales.append(
                    KVScale(
                        module=_kv_module(key, suffix), kind=kind, key=key, shape=ref.shape, dtype=dtype_name(ref.dtype)
                    )
                )
                claimed.add(key)
                dropped[key] = "KV-cache/attention scale (the AIU stack does not read it; listed under kv_cache_scales)"
                break

    if rules.fused is not None:
        for key, ref in sorted(tensors.items()):
            if ref.dtype not in FP8_DTYPES or len(ref.shape) != 3:
                continue
            siblings = {k for k in tensors if k.startswith(key.removesuffix(".weight") + "_")} | {key}
            try:
                found = rules.fused(key, tensors)
            except CheckpointError as exc:
                problems.append(exc)
                claimed.update(siblings)
                continue
            linears.extend(found)
            claimed.update(siblings)
            for lin in found:
                claimed.update(r.key for r in (lin.weight_scale, lin.input_scale, lin.bias) if r is not None)

    for module, parts in sorted(modules.items()):
        w = parts.get(rules.weight_suffix)
        if w is None or f"{module}.{rules.weight_suffix}" in claimed:
            continue
        wkey = f"{module}.{rules.weight_suffix}"
        for suffix, why in rules.forbidden_suffixes.items():
            if suffix in parts:
                problems.append(UnsupportedSchemeError(f"{module}.{suffix} ({parts[suffix].file}): {why}"))
        if w.dtype not in FP8_DTYPES:
            has_quant = [s for s in rules.quant_suffixes if s in parts]
            if has_quant:
                problems.append(
                    UnsupportedSchemeError(
                        f"{wkey} ({w.file}) is {dtype_name(w.dtype)} but has {', '.join(has_quant)}: the weights "
                        "are not stored in fp8 (a fake-quantized or uncompressed export); export the quantized one"
                    )
                )
                claimed.update(f"{module}.{s}" for s in parts)
            elif w.dtype in FLOAT_DTYPES and len(w.shape) == 2 and "embed" not in module:
                unquantized.append(module)
            continue
        owned = {
            f"{module}.{s}"
            for s in parts
            if s == rules.weight_suffix or s in rules.quant_suffixes or s == "bias" or s in rules.dropped_suffixes
        }
        if rules.ignored(module):
            problems.append(
                UnsupportedSchemeError(
                    f"{wkey} ({w.file}) is fp8 but the module is in the config's ignore list (config and tensors "
                    "disagree)"
                )
            )
            claimed.update(owned)
            continue
        try:
            found = rules.linears(module, parts)
        except CheckpointError as exc:
            problems.append(exc)
            claimed.update(owned)
            continue
        linears.extend(found)
        claimed.update(owned)
        for suffix, reason in rules.dropped_suffixes.items():
            if suffix in parts:
                dropped[f"{module}.{suffix}"] = reason

    for key, ref in sorted(tensors.items()):
        if key in claimed:
            continue
        suffix = key.rpartition(".")[2]
        if suffix in rules.quant_suffixes or suffix in rules.dropped_suffixes:
            problems.append(
                UnsupportedSchemeError(f"{key} ({ref.file}): a quantization parameter whose module has no fp8 weight")
            )
        elif ref.dtype in FP8_DTYPES:
            what = (
                "a fused 3-D experts tensor, which this layout's reader does not split (per-expert checkpoints convert)"
                if len(ref.shape) == 3
                else "an fp8 tensor that is not a linear weight"
            )
            problems.append(UnsupportedSchemeError(f"{key} ({ref.file}): {what}"))
    if not linears and not problems:
        raise MissingTensorError(
            f"the config declares {format_name} quantization but no fp8 weight was found",
            where=str(ckpt.root),
            hint="check that the safetensors files are the quantized ones",
        )
    return CheckpointPlan(
        format=format_name,
        evidence=detection.evidence,
        rule=detection.rule,
        linears=linears,
        kv_scales=kv_scales,
        passthrough=[ref for key, ref in sorted(tensors.items()) if key not in claimed],
        dropped=dropped,
        unquantized_linears=unquantized,
        problems=problems,
    )


def expert_linears(parent: str, proj: str, experts: int, out_features: int, **fields: object) -> list[LinearPlan]:
    """Per-expert linears of a fused experts tensor: ``gate_up_proj`` (rows ``[2I]``) gives ``{parent}.{e}.gate_proj``
    (rows ``[0, I)``) and ``up_proj`` (``[I, 2I)``); ``down_proj`` gives ``{parent}.{e}.down_proj``. ``fields`` are
    the other ``LinearPlan`` fields, shared by every expert."""
    half = out_features // 2
    rows: list[tuple[str, tuple[int, int] | None]] = (
        [("gate_proj", (0, half)), ("up_proj", (half, out_features))]
        if proj == "gate_up_proj"
        else [("down_proj", None)]
    )
    return [
        LinearPlan(module=f"{parent}.{e}.{name}", expert=e, rows=r, **fields)  # type: ignore[arg-type]
        for e in range(experts)
        for name, r in rows
    ]


# ---- loading -----------------------------------------------------------------------------------------
def read_linear_default(ckpt: Checkpoint, lin: LinearPlan, *, scale: torch.Tensor | None = None) -> QuantizedLinear:
    """Load a linear whose scale is stored as the dequantization multiplier (every layout found).

    The weight comes back ``[out, in]``; the scale fp32 in ``scheme.scale_shape(out, in)``. ``scale``
    replaces the stored scale tensor when the layout needs decoding first (e8m0 bytes, 4-D grids...).
    """
    out_f, in_f = lin.out_features, lin.in_features
    fused = lin.expert is not None
    n_experts = lin.weight.shape[0]
    w = ckpt.load(lin.weight.key, index=lin.expert)  # one expert's bytes only, never the whole fused tensor
    w = w.T if lin.transposed else w
    w = w[lin.rows[0] : lin.rows[1]] if lin.rows is not None else w
    shape = lin.weight_scale.shape if scale is None else tuple(scale.shape)
    per_expert = fused and len(shape) > 0 and shape[0] == n_experts and (len(shape) > 1 or n_experts > 1)
    if scale is None:  # one expert's scales only, too
        s = ckpt.load(lin.weight_scale.key, index=lin.expert if per_expert else None)
    else:
        s = scale[lin.expert] if per_expert else scale
    g = lin.scheme.granularity
    if lin.rows is not None and g is not Granularity.TENSOR and s.numel() > 1:
        bo = lin.scheme.block[0] if lin.scheme.block else 1
        if lin.rows[0] % bo:
            raise UnsupportedSchemeError(f"{lin.module}: rows {lin.rows} do not start on a {bo}-row scale block")
        s = s.reshape(-1, s.shape[-1]) if g is Granularity.BLOCK else s.reshape(-1)
        s = s[lin.rows[0] // bo : -(-lin.rows[1] // bo)]
    s = s.to(torch.float32).reshape(lin.scheme.scale_shape(out_f, in_f))
    inp = None
    if lin.input_scale is not None:
        i = ckpt.load(lin.input_scale.key)
        if fused and i.numel() > 1:
            i = i.reshape(-1)[lin.expert]
        inp = i.to(torch.float32).reshape(1)
    bias = None
    if lin.bias is not None:
        b = ckpt.load(lin.bias.key)
        if fused and b.dim() == 2:
            b = b[lin.expert]
        bias = b[lin.rows[0] : lin.rows[1]] if lin.rows is not None else b
    return QuantizedLinear(
        module=lin.module,
        weight=w.contiguous(),
        weight_scale=s,
        scheme=lin.scheme,
        activation=lin.activation,
        scale_dtype=lin.weight_scale.dtype,
        input_scale=inp,
        bias=bias,
        act_upper_bound=lin.act_upper_bound,
    )
