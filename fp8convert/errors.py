"""The exception hierarchy of fp8convert and the exit codes the CLI maps them to.

Every error says what went wrong, where (file, tensor) and how to fix it. Errors that collect several
problems (validation reports all of them at once) keep them in ``problems``.
"""

from __future__ import annotations

from collections.abc import Sequence

EXIT_OK = 0
EXIT_ERROR = 1  # conversion error: bad input, unsupported layout, output problem
EXIT_USAGE = 2  # click's own usage errors
EXIT_VERIFY = 3  # verification failed
EXIT_INPUT = 4  # Hub: your input is wrong (repo, revision, token, access, nothing cached offline, no safetensors)
EXIT_NETWORK = 5  # Hub: the network or the Hub failed (unreachable, timeout, 5xx, cut transfer): run again
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)


class Fp8ConvertError(Exception):
    """Base class. ``where`` names the file/tensor, ``hint`` says how to fix it."""

    exit_code = EXIT_ERROR
    kind = "error"

    def __init__(
        self, message: str, *, where: str | None = None, hint: str | None = None, problems: list[str] | None = None
    ) -> None:
        self.message = message
        self.where = where
        self.hint = hint
        self.problems = list(problems or [])
        super().__init__(self.render())

    def render(self) -> str:
        parts = [self.message]
        if self.where:
            parts[0] = f"{self.where}: {self.message}"
        for p in self.problems:
            parts.append(f"  - {p}")
        if self.hint:
            parts.append(f"Fix: {self.hint}")
        return "\n".join(parts)

    def to_dict(self) -> dict[str, object]:
        return {
            "type": type(self).__name__,
            "message": self.message,
            "where": self.where,
            "hint": self.hint,
            "problems": self.problems,
            "exit_code": self.exit_code,
        }


class CheckpointError(Fp8ConvertError, ValueError):
    """The source checkpoint is malformed or inconsistent."""


def combine(problems: Sequence[CheckpointError | str], *, where: str, hint: str) -> CheckpointError:
    """One error listing every problem; its class is the problems' common class, else CheckpointError."""
    kinds = {type(p) if isinstance(p, CheckpointError) else CheckpointError for p in problems}
    cls = kinds.pop() if len(kinds) == 1 else CheckpointError
    lines = [
        (p.message + (f" (fix: {p.hint})" if p.hint else "")) if isinstance(p, CheckpointError) else p for p in problems
    ]
    return cls(f"{len(lines)} problem(s) found; nothing was written", where=where, problems=lines, hint=hint)


class UnknownFormatError(CheckpointError):
    """No reader recognised the checkpoint."""


class AmbiguousFormatError(CheckpointError):
    """More than one reader recognised the checkpoint."""


class MissingTensorError(CheckpointError):
    """A tensor the layout requires is absent (e.g. an fp8 weight without its scale)."""


class UnsupportedSchemeError(CheckpointError):
    """The layout is known but this variant of it is not supported."""


class OutputError(Fp8ConvertError, OSError):
    """The output location is unusable (not empty, inside the source, ...)."""


class HubError(Fp8ConvertError, OSError):
    """Downloading from the Hugging Face Hub failed. Rendered on one line: what happened, then what to do."""

    def render(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        return text + (f". Fix: {self.hint}" if self.hint else "")


class HubInputError(HubError):
    """The request cannot succeed as given: wrong repo id, revision, token or access (exit code 4)."""

    exit_code = EXIT_INPUT


class RepoNotFoundError(HubInputError):
    """No such repository, or it is private and the token (if any) has no access to it."""


class RepoGatedError(HubInputError):
    """The repository is gated: its conditions must be accepted on the Hub, and a token with access passed."""


class UnknownRevisionError(HubInputError):
    """The branch, tag or commit does not exist in the repository."""


class HubTokenError(HubInputError):
    """The Hub rejected the token, or the token file is unusable."""


class NotCachedError(HubInputError):
    """Offline (``--offline`` or ``HF_HUB_OFFLINE=1``) and the snapshot is not (completely) in the local cache."""


class NoSafetensorsError(HubInputError):
    """The repository publishes no ``*.safetensors`` weights (fp8convert never downloads pickles or GGUF)."""


class HubNetworkError(HubError):
    """The Hub could not be reached, timed out, failed (5xx) or cut a transfer; running again resumes (exit 5)."""

    exit_code = EXIT_NETWORK


class DiskFullError(HubError):
    """No space left where the download is written (exit code 1)."""


class RecipeError(Fp8ConvertError, ValueError):
    """A recipe file is invalid."""


class VerificationError(Fp8ConvertError):
    """A converted artifact failed verification."""

    exit_code = EXIT_VERIFY
