"""Reader for the ``quant_method: "fp8"`` family (FORMATS.md L1, L2, L3).

Three on-disk layouts share the config spelling; the config and the tensor names tell them apart
(FORMATS.md 7, step 3 ``fp8``):

- **L1 per-tensor** (AutoFP8, vLLM, Quark ``custom_mode="fp8"``): no ``weight_block_size``; ``weight_scale``
  ``[]`` (or ``[1]``); ``activation_scheme`` static (``input_scale`` ``[]``) or dynamic (nothing stored);
  ``ignored_layers``; KV scales ``self_attn.k_scale``/``v_scale`` or the legacy ``self_attn.kv_scale``; Mixtral
  experts ``block_sparse_moe.experts.{e}.w1/w2/w3`` per expert.
- **L2 block** (DeepSeek-V3/R1, Qwen3 FP8, Kimi-K2, MiniMax-M2): ``weight_block_size: [bo, bi]`` (the block
  always comes from the config, never from shapes); ``weight_scale_inv`` ``[ceil(out/bo), ceil(in/bi)]`` in F32,
  BF16 or F16 (taken from the header); ``scale_fmt: "ue8m0"`` accepted (values stored as floats, or as U8 e8m0
  exponent bytes ``2**(b-127)``); activations dynamic per token and group of input channels.
- **L3 per-tensor (weight_scale_inv)** (transformers ``FP8Linear`` with ``weight_block_size: null``; Mistral
  HF format): ``weight_scale_inv`` ``[]`` and the static input scale ``activation_scale`` ``[]``.

In every layout the stored scale is the dequantization multiplier, ``hp = fp32(fp8) * scale``: the ``_inv``
of ``weight_scale_inv`` does **not** mean "divide" (FORMATS.md 2.1 quotes the producers' and consumers' lines).

Whether a module is quantized is decided per tensor, by "fp8 dtype + scale sibling": DeepSeek/Qwen checkpoints
list no unquantized modules (routers, ``e_score_correction_bias``, embeddings pass through at their own dtype).
The ignore lists (``ignored_layers``, ``modules_to_not_convert``; transformers semantics: a module, a parent,
or a substring) are only checked against the tensors. Activations of dynamic L1/L3 checkpoints are read as
dynamic **per-tensor** (``ActScheme.DYNAMIC_TENSOR``): vLLM runs them per token only when a CUTLASS kernel is
available and per tensor otherwise, and per tensor is what the producers calibrated nothing for either way;
the AIU target then keeps per-tensor weights and activations, exactly.

Not read (refused with a message): fused 3-D experts (transformers 5 ``experts.gate_up_proj`` +
``gate_up_proj_scale_inv``, the Mistral-4 HF export), block + static activations, DeepSeek-V4 native (refused
by name before detection, adjacent.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from fp8convert.errors import MissingTensorError, UnsupportedSchemeError
from fp8convert.formats import register
from fp8convert.formats.base import (
    SCALE_DTYPES,
    Detection,
    LayoutRules,
    check_bias,
    expert_linears,
    find_quant_config,
    linear_dims,
    matches,
    model_type,
    plan_modules,
    read_linear_default,
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

NAME = "fp8"
L1, L2, L3 = "L1", "L2", "L3"
#: e8m0 exponent bytes: U8 (MXFP8-style) or the float8_e8m0fnu dtype (safetensors "F8_E8M0")
E8M0_DTYPES = tuple(d for d in (torch.uint8, getattr(torch, "float8_e8m0fnu", None)) if d is not None)
KV_SUFFIXES = {
    "self_attn.q_scale": "q",
    "self_attn.k_scale": "k",
    "self_attn.v_scale": "v",
    "self_attn.kv_scale": "kv",  # AutoFP8 before 2024-07-23: max(k, v); vLLM copies it to both
}
#: every quantization-parameter spelling of the family: one left without an fp8 weight is an error
QUANT_SUFFIXES = ("weight_scale", "weight_scale_inv", "input_scale", "activation_scale")
#: tensor suffixes counted in the detection evidence
EVIDENCE_SUFFIXES = ("weight", *QUANT_SUFFIXES, "k_scale", "v_scale", "kv_scale", "q_scale")
E4M3_SPELLINGS = (None, "e4m3", "float8_e4m3fn")


def _is_fp8_method(qc: dict) -> bool:
    return str(qc.get("quant_method", "")).lower().replace("_", "-") == "fp8"


@dataclass(frozen=True, slots=True, kw_only=True)
class Layout:
    """The sub-layout of an ``fp8`` checkpoint and the config values the planner needs."""

    kind: str  # L1 | L2 | L3
    where: str  # where the config block was found
    block: tuple[int, int] | None
    dynamic: bool
    ignore: list[str]
    ue8m0: bool
    evidence: list[str]

    @property
    def scale_suffix(self) -> str:
        return "weight_scale" if self.kind == L1 else "weight_scale_inv"

    @property
    def input_suffix(self) -> str | None:
        if self.dynamic or self.kind == L2:
            return None
        return "input_scale" if self.kind == L1 else "activation_scale"

    @property
    def label(self) -> str:
        """``L1 per-tensor`` | ``L2 block 128x128`` | ``L3 per-tensor (weight_scale_inv)``."""
        if self.kind == L2:
            assert self.block is not None
            return f"L2 block {self.block[0]}x{self.block[1]}"
        return "L1 per-tensor" if self.kind == L1 else "L3 per-tensor (weight_scale_inv)"

    @property
    def rule(self) -> str:
        if self.kind == L2:
            assert self.block is not None
            return (
                f"quant_method fp8 with weight_block_size {list(self.block)}: {self.label} (weight_scale_inv) "
                "(FORMATS.md 7, step 3 fp8 b)"
            )
        return (
            f"quant_method fp8, no weight_block_size, {self.scale_suffix} tensors: {self.label} "
            "(FORMATS.md 7, step 3 fp8 c)"
        )


def _fp8_modules(ckpt: Checkpoint) -> dict[str, set[str]]:
    """Module -> the suffixes next to its fp8 ``weight``."""
    parts: dict[str, set[str]] = {}
    for key in ckpt.tensors:
        module, _, suffix = key.rpartition(".")
        parts.setdefault(module, set()).add(suffix)
    return {
        m: s
        for m, s in parts.items()
        if "weight" in s and ckpt.tensors[f"{m}.weight"].dtype in FP8_DTYPES  # a module has one weight
    }


def layout(ckpt: Checkpoint, config: dict) -> Layout | None:
    """The sub-layout (None: not this family). Raises when the family is declared but cannot be told apart."""
    qc, where = find_quant_config(config)
    if qc is None or not _is_fp8_method(qc):
        return None
    if qc.get("expert_dtype") == "fp4" or model_type(config).startswith("deepseek_v4"):
        return None  # DeepSeek-V4 native (FORMATS.md L11): refused by name in adjacent.py
    if all(f.startswith("consolidated") for f in ckpt.files) and (ckpt.root / "params.json").exists():
        return None  # only Mistral-native files next to an HF config: the mistral reader's
    evidence = [f"config.json {where}.quant_method={qc.get('quant_method')!r}"]
    for key in ("weight_block_size", "activation_scheme", "fmt", "scale_fmt", "kv_cache_scheme", "dequantize"):
        if key in qc:
            evidence.append(f"{key}={qc[key]!r}")
    ignore: list[str] = []
    for key in ("ignored_layers", "modules_to_not_convert"):  # vLLM reads the first, transformers the second
        entries = qc.get(key)
        if entries is None:
            continue
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            raise UnsupportedSchemeError(
                f"{where}.{key} must be a list of module names, found {entries!r}",
                where="config.json",
                hint="fix the config (transformers and vLLM read a list of module names or prefixes)",
            )
        ignore += entries
        evidence.append(f"{key}: {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}")
    summary = suffix_summary(ckpt.tensors, EVIDENCE_SUFFIXES)
    evidence.append("tensors: " + summary)
    if qc.get("kv_cache_scheme") and not any(k.endswith(tuple("." + s for s in KV_SUFFIXES)) for k in ckpt.tensors):
        evidence.append("note: kv_cache_scheme is set but no k_scale/v_scale/kv_scale tensor was found")

    scheme = qc.get("activation_scheme", "dynamic")  # transformers' default; vLLM requires the key
    if scheme not in ("static", "dynamic"):
        raise UnsupportedSchemeError(
            f"{where}.activation_scheme={scheme!r} is not supported",
            where="config.json",
            hint="the fp8 family uses 'static' (stored input scales) or 'dynamic'",
        )
    scale_fmt = qc.get("scale_fmt")
    if scale_fmt not in (None, "ue8m0"):
        raise UnsupportedSchemeError(
            f"{where}.scale_fmt={scale_fmt!r} is not a known scale format",
            where="config.json",
            hint="the fp8 family uses float scales, or scale_fmt 'ue8m0' (powers of two)",
        )
    if qc.get("fmt") not in E4M3_SPELLINGS:
        evidence.append(f"note: fmt {qc.get('fmt')!r} is not e4m3; the weight dtype is taken from the header")

    bs = qc.get("weight_block_size")
    dynamic, ue8m0 = scheme == "dynamic", scale_fmt == "ue8m0"
    if bs is not None:
        if not (isinstance(bs, list) and len(bs) == 2 and all(isinstance(v, int) and v > 0 for v in bs)):
            raise UnsupportedSchemeError(
                f"{where}.weight_block_size={bs!r}: expected null (per-tensor) or [rows, cols] of positive ints",
                where="config.json",
                hint="fix weight_block_size (DeepSeek and Qwen write [128, 128])",
            )
        evidence.append(f"sub-layout: L2 block {bs[0]}x{bs[1]} (weight_scale_inv), block size from the config")
        return Layout(
            kind=L2, where=where, block=(bs[0], bs[1]), dynamic=dynamic, ignore=ignore, ue8m0=ue8m0, evidence=evidence
        )

    fp8 = _fp8_modules(ckpt)
    with_inv = sorted(m for m, s in fp8.items() if "weight_scale_inv" in s)
    with_scale = sorted(m for m, s in fp8.items() if "weight_scale" in s)
    seen = [
        f"{len(fp8)} fp8 weight(s); {len(with_scale)} with weight_scale, {len(with_inv)} with weight_scale_inv",
        "tensors: " + (summary or "none of the family's names"),
    ]
    if with_inv and with_scale:
        raise UnsupportedSchemeError(
            "per-tensor fp8 checkpoint (no weight_block_size) uses both scale spellings: weight_scale (L1, AutoFP8) "
            f"on {with_scale[0]} and weight_scale_inv (L3, transformers/Mistral HF) on {with_inv[0]}",
            where=str(ckpt.root),
            problems=seen,
            hint="the layout is ambiguous; re-export the checkpoint with one spelling",
        )
    if not with_inv and not with_scale:
        raise UnsupportedSchemeError(
            "quant_method fp8 without weight_block_size, but no fp8 weight has a weight_scale (L1) or "
            "weight_scale_inv (L3) sibling",
            where=str(ckpt.root),
            problems=seen,
            hint="check that the safetensors files are the quantized ones (and complete); a block-quantized "
            "checkpoint needs weight_block_size in config.json",
        )
    kind = L1 if with_scale else L3
    label = "L1 per-tensor (weight_scale)" if kind == L1 else "L3 per-tensor (weight_scale_inv)"
    evidence.append(f"sub-layout: {label}, decided by the tensor names")
    return Layout(kind=kind, where=where, block=None, dynamic=dynamic, ignore=ignore, ue8m0=ue8m0, evidence=evidence)


class Fp8Reader:
    name = NAME
    description = "quant_method fp8: AutoFP8/vLLM per-tensor, DeepSeek/Qwen block (weight_scale_inv), Mistral-HF"

    def detect(self, ckpt: Checkpoint, config: dict) -> Detection | None:
        lay = layout(ckpt, config)
        if lay is None:
            return None
        return Detection(format=NAME, rule=lay.rule, evidence=lay.evidence)

    # ---- planning (headers only) -------------------------------------------------------------
    def plan(self, ckpt: Checkpoint, config: dict, detection: Detection) -> CheckpointPlan:
        lay = layout(ckpt, config)
        assert lay is not None
        if lay.kind == L2 and not lay.dynamic:
            raise UnsupportedSchemeError(
                "weight_block_size with activation_scheme 'static': block-wise fp8 checkpoints have dynamic "
                "activations only (vLLM refuses this combination too)",
                where=f"config.json {lay.where}",
                hint="set activation_scheme to 'dynamic' if the checkpoint stores no input scales",
            )

        def linears(module: str, parts: dict[str, TensorRef]) -> list[LinearPlan]:
            return [self._linear(module, parts, lay)]

        rules = LayoutRules(
            quant_suffixes=QUANT_SUFFIXES,
            linears=linears,
            fused=lambda key, tensors: self._fused(key, tensors, lay),
            ignored=lambda module: matches(module, lay.ignore, style="prefix"),
            kv_suffixes=KV_SUFFIXES,
        )
        return plan_modules(ckpt, rules, format_name=NAME, detection=detection)

    @staticmethod
    def _linear(module: str, parts: dict[str, TensorRef], lay: Layout) -> LinearPlan:
        """One linear of a module with an fp8 weight. Each error names the tensor and its shard, what was
        expected, and the fix, in its message (the pipeline lists the messages of all problems together)."""
        w = parts["weight"]
        wkey = f"{module}.weight ({w.file})"
        out_f, in_f = linear_dims(w)
        suffix, other = lay.scale_suffix, ("weight_scale_inv" if lay.kind == L1 else "weight_scale")
        inp_suffix = lay.input_suffix
        allowed = {"weight", suffix, "bias"} | ({inp_suffix} if inp_suffix else set())
        if other in parts:
            raise UnsupportedSchemeError(
                f"{module}.{other} ({parts[other].file}): this checkpoint's layout ({lay.label}) names the weight "
                f"scale {suffix}"
                + (f", and {module} has both spellings" if suffix in parts else "")
                + "; the scale is ambiguous. Fix: re-export the checkpoint with one scale spelling"
            )
        extra = sorted(set(parts) - allowed)
        if extra:
            names = ", ".join(f"{module}.{x} ({parts[x].file})" for x in extra)
            acts = "static" if inp_suffix else "dynamic"
            note = ""
            if set(extra) & {"input_scale", "activation_scale"}:
                note = (
                    f" (config.json activation_scheme is {acts!r}, which stores no input scale: config and "
                    "tensors disagree)"
                    if inp_suffix is None
                    else f" (this layout names its static input scale {inp_suffix}: mixed spellings)"
                )
            raise UnsupportedSchemeError(
                f"{names}: not a tensor of the {lay.label} layout with {acts} activations{note}; expected only "
                f"{', '.join(f'{module}.{x}' for x in sorted(allowed))}. Fix: correct activation_scheme in "
                "config.json if it is wrong, else re-export the checkpoint"
            )
        s = parts.get(suffix)
        scheme = (
            WeightScheme(granularity=Granularity.BLOCK, block=lay.block)
            if lay.block is not None
            else WeightScheme(granularity=Granularity.TENSOR)
        )
        want = scheme.scale_shape(out_f, in_f) if lay.kind == L2 else ()
        if s is None:
            raise MissingTensorError(
                f"{wkey} is {dtype_name(w.dtype)} but has no scale: expected {module}.{suffix} {list(want)} "
                f"({lay.label}). An fp8 weight is never passed through without its scale (its values would be off "
                "by the scale factor). Fix: if the download is partial, download the shard that holds the scale "
                "again (the index names it); otherwise re-export the checkpoint with its scales"
            )
        skey = f"{module}.{suffix} ({s.file})"
        if s.dtype in E8M0_DTYPES and not (lay.ue8m0 and lay.kind == L2):
            raise UnsupportedSchemeError(
                f"{skey} has dtype {dtype_name(s.dtype)} (e8m0 exponent bytes?), but config.json does not declare "
                "scale_fmt 'ue8m0' with a weight_block_size, so the encoding is unknown; expected float32, bfloat16 "
                "or float16. Fix: add scale_fmt 'ue8m0' to quantization_config if the bytes are e8m0 exponents "
                "(2**(b-127)) of a block-quantized checkpoint, else re-export the checkpoint"
            )
        if s.dtype not in (*SCALE_DTYPES, *E8M0_DTYPES):
            raise UnsupportedSchemeError(
                f"{skey} has dtype {dtype_name(s.dtype)}; expected float32, bfloat16 or float16"
                + (" (or uint8 e8m0 bytes with scale_fmt 'ue8m0')" if lay.kind == L2 else "")
                + ". Fix: re-export the checkpoint (the scale is corrupt or from another layout)"
            )
        if lay.kind == L2 and s.shape != want:
            assert lay.block is not None
            bo, bi = lay.block
            raise UnsupportedSchemeError(
                f"{skey} has shape {list(s.shape)}, but {scheme.describe()} scales (weight_block_size "
                f"{list(lay.block)} in config.json) of weight {[out_f, in_f]} must be {list(want)} = "
                f"[ceil({out_f}/{bo}), ceil({in_f}/{bi})]; the block size comes from the config and is never "
                "derived from the scale grid (FORMATS.md 2.4). Fix: correct weight_block_size in config.json if the "
                "producer used another block, else re-export the checkpoint"
            )
        if lay.kind != L2 and s.shape not in ((), (1,)):
            looks = (
                " It looks per-channel (fbgemm_fp8 / compressed-tensors store [out, 1]), not quant_method fp8."
                if s.shape in ((out_f, 1), (out_f,))
                else ""
            )
            raise UnsupportedSchemeError(
                f"{skey} has shape {list(s.shape)}, but the per-tensor {lay.label} layout (config.json has no "
                f"weight_block_size) stores one scalar scale, [] or [1], for weight {[out_f, in_f]}.{looks} Fix: if "
                "the checkpoint is block-quantized, config.json lost its weight_block_size: add the producer's "
                "block (e.g. [128, 128]); else check quant_method or re-export the checkpoint"
            )
        inp = None
        if inp_suffix is not None:  # a dynamic layout's stray input scale is refused above, as an extra tensor
            inp = static_input_scale(
                module,
                inp_suffix,
                parts.get(inp_suffix),
                static=True,
                says="config.json activation_scheme is 'static'",
                weight=w,
                missing=f" for {wkey}: config.json activation_scheme is 'static', which stores one input scale [] "
                "per quantized linear. Fix: if the download is partial, download it again; if the checkpoint was "
                "exported with dynamic activations, set activation_scheme to 'dynamic' in config.json",
                expected="a static per-tensor input scale is [] or [1] in float32, bfloat16 or float16. Fix: "
                "re-export the checkpoint",
            )
        bias = check_bias(parts, (out_f,), fix=". Fix: re-export the checkpoint")
        if lay.kind == L2:
            act = ActScheme.DYNAMIC_GROUP  # per token and block-wide group of input channels, at run time
        else:
            act = ActScheme.DYNAMIC_TENSOR if lay.dynamic else ActScheme.STATIC_TENSOR
        return LinearPlan(
            module=module, weight=w, weight_scale=s, scheme=scheme, activation=act, input_scale=inp, bias=bias
        )

    @staticmethod
    def _fused(key: str, tensors: dict[str, TensorRef], lay: Layout) -> list[LinearPlan]:
        """Per-expert linears of a fused ``experts.gate_up_proj [E, 2I, H]`` / ``experts.down_proj [E, H, I]``
        (transformers >= 5 naming, scales ``{key}_scale_inv`` / ``{key}_scale`` per expert)."""
        w = tensors[key]
        m = FUSED_EXPERTS.match(key)
        if m is None:
            raise UnsupportedSchemeError(
                f"{key} ({w.file}): a fused 3-D fp8 tensor that is not experts.gate_up_proj / experts.down_proj; "
                "only those are split into per-expert linears. Fix: export per-expert weights"
            )
        n, out_f, in_f = w.shape
        stem = key.removesuffix(".weight")
        # transformers 5 names the scale of experts.gate_up_proj "gate_up_proj_scale_inv" (weight_ dropped)
        names = [f"{stem}_{lay.scale_suffix.removeprefix('weight_')}", f"{stem}_{lay.scale_suffix}"]
        found = [n for n in names if n in tensors]
        if not found:
            raise MissingTensorError(
                f"{key} ({w.file}) is a fused fp8 experts tensor with no scale (looked for {' and '.join(names)}). "
                "Fix: if the download is partial, download it again"
            )
        s = tensors[found[0]]
        if not lay.dynamic:
            raise UnsupportedSchemeError(
                f"{key} ({w.file}): fused experts with static activation scales are not supported. Fix: export "
                "per-expert weights"
            )
        if lay.block is not None:
            scheme = WeightScheme(granularity=Granularity.BLOCK, block=lay.block)
            want: tuple[tuple[int, ...], ...] = ((n, *scheme.scale_shape(out_f, in_f)),)
        else:
            scheme = WeightScheme(granularity=Granularity.TENSOR)
            want = ((), (n,), (n, 1), (n, 1, 1))
        if s.shape not in want or s.dtype not in SCALE_DTYPES:
            raise UnsupportedSchemeError(
                f"{s.key} ({s.file}) is {dtype_name(s.dtype)} {list(s.shape)}; for fused experts "
                f"{list(w.shape)} ({lay.label}) it must be one of {[list(x) for x in want]} in float32, bfloat16 "
                "or float16. Fix: re-export the checkpoint"
            )
        act = ActScheme.DYNAMIC_GROUP if lay.kind == L2 else ActScheme.DYNAMIC_TENSOR
        if m["proj"] == "gate_up_proj" and (out_f % 2 or (lay.block is not None and (out_f // 2) % lay.block[0])):
            raise UnsupportedSchemeError(
                f"{key} ({w.file}): gate_up rows {out_f} do not split into gate and up at a scale-block "
                f"boundary (block {lay.block}). Fix: export per-expert weights"
            )
        return expert_linears(m["parent"], m["proj"], n, out_f, weight=w, weight_scale=s, scheme=scheme, activation=act)

    # ---- reading -------------------------------------------------------------------------------
    def read_linear(self, ckpt: Checkpoint, linear: LinearPlan) -> QuantizedLinear:
        """The stored scale is the multiplier in all three layouts; e8m0 bytes are decoded to ``2**(b-127)``
        (255 is NaN, which the value checks report)."""
        if linear.weight_scale.dtype in E8M0_DTYPES:
            return read_linear_default(ckpt, linear, scale=decode_e8m0(ckpt.load(linear.weight_scale.key)))
        return read_linear_default(ckpt, linear)


FUSED_EXPERTS = re.compile(r"^(?P<parent>.+\.experts)\.(?P<proj>gate_up_proj|down_proj)(?:\.weight)?$")


def decode_e8m0(raw: torch.Tensor) -> torch.Tensor:
    """fp32 values of e8m0 scales stored as U8 bytes or float8_e8m0fnu: ``2**(b-127)``, byte 255 -> NaN."""
    b = raw.view(torch.uint8).to(torch.int32)
    return torch.where(b == 255, torch.nan, torch.ldexp(torch.ones(b.shape), b - 127))


register(Fp8Reader())
