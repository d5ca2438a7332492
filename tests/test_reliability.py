"""Issue 6, reliability, black-box through the installed console script in subprocesses:

* killed (SIGKILL) anywhere, a conversion leaves no final path that is incomplete or differs from an
  uninterrupted run (they appear by one rename each, the report last), and running the same command again
  finishes with the bytes of an uninterrupted run;
* a second run into an OUT that a live run is writing is refused, and the first one is not disturbed;
* the bytes do not depend on the run nor on the number of torch threads;
* a full disk (RLIMIT_FSIZE, and a real tmpfs) and a read-only output fail with one clean line, leave nothing
  behind and never touch the source.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import random
import resource
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fp8convert.examples import build_compressed_tensors

CLI = str(Path(sys.executable).parent / "fp8convert")
REPORT = "fp8convert-report.json"
FINAL = ("aiu", "cpu", REPORT)
TMP_PREFIX = ".fp8convert-tmp-"
EXIT_ERROR = 1  # fp8convert.errors.EXIT_ERROR: OutputError and other conversion errors
#: weights of >= 4M elements, so torch's intra-op parallelism (grain 32768) really splits them across threads
BIG: dict[str, dict[str, Any]] = {
    "FP8_BLOCK": {"hidden": 2048, "intermediate": 2048, "layers": 1, "vocab": 1024},  # requantized per channel
    "FP8_DYNAMIC": {"hidden": 1024, "intermediate": 2048, "layers": 4, "vocab": 1024},  # copied as they are
}
BIG_SHARD = "2MB"  # -> 15 to 30 shards per artifact
SMALL_SHARD = "256KB"
RANDOM_KILLS = 3  # per scheme, at seeded random times while OUT is written; then one as each final path appears
IN_CREATE, IN_MOVED_TO = 0x100, 0x80  # <sys/inotify.h>
#: a subprocess that makes torch use exactly N threads, prints the count torch still uses at exit, runs the CLI
WITH_THREADS = (
    "import atexit, sys, torch; n = int(sys.argv.pop(1)); torch.set_num_threads(n); "
    "atexit.register(lambda: print(f'torch threads at exit: {torch.get_num_threads()}', file=sys.stderr)); "
    "sys.argv[0] = 'fp8convert'; from fp8convert.cli import main; main()"
)


# ---- helpers ---------------------------------------------------------------------------------------------------
def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by path relative to it (empty when ``root`` is missing)."""
    return {str(p.relative_to(root)): sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


def outputs(out: Path) -> dict[str, str]:
    """sha256 of every file at the final paths (aiu/, cpu/, the report), by path relative to ``out``."""
    return {name: digest for name, digest in tree(out).items() if name.split("/")[0] in FINAL}


def entries(path: Path) -> list[str]:
    """Everything under ``path`` (files and directories, hidden ones included), relative; [] when missing."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


def convert_args(src: Path, out: Path, shard: str) -> list[str]:
    return ["convert", str(src), str(out), "--max-shard-size", shard, "-q"]


def start(args: list[str], *, prefix: tuple[str, ...] = (), **popen: Any) -> subprocess.Popen[str]:
    """The CLI in its own process (``prefix``: a wrapper such as unshare), stdout and stderr captured."""
    return subprocess.Popen([*prefix, CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Wait for ``proc`` (killed if it overruns ``timeout``, then TimeoutExpired) and collect its output."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def fp8convert(args: list[str], *, timeout: float = 120, **popen: Any) -> subprocess.CompletedProcess[str]:
    return finish(start(args, **popen), timeout)


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The failure as the CLI reports it: one 'Error:' line (returned), at most a 'Fix:' line after it, no
    traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "internal error" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    at = [i for i, line in enumerate(lines) if line.startswith("Error:")]
    assert len(at) == 1 and len(lines) - at[0] <= 2, proc.stderr
    assert all(line.startswith("Fix: ") for line in lines[at[0] + 1 :]), proc.stderr
    return lines[at[0]]


def wait_until(proc: subprocess.Popen[str], condition: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended before the condition held: {finish(proc).stderr}"
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.002)


def namespace_works(*command: str) -> bool:
    return (
        shutil.which(command[0]) is not None and subprocess.run([*command, "true"], capture_output=True).returncode == 0
    )


@dataclass(frozen=True)
class Reference:
    """An uninterrupted conversion: its source, OUT (every later run writes the same OUT), bytes and timing."""

    src: Path
    out: Path
    files: dict[str, str]  # outputs(out)
    listing: list[str]  # os.listdir(out): nothing but the final paths (and whatever a finished run keeps)
    writing_at: float  # seconds from the start until OUT appeared
    seconds: float  # seconds the whole run took


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Reference]:
    """One big seeded checkpoint per scheme and its uninterrupted conversion; OUT is emptied afterwards."""
    base = tmp_path_factory.mktemp("reliability")
    made = {}
    for scheme, dims in BIG.items():
        src = build_compressed_tensors(base / f"src-{scheme}", scheme=scheme, shards=2, **dims)
        out = base / f"out-{scheme}"
        began, writing_at = time.monotonic(), None
        proc = start(convert_args(src, out, BIG_SHARD))
        while proc.poll() is None:
            if writing_at is None and out.exists():
                writing_at = time.monotonic() - began
            time.sleep(0.002)
        seconds, done = time.monotonic() - began, finish(proc)
        assert done.returncode == 0, done.stderr
        made[scheme] = Reference(src, out, outputs(out), sorted(os.listdir(out)), writing_at or 0.0, seconds)
        assert made[scheme].listing == sorted(FINAL) and len(made[scheme].files) > 20
        shutil.rmtree(out)
    return made


@pytest.fixture
def refs(references: dict[str, Reference]) -> Iterator[dict[str, Reference]]:
    """The references, each test starting with OUT missing and leaving it so (even when it fails)."""
    yield references
    for ref in references.values():
        shutil.rmtree(ref.out, ignore_errors=True)


def kill_after(ref: Reference, delay: float) -> str:
    """Run the conversion and SIGKILL it ``delay`` seconds after its start; returns when, for messages."""
    proc = start(convert_args(ref.src, ref.out, BIG_SHARD))
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.kill()
    finish(proc)
    return f"SIGKILL {delay:.3f}s after the start (an uninterrupted run took {ref.seconds:.2f}s)"


def inotify_names(events: bytes) -> list[str]:
    """The names in a buffer of ``struct inotify_event`` (int wd; u32 mask, cookie, len; char name[len])."""
    names, at = [], 0
    while at < len(events):
        size = struct.unpack_from("iIII", events, at)[3]
        names.append(events[at + 16 : at + 16 + size].rstrip(b"\0").decode())
        at += 16 + size
    return names


def kill_at_final(ref: Reference, nth: int) -> str:
    """Run the conversion into an existing empty OUT and SIGKILL it the instant the ``nth`` final path appears
    there (inotify). The child runs at nice 19 on this process's CPU, so this process, woken by the event,
    preempts it: the kill lands before its next step, e.g. between two renames."""
    ref.out.mkdir()
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_CLOEXEC)
    assert fd >= 0 and libc.inotify_add_watch(fd, bytes(ref.out), IN_CREATE | IN_MOVED_TO) >= 0
    affinity = os.sched_getaffinity(0)
    cpu = {min(affinity)}

    def behind_this_process() -> None:
        os.sched_setaffinity(0, cpu)
        os.nice(19)

    os.sched_setaffinity(0, cpu)
    try:
        proc = start(convert_args(ref.src, ref.out, BIG_SHARD), preexec_fn=behind_this_process)
        seen: list[str] = []
        while proc.poll() is None and len(seen) < nth:
            if select.select([fd], [], [], 0.05)[0]:
                seen += [name for name in inotify_names(os.read(fd, 65536)) if name in FINAL]
        proc.kill()
        finish(proc)
    finally:
        os.sched_setaffinity(0, affinity)
        os.close(fd)
    return f"SIGKILL when final path #{nth} appeared (appeared: {seen})"


def differing(ref: Reference) -> list[str]:
    """The files at the final paths whose bytes differ from the uninterrupted run (or exist in one only)."""
    got = outputs(ref.out)
    return sorted(name for name in got.keys() | ref.files.keys() if got.get(name) != ref.files.get(name))


def assert_nothing_corrupt(ref: Reference, when: str) -> str:
    """After a kill: every final path that exists is complete and holds the uninterrupted run's bytes. Returns
    "none" (no final path), "all", or "partial": killed between the commit's renames (aiu, cpu, then the report,
    one rename(2) each), which the run's temporary directory records so that the same command finishes them."""
    present = [name for name in FINAL if os.path.lexists(ref.out / name)]
    got = outputs(ref.out)
    for name in present:
        mine = {k: v for k, v in got.items() if k.split("/")[0] == name}
        theirs = {k: v for k, v in ref.files.items() if k.split("/")[0] == name}
        assert mine == theirs, f"{when}: {name} is incomplete or holds other bytes than an uninterrupted run"
    if not present:
        return "none"
    if present == list(FINAL):
        return "all"
    assert REPORT not in present, f"{when}: the report (renamed last) appeared before {set(FINAL) - set(present)}"
    assert list(ref.out.glob(f"{TMP_PREFIX}*/.state/commit.json")), f"{when}: {present} without a pending commit"
    return "partial"


