"""Pure normalization of canonical linears to the AIU target (DESIGN.md 3). No I/O.

Target: weights e4m3fn with BF16 scales, either per-channel ``[out, 1]`` with dynamic per-token
activations (the primary scheme) or per-tensor ``[1]`` with per-tensor activations (dynamic, or static
with a BF16 ``input_scale [1]``). Every change is recorded with its exactness; lossy ones carry SQNR and
max relative error of the dequantized weight against the source's dequantized weight.

Each linear is a job that streams: everything but the fp8 codes (scales, bias, input scale, the plan of
what happens to the codes) is decided from the small tensors, so the weight may be a meta tensor; the
codes are then converted row chunk by row chunk (``rows()`` / ``convert()``), and ``finish()`` returns the
result. A job whose ``keep_codes`` is true leaves the codes as they are: the writer copies their bytes.
``normalize_linear`` / ``dequantize_to_bf16`` / ``quantize_unquantized`` run a whole job in memory.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from fp8convert.errors import CheckpointError, UnsupportedSchemeError
from fp8convert.numerics import (
    E4M3_MAX,
    ErrorStats,
    bf16_round_up,
    channel_scale_from_amax,
    dequant_rows,
    fp8_decode,
    fp8_nan_count,
    is_exact_bf16,
    requantize_rows,
    row_amax,
    row_chunks,
)
from fp8convert.spec import AIU_SCHEMES, FP8_DTYPES, ActScheme, Granularity, LinearPlan, QuantizedLinear, WeightScheme

CHANNEL = WeightScheme(granularity=Granularity.CHANNEL)
TENSOR = WeightScheme(granularity=Granularity.TENSOR)
PRIMARY = (Granularity.CHANNEL, ActScheme.DYNAMIC_TOKEN)


@dataclass(frozen=True, slots=True, kw_only=True)
class Normalized:
    """A linear in the target form. ``linear.weight_scale`` / ``input_scale`` / ``bias`` are BF16 tensors
    of the target shapes (``[out,1]`` or ``[1]``); ``weight_unchanged`` says the fp8 codes equal the source's
    (so the writer may copy bytes)."""

    linear: QuantizedLinear
    weight_unchanged: bool
    actions: list[str] = field(default_factory=list)
    exact: bool = True
    changed_codes: int = 0
    sqnr_db: float | None = None
    max_rel_error: float | None = None

    def record(self) -> dict[str, object]:
        """The per-layer entry of the report."""
        return {
            "target": f"{self.linear.scheme.describe()} + {self.linear.activation}",
            "exact": self.exact,
            "actions": self.actions or ["kept"],
            "changed_codes": self.changed_codes,
            "sqnr_db": _finite(self.sqnr_db),
            "max_rel_error": self.max_rel_error,
        }


def _finite(x: float | None) -> float | str | None:
    """A report figure: inf as a string (JSON has none); finite SQNRs to 1e-6 dB, below their accuracy (fp32
    row norms, ~1e-5 dB), so the report's bytes do not depend on how rows were chunked or threaded."""
    if x is None:
        return None
    return round(x, 6) if x not in (float("inf"), float("-inf")) else ("inf" if x > 0 else "-inf")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def choose_target(linears: Iterable[LinearPlan]) -> tuple[Granularity, ActScheme]:
    """One scheme for the whole model (the AIU config has one group): per-tensor only if every linear is
    per-tensor with the same per-tensor activations; otherwise per-channel + dynamic per-token."""
    pairs = {(lin.scheme.granularity, lin.activation) for lin in linears}
    if len(pairs) == 1:
        (pair,) = pairs
        if pair in AIU_SCHEMES and pair[0] is Granularity.TENSOR:
            return pair
    return PRIMARY


@dataclass(slots=True)
class Chunk:
    """What ``compute`` made of one row chunk: the codes (or bf16 rows), their error figures, the per-row
    scales it chose, and how many codes changed bytes."""

    out: torch.Tensor
    stats: ErrorStats
    scale: torch.Tensor | None = None
    changed: int = 0


