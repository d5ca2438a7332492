"""Downloads from the Hugging Face Hub or a Hub-compatible mirror (``HF_ENDPOINT``); the only importer of
huggingface_hub.

:func:`pull` resolves the revision to its commit sha, reads the file listing, and downloads pinned to that sha only
what conversion needs (top-level safetensors and index, config and tokenizer files; never a pickle or GGUF) into the
cache (``HF_HOME``/``HF_HUB_CACHE``) or a ``local_dir``. Finished files are never fetched again, so running again
resumes. Offline it returns the cached snapshot if complete. Every client failure becomes one HubError that says
what happened and what to do; tokens, requests, headers and URL queries never reach a log or a message.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from huggingface_hub import HfApi, RepoFile, constants, get_cached_repo_tree, snapshot_download
from huggingface_hub import errors as hf_errors
from huggingface_hub import utils as hf_utils
from huggingface_hub.file_download import repo_folder_name

from fp8convert import errors

logger = logging.getLogger(__name__)

DEFAULT_REVISION = "main"
#: What conversion reads (shards.AUX_FILES, the config files the readers look at); top level only.
NEEDED = tuple(
    "*.safetensors *.safetensors.index.json config.json generation_config.json hf_quant_config.json params.json "
    "tokenizer.json tokenizer_config.json special_tokens_map.json added_tokens.json tokenizer.model tokenizer.model.v* "
    "tekken.json vocab.json merges.txt vocab.txt chat_template.jinja chat_template.json".split()
)
#: Never requested: pickles, GGUF and other weight formats, and anything in a sub-folder.
NEVER = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle", "*.h5", "*.msgpack", "*.onnx", "*.gguf", "*/*")
PICKLE_OR_GGUF = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".gguf")
#: An ``*.incomplete`` download untouched for this long was orphaned by a killed process (live ones are written
#: to at least every HF_HUB_DOWNLOAD_TIMEOUT seconds).
ORPHAN_AGE_S = 3600
SHA_RE = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True, slots=True, kw_only=True)
class Pulled:
    """A snapshot on disk: ``path`` holds ``files`` of ``repo`` at commit ``sha`` (``revision`` as requested)."""

    repo: str
    revision: str
    sha: str | None
    path: Path
    files: list[str]
    endpoint: str
    from_cache: bool  # True when nothing was asked of the Hub (offline, pinned and cached, or Hub unreachable)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "repo": self.repo,
            "revision": self.revision,
            "commit": self.sha,
            "path": str(self.path),
            "endpoint": self.endpoint,
            "from_cache": self.from_cache,
            "files": {f: (self.path / f).stat().st_size for f in self.files if (self.path / f).is_file()},
            "notes": self.notes,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class _Ctx:
    repo: str
    revision: str
    endpoint: str
    token: str | None  # explicit token (--token-file); None: huggingface_hub's own lookup
    token_source: str | None  # where the token that will be sent comes from, for messages
    offline: bool
    local_dir: Path | None
    secrets: tuple[str, ...]  # values scrubbed from every message

    @property
    def at(self) -> str:
        return f"{self.repo}@{self.revision}"


# ---- public API ---------------------------------------------------------------------------------------------
def read_token_file(path: str | Path) -> str:
    """The token in ``path`` (first line, stripped). Raises HubTokenError if unreadable or empty."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise errors.HubTokenError(
            f"cannot read the token file ({reason})", where=str(path), hint="pass a readable file holding one token"
        ) from None
    lines = text.strip().splitlines()
    if not lines or not lines[0].strip():
        raise errors.HubTokenError("the token file is empty", where=str(path), hint="write the token on its first line")
    return lines[0].strip()


def endpoint() -> str:
    """The Hub endpoint in use (``HF_ENDPOINT``), without credentials, path query or fragment."""
    return _clean_url(constants.ENDPOINT)


def storage_dir(repo_id: str) -> Path:
    """Where the cache keeps ``repo_id`` (``HF_HUB_CACHE/models--org--name``); it may not exist yet."""
    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")


