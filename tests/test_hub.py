"""``pull`` and ``pull-and-convert`` against the project's own Hub-compatible server on loopback
(tests/hub_server.py). The CLI runs in a subprocess with its own HF_HOME and the real huggingface_hub client:
nothing inside the client is mocked. Covers branch/tag/sha, byte equality with a local conversion, every failure
message and exit code, the requests made (no pickle, no token on the CDN origin, no refetch after a failure),
interruptions, offline mode and --json."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner

from fp8convert.cli import main
from fp8convert.examples import build_compressed_tensors
from fp8convert.pipeline import ConvertOptions, convert
from fp8convert.shards import AUX_FILES

from hub_server import Fault, HubServer, run_cli

pytestmark = pytest.mark.hub

SMALL = {"hidden": 64, "intermediate": 128, "vocab": 64}
REPO, PRIVATE, GATED, PICKLES = "acme/tiny-fp8", "acme/private-fp8", "acme/gated-fp8", "acme/pickles-only"
GOOD, OTHER = "hf_good_token_0123456789", "hf_other_token_9876543210"
SHARD1, SHARD2 = "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors"
#: files a real repo ships next to the weights that conversion must never request
EXTRAS = {
    "pytorch_model.bin": b"\x80\x04pickle",
    "model.gguf": b"GGUF",
    "training_args.pt": b"\x80\x04pickle",
    "consolidated.safetensors": b"{}",  # Mistral-native duplicate of the HF shards
    "original/model.safetensors": b"{}",
    "onnx/model.onnx": b"onnx",
    "onnx/config.json": b"{}",
    "README.md": b"# tiny FP8 model\n",
    ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
}
REPORT = "fp8convert-report.json"
INDEX = "model.safetensors.index.json"


# ---- helpers -------------------------------------------------------------------------------------------------
def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def outputs(out: Path) -> dict[str, str]:
    """sha256 of every produced artifact file (aiu/ and cpu/; the report names the source, so it differs)."""
    return {str(p.relative_to(out)): sha256(p) for d in ("aiu", "cpu") for p in sorted((out / d).rglob("*"))}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hf_env(home: Path, hub: HubServer | None, **extra: str) -> dict[str, str]:
    """The environment of one CLI run: its own HF_HOME, the loopback endpoint, no inherited HF settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_"))}
    env.update(
        HF_HOME=str(home),
        HF_ENDPOINT=hub.endpoint if hub else f"http://127.0.0.1:{free_port()}",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    env.update(extra)
    return env


def fp8convert(env: dict[str, str], *args: object, fresh: bool = False) -> subprocess.CompletedProcess[str]:
    """The CLI in its own process with ``env`` (cwd HF_HOME): forked from a warm server, or with ``fresh`` a new
    ``python -m fp8convert.cli`` exactly as users run it."""
    if not fresh:
        return run_cli(list(map(str, args)), env, cwd=env["HF_HOME"])
    command = [sys.executable, "-m", "fp8convert.cli", *map(str, args)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=90, cwd=env["HF_HOME"])


def popen(env: dict[str, str], *args: object) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "fp8convert.cli", *map(str, args)]
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=env["HF_HOME"]
    )


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The one line that reports the failure: the last line of stderr, the only one starting with Error:."""
    lines = proc.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("Error:")] == lines[-1:], proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
    return lines[-1]


def one_json(stdout: str) -> dict:
    assert stdout.count("\n") == 1 and stdout.endswith("}\n"), stdout  # exactly one JSON document
    return json.loads(stdout)


def cdn_gets(hub: HubServer, name: str) -> int:
    return sum(1 for r in hub.requests(origin="cdn", method="GET") if f"file={name}" in r.path)


def wait_for(predicate: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


# ---- fixtures -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_compressed_tensors(tmp_path_factory.mktemp("hub") / "src", scheme="FP8_DYNAMIC", shards=2, **SMALL)


@pytest.fixture(scope="session")
def reference(source: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The artifacts of converting the same files locally."""
    out = tmp_path_factory.mktemp("hub") / "local"
    convert(source, out, ConvertOptions())
    return outputs(out)


