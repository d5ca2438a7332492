"""Reader for NVIDIA TensorRT Model Optimizer (ModelOpt) FP8 checkpoints (FORMATS.md L7).

Detected from ``config.json`` ``quantization_config.quant_method`` starting with ``modelopt`` (ModelOpt >= 0.31,
which also writes compressed-tensors-like ``config_groups``: the ``quant_method`` decides), or, when config.json
has no quantization block, from ``hf_quant_config.json`` with ``producer.name == "modelopt"`` (older exports) or
with a ``quantization.quant_algo`` and no ``producer`` at all (Tencent AngelSlim exports).

``quant_algo`` (upper-cased, as vLLM does):

- ``FP8``: weight ``[out, in]`` e4m3fn, ``weight_scale`` f32 ``[]``, static ``input_scale`` f32 ``[]``;
- ``FP8_PER_CHANNEL_PER_TOKEN``: ``weight_scale`` ``[out]``, dynamic per-token activations;
- ``FP8_PB_WO`` (alias ``FP8_BLOCK_SCALES``): ``weight_scale`` 4-D ``[ceil(out/128), 1, in/128, 1]``, weight only;
- ``MIXED_PRECISION``: one of the above per layer, from ``quantization.quantized_layers``.

Anything else (NVFP4, W4A8_AWQ, W4A16_AWQ, MXFP8, INT8...) is refused with the algorithm named. KV-cache scales
``self_attn.k_proj.k_scale`` / ``self_attn.v_proj.v_scale`` (amax/448 clamped >= 1) are listed and dropped.

MoE: per-expert linears convert like any linear. Fused (bmm-style) experts -- ``<p>.experts.gate_up_proj`` and
``<p>.experts.down_proj`` with the scales in *underscore-joined* siblings ``<p>.experts.gate_up_proj_weight_scale``,
``..._input_scale`` (the names vLLM's mllama4 loader maps) -- are split into per-expert linears
``<p>.experts.{e}.gate_proj`` / ``up_proj`` / ``down_proj``. ModelOpt keeps the HF bmm layout ``[E, in, out]``
for FP8 (it transposes only temporarily, for NVFP4 and FP8_PC_PT); ``[E, out, in]`` (transformers 5 fused experts)
is read too; ``config.hidden_size`` tells the two apart.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

from fp8convert.errors import CheckpointError, MissingTensorError, UnsupportedSchemeError
from fp8convert.formats import register
from fp8convert.formats.base import (
    Detection,
    LayoutRules,
    check_bias,
    check_scale_dtype,
    expert_linears,
    find_quant_config,
    matches,
    model_type,
    plan_modules,
    read_linear_default,
    required_scale,
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

NAME = "modelopt"
HF_QUANT_CONFIG = "hf_quant_config.json"
FP8 = "FP8"
PCPT = "FP8_PER_CHANNEL_PER_TOKEN"
PB_WO = "FP8_PB_WO"
ALIASES = {"FP8_BLOCK_SCALES": PB_WO}
FP8_ALGOS = (FP8, PCPT, PB_WO)
MIXED = "MIXED_PRECISION"
BLOCK = 128
SCALE_DTYPE_NAMES = "f32 (ModelOpt), bf16 or f16"  # base.SCALE_DTYPES, as the messages name them
KV_SUFFIXES = {"k_proj.k_scale": "k", "v_proj.v_scale": "v"}
FORBIDDEN_SUFFIXES = {
    "weight_scale_2": "two-level scales (NVFP4 / W4A8): not an FP8 weight format, not supported",
    "pre_quant_scale": "AWQ / SmoothQuant pre-quantization scale: not a plain FP8 checkpoint, not supported",
    "k_bias": "affine KV-cache quantization (NVFP4_AFFINE) is not supported",
    "v_bias": "affine KV-cache quantization (NVFP4_AFFINE) is not supported",
}
#: fused-expert tensors: ``<p>.experts.gate_up_proj`` + ``_weight_scale`` / ``_input_scale`` / ``_bias`` siblings
FUSED_KEY = re.compile(r"^(?P<base>.+\.experts\.(?:gate_up_proj|down_proj))(?P<suffix>_[a-z_0-9]+)?$")
FUSED_SUFFIXES = {"": "weight", "_weight_scale": "weight_scale", "_input_scale": "input_scale", "_bias": "bias"}
FUSED_SUFFIXES |= {f"_{s}": s for s in FORBIDDEN_SUFFIXES}
FUSED = ("gate_up_proj", "down_proj")
#: tensor suffixes counted in the detection evidence
EVIDENCE_SUFFIXES = frozenset(
    ("weight", "weight_scale", "input_scale", "k_scale", "v_scale")
    + tuple(f"{p}{x}" for p in FUSED for x in ("", "_weight_scale", "_input_scale"))
)
SUPPORTED_HINT = (
    "fp8convert converts ModelOpt FP8, FP8_PER_CHANNEL_PER_TOKEN and FP8_PB_WO (FP8_BLOCK_SCALES) checkpoints, "
    "and MIXED_PRECISION ones whose layers all use those; export the model with one of them"
)


def _producer(block: dict) -> str | None:
    p = block.get("producer")
    return str(p.get("name")) if isinstance(p, dict) else None


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """The quantization settings of a ModelOpt checkpoint, from whichever config file holds them."""

    algo: str
    where: str
    exclude: list[str] = field(default_factory=list)
    layers: dict[str, str] = field(default_factory=dict)  # MIXED_PRECISION: module -> algo

    def algo_for(self, module: str) -> str | None:
        """The algorithm of a module (MIXED_PRECISION: the entry of the module or of its nearest parent)."""
        if self.algo != MIXED:
            return self.algo
        name = module
        while name:
            if name in self.layers:
                return self.layers[name]
            name = name.rpartition(".")[0]
        return None


def _settings_of(block: dict, where: str) -> Settings:
    """Read one config block: the legacy ``{"quantization": {...}}`` form or the config.json form."""
    q = block.get("quantization")
    if isinstance(q, dict):  # hf_quant_config.json (or a config that embeds it)
        exclude, layers, algo = q.get("exclude_modules"), q.get("quantized_layers"), q.get("quant_algo")
        where = f"{where}.quantization"
    else:  # config.json quantization_config written by convert_hf_quant_config_format
        exclude = block.get("ignore", block.get("exclude_modules"))
        layers = block.get("quantized_layers")
        algo = block.get("quant_algo")
    if not algo:
        raise UnsupportedSchemeError(
            "the ModelOpt config has no quant_algo", where=where, hint="re-export the checkpoint with ModelOpt"
        )
    if exclude is not None and not (isinstance(exclude, list) and all(isinstance(e, str) for e in exclude)):
        raise UnsupportedSchemeError(f"exclude_modules must be a list of names, found {exclude!r}", where=where)
    algo = str(algo).upper()
    parsed: dict[str, str] = {}
    if isinstance(layers, dict):
        for name, cfg in layers.items():
            a = cfg.get("quant_algo") if isinstance(cfg, dict) else cfg
            parsed[str(name)] = ALIASES.get(str(a).upper(), str(a).upper())
    return Settings(
        algo=ALIASES.get(algo, algo),
        where=where,
        exclude=list(exclude or []),
        layers=parsed,
    )


def _check_algos(s: Settings) -> None:
    """Refuse every algorithm that is not an FP8 weight format, naming it."""
    if s.algo == MIXED:
        if not s.layers:
            raise UnsupportedSchemeError(
                "quant_algo is MIXED_PRECISION but no quantized_layers map was found",
                where=s.where,
                hint=f"keep {HF_QUANT_CONFIG} (it lists the algorithm of each layer) next to config.json",
            )
        bad = sorted(f"{m}: {a}" for m, a in s.layers.items() if a not in FP8_ALGOS)
        if bad:
            raise UnsupportedSchemeError(
                f"MIXED_PRECISION checkpoint with {len(bad)} layer(s) in a non-FP8 algorithm",
                where=s.where,
                problems=bad,
                hint=SUPPORTED_HINT,
            )
        return
    if s.algo in FP8_ALGOS:
        return
    why = {
        "MXFP8": "MXFP8 (e8m0 group-32 scales, FORMATS.md L10) is not supported",
        "NVFP4": "NVFP4 stores 4-bit weights, not FP8",
        "NVFP4_AWQ": "NVFP4 stores 4-bit weights, not FP8",
        "W4A8_AWQ": "W4A8_AWQ stores int4 weights (fp8 activations only), not FP8 weights",
        "W4A16_AWQ": "W4A16_AWQ stores int4 weights, not FP8",
    }.get(s.algo, "it is not an FP8 weight format")
    raise UnsupportedSchemeError(
        f"ModelOpt quant_algo {s.algo!r} is not supported: {why}", where=s.where, hint=SUPPORTED_HINT
    )


def _hidden_size(config: dict) -> int | None:
    for c in (config, config.get("text_config") or {}):
        if isinstance(c.get("hidden_size"), int):
            return int(c["hidden_size"])
    return None


def kv_suffixes(tensors: dict[str, TensorRef]) -> dict[str, str]:
    """``<attn>.k_proj.k_scale`` -> ``"k"`` for each attention module name found (``self_attn`` in HF models):
    ``plan_modules`` files a KV scale under the suffix's first component, which must be the attention module."""
    found = {}
    for key in tensors:
        for suffix, kind in KV_SUFFIXES.items():
            parts = key.split(".")
            if key.endswith("." + suffix) and len(parts) > 3:
                found[f"{parts[-3]}.{suffix}"] = kind
    return found or {f"self_attn.{s}": k for s, k in KV_SUFFIXES.items()}