def pull(
    repo_id: str,
    *,
    revision: str | None = None,
    local_dir: str | Path | None = None,
    offline: bool = False,
    token: str | None = None,
    progress: bool = False,
) -> Pulled:
    """Download what conversion needs from ``repo_id`` at ``revision`` (branch, tag or sha; default main).

    Args:
        repo_id: ``org/name`` of a model repo.
        revision: branch, tag or 40-hex commit sha; resolved to the sha before anything is downloaded.
        local_dir: real files in this directory instead of the cache's symlinked snapshot.
        offline: use the local cache only (also when ``HF_HUB_OFFLINE=1``).
        token: a token to send (read from ``--token-file``); None: ``HF_TOKEN`` or the saved login.
        progress: show huggingface_hub's own progress bars.

    Raises:
        HubInputError: wrong repo id, revision, token or access; offline and not cached; no safetensors.
        HubNetworkError: unreachable Hub, timeout, 5xx, a cut transfer (running again resumes).
        DiskFullError: no space left; HubError: anything else the client reported.
    """
    rev = revision or DEFAULT_REVISION
    source = "--token-file" if token else _implicit_token_source()
    secret = token or (hf_utils.get_token() if source else None)
    ctx = _Ctx(
        repo=repo_id,
        revision=rev,
        endpoint=endpoint(),
        token=token,
        token_source=source,
        offline=offline or bool(constants.HF_HUB_OFFLINE),
        local_dir=Path(local_dir).resolve() if local_dir is not None else None,
        secrets=(secret,) if secret else (),
    )
    try:
        hf_utils.validate_repo_id(repo_id)
    except hf_errors.HFValidationError as exc:
        raise errors.HubInputError(
            f"invalid repo id {repo_id!r} ({_scrub(str(exc).split('.')[0], ctx)})",
            hint="use ORG/NAME as on the Hub, e.g. RedHatAI/Meta-Llama-3.1-8B-Instruct-FP8",
        ) from None
    _remove_orphans(ctx)
    with _client_output(progress):
        try:
            return _pull(ctx)
        except errors.HubError:
            raise
        except Exception as exc:
            if (translated := translate(exc, ctx)) is None:
                raise
            raise translated from None


# ---- the steps ------------------------------------------------------------------------------------------------
def _pull(ctx: _Ctx) -> Pulled:
    if ctx.offline:
        return _from_cache(ctx)
    if SHA_RE.match(ctx.revision):
        try:  # a pinned commit that is complete in the cache needs no request at all
            return _from_cache(ctx)
        except (errors.HubError, OSError):
            pass
    api = HfApi(token=ctx.token)
    try:
        sha, files = _resolve(api, ctx)
    except Exception as exc:
        error = translate(exc, ctx)
        if not isinstance(error, errors.HubNetworkError):
            raise
        try:
            pulled = _from_cache(ctx)
        except hf_errors.IncompleteSnapshotError as incomplete:
            raise (translate(incomplete, ctx) or error) from None
        except (errors.HubError, OSError):
            raise error from None
        note = f"{error.message}; using the cached snapshot (commit {pulled.sha}), which may be out of date"
        logger.warning("%s", note)
        return dataclasses.replace(pulled, notes=[*pulled.notes, note])
    allow, ignore, wanted = select_files(files, ctx)
    logger.info("%s is commit %s; %d file(s) to get from %s", ctx.at, sha, len(wanted), ctx.endpoint)
    path = snapshot_download(
        ctx.repo,
        revision=sha,
        local_dir=ctx.local_dir,
        token=ctx.token,
        allow_patterns=allow,
        ignore_patterns=ignore,
        etag_timeout=constants.HF_HUB_ETAG_TIMEOUT,
    )
    _write_ref(ctx, sha)
    return _pulled(ctx, sha, path, wanted, from_cache=False)


def _resolve(api: HfApi, ctx: _Ctx) -> tuple[str, list[str]]:
    """The commit sha of the revision and the repo's file list at that commit."""
    sha, files = ctx.revision, None
    if not SHA_RE.match(ctx.revision):
        info = api.model_info(ctx.repo, revision=ctx.revision, timeout=constants.HF_HUB_ETAG_TIMEOUT)
        if not info.sha:
            raise errors.HubError(f"the Hub did not give the commit of {ctx.at}", hint="check HF_ENDPOINT")
        sha = info.sha
        files = [s.rfilename for s in info.siblings or []] or None
    if files is None:
        files = [f.path for f in api.list_repo_tree(ctx.repo, revision=sha, recursive=True) if isinstance(f, RepoFile)]
    return sha, files