@pytest.fixture(scope="session")
def needed(source: Path) -> set[str]:
    return {p.name for p in source.iterdir()}


@dataclass
class Hub:
    server: HubServer
    shas: dict[str, str] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return self.server.endpoint


def start_hub(source: Path) -> Hub:
    server = HubServer(tree_page=4).start()  # a small page: the listing is paginated (Link: rel="next")
    server.tokens = {GOOD, OTHER}
    files = {p.name: p.read_bytes() for p in source.iterdir()} | EXTRAS
    hub = Hub(server)
    hub.shas["v1.0"] = server.add_repo(REPO, files, tags=("v1.0",))
    hub.shas["main"] = server.commit(REPO, files | {"README.md": b"# tiny FP8 model, v2\n"})
    server.add_repo(PRIVATE, files, private=True, allowed={GOOD})
    server.add_repo(GATED, files, gated=True, allowed={GOOD})
    server.add_repo(PICKLES, {"config.json": b"{}", "pytorch_model.bin": b"x", "model.gguf": b"g", "README.md": b""})
    return hub


@pytest.fixture
def hub(source: Path) -> Iterator[Hub]:
    hub = start_hub(source)
    yield hub
    hub.server.stop()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "hf-home"
    path.mkdir()
    return path


def assert_only_needed_requested(server: HubServer, needed: set[str]) -> None:
    asked = set(server.requested_files())
    assert asked <= needed, asked - needed
    paths = [r.path for r in server.requests()]
    assert not [p for p in paths if any(x in p for x in (".bin", ".gguf", ".pt", "onnx", "original/", "consolid"))]
    assert not [r for r in server.requests(origin="cdn") if r.auth]  # the token never reaches the CDN origin


# ---- the happy path -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ref", ["main", "v1.0", "sha"])
def test_pull_and_convert_equals_a_local_conversion(hub, home, tmp_path, reference, needed, ref):
    revision = hub.shas["v1.0"] if ref == "sha" else ref
    out = tmp_path / "out"
    proc = fp8convert(
        hf_env(home, hub.server), "pull-and-convert", REPO, out, "--revision", revision, fresh=ref == "main"
    )
    assert proc.returncode == 0, proc.stderr
    assert outputs(out) == reference  # byte for byte (sha256) the files of a local conversion
    sha = hub.shas["main" if ref == "main" else "v1.0"]
    report = json.loads((out / REPORT).read_text())
    assert report["source"]["repo"] == REPO
    assert report["source"]["revision"] == sha
    assert report["source"]["requested_revision"] == revision
    assert report["source"]["path"] == str(home / "hub" / "models--acme--tiny-fp8" / "snapshots" / sha)
    assert proc.stdout.splitlines()[0] == f"Pulled {REPO}@{revision} (commit {sha}) -> {report['source']['path']}"
    assert f"Converted {report['source']['path']} (compressed-tensors) -> {out}" in proc.stdout
    assert set(hub.server.requested_files()) == needed  # every needed file, nothing else
    assert_only_needed_requested(hub.server, needed)
    if ref == "sha":  # a pinned sha skips the revision call
        assert not [r for r in hub.server.requests() if "/revision/" in r.path]


def test_the_cache_is_reused(hub, home, needed):
    env = hf_env(home, hub.server, HF_HUB_CACHE=str(home / "elsewhere"))
    first = fp8convert(env, "pull", REPO, "--json")
    assert first.returncode == 0, first.stderr
    doc = one_json(first.stdout)
    assert doc["command"] == "pull" and doc["ok"] is True and doc["from_cache"] is False
    assert doc["commit"] == hub.shas["main"] and doc["revision"] == "main"
    assert Path(doc["path"]).is_relative_to(home / "elsewhere")  # HF_HUB_CACHE is honoured
    assert set(doc["files"]) == needed
    hub.server.log.clear()
    again = fp8convert(env, "pull", REPO)
    assert again.returncode == 0, again.stderr
    assert [(r.method, r.path) for r in hub.server.requests()] == [("GET", f"/api/models/{REPO}/revision/main")]
    hub.server.log.clear()
    pinned = fp8convert(env, "pull", REPO, "--revision", hub.shas["main"], "--json")
    assert pinned.returncode == 0, pinned.stderr
    assert one_json(pinned.stdout)["from_cache"] is True
    assert hub.server.requests() == []  # a pinned, complete snapshot needs no request at all