def assert_reference(ref: Reference, done: subprocess.CompletedProcess[str], what: str) -> None:
    assert done.returncode == 0, f"{what}: {done.stderr}"
    assert differing(ref) == [], f"{what}: other bytes than the uninterrupted run"
    assert sorted(os.listdir(ref.out)) == ref.listing, f"{what}: leftovers in OUT"


# ---- atomic and resumable --------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="inotify and sched_setaffinity are Linux-only")
@pytest.mark.parametrize("scheme", list(BIG))
def test_killed_anywhere_leaves_nothing_corrupt_and_the_rerun_finishes_identically(refs, scheme):
    ref = refs[scheme]
    rng = random.Random(f"kill-{scheme}")
    delays = sorted(rng.uniform(ref.writing_at, ref.seconds) for _ in range(RANDOM_KILLS))
    kills = [functools.partial(kill_after, ref, delay) for delay in delays]
    kills += [functools.partial(kill_at_final, ref, nth) for nth in range(1, len(FINAL) + 1)]
    for killed_run in kills:
        when = killed_run()
        if assert_nothing_corrupt(ref, when) != "all":
            # the same command, not --overwrite: what a killed run leaves must not count as "OUT is not empty"
            assert_reference(ref, fp8convert(convert_args(ref.src, ref.out, BIG_SHARD)), f"rerun after {when}")
        # else the kill came after the last rename: the output is complete (checked) and a rerun of the
        # same command without --overwrite refuses a non-empty OUT by design
        shutil.rmtree(ref.out)


