"""Reading the JSON an untrusted checkpoint ships: safetensors headers, config.json, the index.

A hostile or broken download must get an error naming the file and what is wrong, never a crash, and never cost
more memory than a real checkpoint would: sizes are capped (``MAX_HEADER_BYTES``, the safetensors library's own
limit), and so is the number of JSON values (``MAX_HEADER_VALUES``) a header or JSON file may make the parser
build. Problems are listed, at most ``MAX_PROBLEMS`` per file.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from pathlib import Path

from fp8convert.errors import CheckpointError
from fp8convert.spec import ST_TO_DTYPE, TensorRef

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
#: JSON values (counted as ``,``, ``[`` and ``{``) a header may hold, about 8 per tensor: bounds the memory a hostile
#: header takes (1.6 million tiny entries in 100 MB would take 1.6 GB); real shards hold a few thousand tensors
MAX_HEADER_VALUES = 2_000_000
#: problems listed per safetensors file (a hostile header can have one in each of a million entries)
MAX_PROBLEMS = 20


def _not_json(constant: str) -> float:
    """``parse_constant`` of every JSON read here: NaN and Infinity are not JSON (and could not be written back)."""
    raise ValueError(f"{constant} is not a JSON value")


def _load_json(text: str) -> tuple[object, list[str]]:
    """``json.loads`` that refuses NaN/Infinity and also returns the keys repeated within one object (a plain
    parse keeps the last silently). Raises ValueError (bad JSON) or RecursionError (nested too deeply)."""
    repeated: list[str] = []

    def pairs(items: list[tuple[str, object]]) -> dict:
        obj = dict(items)
        if len(obj) != len(items):
            seen: set[str] = set()
            repeated.extend(k for k, _ in items if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        return obj

    return json.loads(text, object_pairs_hook=pairs, parse_constant=_not_json), repeated


def brief(value: object, limit: int = 120) -> str:
    """A value for an error message: its repr, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 20]}... ({len(text):,} characters)"


def brief_key(key: str) -> str:
    """A tensor name for an error message: as is, or cut when a hostile header makes it huge."""
    return key if len(key) <= 300 else f"{key[:200]}... ({len(key):,} characters)"


def read_json(path: Path, *, what: str, unique_keys: bool = False) -> dict:
    """Read a JSON object (config.json, the index, ...). ``unique_keys``: a key repeated in one object is an error
    (JSON parsers keep one of them silently, so two tools could see different files)."""
    fix = "re-download the file; it is truncated or corrupt"
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(
                f"{what} is not a regular file", where=str(path), hint=f"replace it with the {what} file"
            )
        if st.st_size > MAX_HEADER_BYTES:
            raise CheckpointError(
                f"{what} is {st.st_size:,} bytes, more than the {MAX_HEADER_BYTES:,} fp8convert reads",
                where=str(path),
                hint=fix,
            )
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise CheckpointError(
            f"{what} not found",
            where=str(path),
            hint="point at a checkpoint directory that has it; if the download is partial, download it again",
        ) from exc
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{what} is not valid JSON ({exc})", where=str(path), hint=fix) from exc
    except OSError as exc:
        raise CheckpointError(
            f"{what} cannot be read ({exc.strerror or exc})", where=str(path), hint="check the file's permissions"
        ) from exc
    values = text.count(",") + text.count("[") + text.count("{")
    if values > MAX_HEADER_VALUES:
        raise CheckpointError(
            f"{what} holds about {values:,} JSON values, more than the {MAX_HEADER_VALUES:,} fp8convert reads",
            where=str(path),
            hint=fix,
        )
    try:
        data, repeated = _load_json(text)
    except RecursionError as exc:
        raise CheckpointError(f"{what} is not valid JSON (nested too deeply)", where=str(path), hint=fix) from exc
    except ValueError as exc:
        raise CheckpointError(f"{what} is not valid JSON ({exc})", where=str(path), hint=fix) from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} must hold a JSON object, found {type(data).__name__}", where=str(path), hint=fix)
    if unique_keys and repeated:
        raise CheckpointError(
            f"{what} repeats the key(s) {', '.join(brief(k, 80) for k in repeated[:5])}"
            + (f" and {len(repeated) - 5} more" if len(repeated) > 5 else "")
            + " (duplicate JSON keys: tools would disagree on which one holds)",
            where=str(path),
            hint=fix,
        )
    return data


