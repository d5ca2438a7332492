"""The ``fp8convert`` command line: the only module that prints, sets up logging and maps errors to exit
codes. Commands parse, call the library, and render a human summary or exactly one JSON document.

Exit codes: EXIT_CODES_HELP (the epilog of every command's --help) and fp8convert.errors.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from fp8convert import __version__
from fp8convert.errors import EXIT_ERROR, Fp8ConvertError

if TYPE_CHECKING:
    from fp8convert.pipeline import ConvertOptions

EXIT_CODES_HELP = """\b
Exit codes: 0 ok, 1 conversion error (bad input, unsupported layout,
output problem), 2 usage error, 3 verification failed.
Hub (pull, pull-and-convert): 4 wrong input (repo, revision, token,
access, not cached while offline, no safetensors), 5 network failure
(run again: finished files are kept), 130 interrupted (run again)."""


def _setup_logging(quiet: bool, verbose: int) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("fp8convert")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def common(func: Callable[..., Any]) -> Callable[..., Any]:
    """--json, -q, -v, --debug; runs the command, renders its result or its error, sets the exit code."""

    @click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON document on stdout.")
    @click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr; no progress bars.")
    @click.option("-v", "--verbose", count=True, help="Per-tensor detail on stderr.")
    @click.option("--debug", is_flag=True, envvar="FP8CONVERT_DEBUG", help="Show tracebacks (or FP8CONVERT_DEBUG=1).")
    @functools.wraps(func)
    def wrapper(*args: Any, as_json: bool, quiet: bool, verbose: int, debug: bool, **kwargs: Any) -> None:
        _setup_logging(quiet or as_json, verbose)
        progress = not (quiet or as_json) and sys.stderr.isatty()
        try:
            result, human = func(*args, progress=progress, **kwargs)
        except Fp8ConvertError as exc:
            if debug:
                traceback.print_exc()
            if as_json:
                click.echo(
                    json.dumps({"command": func.__name__.replace("_", "-"), "ok": False, "error": exc.to_dict()})
                )
            else:
                click.echo(f"Error: {exc.render()}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException:
            raise  # usage errors: click prints them and exits 2
        except KeyboardInterrupt:
            click.echo(
                "Interrupted; nothing was written at the final output path. Run the same command again to resume.",
                err=True,
            )
            sys.exit(130)
        except Exception as exc:  # the top level: turn any bug into one line, traceback with --debug
            if debug:
                traceback.print_exc()
            error = {"type": type(exc).__name__, "message": str(exc), "exit_code": EXIT_ERROR}
            if as_json:
                click.echo(json.dumps({"command": func.__name__.replace("_", "-"), "ok": False, "error": error}))
            else:
                click.echo(f"Error: internal error: {type(exc).__name__}: {exc} (rerun with --debug)", err=True)
            sys.exit(EXIT_ERROR)
        if as_json:
            click.echo(json.dumps(result, default=str))
        else:
            click.echo(human)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_HELP)
@click.version_option(__version__, prog_name="fp8convert")
def main() -> None:
    """Convert FP8 checkpoints into IBM AIU-ready artifacts and bit-exact CPU fake-quant variants.

    \b
    fp8convert inspect ./Llama-FP8                  # what is it, what would convert do
    fp8convert convert ./Llama-FP8 out/             # -> out/aiu, out/cpu, out/fp8convert-report.json
    fp8convert pull-and-convert ORG/MODEL-FP8 out/  # the same, from the Hugging Face Hub
    fp8convert verify out/                          # checksums, spec, numbers, IBM's loader
    fp8convert smoke-test out/cpu                   # run a prompt on CPU
    fp8convert demo demo-out/                       # all of the above on a bundled tiny model
    """


#: the registered readers (fp8convert.formats.REGISTRY), spelled out so that --help does not import torch;
#: tests/test_cli.py checks that the two agree
FORMAT_NAMES = ("compressed-tensors", "fbgemm", "fp8", "mistral", "modelopt", "quark")


def _format_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--format",
        "fmt",
        type=click.Choice(FORMAT_NAMES),
        default=None,
        help="Force a layout instead of detecting it (fails loudly on a mismatch).",
    )(func)


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("source")
@_format_option
@click.option("--revision", default=None, help="With a Hub repo id: the branch, tag or sha to inspect (default main).")
@click.option(
    "--emit-recipe",
    "recipe_out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write a recipe pinning this source (repo, commit sha, layout, targets) to this file.",
)
@common
def inspect(
    source: str, fmt: str | None, revision: str | None, recipe_out: Path | None, progress: bool
) -> tuple[dict, str]:
    """Show the layout, the evidence, each linear's scheme, and what conversion would do.

    SOURCE is a local directory (config files and safetensors headers are read, no tensor data) or a Hub repo
    id (pulled first, into the cache).

    \b
    fp8convert inspect ./granite-3.3-8b-instruct-FP8
    fp8convert inspect ./model --json | jq .linears
    fp8convert inspect ibm-granite/granite-3.3-8b-instruct-FP8 --emit-recipe recipes/granite.yaml
    """
    path, repo, sha = _inspect_source(source, revision, progress)
    from fp8convert.pipeline import inspect_checkpoint

    r = inspect_checkpoint(path, fmt)
    if recipe_out is not None:
        r["recipe"] = _emit_recipe(r, recipe_out, repo, sha)
    lines = [f"{r['source']}", f"  layout:       {r['format']} ({r['rule']})"]
    lines += [f"  evidence:     {e}" for e in r["evidence"]]
    lines.append(f"  architecture: {r['architecture']}")
    if r["aiu_problems"]:
        lines += [f"  AIU target:   not possible: {p}" for p in r["aiu_problems"]]
        lines.append("                (convert writes the CPU variant alone)")
    else:
        lines.append(f"  AIU target:   weights {r['target']['weights']} + activations {r['target']['activations']}")
    lines.append(f"  linears ({len(r['linears'])}):")
    for lin in r["linears"]:
        lines.append(
            f"    {lin['module']:<44} {lin['scheme']:<14} {lin['scale_dtype']:<9} {lin['activation']:<15} "
            f"-> {lin['action']}"
        )
    if r["unquantized_linears"]:
        lines.append(f"  full-precision linears: {', '.join(r['unquantized_linears'])}")
    if r["kv_cache_scales"]:
        lines.append(f"  KV-cache scales: {len(r['kv_cache_scales'])} (dropped for the AIU target)")
    if recipe_out is not None:
        lines.append(f"  recipe written: {recipe_out}")
    return {"command": "inspect", "ok": True, **r}, "\n".join(lines)


def _inspect_source(source: str, revision: str | None, progress: bool) -> tuple[Path, str | None, str | None]:
    """(directory, repo, commit sha): a local directory (repo and sha known when it is a Hugging Face cache
    snapshot ``models--ORG--NAME/snapshots/<sha>``), or a Hub repo id pulled into the cache."""
    path = Path(source)
    if path.is_dir():
        cache = path.resolve()
        if cache.parent.name == "snapshots" and cache.parent.parent.name.startswith("models--"):
            return path, cache.parent.parent.name.removeprefix("models--").replace("--", "/", 1), cache.name
        return path, None, None
    if path.exists() or source.count("/") != 1:
        raise click.BadParameter(
            f"{source!r} is neither a checkpoint directory nor a Hub repo id (ORG/NAME)", param_hint="SOURCE"
        )
    from fp8convert.cli_hub import _pull

    pulled = _pull(
        "inspect", source, progress, revision=revision or "main", token_file=None, local_dir=None, offline=False
    )
    return pulled.path, pulled.repo, pulled.sha


def _emit_recipe(r: dict, out: Path, repo: str | None, sha: str | None) -> str:
    """Write the recipe of an inspected source (targets as `convert` would choose them); returns its path."""
    from fp8convert.errors import RecipeError
    from fp8convert.recipe import emit_recipe
    from fp8convert.writers.aiu import AIU_ARCHITECTURES, DECODER_LINEAR

    if repo is None or sha is None:
        raise RecipeError(
            "a recipe pins a Hub repo and commit sha, and this directory is not a Hub snapshot",
            where=str(out),
            hint="inspect the repo id instead: fp8convert inspect ORG/NAME --emit-recipe",
        )
    aiu = r["architecture"] in AIU_ARCHITECTURES  # unquantized decoder linears: quantize them (recorded)
    text = emit_recipe(
        repo=repo,
        revision=sha,
        format_name=r["format"],
        targets=["aiu", "cpu"] if aiu else ["cpu"],
        architecture=r["architecture"],
        quantize_unquantized=aiu and any(DECODER_LINEAR.match(m) for m in r["unquantized_linears"]),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return str(out)


def _targets(value: str) -> frozenset | None:
    from fp8convert.spec import Target

    if value.strip() == "auto":
        return None
    try:
        return frozenset(Target(v.strip()) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: use aiu, cpu or aiu,cpu") from None


def _convert_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The conversion options shared by ``convert`` and ``pull-and-convert`` (parsed by :func:`_options`)."""
    func = _format_option(func)
    func = click.option(
        "--max-shard-size", default="5GB", show_default=True, help="Largest output shard, e.g. 2GB, 500MB."
    )(func)
    func = click.option(
        "--quantize-unquantized",
        is_flag=True,
        help="Quantize full-precision decoder linears per channel (the AIU stack cannot keep them).",
    )(func)
    func = click.option(
        "--overwrite", is_flag=True, help="Replace OUT/aiu, OUT/cpu and the report if OUT is not empty."
    )(func)
    return click.option(
        "--target",
        "target",
        default="auto",
        show_default=True,
        help="What to write: aiu, cpu, or aiu,cpu. auto: both when the AIU stack can load the architecture "
        "(Llama, Granite), else cpu alone.",
    )(func)


