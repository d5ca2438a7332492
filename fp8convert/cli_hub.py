"""The Hub commands of the ``fp8convert`` CLI: ``pull`` and ``pull-and-convert`` (with ``--recipe``).

Registered on the group of cli.py when that module imports this one; rendering, errors and exit codes are
cli.py's ``common``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from click.core import ParameterSource

from fp8convert.cli import EXIT_CODES_HELP, _convert_options, _convert_summary, _options, common, main
from fp8convert.errors import EXIT_INTERRUPTED

if TYPE_CHECKING:
    from fp8convert.hub import Pulled

# ---- the Hub ------------------------------------------------------------------------------------------------
HUB_OPTIONS = ("revision", "local_dir", "offline", "token_file")


def _hub_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--revision, --local-dir, --offline, --token-file (HUB_OPTIONS): shared by ``pull`` and ``pull-and-convert``."""
    func = click.option(
        "--token-file",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="Read the Hub token from this file (never from the command line). Default: HF_TOKEN or the login.",
    )(func)
    func = click.option("--offline", is_flag=True, help="Use the local cache only (as HF_HUB_OFFLINE=1 does).")(func)
    func = click.option(
        "--local-dir",
        type=click.Path(file_okay=False, path_type=Path),
        help="Download into this directory (plain files) instead of the Hugging Face cache.",
    )(func)
    return click.option(
        "--revision", default="main", show_default=True, help="Branch, tag or commit sha (resolved to the sha first)."
    )(func)


@contextmanager
def _exit_on_interrupt(command: str, what: str) -> Iterator[None]:
    """Ctrl-C exits at once with a message (huggingface_hub's download threads would otherwise finish their files
    first); the download resumes when the same command runs again."""
    message = f"Interrupted while downloading {what}; finished files are kept. Run the same command again to resume."

    def handler(signum: int, frame: object) -> None:
        if click.get_current_context().params.get("as_json"):
            error = {"type": "Interrupted", "message": message, "exit_code": EXIT_INTERRUPTED}
            sys.stdout.write(json.dumps({"command": command, "ok": False, "error": error}) + "\n")
            sys.stdout.flush()
        sys.stderr.write(f"\n{message}\n")
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _pull(command: str, repo_id: str, progress: bool, *, revision: str, token_file: Path | None, **kw: Any) -> Pulled:
    from fp8convert import hub

    token = hub.read_token_file(token_file) if token_file else None
    with _exit_on_interrupt(command, f"{repo_id}@{revision}"):
        return hub.pull(repo_id, revision=revision, token=token, progress=progress, **kw)


def _pull_summary(pulled: Pulled) -> list[str]:
    files: dict[str, int] = pulled.to_dict()["files"]  # type: ignore[assignment]
    where = "from the local cache (no request to the Hub)" if pulled.from_cache else f"from {pulled.endpoint}"
    lines = [
        f"Pulled {pulled.repo}@{pulled.revision} (commit {pulled.sha}) -> {pulled.path}",
        f"  {len(files)} files, {sum(files.values()):,} bytes, {where}",
    ]
    return lines + [f"  note: {note}" for note in pulled.notes]


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("repo_id")
@_hub_options
@common
def pull(repo_id: str, progress: bool, **hub_options: Any) -> tuple[dict, str]:
    """Download what conversion needs from a Hub model repo: safetensors, index, config and tokenizer files.

    Pickles and GGUF are never requested. The revision is resolved to its commit sha first. Honours
    HF_ENDPOINT (mirrors), HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE and HF_TOKEN. Running the same command
    again resumes an interrupted download; finished files are not fetched again.

    \b
    fp8convert pull RedHatAI/Meta-Llama-3.1-8B-Instruct-FP8
    fp8convert pull ORG/MODEL --revision v1.0 --local-dir ./model --token-file ~/.hf-token
    HF_HUB_OFFLINE=1 fp8convert pull ORG/MODEL --json
    """
    pulled = _pull("pull", repo_id, progress, **hub_options)
    lines = _pull_summary(pulled) + [f"  next: fp8convert convert {pulled.path} OUT"]
    return {"command": "pull", "ok": True, **pulled.to_dict()}, "\n".join(lines)


#: convert options a recipe sets; a flag typed on the command line wins over the recipe
RECIPE_FLAGS = {
    "target": "targets",
    "fmt": "format",
    "quantize_unquantized": "quantize_unquantized",
    "max_shard_size": "max_shard_bytes",
}