class Job:
    """What the pipeline needs of every job: row chunks, a converter per chunk, the report entry.

    ``compute`` is pure (it reads the job's settings only), so chunks may be computed on several threads;
    ``accept`` takes their results back in row order. ``convert`` is both, for one thread.
    """

    out_features: int
    in_features: int
    align = 1  # row chunks start on multiples of this (the block height for block scales)
    keep_codes = False  # the fp8 codes are written as they are in the source
    needs_prepass = False  # rows must be seen once (``prepass``, then ``end_prepass``) before ``compute``
    scale_from_rows = False  # the target weight scale is known only once every row was converted
    bias: torch.Tensor | None = None  # bf16 target bias
    input_scale: torch.Tensor | None = None  # bf16 target input scale (static per-tensor activations)

    def __init__(self) -> None:
        self.stats = ErrorStats()
        self.changed = 0
        self._scales: list[torch.Tensor] = []

    def rows(self) -> list[tuple[int, int]]:
        return row_chunks(self.out_features, self.in_features, self.align)

    def prepass(self, rows: torch.Tensor, r0: int) -> None:  # pragma: no cover - only jobs that need one
        raise NotImplementedError

    def end_prepass(self) -> None:  # pragma: no cover - only jobs that need one
        raise NotImplementedError

    def compute(self, rows: torch.Tensor, r0: int) -> Chunk:
        raise NotImplementedError

    def accept(self, chunk: Chunk) -> torch.Tensor:
        self.stats.merge(chunk.stats)
        self.changed += chunk.changed
        if chunk.scale is not None:
            self._scales.append(chunk.scale)
        return chunk.out

    def convert(self, rows: torch.Tensor, r0: int) -> torch.Tensor:
        return self.accept(self.compute(rows, r0))

    def record(self) -> dict[str, object]:
        raise NotImplementedError

    def weight_scale(self) -> torch.Tensor:
        """The bf16 target scale (after every row chunk when ``scale_from_rows``)."""
        raise NotImplementedError