def parse_header(path: Path) -> tuple[dict[str, TensorRef], dict[str, str], int, list[str]]:
    """Parse one safetensors header without reading tensor data.

    Returns ``(tensors, metadata, data_start, problems)``; ``problems`` lists everything wrong
    (malformed JSON, offsets beyond the file, sizes that disagree with dtype x shape, gaps, overlaps,
    empty tensors, repeated names), at most ``MAX_PROBLEMS`` of them. Never raises for a bad file; memory
    stays bounded (``MAX_HEADER_BYTES``, ``MAX_HEADER_VALUES``) whatever the header says.
    """
    name = path.name
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            return {}, {}, 0, [f"{name}: not a regular file"]
        size = st.st_size
        if size < 8:
            return {}, {}, 0, [f"{name}: file is {size} bytes, too short for a safetensors header (truncated?)"]
        with path.open("rb") as f:
            (hlen,) = struct.unpack("<Q", f.read(8))
            if hlen > MAX_HEADER_BYTES:
                return (
                    {},
                    {},
                    0,
                    [
                        f"{name}: header length {hlen:,} is larger than the {MAX_HEADER_BYTES:,} bytes safetensors "
                        "allows (corrupt, or not a safetensors file)"
                    ],
                )
            if 8 + hlen > size:
                return (
                    {},
                    {},
                    0,
                    [f"{name}: header length {hlen} exceeds the file size {size} (truncated or not safetensors)"],
                )
            raw = f.read(hlen)
    except OSError as exc:
        return {}, {}, 0, [f"{name}: cannot be read ({exc.strerror or exc})"]
    if len(raw) != hlen:
        return {}, {}, 0, [f"{name}: the file shrank while it was read (is it being written?)"]
    values = raw.count(b",") + raw.count(b"[") + raw.count(b"{")
    if values > MAX_HEADER_VALUES:
        return (
            {},
            {},
            0,
            [
                f"{name}: the header holds about {values:,} JSON values (some {values // 8:,} tensors), more than the "
                f"{MAX_HEADER_VALUES:,} fp8convert reads in one file (corrupt or hostile header)"
            ],
        )
    try:
        header, repeated = _load_json(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except RecursionError:
        return {}, {}, 0, [f"{name}: malformed safetensors header (nested too deeply)"]
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return {}, {}, 0, [f"{name}: malformed safetensors header ({exc})"]
    del raw
    problems: list[str] = []
    more = 0

    def problem(text: str) -> None:  # keeps MAX_PROBLEMS (a hostile header can have one in each of 250,000 entries)
        nonlocal more
        if len(problems) < MAX_PROBLEMS:
            problems.append(text)
        else:
            more += 1

    for k in dict.fromkeys(repeated):
        problem(
            f"{name}: the header repeats the key {brief(k, 200)} (duplicate JSON keys: readers disagree which holds)"
        )
    data_start = 8 + hlen
    data_len = size - data_start
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    elif not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        problem(f"{name}: __metadata__ must map names to strings, found {brief(meta)}")
        meta = {}
    tensors: dict[str, TensorRef] = {}
    spans: list[tuple[int, int, str]] = []
    malformed = False
    for key, info in header.items():
        if not key or not key.isprintable():  # control characters, lone surrogates (\ud800), format characters
            problem(f"{name}: tensor name {brief(key)} is empty or holds control or invalid characters")
            malformed = True
            continue
        why = _entry_problem(info)
        if why:
            problem(f"{name}: tensor {brief_key(key)}: malformed header entry ({why})")
            malformed = True  # its bytes are somewhere: gaps are no news
            continue
        dtype = ST_TO_DTYPE[info["dtype"]]
        shape = tuple(info["shape"])
        begin, end = info["data_offsets"]
        expected = math.prod(shape) * dtype.itemsize
        if not expected:
            problem(
                f"{name}: tensor {brief_key(key)} is empty ({info['dtype']} {brief(list(shape))}): a model's tensors "
                "never are (a broken export or a corrupt header)"
            )
        elif end < begin:
            problem(f"{name}: tensor {brief_key(key)}: data_offsets [{begin}, {end}] end before they begin")
        elif end - begin != expected:
            problem(
                f"{name}: tensor {brief_key(key)}: header offsets span {end - begin} bytes but "
                f"{info['dtype']} {brief(list(shape))} needs {expected}"
            )
        if end > data_len:
            problem(
                f"{name}: tensor {brief_key(key)}: data ends at byte {end} but the file holds {data_len} data bytes "
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
            problem(f"{name}: tensors {brief_key(last)} and {brief_key(key)} overlap in the data section")
        elif begin > end and not malformed:
            problem(f"{name}: {begin - end} unused bytes before tensor {brief_key(key)} (the format allows no gaps)")
        end, last = max(end, stop), key
    if end < data_len and not problems:
        problem(f"{name}: {data_len - end} trailing bytes after the last tensor (the format allows none)")
    if more:
        problems.append(f"{name}: ... and {more:,} more problem(s) in this file")
    return tensors, meta, data_start, problems


def _entry_problem(info: object) -> str | None:
    """What is wrong with one tensor's header entry ``{"dtype", "shape", "data_offsets"}``; None if nothing."""
    if not isinstance(info, dict):
        return f"expected an object with dtype, shape and data_offsets, found {brief(info)}"
    missing = [f for f in ("dtype", "shape", "data_offsets") if f not in info]
    if missing:
        return f"{', '.join(missing)} missing in {brief(info)}"
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in ST_TO_DTYPE:
        return f"dtype {brief(dtype)} is not one fp8convert reads ({', '.join(ST_TO_DTYPE)})"
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        return f"shape must be a list of integers >= 0, found {brief(shape)}"
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(v) is int and v >= 0 for v in offsets):
        return f"data_offsets must be two integers [begin, end] >= 0, found {brief(offsets)}"
    return None


def capped(lines: list[str], total: int | None = None) -> list[str]:
    """At most ``MAX_PROBLEMS`` lines of a list of problems (of ``total``, if only the first are listed), and how
    many more there are."""
    more = (len(lines) if total is None else total) - MAX_PROBLEMS
    return lines[:MAX_PROBLEMS] + ([f"... and {more:,} more"] if more > 0 else [])
