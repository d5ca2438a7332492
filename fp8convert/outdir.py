"""The output directory: checks, the lock, the resumable temporary directory, the final commit, and OS
errors (disk full, read-only, permissions) turned into one clear error.

Layout while a conversion runs: ``OUT/.fp8convert-tmp-<key>/`` holds ``aiu/``, ``cpu/``, the report and
``.state/`` (the shard journal and the commit marker). ``<key>`` fingerprints the source files and the
options, so the same command resumes its own directory and any other one is stale. The lock is an
``flock`` on ``OUT`` itself: the kernel drops it when the process dies (even by kill -9), so nothing is
ever left locked and no pid file can lie.

Commit: previous outputs (``--overwrite``) are first moved into the temporary directory, then ``aiu``,
``cpu`` and the report are renamed into place, the report last. A final path is therefore either absent
or complete; a run killed between two renames left a marker saying what remains, and the same command
finishes the commit.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from fp8convert.errors import OutputError

logger = logging.getLogger(__name__)

TMP_PREFIX = ".fp8convert-tmp-"
STATE = ".state"
COMMIT_MARKER = "commit.json"
REPORT_NAME = "fp8convert-report.json"
FINAL_NAMES = ("aiu", "cpu", REPORT_NAME)


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def fingerprint(files: Iterable[Path], settings: dict[str, object]) -> str:
    """Key of a conversion: every source file's name, inode, size, mtime and ctime (which no tool can set back,
    unlike the mtime), and the settings that shape the output bytes."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for f in sorted(files):
        st = f.stat()
        h.update(f"{f}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\n".encode())
    return h.hexdigest()[:16]


def pending_commit(out: Path, key: str | None = None) -> Path | None:
    """The temporary directory of a run killed during its commit (``key``'s, or any), if one is there."""
    if not out.is_dir():
        return None
    for tmp in sorted(out.glob(TMP_PREFIX + "*")):
        if (tmp / STATE / COMMIT_MARKER).is_file() and (key is None or tmp.name == TMP_PREFIX + key):
            return tmp
    return None


def check_output(source: Path, out: Path, overwrite: bool, key: str | None = None) -> None:
    """Refuse an output inside the source (or around it), a file, or a non-empty directory (unless
    ``overwrite``, or the leftovers are the half-committed outputs of the command keyed ``key``; of any
    command when ``key`` is None, as a first check before the key is known)."""
    src, dst = source.resolve(), out.resolve()
    if _inside(dst, src):
        raise OutputError(
            "the output directory is inside the source checkpoint",
            where=str(out),
            hint="choose an output directory outside the source; the source is never modified",
        )
    if _inside(src, dst):
        raise OutputError(
            "the source checkpoint is inside the output directory",
            where=str(out),
            hint="choose an output directory that does not contain the source",
        )
    if dst.exists() and not dst.is_dir():
        raise OutputError(
            "the output path exists and is not a directory",
            where=str(out),
            hint="choose a directory path (it is created if missing)",
        )
    if dst.is_dir() and not overwrite:
        leftovers = {p.name for p in dst.iterdir() if not p.name.startswith(TMP_PREFIX)}
        if leftovers and not (pending_commit(dst, key) and leftovers <= set(FINAL_NAMES)):
            raise OutputError(
                f"the output directory is not empty ({len(leftovers)} entries)",
                where=str(out),
                hint="pass --overwrite to replace aiu/, cpu/ and the report, or choose an empty directory",
            )


def os_error(exc: OSError, out: Path) -> OutputError:
    """An OS error met while writing the output, as one line that says what to do."""
    where = exc.filename or str(out)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        hint = "free space on that filesystem (or raise the file size limit) or choose another output directory"
        what = "out of space while writing the output"
    elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        hint = "choose an output directory you can write to"
        what = "cannot write the output (read-only filesystem or permission denied)"
    else:
        hint = "check the output filesystem"
        what = "cannot write the output"
    return OutputError(f"{what}: {exc.strerror or exc}; nothing was written", where=str(where), hint=hint)


@contextmanager
def locked(out: Path) -> Iterator[None]:
    """Create ``out`` if needed and hold an exclusive lock on it (refused if another run holds it).

    A failed run removes an ``out`` it created, so the directory locked here may be gone by the time the lock
    is granted: then the lock is taken again on the directory now at that path."""
    for _ in range(5):
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputError(
                "another fp8convert run is writing into this directory",
                where=str(out),
                hint="wait for it to finish, or choose another output directory",
            ) from None
        except OSError as exc:  # NFS (no flock on a directory), Lustre without -o flock, ...
            logger.warning("%s: cannot lock the output directory (%s); make sure no other run writes there", out, exc)
        if _same_directory(fd, out):
            break
        os.close(fd)
    else:
        raise OutputError(
            "the output directory keeps being removed while fp8convert locks it",
            where=str(out),
            hint="make sure no other program deletes it",
        )
    try:
        yield
    finally:
        os.close(fd)


def _same_directory(fd: int, path: Path) -> bool:
    try:
        st, now = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino)


def workdir(out: Path, key: str) -> Path:
    """This run's temporary directory (kept if it is this command's, for resuming); others are removed."""
    mine = out / (TMP_PREFIX + key)
    for stale in out.glob(TMP_PREFIX + "*"):
        if stale != mine:
            shutil.rmtree(stale, ignore_errors=True)
    (mine / STATE).mkdir(parents=True, exist_ok=True)
    return mine


def commit(tmp: Path, out: Path) -> None:
    """Move ``tmp/{aiu,cpu,report}`` into ``out`` (report last), replacing earlier outputs, then drop ``tmp``."""
    marker = tmp / STATE / COMMIT_MARKER
    try:
        names = json.loads(marker.read_text(encoding="utf-8"))["names"]
    except (OSError, ValueError, KeyError, TypeError):  # not committing yet, or a marker cut by a power loss
        cut = marker.exists()  # then some names may already be in place
        names = [n for n in FINAL_NAMES if (tmp / n).exists() or (cut and (out / n).exists())]
        staged = marker.with_suffix(".tmp")
        staged.write_text(json.dumps({"names": names}), encoding="utf-8")
        os.replace(staged, marker)
    old = tmp / STATE / "previous"
    old.mkdir(exist_ok=True)
    for name in FINAL_NAMES:  # earlier outputs, including a target this run does not write
        final = out / name
        if (final.exists() or final.is_symlink()) and (tmp / name).exists() or (name not in names and final.exists()):
            os.replace(final, old / name)
    for name in names:
        if (tmp / name).exists():
            os.replace(tmp / name, out / name)
    shutil.rmtree(tmp, ignore_errors=True)


def discard(tmp: Path, out: Path, created: bool) -> None:
    """Remove a failed run's temporary directory (and ``out`` if this run created it and it is empty)."""
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
    except OSError:
        pass