# ---- one writer per OUT ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_second_run_into_the_same_out_is_refused_and_the_first_finishes(refs):
    ref = refs["FP8_BLOCK"]
    args = convert_args(ref.src, ref.out, BIG_SHARD)
    first = start(args)
    try:
        wait_until(first, lambda: any(ref.out.glob(TMP_PREFIX + "*")))
        first.send_signal(signal.SIGSTOP)  # alive and mid-write for as long as the second run takes, however slow
        try:
            second = fp8convert(args, timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("the second run waited for the first instead of failing")
        finally:
            first.send_signal(signal.SIGCONT)
        assert second.returncode == EXIT_ERROR, second.stderr
        line = error_line(second)
        assert "another" in line and "run" in line and "writing" in line, line
        assert str(ref.out) in line, line
        assert_reference(ref, finish(first), "the first run")
    finally:
        first.kill()
        first.communicate()


# ---- deterministic ---------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("threads", [1, 2])
def test_bytes_do_not_depend_on_the_run_nor_the_thread_count(refs, threads):
    """FP8_BLOCK is requantized (amax reductions) and the report's SQNR/error statistics are float sums."""
    ref = refs["FP8_BLOCK"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    args = [sys.executable, "-c", WITH_THREADS, str(threads), *convert_args(ref.src, ref.out, BIG_SHARD)]
    done = finish(subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    assert f"torch threads at exit: {threads}\n" in done.stderr, done.stderr  # the count held for the whole run
    assert_reference(ref, done, f"{threads} thread(s)")


# ---- clean failures --------------------------------------------------------------------------------------------
@pytest.fixture
def small(make_ct: Callable[..., Path]) -> tuple[Path, dict[str, str]]:
    """A checkpoint with about 1.7 MB of output (7 shards) and the sha256 of each of its files."""
    src = make_ct("FP8_DYNAMIC")
    return src, tree(src)


def assert_clean_failure(
    proc: subprocess.CompletedProcess[str], out: Path, left: list[str], source: tuple[Path, dict[str, str]]
) -> str:
    """Exit 1 and one 'Error:' line (returned) naming OUT; nothing under OUT (``left``: what is there now; no
    final path, no temporary directory, nothing else); the source byte for byte what it was."""
    assert proc.returncode == EXIT_ERROR, proc.stderr
    line = error_line(proc)
    assert str(out) in line, line
    assert left == [], f"left under OUT: {left}"
    assert tree(source[0]) == source[1], "the source changed"
    return line


def limit_file_size(limit: int) -> Callable[[], None]:
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing

    return preexec


def test_file_size_limit_fails_cleanly(small, tmp_path):
    out = tmp_path / "out"
    proc = fp8convert(convert_args(small[0], out, SMALL_SHARD), preexec_fn=limit_file_size(100_000))
    assert_clean_failure(proc, out, entries(out), small)


LEFT = "--- left under OUT:"


@pytest.mark.parametrize("size", ["64k", "512k"])  # full while writing the first shard / a later one
def test_disk_full_fails_cleanly(small, tmp_path, size):
    """A real ENOSPC: OUT's parent is a small tmpfs in a private mount namespace. The namespace and its tmpfs
    are gone when the command returns, so the command itself lists what OUT holds afterwards."""
    if not namespace_works("unshare", "-rm"):
        pytest.skip("unshare -rm (a private mount namespace, to mount a small tmpfs) is not permitted here")
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "out"
    script = (
        f'mount -t tmpfs -o size={size} tmpfs "$0" || exit 99; "$@"; rc=$?; '
        f'echo \'{LEFT}\'; [ -d "$0/out" ] && (cd "$0/out" && find . -mindepth 1 | cut -c3- | sort); exit $rc'
    )
    proc = fp8convert(
        convert_args(small[0], out, SMALL_SHARD), prefix=("unshare", "-rm", "sh", "-c", script, str(disk))
    )
    assert proc.returncode != 99 and LEFT in proc.stdout, proc.stdout + proc.stderr
    line = assert_clean_failure(proc, out, proc.stdout.split(LEFT, 1)[1].split(), small)
    assert "space" in line.lower(), line


@pytest.mark.parametrize("existing", [False, True], ids=["parent-read-only", "out-read-only"])
def test_read_only_output_fails_cleanly_without_writing(small, tmp_path, existing):
    """chmod 0o555 stops a normal user; as root the CLI runs in a user namespace as an unprivileged uid (files
    owned by root are its own there, so it reads them all, but 0o555 stops it as it stops a normal user)."""
    prefix: tuple[str, ...] = ()
    if os.geteuid() == 0:
        prefix = ("unshare", "--user", "--map-user=65534", "--map-group=65534")
        if not namespace_works(*prefix):
            pytest.skip("running as root and cannot drop privileges (unshare --user is not permitted here)")
    parent = tmp_path / "parent"
    out = parent / "out"
    locked = out if existing else parent
    locked.mkdir(parents=True)
    locked.chmod(0o555)
    try:
        proc = fp8convert(convert_args(small[0], out, SMALL_SHARD), prefix=prefix)
    finally:
        locked.chmod(0o755)
    assert_clean_failure(proc, out, entries(out), small)
    assert entries(parent) == (["out"] if existing else []), "something was written"