def fused_aliases(tensors: dict[str, TensorRef]) -> dict[str, TensorRef]:
    """The header with fused-expert tensors renamed the way ``plan_modules`` groups tensors:
    ``<p>.experts.gate_up_proj`` -> ``<p>.experts.gate_up_proj.weight``, ``..._weight_scale`` -> ``.weight_scale``...
    The refs keep their real keys, so everything read or copied uses the names on disk."""
    out: dict[str, TensorRef] = {}
    for key, ref in tensors.items():
        m = FUSED_KEY.match(key)
        suffix = (m.group("suffix") or "") if m else None
        if m and suffix in FUSED_SUFFIXES:
            out[f"{m.group('base')}.{FUSED_SUFFIXES[suffix]}"] = ref
        else:
            out[key] = ref
    return out


class ModelOptReader:
    name = NAME
    description = "NVIDIA ModelOpt (FP8, FP8_PER_CHANNEL_PER_TOKEN, FP8_PB_WO, MIXED_PRECISION of those)"

    def _find(self, ckpt: Checkpoint, config: dict) -> tuple[dict, str, str] | None:
        """(config block, where, rule) when the checkpoint is a ModelOpt export."""
        qc, where = find_quant_config(config)
        if qc is not None:
            method = str(qc.get("quant_method", "")).lower()
            if method.startswith("modelopt"):
                return qc, f"config.json {where}", "quant_method starts with modelopt (FORMATS.md 7, step 3)"
            if not method and _producer(qc) == "modelopt":
                return qc, f"config.json {where}", "no quant_method, producer.name is modelopt (FORMATS.md 7, step 3)"
            return None
        path = ckpt.root / HF_QUANT_CONFIG
        if not path.is_file():
            return None
        hq = read_json(path, what=HF_QUANT_CONFIG)
        quant = hq.get("quantization")
        if _producer(hq) == "modelopt":
            return hq, HF_QUANT_CONFIG, f"{HF_QUANT_CONFIG} producer.name is modelopt (legacy ModelOpt, FORMATS.md 7)"
        if "producer" not in hq and isinstance(quant, dict) and quant.get("quant_algo"):
            return (
                hq,
                HF_QUANT_CONFIG,
                (
                    f"{HF_QUANT_CONFIG} has quantization.quant_algo and no producer (AngelSlim export in the ModelOpt "
                    "layout, FORMATS.md 12)"
                ),
            )
        return None

    def detect(self, ckpt: Checkpoint, config: dict) -> Detection | None:
        found = self._find(ckpt, config)
        if found is None:
            return None
        block, where, rule = found
        nested = block.get("quantization")
        q: dict = nested if isinstance(nested, dict) else block
        evidence = [
            f"{where}.quant_method={block.get('quant_method')!r}" if "quant_method" in block else where,
            f"producer={block.get('producer')!r}",
            f"quant_algo={q.get('quant_algo')!r}",
            f"kv_cache_quant_algo={q.get('kv_cache_quant_algo', q.get('kv_cache_scheme'))!r}",
        ]
        if "config_groups" in block:
            evidence.append("config_groups present but ignored: quant_method decides (FORMATS.md 7, step 3)")
        if (ckpt.root / HF_QUANT_CONFIG).is_file() and where != HF_QUANT_CONFIG:
            evidence.append(f"{HF_QUANT_CONFIG} present")
        evidence.append("tensors: " + suffix_summary(ckpt.tensors, EVIDENCE_SUFFIXES))
        return Detection(format=NAME, rule=rule, evidence=evidence)

    def settings(self, ckpt: Checkpoint, config: dict) -> Settings:
        """The validated settings; the legacy file wins for the details when both files are present."""
        found = self._find(ckpt, config)
        if found is None:
            raise CheckpointError("not a ModelOpt checkpoint", where=str(ckpt.root))
        block, where, _ = found
        s = _settings_of(block, where)
        path = ckpt.root / HF_QUANT_CONFIG
        if where != HF_QUANT_CONFIG and path.is_file():
            legacy = read_json(path, what=HF_QUANT_CONFIG)
            if isinstance(legacy.get("quantization"), dict):
                full = _settings_of(legacy, HF_QUANT_CONFIG)
                if full.algo != s.algo:
                    raise UnsupportedSchemeError(
                        f"config.json says quant_algo {s.algo!r} but {HF_QUANT_CONFIG} says {full.algo!r}",
                        where=str(ckpt.root),
                        hint="the two files come from different exports: download the checkpoint again",
                    )
                s = full
        _check_algos(s)
        return s

    # ---- planning (headers only) -------------------------------------------------------------
    def plan(self, ckpt: Checkpoint, config: dict, detection: Detection) -> CheckpointPlan:
        s = self.settings(ckpt, config)
        hidden = _hidden_size(config)
        mtype = model_type(config)

        def linears(module: str, parts: dict[str, TensorRef]) -> list[LinearPlan]:
            w = parts["weight"]
            algo = s.algo_for(module)
            if algo is None:
                raise UnsupportedSchemeError(
                    f"{w.key} ({w.file}) is {dtype_name(w.dtype)} but MIXED_PRECISION quantized_layers does not "
                    f"list {module} (config and tensors disagree)"
                )
            if len(w.shape) == 3 and module.endswith((".experts.gate_up_proj", ".experts.down_proj")):
                return self._fused(module, parts, algo, hidden, mtype)
            if len(w.shape) != 2:
                raise UnsupportedSchemeError(
                    f"{w.key} ({w.file}): fp8 weight of shape {list(w.shape)}; expected a 2-D [out, in] linear "
                    "or fused experts named experts.gate_up_proj / experts.down_proj"
                )
            return [_linear(module, parts, algo)]

        rules = LayoutRules(
            quant_suffixes=("weight_scale", "input_scale"),
            linears=linears,
            ignored=lambda module: matches(module, s.exclude, style="fnmatch"),
            kv_suffixes=kv_suffixes(ckpt.tensors),
            forbidden_suffixes=FORBIDDEN_SUFFIXES,
        )
        view = copy.copy(ckpt)  # same files; fused-expert names grouped per module (see fused_aliases)
        view.tensors = fused_aliases(ckpt.tensors)
        return plan_modules(view, rules, format_name=NAME, detection=detection)

    @staticmethod
    def _fused(
        module: str, parts: dict[str, TensorRef], algo: str, hidden: int | None, model_type: str
    ) -> list[LinearPlan]:
        """Per-expert linears of a fused ``experts.gate_up_proj`` ``[E, H, 2I]`` / ``experts.down_proj``
        ``[E, I, H]`` (bmm layout ``[E, in, out]``) or of the ``[E, out, in]`` layout."""
        w = parts["weight"]
        experts, _, proj = module.rpartition(".")
        where = f"{w.key} ({w.file})"
        if model_type.startswith("gpt_oss"):
            raise UnsupportedSchemeError(
                f"{where}: gpt-oss interleaves the gate and up columns of gate_up_proj; splitting them is not supported"
            )
        if algo == PB_WO:
            raise UnsupportedSchemeError(f"{where}: block-scaled (FP8_PB_WO) fused experts are not supported")
        if hidden is None:
            raise UnsupportedSchemeError(f"{where}: fused experts need config.json hidden_size to tell [in,out] apart")
        n, a, b = w.shape
        # gate_up_proj takes the hidden state in; down_proj gives it out
        bmm = (a == hidden) if proj == "gate_up_proj" else (b == hidden)
        std = (b == hidden) if proj == "gate_up_proj" else (a == hidden)
        if bmm == std:
            raise UnsupportedSchemeError(
                f"{where} has shape {list(w.shape)}; with hidden_size {hidden} it is neither [E, in, out] nor "
                "[E, out, in] (or it is both: square experts cannot be told apart)"
            )
        out_f = b if bmm else a
        if proj == "gate_up_proj" and out_f % 2:
            raise UnsupportedSchemeError(f"{where}: gate_up_proj has an odd number of outputs ({out_f})")
        s = required_scale(
            parts, "weight_scale", w, looked=f"{w.key}_weight_scale; quant_algo {algo}", expected=SCALE_DTYPE_NAMES
        )
        per_expert = {(), (1,), (n,), (n, 1), (n, 1, 1)}
        if algo == PCPT and s.shape in {(n, out_f), (n, out_f, 1)}:
            scheme = WeightScheme(granularity=Granularity.CHANNEL)
        elif s.shape in per_expert:  # FP8, or PCPT exported with one scale per expert
            scheme = WeightScheme(granularity=Granularity.TENSOR)
        else:
            want = f"[], [{n}] or [{n}, 1, 1]" + (f", or [{n}, {out_f}]" if algo == PCPT else "")
            raise UnsupportedSchemeError(
                f"{s.key} ({s.file}) has shape {list(s.shape)}; {algo} scales of fused experts {list(w.shape)} "
                f"must be {want}"
            )
        act, inp = _activation(module, parts, algo, per_expert, where=where, fused=True)
        bias = check_bias(parts, (n, out_f))
        return expert_linears(
            experts,
            proj,
            n,
            out_f,
            weight=w,
            weight_scale=s,
            scheme=scheme,
            activation=act,
            input_scale=inp,
            bias=bias,
            transposed=bmm,
        )

    # ---- reading -------------------------------------------------------------------------------
    def read_linear(self, ckpt: Checkpoint, linear: LinearPlan) -> QuantizedLinear:
        if linear.scheme.granularity is Granularity.BLOCK and len(linear.weight_scale.shape) == 4:
            grid = ckpt.load(linear.weight_scale.key)  # [ceil(out/128), 1, in/128, 1] -> [ceil(out/128), in/128]
            return read_linear_default(ckpt, linear, scale=grid[:, 0, :, 0])
        return read_linear_default(ckpt, linear)