def test_local_dir(hub, home, tmp_path, needed, reference):
    target = tmp_path / "model"
    env = hf_env(home, hub.server)
    proc = fp8convert(env, "pull", REPO, "--local-dir", target)
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in target.iterdir() if p.is_file()} == needed
    assert not any(p.is_symlink() for p in target.iterdir())
    hub.server.log.clear()
    assert fp8convert(env, "pull", REPO, "--local-dir", target).returncode == 0
    assert [(r.method, r.path) for r in hub.server.requests()] == [("GET", f"/api/models/{REPO}/revision/main")]
    hub.server.log.clear()
    out = tmp_path / "out"
    offline = fp8convert(env, "pull-and-convert", REPO, out, "--local-dir", target, "--offline")
    assert offline.returncode == 0, offline.stderr
    assert hub.server.requests() == []
    assert outputs(out) == reference
    assert json.loads((out / REPORT).read_text())["source"]["path"] == str(target)


@pytest.mark.parametrize("how", ["--token-file", "HF_TOKEN"])
def test_token_reaches_the_hub_origin_only(hub, home, tmp_path, needed, how):
    token_file = tmp_path / "token"
    token_file.write_text(GOOD + "\n")
    args = ["pull", PRIVATE, "-v", "--debug"] + (["--token-file", token_file] if how == "--token-file" else [])
    env = hf_env(home, hub.server, **({"HF_TOKEN": GOOD} if how == "HF_TOKEN" else {}))
    proc = fp8convert(env, *args)
    assert proc.returncode == 0, proc.stderr
    assert all(r.auth for r in hub.server.requests(origin="api"))
    assert hub.server.requests(origin="cdn") and not any(r.auth for r in hub.server.requests(origin="cdn"))
    assert GOOD not in proc.stdout + proc.stderr
    assert_only_needed_requested(hub.server, needed)


# ---- failures: one line and an exit code each ----------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    name: str
    args: tuple[str, ...]
    code: int
    message: str  # expected in the error line; {endpoint} is filled in
    env: tuple[tuple[str, str], ...] = ()
    faults: tuple[Fault, ...] = ()
    json: bool = False


