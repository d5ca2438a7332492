"""Streaming safetensors output: shard planning, a writer thread that writes and hashes, resumable shards.

Producers hand bytes to a ``Sink`` in order; one worker thread writes them and another feeds the sha256
(both release the GIL), so reading or converting the next chunk overlaps writing and hashing this one. Raw copies
go through a small pool of reused buffers; tensors are written from their own memory without a copy.
Memory stays bounded: at most ``QUEUE`` chunks are in flight.

``write_sharded`` writes ``model-0000i-of-0000n.safetensors`` + the index; with a ``Journal`` it records
each finished shard (name, size, sha256, what its producers reported) so that a killed run resumes from
the last finished shard: a rerun re-hashes the recorded shards and skips the ones that match.
"""

from __future__ import annotations

import collections
import ctypes
import hashlib
import json
import logging
import math
import os
import queue
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from fp8convert.errors import CheckpointError, OutputError
from fp8convert.shards import INDEX_NAME, natural_key, sha256_file
from fp8convert.spec import DTYPE_TO_ST

logger = logging.getLogger(__name__)

#: Bytes per raw-copy read, and buffers in flight (the pool): a few MB, near the CPU caches.
COPY_CHUNK = 4 << 20
QUEUE = 4


class _Item:
    """One chunk in flight: its bytes, what keeps them alive, and who gives its buffer back when both the
    writer and the hasher are done with it."""

    __slots__ = ("view", "keep", "release", "left")

    def __init__(self, view: memoryview, keep: object, release: Callable[[], None] | None) -> None:
        self.view, self.keep, self.release, self.left = view, keep, release, 2


class Sink:
    """The bytes of one file, in order: written on one worker thread and hashed on another (both release the
    GIL), while the caller reads or converts the next chunk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.written = 0
        self._file = path.open("wb", buffering=0)
        self._digest = hashlib.sha256()
        self._lock = threading.Lock()
        self._pool: queue.Queue[bytearray] = queue.Queue()
        self._buffers = 0
        self._error: BaseException | None = None
        self._queues: list[queue.Queue[_Item | None]] = [queue.Queue(QUEUE), queue.Queue(QUEUE)]
        self._threads = [
            threading.Thread(target=self._work, args=(self._queues[0], self._write), daemon=True),
            threading.Thread(target=self._work, args=(self._queues[1], self._digest.update), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _write(self, view: memoryview) -> None:
        while view:  # a raw file may take fewer bytes than offered
            view = view[self._file.write(view) :]

    def _work(self, items: queue.Queue[_Item | None], use: Callable[[memoryview], object]) -> None:
        while (item := items.get()) is not None:
            try:
                if self._error is None:
                    use(item.view)
            except BaseException as exc:  # reported to the producer on its next call
                self._error = exc
            finally:
                with self._lock:
                    item.left -= 1
                    done = item.left == 0
                if done and item.release is not None:
                    item.release()

    def _put(self, view: memoryview, release: Callable[[], None] | None = None, keep: object = None) -> None:
        if self._error is not None:
            if release is not None:
                release()
            raise self._error
        item = _Item(view, keep, release)
        for q in self._queues:
            q.put(item)
        self.written += len(view)

    def write(self, data: bytes | torch.Tensor) -> None:
        """Queue bytes, or a CPU tensor's memory (kept alive, not copied, until written)."""
        if isinstance(data, torch.Tensor):
            t = data.detach().contiguous()
            n = t.numel() * t.element_size()
            if not n:
                return
            self._put(memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B"), keep=t)
        elif data:
            self._put(memoryview(data))

    def _buffer(self) -> bytearray:
        if self._pool.empty() and self._buffers < QUEUE + 2:
            self._buffers += 1
            return bytearray(COPY_CHUNK)
        return self._pool.get()

    def copy(self, path: Path, offset: int, nbytes: int, scan: Callable[[bytearray, int], None] | None = None) -> None:
        """Copy ``nbytes`` at ``offset`` of ``path`` without decoding; ``scan(buffer, n)`` sees each chunk first
        (and may raise)."""
        with path.open("rb", buffering=0) as f:
            f.seek(offset)
            left = nbytes
            while left:
                buf = self._buffer()
                n = f.readinto(memoryview(buf)[: min(COPY_CHUNK, left)])
                if not n:
                    self._pool.put(buf)
                    raise CheckpointError(
                        f"unexpected end of file at byte {offset + nbytes - left}",
                        where=str(path),
                        hint="the file is truncated or changed during the conversion: download it again",
                    )
                if scan is not None:
                    try:
                        scan(buf, n)
                    except BaseException:
                        self._pool.put(buf)
                        raise
                self._put(memoryview(buf)[:n], release=lambda b=buf: self._pool.put(b))  # type: ignore[misc]
                left -= n

    def _stop(self) -> None:
        for q in self._queues:
            q.put(None)
        for t in self._threads:
            t.join()
        self._file.close()

    def close(self) -> str:
        """Wait for the queued bytes; returns the sha256. Raises the writer's error, if any."""
        self._stop()
        if self._error is not None:
            raise self._error
        return self._digest.hexdigest()

    def abort(self) -> None:
        self._error = self._error or RuntimeError("aborted")
        self._stop()


@dataclass(frozen=True, slots=True)
class OutTensor:
    """A tensor to write: its name, dtype, shape, and how to produce its bytes into a sink, in order."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[Sink], None]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(tensors: list[OutTensor], max_shard_bytes: int) -> list[list[OutTensor]]:
    """Split tensors (in natural key order) into shards of at most ``max_shard_bytes`` each."""
    counts = collections.Counter(t.key for t in tensors)
    if twice := sorted(k for k, n in counts.items() if n > 1):
        raise CheckpointError(
            f"{len(twice)} output tensor name(s) would be written twice: {', '.join(twice[:5])}",
            hint="the checkpoint holds two tensors that map to the same name (e.g. a native and an HF copy); "
            "keep one layout in the source directory",
        )
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in sorted(tensors, key=lambda t: natural_key(t.key)):
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _header(tensors: list[OutTensor]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.key] = {
            "dtype": DTYPE_TO_ST[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(path: Path, tensors: list[OutTensor], on_bytes: Callable[[int], None] | None = None) -> str:
    """Write one safetensors file tensor by tensor (header first, then each tensor's bytes in order);
    returns the file's sha256, computed on the way."""
    sink = Sink(path)
    try:
        sink.write(_header(tensors))
        for t in tensors:
            before = sink.written
            t.produce(sink)
            if sink.written - before != t.nbytes:
                raise OutputError(
                    f"internal error: {t.key} produced {sink.written - before} bytes, expected {t.nbytes}",
                    where=str(path),
                )
            if on_bytes:
                on_bytes(t.nbytes)
    except BaseException:
        sink.abort()
        raise
    return sink.close()


def check_written(path: Path, tensors: list[OutTensor]) -> None:
    """Re-open a written shard with the safetensors library and compare names, dtypes and shapes."""
    with safe_open(str(path), framework="pt") as f:
        if set(f.keys()) != {t.key for t in tensors}:
            raise OutputError("written shard does not hold the planned tensors", where=str(path))
        for t in tensors:
            sl = f.get_slice(t.key)
            if tuple(sl.get_shape()) != t.shape or sl.get_dtype() != DTYPE_TO_ST[t.dtype]:
                raise OutputError(f"written tensor {t.key} has the wrong dtype/shape", where=str(path))


class Journal:
    """Finished shards of an interrupted run: ``{shard: {"sha256", "size", "notes"}}`` in a JSON file, rewritten
    atomically after each shard. ``notes`` is what the shard's producers reported (the per-layer records)."""

    def __init__(self, path: Path, key: str) -> None:
        self.path, self.key = path, key
        self.shards: dict[str, dict[str, object]] = {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("key") == key and isinstance(data.get("shards"), dict):
                self.shards = data["shards"]
        except (OSError, ValueError, AttributeError):
            pass

    def reusable(self, shard: Path) -> dict[str, object] | None:
        """The entry of a shard finished by an earlier run, if the file is still exactly that (re-hashed)."""
        entry = self.shards.get(shard.name)
        if not entry or not shard.is_file() or shard.stat().st_size != entry.get("size"):
            return None
        return entry if sha256_file(shard) == entry.get("sha256") else None

    def done(self, shard: Path, digest: str, notes: dict[str, object]) -> None:
        self.shards[shard.name] = {"sha256": digest, "size": shard.stat().st_size, "notes": notes}
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"key": self.key, "shards": self.shards}), encoding="utf-8")
        os.replace(tmp, self.path)