def _options(
    *, target: str, overwrite: bool, quantize_unquantized: bool, max_shard_size: str, fmt: str | None, progress: bool
) -> ConvertOptions:
    from fp8convert.pipeline import ConvertOptions

    return ConvertOptions(
        targets=_targets(target),
        overwrite=overwrite,
        format=fmt,
        quantize_unquantized=quantize_unquantized,
        max_shard_bytes=_size(max_shard_size),
        progress=progress,
    )


def _convert_summary(report: dict, out: Path) -> list[str]:
    s = report["summary"]
    lines = [
        f"Converted {report['source']['path']} ({report['source']['format']}) -> {out}",
        f"  target: weights {report['target']['weights']} + activations {report['target']['activations']}, bf16 scales",
        f"  linears: {s['linears']} ({s['exact']} exact, {s['lossy']} changed)"
        + (f"; min SQNR {s['min_sqnr_db']:.1f} dB" if s["min_sqnr_db"] is not None else ""),
    ]
    lines += [f"  lossy: {step}" for step in report["lossy_steps"][:10]]
    if len(report["lossy_steps"]) > 10:
        lines.append(f"  ... {len(report['lossy_steps']) - 10} more in fp8convert-report.json")
    if s["kv_cache_scales_dropped"]:
        lines.append(f"  KV-cache scales dropped: {s['kv_cache_scales_dropped']} (listed in the report)")
    if report["options"].get("aiu_skipped"):
        lines.append(f"  AIU artifact not written: {report['options']['aiu_skipped']}")
    lines.append(f"  report: {Path(out) / 'fp8convert-report.json'}")
    return lines


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("source", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@_convert_options
@common
def convert(source: Path, out: Path, progress: bool, **options: Any) -> tuple[dict, str]:
    """Convert SOURCE (a local checkpoint directory) into OUT/aiu, OUT/cpu and OUT/fp8convert-report.json.

    Headers and scales are validated before anything is written, fp8 codes as they stream; all problems are
    listed at once. The source is never modified; the output appears atomically. Interrupted (Ctrl-C,
    kill -9), the same command resumes from the last finished shard. A second run into the same OUT is
    refused while the first one runs.

    \b
    fp8convert convert ./Llama-3.1-8B-FP8-dynamic out/
    fp8convert convert ./model out/ --target cpu --overwrite
    fp8convert convert ./model out/ --json > result.json
    """
    from fp8convert.pipeline import convert as run

    report = run(source, out, _options(progress=progress, **options))
    return {"command": "convert", "ok": True, "output": str(out), **report}, "\n".join(_convert_summary(report, out))


def _size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    t = text.strip().upper()
    for unit, mult in units.items():
        if t.endswith(unit) and t[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(t[: -len(unit)]) * mult)
    if t.isdigit():
        return int(t)
    raise click.BadParameter(f"{text!r}: use a size such as 5GB or 500MB", param_hint="--max-shard-size")


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--source",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="The source checkpoint (default: the path recorded in the report).",
)
@click.option(
    "--aiu-check/--no-aiu-check",
    default=None,
    help="Load with IBM's loader (needs the aiu-check extra). Default: when installed.",
)
@common
def verify(out: Path, source: Path | None, aiu_check: bool | None, progress: bool) -> tuple[dict, str]:
    """Check a conversion output: checksums, the AIU spec, numbers against the source, IBM's loader.

    \b
    fp8convert verify out/
    fp8convert verify out/ --source ./Llama-FP8 --aiu-check
    """
    from fp8convert.verify import verify as run

    r = run(out, source=source, aiu_check=aiu_check)
    lines = [f"Verified {out}"] + [f"  {'ok ' if c['ok'] else 'WARN'} {c['check']}: {c['detail']}" for c in r["checks"]]
    return r, "\n".join(lines)


