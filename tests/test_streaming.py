"""How conversion moves bytes (issue 6): unchanged fp8 codes are copied, never decoded; changed ones stream in
row chunks (no whole weight in memory); finished shards of an interrupted run are reused, checked by hash;
a run killed between the commit's renames is finished by the same command."""

from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fp8convert import numerics, outdir, produce
from fp8convert.normalize import LinearJob
from fp8convert.pipeline import ConvertOptions, convert
from fp8convert.shards import Checkpoint

REAL_LOAD = Checkpoint.load
DIMS = {"hidden": 256, "intermediate": 512, "layers": 2, "vocab": 512}
SHARDS = ConvertOptions(max_shard_bytes=300_000)  # several shards


def files(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def test_unchanged_codes_are_copied_as_bytes_never_decoded(make_ct, tmp_path, monkeypatch):
    src = make_ct("FP8_DYNAMIC", **DIMS)  # per channel, bf16 scales: the AIU layout already

    def no(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded")

    def load(self: Checkpoint, key: str, index: int | None = None) -> torch.Tensor:
        if key.endswith("_proj.weight"):
            no()
        return REAL_LOAD(self, key, index)

    monkeypatch.setattr(LinearJob, "convert", no)
    monkeypatch.setattr(Checkpoint, "load", load)
    report = convert(src, tmp_path / "out")
    assert all(r["actions"] == ["kept"] for r in report["layers"].values())
    with (
        safe_open(str(src / "model.safetensors"), "pt") as a,
        safe_open(str(tmp_path / "out/aiu/model-00001-of-00001.safetensors"), "pt") as b,
    ):
        for key in a.keys():
            assert torch.equal(a.get_tensor(key).view(torch.uint8), b.get_tensor(key).view(torch.uint8)), key


def test_requantized_weights_stream_in_row_chunks(make_ct, tmp_path, monkeypatch):
    src = make_ct("FP8_BLOCK", **DIMS)
    whole = convert(src, tmp_path / "whole")
    monkeypatch.setattr(numerics, "CHUNK_ELEMENTS", 128 * 256)  # 128-row chunks of every weight
    loaded: list[str] = []
    monkeypatch.setattr(
        Checkpoint, "load", lambda self, key, index=None: loaded.append(key) or REAL_LOAD(self, key, index)
    )

    reads: list[int] = []
    span_read = produce._Span.read
    monkeypatch.setattr(produce._Span, "read", lambda self, r0, r1: reads.append(r1 - r0) or span_read(self, r0, r1))
    chunked = convert(src, tmp_path / "chunked")
    assert reads and max(reads) == 128  # no weight was read whole
    assert not [k for k in loaded if k.endswith("_proj.weight")]  # nor loaded through Checkpoint.load
    assert files(tmp_path / "whole" / "aiu") == files(tmp_path / "chunked" / "aiu")
    assert whole["layers"] == chunked["layers"]  # the statistics do not depend on the chunking


def interrupted(src: Path, out: Path, monkeypatch: pytest.MonkeyPatch, shards: int) -> Path:
    """Run a conversion that is interrupted (KeyboardInterrupt) right after ``shards`` shards were finished;
    returns its temporary directory."""
    from fp8convert import writer

    done = writer.Journal.done
    count = iter(range(1000))

    def stop_after(self: writer.Journal, shard: Path, digest: str, notes: dict[str, object]) -> None:
        done(self, shard, digest, notes)
        if next(count) + 1 == shards:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(writer.Journal, "done", stop_after)
        with pytest.raises(KeyboardInterrupt):
            convert(src, out, SHARDS)
    (work,) = out.glob(".fp8convert-tmp-*")
    return work


@pytest.mark.parametrize("scheme", ["FP8_BLOCK", "FP8_DYNAMIC"])
def test_an_interrupted_run_resumes_from_its_finished_shards(make_ct, tmp_path, monkeypatch, scheme):
    src = make_ct(scheme, **DIMS)
    reference = convert(src, tmp_path / "ref", SHARDS)
    out = tmp_path / "out"
    work = interrupted(src, out, monkeypatch, 2)
    kept = {p.name: p.stat().st_ino for p in (work / "aiu").glob("*.safetensors")}
    assert len(kept) == 2 and not any(p.name in ("aiu", "cpu") for p in out.iterdir())
    rewritten: list[str] = []
    from fp8convert import writer

    write = writer.write_safetensors
    monkeypatch.setattr(writer, "write_safetensors", lambda path, *a: rewritten.append(path.name) or write(path, *a))
    report = convert(src, out, SHARDS)
    assert not set(rewritten) & set(kept)  # the finished shards were reused, not written again
    assert {p.name: p.stat().st_ino for p in (out / "aiu").glob("*.safetensors") if p.name in kept} == kept
    assert files(out) == files(tmp_path / "ref")
    assert report == reference


def test_a_finished_shard_that_changed_is_written_again(make_ct, tmp_path, monkeypatch):
    src = make_ct("FP8_BLOCK", **DIMS)
    convert(src, tmp_path / "ref", SHARDS)
    out = tmp_path / "out"
    (shard,) = (interrupted(src, out, monkeypatch, 1) / "aiu").glob("*.safetensors")
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes: only the hash tells
    shard.write_bytes(bytes(data))
    convert(src, out, SHARDS)
    assert files(out) == files(tmp_path / "ref")


def test_a_run_killed_between_the_final_renames_is_finished_by_the_same_command(make_ct, tmp_path, monkeypatch):
    src = make_ct("FP8_DYNAMIC", **DIMS)
    convert(src, tmp_path / "ref")
    out = tmp_path / "out"
    replace = os.replace
    moved: list[str] = []

    def die_after_aiu(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> None:
        if Path(b).parent == out and moved:
            raise SystemExit("killed")  # what kill -9 leaves: aiu/ is in place, cpu/ and the report are not
        replace(a, b)
        if Path(b).parent == out:
            moved.append(Path(b).name)

    with monkeypatch.context() as m:
        m.setattr(outdir.os, "replace", die_after_aiu)
        with pytest.raises(SystemExit):
            convert(src, out)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["aiu"]
    convert(src, out)  # not --overwrite: these leftovers are this command's own, half-committed
    assert files(out) == files(tmp_path / "ref")
    other = make_ct("FP8_DYNAMIC", **(DIMS | {"layers": 1}))
    with pytest.raises(Exception, match="not empty"):
        convert(other, out)  # another command's outputs still need --overwrite


def test_the_lock_is_released_when_the_holder_dies(make_ct, tmp_path):
    import subprocess
    import sys

    src = make_ct("FP8_DYNAMIC", **DIMS)
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import fcntl, os, time; fd = os.open({str(out)!r}, os.O_RDONLY); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
    with pytest.raises(Exception, match="another fp8convert run"):
        convert(src, out)
    holder.kill()
    holder.wait()
    convert(src, out)


def test_nan_in_a_weight_to_quantize_is_a_checkpoint_error(make_ct, tmp_path):
    from safetensors.torch import load_file, save_file

    from fp8convert.errors import CheckpointError

    src = make_ct("FP8_DYNAMIC", unquantized=("0.mlp.down_proj",), **DIMS)
    path = src / "model.safetensors"
    tensors = load_file(str(path))
    tensors["model.layers.0.mlp.down_proj.weight"][3, 5] = float("nan")
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="down_proj.weight: NaN or Inf values"):
        convert(src, tmp_path / "out", ConvertOptions(quantize_unquantized=True))
    assert not (tmp_path / "out").exists()


def test_a_source_changed_during_the_conversion_is_refused(make_ct, tmp_path, monkeypatch):
    from fp8convert import pipeline
    from fp8convert.errors import CheckpointError

    src = make_ct("FP8_DYNAMIC", **DIMS)
    write = pipeline.write_json

    def touch_source(path: Path, data: object) -> None:
        write(path, data)
        if path.name == "fp8convert-report.json":
            (src / "config.json").write_text((src / "config.json").read_text())  # same bytes, new ctime

    monkeypatch.setattr(pipeline, "write_json", touch_source)
    with pytest.raises(CheckpointError, match="changed during the conversion"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_lock_is_taken_again_when_the_locked_directory_was_replaced(tmp_path, monkeypatch):
    out = tmp_path / "out"
    same = outdir._same_directory
    calls = iter(range(100))

    def replaced_once(fd: int, path: Path) -> bool:
        if next(calls) == 0:  # a failed run removed OUT (it had created it) between our open and our flock
            path.rmdir()
        return same(fd, path)

    monkeypatch.setattr(outdir, "_same_directory", replaced_once)
    with outdir.locked(out):
        assert out.is_dir()
        fd = os.open(out, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):  # the directory now at OUT is the one locked
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)


def test_an_output_name_planned_twice_is_refused():
    from fp8convert.errors import CheckpointError
    from fp8convert.writer import OutTensor, plan_shards

    def t(key: str) -> OutTensor:
        return OutTensor(key, torch.bfloat16, (2,), lambda sink: None)

    with pytest.raises(CheckpointError, match="1 output tensor name.*twice: model.norm.weight"):
        plan_shards([t("model.norm.weight"), t("lm_head.weight"), t("model.norm.weight")], 1000)
