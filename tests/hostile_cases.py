"""A corpus of hostile and broken checkpoints (issue 6): each case starts from a small valid checkpoint, breaks
one thing, and names the message ``fp8convert convert`` must give. tests/test_hostile.py runs every case.

A case is ``Case(id, base, edit, expect)``: ``base`` names a valid checkpoint of ``BASES`` (built once per test
session), ``edit(src)`` breaks a copy of it in place (it may create files next to ``src``, never elsewhere), and
``expect`` holds fragments of the error, with ``{src}`` standing for the checkpoint directory. ``error`` is the
exact error class, when the case pins one; ``heavy`` cases run through the real CLI in a subprocess whose peak
memory is measured (100 MB headers, claimed terabytes).

Adding a case: append to ``CASES`` (the id must be new); a builder of another layout goes into ``BASES``.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fp8convert.examples import build_compressed_tensors

from fixtures import BUILDERS

SMALL = {"hidden": 64, "intermediate": 128, "vocab": 64}
ST = "model.safetensors"
INDEX = "model.safetensors.index.json"
SHARD1, SHARD2, SHARD3 = (f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3))  # shards=2 writes 3 files
Q0 = "model.layers.0.self_attn.q_proj"
NORM = "model.norm.weight"  # the last tensor of model.safetensors (keys are written in sorted order)
LM = "lm_head.weight"  # the first
MB = 1_000_000

#: name -> builder(path) of the valid checkpoints the cases break
BASES: dict[str, Callable[[Path], Path]] = {
    "ct": lambda p: build_compressed_tensors(p, scheme="FP8_DYNAMIC", **SMALL),  # channel scales, dynamic tokens
    "ct3": lambda p: build_compressed_tensors(p, scheme="FP8_DYNAMIC", shards=2, **SMALL),  # 3 shards + index
    "static": lambda p: build_compressed_tensors(p, scheme="FP8", **SMALL),  # tensor scales, static input scales
    "kv": lambda p: build_compressed_tensors(p, scheme="FP8", kv_cache="tensor", **SMALL),
    "block": lambda p: build_compressed_tensors(p, scheme="FP8_BLOCK", **SMALL),
    "fp8": lambda p: BUILDERS["fp8"](p, "block"),  # DeepSeek-style weight_scale_inv
    "quark": lambda p: BUILDERS["quark"](p),
    "mistral": lambda p: BUILDERS["mistral"](p),  # params.json + consolidated.safetensors
    "modelopt": lambda p: BUILDERS["modelopt"](p),  # hf_quant_config.json
    "fbgemm": lambda p: BUILDERS["fbgemm"](p),
}


@dataclass(frozen=True, slots=True)
class Case:
    id: str
    base: str
    edit: Callable[[Path], object]
    expect: tuple[str, ...]
    error: str | None = None  # the exact class (fp8convert.errors), when the case pins one
    heavy: bool = False  # real CLI in a subprocess, peak memory measured


# ---- editing helpers -----------------------------------------------------------------------------------
def read_raw(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_raw(path: Path, header: dict | bytes, data: bytes, *, length: int | None = None) -> None:
    """A safetensors file by hand: 8-byte little-endian header length (``length`` lies), the header, the data."""
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb) if length is None else length) + hb + data)


def header(fn: Callable[[dict], object], file: str = ST) -> Callable[[Path], None]:
    """Edit the JSON header of ``file``: ``fn`` mutates it, or returns the new header as raw bytes."""

    def edit(src: Path) -> None:
        h, data = read_raw(src / file)
        new = fn(h)
        write_raw(src / file, new if isinstance(new, bytes) else h, data)

    return edit


def entry(key: str, **fields: object) -> Callable[[Path], None]:
    """Set fields of one tensor's header entry."""
    return header(lambda h: h[key].update(fields))


def lying_length(extra: int, file: str = ST) -> Callable[[Path], None]:
    """Add ``extra`` to the 8-byte header length, leaving the bytes alone."""

    def edit(src: Path) -> None:
        raw = (src / file).read_bytes()
        (src / file).write_bytes(struct.pack("<Q", struct.unpack("<Q", raw[:8])[0] + extra) + raw[8:])

    return edit


def raw_header(text: bytes, file: str = ST) -> Callable[[Path], None]:
    """Replace the header by ``text`` (the length field tells the truth), keeping the data."""
    return header(lambda h: text, file)


def truncate(size: int, file: str = ST) -> Callable[[Path], None]:
    """Cut the file to ``size`` bytes (negative: that many bytes off the end); a larger size makes it sparse."""

    def edit(src: Path) -> None:
        path = src / file
        with path.open("r+b") as f:
            f.truncate(size if size >= 0 else path.stat().st_size + size)

    return edit


def tensors(fn: Callable[[dict[str, torch.Tensor]], object], file: str = ST) -> Callable[[Path], None]:
    """Rewrite ``file`` after ``fn`` edits its tensors (the safetensors library writes it: only values change)."""

    def edit(src: Path) -> None:
        t = load_file(str(src / file))
        fn(t)
        save_file(t, str(src / file), metadata={"format": "pt"})

    return edit


def shard_of(src: Path, key: str) -> str:
    """The file that holds ``key``: from the index, else the single ``model.safetensors``."""
    return json.loads((src / INDEX).read_text())["weight_map"][key] if (src / INDEX).exists() else ST


def set_value(key: str, value: float) -> Callable[[Path], None]:
    """Set the last element of tensor ``key`` (in whichever shard holds it)."""

    def fn(t: dict[str, torch.Tensor]) -> None:
        t[key] = t[key].clone()
        t[key].view(-1)[-1] = value

    return lambda src: tensors(fn, shard_of(src, key))(src)


def fp8_codes(key: str, *codes: int) -> Callable[[Path], None]:
    def fn(t: dict[str, torch.Tensor]) -> None:
        t[key] = t[key].clone()
        for i, code in enumerate(codes):
            t[key].view(torch.uint8).view(-1)[3 * i + 1] = code

    return tensors(fn)


def replace(key: str, value: torch.Tensor) -> Callable[[Path], None]:
    return tensors(lambda t: t.update({key: value}))


def json_file(name: str, fn: Callable[[dict], object]) -> Callable[[Path], None]:
    """Edit a JSON file: ``fn`` mutates the object, or returns the new content as raw text."""

    def edit(src: Path) -> None:
        data = json.loads((src / name).read_text())
        new = fn(data)
        (src / name).write_text(new if isinstance(new, str) else json.dumps(data))

    return edit