@main.command("pull-and-convert", epilog=EXIT_CODES_HELP)
@click.argument("repo_id", required=False)
@click.argument("out", type=click.Path(path_type=Path), required=False)
@click.option(
    "--recipe",
    "recipe_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A recipes/*.yaml file: repo, revision sha, layout, targets and options (flags typed here win).",
)
@click.option("--allow-unpinned", is_flag=True, help="Accept a recipe whose revision is a branch or tag, not a sha.")
@_hub_options
@_convert_options
@common
def pull_and_convert(
    repo_id: str | None,
    out: Path | None,
    progress: bool,
    recipe_path: Path | None,
    allow_unpinned: bool,
    **options: Any,
) -> tuple[dict, str]:
    """Download REPO_ID from the Hub (what conversion needs) and convert it into OUT/aiu, OUT/cpu and
    OUT/fp8convert-report.json, which records the repo and the commit sha.

    OUT is checked before anything is downloaded. After an interruption, run the same command again: the
    download resumes, then the conversion runs. With --recipe, REPO_ID may be left out.

    \b
    fp8convert pull-and-convert RedHatAI/Meta-Llama-3.1-8B-Instruct-FP8 out/
    fp8convert pull-and-convert ORG/MODEL out/ --revision <40-hex sha> --target cpu
    fp8convert pull-and-convert ORG/MODEL out/ --offline --json > result.json
    fp8convert pull-and-convert --recipe recipes/ibm-granite--granite-3.3-8b-instruct-fp8.yaml out/ --allow-unpinned
    """
    from fp8convert import hub
    from fp8convert.pipeline import check_output
    from fp8convert.pipeline import convert as run

    if out is None and recipe_path is not None and repo_id is not None:
        out = Path(repo_id)  # `pull-and-convert --recipe R OUT`: the one argument is OUT
        repo_id = None
    if out is None:
        raise click.UsageError("OUT is required")
    hub_options = {name: options.pop(name) for name in HUB_OPTIONS}
    convert_options = _options(progress=progress, **options)
    if recipe_path is not None:
        repo_id, convert_options = _apply_recipe(recipe_path, repo_id, convert_options, hub_options, allow_unpinned)
    if repo_id is None:
        raise click.UsageError("REPO_ID is required (or pass --recipe)")
    check_output(hub_options["local_dir"] or hub.storage_dir(repo_id), out, convert_options.overwrite)
    pulled = _pull("pull-and-convert", repo_id, progress, **hub_options)
    convert_options = dataclasses.replace(
        convert_options, repo=pulled.repo, revision=pulled.sha, requested_revision=pulled.revision
    )
    report = run(pulled.path, out, convert_options)
    doc = {"command": "pull-and-convert", "ok": True, "output": str(out), "pull": pulled.to_dict(), **report}
    return doc, "\n".join(_pull_summary(pulled) + _convert_summary(report, out))


def _apply_recipe(
    path: Path, repo_id: str | None, typed: Any, hub_options: dict[str, Any], allow_unpinned: bool
) -> tuple[str, Any]:
    """The repo and ConvertOptions of a recipe, with every flag typed on the command line winning."""
    import logging

    from fp8convert.errors import RecipeError
    from fp8convert.recipe import load_recipe, to_convert_options

    recipe = load_recipe(path, allow_unpinned=allow_unpinned)
    if repo_id is not None and repo_id != recipe.source.repo:
        raise RecipeError(
            f"REPO_ID {repo_id!r} differs from the recipe's source.repo {recipe.source.repo!r}",
            where=str(path),
            hint="drop REPO_ID, or use a recipe for that repo",
        )
    for warning in recipe.warnings:
        logging.getLogger("fp8convert").warning("%s: %s", path, warning)
    ctx = click.get_current_context()
    options = to_convert_options(recipe, overwrite=typed.overwrite, progress=typed.progress)
    changed = {
        field: getattr(typed, field)
        for flag, field in RECIPE_FLAGS.items()
        if ctx.get_parameter_source(flag) is ParameterSource.COMMANDLINE
    }
    if ctx.get_parameter_source("revision") is not ParameterSource.COMMANDLINE:
        hub_options["revision"] = recipe.source.revision
    return recipe.source.repo, dataclasses.replace(options, **changed)
