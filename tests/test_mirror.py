"""pull-and-convert through olah, the self-hosted Hub mirror teams run, serving a local git repo offline on
loopback: the produced files equal those of converting the same files locally (branch, tag and sha)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fp8convert.examples import build_compressed_tensors
from fp8convert.pipeline import convert

from olah_mirror import olah_mirror

pytestmark = pytest.mark.mirror
REPO = "ibm-test/tiny-granite-fp8"


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for d in ("aiu", "cpu")
        for p in sorted((root / d).rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    if shutil.which("git") is None:
        pytest.fail("git is required for the olah mirror test")
    tmp = tmp_path_factory.mktemp("mirror")
    src = build_compressed_tensors(tmp / "src", arch="granite", hidden=64, intermediate=128, vocab=64)
    local = tmp / "local"
    convert(src, local)
    with olah_mirror(tmp, {REPO: src}) as (endpoint, shas):
        yield endpoint, shas[REPO], local, tmp


@pytest.mark.parametrize("revision", ["main", "v1", "sha"])
def test_pull_and_convert_through_olah_equals_local(mirror, revision: str) -> None:
    endpoint, sha, local, tmp = mirror
    rev = sha if revision == "sha" else revision
    out = tmp / f"out-{revision}"
    env = {
        **os.environ,
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(tmp / f"hf-{revision}"),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    env.pop("HF_TOKEN", None)
    exe = str(Path(sys.executable).with_name("fp8convert"))
    r = subprocess.run(
        [exe, "pull-and-convert", REPO, str(out), "--revision", rev, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout)
    assert report["source"]["repo"] == REPO and report["source"]["revision"] == sha
    assert _digests(out) == _digests(local)