def _activation(
    module: str, parts: dict[str, TensorRef], algo: str, shapes: set[tuple[int, ...]], *, where: str, fused: bool
) -> tuple[ActScheme, TensorRef | None]:
    """FP8: static per-tensor ``input_scale`` required; PCPT: dynamic per-token; PB_WO: weight only."""
    inp = parts.get("input_scale")
    act = {FP8: ActScheme.STATIC_TENSOR, PCPT: ActScheme.DYNAMIC_TOKEN, PB_WO: ActScheme.NONE}[algo]
    if act is ActScheme.STATIC_TENSOR:
        if inp is None:
            looked = f"{parts['weight'].key}_input_scale" if fused else f"{module}.input_scale"
            raise MissingTensorError(
                f"{where} has no input scale (looked for {looked}), but quant_algo {algo} has static per-tensor "
                "input activations; if the download is partial, download it again"
            )
        check_scale_dtype(inp, expected=SCALE_DTYPE_NAMES)
        if inp.shape not in shapes:
            raise UnsupportedSchemeError(
                f"{inp.key} ({inp.file}) has shape {list(inp.shape)}; a static per-tensor input scale must be "
                f"one value{' (or one per expert)' if fused else ''}"
            )
        return act, inp
    if inp is not None:
        raise UnsupportedSchemeError(
            f"{inp.key} ({inp.file}) is present, but quant_algo {algo} has {act} input activations (config and "
            "tensors disagree)"
        )
    return act, None