class LinearJob(Job):
    """One quantized linear to the target scheme (DESIGN.md 3). Modes, decided from the scales alone:

    - keep: e4m3fn, channel/tensor scales exact in bf16 -> codes copied; scales cast (and broadcast);
    - by value: e4m3fnuz with bf16-exact scales -> codes converted by value, same scale;
    - rescale: a scale that is not a bf16 value -> rounded up to bf16, codes requantized against it;
    - requantize: block scales or e5m2 codes -> dequantized and requantized per channel (or per tensor,
      which needs a first pass for the amax).
    """

    def __init__(self, ql: QuantizedLinear, target: tuple[Granularity, ActScheme]) -> None:
        gran, act = target
        self.ql, self.gran = ql, gran
        self.out_features, self.in_features = ql.weight.shape
        src, dtype = ql.scheme, ql.weight.dtype
        if dtype not in FP8_DTYPES:
            raise UnsupportedSchemeError(f"{ql.module}.weight has dtype {dtype}, not an fp8 dtype")
        if gran is Granularity.TENSOR and src.granularity is not Granularity.TENSOR:
            raise UnsupportedSchemeError(f"{ql.module}: cannot target per-tensor weights from {src.describe()}")
        super().__init__()
        self.actions: list[str] = []
        self.lossy = False
        self.by_value = dtype == torch.float8_e4m3fnuz
        if self.by_value:
            self.actions.append("e4m3fnuz -> e4m3fn by value (same scale)")
        self.align = src.block[0] if src.block else 1
        self._rescale_at: int | None = None
        self._amax = 0.0
        if src.granularity is Granularity.BLOCK or dtype in (torch.float8_e5m2, torch.float8_e5m2fnuz):
            if dtype != torch.float8_e4m3fn and not self.by_value:
                self.actions.append(f"{_name(dtype)} -> e4m3fn: requantized by value per channel")
            if src.granularity is Granularity.BLOCK:
                self.actions.append(
                    f"{src.describe()} -> channel: dequantized and requantized per channel (amax/448, "
                    "scale rounded up to bf16)"
                )
            self.mode, self.lossy = "requantize", True
            self.needs_prepass = gran is Granularity.TENSOR
            self.scale_from_rows = True
            self.new_scale: torch.Tensor | None = None  # per row, from each chunk (or after the prepass)
        else:
            s32 = ql.weight_scale.to(torch.float32)
            if is_exact_bf16(s32):
                scale = s32.to(torch.bfloat16)
                if ql.scale_dtype != torch.bfloat16:
                    self.actions.append(f"scale {_name(ql.scale_dtype)} -> bf16 (exact)")
                self.mode = "by value" if self.by_value else "keep"
                self.keep_codes = self.mode == "keep"
            else:
                scale = bf16_round_up(s32)
                self.mode, self.lossy = "rescale", True
                self._rescale_at = len(self.actions)  # the action names the changed codes, known at the end
                self.new_scale = scale.to(torch.float32).reshape(-1, 1)
            if gran is Granularity.CHANNEL:
                if src.granularity is Granularity.TENSOR:
                    self.actions.append("per-tensor scale broadcast to per-channel [out,1] (exact)")
                self.scale = scale.reshape(-1, 1).expand(self.out_features, 1).contiguous()
            else:
                self.scale = scale.reshape(1)
        self.input_scale, self.bias = self._activation_and_bias(act)
        self.activation = act

    def _activation_and_bias(self, act: ActScheme) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        ql, input_scale = self.ql, None
        if act is not ql.activation:
            verb = "added" if ql.activation is ActScheme.NONE else "changed"
            self.actions.append(
                f"activations {ql.activation} -> {act}: activation quantization {verb} "
                "(fms-model-optimizer runs no other combination; numerics change)"
            )
        elif act is ActScheme.STATIC_TENSOR:
            assert ql.input_scale is not None
            if is_exact_bf16(ql.input_scale):
                input_scale = ql.input_scale.to(torch.bfloat16).reshape(1)
            else:
                input_scale = bf16_round_up(ql.input_scale).reshape(1)
                rel = float((input_scale.float() - ql.input_scale).abs().max() / ql.input_scale.abs().max())
                self.actions.append(
                    f"input_scale -> bf16 rounded up (relative change {rel:.2e}; activation numerics change)"
                )
                self.lossy = True
        if ql.act_upper_bound is not None:
            self.actions.append(
                f"activation scale upper bound {ql.act_upper_bound} dropped (the AIU path has none; "
                "activation numerics change for tokens whose amax exceeds it)"
            )
            self.lossy = True
        bias = None
        if ql.bias is not None:
            bias = ql.bias.to(torch.bfloat16)
            if ql.bias.dtype != torch.bfloat16:
                exact = torch.equal(bias.to(ql.bias.dtype), ql.bias)
                self.actions.append(f"bias {_name(ql.bias.dtype)} -> bf16 ({'exact' if exact else 'rounded'})")
                self.lossy = self.lossy or not exact
        return input_scale, bias

    # ---- the codes, row chunk by row chunk ------------------------------------------------------
    def prepass(self, rows: torch.Tensor, r0: int) -> None:
        """Per-tensor target from requantized codes: the amax of the whole dequantized weight first."""
        hp = dequant_rows(rows, self.ql.weight_scale, self.ql.scheme, r0)
        self._amax = max(self._amax, float(hp.abs().max()) if hp.numel() else 0.0)

    def end_prepass(self) -> None:
        value = self._amax / E4M3_MAX if self._amax > 0 else 1.0
        self.new_scale = bf16_round_up(torch.tensor([value])).to(torch.float32).reshape(1, 1)

    def compute(self, rows: torch.Tensor, r0: int) -> Chunk:
        """Target e4m3fn codes of source rows ``[r0, r0 + len(rows))``."""
        stats = ErrorStats()
        if self.mode == "keep":
            return Chunk(rows, stats)
        src = self.ql.scheme
        if self.mode == "by value":
            old = dequant_rows(rows, self.ql.weight_scale, src, r0)
            codes = fp8_decode(rows).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
            stats.add(old, dequant_rows(codes, self.ql.weight_scale, src, r0))
            return Chunk(codes, stats)
        hp = dequant_rows(rows, self.ql.weight_scale, src, r0)
        amax = row_amax(rows, self.ql.weight_scale, src, r0)
        if amax is None:
            amax = hp.abs().amax(dim=1, keepdim=True)
        per_row = None
        if self.mode == "rescale" or self.needs_prepass:
            assert self.new_scale is not None
            s_new = self.new_scale[r0 : r0 + len(rows)] if self.new_scale.numel() > 1 else self.new_scale
        else:
            s_new = per_row = channel_scale_from_amax(amax)
        codes = requantize_rows(hp, s_new, stats, amax)
        changed = 0
        if self.mode == "rescale":  # codes whose bytes moved (against the by-value codes for fnuz)
            before = rows
            if self.by_value:
                before = fp8_decode(rows).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
                changed += int(torch.count_nonzero(fp8_decode(before) != fp8_decode(rows)))
            changed += int(torch.count_nonzero(codes.view(torch.uint8) != before.view(torch.uint8)))
        return Chunk(codes, stats, per_row, changed)

    def accept(self, chunk: Chunk) -> torch.Tensor:
        out = super().accept(chunk)
        if self.mode != "rescale":
            self.changed = self.stats.changed  # values that changed
        if self.mode == "by value":
            self.lossy = self.lossy or self.changed > 0
        return out

    def finish(self, weight: torch.Tensor | None = None) -> Normalized:
        """The result once every row chunk went through ``convert`` (``weight``: the full codes, if kept)."""
        if self.mode == "requantize":
            if self.gran is Granularity.TENSOR:
                assert self.new_scale is not None
                self.scale = self.new_scale.to(torch.bfloat16).reshape(1)
            else:
                self.scale = torch.cat(self._scales).to(torch.bfloat16).reshape(self.out_features, 1)
        if self._rescale_at is not None:
            self.actions.insert(
                self._rescale_at,
                f"scale {_name(self.ql.scale_dtype)} -> bf16 rounded up; {self.changed} fp8 codes requantized",
            )
            self._rescale_at = None
        unchanged = self.mode == "keep" or (self.mode == "rescale" and not self.by_value and self.changed == 0)
        out = QuantizedLinear(
            module=self.ql.module,
            weight=self.ql.weight if weight is None else weight,
            weight_scale=self.scale,
            activation=self.activation,
            scale_dtype=torch.bfloat16,
            scheme=CHANNEL if self.gran is Granularity.CHANNEL else TENSOR,
            input_scale=self.input_scale,
            bias=self.bias,
        )
        weights_changed = self.lossy and self.stats.signal > 0  # SQNR only where weight values were requantized
        return Normalized(
            linear=out,
            weight_unchanged=unchanged,
            actions=self.actions,
            exact=not self.lossy and self.activation is self.ql.activation,
            changed_codes=self.changed,
            sqnr_db=self.stats.sqnr_db if weights_changed else None,
            max_rel_error=self.stats.max_rel if weights_changed else None,
        )

    def record(self) -> dict[str, object]:
        return self.finish().record()

    def weight_scale(self) -> torch.Tensor:
        return self.finish().linear.weight_scale


