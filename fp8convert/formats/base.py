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
from collections.abc import Callable
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
    dtype_name,
)


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
        """Load one linear's tensors and convert them to the canonical convention (fp32 multiplier scales)."""
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

    for module, parts in sorted(modules.items()):
        w = parts.get(rules.weight_suffix)
        if w is None:
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
            problems.append(UnsupportedSchemeError(f"{key} ({ref.file}): fp8 tensor that is not a linear weight"))
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


# ---- loading -----------------------------------------------------------------------------------------
def select(
    t: torch.Tensor, lin: LinearPlan, *, per_expert: bool, row_axis: int | None, block_rows: int = 1
) -> torch.Tensor:
    """Slice a stored tensor to one linear: its expert (dim 0) and its rows (``row_axis``, in units of
    ``block_rows`` for block scales)."""
    if lin.expert is not None and per_expert:
        t = t[lin.expert]
    if lin.rows is not None and row_axis is not None:
        r0, r1 = lin.rows
        t = t.narrow(row_axis, r0 // block_rows, -(-r1 // block_rows) - r0 // block_rows)
    return t


def read_linear_default(ckpt: Checkpoint, lin: LinearPlan, *, scale: torch.Tensor | None = None) -> QuantizedLinear:
    """Load a linear whose scale is stored as the dequantization multiplier (every layout found).

    The weight comes back ``[out, in]``; the scale fp32 in ``scheme.scale_shape(out, in)``. ``scale``
    replaces the stored scale tensor when the layout needs decoding first (e8m0 bytes, 4-D grids...).
    """
    out_f, in_f = lin.out_features, lin.in_features
    stored = ckpt.load(lin.weight.key)
    fused = lin.expert is not None
    w = select(stored, lin, per_expert=True, row_axis=None)
    if lin.transposed:
        w = w.T
    if lin.rows is not None:
        w = w[lin.rows[0] : lin.rows[1]]
    s = ckpt.load(lin.weight_scale.key) if scale is None else scale
    if fused and s.dim() > 0 and s.shape[0] == stored.shape[0] and (s.dim() > 1 or stored.shape[0] > 1):
        s = s[lin.expert]
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