def _linear(module: str, parts: dict[str, TensorRef], algo: str) -> LinearPlan:
    w = parts["weight"]
    where = f"{w.key} ({w.file})"
    out_f, in_f = w.shape
    s = required_scale(
        parts,
        "weight_scale",
        w,
        looked=f"{module}.weight_scale; quant_algo {algo}",
        keep_in="exclude_modules",
        expected=SCALE_DTYPE_NAMES,
    )
    rows_b = -(-out_f // BLOCK)
    if algo == FP8:
        scheme, allowed, want = WeightScheme(granularity=Granularity.TENSOR), {(), (1,)}, "[] (one value)"
    elif algo == PCPT:
        scheme, allowed, want = WeightScheme(granularity=Granularity.CHANNEL), {(out_f,), (out_f, 1)}, f"[{out_f}]"
    else:
        if in_f % BLOCK:
            raise UnsupportedSchemeError(
                f"{where} has in_features {in_f}, not a multiple of {BLOCK}: FP8_PB_WO scales are "
                f"[ceil(out/{BLOCK}), 1, in/{BLOCK}, 1] and vLLM refuses such layers too; re-export with this layer "
                "in exclude_modules"
            )
        scheme = WeightScheme(granularity=Granularity.BLOCK, block=(BLOCK, BLOCK))
        allowed = {(rows_b, 1, in_f // BLOCK, 1), (rows_b, in_f // BLOCK)}
        want = f"[{rows_b}, 1, {in_f // BLOCK}, 1]"
    if s.shape not in allowed:
        raise UnsupportedSchemeError(
            f"{s.key} ({s.file}) has shape {list(s.shape)}, but {algo} scales for weight {[out_f, in_f]} must be {want}"
        )
    act, inp = _activation(module, parts, algo, {(), (1,)}, where=where, fused=False)
    bias = check_bias(parts, (out_f,))
    return LinearPlan(
        module=module, weight=w, weight_scale=s, scheme=scheme, activation=act, input_scale=inp, bias=bias
    )


register(ModelOptReader())
