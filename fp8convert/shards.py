"""safetensors I/O: header parsing without loading tensors, one-tensor reads, raw byte copies, and an
atomic shard writer that streams tensor by tensor.

The safetensors format is an 8-byte little-endian header length, a JSON header and the raw bytes; this
module parses headers itself so that a malformed or lying header gets an error naming the file, and it
writes shards itself so that memory never holds a whole shard. Every written shard is re-read with the
safetensors library before it is accepted.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import re
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from fp8convert.errors import CheckpointError, MissingTensorError, OutputError
from fp8convert.spec import DTYPE_TO_ST, ST_TO_DTYPE, TensorRef

INDEX_NAME = "model.safetensors.index.json"
PICKLE_OR_GGUF = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".gguf")
MAX_HEADER_BYTES = 100_000_000
COPY_CHUNK = 8 << 20
#: Files copied through unchanged next to the weights (never pickles).
AUX_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.txt",
    "tekken.json",
    "tokenizer.model.v1",
    "tokenizer.model.v2",
    "tokenizer.model.v3",
    "tokenizer.model.v7",
    "tokenizer.model.v7m1",
)


def natural_key(name: str) -> list[object]:
    """Sort key that orders ``layers.2`` before ``layers.10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def read_json(path: Path, *, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(
            f"{what} not found",
            where=str(path),
            hint="point at a checkpoint directory that has it; if the download is partial, download it again",
        ) from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"{what} is not valid JSON ({exc})",
            where=str(path),
            hint="re-download the file; it is truncated or corrupt",
        ) from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} must hold a JSON object, found {type(data).__name__}", where=str(path))
    return data