def _from_cache(ctx: _Ctx) -> Pulled:
    """The cached snapshot of the revision, if complete; NotCachedError otherwise (no request is made)."""
    try:
        tree = get_cached_repo_tree(ctx.repo, revision=ctx.revision, local_dir=ctx.local_dir)
    except hf_errors.CachedRepoTreeNotFoundError:
        raise _not_cached(ctx) from None
    allow, ignore, wanted = select_files([f.path for f in tree], ctx)
    path = snapshot_download(
        ctx.repo,
        revision=ctx.revision,
        local_dir=ctx.local_dir,
        local_files_only=True,
        allow_patterns=allow,
        ignore_patterns=ignore,
    )
    sha = ctx.revision if SHA_RE.match(ctx.revision) else _ref_path(ctx).read_text().strip()
    logger.info("%s is commit %s, complete in the local cache: %s", ctx.at, sha, path)
    return _pulled(ctx, sha, path, wanted, from_cache=True)


def _pulled(ctx: _Ctx, sha: str | None, path: str, files: list[str], *, from_cache: bool) -> Pulled:
    return Pulled(
        repo=ctx.repo,
        revision=ctx.revision,
        sha=sha,
        path=Path(path),
        files=files,
        endpoint=ctx.endpoint,
        from_cache=from_cache,
    )


def select_files(files: list[str], ctx: _Ctx) -> tuple[list[str], list[str], list[str]]:
    """(allow_patterns, ignore_patterns, the files they select) for a repo listing; refuses a repo whose top
    level has no ``*.safetensors``. ``consolidated*`` (Mistral native) files are skipped when HF shards exist."""
    top = [f for f in files if "/" not in f]
    weights = [f for f in top if f.endswith(".safetensors")]
    if not weights:
        raise _no_safetensors(files, ctx)
    ignore = list(NEVER)
    if any(not w.startswith("consolidated") for w in weights):
        ignore.append("consolidated*")
    allow = list(NEEDED)
    wanted = sorted(hf_utils.filter_repo_objects(files, allow_patterns=allow, ignore_patterns=ignore))
    return allow, ignore, wanted


def _no_safetensors(files: list[str], ctx: _Ctx) -> errors.NoSafetensorsError:
    pickles = [f for f in files if f.lower().endswith(PICKLE_OR_GGUF)]
    nested = [f for f in files if "/" in f and f.endswith(".safetensors")]
    if pickles:
        has = f"it has {_some(pickles)} (pickle or GGUF, which fp8convert never downloads)"
    elif nested:
        has = f"it has safetensors only in sub-folders ({_some(nested)}), which fp8convert does not read"
    else:
        has = f"it has {_some(files) if files else 'no files'}"
    return errors.NoSafetensorsError(
        f"{ctx.at} has no *.safetensors weights at its top level; {has}",
        hint="choose a repo or revision that publishes safetensors weights (e.g. the FP8 export of the model)",
    )