def config(fn: Callable[[dict], object]) -> Callable[[Path], None]:
    return json_file("config.json", fn)


def qc(fn: Callable[[dict], object]) -> Callable[[Path], None]:
    """Edit config.json's quantization_config."""
    return config(lambda c: fn(c["quantization_config"]))


def group(fn: Callable[[dict], object]) -> Callable[[Path], None]:
    """Edit compressed-tensors' config group group_0."""
    return qc(lambda q: fn(q["config_groups"]["group_0"]))


def index(fn: Callable[[dict], object]) -> Callable[[Path], None]:
    return json_file(INDEX, fn)


def rename_shard(old: str, new: str) -> Callable[[Path], None]:
    """Point the index's entries for shard ``old`` at the name ``new`` (the file itself is left alone)."""
    return index(lambda i: i.update(weight_map={k: (new if v == old else v) for k, v in i["weight_map"].items()}))


def write(name: str, content: bytes | str) -> Callable[[Path], None]:
    def edit(src: Path) -> None:
        data = content.encode() if isinstance(content, str) else content
        (src / name).write_bytes(data)

    return edit


def remove(name: str) -> Callable[[Path], None]:
    return lambda src: (src / name).unlink()


def both(*edits: Callable[[Path], object]) -> Callable[[Path], None]:
    def edit(src: Path) -> None:
        for e in edits:
            e(src)

    return edit


def outside(name: str, content: bytes | str | None = None) -> Callable[[Path], Path]:
    """Move ``name`` out of the checkpoint (next to it), or write ``content`` there; returns its new path."""

    def edit(src: Path) -> Path:
        target = src.parent / "elsewhere" / name
        target.parent.mkdir(exist_ok=True)
        if content is None:
            (src / name).rename(target)
        else:
            target.write_bytes(content.encode() if isinstance(content, str) else content)
        return target

    return edit


def link_outside(name: str, secret: bool = False) -> Callable[[Path], None]:
    """Replace ``name`` by a symlink to a file outside the checkpoint: the real file moved out, or (``secret``) a
    file of the user's that a hostile download wants copied into the output."""

    def edit(src: Path) -> None:
        target = outside(name, "user secret\n" if secret else None)(src)
        if secret:
            (src / name).unlink()
        os.symlink(target, src / name)

    return edit


def symlink(name: str, target: str) -> Callable[[Path], None]:
    def edit(src: Path) -> None:
        if (src / name).exists():
            (src / name).unlink()
        os.symlink(target, src / name)

    return edit


def many_entries(n: int) -> Callable[[Path], None]:
    """A ~100 MB header of ``n`` tiny entries (a hostile header, or a '1e9 tensors' one cut to what fits)."""

    def edit(src: Path) -> None:
        body = b",".join(b'"t%d":{"dtype":"U8","shape":[1],"data_offsets":[%d,%d]}' % (i, i, i + 1) for i in range(n))
        write_raw(src / ST, b"{" + body + b"}", bytes(n))

    return edit


def no_shards_only_bin(src: Path) -> None:
    (src / ST).rename(src / "pytorch_model.bin")


def fifo(name: str) -> Callable[[Path], None]:
    def edit(src: Path) -> None:
        (src / name).unlink()
        os.mkfifo(src / name)

    return edit


def hardlink_twice(src: Path) -> None:
    """The same shard under a second name, which the index uses for one of its tensors."""
    os.link(src / SHARD2, src / "copy.safetensors")
    index(
        lambda i: i["weight_map"].update(
            {next(k for k, v in i["weight_map"].items() if v == SHARD2): "copy.safetensors"}
        )
    )(src)


def second_copy(src: Path) -> None:
    """No index: a second file holding the same tensors (a shard downloaded twice under two names)."""
    (src / "model-copy.safetensors").write_bytes((src / ST).read_bytes())


def deep(n: int) -> bytes:
    return b"[" * n + b"]" * n


SAFE = "the download is incomplete or corrupt: download the listed files again"
IN_FILES = "problem(s) in the safetensors files"
FOUND = "problem(s) found; nothing was written"
BAD_ENTRY = f"{ST}: tensor {NORM}: malformed header entry ("
CONFIG_FIELDS = "{src}/config.json: config.json has 1 field(s) no model can have"
CT_CONFIG = "config.json quantization_config: unsupported compressed-tensors configuration"