NOT_CACHED = "Fix: run the same command once with network access (without --offline, HF_HUB_OFFLINE unset)"
RETRY = "Fix: check the network (proxy, HF_ENDPOINT), then run the same command again: finished files are kept"
CASES = [
    Case(
        "not-found",
        ("pull", "acme/missing"),
        4,
        "Error: repository acme/missing not found on {endpoint} (or it is private and no token was given). Fix: check "
        "the repo id (ORG/NAME); for a private repo pass --token-file FILE or set HF_TOKEN to a token that can read it",
    ),
    Case(
        "private-anonymous", ("pull", PRIVATE), 4, f"repository {PRIVATE} not found on {{endpoint}} (or it is private"
    ),
    Case(
        "private-no-access",
        ("pull", PRIVATE),
        4,
        f"repository {PRIVATE} not found on {{endpoint}} (or it is private and the token given (HF_TOKEN) has no "
        "access to it)",
        env=(("HF_TOKEN", OTHER),),
    ),
    Case(
        "gated-anonymous",
        ("pull", GATED),
        4,
        f"Error: {GATED} is gated. Fix: accept its conditions at {{endpoint}}/{GATED} while logged in, then pass a "
        "token of that account (--token-file FILE or HF_TOKEN)",
    ),
    Case(
        "gated-no-access",
        ("pull", GATED),
        4,
        f"Error: {GATED} is gated and the token given (HF_TOKEN) has not been granted access. Fix: accept",
        env=(("HF_TOKEN", OTHER),),
    ),
    Case(
        "unknown-branch",
        ("pull", REPO, "--revision", "v9"),
        4,
        f"Error: revision 'v9' not found in {REPO}. Fix: pass an existing branch, tag or full 40-character commit sha",
    ),
    Case("unknown-sha", ("pull", REPO, "--revision", "0" * 40), 4, f"revision '{'0' * 40}' not found in {REPO}"),
    Case(
        "invalid-token",
        ("pull", REPO),
        4,
        "Error: the Hub at {endpoint} rejected the token given (HF_TOKEN) as invalid. Fix: check the token",
        env=(("HF_TOKEN", "hf_not_a_valid_token"),),
    ),
    Case("invalid-repo-id", ("pull", "acme/a/b"), 4, "Error: invalid repo id 'acme/a/b'"),
    Case(
        "no-safetensors",
        ("pull-and-convert", PICKLES, "out"),
        4,
        f"Error: {PICKLES}@main has no *.safetensors weights at its top level; it has model.gguf, pytorch_model.bin "
        "(pickle or GGUF, which fp8convert never downloads). Fix: choose a repo or revision that publishes safetensors",
    ),
    Case(
        "offline-not-cached",
        ("pull-and-convert", REPO, "out", "--offline"),
        4,
        f"Error: {REPO}@main is not in the local cache ({{home}}/hub/models--acme--tiny-fp8) and offline mode is on "
        f"(--offline). {NOT_CACHED}",
    ),
    Case(
        "hf-hub-offline-not-cached",
        ("pull", REPO),
        4,
        "and offline mode is on (HF_HUB_OFFLINE=1)",
        env=(("HF_HUB_OFFLINE", "1"),),
    ),
    Case(
        "unreachable",
        ("pull-and-convert", REPO, "out"),
        5,
        f"Error: {REPO}@main: the Hub at {{endpoint}} could not be reached: [Errno 111] Connection refused. {RETRY}",
        env=(("HF_ENDPOINT", "dead"),),
    ),
    Case(
        "server-error",
        ("pull", "acme/flaky"),
        5,
        f"Error: acme/flaky@main: the Hub at {{endpoint}} answered HTTP 500. {RETRY}",
        faults=(Fault("/api/models/acme/flaky/", "status", status=500, count=99),),
    ),
    Case(
        "stall",
        ("pull", "acme/slow"),
        5,
        "Error: acme/slow@main: the Hub at {endpoint} timed out (HF_HUB_ETAG_TIMEOUT / HF_HUB_DOWNLOAD_TIMEOUT set",
        env=(("HF_HUB_ETAG_TIMEOUT", "1"),),
        faults=(Fault("/api/models/acme/slow/", "stall", seconds=5, count=99),),
    ),
    Case(
        "cdn-503",
        ("pull", "acme/cut"),
        5,
        "Error: acme/cut@main: the Hub at {endpoint} answered HTTP 503",
        faults=(Fault(f"repo=acme/cut&file={SHARD2}", "status", status=503, count=99),),
    ),
    Case(
        "listed-file-missing",
        ("pull", "acme/broken"),
        1,
        "Error: acme/broken@main: the Hub answered HTTP 404 for {endpoint}/acme/broken/resolve/"
        f"{{sha}}/{SHARD2}. Fix: run again; if it persists, the repo is inconsistent at this revision",
        faults=(Fault(f"/acme/broken/resolve/.*/{SHARD2}", "status", status=404, code="EntryNotFound", count=99),),
    ),
    Case("json-not-found", ("pull", "acme/missing", "--json"), 4, "repository acme/missing not found", json=True),
    Case(
        "json-unreachable",
        ("pull-and-convert", REPO, "out", "--json"),
        5,
        "could not be reached",
        json=True,
        env=(("HF_ENDPOINT", "dead"),),
    ),  # fmt: skip
    Case("json-gated", ("pull-and-convert", GATED, "out", "--json"), 4, f"{GATED} is gated", json=True),
]


