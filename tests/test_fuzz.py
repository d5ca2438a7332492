"""Fuzzing the readers of untrusted bytes with hypothesis: safetensors headers (``headers.parse_header``), the index
and the set of shard files (``shards.Checkpoint``), and config.json / params.json / hf_quant_config.json (what
``formats.open_source`` reads).

The only allowed outcomes are a result (whose ``problems`` list what is wrong) or an fp8convert error; never
another exception, and never a file read outside the checkpoint directory. A header the parser accepts without a
problem must also load, identically, with the safetensors library.

Bounded for CI: 400 examples a test, a few seconds in all, derived from a fixed seed (runs are reproducible).
Run longer, on new random examples each time, with ``FP8CONVERT_FUZZ_EXAMPLES=5000 pytest tests/test_fuzz.py``.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from hostile_cases import BASES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from fp8convert.errors import Fp8ConvertError
from fp8convert.formats import open_source
from fp8convert.headers import MAX_PROBLEMS, parse_header
from fp8convert.shards import INDEX_NAME, Checkpoint
from fp8convert.spec import DTYPE_TO_ST, ST_TO_DTYPE

EXAMPLES = int(os.environ.get("FP8CONVERT_FUZZ_EXAMPLES", "400"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    # CI: the same examples on every run, so a failure reproduces; a long local run explores new ones each time
    # (hypothesis prints the failing example and a @reproduce_failure line)
    derandomize="FP8CONVERT_FUZZ_EXAMPLES" not in os.environ,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


# ---- files opened outside the checkpoint ----------------------------------------------------------------
class Opens:
    """Records every file opened (Python's ``open`` audit event) while ``watch`` is on."""

    def __init__(self) -> None:
        self.paths: list[str] | None = None
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple) -> None:
        if event == "open" and self.paths is not None and isinstance(args[0], str | bytes | os.PathLike):
            self.paths.append(os.path.realpath(os.fsdecode(args[0])))

    def outside(self, root: Path, watched: Path, fn: Callable[[], object]) -> list[str]:
        """Call ``fn()``; return the files it opened outside ``root``: under ``watched`` (where the decoys are),
        or /etc/passwd (which hostile indexes name)."""
        self.paths = []
        try:
            fn()
        finally:
            opened, self.paths = self.paths, None
        real_root, watched_dir = os.path.realpath(root) + os.sep, os.path.realpath(watched) + os.sep
        return [p for p in opened if (p.startswith(watched_dir) or p == "/etc/passwd") and not p.startswith(real_root)]


OPENS = Opens()


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fp8convert-fuzz-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# ---- strategies ----------------------------------------------------------------------------------------
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
DTYPES = st.sampled_from([*ST_TO_DTYPE, "Q7", "bf16", "U32", "F4", ""])
SHAPES = st.lists(st.integers(-2, 40), max_size=3) | st.lists(st.sampled_from([0, 1, 2**31, 2**62, 2**64]), max_size=3)
OFFSETS = st.lists(st.integers(-4, 400), min_size=2, max_size=2) | st.lists(st.integers(0, 2**65), max_size=3)
ENTRY = (
    st.fixed_dictionaries({"dtype": DTYPES, "shape": SHAPES, "data_offsets": OFFSETS})
    | st.fixed_dictionaries({"dtype": DTYPES | JSON, "shape": SHAPES | JSON, "data_offsets": OFFSETS | JSON})
    | JSON
)
NAMES = st.sampled_from(["a", "b", "model.norm.weight", "__metadata__", "", "a\nb", "\ud800"]) | st.text(max_size=10)
METADATA = st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=2) | JSON


@st.composite
def consistent_header(draw: st.DrawFn) -> tuple[dict, bytes]:
    """A header whose entries mostly tile the data exactly (valid files, so that acceptance gets tested too)."""
    header: dict[str, object] = {}
    data, offset = b"", 0
    for name in draw(st.lists(st.text(min_size=1, max_size=8), max_size=4, unique=True)):
        dtype = draw(st.sampled_from(sorted(ST_TO_DTYPE)))
        shape = draw(st.lists(st.integers(1, 4), max_size=3))
        n = ST_TO_DTYPE[dtype].itemsize
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        data += draw(st.binary(min_size=n, max_size=n))
        offset += n
    if draw(st.booleans()):
        header["__metadata__"] = draw(METADATA)
    return header, data


