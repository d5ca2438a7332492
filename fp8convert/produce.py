"""Every output tensor and how its bytes are produced, streaming from the source (DESIGN.md 6).

A linear becomes a job (normalize.py) the first time one of its output tensors is written; the job is
built from the linear's small tensors (scales, bias) with the weight left on disk. Codes that do not change
are copied as bytes, scanned for NaN codes on the way, never decoded; codes that change are read, converted
and written one row chunk at a time. So memory holds a few chunks, whatever the size of the model.
"""

from __future__ import annotations

import collections
import functools
import math
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fp8convert.formats.base import FormatReader
from fp8convert.normalize import Chunk, DequantJob, Job, LinearJob, QuantizeJob
from fp8convert.numerics import CHUNK_ELEMENTS, fp8_nan_count
from fp8convert.shards import Checkpoint, read_range
from fp8convert.spec import (
    FLOAT_DTYPES,
    FP8_DTYPES,
    ActScheme,
    CheckpointPlan,
    Granularity,
    LinearPlan,
    QuantizedLinear,
    TensorRef,
    dtype_name,
)
from fp8convert.writer import OutTensor, Sink
from fp8convert.writers import aiu


class BadValues(Exception):
    """A weight holds NaN codes: found while converting; the pipeline then lists every problem at once."""


def full_precision(linear: LinearPlan) -> bool:
    return linear.module in aiu.FULL_PRECISION_MODULES or linear.module.endswith(".lm_head")


def describe(lin: LinearPlan) -> str:
    return (
        f"{dtype_name(lin.weight.dtype)} {lin.scheme.describe()} ({dtype_name(lin.weight_scale.dtype)} scale) + "
        f"{lin.activation} activations"
    )


class _ScalesOnly(Checkpoint):
    """The checkpoint, except that one weight comes back as a meta tensor (shape and dtype, no bytes)."""

    def __init__(self, ckpt: Checkpoint, weight_key: str) -> None:  # noqa: D107 - a view, not a new checkpoint
        self.__dict__.update(ckpt.__dict__)
        self._weight_key = weight_key

    def load(self, key: str, index: int | None = None) -> torch.Tensor:
        if key != self._weight_key:
            return super().load(key, index)
        ref = self.tensors[key]
        return torch.empty(ref.shape[1:] if index is not None else ref.shape, dtype=ref.dtype, device="meta")


def read_scales(reader: FormatReader, ckpt: Checkpoint, lin: LinearPlan) -> QuantizedLinear:
    """``reader.read_linear`` without reading the weight: its ``weight`` is a meta tensor."""
    return reader.read_linear(_ScalesOnly(ckpt, lin.weight.key), lin)


def rows_as_stored(reader: FormatReader, lin: LinearPlan) -> bool:
    """Whether ``read_linear`` returns the weight's rows as they lie in the file (no transpose, no
    permutation): then row chunks are read, or bytes copied, straight from the file."""
    permutes = getattr(reader, "permutes_rows", None)
    return not lin.transposed and not (permutes is not None and permutes(lin))


