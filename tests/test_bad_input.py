"""Broken checkpoints: each fails with the right error class, names the file (and tensor), says how to fix it,
writes nothing at the output path and leaves the source byte-for-byte unchanged, through the API and the CLI.

Single broken things (headers, shards, the index, config.json, one bad scale) are the corpus of
tests/hostile_cases.py (run by tests/test_hostile.py); this file keeps several problems at once, layout problems
with detail, the output location and interrupted runs."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fp8convert.cli import main
from fp8convert.errors import (
    CheckpointError,
    Fp8ConvertError,
    OutputError,
    UnknownFormatError,
    UnsupportedSchemeError,
)
from fp8convert.pipeline import ConvertOptions, convert

SMALL = {"hidden": 64, "intermediate": 128, "vocab": 64}
INDEX = "model.safetensors.index.json"
ST = "model.safetensors"
Q0, D1, K1 = "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.k_proj"


# ---- helpers -------------------------------------------------------------------------------------------
def snapshot(root: Path) -> dict[str, str] | None:
    """Every file and folder under root with its sha256 (None when root does not exist)."""
    if not root.exists():
        return None
    if root.is_file():
        return {"": hashlib.sha256(root.read_bytes()).hexdigest()}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
        for p in sorted(root.rglob("*"))
    }


def edit_shard(src: Path, key: str, fn: Callable[[dict[str, torch.Tensor]], object]) -> str:
    """Rewrite the shard that holds ``key`` after ``fn`` edits its tensors; keep the index in step."""
    index = json.loads((src / INDEX).read_text()) if (src / INDEX).exists() else None
    path = src / (index["weight_map"][key] if index else ST)
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})
    if index:
        wm = {k: v for k, v in index["weight_map"].items() if v != path.name or k in tensors}
        index["weight_map"] = wm | {k: path.name for k in tensors}
        (src / INDEX).write_text(json.dumps(index, indent=2))
    return path.name


def set_last(key: str, value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(t: dict[str, torch.Tensor]) -> None:
        t[key] = t[key].clone()
        t[key].view(-1)[-1] = value

    return edit


def edit_config(src: Path, fn: Callable[[dict], object]) -> None:
    config = json.loads((src / "config.json").read_text())
    fn(config)
    (src / "config.json").write_text(json.dumps(config, indent=2))


def fails(
    src: Path,
    exc_type: type[Fp8ConvertError],
    *fragments: str,
    out: Path | None = None,
    exact: bool = True,
    fix: bool = True,
    overwrite: bool = False,
) -> Fp8ConvertError:
    """convert() and the CLI (human and --json) fail with exc_type and every fragment in the message; nothing
    appears at (or changes under) out, and the source stays byte-for-byte the same."""
    out = out or src.parent / "out"
    src_before, out_before = snapshot(src), snapshot(out)
    with pytest.raises(Fp8ConvertError) as info:
        convert(src, out, ConvertOptions(overwrite=overwrite))
    exc = info.value
    assert (type(exc) is exc_type) if exact else isinstance(exc, exc_type), exc.render()
    text = str(exc)
    assert text == exc.render()
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in:\n{text}"
    if fix:
        assert "\nFix: " in text
    assert snapshot(src) == src_before
    assert snapshot(out) == out_before

    runner = CliRunner()
    args = ["convert", str(src), str(out)] + (["--overwrite"] if overwrite else [])
    result = runner.invoke(main, args)
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert result.stderr.endswith(f"Error: {text}\n")  # the API's message, after any log lines
    result = runner.invoke(main, [*args, "--json"])
    assert result.exit_code == 1, result.output
    doc = json.loads(result.stdout)
    err = doc["error"]
    assert doc["ok"] is False and doc["command"] == "convert"
    assert err["type"] == type(exc).__name__ and err["exit_code"] == 1 and err["problems"] == exc.problems
    assert bool(err["hint"]) or not fix
    head = f"{err['where']}: {err['message']}" if err["where"] else err["message"]
    parts = "\n".join([head, *err["problems"], err["hint"] or ""])
    for fragment in fragments:
        assert fragment in parts
    assert snapshot(src) == src_before
    assert snapshot(out) == out_before
    return exc


@pytest.fixture
def small(make_ct: Callable[..., Path]) -> Callable[..., Path]:
    return lambda scheme="FP8_DYNAMIC", **kw: make_ct(scheme, **(SMALL | kw))


# ---- tensors that are missing, misshapen or carry bad values ---------------------------------------------
def drop_q0_scale(src: Path) -> str:
    return edit_shard(src, f"{Q0}.weight_scale", lambda t: t.pop(f"{Q0}.weight_scale"))


@pytest.mark.parametrize("shards", [1, 2])
def test_missing_weight_scale(small, shards):
    src = small(shards=shards)
    file = drop_q0_scale(src)
    exc = fails(
        src,
        CheckpointError,
        f"{Q0}.weight ({file}) is float8_e4m3fn but has no scale",
        f"looked for {Q0}.weight_scale, group group_0 strategy channel",
        exact=False,
    )
    assert exc.problems[0].endswith("if the download is partial, download it again")


def test_each_layout_problem_is_reported_once(small, tmp_path):
    src = small()
    drop_q0_scale(src)
    edit_shard(src, f"{D1}.weight_scale", lambda t: t.update({f"{D1}.weight_scale": torch.ones(2, 1).bfloat16()}))
    with pytest.raises(CheckpointError) as info:
        convert(src, tmp_path / "out")
    assert "not a linear weight" not in str(info.value) and "has no fp8 weight" not in str(info.value)
    assert len(info.value.problems) == 2


# ---- config.json (malformed files and wrong types: tests/hostile_cases.py) -------------------------------
@pytest.mark.parametrize(
    ("edit", "seen"),
    [
        (lambda c: c.pop("quantization_config"), "config.json has no quantization_config"),
        (lambda c: c.update(quantization_config={"quant_method": "int8-custom"}), "quant_method='int8-custom'"),
    ],
)
def test_config_without_a_known_quantization_config(small, edit, seen):
    src = small()
    edit_config(src, edit)
    fails(
        src,
        UnknownFormatError,
        f"{src}: no supported FP8 layout recognised",
        seen,
        "tensor dtypes: bfloat16 x21, float8_e4m3fn x14",
        "tensor suffixes: weight, weight_scale",
        "supported layouts: compressed-tensors",
    )


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda q, w: w.update(type="int"), "group group_0: weights are type='int' num_bits=8; only 8-bit float"),
        (lambda q, w: w.update(strategy="group", group_size=128), "group group_0: weight strategy 'group' (group"),
        (lambda q, w: w.update(symmetric=False), "group group_0: asymmetric weights (zero points) are not supported"),
        (
            lambda q, w: [q.update(format="pack-quantized"), q["config_groups"]["group_0"].update(format=None)],
            "group group_0: format 'pack-quantized' is not supported "
            "(FP8 checkpoints use float-quantized or naive-quantized)",
        ),
        (lambda q, w: q.update(quantization_status="frozen"), "quantization_status is 'frozen': only 'compressed'"),
    ],
    ids=["int", "group", "asymmetric", "pack-quantized", "frozen"],
)
def test_unsupported_scheme(small, edit, problem):
    src = small()
    edit_config(src, lambda c: edit(qc := c["quantization_config"], qc["config_groups"]["group_0"]["weights"]))
    exc = fails(
        src,
        UnsupportedSchemeError,
        "config.json quantization_config: unsupported compressed-tensors configuration",
        problem,
        "fp8convert converts FP8 (float, 8-bit, symmetric) weights",
    )
    assert len(exc.problems) == 1 and exc.problems[0].startswith(problem)


# ---- zero points ---------------------------------------------------------------------------------------
def test_all_zero_zero_point_is_dropped(small, tmp_path):
    src = small(shards=2)
    edit_shard(src, f"{Q0}.weight", lambda t: t.update({f"{Q0}.weight_zero_point": torch.zeros(64, 1).bfloat16()}))
    before = snapshot(src)
    report = convert(src, tmp_path / "out")
    assert report["dropped"] == {f"{Q0}.weight_zero_point": "zero point of a symmetric scheme (checked all-zero)"}
    assert snapshot(src) == before
    for variant in ("aiu", "cpu"):
        keys = json.loads((tmp_path / "out" / variant / INDEX).read_text())["weight_map"]
        assert f"{Q0}.weight" in keys and not any(k.endswith("zero_point") for k in keys)


# ---- several problems at once --------------------------------------------------------------------------
def test_all_value_problems_in_one_error(small):
    src = small(shards=2)
    f1 = edit_shard(src, f"{Q0}.weight_scale", set_last(f"{Q0}.weight_scale", float("nan")))
    f2 = edit_shard(src, f"{D1}.weight_scale", set_last(f"{D1}.weight_scale", 0.0))
    f3 = edit_shard(src, f"{K1}.weight", lambda t: t[f"{K1}.weight"].view(torch.uint8).view(-1).__setitem__(3, 0x7F))
    exc = fails(src, CheckpointError, "3 problem(s) found; nothing was written")
    assert sorted(exc.problems) == sorted(
        [
            f"{Q0}.weight_scale ({f1}): 1 NaN scale value(s)",
            f"{D1}.weight_scale ({f2}): 1 zero scale value(s)",
            f"{K1}.weight ({f3}): 1 fp8 NaN code(s) in the weight",
        ]
    )


def test_all_layout_problems_in_one_error(small):
    src = small()
    drop_q0_scale(src)
    edit_shard(src, f"{D1}.weight_scale", lambda t: t.update({f"{D1}.weight_scale": torch.ones(2, 1).bfloat16()}))
    # a missing tensor and an unsupported shape: the common class of the two
    exc = fails(src, CheckpointError, "problem(s) found; nothing was written")
    assert any(p.startswith(f"{Q0}.weight ({ST}) is float8_e4m3fn but has no scale") for p in exc.problems)
    assert any(p.startswith(f"{D1}.weight_scale ({ST}) has shape [2, 1]") for p in exc.problems)


def test_missing_scale_and_bad_values_in_one_error(small, tmp_path):
    src = small()
    drop_q0_scale(src)
    edit_shard(src, f"{D1}.weight_scale", set_last(f"{D1}.weight_scale", float("nan")))
    edit_shard(src, f"{K1}.weight_scale", set_last(f"{K1}.weight_scale", -1.0))
    with pytest.raises(CheckpointError) as info:
        convert(src, tmp_path / "out")
    text = str(info.value)
    assert f"{Q0}.weight_scale" in text and f"{D1}.weight_scale" in text and f"{K1}.weight_scale" in text
    assert len(info.value.problems) == 3


# ---- the output location -------------------------------------------------------------------------------
@pytest.mark.parametrize("inner", ["converted", "a/b", ""])
def test_output_inside_the_source(small, inner):
    src = small()
    message = "the output directory is inside the source checkpoint"
    fails(src, OutputError, message, "choose an output directory outside the source", out=src / inner)


@pytest.mark.parametrize("via", ["parent", "dotdot"])
def test_source_inside_the_output(small, via):
    src = small()
    out = src.parent if via == "parent" else src / ".."
    message = f"{out.resolve()}: the source checkpoint is inside the output directory"
    fails(src, OutputError, message, "choose an output directory that does not contain the source", out=out)


def test_output_not_empty_needs_overwrite(small, tmp_path):
    src = small()
    out = tmp_path / "out"
    (out / "aiu").mkdir(parents=True)
    (out / "aiu" / "stale.safetensors").write_bytes(b"old")
    (out / "fp8convert-report.json").write_text("old report")
    (out / "notes.txt").write_text("mine")
    fails(src, OutputError, f"{out}: the output directory is not empty (3 entries)", "pass --overwrite")
    report = convert(src, out, ConvertOptions(overwrite=True))
    assert sorted(p.name for p in out.iterdir()) == ["aiu", "cpu", "fp8convert-report.json", "notes.txt"]
    assert not (out / "aiu" / "stale.safetensors").exists()
    assert json.loads((out / "fp8convert-report.json").read_text()) == report
    assert (out / "notes.txt").read_text() == "mine"


def test_failed_overwrite_keeps_the_previous_output(small, tmp_path):
    src = small()
    convert(src, tmp_path / "out")
    edit_shard(src, f"{Q0}.weight_scale", set_last(f"{Q0}.weight_scale", float("inf")))
    fails(src, CheckpointError, f"{Q0}.weight_scale ({ST}): 1 Inf", overwrite=True)


def test_output_is_a_file(small, tmp_path):
    src = small()
    (tmp_path / "out").write_text("x")
    fails(src, OutputError, f"{tmp_path / 'out'}: the output path exists and is not a directory", fix=False)


@pytest.mark.parametrize("case", ["output is a file", "config.json missing"])
def test_error_without_hint(small, tmp_path, case):
    src = small()
    if case == "output is a file":
        (tmp_path / "out").write_text("x")
    else:
        (src / "config.json").unlink()
    with pytest.raises(Fp8ConvertError) as info:
        convert(src, tmp_path / "out")
    assert "not a directory" in str(info.value) or "config.json not found" in str(info.value)
    assert "\nFix: " in str(info.value)


# ---- interrupted runs ----------------------------------------------------------------------------------
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_tmp_of_a_killed_run_is_removed(small, tmp_path):
    src = small()
    out = tmp_path / "out"
    stale = out / f".fp8convert-tmp-{_dead_pid()}"
    (stale / "aiu").mkdir(parents=True)
    (stale / "aiu" / "model-00001-of-00001.safetensors").write_bytes(b"half-written")
    report = convert(src, out)  # the stale tmp does not count: no overwrite needed
    assert sorted(p.name for p in out.iterdir()) == ["aiu", "cpu", "fp8convert-report.json"]
    assert not any("tmp" in name for name in report["files"])
    with safe_open(str(out / "aiu" / "model-00001-of-00001.safetensors"), framework="pt") as f:
        assert f"{Q0}.weight" in f.keys()


def test_a_concurrent_run_into_the_same_directory_is_refused(small, tmp_path):
    src = small()
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running conversion holds (the kernel drops it at exit)
    try:
        with pytest.raises(OutputError, match="another fp8convert run is writing into this directory"):
            convert(src, out)
    finally:
        os.close(fd)
    assert list(out.iterdir()) == []
    convert(src, out)  # the lock is gone with its holder


@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_write_leaves_the_final_paths_alone_and_resumes(small, tmp_path, monkeypatch, existing):
    src = small()
    out = tmp_path / "out"
    if existing:
        convert(src, out)
    before = snapshot(out) or {}

    def interrupt(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr("fp8convert.pipeline.write_cpu_variant", interrupt)
        with pytest.raises(KeyboardInterrupt):
            convert(src, out, ConvertOptions(overwrite=True))
    after = snapshot(out) or {}
    assert {k: v for k, v in after.items() if not k.startswith(".fp8convert-tmp-")} == before
    (work,) = [p for p in out.iterdir() if p.name.startswith(".fp8convert-tmp-")]  # kept for resuming
    assert list((work / "aiu").glob("*.safetensors"))
    convert(src, out, ConvertOptions(overwrite=True))
    assert sorted(p.name for p in out.iterdir()) == ["aiu", "cpu", "fp8convert-report.json"]