@st.composite
def header_file(draw: st.DrawFn) -> bytes:
    """The bytes of a safetensors file: a JSON header (tiled, or random entries), maybe a lying length, data."""
    if draw(st.booleans()):
        header, data = draw(consistent_header())
    else:
        header, data = draw(st.dictionaries(NAMES, ENTRY, max_size=5)), draw(st.binary(max_size=300))
    text = json.dumps(header).encode()
    text = draw(st.sampled_from([text, text + b"    ", b" " + text, text + b"\x00", text[: len(text) // 2]]))
    length = len(text) + draw(st.sampled_from([0, 0, 0, 1, -1, 8, 2**40, 2**64 - 1 - len(text)]))
    return struct.pack("<Q", max(0, length)) + text + data


# ---- safetensors headers -------------------------------------------------------------------------------
def parse(path: Path, data: bytes) -> tuple:
    path.write_bytes(data)
    result = parse_header(path)
    tensors, meta, start, problems = result
    assert isinstance(tensors, dict) and isinstance(meta, dict) and isinstance(start, int)
    assert isinstance(problems, list) and all(isinstance(p, str) and p.startswith(path.name) for p in problems)
    assert len(problems) <= MAX_PROBLEMS + 1  # and the "... and N more" line
    return result


@FUZZ
@given(data=st.binary(max_size=512) | st.binary(max_size=24).map(lambda b: struct.pack("<Q", len(b)) + b))
def test_parse_header_of_arbitrary_bytes(scratch: Path, data: bytes) -> None:
    tensors, _meta, _start, problems = parse(scratch / "any.safetensors", data)
    if not problems:
        assert all(0 < ref.nbytes and ref.offset + ref.nbytes <= len(data) for ref in tensors.values())


@FUZZ
@given(data=header_file())
def test_parse_header_of_structured_headers(scratch: Path, data: bytes) -> None:
    """A header without problems loads the same with the safetensors library, and its tensors read back."""
    path = scratch / "structured.safetensors"
    tensors, meta, start, problems = parse(path, data)
    if problems:
        return
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(tensors)
        assert (f.metadata() or {}) == meta
        for key, ref in tensors.items():
            assert f.get_slice(key).get_dtype() == DTYPE_TO_ST[ref.dtype]
            assert tuple(f.get_slice(key).get_shape()) == ref.shape
            raw = data[ref.offset : ref.offset + ref.nbytes]
            assert f.get_tensor(key).reshape(-1).view(torch.uint8).tolist() == list(raw)
    assert start == 8 + struct.unpack("<Q", data[:8])[0]


# ---- the index and the set of shards -------------------------------------------------------------------
TENSOR = {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}
SHARDS = ("s1.safetensors", "s2.safetensors")
#: entries an example may add to the checkpoint directory: name -> what it is
EXTRAS = {
    "link.safetensors": "symlink to the decoy outside (absolute)",
    "rel.safetensors": "symlink to the decoy outside (relative)",
    "dead.safetensors": "dangling symlink",
    "loop.safetensors": "symlink to itself",
    "dir.safetensors": "directory",
    "hard.safetensors": "hardlink of s1",
    "alias.safetensors": "symlink to s1",
}
FILE_NAMES = st.sampled_from(
    [
        *SHARDS,
        *EXTRAS,
        "missing.safetensors",
        "../outside/secret.safetensors",
        "/etc/passwd",
        "SECRET",  # replaced by the decoy's absolute path
        "",
        ".",
        "..",
        "./s1.safetensors",
        "s1.safetensors/",
        "sub/s1.safetensors",
        "s1.safetensors\x00x",
        INDEX_NAME,
        "config.json",
    ]
)
WEIGHT_MAP = st.dictionaries(
    st.sampled_from(["a", "b", "secret", "c"]) | st.text(max_size=6), FILE_NAMES | JSON, max_size=6
)
INDEX = (
    st.fixed_dictionaries({"weight_map": WEIGHT_MAP}, optional={"metadata": JSON})
    | st.fixed_dictionaries({"weight_map": JSON})
    | JSON
)


def write_shard(path: Path, key: str) -> None:
    save_file({key: torch.ones(2, dtype=torch.bfloat16)}, str(path))


@pytest.fixture(scope="module")
def decoy(scratch: Path) -> Path:
    """A valid shard outside every checkpoint directory: reading it is the bug the index fuzz looks for."""
    path = scratch / "outside" / "secret.safetensors"
    path.parent.mkdir()
    write_shard(path, "secret")
    return path


def make_checkpoint(root: Path, decoy: Path, extras: list[str], index: object | bytes | None) -> None:
    root.mkdir()
    write_shard(root / SHARDS[0], "a")
    write_shard(root / SHARDS[1], "b")
    makers = {
        "link.safetensors": lambda p: os.symlink(decoy, p),
        "rel.safetensors": lambda p: os.symlink(os.path.relpath(decoy, root), p),
        "dead.safetensors": lambda p: os.symlink("nothing-here", p),
        "loop.safetensors": lambda p: os.symlink(p.name, p),
        "dir.safetensors": lambda p: p.mkdir(),
        "hard.safetensors": lambda p: os.link(root / SHARDS[0], p),
        "alias.safetensors": lambda p: os.symlink(SHARDS[0], p),
    }
    for name in extras:
        makers[name](root / name)
    if index is not None:
        if isinstance(index, bytes):
            (root / INDEX_NAME).write_bytes(index)
        else:
            text = json.dumps(index).replace('"SECRET"', json.dumps(str(decoy)))
            (root / INDEX_NAME).write_text(text)


@FUZZ
@given(
    extras=st.lists(st.sampled_from(sorted(EXTRAS)), unique=True, max_size=3),
    index=st.none() | INDEX | st.binary(max_size=64),
)
def test_index_and_shard_files(scratch: Path, decoy: Path, extras: list[str], index: object) -> None:
    root = Path(tempfile.mkdtemp(dir=scratch)) / "ckpt"
    try:
        make_checkpoint(root, decoy, extras, index)
        result: list[Checkpoint] = []

        def open_it() -> None:
            try:
                result.append(Checkpoint(root))
            except Fp8ConvertError as exc:
                assert exc.render()

        assert OPENS.outside(root, scratch, open_it) == [], "a file outside the checkpoint directory was opened"
        if result:
            ckpt = result[0]
            assert all(isinstance(p, str) for p in ckpt.problems)
            assert "secret" not in ckpt.tensors
            assert all((root / f).resolve().parent == root.resolve() for f in ckpt.files)
    finally:
        shutil.rmtree(root.parent, ignore_errors=True)


# ---- config files --------------------------------------------------------------------------------------
CONFIG_FILES = ("config.json", "params.json", "hf_quant_config.json")
VALUES = (
    JSON
    | st.sampled_from(["4096", -4, 0, 0.5, True, "", "tensor", "channel", "block", "static", "dynamic", [128, 128]])
    | st.sampled_from([[0, 0], "LlamaForCausalLM", ["LlamaForCausalLM"], "float128", "re:(", ["re:["], {"a": {}}])
)


def _paths(obj: object, prefix: tuple = ()) -> Iterator[tuple]:
    if prefix:
        yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


@pytest.fixture(scope="module")
def layouts(scratch: Path) -> dict[str, Path]:
    return {
        name: BASES[name](scratch / "layouts" / name)
        for name in ("ct", "block", "fp8", "quark", "mistral", "modelopt", "fbgemm")
    }


@FUZZ
@given(data=st.data())
def test_config_files(layouts: dict[str, Path], data: st.DataObject) -> None:
    """Replace (or delete) up to three values anywhere in a layout's config files: never a crash."""
    root = layouts[data.draw(st.sampled_from(sorted(layouts)), label="layout")]
    name = data.draw(st.sampled_from([f for f in CONFIG_FILES if (root / f).exists()]), label="file")
    original = (root / name).read_text()
    obj = json.loads(original)
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        paths = list(_paths(obj))
        if not paths:
            break
        *parents, last = data.draw(st.sampled_from(paths), label="path")
        node = obj
        for p in parents:
            node = node[p]
        if data.draw(st.booleans(), label="delete"):
            del node[last]
        else:
            node[last] = copy.deepcopy(data.draw(VALUES, label="value"))  # sampled values are shared objects
    (root / name).write_text(json.dumps(obj))
    try:
        open_source(root)
    except Fp8ConvertError as exc:
        assert exc.render()
    finally:
        (root / name).write_text(original)
