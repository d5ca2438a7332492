"""The CPU runtime: ``FakeQuantLinear``, ``swap_linears`` and ``load_cpu_model``.

``FakeQuantLinear`` holds an e4m3fn weight with its scale and computes, with plain torch ops, what
fms-model-optimizer's ``FP8Linear`` computes on CPU (AIU_TARGET.md "CPU fallback semantics, bit-exact"):

- ``fallback`` (default): the fms-model-optimizer PR #200 fallback, ``F.linear`` on activations and
  weights dequantized into the weight-scale dtype. Equal, bit for bit, to released fms-mo 0.8.2-0.8.7
  whenever the scale dtype is the activation dtype (the AIU artifact: bf16/bf16).
- ``fms-mo``: the released 0.8.2-0.8.7 CPU path exactly (torchao quantization + fms-mo's ``_scaled_mm``
  override): weights dequantized into the activation dtype, ``torch.addmm``/``torch.mm`` in that dtype.
- ``hardware``: exact fp8 products accumulated in fp32, scales applied after, one rounding to the
  activation dtype (closest to FP8 tensor cores, NUMERICS.md).

Activations are quantized the same way in all three: the amax is taken in the activation dtype, the
scale ``amax / 448`` is evaluated in that dtype and clamped at ``2**-23``, and the codes are
``e4m3fn(clamp(fp32(x) * reciprocal(scale), +-448))``. Bit-exactness holds for one torch build and CPU
ISA: the matmuls are the same torch ops on the same dtypes and layouts as fms-mo's, on the whole weight.

Speed and memory (fp8convert.dequant): weights stay e4m3fn buffers (one byte per parameter). Each call
dequantizes the weight with vectorized integer/float ops into a per-thread workspace shared by all layers,
and quantizes activations without torch's element-by-element fp8 casts, both bit-identical to the formulas
above. ``cache_dequantized=True`` keeps each layer's dequantized weight instead (2-4 more bytes per parameter).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fp8convert.dequant import WeightState, dequantize_weight, fake_quantize_activation, workspace
from fp8convert.dequant import quantize_activation as quantize_activation  # re-exported: the reference quantizer
from fp8convert.errors import CheckpointError, Fp8ConvertError
from fp8convert.spec import CPU_PLAN_NAME, ActScheme, Granularity, Numerics

logger = logging.getLogger(__name__)


class FakeQuantLinear(nn.Module):
    """A linear layer with an fp8 e4m3fn weight, computed on CPU the way fms-model-optimizer does.

    Buffers: ``weight`` ``[out, in]`` e4m3fn; ``weight_scale`` ``[out, 1]`` (channel) or ``[1]`` (tensor),
    bf16 in an AIU artifact; ``input_scale`` ``[1]`` for static per-tensor activations; ``bias`` ``[out]``.
    The output has the dtype of the input.
    """

    weight: torch.Tensor
    weight_scale: torch.Tensor
    input_scale: torch.Tensor | None
    bias: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = False,
        weight_granularity: Granularity = Granularity.CHANNEL,
        activation: ActScheme = ActScheme.DYNAMIC_TOKEN,
        numerics: Numerics = Numerics.FALLBACK,
        scale_dtype: torch.dtype = torch.bfloat16,
        cache_dequantized: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if weight_granularity not in (Granularity.CHANNEL, Granularity.TENSOR):
            raise ValueError(f"FakeQuantLinear runs channel or tensor weights, not {weight_granularity}")
        if activation not in (
            ActScheme.NONE,
            ActScheme.STATIC_TENSOR,
            ActScheme.DYNAMIC_TENSOR,
            ActScheme.DYNAMIC_TOKEN,
        ):
            raise ValueError(f"FakeQuantLinear does not run {activation} activations")
        self.in_features, self.out_features = in_features, out_features
        self.weight_granularity = Granularity(weight_granularity)
        self.activation = ActScheme(activation)
        self.numerics = Numerics(numerics)
        self.cache_dequantized = cache_dequantized
        self._state = WeightState()  # NaN-code check and cached dequantized weight, tied to the tensors
        scale_shape = (out_features, 1) if self.weight_granularity is Granularity.CHANNEL else (1,)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.float8_e4m3fn, device=device))
        self.register_buffer("weight_scale", torch.ones(scale_shape, dtype=scale_dtype, device=device))
        if self.activation is ActScheme.STATIC_TENSOR:
            self.register_buffer("input_scale", torch.ones(1, dtype=scale_dtype, device=device))
        else:
            self.input_scale = None
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=scale_dtype, device=device))
        else:
            self.bias = None

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"weight={self.weight_granularity}, activation={self.activation}, numerics={self.numerics}"
        )

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        self._state.clear()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---- weight dequantization ----------------------------------------------------------------
    def _scale_rows(self) -> torch.Tensor:
        """fp32 weight scale broadcastable against ``[out, in]``."""
        s = self.weight_scale.to(torch.float32)
        return s.reshape(-1, 1) if self.weight_granularity is Granularity.CHANNEL else s.reshape(1, 1)

    def _scale(self) -> torch.Tensor:
        """The weight scale in its own dtype: ``[out, 1]`` or ``[1]``."""
        channel = self.weight_granularity is Granularity.CHANNEL
        return self.weight_scale.reshape(-1, 1) if channel else self.weight_scale

    def _refreshed_state(self) -> WeightState:
        self._state.refresh(self.weight, self.weight_scale)
        return self._state

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """``round_dtype(fp32(weight) * fp32(weight_scale))``, ``[out, in]`` contiguous, owned by the caller
        (the module's cached copy when ``cache_dequantized``)."""
        state = self._refreshed_state()
        if state.cache is not None and state.cache[0] == dtype:
            return state.cache[1]
        w = dequantize_weight(self.weight, self._scale(), dtype, state=state)
        if self.cache_dequantized:
            state.cache = (dtype, w)
        return w

    def _weight_for(self, dtype: torch.dtype, x: torch.Tensor, *, scaled: bool = True) -> torch.Tensor:
        """The dequantized weight for one forward: the cached copy, or this thread's reused workspace (a new
        tensor when autograd would keep it). ``scaled=False``: the codes' own values (hardware numerics)."""
        state = self._refreshed_state()
        if scaled and (self.cache_dequantized or (state.cache is not None and state.cache[0] == dtype)):
            return self.dequantized_weight(dtype)
        keep = torch.is_grad_enabled() and x.requires_grad
        out = None if keep or self.weight.device.type != "cpu" else workspace(self.weight.numel(), dtype)
        out = None if out is None else out.view(self.out_features, self.in_features)
        return dequantize_weight(self.weight, self._scale() if scaled else None, dtype, out=out, state=state)

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation is ActScheme.NONE:
            return self._weight_only(x)
        if self.numerics is Numerics.HARDWARE:
            return self._hardware(x)
        if self.numerics is Numerics.FMS_MO:
            return self._fms_mo(x)
        return self._fallback(x)

    def _weight_only(self, x: torch.Tensor) -> torch.Tensor:
        """fms-mo's weight-only path: ``F.linear(x.to(ws.dtype), dequant(w), bias).to(x.dtype)``."""
        wd = self.weight_scale.dtype if self.numerics is not Numerics.HARDWARE else torch.float32
        bias = None if self.bias is None else self.bias.to(wd)
        return F.linear(x.to(wd), self._weight_for(wd, x), bias).to(x.dtype)

    def _fms_mo(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        x_dq, _ = fake_quantize_activation(x, self.activation, self.input_scale, dtype=dt)
        w_t = self._weight_for(dt, x).T  # [K, N] column-major view, as torchao passes w.T
        if self.bias is None:
            out = torch.mm(x_dq, w_t)
        elif dt == torch.float32:
            out = torch.mm(x_dq, w_t)
            out += self.bias
        else:
            out = torch.addmm(self.bias.to(dt), x_dq, w_t)
        return out.reshape(*x.shape[:-1], self.out_features)

    def _fallback(self, x: torch.Tensor) -> torch.Tensor:
        dt, wd = x.dtype, self.weight_scale.dtype
        x_dq, _ = fake_quantize_activation(x, self.activation, self.input_scale, dtype=dt)
        x_dq = x_dq.reshape(x.shape)
        bias = None if self.bias is None else self.bias.to(wd)
        return F.linear(x_dq.to(wd), self._weight_for(wd, x), bias).to(dt)

    def _hardware(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        values, s = fake_quantize_activation(x, self.activation, self.input_scale)
        acc = torch.mm(values, self._weight_for(torch.float32, x, scaled=False).T)
        sx = s.reshape(-1, 1) if self.activation is ActScheme.DYNAMIC_TOKEN else s.reshape(1, 1)
        out = acc * (sx * self._scale_rows().reshape(1, -1))
        if self.bias is not None:
            out = out + self.bias.to(torch.float32)
        return out.to(dt).reshape(*x.shape[:-1], self.out_features)


# ---- whole models ----------------------------------------------------------------------------------
def read_cpu_plan(path: Path) -> dict[str, Any]:
    """Read ``fp8convert.json`` from a CPU variant directory."""
    plan_path = Path(path) / CPU_PLAN_NAME
    try:
        plan = json.loads(plan_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(
            f"{CPU_PLAN_NAME} not found",
            where=str(path),
            hint="point at the cpu/ directory written by `fp8convert convert --target cpu`",
        ) from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{CPU_PLAN_NAME} is not valid JSON ({exc})", where=str(plan_path)) from exc
    if plan.get("format_version") != 1 or not isinstance(plan.get("modules"), dict):
        raise CheckpointError(
            f"{CPU_PLAN_NAME} has an unknown layout (format_version {plan.get('format_version')!r})",
            where=str(plan_path),
            hint="convert the model again with this fp8convert version",
        )
    return plan


def _from_spec(
    spec: dict[str, Any],
    in_features: int,
    out_features: int,
    numerics: Numerics | str,
    cache_dequantized: bool,
    device: Any,
) -> FakeQuantLinear:
    """An empty FakeQuantLinear for one module entry of ``fp8convert.json``."""
    return FakeQuantLinear(
        in_features,
        out_features,
        bias=bool(spec.get("bias")),
        weight_granularity=Granularity(spec["weight"]),
        activation=ActScheme(spec["activation"]),
        numerics=Numerics(numerics),
        cache_dequantized=cache_dequantized,
        device=device,
    )


def swap_linears(
    model: nn.Module,
    plan: dict[str, Any],
    *,
    numerics: Numerics | str = Numerics.FALLBACK,
    cache_dequantized: bool = False,
) -> list[str]:
    """Replace the ``nn.Linear`` modules named in ``plan["modules"]`` with ``FakeQuantLinear``.

    ``plan`` is the content of ``fp8convert.json``: ``{"modules": {name: {"weight": "channel"|"tensor",
    "activation": "dynamic-token"|..., "bias": bool}}}``. The new modules are created on the device of
    the linear they replace (``meta`` included) and must then be loaded with the checkpoint tensors.
    Returns the names swapped; raises if a planned module is missing or is not a linear.
    """
    swapped, problems = [], []
    for name, spec in plan["modules"].items():
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
            old = getattr(parent, child)
        except AttributeError:
            problems.append(f"{name}: no such module in the model")
            continue
        if not isinstance(old, nn.Linear):
            problems.append(f"{name}: is a {type(old).__name__}, not nn.Linear")
            continue
        new = _from_spec(spec, old.in_features, old.out_features, numerics, cache_dequantized, old.weight.device)
        setattr(parent, child, new)
        swapped.append(name)
    if problems:
        raise CheckpointError(
            "the model does not match the fake-quant plan",
            problems=problems,
            hint="was the model built from the same config.json?",
        )
    return swapped


#: per-expert projection name in checkpoints -> its role in a fused transformers experts module
EXPERT_ROLES = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down"}
_EXPERT_MODULE = re.compile(r"^(?P<parent>.+)\.(?P<expert>\d+)\.(?P<proj>[A-Za-z0-9_]+)$")


class FakeQuantExperts(nn.Module):
    """Fake-quant replacement for a transformers >= 5 fused experts module (``gate_up_proj [E, 2I, H]``,
    ``down_proj [E, H, I]``): one ``FakeQuantLinear`` per expert and projection, named as in the checkpoint
    (``{e}.gate_proj`` / ``{e}.w1``...), and the same routing loop as transformers'
    ``forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])``."""

    def __init__(self, experts: list[dict[str, FakeQuantLinear]], act_fn: nn.Module) -> None:
        super().__init__()
        self.num_experts = len(experts)
        self.act_fn = act_fn
        self.role = {EXPERT_ROLES[name]: name for name in experts[0]}
        for e, projections in enumerate(experts):
            self.add_module(str(e), nn.ModuleDict(projections))

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = F.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        gate, up, down = self.role["gate"], self.role["up"], self.role["down"]
        for e in hit[:, 0].tolist():
            top_k_pos, token_idx = torch.where(mask[e])
            x = hidden_states[token_idx]
            projections: Any = self.get_submodule(str(e))
            h = self.act_fn(projections[gate](x)) * projections[up](x)
            h = projections[down](h) * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, h.to(final.dtype))
        return final


def swap_experts(
    model: nn.Module,
    plan: dict[str, Any],
    *,
    numerics: Numerics | str = Numerics.FALLBACK,
    cache_dequantized: bool = False,
) -> list[str]:
    """Replace fused experts modules whose per-expert projections are all in ``plan`` by ``FakeQuantExperts``.

    Returns the plan's module names it handled (the rest are ordinary linears for ``swap_linears``).
    """
    groups: dict[str, dict[int, dict[str, dict]]] = {}
    for name, spec in plan["modules"].items():
        m = _EXPERT_MODULE.match(name)
        if not m or m["proj"] not in EXPERT_ROLES:
            continue
        try:
            parent = model.get_submodule(m["parent"])
        except AttributeError:
            continue
        if hasattr(parent, "gate_up_proj") and hasattr(parent, "down_proj"):
            groups.setdefault(m["parent"], {}).setdefault(int(m["expert"]), {})[m["proj"]] = spec
    handled, problems = [], []
    for parent_name, experts in groups.items():
        fused: Any = model.get_submodule(parent_name)
        n, two_i, hidden = fused.gate_up_proj.shape
        names = sorted(next(iter(experts.values())), key=lambda p: ("gate", "up", "down").index(EXPERT_ROLES[p]))
        if (
            sorted(experts) != list(range(n))
            or any(sorted(p) != sorted(names) for p in experts.values())
            or len(names) != 3
        ):
            problems.append(f"{parent_name}: the plan does not fake-quantize all {n} experts' gate/up/down")
            continue
        device = fused.gate_up_proj.device
        built = []
        for e in range(n):
            projections = {}
            for proj in names:
                spec = experts[e][proj]
                out_f, in_f = (hidden, two_i // 2) if EXPERT_ROLES[proj] == "down" else (two_i // 2, hidden)
                projections[proj] = _from_spec(spec, in_f, out_f, numerics, cache_dequantized, device)
                handled.append(f"{parent_name}.{e}.{proj}")
            built.append(projections)
        grandparent, _, child = parent_name.rpartition(".")
        setattr(
            model.get_submodule(grandparent) if grandparent else model, child, FakeQuantExperts(built, fused.act_fn)
        )
    if problems:
        raise CheckpointError(
            "fused experts cannot be fake-quantized",
            problems=problems,
            hint="every expert's gate, up and down projection must be quantized",
        )
    return handled


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create parameters on the meta device (no memory, no init) but keep buffers (rotary tables) real."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None:
            kwargs = param.__dict__
            module._parameters[name] = type(param)(param.to("meta"), **kwargs)

    nn.Module.register_parameter = register  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def _checkpoint_renames(model_type: str) -> list[tuple[re.Pattern[str], str]]:
    """The plain renamings transformers applies to checkpoint keys at load (e.g. Mixtral's
    ``block_sparse_moe.`` -> ``mlp.`` in transformers >= 5), so plan names and keys match the built model.
    Uses transformers' own table where it has one (an internal API: none on older versions)."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:
        return []
    renames = []
    for op in get_checkpoint_conversion_mapping(model_type) or []:
        if type(op) is WeightRenaming:
            sources = op.source_patterns if isinstance(op.source_patterns, list) else [op.source_patterns]
            targets = op.target_patterns if isinstance(op.target_patterns, list) else [op.target_patterns]
            renames += [(re.compile(src), targets[0]) for src in sources]
    return renames


def _rename(name: str, renames: list[tuple[re.Pattern[str], str]]) -> str:
    for pattern, target in renames:
        name = pattern.sub(target, name)
    return name


def load_cpu_model(
    path: str | Path,
    *,
    numerics: Numerics | str = Numerics.FALLBACK,
    activation_dtype: torch.dtype = torch.bfloat16,
    cache_dequantized: bool = False,
) -> nn.Module:
    """Build a transformers causal LM from a CPU variant directory with its linears as ``FakeQuantLinear``.

    Weights stay fp8 (1 byte per parameter) unless ``cache_dequantized``. ``activation_dtype`` fp16 casts
    every non-fp8 float tensor to fp16, as the AIU stack does. Needs the ``cpu`` extra (transformers).
    """
    try:
        import transformers
    except ImportError as exc:
        raise Fp8ConvertError("load_cpu_model needs transformers", hint='pip install "fp8convert[cpu]"') from exc
    from safetensors import safe_open

    path = Path(path)
    plan = read_cpu_plan(path)
    config = transformers.AutoConfig.from_pretrained(str(path))
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # fp8convert does the quantization, not transformers
    with _parameters_on_meta():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    renames = _checkpoint_renames(getattr(config, "model_type", ""))
    plan = {**plan, "modules": {_rename(k, renames): v for k, v in plan["modules"].items()}}
    experts = set(swap_experts(model, plan, numerics=numerics, cache_dequantized=cache_dequantized))
    rest = {**plan, "modules": {k: v for k, v in plan["modules"].items() if k not in experts}}
    swap_linears(model, rest, numerics=numerics, cache_dequantized=cache_dequantized)
    files = sorted({p.name for p in path.glob("*.safetensors")})
    expected = dict(model.named_parameters()) | dict(model.named_buffers())
    unexpected = []
    for file in files:
        with safe_open(str(path / file), framework="pt") as f:
            for stored in f.keys():
                key = _rename(stored, renames)
                if key not in expected:
                    unexpected.append(stored)
                    continue
                _assign(model, key, f.get_tensor(stored))
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if missing or unexpected:
        raise CheckpointError(
            "the checkpoint does not match the model built from config.json",
            where=str(path),
            problems=[f"missing: {m}" for m in missing[:20]] + [f"unexpected: {u}" for u in unexpected[:20]],
        )
    if activation_dtype != torch.bfloat16:
        for module in model.modules():
            for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
                # as the AIU stack does: bf16 tensors become fp16; fp32 ones (rotary tables) stay fp32
                if t.dtype == torch.bfloat16:
                    _assign(module, name, t.detach().to(activation_dtype))
    return model.eval()


def _assign(model: nn.Module, key: str, value: torch.Tensor) -> None:
    parent_name, _, name = key.rpartition(".")
    module = model.get_submodule(parent_name) if parent_name else model
    old = module._parameters.get(name, module._buffers.get(name))
    if old is not None and tuple(old.shape) != tuple(value.shape):
        raise CheckpointError(
            f"{key} has shape {list(value.shape)}, the model expects {list(old.shape)}",
            hint="the checkpoint and fp8convert.json/config.json disagree: convert again",
        )
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[name] = value