@pytest.fixture(scope="module")
def failures(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Hub, dict[str, tuple]]]:
    """Every failure case, run concurrently (each CLI run is a subprocess that spends most of its time importing)."""
    hub = start_hub(source)
    files = {p.name: p.read_bytes() for p in source.iterdir()}
    for repo in ("acme/flaky", "acme/slow", "acme/cut", "acme/broken"):
        hub.shas[repo] = hub.server.add_repo(repo, files)
    hub.server.faults = [f for case in CASES for f in case.faults]
    root = tmp_path_factory.mktemp("failures")

    def run(case: Case) -> tuple:
        home = root / case.name
        home.mkdir()
        env = hf_env(home, hub.server, **dict(case.env))
        if env["HF_ENDPOINT"] == "dead":
            env["HF_ENDPOINT"] = f"http://127.0.0.1:{free_port()}"
        return fp8convert(env, *case.args), env["HF_ENDPOINT"], home

    with ThreadPoolExecutor(max_workers=max(4, os.cpu_count() or 1)) as pool:
        results = dict(zip([c.name for c in CASES], pool.map(run, CASES), strict=True))
    yield hub, results
    hub.server.stop()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_failure_is_one_line_and_an_exit_code(failures, case):
    hub, results = failures
    proc, endpoint, home = results[case.name]
    expected = case.message.format(endpoint=endpoint, home=home, sha=hub.shas.get("acme/broken"))
    assert proc.returncode == case.code, proc.stderr
    if case.json:
        doc = one_json(proc.stdout)
        assert doc["ok"] is False and doc["command"] == case.args[0]
        assert doc["error"]["exit_code"] == case.code and expected in doc["error"]["message"]
        assert doc["error"]["type"].endswith("Error") and doc["error"]["hint"]
    else:
        assert proc.stdout == ""
        assert expected in error_line(proc)
    assert not (home / "out").exists()
    assert GOOD not in proc.stderr + proc.stdout and OTHER not in proc.stderr + proc.stdout


def test_failures_never_request_pickles_nor_send_the_token_to_the_cdn(failures, needed):
    hub, _results = failures
    assert_only_needed_requested(hub.server, needed)
    assert {f.path: f.hits for f in hub.server.faults if f.hits == 0} == {}  # every injected fault was exercised


def test_output_checked_before_downloading(hub, home, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    proc = fp8convert(hf_env(home, hub.server), "pull-and-convert", REPO, out)
    assert proc.returncode == 1
    assert "the output directory is not empty (1 entries)" in proc.stderr
    assert hub.server.requests() == []


# ---- interruptions and resuming -------------------------------------------------------------------------------
def test_rerun_after_a_failed_transfer_completes(hub, home, tmp_path, reference):
    hub.server.faults = [Fault(f"file={SHARD2}", "status", status=503)]
    env, out = hf_env(home, hub.server), tmp_path / "out"
    failed = fp8convert(env, "pull-and-convert", REPO, out)
    assert failed.returncode == 5, failed.stderr
    assert f"answered HTTP 503. {RETRY} and not fetched again" in error_line(failed)
    assert not out.exists()
    done = fp8convert(env, "pull-and-convert", REPO, out)
    assert done.returncode == 0, done.stderr
    assert outputs(out) == reference
    assert (cdn_gets(hub.server, SHARD1), cdn_gets(hub.server, SHARD2)) == (1, 2)  # shard 1 was not fetched again


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill"])
def test_interrupted_download_resumes_on_rerun(hub, home, tmp_path, reference, sig):
    stall = Fault(f"file={SHARD2}", "stall", after_bytes=1000, seconds=60)
    hub.server.faults = [stall]
    env, out = hf_env(home, hub.server), tmp_path / "out"
    proc = popen(env, "pull-and-convert", REPO, out, "--json")
    snapshot = home / "hub" / "models--acme--tiny-fp8" / "snapshots" / hub.shas["main"]
    wait_for(lambda: stall.hits == 1 and (snapshot / SHARD1).exists() and (snapshot / "tokenizer.json").exists())
    sent = time.monotonic()
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=20)
    assert time.monotonic() - sent < 3  # promptly, although a download thread is still stalled
    if sig == signal.SIGINT:
        assert proc.returncode == 130
        message = f"Interrupted while downloading {REPO}@main; finished files are kept. Run the same command again"
        assert message in stderr
        error = one_json(stdout)["error"]
        assert error["exit_code"] == 130 and error["message"].startswith(message)
    else:
        assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    done = fp8convert(env, "pull-and-convert", REPO, out)
    assert done.returncode == 0, done.stderr
    assert outputs(out) == reference
    assert cdn_gets(hub.server, SHARD1) == 1  # finished before the interruption: not fetched again
    assert stall.hits == 1 and cdn_gets(hub.server, SHARD2) >= 1  # (the stalled request is logged when it ends)


