"""olah (PyPI), the self-hosted Hugging Face mirror teams run, serving a local git repo offline on loopback.

``olah_mirror(tmp_path, {"org/name": checkpoint_dir})`` makes a non-bare git repo per model (LFS pointers
committed, objects under ``.git/lfs/objects``; no git-lfs binary needed), writes olah's TOML config with
``offline = true`` and loopback-only netlocs, starts ``olah-cli`` in its own session, waits for a TCP
connect, and yields ``(endpoint, {repo: commit sha})``. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

LFS_SUFFIXES = (".safetensors",)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _git(repo: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
        "GIT_AUTHOR_DATE": "2026-01-01T00:00:00",
        "GIT_COMMITTER_DATE": "2026-01-01T00:00:00",
    }
    return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True).stdout


def make_git_repo(mirrors: Path, repo_id: str, files: Path) -> str:
    """A non-bare git repo at ``mirrors/models/<repo_id>`` holding ``files`` (LFS for safetensors); returns
    the commit sha of branch main (also tagged v1)."""
    repo = mirrors / "models" / repo_id
    repo.mkdir(parents=True)
    _git(repo, "init", "-q", "-b", "main")
    for src in sorted(p for p in files.iterdir() if p.is_file()):
        if src.suffix in LFS_SUFFIXES:
            data = src.read_bytes()
            oid = hashlib.sha256(data).hexdigest()
            obj = repo / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
            obj.parent.mkdir(parents=True, exist_ok=True)
            obj.write_bytes(data)
            (repo / src.name).write_text(
                f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {len(data)}\n"
            )
        else:
            shutil.copyfile(src, repo / src.name)
    (repo / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "model")
    _git(repo, "tag", "v1")
    return _git(repo, "rev-parse", "HEAD").strip()


@contextlib.contextmanager
def olah_mirror(
    tmp: Path, models: dict[str, Path], *, start_timeout: float = 30.0
) -> Iterator[tuple[str, dict[str, str]]]:
    mirrors, repos, logs = tmp / "mirrors", tmp / "olah-repos", tmp / "olah-logs"
    shas = {repo_id: make_git_repo(mirrors, repo_id, files) for repo_id, files in models.items()}
    exe = shutil.which("olah-cli", path=str(Path(sys.executable).parent)) or shutil.which("olah-cli")
    assert exe, "olah-cli not found (pip install olah)"
    for _attempt in range(3):  # the port is chosen before olah binds it: retry on a race
        port = _free_port()
        cfg = tmp / "olah.toml"
        cfg.write_text(
            "[basic]\n"
            f'host = "127.0.0.1"\nport = {port}\nrepos-path = "{repos}"\nmirrors-path = ["{mirrors}"]\n'
            'hf-scheme = "http"\nhf-netloc = "127.0.0.1:9"\nhf-lfs-netloc = "127.0.0.1:9"\n'
            f'mirror-scheme = "http"\nmirror-netloc = "127.0.0.1:{port}"\nmirror-lfs-netloc = "127.0.0.1:{port}"\n'
            "[accessibility]\noffline = true\n"
        )
        proc = subprocess.Popen(
            [exe, "-c", str(cfg), "--log-path", str(logs)],
            cwd=tmp,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + start_timeout
        ready = False
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                ready = True
                break
            time.sleep(0.1)
        if ready:
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    else:
        raise RuntimeError("olah did not start")
    try:
        yield f"http://127.0.0.1:{port}", shas
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
