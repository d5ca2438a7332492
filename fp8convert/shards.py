"""safetensors input: a checkpoint's shards and index opened without loading tensors, one-tensor reads; and
the small file helpers the writers share (JSON, tokenizer files, checksums, hardlinks).

The safetensors format is an 8-byte little-endian header length, a JSON header and the raw bytes; headers are
parsed by fp8convert.headers, so that a malformed or lying header gets an error naming the file. Writing
shards is fp8convert.writer's.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import torch

from fp8convert.errors import CheckpointError, MissingTensorError
from fp8convert.headers import MAX_PROBLEMS, brief, brief_key, capped
from fp8convert.headers import parse_header as parse_header  # re-exported: shards is where callers look
from fp8convert.headers import read_json as read_json
from fp8convert.spec import TensorRef

INDEX_NAME = "model.safetensors.index.json"
PICKLE_OR_GGUF = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".gguf")
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


#: Files next to the weights that fp8convert reads or copies; like the shards, each must lie inside the checkpoint.
READ_FILES = (INDEX_NAME, "config.json", "params.json", "hf_quant_config.json", *AUX_FILES)


def _escapes(root: Path, path: Path) -> str | None:
    """Why ``path`` (a name in ``root``) must not be read when a symlink takes it out of the checkpoint directory,
    else None. Links into a Hugging Face cache's ``models--*/blobs/`` stay allowed: cache snapshots (and older
    ``--local-dir`` downloads) are made of them."""
    if not path.is_symlink():
        return None
    try:
        target = path.resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
        return f"{path.name} is a symlink loop"
    real_root = root.resolve()
    if real_root in target.parents or (
        target.parent.name == "blobs" and target.parent.parent.name.startswith("models--")
    ):
        return None
    return f"{path.name} is a symlink to {target}, outside the checkpoint directory"


def read_range(path: Path, offset: int, nbytes: int) -> bytearray:
    """``nbytes`` of ``path`` at ``offset``: a plain read, no mmap."""
    buf = bytearray(nbytes)
    with path.open("rb", buffering=0) as f:
        f.seek(offset)
        view, got = memoryview(buf), 0
        while got < nbytes and (n := f.readinto(view[got:])):
            got += n
    if got != nbytes:
        raise CheckpointError(
            f"unexpected end of file at byte {offset + got}",
            where=str(path),
            hint="the file is truncated or changed during the conversion: download it again",
        )
    return buf


class Checkpoint:
    """A local checkpoint directory: config files, the index, and every tensor's header entry.

    Opening reads only headers. Shards named by the index must lie inside the directory; a shard (or config,
    index, tokenizer file) that is a symlink is followed only into the directory itself or into a Hugging Face
    cache's blobs (never to a file elsewhere, which a hostile download could point at ``~/.ssh``).
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
        outside = [why for name in READ_FILES if (why := _escapes(self.root, self.root / name))]
        if outside:
            raise CheckpointError(
                f"{len(outside)} file(s) lead outside the checkpoint directory",
                where=str(self.root),
                problems=outside,
                hint="copy the real files into the checkpoint directory (fp8convert never follows a link out of it)",
            )
        self.files = self._list_files(pattern)
        seen: dict[tuple[int, int], str] = {}
        self._aliases: dict[str, str] = {}  # a shard linked under a second name -> the first
        self._unreadable: set[str] = set()
        for file in self.files:
            path = self.root / file
            st = path.stat()
            if (st.st_dev, st.st_ino) in seen:
                self._aliases[file] = seen[st.st_dev, st.st_ino]
                self.problems.append(
                    f"{file} and {self._aliases[file]} are the same file (linked twice); a shard must be listed once"
                )
                continue
            seen[st.st_dev, st.st_ino] = file
            refs, _meta, _start, problems = parse_header(path)
            self.problems += problems
            if problems and not refs:
                self._unreadable.add(file)  # the index's entries for it are no further news
            twice = [key for key in refs if key in self.tensors]
            self.problems += [
                f"tensor {brief_key(k)} appears in both {self.tensors[k].file} and {file}" for k in twice[:5]
            ]
            if len(twice) > 5:
                self.problems.append(f"... and {len(twice) - 5:,} more tensors of {file} are in an earlier shard too")
            self.tensors.update(refs)
        self._check_index_keys()

    def _list_files(self, pattern: str) -> list[str]:
        index_path = self.root / INDEX_NAME
        if index_path.exists() or index_path.is_symlink():
            index = read_json(index_path, what="safetensors index", unique_keys=True)
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(
                    f"index has no weight_map (tensor name -> shard file), found {brief(weight_map)}",
                    where=str(index_path),
                    hint="re-download the index file",
                )
            bad = [f"{brief_key(k)}: {brief(v)}" for k, v in weight_map.items() if not isinstance(v, str)]
            if bad:
                raise CheckpointError(
                    f"index weight_map maps {len(bad)} tensor(s) to something other than a file name",
                    where=str(index_path),
                    problems=capped(bad),
                    hint="re-download the index file; it is corrupt",
                )
            self.weight_map: dict[str, str] | None = weight_map
            files = sorted(set(weight_map.values()), key=natural_key)
            for f in files:  # string checks, as Path.parts splits (an index may name 100,000s of files)
                parts = [part for part in f.split("/") if part not in ("", ".")]
                if f.startswith("/") or ".." in parts or len(parts) != 1:
                    raise CheckpointError(
                        f"index names the file {f!r}, which is outside the checkpoint directory",
                        where=str(index_path),
                        hint="the index is corrupt or malicious",
                    )
                if f != parts[0] or not f.isprintable():  # ./x, x/, NUL and other control characters
                    raise CheckpointError(
                        f"index names the file {f!r}, which is not a plain file name in the checkpoint directory",
                        where=str(index_path),
                        hint=f"the index is corrupt; shards are named like {parts[0]!r}",
                    )
            missing = [f for f in files if not os.path.exists(os.path.join(self.root, f))]
            if missing:
                held = Counter(weight_map.values())
                listed = [
                    f"{m} (holds {held[m]} tensors)" + (" is a broken symlink" if (self.root / m).is_symlink() else "")
                    for m in missing[: MAX_PROBLEMS + 1]
                ]
                raise MissingTensorError(
                    f"{len(missing)} shard(s) named by the index are missing",
                    where=str(index_path),
                    problems=capped(listed, len(missing)),
                    hint="the download is incomplete: download the missing files again (fp8convert pull resumes)",
                )
            self._check_files(files)
            return files
        self.weight_map = None
        found = sorted((p.name for p in self.root.glob(pattern)), key=natural_key)
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
        self._check_files(files)
        return files

    def _check_files(self, files: list[str]) -> None:
        """Every shard is a regular file inside the directory (or a link into it or into a Hugging Face cache)."""
        problems = []
        for f in files:
            path = self.root / f
            if why := _escapes(self.root, path):
                problems.append(why)
            elif not path.exists():
                problems.append(f"{f} is a broken symlink (its target {os.readlink(path)} is missing)")
            elif path.is_dir():
                problems.append(f"{f} is a directory, not a safetensors file")
            elif not path.is_file():
                problems.append(f"{f} is not a regular file (a device, socket or pipe)")
        if problems:
            raise CheckpointError(
                f"{len(problems)} shard(s) cannot be read",
                where=str(self.root),
                problems=capped(problems),
                hint="replace them with the real safetensors files (download them again); fp8convert follows links "
                "only within the checkpoint directory or into a Hugging Face cache",
            )

    def _check_index_keys(self) -> None:
        if self.weight_map is None:
            return
        found = []
        for key, file in self.weight_map.items():
            ref = self.tensors.get(key)
            if file in self._unreadable:
                continue
            if ref is None:
                found.append(f"{INDEX_NAME} lists {brief_key(key)} in {file}, but no shard holds it")
            elif ref.file != self._aliases.get(file, file):
                found.append(f"{INDEX_NAME} lists {brief_key(key)} in {file}, but it is in {ref.file}")
        self.problems += capped(found)

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
        buf = read_range(self.root / ref.file, offset, nbytes)
        if not buf:
            return torch.empty(shape, dtype=ref.dtype)
        return torch.frombuffer(buf, dtype=torch.uint8).view(ref.dtype).reshape(shape)

    def close(self) -> None:
        """Nothing is held open between reads; kept so callers can use a uniform open/close pattern."""


# ---- small files ----------------------------------------------------------------------------------
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