class DequantJob(Job):
    """A quantized linear kept in full precision (``lm_head``): bf16 rows, one rounding each."""

    def __init__(self, ql: QuantizedLinear) -> None:
        super().__init__()
        self.ql = ql
        self.out_features, self.in_features = ql.weight.shape
        self.align = ql.scheme.block[0] if ql.scheme.block else 1
        self.bias = None if ql.bias is None else ql.bias.to(torch.bfloat16)

    def compute(self, rows: torch.Tensor, r0: int) -> Chunk:
        hp = dequant_rows(rows, self.ql.weight_scale, self.ql.scheme, r0)
        w = hp.to(torch.bfloat16)
        stats = ErrorStats()
        stats.add(hp, w)
        return Chunk(w, stats)

    def record(self) -> dict[str, object]:
        exact = self.stats.noise == 0
        return {
            "target": "bf16 (dequantized)",
            "exact": exact,
            "actions": [
                "dequantized to bf16 (the AIU stack keeps this layer in full precision)"
                + ("" if exact else "; one bf16 rounding")
            ],
            "changed_codes": 0,
            "sqnr_db": _finite(self.stats.sqnr_db),
            "max_rel_error": self.stats.max_rel,
        }


class QuantizeJob(Job):
    """A full-precision decoder linear quantized per channel (opt-in: ``--quantize-unquantized``)."""

    scale_from_rows = True

    def __init__(self, module: str, shape: tuple[int, int], dtype: torch.dtype, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.module, self.dtype = module, dtype
        self.out_features, self.in_features = shape
        self.bias = None if bias is None else bias.to(torch.bfloat16)

    def compute(self, rows: torch.Tensor, r0: int) -> Chunk:
        hp = rows.to(torch.float32, copy=True)
        amax = hp.abs().amax(dim=1, keepdim=True)
        scale = channel_scale_from_amax(amax)
        stats = ErrorStats()
        return Chunk(requantize_rows(hp, scale, stats, amax), stats, scale)

    def weight_scale(self) -> torch.Tensor:
        return torch.cat(self._scales).to(torch.bfloat16).reshape(self.out_features, 1)

    def finish(self, weight: torch.Tensor) -> Normalized:
        lin = QuantizedLinear(
            module=self.module,
            weight=weight,
            weight_scale=self.weight_scale(),
            scheme=CHANNEL,
            activation=PRIMARY[1],
            scale_dtype=torch.bfloat16,
            bias=self.bias,
        )
        return Normalized(
            linear=lin,
            weight_unchanged=False,
            exact=False,
            sqnr_db=self.stats.sqnr_db,
            max_rel_error=self.stats.max_rel,
            changed_codes=self.out_features * self.in_features,
            actions=[
                f"{_name(self.dtype)} linear quantized per channel (--quantize-unquantized); activations "
                "dynamic per-token"
            ],
        )

    def record(self) -> dict[str, object]:
        return self.finish(torch.empty(0)).record()


# ---- whole tensors in memory ---------------------------------------------------------------------
def run_job(job: Job, weight: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Run every row chunk of ``weight`` through ``job``; the converted ``[out, in]`` tensor."""
    if weight.dtype in FP8_DTYPES and (nan := fp8_nan_count(weight)):
        raise CheckpointError(f"{nan} fp8 NaN/Inf code(s) in the weight", hint="the checkpoint is corrupt")
    if job.needs_prepass:
        for r0, r1 in job.rows():
            job.prepass(weight[r0:r1], r0)
        job.end_prepass()
    out = torch.empty(weight.shape, dtype=out_dtype)
    for r0, r1 in job.rows():
        out[r0:r1] = job.convert(weight[r0:r1], r0)
    return out


def normalize_linear(ql: QuantizedLinear, target: tuple[Granularity, ActScheme]) -> Normalized:
    """Bring one linear to the target scheme with BF16 scales (DESIGN.md 3)."""
    job = LinearJob(ql, target)
    if job.keep_codes:
        return job.finish()
    return job.finish(run_job(job, ql.weight, torch.float8_e4m3fn))


def dequantize_to_bf16(ql: QuantizedLinear) -> tuple[torch.Tensor, dict[str, object]]:
    """A quantized linear kept in full precision (``lm_head``): bf16 ``[out, in]`` plus its report entry."""
    job = DequantJob(ql)
    return run_job(job, ql.weight, torch.bfloat16), job.record()


def quantize_unquantized(module: str, weight: torch.Tensor, bias: torch.Tensor | None) -> Normalized:
    """Quantize a full-precision decoder linear per channel (opt-in: ``--quantize-unquantized``)."""
    job = QuantizeJob(module, (weight.shape[0], weight.shape[1]), weight.dtype, bias)
    return job.finish(run_job(job, weight, torch.float8_e4m3fn))