@dataclass(slots=True)
class _Span:
    """Where an ``[out, in]`` weight lies contiguously in a file."""

    path: Path
    offset: int
    dtype: torch.dtype
    out_features: int
    in_features: int

    @classmethod
    def of(cls, root: Path, ref: TensorRef, expert: int | None, rows: tuple[int, int] | None, in_f: int) -> _Span:
        offset = ref.offset + (expert or 0) * (ref.nbytes // ref.shape[0] if expert is not None else 0)
        out_f = ref.shape[-2] if rows is None else rows[1] - rows[0]
        if rows is not None:
            offset += rows[0] * in_f * ref.dtype.itemsize
        return cls(root / ref.file, offset, ref.dtype, out_f, in_f)

    @property
    def nbytes(self) -> int:
        return self.out_features * self.in_features * self.dtype.itemsize

    def read(self, r0: int, r1: int) -> bytearray:
        width = self.in_features * self.dtype.itemsize
        return read_range(self.path, self.offset + r0 * width, (r1 - r0) * width)


def count_nan_codes(ckpt: Checkpoint, reader: FormatReader, lin: LinearPlan) -> int:
    """NaN (e5m2: and Inf) codes of one quantized weight, read in row chunks when its rows lie as stored."""
    if not rows_as_stored(reader, lin):
        return fp8_nan_count(reader.read_linear(ckpt, lin).weight)
    span = _Span.of(ckpt.root, lin.weight, lin.expert, lin.rows, lin.in_features)
    step = max(1, CHUNK_ELEMENTS // max(1, span.in_features))
    total = 0
    for r0 in range(0, span.out_features, step):
        rows = span.read(r0, min(span.out_features, r0 + step))
        if _has_nan(rows, len(rows), span.dtype):
            total += fp8_nan_count(torch.frombuffer(rows, dtype=torch.uint8).view(span.dtype))
    return total


def _has_nan(buf: bytearray | bytes, n: int, dtype: torch.dtype) -> bool:
    """Whether fp8 bytes hold NaN codes (e4m3fn 0x7F/0xFF, fnuz 0x80: memchr speed; e5m2 NaN/Inf)."""
    if dtype == torch.float8_e4m3fn:
        return buf.find(b"\x7f", 0, n) >= 0 or buf.find(b"\xff", 0, n) >= 0
    if dtype in (torch.float8_e4m3fnuz, torch.float8_e5m2fnuz):
        return buf.find(b"\x80", 0, n) >= 0
    if dtype == torch.float8_e5m2:
        return bool(fp8_nan_count(torch.frombuffer(memoryview(buf)[:n], dtype=torch.uint8).view(dtype)))
    return False


@dataclass(slots=True)
class _Module:
    """One linear being written: its job, where its rows come from, which of its tensors are still due."""

    job: Job
    key: str  # the source weight, for messages
    source: str  # the source scheme, for the report
    span: _Span | None  # rows straight from the file, or
    load: Callable[[], torch.Tensor] | None  # the whole weight, as the reader returns it
    pending: set[str] = field(default_factory=set)
    converted: bool = False


class Producer:
    """Builds each linear's job on first use, streams its tensors, records its report entry."""

    def __init__(self, ckpt: Checkpoint, reader: FormatReader, target: tuple[Granularity, ActScheme]) -> None:
        self.ckpt, self.reader, self.target = ckpt, reader, target
        self.workers = 1
        self._pool: ThreadPoolExecutor | None = None
        self.records: dict[str, dict[str, object]] = {}
        self._new: dict[str, dict[str, object]] = {}
        self._modules: dict[str, _Module] = {}

    # ---- report entries, per shard (the journal keeps them for a resumed run) -----------------------
    def take_notes(self) -> dict[str, object]:
        notes, self._new = self._new, {}
        return dict(notes)

    def resume(self, notes: dict[str, object]) -> None:
        self.records.update(notes)  # type: ignore[arg-type]

    # ---- jobs --------------------------------------------------------------------------------------
    def _module(self, lin: LinearPlan | None, module: str, keys: set[str]) -> _Module:
        if module in self._modules:
            return self._modules[module]
        ckpt, reader = self.ckpt, self.reader
        job: Job
        if lin is None:  # unquantized decoder linear, quantized on request
            ref = ckpt.ref(f"{module}.weight")
            bias = ckpt.load(f"{module}.bias") if ckpt.has(f"{module}.bias") else None
            job = QuantizeJob(module, (ref.shape[0], ref.shape[1]), ref.dtype, bias)
            span: _Span | None = _Span.of(ckpt.root, ref, None, None, ref.shape[1])
            load = None
        else:
            ql = read_scales(reader, ckpt, lin)
            job = DequantJob(ql) if full_precision(lin) else LinearJob(ql, self.target)
            stored = rows_as_stored(reader, lin)
            span = _Span.of(ckpt.root, lin.weight, lin.expert, lin.rows, lin.in_features) if stored else None
            load = None if stored else functools.partial(lambda lin: reader.read_linear(ckpt, lin).weight, lin)
        if lin is None:
            dtype = dtype_name(ckpt.ref(f"{module}.weight").dtype).replace("bfloat16", "bf16")
            key, source = f"{module}.weight", f"{dtype} (unquantized)"
        else:
            key, source = lin.weight.key, describe(lin)
        state = _Module(job, key, source, span, load, set(keys))
        self._modules[module] = state
        return state

    def _rows(self, m: _Module) -> Iterator[tuple[torch.Tensor, int]]:
        """The source weight's row chunks, each checked for NaN codes before use."""
        job = m.job
        if m.span is None:
            assert m.load is not None
            weight = m.load()
            if weight.dtype in FP8_DTYPES and fp8_nan_count(weight):
                raise BadValues(f"{m.key}: fp8 NaN/Inf codes in the weight")
            for r0, r1 in job.rows():
                yield weight[r0:r1], r0
            return
        span = m.span
        for r0, r1 in job.rows():
            buf = span.read(r0, r1)
            if span.dtype in FP8_DTYPES and _has_nan(buf, len(buf), span.dtype):
                raise BadValues(f"{m.key}: fp8 NaN/Inf codes in the weight")
            raw = torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
            rows = raw.view(span.dtype).reshape(r1 - r0, span.in_features)
            if span.dtype not in FP8_DTYPES and not bool(torch.isfinite(rows).all()):  # --quantize-unquantized
                raise BadValues(f"{m.key}: NaN or Inf values in a weight to quantize")
            yield rows, r0

    def _convert(self, m: _Module, module: str, sink: Sink | None) -> None:
        """Run the job over every row chunk, writing the result to ``sink`` (None: only for the scales)."""
        job = m.job
        if job.keep_codes and m.span is not None:
            if sink is not None:
                span = m.span

                def scan(buf: bytearray, n: int) -> None:
                    if _has_nan(buf, n, span.dtype):
                        raise BadValues(f"{m.key}: fp8 NaN/Inf codes in the weight")

                sink.copy(span.path, span.offset, span.nbytes, scan)
        else:
            if job.needs_prepass:
                for rows, r0 in self._rows(m):
                    job.prepass(rows, r0)
                job.end_prepass()
            for chunk in self._computed(job, self._rows(m)):
                out = job.accept(chunk)
                if sink is not None:
                    sink.write(out)
        m.converted = True
        self.records[module] = self._new[module] = {"source": m.source, **job.record()}

    def _computed(self, job: Job, rows: Iterator[tuple[torch.Tensor, int]]) -> Iterator[Chunk]:
        """``job.compute`` of each row chunk, in order, up to ``workers`` chunks at a time on the pool (torch
        ops release the GIL; each runs on one thread, so the results do not depend on the worker count)."""
        if self._pool is None:
            yield from (job.compute(r, r0) for r, r0 in rows)
            return
        pending: collections.deque[Future[Chunk]] = collections.deque()
        for r, r0 in rows:
            pending.append(self._pool.submit(job.compute, r, r0))
            if len(pending) > self.workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def __enter__(self) -> Producer:
        """Row chunks go to our own workers (as many as torch's threads), each op on one torch thread: with
        two OpenMP threads per op, the per-op barrier stalls for milliseconds whenever the writer or hasher
        thread (or another process) holds the other core. Restored on exit."""
        self.workers = torch.get_num_threads()
        torch.set_num_threads(1)
        if self.workers > 1:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="fp8convert")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
        torch.set_num_threads(self.workers)

    def _done(self, module: str, key: str) -> None:
        m = self._modules[module]
        m.pending.discard(key)
        if not m.pending:
            del self._modules[module]

    def tensor(self, lin: LinearPlan | None, module: str, key: str, keys: set[str]) -> Callable[[Sink], None]:
        """How to produce one output tensor of a linear (weight, weight_scale, input_scale or bias)."""
        suffix = key.rsplit(".", 1)[-1]

        def produce(sink: Sink) -> None:
            m = self._module(lin, module, keys)
            job = m.job
            if suffix == "weight":
                self._convert(m, module, sink)
            elif suffix in ("bias", "input_scale"):
                value = job.bias if suffix == "bias" else job.input_scale
                assert value is not None, key
                sink.write(value)
            else:  # weight_scale: after the weight; a resumed run may have skipped the weight's shard
                if job.scale_from_rows and not m.converted:
                    self._convert(m, module, None)
                sink.write(job.weight_scale())
            self._done(module, key)

        return produce


def cast_bf16(ckpt: Checkpoint, ref: TensorRef) -> Callable[[Sink], None]:
    """A full-precision tensor cast to bf16, a chunk of elements at a time."""

    def produce(sink: Sink) -> None:
        n, size = math.prod(ref.shape), ref.dtype.itemsize
        for e0 in range(0, n, CHUNK_ELEMENTS):
            part = read_range(ckpt.root / ref.file, ref.offset + e0 * size, (min(n, e0 + CHUNK_ELEMENTS) - e0) * size)
            sink.write(torch.frombuffer(part, dtype=ref.dtype).to(torch.bfloat16))

    return produce


def raw_copy(ckpt: Checkpoint, ref: TensorRef) -> Callable[[Sink], None]:
    return lambda sink: sink.copy(ckpt.root / ref.file, ref.offset, ref.nbytes)


def plan_outputs(
    ckpt: Checkpoint,
    plan: CheckpointPlan,
    producer: Producer,
    *,
    quantize: list[str],
    to_bf16: bool,
) -> tuple[list[OutTensor], dict[str, tuple[Granularity, ActScheme, bool]], dict[str, str]]:
    """Every output tensor (name, dtype, shape, producer), the fake-quant plan, and pass-through actions."""
    target_gran, target_act = producer.target
    outs: list[OutTensor] = []
    fake: dict[str, tuple[Granularity, ActScheme, bool]] = {}
    passthrough: dict[str, str] = {}
    replaced: set[str] = set()

    def add_linear(lin: LinearPlan | None, module: str, out_f: int, in_f: int, has_bias: bool) -> None:
        if lin is not None and full_precision(lin):
            keys = [f"{module}.weight"] + ([f"{module}.bias"] if has_bias else [])
            for key in keys:
                shape = (out_f, in_f) if key.endswith(".weight") else (out_f,)
                outs.append(OutTensor(key, torch.bfloat16, shape, producer.tensor(lin, module, key, set(keys))))
            return
        gran, act = target_gran, target_act  # per channel + per token whenever linears are quantized here
        static = act is ActScheme.STATIC_TENSOR
        keys = aiu.tensor_names(module, static_input=static, bias=has_bias)
        for key in keys:
            suffix = key.rsplit(".", 1)[-1]
            dtype, shape = {
                "weight": (torch.float8_e4m3fn, (out_f, in_f)),
                "weight_scale": (torch.bfloat16, (out_f, 1) if gran is Granularity.CHANNEL else (1,)),
                "input_scale": (torch.bfloat16, (1,)),
                "bias": (torch.bfloat16, (out_f,)),
            }[suffix]
            outs.append(OutTensor(key, dtype, shape, producer.tensor(lin, module, key, set(keys))))
        fake[module] = (gran, act, has_bias)

    for lin in plan.linears:
        add_linear(lin, lin.module, lin.out_features, lin.in_features, lin.bias is not None)
    for module in quantize:
        w = ckpt.ref(f"{module}.weight")
        has_bias = ckpt.has(f"{module}.bias")
        add_linear(None, module, w.shape[0], w.shape[1], has_bias)
        replaced.update({f"{module}.weight", f"{module}.bias"})
    for ref in plan.passthrough:
        if ref.key in replaced:
            continue
        name = plan.rename.get(ref.key, ref.key)
        if to_bf16 and ref.dtype in FLOAT_DTYPES and ref.dtype != torch.bfloat16:
            passthrough[name] = f"{dtype_name(ref.dtype)} -> bfloat16 (the AIU target is bf16)"
            outs.append(OutTensor(name, torch.bfloat16, ref.shape, cast_bf16(ckpt, ref)))
        else:
            passthrough[name] = "copied"
            outs.append(OutTensor(name, ref.dtype, ref.shape, raw_copy(ckpt, ref)))
    return outs, fake, passthrough