# ---- the corpus ----------------------------------------------------------------------------------------
CASES: list[Case] = [
    # -- the 8-byte header length and the file's size
    Case(
        "length-beyond-file",
        "ct",
        lying_length(1 << 20),
        (f"{ST}: header length", "exceeds the file size", "(truncated or not safetensors)", IN_FILES, SAFE),
    ),
    Case(
        "length-cut-to-40",
        "ct",
        truncate(40),
        (f"{ST}: header length", "exceeds the file size 40 (truncated or not safetensors)"),
        "CheckpointError",
    ),
    Case(
        "length-u64-max",
        "ct",
        lambda src: write_raw(src / ST, b"{}", b"", length=2**64 - 1),
        (f"{ST}: header length 18,446,744,073,709,551,615 is larger than the 100,000,000 bytes safetensors allows",),
    ),
    Case(
        "length-100mb-sparse",
        "ct",
        both(lambda src: write_raw(src / ST, b"{}", b"", length=100 * MB + 1), truncate(100 * MB + 64)),
        (f"{ST}: header length 100,000,001 is larger than the 100,000,000 bytes",),
        heavy=True,
    ),
    Case(
        "length-zero",
        "ct",
        raw_header(b""),
        (f"{ST}: malformed safetensors header (Expecting value: line 1 column 1 (char 0))",),
    ),
    Case(
        "header-100mb-of-entries",
        "ct",
        many_entries(1_450_000),
        (
            f"{ST}: the header holds about",
            "more than the 2,000,000 fp8convert reads in one file (corrupt or hostile header)",
        ),
        heavy=True,
    ),
    Case(
        "header-2m-nested-lists",
        "ct",
        raw_header(b'{"__metadata__":{"a":[' + b"[]," * 2_100_000 + b"[]]}}"),
        ("more than the 2,000,000 fp8convert reads in one file",),
    ),
    Case(
        "file-of-7-bytes",
        "ct",
        truncate(7),
        (f"{ST}: file is 7 bytes, too short for a safetensors header (truncated?)",),
        "CheckpointError",
    ),
    Case("empty-file", "ct", truncate(0), (f"{ST}: file is 0 bytes, too short",)),
    Case(
        "truncated-last-tensor",
        "ct",
        truncate(-100),
        (f"{ST}: tensor {NORM}: data ends at byte", "data bytes (file truncated or header lies)", SAFE),
        "CheckpointError",
    ),
    Case(
        "truncated-last-tensor-shard2",
        "ct3",
        truncate(-1, SHARD2),
        (f"{SHARD2}: tensor", "data ends at byte"),
        "CheckpointError",
    ),
    Case(
        "truncated-in-header",
        "ct3",
        truncate(40, SHARD2),
        (f"{SHARD2}: header length", "exceeds the file size 40"),
        "CheckpointError",
    ),
    # -- the header is not JSON, or not the JSON object it must be
    Case(
        "header-not-json",
        "ct",
        raw_header(b"this is not json"),
        (f"{ST}: malformed safetensors header (Expecting value",),
        "CheckpointError",
    ),
    Case(
        "header-cut-json",
        "ct",
        raw_header(b'{"model.norm.weight": {"dtype": "BF16", "shape": [64], '),
        (f"{ST}: malformed safetensors header",),
    ),
    Case(
        "header-json-list",
        "ct",
        raw_header(b'["model.norm.weight"]    '),
        (f"{ST}: malformed safetensors header (header is not a JSON object)",),
    ),
    Case(
        "header-json-string",
        "ct",
        raw_header(b'"model.norm.weight"'),
        ("malformed safetensors header (header is not a JSON object)",),
    ),
    Case(
        "header-invalid-utf8",
        "ct",
        raw_header(b"\xff\xfe\x00garbage"),
        (f"{ST}: malformed safetensors header ('utf-8' codec can't decode",),
    ),
    Case(
        "header-utf8-bom",
        "ct",
        header(lambda h: b"\xef\xbb\xbf" + json.dumps(h).encode()),
        ("malformed safetensors header (Unexpected UTF-8 BOM",),
    ),
    Case(
        "header-trailing-garbage",
        "ct",
        header(lambda h: json.dumps(h).encode() + b"xyz"),
        ("malformed safetensors header (Extra data",),
    ),
    Case(
        "header-nul-padding",
        "ct",
        header(lambda h: json.dumps(h).encode() + b"\x00" * 8),
        ("malformed safetensors header (Extra data",),
    ),
    Case(
        "header-nan-literal",
        "ct",
        header(lambda h: json.dumps(h).replace('"shape": [64]', '"shape": [NaN]', 1).encode()),
        ("malformed safetensors header (NaN is not a JSON value)",),
    ),
    Case(
        "header-infinity-offset",
        "ct",
        header(lambda h: json.dumps(h).replace("[0, ", "[0, Infinity, ", 1).encode()),
        ("malformed safetensors header (Infinity is not a JSON value)",),
    ),
    Case(
        "header-nested-too-deeply",
        "ct",
        raw_header(b'{"a": ' + deep(100_000) + b"}"),
        (f"{ST}: malformed safetensors header (nested too deeply)",),
    ),
    Case(
        "header-5000-digit-offset",
        "ct",
        header(lambda h: json.dumps(h).replace("[0, ", "[1" + "0" * 5000 + ", ", 1).encode()),
        ("malformed safetensors header (Exceeds the limit (4300 digits)",),
    ),
    Case(
        "header-duplicate-key",
        "ct",
        header(lambda h: json.dumps(h)[:-1].encode() + b', "%s": %s}' % (NORM.encode(), json.dumps(h[LM]).encode())),
        (f"{ST}: the header repeats the key '{NORM}' (duplicate JSON keys",),
    ),
    # -- __metadata__
    Case(
        "metadata-not-object",
        "ct",
        header(lambda h: h.update({"__metadata__": [1, 2]})),
        (f"{ST}: __metadata__ must map names to strings, found [1, 2]",),
    ),
    Case(
        "metadata-number-value",
        "ct",
        header(lambda h: h.update({"__metadata__": {"format": 5}})),
        ("__metadata__ must map names to strings, found {'format': 5}",),
    ),
    Case(
        "metadata-string",
        "ct",
        header(lambda h: h.update({"__metadata__": "pt"})),
        ("__metadata__ must map names to strings, found 'pt'",),
    ),
    # -- one tensor's entry
    Case(
        "entry-not-object",
        "ct",
        header(lambda h: h.update({NORM: [1, 2]})),
        (BAD_ENTRY + "expected an object with dtype, shape and data_offsets, found [1, 2]",),
    ),
    Case("entry-null", "ct", header(lambda h: h.update({NORM: None})), (BAD_ENTRY + "expected an object",)),
    Case("entry-missing-dtype", "ct", header(lambda h: h[NORM].pop("dtype")), (BAD_ENTRY + "dtype missing in",)),
    Case(
        "entry-missing-offsets",
        "ct",
        header(lambda h: h[NORM].pop("data_offsets")),
        (BAD_ENTRY + "data_offsets missing in",),
    ),
    Case(
        "dtype-unknown",
        "ct",
        entry(NORM, dtype="Q7"),
        (BAD_ENTRY + "dtype 'Q7' is not one fp8convert reads (F8_E4M3, F8_E5M2",),
    ),
    Case("dtype-lowercase", "ct", entry(NORM, dtype="bf16"), (BAD_ENTRY + "dtype 'bf16' is not one fp8convert reads",)),
    Case("dtype-number", "ct", entry(NORM, dtype=16), (BAD_ENTRY + "dtype 16 is not one",)),
    Case("dtype-unsupported-u32", "ct", entry(NORM, dtype="U32", shape=[32]), (BAD_ENTRY + "dtype 'U32' is not one",)),
    Case(
        "shape-string",
        "ct",
        entry(NORM, shape="64"),
        (BAD_ENTRY + "shape must be a list of integers >= 0, found '64'",),
    ),
    Case(
        "shape-negative",
        "ct",
        entry(f"{Q0}.weight", shape=[-64, -64]),
        (f"{ST}: tensor {Q0}.weight: malformed header entry (shape must be a list of integers >= 0, found [-64, -64]",),
    ),
    Case(
        "shape-float",
        "ct",
        entry(NORM, shape=[64.0]),
        (BAD_ENTRY + "shape must be a list of integers >= 0, found [64.0]",),
    ),
    Case(
        "shape-bool",
        "ct",
        entry(NORM, shape=[True]),
        (BAD_ENTRY + "shape must be a list of integers >= 0, found [True]",),
    ),
    Case("shape-null", "ct", entry(NORM, shape=None), (BAD_ENTRY + "shape must be a list",)),
    Case(
        "shape-nested",
        "ct",
        entry(NORM, shape=[[64]]),
        (BAD_ENTRY + "shape must be a list of integers >= 0, found [[64]]",),
    ),
    Case(
        "offsets-strings",
        "ct",
        header(lambda h: h[NORM].update(data_offsets=[str(v) for v in h[NORM]["data_offsets"]])),
        (BAD_ENTRY + "data_offsets must be two integers [begin, end] >= 0, found ['",),
    ),
    Case(
        "offsets-bools",
        "ct",
        entry(NORM, data_offsets=[True, True]),
        (BAD_ENTRY + "data_offsets must be two integers [begin, end] >= 0, found [True, True]",),
    ),
    Case(
        "offsets-negative",
        "ct",
        entry(LM, data_offsets=[-8, 8184]),
        (
            f"{ST}: tensor {LM}: malformed header entry (",
            "data_offsets must be two integers [begin, end] >= 0, found [-8, 8184]",
        ),
    ),
    Case(
        "offsets-three", "ct", entry(NORM, data_offsets=[0, 1, 2]), (BAD_ENTRY + "data_offsets must be two integers",)
    ),
    Case(
        "offsets-floats",
        "ct",
        header(lambda h: h[NORM].update(data_offsets=[float(v) for v in h[NORM]["data_offsets"]])),
        (BAD_ENTRY + "data_offsets must be two integers",),
    ),
    Case(
        "offsets-object",
        "ct",
        entry(NORM, data_offsets={"begin": 0, "end": 128}),
        (BAD_ENTRY + "data_offsets must be two integers",),
    ),
    Case(
        "offsets-reversed",
        "ct",
        header(lambda h: h[NORM].update(data_offsets=h[NORM]["data_offsets"][::-1])),
        (f"{ST}: tensor {NORM}: data_offsets [", "end before they begin"),
    ),
    Case(
        "offsets-beyond-file",
        "ct",
        header(lambda h: h[NORM].update(data_offsets=[v + 1000 for v in h[NORM]["data_offsets"]])),
        (f"{ST}: tensor {NORM}: data ends at byte", "but the file holds"),
    ),
    Case(
        "offsets-huge",
        "ct",
        header(lambda h: h[NORM].update(data_offsets=[2**62, 2**62 + 128])),
        (f"{ST}: tensor {NORM}: data ends at byte 4611686018427388032 but the file holds",),
    ),
    Case(
        "offsets-overlap",
        "ct",
        header(lambda h: h[NORM].update(data_offsets=list(h[f"{Q0}.weight_scale"]["data_offsets"]))),
        (f"{ST}: tensors {Q0}.weight_scale and {NORM} overlap in the data section",),
    ),
    Case(
        "offsets-gap",
        "ct",
        header(
            lambda h: [
                e.update(data_offsets=[v + 16 for v in e["data_offsets"]])
                for k, e in h.items()
                if k != LM and k != "__metadata__"
            ]
        ),
        ("unused bytes before tensor", "(the format allows no gaps)"),
    ),
    Case(
        "trailing-bytes",
        "ct",
        lambda src: (src / ST).write_bytes((src / ST).read_bytes() + bytes(16)),
        (f"{ST}: 16 trailing bytes after the last tensor (the format allows none)",),
    ),
    Case(
        "shape-disagrees-with-bytes",
        "ct",
        entry(f"{Q0}.weight", shape=[64, 32]),
        (f"{ST}: tensor {Q0}.weight: header offsets span 4096 bytes but F8_E4M3 [64, 32] needs 2048",),
    ),
    Case(
        "huge-dims",
        "ct",
        entry(NORM, shape=[2**40, 2**40]),
        (f"{ST}: tensor {NORM}: header offsets span 128 bytes but BF16 [1099511627776, 1099511627776] needs",),
        heavy=True,
    ),
    Case(
        "huge-rank",
        "ct",
        entry(NORM, shape=[2] * 64),
        (f"{ST}: tensor {NORM}: header offsets span 128 bytes but BF16 [2, 2,",),
    ),
    Case(
        "zero-dim-times-huge",
        "ct",
        entry(NORM, shape=[0, 2**62], data_offsets=[0, 0]),
        (f"{ST}: tensor {NORM} is empty (BF16 [0, 4611686018427387904]): a model's tensors never are",),
    ),
    Case(
        "zero-sized-weight",
        "ct",
        replace(f"{Q0}.weight", torch.zeros(0, 64, dtype=torch.float8_e4m3fn)),
        (f"{ST}: tensor {Q0}.weight is empty (F8_E4M3 [0, 64])",),
    ),
    Case(
        "zero-sized-scale",
        "ct",
        replace(f"{Q0}.weight_scale", torch.zeros(0, 1, dtype=torch.bfloat16)),
        (f"{ST}: tensor {Q0}.weight_scale is empty (BF16 [0, 1])",),
    ),
    Case(
        "zero-sized-norm",
        "ct",
        replace(NORM, torch.zeros(0, dtype=torch.bfloat16)),
        (f"{ST}: tensor {NORM} is empty (BF16 [0])",),
    ),
    Case(
        "name-empty",
        "ct",
        header(lambda h: h.update({"": h.pop(NORM)})),
        (f"{ST}: tensor name '' is empty or holds control or invalid characters",),
    ),
    Case(
        "name-newline",
        "ct",
        header(lambda h: h.update({"model.norm\nweight": h.pop(NORM)})),
        (f"{ST}: tensor name 'model.norm\\nweight' is empty or holds control",),
    ),
    Case(
        "name-lone-surrogate",
        "ct",
        header(lambda h: h.update({"model.\ud800.weight": h.pop(NORM)})),
        (f"{ST}: tensor name 'model.\\ud800.weight' is empty or holds control",),
    ),
    Case(
        "many-bad-entries",
        "ct",
        header(lambda h: h.update({f"junk.{i}": [i] for i in range(1000)})),
        (f"{ST}: tensor junk.0: malformed header entry", f"{ST}: ... and 980 more problem(s) in this file"),
    ),
    # -- the set of shards, the index, links
    Case(
        "index-not-json",
        "ct3",
        write(INDEX, '{"weight_map": {'),
        ("{src}/" + INDEX + ": safetensors index is not valid JSON (Expecting", "re-download the file"),
        "CheckpointError",
    ),
    Case(
        "index-json-list",
        "ct3",
        write(INDEX, "[1, 2]"),
        ("{src}/" + INDEX + ": safetensors index must hold a JSON object, found list",),
    ),
    Case(
        "index-nan",
        "ct3",
        write(INDEX, '{"weight_map": {"a": NaN}}'),
        ("safetensors index is not valid JSON (NaN is not a JSON value)",),
    ),
    Case(
        "index-nested-too-deeply",
        "ct3",
        write(INDEX, b'{"weight_map": ' + deep(100_000) + b"}"),
        ("safetensors index is not valid JSON (nested too deeply)",),
    ),
    Case(
        "index-no-weight-map",
        "ct3",
        index(lambda i: i.pop("weight_map")),
        ("{src}/" + INDEX + ": index has no weight_map (tensor name -> shard file), found None",),
    ),
    Case(
        "index-weight-map-list",
        "ct3",
        index(lambda i: i.update(weight_map=[SHARD1])),
        (f"index has no weight_map (tensor name -> shard file), found ['{SHARD1}']",),
    ),
    Case(
        "index-weight-map-empty",
        "ct3",
        index(lambda i: i.update(weight_map={})),
        ("index has no weight_map (tensor name -> shard file), found {}",),
    ),
    Case(
        "index-values-not-strings",
        "ct3",
        index(lambda i: i["weight_map"].update({NORM: 3, LM: None})),
        ("index weight_map maps 2 tensor(s) to something other than a file name", f"{NORM}: 3", f"{LM}: None"),
    ),
    Case(
        "index-duplicate-key",
        "ct3",
        index(lambda i: json.dumps(i)[:-2] + f', "{NORM}": "{SHARD1}"}}}}'),
        (f"safetensors index repeats the key(s) '{NORM}' (duplicate JSON keys",),
    ),
    Case(
        "index-parent-dir",
        "ct3",
        both(
            lambda src: (src.parent / "x.safetensors").write_bytes((src / SHARD2).read_bytes()),
            rename_shard(SHARD2, "../x.safetensors"),
        ),
        (
            "{src}/" + INDEX + ": index names the file '../x.safetensors', which is outside the checkpoint directory",
            "the index is corrupt or malicious",
        ),
    ),
    Case(
        "index-absolute-path",
        "ct3",
        rename_shard(SHARD2, "/etc/passwd"),
        ("index names the file '/etc/passwd', which is outside the checkpoint directory",),
    ),
    Case(
        "index-subdirectory",
        "ct3",
        both(
            lambda src: (src / "sub").mkdir(),
            lambda src: (src / SHARD2).rename(src / "sub" / SHARD2),
            rename_shard(SHARD2, f"sub/{SHARD2}"),
        ),
        (f"index names the file 'sub/{SHARD2}', which is outside the checkpoint directory",),
    ),
    Case(
        "index-dot-slash",
        "ct3",
        rename_shard(SHARD2, f"./{SHARD2}"),
        (f"index names the file './{SHARD2}', which is not a plain file name in the checkpoint directory",),
    ),
    Case(
        "index-nul-in-name",
        "ct3",
        rename_shard(SHARD2, f"{SHARD2}\x00.txt"),
        ("which is not a plain file name in the checkpoint directory",),
    ),
    Case(
        "index-empty-name",
        "ct3",
        rename_shard(SHARD2, ""),
        ("index names the file '', which is outside the checkpoint directory",),
    ),
    Case(
        "index-missing-shard",
        "ct3",
        remove(SHARD2),
        (
            "{src}/" + INDEX + ": 1 shard(s) named by the index are missing",
            f"{SHARD2} (holds 18 tensors)",
            "download the missing files again",
        ),
        "MissingTensorError",
    ),
    Case(
        "index-dangling-symlink",
        "ct3",
        symlink(SHARD2, "gone.safetensors"),
        (f"{SHARD2} (holds 18 tensors) is a broken symlink",),
        "MissingTensorError",
    ),
    Case(
        "index-tensor-in-no-shard",
        "ct3",
        index(lambda i: i["weight_map"].update({"model.ghost.weight": SHARD1})),
        (f"{INDEX} lists model.ghost.weight in {SHARD1}, but no shard holds it",),
    ),
    Case(
        "index-tensor-in-other-shard",
        "ct3",
        index(lambda i: i["weight_map"].update({NORM: SHARD1})),
        (f"{INDEX} lists {NORM} in {SHARD1}, but it is in {SHARD3}",),
    ),
    Case(
        "index-too-large",
        "ct3",
        both(write(INDEX, b""), truncate(150 * MB, INDEX)),
        ("safetensors index is 150,000,000 bytes, more than the 100,000,000 fp8convert reads",),
    ),
    Case(
        "index-names-config-json",
        "ct3",
        rename_shard(SHARD2, "config.json"),
        ("config.json: header length", "is larger than the 100,000,000 bytes safetensors allows (corrupt, or not a"),
    ),
    Case(
        "index-names-itself",
        "ct3",
        rename_shard(SHARD2, INDEX),
        ("{src}: 1 problem(s) in the safetensors files", f"{INDEX}: header length", "is larger than the 100,000,000"),
    ),
    Case(
        "index-with-50k-missing-shards",
        "ct3",
        index(lambda i: i.update(weight_map={f"t{n}": f"shard-{n}.safetensors" for n in range(50_000)})),
        (
            "50000 shard(s) named by the index are missing",
            "shard-0.safetensors (holds 1 tensors)",
            "... and 49,980 more",
        ),
        "MissingTensorError",
    ),
    Case(
        "index-symlink-outside",
        "ct3",
        link_outside(INDEX),
        (
            "{src}: 1 file(s) lead outside the checkpoint directory",
            f"{INDEX} is a symlink to",
            "fp8convert never follows a link out of it",
        ),
    ),
    Case(
        "shard-symlink-outside",
        "ct3",
        link_outside(SHARD2),
        (
            "{src}: 1 shard(s) cannot be read",
            f"{SHARD2} is a symlink to",
            "elsewhere/" + SHARD2 + ", outside the checkpoint directory",
        ),
    ),
    Case(
        "shard-symlink-outside-no-index",
        "ct",
        link_outside(ST),
        (f"{ST} is a symlink to", ", outside the checkpoint directory"),
    ),
    Case("shard-symlink-loop", "ct", both(remove(ST), symlink(ST, ST)), (f"{ST} is a symlink loop",)),
    Case(
        "shard-dangling-symlink-no-index",
        "ct",
        symlink("model-00002.safetensors", "gone.safetensors"),
        ("model-00002.safetensors is a broken symlink (its target gone.safetensors is missing)",),
    ),
    Case(
        "shard-is-a-directory",
        "ct",
        lambda src: (src / "extra.safetensors").mkdir(),
        ("{src}: 1 shard(s) cannot be read", "extra.safetensors is a directory, not a safetensors file"),
    ),
    Case("shard-is-a-fifo", "ct", fifo(ST), (f"{ST} is not a regular file (a device, socket or pipe)",)),
    Case(
        "shard-listed-twice-hardlink",
        "ct3",
        hardlink_twice,
        (f"{SHARD2} and copy.safetensors are the same file (linked twice); a shard must be listed once",),
    ),
    Case(
        "shard-listed-twice-symlink",
        "ct3",
        both(
            symlink("alias.safetensors", SHARD2), index(lambda i: i["weight_map"].update({NORM: "alias.safetensors"}))
        ),
        (f"{SHARD2} and alias.safetensors are the same file (linked twice)",),
    ),
    Case(
        "tensor-in-two-shards",
        "ct",
        second_copy,
        (
            f"tensor {LM} appears in both model-copy.safetensors and {ST}",
            f"more tensors of {ST} are in an earlier shard too",
        ),
    ),
    Case(
        "no-safetensors-only-pickle",
        "ct",
        no_shards_only_bin,
        (
            "{src}: no *.safetensors files found; only pytorch_model.bin (pickle or GGUF formats, which fp8convert "
            "never reads)",
        ),
    ),
    Case(
        "config-symlink-outside",
        "ct",
        link_outside("config.json"),
        ("config.json is a symlink to", "outside the checkpoint directory"),
    ),
    Case(
        "tokenizer-symlink-to-a-secret",
        "ct",
        link_outside("tokenizer.json", secret=True),
        ("tokenizer.json is a symlink to", "elsewhere/tokenizer.json, outside the checkpoint directory"),
    ),
    Case(
        "no-files-at-all",
        "ct",
        lambda src: [p.unlink() for p in src.iterdir()],
        ("{src}: no *.safetensors files found", "fp8convert reads safetensors only (never unpickles)"),
    ),
    Case(
        "header-without-tensors-but-data",
        "ct",
        raw_header(b"{}"),
        (f"{ST}:", "trailing bytes after the last tensor (the format allows none)"),
    ),
    # -- config.json
    Case("config-missing", "ct", remove("config.json"), ("{src}/config.json: config.json not found",)),
    Case(
        "config-not-json",
        "ct",
        write("config.json", '{"architectures": ["LlamaForCausalLM"],'),
        ("{src}/config.json: config.json is not valid JSON", "re-download the file"),
    ),
    Case(
        "config-json-list",
        "ct",
        write("config.json", "[]"),
        ("{src}/config.json: config.json must hold a JSON object, found list",),
    ),
    Case(
        "config-not-utf8",
        "ct",
        write("config.json", b'{"a": "\xff"}'),
        ("config.json is not valid JSON ('utf-8' codec can't decode",),
    ),
    Case(
        "config-utf8-bom",
        "ct",
        lambda src: (src / "config.json").write_bytes(b"\xef\xbb\xbf" + (src / "config.json").read_bytes()),
        ("config.json is not valid JSON (Unexpected UTF-8 BOM",),
    ),
    Case(
        "config-nan",
        "ct",
        config(lambda c: json.dumps(c).replace('"vocab_size": 64', '"vocab_size": NaN')),
        ("config.json is not valid JSON (NaN is not a JSON value)",),
    ),
    Case(
        "config-is-a-directory",
        "ct",
        both(remove("config.json"), lambda src: (src / "config.json").mkdir()),
        ("{src}/config.json: config.json is not a regular file",),
    ),
    Case(
        "config-2m-nested-lists",
        "ct",
        write("config.json", b'{"a": [' + b"[]," * 2_100_000 + b"[]]}"),
        ("{src}/config.json: config.json holds about 4,200,003 JSON values, more than the 2,000,000 fp8convert reads",),
    ),
    Case(
        "config-nested-too-deeply",
        "ct",
        write("config.json", b'{"a": ' + deep(100_000) + b"}"),
        ("config.json is not valid JSON (nested too deeply)",),
    ),
    Case(
        "config-hidden-size-string",
        "ct",
        config(lambda c: c.update(hidden_size="4096")),
        (CONFIG_FIELDS, "hidden_size is '4096'; expected a positive integer", "fix config.json"),
        "CheckpointError",
        heavy=True,
    ),
    Case(
        "config-layers-negative",
        "ct",
        config(lambda c: c.update(num_hidden_layers=-2)),
        ("num_hidden_layers is -2; expected a positive integer",),
    ),
    Case(
        "config-heads-zero",
        "ct",
        config(lambda c: c.update(num_attention_heads=0)),
        ("num_attention_heads is 0; expected a positive integer",),
    ),
    Case(
        "config-vocab-float",
        "ct",
        config(lambda c: c.update(vocab_size=64.0)),
        ("vocab_size is 64.0; expected a positive integer",),
    ),
    Case(
        "config-heads-bool",
        "ct",
        config(lambda c: c.update(num_key_value_heads=True)),
        ("num_key_value_heads is True; expected a positive integer",),
    ),
    Case(
        "config-architectures-string",
        "ct",
        config(lambda c: c.update(architectures="LlamaForCausalLM")),
        ("architectures is 'LlamaForCausalLM'; expected a list of class names",),
    ),
    Case(
        "config-architectures-object",
        "ct",
        config(lambda c: c.update(architectures={"0": "LlamaForCausalLM"})),
        ("architectures is {'0': 'LlamaForCausalLM'}; expected a list",),
    ),
    Case(
        "config-model-type-number",
        "ct",
        config(lambda c: c.update(model_type=7)),
        ("model_type is 7; expected a string",),
    ),
    Case(
        "config-torch-dtype-unknown",
        "ct",
        config(lambda c: c.update(torch_dtype="float128")),
        ("torch_dtype is 'float128'; expected one of bfloat16, float16, float32, float64",),
    ),
    Case(
        "config-two-wrong-fields",
        "ct",
        config(lambda c: c.update(hidden_size=[64], dtype=16)),
        ("config.json has 2 field(s) no model can have", "hidden_size is [64]", "dtype is 16"),
    ),
    Case(
        "config-quantization-config-list",
        "ct",
        config(lambda c: c.update(quantization_config=[c["quantization_config"]])),
        ("quantization_config is [{", "; expected an object"),
    ),
    Case(
        "config-text-config-list",
        "ct",
        config(lambda c: c.update(text_config=[])),
        ("text_config is []; expected an object",),
    ),
    Case(
        "config-text-config-hidden-size",
        "ct",
        config(lambda c: c.update(text_config={"hidden_size": "64"})),
        ("text_config.hidden_size is '64'; expected a positive integer",),
    ),
    Case(
        "config-no-quantization-config",
        "ct",
        config(lambda c: c.pop("quantization_config")),
        ("{src}: no supported FP8 layout recognised", "config.json has no quantization_config"),
        "UnknownFormatError",
    ),
    Case(
        "config-quant-method-number",
        "ct",
        qc(lambda q: q.update(quant_method=5)),
        ("{src}: no supported FP8 layout recognised", "quant_method=5"),
        "UnknownFormatError",
    ),
    Case(
        "config-groups-string",
        "ct",
        qc(lambda q: q.update(config_groups="group_0")),
        (CT_CONFIG, "quantization_config.config_groups is missing or empty"),
        "UnsupportedSchemeError",
    ),
    Case(
        "config-group-not-object",
        "ct",
        qc(lambda q: q["config_groups"].update(group_0="float")),
        ("group group_0: expected an object (targets, weights, ...), found 'float'",),
    ),
    Case(
        "config-weights-not-object", "ct", group(lambda g: g.update(weights=[8])), ("group group_0: no weights scheme",)
    ),
    Case(
        "config-input-activations-string",
        "ct",
        group(lambda g: g.update(input_activations="dynamic")),
        ("group group_0: input_activations must be an object or null, found 'dynamic'",),
    ),
    Case(
        "config-targets-string",
        "ct",
        group(lambda g: g.update(targets="Linear")),
        ("group group_0: targets must be a list of module names or 're:' patterns, found 'Linear'",),
    ),
    Case(
        "config-ignore-string",
        "ct",
        qc(lambda q: q.update(ignore="lm_head")),
        ("ignore must be a list of module names or 're:' patterns, found 'lm_head'",),
    ),
    Case(
        "config-ignore-bad-regex",
        "ct",
        qc(lambda q: q.update(ignore=["re:(lm_head"])),
        ("ignore entry 're:(lm_head' is not a valid regular expression (missing ), unterminated subpattern",),
    ),
    Case(
        "config-num-bits-string",
        "ct",
        group(lambda g: g["weights"].update(num_bits="8")),
        ("group group_0: weights are type='float' num_bits='8'; only 8-bit float (FP8)",),
    ),
    Case(
        "config-block-structure-wrong",
        "block",
        group(lambda g: g["weights"].update(block_structure=[128])),
        ("block strategy needs block_structure [rows, cols], found [128]",),
    ),
    Case(
        "config-strategy-number",
        "ct",
        group(lambda g: g["weights"].update(strategy=1)),
        ("weight strategy 1 is not supported",),
    ),
    # -- tensors whose dtype, shape or values are wrong
    Case(
        "scale-nan",
        "ct3",
        set_value(f"{Q0}.weight_scale", float("nan")),
        (f"{Q0}.weight_scale ({SHARD2}): 1 NaN scale value(s)", FOUND, "fix or re-export the checkpoint"),
        "CheckpointError",
        heavy=True,
    ),
    Case(
        "scale-inf",
        "ct",
        set_value(f"{Q0}.weight_scale", float("inf")),
        (f"{Q0}.weight_scale ({ST}): 1 Inf scale value(s)",),
    ),
    Case(
        "scale-zero", "ct", set_value(f"{Q0}.weight_scale", 0.0), (f"{Q0}.weight_scale ({ST}): 1 zero scale value(s)",)
    ),
    Case(
        "scale-negative",
        "ct",
        set_value(f"{Q0}.weight_scale", -0.01),
        (f"{Q0}.weight_scale ({ST}): 1 negative scale value(s)",),
    ),
    Case(
        "scale-huge",
        "ct",
        set_value(f"{Q0}.weight_scale", 3e38),
        (f"{Q0}.weight_scale ({ST}): 1 huge (> 7.57e+35: 448 x scale overflows bf16) scale value(s)",),
    ),
    Case(
        "input-scale-nan",
        "static",
        set_value(f"{Q0}.input_scale", float("nan")),
        (f"{Q0}.input_scale ({ST}): 1 NaN scale value(s)",),
    ),
    Case(
        "input-scale-zero",
        "static",
        set_value(f"{Q0}.input_scale", 0.0),
        (f"{Q0}.input_scale ({ST}): 1 zero scale value(s)",),
    ),
    Case(
        "kv-scale-negative",
        "kv",
        set_value("model.layers.0.self_attn.k_scale", -1.0),
        ("model.layers.0.self_attn.k_scale (model.safetensors): 1 negative KV-cache scale value(s)",),
    ),
    Case(
        "block-scale-nan",
        "fp8",
        set_value(f"{Q0}.weight_scale_inv", float("nan")),
        (f"{Q0}.weight_scale_inv ({ST}): 1 NaN scale value(s)",),
    ),
    Case(
        "fp8-nan-codes",
        "ct",
        fp8_codes(f"{Q0}.weight", 0x7F, 0xFF),
        (f"{Q0}.weight ({ST}): 2 fp8 NaN code(s) in the weight",),
    ),
    Case(
        "scale-int-dtype",
        "ct",
        replace(f"{Q0}.weight_scale", torch.ones(64, 1, dtype=torch.int32)),
        (f"{Q0}.weight_scale ({ST}) has dtype int32; expected bf16, f16 or f32",),
        "UnsupportedSchemeError",
    ),
    Case(
        "scale-e8m0-dtype",
        "ct",
        replace(f"{Q0}.weight_scale", torch.ones(64, 1).to(torch.float8_e8m0fnu)),
        (f"{Q0}.weight_scale ({ST}) has dtype float8_e8m0fnu; expected bf16, f16 or f32",),
    ),
    Case(
        "scale-float64-dtype",
        "ct",
        tensors(lambda t: t.update({f"{Q0}.weight_scale": t[f"{Q0}.weight_scale"].double()})),
        (f"{Q0}.weight_scale ({ST}) has dtype float64; expected bf16, f16 or f32",),
    ),
    Case(
        "scale-fp8-dtype",
        "ct",
        tensors(lambda t: t.update({f"{Q0}.weight_scale": t[f"{Q0}.weight_scale"].to(torch.float8_e4m3fn)})),
        (f"{Q0}.weight_scale ({ST}) has dtype float8_e4m3fn; expected bf16, f16 or f32",),
    ),
    Case(
        "scale-wrong-shape",
        "ct",
        replace(f"{Q0}.weight_scale", torch.full((2, 1), 0.01).bfloat16()),
        (f"{Q0}.weight_scale ({ST}) has shape [2, 1], but channel scales for weight [64, 64] must be [64, 1]",),
        "UnsupportedSchemeError",
    ),
    Case(
        "block-scale-wrong-shape",
        "block",
        replace(f"{Q0}.weight_scale", torch.full((64,), 0.01).bfloat16()),
        (f"{Q0}.weight_scale ({ST}) has shape [64], but block 128x128 scales for weight [64, 64] must be [1, 1]",),
    ),
    Case(
        "scale-missing",
        "ct",
        tensors(lambda t: t.pop(f"{Q0}.weight_scale")),
        (
            f"{Q0}.weight ({ST}) is float8_e4m3fn but has no scale",
            f"looked for {Q0}.weight_scale, group group_0 strategy channel",
        ),
        "MissingTensorError",
    ),
    Case(
        "scale-without-weight",
        "ct",
        replace("model.foo.weight_scale", torch.ones(1).bfloat16()),
        ("model.foo.weight_scale (model.safetensors): a quantization parameter whose module has no fp8 weight",),
    ),
    Case(
        "weight-float32-with-scale",
        "ct",
        tensors(lambda t: t.update({f"{Q0}.weight": t[f"{Q0}.weight"].float()})),
        (f"{Q0}.weight ({ST}) is float32 but has weight_scale: the weights are not stored in fp8",),
    ),
    Case(
        "weight-uint8-with-scale",
        "ct",
        tensors(lambda t: t.update({f"{Q0}.weight": t[f"{Q0}.weight"].view(torch.uint8)})),
        (f"{Q0}.weight ({ST}) is uint8 but has weight_scale",),
    ),
    Case(
        "weight-1d",
        "ct",
        tensors(lambda t: t.update({f"{Q0}.weight": t[f"{Q0}.weight"].reshape(-1)})),
        (f"{Q0}.weight ({ST}): fp8 weight of shape [4096]; only 2-D [out, in] linear weights are supported",),
    ),
    Case(
        "weight-e5m2-inf-codes",
        "ct",
        tensors(lambda t: t.update({f"{Q0}.weight": t[f"{Q0}.weight"].view(torch.float8_e5m2)})),
        (f"{Q0}.weight ({ST}):", "fp8 NaN/Inf code(s) in the weight"),
    ),
    Case(
        "fp8-norm",
        "ct",
        tensors(lambda t: t.update({NORM: t[NORM].to(torch.float8_e4m3fn)})),
        (f"{NORM} ({ST}): fp8 weight of shape [64]; only 2-D",),
    ),
    Case(
        "bias-wrong-shape",
        "ct",
        replace(f"{Q0}.bias", torch.ones(3, dtype=torch.bfloat16)),
        (f"{Q0}.bias ({ST}) is bfloat16 [3]; expected a float [64]",),
    ),
    Case(
        "input-scale-on-dynamic",
        "ct",
        replace(f"{Q0}.input_scale", torch.ones(1, dtype=torch.bfloat16)),
        (
            f"{Q0}.input_scale ({ST}) is present, but "
            "group group_0 has dynamic-token input activations (config and tensors disagree)",
        ),
    ),
    Case(
        "input-scale-missing",
        "static",
        tensors(lambda t: t.pop(f"{Q0}.input_scale")),
        (f"{Q0}.input_scale is missing, but group group_0 has static per-tensor input activations",),
    ),
    Case(
        "zero-point-non-zero",
        "ct",
        replace(f"{Q0}.weight_zero_point", torch.eye(64, 1).bfloat16()),
        (f"{Q0}.weight_zero_point ({ST}): non-zero zero point; asymmetric quantization is not supported",),
    ),
    # -- other layouts' config files
    Case(
        "mistral-params-dim-string",
        "mistral",
        json_file("params.json", lambda p: p.update(dim="64")),
        ("params.json dim is '64'; expected a positive integer",),
    ),
    Case(
        "mistral-params-heads-zero",
        "mistral",
        json_file("params.json", lambda p: p.update(n_heads=0)),
        ("params.json n_heads is 0; expected a positive integer",),
    ),
    Case(
        "mistral-params-not-json",
        "mistral",
        write("params.json", "{"),
        ("{src}/params.json: params.json is not valid JSON",),
    ),
    Case(
        "quark-export-not-object",
        "quark",
        qc(lambda q: q.update(export="safetensors")),
        ("unsupported Quark configuration", "export is 'safetensors', expected an object"),
    ),
    Case(
        "quark-exclude-number",
        "quark",
        qc(lambda q: q.update(exclude=5)),
        ("exclude is 5, expected a list of module names or patterns",),
    ),
    Case(
        "quark-exclude-bad-regex",
        "quark",
        qc(lambda q: q.update(exclude=["re:[lm_head"])),
        ("exclude entry 're:[lm_head' is not a valid regular expression (unterminated character set",),
    ),
    Case(
        "fp8-block-size-zero",
        "fp8",
        qc(lambda q: q.update(weight_block_size=[0, 128])),
        ("weight_block_size=[0, 128]: expected null (per-tensor) or [rows, cols] of positive ints",),
    ),
]