def test_cut_connection_resumes_with_range(hub, home, source):
    """In one process huggingface_hub retries a cut transfer with ``Range`` from its last whole 10 MiB chunk."""
    big = json.dumps({"padding": "x" * (11 << 20)}).encode()
    files = {p.name: p.read_bytes() for p in source.iterdir()} | {"tokenizer.json": big}
    sha = hub.server.add_repo("acme/big", files)
    hub.server.faults = [Fault("/acme/big/resolve/.*/tokenizer.json", "drop", method="GET", after_bytes=(21 << 19))]
    proc = fp8convert(hf_env(home, hub.server), "pull", "acme/big")
    assert proc.returncode == 0, proc.stderr
    gets = [r for r in hub.server.requests(method="GET") if r.path.endswith("/tokenizer.json")]
    assert [(r.status, r.range) for r in gets] == [(200, None), (206, "bytes=10485760-")]
    assert (home / "hub" / "models--acme--big" / "snapshots" / sha / "tokenizer.json").read_bytes() == big


# ---- the cache when the Hub is not there ----------------------------------------------------------------------
def test_offline_converts_from_the_cache(hub, home, tmp_path, reference):
    env = hf_env(home, hub.server)
    assert fp8convert(env, "pull", REPO).returncode == 0
    hub.server.stop()
    for name, extra, args in (
        ("flag", {}, ["--offline"]),
        ("env", {"HF_HUB_OFFLINE": "1"}, []),
        ("unreachable", {"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}, []),
    ):
        out = tmp_path / name
        proc = fp8convert({**env, **extra}, "pull-and-convert", REPO, out, *args)
        assert proc.returncode == 0, proc.stderr
        assert outputs(out) == reference
        assert json.loads((out / REPORT).read_text())["source"]["revision"] == hub.shas["main"]
        assert "from the local cache (no request to the Hub)" in proc.stdout
        if name == "unreachable":
            assert "could not be reached: [Errno 111] Connection refused; using the cached snapshot" in proc.stdout


def test_incomplete_cache(hub, home, tmp_path, reference):
    env = hf_env(home, hub.server)
    assert fp8convert(env, "pull", REPO).returncode == 0
    storage = home / "hub" / "models--acme--tiny-fp8"
    link = storage / "snapshots" / hub.shas["main"] / SHARD2
    link.resolve().unlink()
    link.unlink()
    offline = fp8convert(env, "pull", REPO, "--offline")
    assert offline.returncode == 4
    assert error_line(offline) == (
        f"Error: the cached snapshot of {REPO}@main is incomplete (1 file(s) missing: {SHARD2}) and offline mode is "
        "on. Fix: run the same command once with network access to complete it"
    )
    dead = fp8convert({**env, "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}, "pull", REPO)
    assert dead.returncode == 5
    assert error_line(dead).startswith(
        f"Error: {REPO}@main: the Hub could not be reached and the cached snapshot is incomplete (1 file(s) missing: "
        f"{SHARD2}). {RETRY}"
    )
    hub.server.log.clear()
    out = tmp_path / "out"
    done = fp8convert(env, "pull-and-convert", REPO, out)
    assert done.returncode == 0, done.stderr
    assert outputs(out) == reference
    assert [r.path.split("?")[1] for r in hub.server.requests(origin="cdn")] == [f"repo={REPO}&file={SHARD2}"]


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)")
def test_disk_full(hub, home):
    """A real ENOSPC: HF_HOME is a 64 KiB tmpfs in a private mount namespace (skipped where that is not allowed)."""
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("unprivileged user namespaces are not available")
    env = hf_env(home, hub.server)
    script = 'mount -t tmpfs -o size=64k tmpfs "$HF_HOME" && exec "$@"'
    command = ["unshare", "-rm", "sh", "-c", script, "sh", sys.executable, "-m", "fp8convert.cli", "pull", REPO]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 1, proc.stderr
    assert error_line(proc) == (
        f"Error: no space left on the disk holding {home}/hub. Fix: free space, or point HF_HOME (or HF_HUB_CACHE, or "
        "--local-dir) at a larger disk, then run the same command again: finished files are kept"
    )


# ---- in-process checks: help, patterns, messages -------------------------------------------------------------
@pytest.mark.parametrize(
    ("command", "example"),
    [
        ("pull", "fp8convert pull ORG/MODEL --revision v1.0 --local-dir ./model --token-file ~/.hf-token"),
        ("pull-and-convert", "fp8convert pull-and-convert ORG/MODEL out/ --offline --json > result.json"),
    ],
)
def test_help(command, example):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert example in result.stdout
    assert "4 wrong input (repo, revision, token," in result.stdout and "5 network failure" in result.stdout
    for option in ("--revision", "--local-dir", "--offline", "--token-file"):
        assert option in result.stdout
    if command == "pull-and-convert":
        for option in ("--target", "--overwrite", "--quantize-unquantized", "--max-shard-size", "--format"):
            assert option in result.stdout


def test_needed_patterns_cover_what_conversion_reads():
    from huggingface_hub.utils import filter_repo_objects

    from fp8convert.hub import NEEDED, NEVER

    def kept(names: list[str]) -> list[str]:
        return list(filter_repo_objects(names, allow_patterns=list(NEEDED), ignore_patterns=list(NEVER)))

    wanted = [*AUX_FILES, "config.json", "hf_quant_config.json", "params.json", "model.safetensors", INDEX]
    assert kept(wanted) == wanted
    never = [name for name in EXTRAS if not name.startswith("consolidated")]  # skipped when HF shards exist
    assert kept([*never, "model.bin", "x.pth", "x.ckpt", "x.pkl", "sub/model.safetensors"]) == []


def test_disk_full_and_secrets_in_messages(tmp_path):
    """The mapping of an ENOSPC, and that a token or a signed URL's query never reaches a message."""
    from fp8convert import hub as hub_module

    ctx = hub_module._Ctx(
        repo=REPO,
        revision="main",
        endpoint="http://127.0.0.1:1",
        token=GOOD,
        token_source="--token-file",
        offline=False,
        local_dir=tmp_path,
        secrets=(GOOD,),
    )
    error = hub_module.translate(OSError(errno.ENOSPC, "No space left on device"), ctx)
    assert error is not None and error.exit_code == 1
    assert error.render().startswith(f"no space left on the disk holding {tmp_path}. Fix: free space")
    leak = OSError(f"failed https://user:{GOOD}@cdn.example/x?X-Amz-Signature=abc&token={GOOD} for {GOOD}")
    error = hub_module.translate(leak, ctx)
    assert error is not None
    assert error.message == f"{REPO}@main: download failed: failed https://cdn.example/x for ***"