def write_sharded(
    directory: Path,
    tensors: list[OutTensor],
    *,
    max_shard_bytes: int,
    on_bytes: Callable[[int], None] | None = None,
    journal: Journal | None = None,
    notes: Callable[[], dict[str, object]] = dict,
    resumed: Callable[[dict[str, object]], None] | None = None,
) -> dict[str, str]:
    """Write ``model-0000i-of-0000n.safetensors`` + the index into ``directory``; return shard -> sha256.

    With a journal, shards an earlier run finished are kept (``resumed(notes)`` gets what their producers
    reported then) and each new shard is recorded with ``notes()``, what its producers reported since the
    previous shard.
    """
    shards = plan_shards(tensors, max_shard_bytes)
    n = len(shards)
    weight_map: dict[str, str] = {}
    digests = {}
    for i, shard in enumerate(shards):
        path = directory / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        entry = journal.reusable(path) if journal else None
        if entry is not None:
            logger.info("%s: kept from an interrupted run (same bytes)", path.name)
            digests[path.name] = str(entry["sha256"])
            if resumed:
                resumed(entry.get("notes") or {})  # type: ignore[arg-type]
            if on_bytes:
                on_bytes(sum(t.nbytes for t in shard))
        else:
            notes()  # drop what earlier (resumed) shards' producers left
            digests[path.name] = write_safetensors(path, shard, on_bytes)
            check_written(path, shard)
            if journal:
                journal.done(path, digests[path.name], notes())
        weight_map.update({t.key: path.name for t in shard})
    index = {
        "metadata": {"total_size": sum(t.nbytes for t in tensors)},
        "weight_map": dict(sorted(weight_map.items(), key=lambda kv: natural_key(kv[0]))),
    }
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return digests
