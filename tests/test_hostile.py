"""Every case of the hostile-input corpus (tests/hostile_cases.py) through ``fp8convert convert``: exit code 1,
the expected message (what, where, how to fix) on stderr, no traceback, nothing written at the output path, the
source unchanged; through the API, the human CLI and ``--json`` in-process, and the ``heavy`` cases through the
real command in a subprocess whose peak memory is measured."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from hostile_cases import BASES, CASES, Case

from fp8convert import errors
from fp8convert.cli import main
from fp8convert.errors import CheckpointError, Fp8ConvertError
from fp8convert.pipeline import convert

#: peak resident memory of a whole `fp8convert convert` process fed a hostile input (torch alone takes ~0.3 GB)
MAX_RSS_BYTES = 1 << 30
#: the console script's entry point, reporting its own peak memory (VmHWM) at exit into the file named first:
#: ``ru_maxrss`` of a child would include the parent's (pytest's) memory at fork, which exec does not reset
CHILD = (
    "import atexit, sys; from pathlib import Path; report = Path(sys.argv.pop(1)); "
    "atexit.register(lambda: report.write_text(Path('/proc/self/status').read_text())); "
    "from fp8convert.cli import main; sys.argv[0] = 'fp8convert'; main()"
)


def test_the_corpus():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    assert len(CASES) >= 40
    assert {c.base for c in CASES} <= set(BASES)
    assert all(c.error is None or issubclass(getattr(errors, c.error), CheckpointError) for c in CASES)


# ---- helpers -------------------------------------------------------------------------------------------
def snapshot(root: Path) -> dict[str, str]:
    """Every entry under root (not following links) with its content hash, link target or kind."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                found[str(path.relative_to(root))] = "-> " + os.readlink(path)
            elif stat.S_ISREG(mode):
                h = hashlib.sha256()
                with path.open("rb") as f:
                    while chunk := f.read(1 << 24):
                        h.update(chunk)
                found[str(path.relative_to(root))] = h.hexdigest()
            else:
                found[str(path.relative_to(root))] = stat.filemode(mode)
    return found


@pytest.fixture(scope="session")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The valid checkpoints, each built once (lazily: a dict that builds on first use)."""
    root = tmp_path_factory.mktemp("bases")

    class Lazy(dict):
        def __missing__(self, name: str) -> Path:
            self[name] = BASES[name](root / name)
            return self[name]

    return Lazy()


def prepare(case: Case, bases: dict[str, Path], where: Path) -> Path:
    """A broken copy of the case's base checkpoint in ``where/src``."""
    src = where / "src"
    shutil.copytree(bases[case.base], src, symlinks=True)
    case.edit(src)
    return src


def expected(case: Case, src: Path) -> list[str]:
    return [fragment.replace("{src}", str(src)) for fragment in case.expect]


def check_error_text(case: Case, src: Path, text: str) -> None:
    for fragment in expected(case, src):
        assert fragment in text, f"{case.id}: {fragment!r} not in:\n{text}"
    assert "\nFix: " in text, f"{case.id}: the message does not say how to fix it:\n{text}"
    assert "Traceback" not in text and "internal error" not in text, text


# ---- every case in-process -----------------------------------------------------------------------------
@pytest.mark.parametrize("case", [c for c in CASES if not c.heavy], ids=lambda c: c.id)
def test_hostile_input(case: Case, bases: dict[str, Path], tmp_path: Path) -> None:
    src = prepare(case, bases, tmp_path)
    out = tmp_path / "out"
    before, around = snapshot(src), sorted(os.listdir(tmp_path))

    with pytest.raises(Fp8ConvertError) as info:
        convert(src, out)
    exc = info.value
    assert isinstance(exc, CheckpointError), f"{case.id}: {type(exc).__name__}: {exc}"
    if case.error:
        assert type(exc).__name__ == case.error, f"{case.id}: {type(exc).__name__}: {exc}"
    check_error_text(case, src, str(exc))

    runner = CliRunner()
    result = runner.invoke(main, ["convert", str(src), str(out)])
    assert result.exit_code == 1, f"{case.id}: exit {result.exit_code}\n{result.output}"
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.stdout == ""
    assert result.stderr.endswith(f"Error: {exc.render()}\n"), result.stderr  # the API's message, after any logs
    check_error_text(case, src, result.stderr)

    result = runner.invoke(main, ["convert", str(src), str(out), "--json"])
    assert result.exit_code == 1, result.output
    doc = json.loads(result.stdout)
    assert doc["ok"] is False and doc["error"]["type"] == type(exc).__name__ and doc["error"]["exit_code"] == 1
    assert doc["error"]["problems"] == exc.problems and doc["error"]["hint"]

    assert not out.exists(), f"{case.id}: something was written at the output path"
    assert sorted(os.listdir(tmp_path)) == around, "files appeared next to the source"
    assert snapshot(src) == before, f"{case.id}: the source changed"


def test_debug_shows_the_traceback(bases: dict[str, Path], tmp_path: Path) -> None:
    case = next(c for c in CASES if c.id == "header-not-json")
    src = prepare(case, bases, tmp_path)
    quiet = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "out")])
    loud = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "out"), "--debug"])
    assert quiet.exit_code == loud.exit_code == 1
    assert "Traceback" not in quiet.stderr and "Traceback (most recent call last)" in loud.stderr
    assert loud.stderr.endswith(quiet.stderr)


# ---- the heavy cases: the real command, peak memory measured --------------------------------------------
@pytest.fixture(scope="module")
def launched(bases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """Start every heavy case at once (each is a torch-importing process: seconds apiece when run in a row)."""
    env = {k: v for k, v in os.environ.items() if k != "FP8CONVERT_DEBUG"}
    runs = {}
    for case in (c for c in CASES if c.heavy):
        where = tmp_path_factory.mktemp(case.id)
        src = prepare(case, bases, where)
        before = snapshot(src)
        stdout, stderr = where / "stdout.txt", where / "stderr.txt"
        with stdout.open("wb") as o, stderr.open("wb") as e:
            proc = subprocess.Popen(
                [sys.executable, "-c", CHILD, str(where / "status.txt"), "convert", str(src), str(where / "out")],
                stdout=o,
                stderr=e,
                env=env,
            )
        runs[case.id] = (proc, src, where, before)
    yield runs
    for proc, *_ in runs.values():
        if proc.returncode is None:
            proc.kill()


@pytest.mark.parametrize("case", [c for c in CASES if c.heavy], ids=lambda c: c.id)
def test_hostile_input_through_the_real_command(case: Case, launched: dict[str, tuple]) -> None:
    proc, src, where, before = launched[case.id]
    proc.wait(timeout=300)
    stdout, stderr = (where / "stdout.txt").read_text(), (where / "stderr.txt").read_text()
    assert proc.returncode == 1, f"{case.id}: exit {proc.returncode}\n{stderr}"
    assert stdout == ""
    check_error_text(case, src, stderr)
    assert stderr.count("Error: ") == 1
    assert not (where / "out").exists()
    assert snapshot(src) == before
    if not Path("/proc/self/status").exists():
        pytest.skip("peak memory is read from /proc (Linux)")
    status = (where / "status.txt").read_text()
    peak = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024
    assert peak < MAX_RSS_BYTES, f"{case.id}: peak memory {peak / 1e6:.0f} MB"