def parse_header(path: Path) -> tuple[dict[str, TensorRef], dict[str, str], int, list[str]]:
    """Parse one safetensors header without reading tensor data.

    Returns ``(tensors, metadata, data_start, problems)``; ``problems`` lists everything wrong
    (malformed JSON, offsets beyond the file, sizes that disagree with dtype x shape, gaps, overlaps).
    """
    name = path.name
    size = path.stat().st_size
    problems: list[str] = []
    if size < 8:
        return {}, {}, 0, [f"{name}: file is {size} bytes, too short for a safetensors header (truncated?)"]
    with path.open("rb") as f:
        (hlen,) = struct.unpack("<Q", f.read(8))
        if hlen > MAX_HEADER_BYTES or 8 + hlen > size:
            return (
                {},
                {},
                0,
                [f"{name}: header length {hlen} exceeds the file size {size} (truncated or not safetensors)"],
            )
        raw = f.read(hlen)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        return {}, {}, 0, [f"{name}: malformed safetensors header ({exc})"]
    data_start = 8 + hlen
    data_len = size - data_start
    meta = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorRef] = {}
    spans: list[tuple[int, int, str]] = []
    for key, info in header.items():
        try:
            dtype = ST_TO_DTYPE[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            problems.append(f"{name}: tensor {key}: malformed header entry {info!r}")
            continue
        expected = math.prod(shape) * dtype.itemsize
        if end - begin != expected:
            problems.append(
                f"{name}: tensor {key}: header offsets span {end - begin} bytes but "
                f"{info['dtype']} {list(shape)} needs {expected}"
            )
        if begin < 0 or end > data_len:
            problems.append(
                f"{name}: tensor {key}: data ends at byte {end} but the file holds {data_len} data bytes "
                "(file truncated or header lies)"
            )
        spans.append((begin, end, key))
        tensors[key] = TensorRef(
            key=key, file=name, dtype=dtype, shape=shape, nbytes=expected, offset=data_start + begin
        )
    spans.sort()
    end, last = 0, ""
    for begin, stop, key in spans:
        if begin < end:
            problems.append(f"{name}: tensors {last} and {key} overlap in the data section")
        elif begin > end:
            problems.append(f"{name}: {begin - end} unused bytes before tensor {key} (the format allows no gaps)")
        end, last = max(end, stop), key
    if spans and end < data_len and not problems:
        problems.append(f"{name}: {data_len - end} trailing bytes after the last tensor (the format allows none)")
    return tensors, {str(k): str(v) for k, v in meta.items()}, data_start, problems


class Checkpoint:
    """A local checkpoint directory: config files, the index, and every tensor's header entry.

    Opening reads only headers. Shards named by the index must lie inside the directory; a shard that
    is itself a symlink (the Hugging Face cache) is followed.
    """

    def __init__(self, root: Path, *, pattern: str = "*.safetensors") -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise CheckpointError(
                "source is not a directory",
                where=str(root),
                hint="pass the directory that holds config.json and the *.safetensors files",
            )
        self.problems: list[str] = []
        self.tensors: dict[str, TensorRef] = {}
        self.files = self._list_files(pattern)
        for file in self.files:
            refs, _meta, _start, problems = parse_header(self.root / file)
            self.problems += problems
            for key, ref in refs.items():
                if key in self.tensors:
                    self.problems.append(f"tensor {key} appears in both {self.tensors[key].file} and {file}")
                self.tensors[key] = ref
        self._check_index_keys()

    def _list_files(self, pattern: str) -> list[str]:
        index_path = self.root / INDEX_NAME
        if index_path.exists():
            index = read_json(index_path, what="safetensors index")
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(
                    "index has no weight_map", where=str(index_path), hint="re-download the index file"
                )
            self.weight_map: dict[str, str] | None = {str(k): str(v) for k, v in weight_map.items()}
            files = sorted(set(self.weight_map.values()), key=natural_key)
            for f in files:
                p = Path(f)
                if p.is_absolute() or ".." in p.parts or len(p.parts) != 1:
                    raise CheckpointError(
                        f"index names the file {f!r}, which is outside the checkpoint directory",
                        where=str(index_path),
                        hint="the index is corrupt or malicious",
                    )
            missing = [f for f in files if not (self.root / f).is_file()]
            if missing:
                raise MissingTensorError(
                    f"{len(missing)} shard(s) named by the index are missing",
                    where=str(index_path),
                    problems=[f"{m} (holds {sum(v == m for v in self.weight_map.values())} tensors)" for m in missing],
                    hint="the download is incomplete: download the missing files again (fp8convert pull resumes)",
                )
            return files
        self.weight_map = None
        found = sorted((p.name for p in self.root.glob(pattern) if p.is_file()), key=natural_key)
        # Mistral repos ship consolidated*.safetensors (native names) next to the HF files: the HF files win
        files = [f for f in found if not f.startswith("consolidated")] or found
        if not files:
            other = sorted(p.name for p in self.root.iterdir() if p.suffix in PICKLE_OR_GGUF)
            raise CheckpointError(
                "no *.safetensors files found"
                + (
                    f"; only {', '.join(other[:5])} (pickle or GGUF formats, which fp8convert never reads)"
                    if other
                    else ""
                ),
                where=str(self.root),
                hint="fp8convert reads safetensors only (never unpickles); use a repo or revision that publishes "
                "*.safetensors",
            )
        return files

    def _check_index_keys(self) -> None:
        if self.weight_map is None:
            return
        for key, file in self.weight_map.items():
            ref = self.tensors.get(key)
            if ref is None:
                self.problems.append(f"{INDEX_NAME} lists {key} in {file}, but no shard holds it")
            elif ref.file != file:
                self.problems.append(f"{INDEX_NAME} lists {key} in {file}, but it is in {ref.file}")

    # ---- reading -------------------------------------------------------------------------------
    def config(self, name: str = "config.json") -> dict:
        return read_json(self.root / name, what=name)

    def has(self, key: str) -> bool:
        return key in self.tensors

    def ref(self, key: str) -> TensorRef:
        return self.tensors[key]

    def load(self, key: str, index: int | None = None) -> torch.Tensor:
        """Read one tensor into memory (a plain read at its offset: no mmap of the whole shard); with ``index``,
        only ``tensor[index]`` (one expert of a fused ``[E, ...]`` tensor) is read."""
        ref = self.tensors[key]
        offset, nbytes, shape = ref.offset, ref.nbytes, ref.shape
        if index is not None:
            nbytes //= shape[0]
            offset, shape = offset + index * nbytes, shape[1:]
        buf = bytearray(nbytes)
        with (self.root / ref.file).open("rb") as f:
            f.seek(offset)
            if f.readinto(buf) != nbytes:
                raise CheckpointError(
                    f"unexpected end of file reading {key}",
                    where=str(self.root / ref.file),
                    hint="the file is truncated: download it again",
                )
        if not buf:
            return torch.empty(shape, dtype=ref.dtype)
        return torch.frombuffer(buf, dtype=torch.uint8).view(ref.dtype).reshape(shape)

    def raw_chunks(self, key: str) -> Iterator[bytes]:
        """The tensor's bytes straight from the file, in chunks, without decoding."""
        ref = self.tensors[key]
        path = self.root / ref.file
        with path.open("rb") as f:
            f.seek(ref.offset)
            left = ref.nbytes
            while left:
                chunk = f.read(min(COPY_CHUNK, left))
                if not chunk:
                    raise CheckpointError(f"unexpected end of file reading {key}", where=str(path))
                left -= len(chunk)
                yield chunk

    def close(self) -> None:
        """Nothing is held open between reads; kept so callers can use a uniform open/close pattern."""


# ---- writing ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class OutTensor:
    """A tensor to write: its name, dtype, shape, and how to produce its bytes (chunks, in order)."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], Iterable[bytes]]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw little-endian bytes of a CPU tensor, without numpy."""
    t = t.detach().contiguous().cpu()
    return ctypes.string_at(t.data_ptr(), t.numel() * t.element_size()) if t.numel() else b""


def plan_shards(tensors: list[OutTensor], max_shard_bytes: int) -> list[list[OutTensor]]:
    """Split tensors (in natural key order) into shards of at most ``max_shard_bytes`` each."""
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in sorted(tensors, key=lambda t: natural_key(t.key)):
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def write_safetensors(path: Path, tensors: list[OutTensor], on_bytes: Callable[[int], None] | None = None) -> str:
    """Write one safetensors file tensor by tensor (header first, then each tensor's bytes in order);
    returns the file's sha256, computed on the way."""
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
    digest = hashlib.sha256()
    with path.open("wb") as f:
        for head in (struct.pack("<Q", len(raw)), raw):
            f.write(head)
            digest.update(head)
        for t in tensors:
            written = 0
            for chunk in t.produce():
                f.write(chunk)
                digest.update(chunk)
                written += len(chunk)
            if written != t.nbytes:
                raise OutputError(
                    f"internal error: {t.key} produced {written} bytes, expected {t.nbytes}", where=str(path)
                )
            if on_bytes:
                on_bytes(written)
    return digest.hexdigest()


def check_written(path: Path, tensors: list[OutTensor]) -> None:
    """Re-open a written shard with the safetensors library and compare names, dtypes and shapes."""
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        if keys != {t.key for t in tensors}:
            raise OutputError("written shard does not hold the planned tensors", where=str(path))
        for t in tensors:
            sl = f.get_slice(t.key)
            if tuple(sl.get_shape()) != t.shape or sl.get_dtype() != DTYPE_TO_ST[t.dtype]:
                raise OutputError(f"written tensor {t.key} has the wrong dtype/shape", where=str(path))


def write_sharded(
    directory: Path, tensors: list[OutTensor], *, max_shard_bytes: int, on_bytes: Callable[[int], None] | None = None
) -> dict[str, str]:
    """Write ``model-0000i-of-0000n.safetensors`` + the index into ``directory``; return shard -> sha256."""
    shards = plan_shards(tensors, max_shard_bytes)
    n = len(shards)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map: dict[str, str] = {}
    digests = {}
    for name, shard in zip(names, shards, strict=True):
        digests[name] = write_safetensors(directory / name, shard, on_bytes)
        check_written(directory / name, shard)
        weight_map.update({t.key: name for t in shard})
    index = {
        "metadata": {"total_size": sum(t.nbytes for t in tensors)},
        "weight_map": dict(sorted(weight_map.items(), key=lambda kv: natural_key(kv[0]))),
    }
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return digests


def write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8")


def copy_aux_files(src: Path, dst: Path) -> list[str]:
    """Copy tokenizer files and generation_config.json (if present) from src to dst."""
    copied = []
    for name in AUX_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(COPY_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def link_or_copy(src: Path, dst: Path) -> str:
    """Hardlink src to dst (same filesystem), else copy; returns "hardlink" or "copy"."""
    try:
        os.link(src, dst)
        return "hardlink"
    except OSError:
        shutil.copyfile(src, dst)
        return "copy"
