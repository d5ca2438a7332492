"""A small Hugging Face Hub-compatible server for tests: stdlib only, loopback only.

It speaks the four endpoints huggingface_hub uses to download a snapshot, with the headers the client relies on:

- ``GET /api/models/{repo}[/revision/{rev}]``: repo info (``sha``, ``siblings``), what ``repo_info`` reads;
- ``GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=true``: the file listing, paginated with
  ``Link: <...>; rel="next"``;
- ``HEAD|GET /{repo}/resolve/{rev}/{path}``: ``X-Repo-Commit``, ``ETag`` (git blob sha1) and ``Content-Length``
  for regular files; for LFS files a 302 to a second origin (``http://localhost:PORT/cdn/<sha256>``) with
  ``X-Linked-Etag``/``X-Linked-Size``, the way the Hub's CDN works, so the client drops ``Authorization``;
- ``GET /cdn/<sha256>`` on that second origin, with ``Range`` answered by 206.

Errors carry ``X-Error-Code`` as the Hub sends them (``RepoNotFound``, ``GatedRepo``, ``RevisionNotFound``,
``EntryNotFound``); an unknown token gets 401 ``Invalid credentials in Authorization header`` on every endpoint.
Revisions resolve by branch, tag or 40-hex commit sha. Private repos answer 401 (anonymous) or 404 (a token
without access); gated repos keep info and tree public and refuse the file HEAD/GET (401 anonymous, 403 without
access). It never sends ``X-Xet-Hash`` or ``xetHash``, so the client downloads over plain HTTP.

Faults (:class:`Fault`) are injected per request: a dropped connection (optionally after some body bytes), an
HTTP status such as 500/503, or a stall that lasts at most ``seconds`` (and ends when the server stops).
Every request is logged (:class:`Request`): method, origin, path, status, ``Range`` and whether an
``Authorization`` header was present; never its value.

:func:`run_cli` runs the CLI in a fresh process forked from a warm fork server (tests stay fast).
Run this file alone with ``python tests/hub_server.py DIR ORG/NAME`` to serve a local checkpoint directory.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".gguf", ".h5", ".msgpack", ".onnx")
SHA_RE = re.compile(r"^[0-9a-f]{40}$")
TREE_PAGE = 1000


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    oid = hashlib.sha256(data).hexdigest()
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {len(data)}\n".encode()


@dataclass
class Repo:
    """A model repo: commits (sha -> {path: bytes}), refs (branch or tag -> sha), access rules."""

    repo_id: str
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    private: bool = False
    gated: bool = False
    #: tokens that may read this repo (private) or that accepted its conditions (gated)
    allowed: set[str] = field(default_factory=set)
    #: paths stored in LFS (default: weights and pickles by suffix)
    lfs: set[str] = field(default_factory=set)

    def is_lfs(self, path: str) -> bool:
        return path in self.lfs or path.endswith(LFS_SUFFIXES)

    def resolve(self, rev: str) -> str | None:
        if rev in self.refs:
            return self.refs[rev]
        if SHA_RE.match(rev) and rev in self.commits:
            return rev
        return None


@dataclass
class Fault:
    """Break matching requests ``count`` times. ``kind``: "drop" (close the connection after ``after_bytes``
    bytes of a file's body; with ``after_bytes=None`` before any response, on any endpoint), "status" (answer
    ``status``), or "stall" (the same points as "drop", after waiting ``seconds`` at most, then close)."""

    path: str  # regular expression searched in the request path with its query (CDN URLs carry repo= and file=)
    kind: str
    method: str | None = None
    count: int = 1
    status: int = 503
    code: str | None = None  # X-Error-Code sent with "status" (e.g. EntryNotFound)
    after_bytes: int | None = None
    seconds: float = 5.0
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        return self.count > 0 and (self.method in (None, method)) and re.search(self.path, path) is not None


@dataclass(frozen=True)
class Request:
    method: str
    origin: str  # "api" or "cdn"
    host: str
    path: str  # with the query string
    status: int
    range: str | None
    auth: bool  # whether an Authorization header was present (its value is never recorded)


class HubServer:
    """Two origins on 127.0.0.1 (API and CDN), each a ThreadingHTTPServer on port 0, in daemon threads."""

    def __init__(self, *, tree_page: int = TREE_PAGE) -> None:
        self.repos: dict[str, Repo] = {}
        self.tokens: set[str] = set()  # every valid token (others get 401 Invalid credentials)
        self.faults: list[Fault] = []
        self.log: list[Request] = []
        self.tree_page = tree_page
        self.blobs: dict[str, bytes] = {}  # sha256 -> LFS content, served by the CDN origin
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._servers: list[ThreadingHTTPServer] = []
        self.api_port = 0
        self.cdn_port = 0

    # ---- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> HubServer:
        for origin in ("api", "cdn"):
            server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, origin))
            server.daemon_threads = True
            self._servers.append(server)
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.api_port = self._servers[0].server_address[1]
        self.cdn_port = self._servers[1].server_address[1]
        return self

    def stop(self) -> None:
        self._stop.set()
        for server in self._servers:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def cdn(self) -> str:
        return f"http://localhost:{self.cdn_port}"

    # ---- content ---------------------------------------------------------------------------------------
    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        private: bool = False,
        gated: bool = False,
        allowed: set[str] | None = None,
        tags: tuple[str, ...] = (),
    ) -> str:
        """Create a repo whose ``main`` holds ``files``; returns the commit sha."""
        self.repos[repo_id] = Repo(repo_id, private=private, gated=gated, allowed=set(allowed or ()))
        sha = self.commit(repo_id, files)
        for tag in tags:
            self.repos[repo_id].refs[tag] = sha
        return sha

    def commit(self, repo_id: str, files: dict[str, bytes], *, branch: str = "main") -> str:
        repo = self.repos[repo_id]
        digest = hashlib.sha1(repo_id.encode() + branch.encode() + str(len(repo.commits)).encode())
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + hashlib.sha256(files[path]).digest())
        sha = digest.hexdigest()
        repo.commits[sha] = dict(files)
        repo.refs[branch] = sha
        for path, data in files.items():
            if repo.is_lfs(path):
                self.blobs[hashlib.sha256(data).hexdigest()] = data
        return sha

    def requests(self, *, origin: str | None = None, method: str | None = None) -> list[Request]:
        with self._lock:
            return [r for r in self.log if origin in (None, r.origin) and method in (None, r.method)]

    def requested_files(self) -> list[str]:
        """Every file path asked for on /resolve/ (HEAD or GET), in order."""
        out = []
        for r in self.requests(origin="api"):
            m = re.match(r"^/[^/]+/[^/]+/resolve/[^/]+/(.+)$", r.path.split("?")[0])
            if m:
                out.append(urllib.parse.unquote(m.group(1)))
        return out

    def take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.matches(method, path):
                    fault.count -= 1
                    fault.hits += 1
                    return fault
        return None

    def record(self, request: Request) -> None:
        with self._lock:
            self.log.append(request)


def _handler(hub: HubServer, origin: str) -> type[BaseHTTPRequestHandler]:
    class Handler(_HubHandler):
        pass

    Handler.hub = hub
    Handler.origin = origin
    return Handler


class _Dropped(Exception):
    """The connection was dropped on purpose (fault injection)."""


class _HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: HubServer
    origin: str
    server_version = "loopback-hub/1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet: the log is self.hub.log
        pass

    # ---- plumbing ------------------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def _handle(self, method: str) -> None:
        self._status = 0
        path = urllib.parse.urlsplit(self.path).path
        fault = self.hub.take_fault(method, urllib.parse.unquote(self.path))
        try:
            if fault is not None and fault.kind in ("drop", "stall") and fault.after_bytes is None:
                self._status = -1  # before any response: a refused answer, or a stall that ends in a drop
                if fault.kind == "stall":
                    self._stall(fault.seconds)
                raise _Dropped
            if fault is not None and fault.kind == "status":
                self._error(fault.status, fault.code, f"injected {fault.status}", method=method)
            elif self.origin == "cdn":
                self._cdn(method, path, fault)
            else:
                self._api(method, path, fault)
        except (_Dropped, BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        finally:
            auth = self.headers.get("Authorization") is not None
            self.hub.record(
                Request(
                    method=method,
                    origin=self.origin,
                    host=self.headers.get("Host", ""),
                    path=self.path,
                    status=self._status,
                    range=self.headers.get("Range"),
                    auth=auth,
                )
            )

    def _send(self, status: int, headers: dict[str, str], body: bytes = b"", *, method: str = "GET") -> None:
        self._status = status
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if method != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, data: object, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(data).encode()
        self._send(200, {"Content-Type": "application/json", **(headers or {})}, body)

    def _error(self, status: int, code: str | None, message: str, *, method: str = "GET") -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, headers, json.dumps({"error": message}).encode(), method=method)

    def _body(self, method: str, data: bytes, headers: dict[str, str], fault: Fault | None) -> None:
        """Send ``data`` honouring ``Range: bytes=N-`` (206); apply drop/stall faults mid-body."""
        start, status = 0, 200
        rng = self.headers.get("Range")
        if rng:
            m = re.match(r"^bytes=(\d+)-(\d*)$", rng.strip())
            if not m or int(m.group(1)) >= max(len(data), 1):
                self._send(416, {"Content-Range": f"bytes */{len(data)}"}, method=method)
                return
            start, status, total = int(m.group(1)), 206, len(data)
            end = min(int(m.group(2)) + 1, total) if m.group(2) else total
            data = data[start:end]
            headers = {**headers, "Content-Range": f"bytes {start}-{end - 1}/{total}"}
        headers = {**headers, "Accept-Ranges": "bytes", "Content-Length": str(len(data))}
        if fault is None or method == "HEAD":
            self._send(status, headers, data, method=method)
            return
        self._status = status
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        cut = min(fault.after_bytes or 0, len(data))
        self.wfile.write(data[:cut])
        self.wfile.flush()
        if fault.kind == "stall":
            self._stall(fault.seconds)
        raise _Dropped

    def _stall(self, seconds: float) -> None:
        """Wait ``seconds`` at most; ends early when the server stops."""
        self.hub._stop.wait(seconds)

    # ---- auth ----------------------------------------------------------------------------------------------
    def _token(self) -> str | None:
        value = self.headers.get("Authorization")
        if not value:
            return None
        return value.split(" ", 1)[1].strip() if " " in value else value.strip()

    def _invalid_token(self, method: str) -> bool:
        token = self._token()
        if token is not None and token not in self.hub.tokens:
            self._error(401, None, "Invalid credentials in Authorization header", method=method)
            return True
        return False

    def _repo(self, repo_id: str, method: str) -> Repo | None:
        """The repo if it exists and is visible to the caller; else answers RepoNotFound (401/404)."""
        repo = self.hub.repos.get(repo_id)
        token = self._token()
        if repo is None or (repo.private and token not in repo.allowed):
            status = 404 if token else 401
            self._error(status, "RepoNotFound", "Repository not found", method=method)
            return None
        return repo

    # ---- the API origin ------------------------------------------------------------------------------------
    def _api(self, method: str, path: str, fault: Fault | None) -> None:
        if self._invalid_token(method):
            return
        parts = [urllib.parse.unquote(p) for p in path.split("/")[1:]]
        if len(parts) >= 3 and parts[0] == "api" and parts[1] == "models":
            self._api_models(method, parts[2:], fault)
        elif len(parts) >= 5 and parts[2] == "resolve":
            self._resolve(method, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), fault)
        else:
            self._error(404, None, "Not found", method=method)

    def _api_models(self, method: str, parts: list[str], fault: Fault | None) -> None:
        if len(parts) < 2:
            self._error(404, None, "Not found", method=method)
            return
        repo = self._repo(f"{parts[0]}/{parts[1]}", method)
        if repo is None:
            return
        rest = parts[2:]
        if not rest or rest[0] == "revision":
            rev = "/".join(rest[1:]) if len(rest) > 1 else "main"
            sha = repo.resolve(rev)
            if sha is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", method=method)
                return
            self._json(
                {
                    "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
                    "id": repo.repo_id,
                    "modelId": repo.repo_id,
                    "author": repo.repo_id.split("/")[0],
                    "sha": sha,
                    "private": repo.private,
                    "gated": "manual" if repo.gated else False,
                    "disabled": False,
                    "downloads": 0,
                    "likes": 0,
                    "tags": [],
                    "library_name": "transformers",
                    "lastModified": "2026-01-01T00:00:00.000Z",
                    "createdAt": "2026-01-01T00:00:00.000Z",
                    "siblings": [{"rfilename": p} for p in sorted(repo.commits[sha])],
                }
            )
        elif rest[0] == "tree" and len(rest) >= 2:
            self._tree(repo, rest[1], "/".join(rest[2:]))
        else:
            self._error(404, None, "Not found", method=method)

    def _tree(self, repo: Repo, rev: str, prefix: str) -> None:
        sha = repo.resolve(rev)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        cursor = int(query.get("cursor", ["0"])[0])
        files = repo.commits[sha]
        base = prefix.strip("/") + "/" if prefix.strip("/") else ""
        entries: dict[str, dict[str, object]] = {}
        for path in sorted(files):
            if not path.startswith(base):
                continue
            rest = path[len(base) :]
            for i, _part in enumerate(rest.split("/")[:-1]):
                folder = base + "/".join(rest.split("/")[: i + 1])
                if (recursive or i == 0) and folder not in entries:
                    entries[folder] = {"type": "directory", "oid": git_blob_sha1(folder.encode()), "size": 0}
                    entries[folder]["path"] = folder
                if not recursive:
                    break
            if not recursive and "/" in rest:
                continue
            data = files[path]
            entry: dict[str, object] = {"type": "file", "path": path, "size": len(data)}
            if repo.is_lfs(path):
                pointer = lfs_pointer(data)
                entry["oid"] = git_blob_sha1(pointer)
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": len(pointer)}
            else:
                entry["oid"] = git_blob_sha1(data)
            entries[path] = entry
        listing = sorted(entries.values(), key=lambda e: str(e["path"]))
        page = listing[cursor : cursor + self.hub.tree_page]
        headers = {}
        if cursor + self.hub.tree_page < len(listing):
            next_url = urllib.parse.urlsplit(self.path)._replace(
                query=urllib.parse.urlencode({**{k: v[0] for k, v in query.items()}, "cursor": cursor + len(page)})
            )
            headers["Link"] = f'<{self.hub.endpoint}{urllib.parse.urlunsplit(next_url)}>; rel="next"'
        self._json(page, headers)

    def _resolve(self, method: str, repo_id: str, rev: str, path: str, fault: Fault | None) -> None:
        repo = self._repo(repo_id, method)
        if repo is None:
            return
        sha = repo.resolve(rev)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", method=method)
            return
        if repo.gated and self._token() not in repo.allowed:
            status = 403 if self._token() else 401
            message = f"Access to model {repo_id} is restricted. You must have access to it and be authenticated."
            self._error(status, "GatedRepo", message, method=method)
            return
        files = repo.commits[sha]
        if path not in files:
            self._error(404, "EntryNotFound", f"{path} does not exist on {rev}", method=method)
            return
        data = files[path]
        common = {"X-Repo-Commit": sha}
        if repo.is_lfs(path):
            oid = hashlib.sha256(data).hexdigest()
            location = f"{self.hub.cdn}/cdn/{oid}?repo={urllib.parse.quote(repo_id)}&file={urllib.parse.quote(path)}"
            headers = {
                **common,
                "ETag": f'"{git_blob_sha1(lfs_pointer(data))}"',
                "X-Linked-Etag": f'"{oid}"',
                "X-Linked-Size": str(len(data)),
                "Location": location,
            }
            self._send(302, headers, method=method)
            return
        self._body(method, data, {**common, "ETag": f'"{git_blob_sha1(data)}"'}, fault)

    # ---- the CDN origin ------------------------------------------------------------------------------------
    def _cdn(self, method: str, path: str, fault: Fault | None) -> None:
        m = re.match(r"^/cdn/([0-9a-f]{64})$", path)
        data = self.hub.blobs.get(m.group(1)) if m else None
        if data is None:
            self._error(404, None, "Not found", method=method)
            return
        self._body(method, data, {"Content-Type": "application/octet-stream", "ETag": f'"{m.group(1)}"'}, fault)  # type: ignore[union-attr]


# ---- running the CLI in a fresh process, fast -------------------------------------------------------------------
def run_cli(
    argv: list[str], env: dict[str, str], *, cwd: str | Path, timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    """``fp8convert ARGV`` in its own process with exactly ``env``, like ``python -m fp8convert.cli`` but forked
    from a multiprocessing fork server that has already imported ``fp8convert.cli`` (the interpreter start and the
    torch import, about a second, are paid once). huggingface_hub is not imported there, so each run imports it
    afresh and reads HF_ENDPOINT, HF_HOME, HF_HUB_OFFLINE... from ``env``, as a new interpreter would."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["fp8convert.cli", "hub_server"])
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
        process = context.Process(target=_cli_child, args=(list(argv), dict(env), str(cwd), str(out), str(err)))
        process.start()
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(argv, timeout)
        assert process.exitcode is not None
        return subprocess.CompletedProcess(argv, process.exitcode, out.read_text(), err.read_text())


def _cli_child(argv: list[str], env: dict[str, str], cwd: str, out: str, err: str) -> None:
    import os

    assert "huggingface_hub" not in sys.modules  # it must read this run's environment when imported
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    from fp8convert.cli import main

    main(argv, prog_name="fp8convert")  # exits with the command's exit code


def main(argv: list[str]) -> None:  # pragma: no cover - manual use
    """Serve a local checkpoint directory as ORG/NAME until interrupted."""
    directory, repo_id = Path(argv[1]), argv[2]
    hub = HubServer().start()
    files = {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*") if p.is_file()}
    sha = hub.add_repo(repo_id, files, tags=("v1",))
    print(f"HF_ENDPOINT={hub.endpoint}  repo {repo_id} main={sha}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        hub.stop()


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv)