@main.command("smoke-test", epilog=EXIT_CODES_HELP)
@click.argument("cpu_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--prompt", default="The capital of France is", show_default=True)
@click.option(
    "--numerics",
    type=click.Choice(["fallback", "fms-mo", "hardware"]),
    default="fallback",
    show_default=True,
    help="FakeQuantLinear arithmetic.",
)
@click.option(
    "--min-cosine",
    type=float,
    default=0.99,
    show_default=True,
    help="Fail (exit 3) below this cosine similarity to the dequantized bf16 reference.",
)
@common
def smoke_test(cpu_dir: Path, prompt: str, numerics: str, min_cosine: float, progress: bool) -> tuple[dict, str]:
    """Run a prompt through the CPU variant and compare its logits with the dequantized bf16 reference.

    Needs the cpu extra (transformers).

    \b
    fp8convert smoke-test out/cpu
    fp8convert smoke-test out/cpu --numerics hardware --prompt "Hello"
    """
    from fp8convert.verify import smoke_test as run

    r = run(cpu_dir, prompt=prompt, numerics=numerics, min_cosine=min_cosine)
    human = (
        f"Smoke test of {cpu_dir} ({numerics} numerics, {r['tokens']} tokens from {r['token_source']}):\n"
        f"  cosine {r['cosine']:.5f}, top-1 agreement {r['top1_agreement']:.2f}, rel-L2 {r['rel_l2']:.4f} "
        f"vs the dequantized bf16 reference: ok"
    )
    return r, human


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("out", type=click.Path(path_type=Path), default="fp8convert-demo")
@click.option("--overwrite", is_flag=True, help="Replace a previous demo in OUT.")
@common
def demo(out: Path, overwrite: bool, progress: bool) -> tuple[dict, str]:
    """Build a tiny FP8 Llama (compressed-tensors FP8_DYNAMIC, as llm-compressor writes it) in OUT/source,
    then convert, verify and smoke-test it. No network needed.

    \b
    fp8convert demo
    fp8convert demo /tmp/fp8-demo --overwrite
    """
    import shutil

    from fp8convert.examples import build_compressed_tensors
    from fp8convert.pipeline import ConvertOptions
    from fp8convert.pipeline import convert as run_convert
    from fp8convert.verify import smoke_test, verify

    if out.exists() and any(out.iterdir()):
        if not overwrite:
            from fp8convert.errors import OutputError

            raise OutputError("the demo directory is not empty", where=str(out), hint="pass --overwrite")
        for name in ("source", "converted"):
            shutil.rmtree(out / name, ignore_errors=True)
    src = build_compressed_tensors(out / "source", scheme="FP8_DYNAMIC")
    report = run_convert(src, out / "converted", ConvertOptions(progress=progress))
    checked = verify(out / "converted")
    smoke = smoke_test(out / "converted" / "cpu")
    lines = [
        f"1. wrote a tiny FP8 Llama (compressed-tensors FP8_DYNAMIC) to {src}",
        f"2. converted it: {out / 'converted'}/aiu (AIU artifact), /cpu (CPU variant), /fp8convert-report.json "
        f"({report['summary']['linears']} linears, {report['summary']['exact']} exact)",
        f"3. verified: {sum(c['ok'] for c in checked['checks'])}/{len(checked['checks'])} checks passed",
    ]
    lines += [f"     {c['check']}: {c['detail']}" for c in checked["checks"]]
    lines.append(
        f"4. smoke test on CPU: cosine {smoke['cosine']:.5f}, top-1 agreement {smoke['top1_agreement']:.2f} "
        "vs the dequantized bf16 reference"
    )
    lines.append(f"Next: fp8convert inspect {src}   |   fp8convert convert YOUR-FP8-MODEL out/")
    return {
        "command": "demo",
        "ok": True,
        "source": str(src),
        "convert": report,
        "verify": checked,
        "smoke_test": smoke,
    }, "\n".join(lines)


# The Hub commands (pull, pull-and-convert) live in cli_hub.py; importing it registers them on ``main``.
from fp8convert import cli_hub  # noqa: E402,F401

if __name__ == "__main__":  # pragma: no cover
    # `python -m fp8convert.cli`: run the group of the imported module, on which cli_hub registered its commands
    from fp8convert.cli import main as registered

    registered()