def _some(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


# ---- the cache -------------------------------------------------------------------------------------------------
def _ref_path(ctx: _Ctx) -> Path:
    return storage_dir(ctx.repo) / "refs" / ctx.revision


def _write_ref(ctx: _Ctx, sha: str) -> None:
    """Record ``revision -> sha`` in the cache (``refs/``) so that offline runs of the same revision find it."""
    if ctx.revision == sha:
        return
    path = _ref_path(ctx)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file() and path.read_text() == sha:
            return
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(sha)
        os.replace(tmp, path)
    except OSError as exc:
        logger.warning("could not record %s -> %s in the cache (%s)", ctx.at, sha, exc.strerror or exc)


def _remove_orphans(ctx: _Ctx) -> None:
    """Delete ``*.incomplete`` files that a killed download left behind (huggingface_hub never reuses them)."""
    roots = [storage_dir(ctx.repo) / "blobs"]
    if ctx.local_dir is not None:
        roots.append(ctx.local_dir / ".cache" / "huggingface" / "download")
    cutoff = time.time() - ORPHAN_AGE_S
    for root in roots:
        for path in root.rglob("*.incomplete") if root.is_dir() else ():
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    logger.debug("removed an orphaned partial download: %s", path)
            except OSError:
                pass


@contextmanager
def _client_output(progress: bool) -> Iterator[None]:
    """huggingface_hub's bars only when ``progress``; its own log quiet (its messages carry URLs): ours say it."""
    hf_logger = logging.getLogger("huggingface_hub")
    level = hf_logger.level
    hf_logger.setLevel(logging.ERROR)
    disabled_here = not progress and not hf_utils.are_progress_bars_disabled()
    if disabled_here:
        hf_utils.disable_progress_bars()
    try:
        yield
    finally:
        hf_logger.setLevel(level)
        if disabled_here:
            hf_utils.enable_progress_bars()


# ---- errors ------------------------------------------------------------------------------------------------------
def _implicit_token_source() -> str | None:
    if constants.HF_HUB_DISABLE_IMPLICIT_TOKEN:
        return None
    if os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        return "HF_TOKEN"
    return "the token saved by `hf auth login`" if hf_utils.get_token() else None


def _clean_url(url: str) -> str:
    """scheme://host[:port][/path] of a URL: no credentials, query or fragment (a signed URL's query is secret)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<url>"
    return f"{parts.scheme}://{host}{port}{parts.path}".rstrip("/")


def _scrub(text: str, ctx: _Ctx) -> str:
    text = re.sub(r"https?://[^\s'\"<>]+", lambda m: _clean_url(m.group(0)), text)
    for secret in ctx.secrets:
        text = text.replace(secret, "***")
    return re.sub(r"\s+", " ", text).strip()


def _not_cached(ctx: _Ctx) -> errors.NotCachedError:
    why = "--offline" if not constants.HF_HUB_OFFLINE else "HF_HUB_OFFLINE=1"
    where = ctx.local_dir or storage_dir(ctx.repo)
    return errors.NotCachedError(
        f"{ctx.at} is not in the local cache ({where}) and offline mode is on ({why})",
        hint="run the same command once with network access (without --offline, HF_HUB_OFFLINE unset), or point "
        "HF_HOME / HF_HUB_CACHE at the cache that holds it",
    )


def _is_transport(exc: BaseException) -> bool:
    """httpx (1.x) / httpx2 (2.x) transport failures, without importing the client's HTTP library."""
    transport = {"TransportError", "TimeoutException", "OfflineModeIsEnabled"}
    return isinstance(exc, ConnectionError | TimeoutError) or bool(transport & {c.__name__ for c in type(exc).__mro__})


def _cause(exc: BaseException) -> BaseException:
    """The innermost transport/HTTP error behind a wrapper (LocalEntryNotFoundError, ...)."""
    seen = exc
    while seen.__cause__ is not None or seen.__context__ is not None:
        seen = seen.__cause__ or seen.__context__  # type: ignore[assignment]
        if _is_transport(seen) or isinstance(seen, hf_errors.HfHubHTTPError | hf_errors.FileMetadataError):
            return seen
    return exc


def _network(what: str, ctx: _Ctx) -> errors.HubNetworkError:
    return errors.HubNetworkError(
        f"{ctx.at}: {what}",
        hint="check the network (proxy, HF_ENDPOINT), then run the same command again: finished files are kept "
        "and not fetched again",
    )


def translate(exc: BaseException, ctx: _Ctx) -> errors.HubError | None:
    """One errors.HubError for a failure of the client; None for an exception that is not a Hub failure (a bug)."""
    token = "the token given (" + ctx.token_source + ")" if ctx.token_source else None
    if isinstance(exc, hf_errors.GatedRepoError):
        return errors.RepoGatedError(
            f"{ctx.repo} is gated" + (f" and {token} has not been granted access" if token else ""),
            hint=f"accept its conditions at {ctx.endpoint}/{ctx.repo} while logged in, then pass a token of that "
            "account (--token-file FILE or HF_TOKEN)",
        )
    if isinstance(exc, hf_errors.RepositoryNotFoundError) or (
        isinstance(exc, hf_errors.HfHubHTTPError) and _status(exc) == 401 and not token
    ):
        return errors.RepoNotFoundError(
            f"repository {ctx.repo} not found on {ctx.endpoint} (or it is private and "
            + (f"{token} has no access to it)" if token else "no token was given)"),
            hint="check the repo id (ORG/NAME); for a private repo pass --token-file FILE or set HF_TOKEN to a token "
            "that can read it",
        )
    if isinstance(exc, hf_errors.RevisionNotFoundError):
        return errors.UnknownRevisionError(
            f"revision {ctx.revision!r} not found in {ctx.repo}",
            hint="pass an existing branch, tag or full 40-character commit sha to --revision",
        )
    if isinstance(exc, hf_errors.IncompleteSnapshotError):
        missing = re.search(r"(\d+) file\(s\) are missing \(([^)]*)\)", str(exc))
        what = f"{missing.group(1)} file(s) missing: {missing.group(2)}" if missing else "files missing"
        if ctx.offline:
            return errors.NotCachedError(
                f"the cached snapshot of {ctx.at} is incomplete ({what}) and offline mode is on",
                hint="run the same command once with network access to complete it",
            )
        return _network(f"the Hub could not be reached and the cached snapshot is incomplete ({what})", ctx)
    if isinstance(exc, hf_errors.LocalEntryNotFoundError) and ctx.offline:
        return _not_cached(ctx)
    cause = _cause(exc)
    if isinstance(cause, hf_errors.FileMetadataError):
        return errors.HubInputError(
            f"{ctx.endpoint} does not answer like a Hugging Face Hub (no X-Repo-Commit header)",
            hint="check HF_ENDPOINT: it must point at the Hub or a Hub mirror",
        )
    if isinstance(cause, hf_errors.HfHubHTTPError) and (status := _status(cause)) is not None:
        if status == 401:
            return errors.HubTokenError(
                f"the Hub at {ctx.endpoint} rejected {token} as invalid",
                hint="check the token (typo, expired or revoked?) or create one at "
                f"{ctx.endpoint}/settings/tokens; a public repo needs none (unset HF_TOKEN)",
            )
        if status == 403:
            return errors.HubTokenError(
                f"the Hub refused access to {ctx.repo} (403)" + (f" with {token}" if token else ""),
                hint="use a token with read access to the repo (a fine-grained token needs the repo listed)",
            )
        if status in (408, 429) or status >= 500:
            return _network(f"the Hub at {ctx.endpoint} answered HTTP {status}", ctx)
        url = re.search(r"https?://[^\s'\"<>]+", str(cause))  # printed without query or credentials
        return errors.HubError(
            f"{ctx.at}: the Hub answered HTTP {status}"
            + (f" for {_clean_url(url.group(0).rstrip('.'))}" if url else ""),
            hint="run again; if it persists, the repo is inconsistent at this revision: pin another revision",
        )
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        where = ctx.local_dir or Path(constants.HF_HUB_CACHE)
        return errors.DiskFullError(
            f"no space left on the disk holding {where}",
            hint="free space, or point HF_HOME (or HF_HUB_CACHE, or --local-dir) at a larger disk, then run the same "
            "command again: finished files are kept",
        )
    if _is_transport(cause) or isinstance(exc, hf_errors.LocalEntryNotFoundError):
        kind = "timed out" if "Timeout" in type(cause).__name__ else "could not be reached"
        detail = _scrub(str(cause), ctx) if cause is not exc or _is_transport(exc) else ""
        timeout = " (HF_HUB_ETAG_TIMEOUT / HF_HUB_DOWNLOAD_TIMEOUT set the limits)" if kind == "timed out" else ""
        return _network(f"the Hub at {ctx.endpoint} {kind}{timeout}" + (f": {detail}" if detail else ""), ctx)
    if isinstance(exc, OSError) and "Consistency check failed" in str(exc):
        return _network("a download ended early (size mismatch)", ctx)
    if isinstance(exc, OSError):
        reason = exc.strerror or _scrub(str(exc), ctx) or type(exc).__name__
        name = f" ({exc.filename})" if exc.filename else ""
        return errors.HubError(f"{ctx.at}: download failed: {reason}{name}", hint="fix the cause above and run again")
    return None


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


__all__ = ["NEEDED", "NEVER", "Pulled", "endpoint", "pull", "read_token_file", "storage_dir"]
