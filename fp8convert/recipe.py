"""Recipes: one YAML file that pins a conversion (Hub repo and commit, layout, targets, options, checks).

The only module that imports ``yaml``. Keys are spelled like the CLI flags (README 'Recipes')::

    version: 1                                            # required
    source: {repo: org/Model-FP8, revision: <40-hex sha>, format: auto, architecture: LlamaForCausalLM}
    target: {aiu: true, cpu: true}                        # required; at least one true
    options: {quantize-unquantized: false, max-shard-size: 5GB}
    verify: {sqnr-min-db: 24.0, prompt: "The capital of France is", min-cosine: 0.99}
    notes: free text

Reading is strict and reports every problem of a file at once (one ``RecipeError``, a line
``FILE: key.path: what (line N)`` each): unknown keys (with difflib's "did you mean"), missing keys, wrong types,
duplicate keys, and the YAML 1.1 traps of PyYAML's ``safe_load``: ``1e-3`` is a *string*, ``no``/``yes``/``on``/
``off`` are booleans, ``012`` is the octal 10, an all-digit commit sha is an integer. It checks the composed node
tree, so messages quote what the file says, and constructs YAML's own scalar tags only. No ``target: auto``:
a recipe pins what it writes, and ``target.aiu`` is checked against ``source.architecture``.

Pinning: ``source.revision`` must be a full commit sha. A branch or tag (``main``) loads only with
``allow_unpinned=True`` (CLI ``--allow-unpinned``), and ``Recipe.warnings`` then says so; the download resolves it
to a sha, which the report records. The recipes in ``recipes/`` say ``revision: main``: no commit sha of those
repos could be read when they were written, and an invented sha would be worse than an honest branch name. Each
fails by default with exactly ``pin_message(repo, "main")``; ``inspect --emit-recipe`` writes a pinned one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from fp8convert import __version__
from fp8convert.errors import RecipeError
from fp8convert.formats import REGISTRY
from fp8convert.spec import Target
from fp8convert.writers.aiu import AIU_ARCHITECTURES

if TYPE_CHECKING:
    from fp8convert.pipeline import ConvertOptions

RECIPE_VERSION = 1
AUTO_FORMAT = "auto"
DEFAULT_MAX_SHARD_SIZE = "5GB"  # pipeline.DEFAULT_SHARD_BYTES, spelled as --max-shard-size's default
ALLOW_UNPINNED_FLAG = "--allow-unpinned"  # the CLI flag behind allow_unpinned=True
HINT = "README 'Recipes' lists every key; `fp8convert inspect REPO --emit-recipe` writes a valid recipe"

_SHA = re.compile(r"[0-9a-f]{40}")
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_REPO = re.compile(rf"{_PART}/{_PART}")
_REF = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*")
_PLAIN_INT = re.compile(r"[-+]?(?:0|[1-9][0-9]*)")
_PLAIN_FLOAT = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
_BOOL_WORDS = {"true", "false", "yes", "no", "on", "off", "y", "n"}
_SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}


# ---- values ------------------------------------------------------------------------------------------
def parse_size(text: str) -> int | None:
    """``"5GB"`` -> 5_000_000_000 (KB/MB/GB/TB/B, or bytes) as ``--max-shard-size`` reads it; None: not a size."""
    t = text.strip().upper()
    for unit, mult in _SIZE_UNITS.items():
        if t.endswith(unit) and t[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(t[: -len(unit)]) * mult)
    return int(t) if t.isdigit() else None


def is_pinned(revision: str) -> bool:
    """True for a full 40-hex commit sha, the only revision that names fixed files."""
    return _SHA.fullmatch(revision) is not None


def pin_message(repo: str, revision: str) -> str:
    """The problem reported for a revision that is a branch or tag when ``allow_unpinned`` is false."""
    short = " (a short sha is not a pin: write all 40 hex digits)" if re.fullmatch(r"[0-9a-f]{7,39}", revision) else ""
    return (
        f"{revision!r} is a branch or tag, not a commit sha{short}, so the recipe does not pin the files it "
        f"converts; pin a revision: run `fp8convert inspect {repo} --emit-recipe` "
        f"(or pass {ALLOW_UNPINNED_FLAG} to convert what {revision!r} holds today)"
    )


def _problems(v: dict[str, Any]) -> list[tuple[str, str]]:
    """Value checks on the key paths present in ``v`` (types already right)."""
    out: list[tuple[str, str]] = []  # (key path, message)
    repo, rev, fmt, arch = (v.get(f"source.{k}") for k in ("repo", "revision", "format", "architecture"))
    if repo is not None and (not _REPO.fullmatch(repo) or "--" in repo or ".." in repo or len(repo) > 200):
        out.append(("source.repo", f"{repo!r} is not a Hub repo id; write org/name, as in huggingface.co/org/name"))
    if rev is not None and re.fullmatch(r"[0-9a-fA-F]{40}", rev) and not is_pinned(rev):
        out.append(("source.revision", f"write the commit sha {rev!r} in lower case"))
    elif rev is not None and (not _REF.fullmatch(rev) or ".." in rev or rev.endswith(("/", ".lock"))):
        out.append(("source.revision", f"{rev!r} is neither a 40-hex commit sha nor a branch or tag name"))
    if fmt is not None and fmt != AUTO_FORMAT and fmt not in REGISTRY:
        close = difflib.get_close_matches(fmt, sorted(REGISTRY), n=1)
        mean = f"did you mean '{close[0]}'? " if close else ""
        out.append(
            ("source.format", f"unknown format {fmt!r}; {mean}known: {AUTO_FORMAT}, {', '.join(sorted(REGISTRY))}")
        )
    if arch is not None and v.get("target.aiu") and arch not in AIU_ARCHITECTURES:
        loads = ", ".join(AIU_ARCHITECTURES)
        out.append(("target.aiu", f"the AIU stack cannot load {arch} (only {loads}); set aiu: false, cpu: true"))
    if v.get("target.aiu") is False and v.get("target.cpu") is False:
        out.append(("target", "no target is true; set aiu: true, cpu: true, or both"))
    if (version := v.get("version")) is not None and version != RECIPE_VERSION:
        newer = "; upgrade fp8convert" if version > RECIPE_VERSION else ""
        out.append(("version", f"fp8convert {__version__} reads recipe version {RECIPE_VERSION}, not {version}{newer}"))
    if (size := v.get("options.max-shard-size")) is not None and (parse_size(size) or 0) < 1:
        out.append(("options.max-shard-size", f"{size!r} is not a size; write e.g. 5GB or 500MB"))
    if (sqnr := v.get("verify.sqnr-min-db")) is not None and not math.isfinite(sqnr):
        out.append(("verify.sqnr-min-db", f"{sqnr} is not a finite number of dB"))
    if (prompt := v.get("verify.prompt")) is not None and not prompt.strip():
        out.append(("verify.prompt", "the prompt is empty"))
    if (cosine := v.get("verify.min-cosine")) is not None and not 0.0 < cosine <= 1.0:
        out.append(("verify.min-cosine", f"{cosine} is outside (0, 1]; a cosine similarity is at most 1"))
    return out


def _error(problems: list[str], where: str) -> RecipeError:
    message = f"invalid recipe: {len(problems)} problem(s); nothing was downloaded or converted"
    return RecipeError(message, where=where, problems=problems, hint=HINT)


# ---- the recipe --------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class RecipeSource:
    """Where the checkpoint comes from: Hub repo id, revision (a 40-hex sha when pinned), layout, architecture."""

    repo: str
    revision: str
    format: str = AUTO_FORMAT  # "auto" or a key of formats.REGISTRY
    architecture: str | None = None  # config.json architectures[0]


@dataclass(frozen=True, slots=True, kw_only=True)
class RecipeTarget:
    """Which artifacts to write."""

    aiu: bool = False
    cpu: bool = False

    @property
    def targets(self) -> frozenset[Target]:
        return frozenset(t for t, on in ((Target.AIU, self.aiu), (Target.CPU, self.cpu)) if on)


@dataclass(frozen=True, slots=True, kw_only=True)
class RecipeOptions:
    """The ``convert`` flags a recipe fixes (``--overwrite`` is a choice of each run, not of the recipe)."""

    quantize_unquantized: bool = False
    max_shard_size: str = field(default=DEFAULT_MAX_SHARD_SIZE, metadata={"read": "size"})

    @property
    def max_shard_bytes(self) -> int:
        return parse_size(self.max_shard_size) or 0  # never 0: Recipe checks the size


@dataclass(frozen=True, slots=True, kw_only=True)
class RecipeVerify:
    """Acceptance thresholds; None keeps the default of ``verify`` (SQNR floor) and ``smoke-test``."""

    sqnr_min_db: float | None = None
    prompt: str | None = None
    min_cosine: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Recipe:
    """One conversion, pinned: read with ``load_recipe``, written with ``emit_recipe``. Checked as a whole on
    construction (``RecipeError``), so a Recipe built in Python obeys the same rules as one read from YAML."""

    version: int = field(default=RECIPE_VERSION, metadata={"required": True})
    source: RecipeSource
    target: RecipeTarget
    options: RecipeOptions = field(default_factory=RecipeOptions)
    verify: RecipeVerify = field(default_factory=RecipeVerify)
    notes: str | None = None

    def __post_init__(self) -> None:
        if problems := _problems(self.values()):
            raise _error([f"{path}: {msg}" for path, msg in problems], "recipe")

    def values(self) -> dict[str, Any]:
        """Every value by its YAML key path (``"options.max-shard-size"``), in the order of ``SCHEMA``."""
        paths = (path.rpartition(".") for path in SCHEMA)
        return {f"{s}{d}{k}": getattr(getattr(self, s) if s else self, k.replace("-", "_")) for s, d, k in paths}

    @property
    def pinned(self) -> bool:
        return is_pinned(self.source.revision)

    @property
    def warnings(self) -> tuple[str, ...]:
        """What the CLI should log as WARNING before running this recipe (empty when pinned)."""
        s = self.source
        why = f"{s.revision!r} is not a commit sha: the files are what {s.repo}@{s.revision} holds today"
        return () if self.pinned else (f"recipe source.revision {why} (the report records the sha it resolved to)",)


# The schema is the dataclasses': a field is a key (``_`` spelled ``-``), required when it has no default (or
# says so), read by the ``_Reader`` method its type names (or its ``read`` metadata).
_SECTIONS = {"source": RecipeSource, "target": RecipeTarget, "options": RecipeOptions, "verify": RecipeVerify}
_READ = {"int": "integer", "bool": "boolean", "str": "string", "str | None": "string", "float | None": "number"}


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name.replace("_", "-"): f for f in dataclasses.fields(cls)}


def _required(f: dataclasses.Field) -> bool:
    no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    return bool(f.metadata.get("required", no_default))


#: every value's key path -> its field, in the order a recipe is written
SCHEMA: dict[str, dataclasses.Field] = {
    (f"{key}.{sub}" if key in _SECTIONS else key): g
    for key, f in _fields(Recipe).items()
    for sub, g in (_fields(_SECTIONS[key]).items() if key in _SECTIONS else [(key, f)])
}
#: section ("" = top level) -> key -> required
KEYS = {s: {k: _required(f) for k, f in _fields(cls).items()} for s, cls in {"": Recipe, **_SECTIONS}.items()}
_DEFAULTS = {path: f.default for path, f in SCHEMA.items() if not _required(f)}


def _build(v: dict[str, Any]) -> Recipe:
    parts = {
        s: cls(**{k.replace("-", "_"): v[f"{s}.{k}"] for k in KEYS[s] if f"{s}.{k}" in v})
        for s, cls in _SECTIONS.items()
    }
    return Recipe(version=v["version"], notes=v.get("notes"), **parts)


# ---- reading -----------------------------------------------------------------------------------------
def _kind(node: yaml.Node) -> str:
    if not isinstance(node, yaml.ScalarNode):
        return "map" if isinstance(node, yaml.MappingNode) else "seq"
    kind = str(node.tag).removeprefix("tag:yaml.org,2002:")
    return kind if kind in ("str", "int", "float", "bool", "null", "timestamp") else "other"


class _Reader:
    """Type checks on the composed node tree; collects every problem with its line."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.problems: list[tuple[int, str]] = []
        self._constructor = yaml.constructor.SafeConstructor()

    def add(self, path: str, message: str, node: yaml.Node | None) -> None:
        line = node.start_mark.line + 1 if node is not None else 0
        at = f" (line {line})" if line else ""
        self.problems.append((line, f"{self.name}: {path + ': ' if path else ''}{message}{at}"))

    def found(self, node: yaml.Node) -> str:
        """What the node holds as YAML read it, with the trap that explains a surprise."""
        kind, raw = _kind(node), getattr(node, "value", "")
        if kind in ("map", "seq", "other", "null"):
            return {"map": "a mapping", "seq": "a list", "null": "no value"}.get(kind, f"a value tagged {node.tag}")
        if kind == "str":
            return f"the string {raw!r}" + (" (quoted)" if node.style in ("'", '"') else "")
        value = self._constructor.construct_object(node, deep=True)
        if kind == "bool":
            text = str(value).lower()
            return f"the boolean {text}" + (f" (YAML 1.1 reads `{raw}` as {text})" if raw.lower() != text else "")
        if kind == "int" and re.fullmatch(r"[-+]?0[0-7_]+", raw):
            return f"the integer {value} (YAML 1.1 reads `{raw}` as an octal number)"
        if kind == "int":
            why = "unquoted digits as a number" if _PLAIN_INT.fullmatch(raw) else f"`{raw}` as {value}"
            return f"the integer {value} (YAML reads {why})"
        return f"the {'number' if kind == 'float' else 'date'} {value} (YAML reads `{raw}` as one)"

    def mapping(self, node: yaml.Node | None, section: str) -> dict[str, yaml.Node]:
        """The known keys of a mapping node; problems for unknown, duplicate and missing keys."""
        known = KEYS[section]
        if node is None or (not KEYS[""].get(section, True) and _kind(node) == "null"):
            return {}  # absent (reported by the parent), or an empty optional section
        if not isinstance(node, yaml.MappingNode):
            auto = section == "target" and getattr(node, "value", None) == "auto"
            extra = "; a recipe pins what it writes, so no `auto`: write e.g. {aiu: true, cpu: true}" * auto
            self.add(section, f"expected a mapping with keys {', '.join(known)}; found {self.found(node)}{extra}", node)
            return {}
        out: dict[str, yaml.Node] = {}
        first: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                self.add(section, f"a key is {self.found(key_node)}; keys are plain words", key_node)
                continue
            key = key_node.value
            path = f"{section}.{key}" if section else key
            if key in first:
                self.add(path, f"given twice (first on line {first[key]}); YAML would keep the last silently", key_node)
            elif key not in known:
                trap = f" (YAML 1.1 reads this key as a {_kind(key_node)}, not a string)" * (_kind(key_node) != "str")
                self.add(path, self.unknown(key, section) + trap, key_node)
            else:
                out[key] = value_node
            first.setdefault(key, key_node.start_mark.line + 1)
        for key in (k for k, required in known.items() if required and k not in first):
            self.add(f"{section}.{key}" if section else key, "missing; this key is required", node)
        return out

    @staticmethod
    def unknown(key: str, section: str) -> str:
        known = list(KEYS[section])
        dashed = key.replace("_", "-")
        if dashed in known:
            return f"unknown key; did you mean '{dashed}'? (recipe keys are spelled like the CLI flags, with '-')"
        home = [s for s, keys in KEYS.items() if s != section and dashed in keys]
        if home:
            return f"unknown key here; '{dashed}' belongs " + (f"under '{home[0]}'" if home[0] else "at the top level")
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        return "unknown key" + (f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(known)}")

    def string(self, node: yaml.Node, path: str) -> str | None:
        kind = _kind(node)
        if kind == "str":
            return str(node.value)
        fix = ""
        if kind not in ("map", "seq", "other", "null"):
            quoted = yaml.safe_dump(node.value, default_style='"', width=10**9).strip()
            fix = f"; quote it: {path.rsplit('.', 1)[-1]}: {quoted}"
        self.add(path, f"expected a string, found {self.found(node)}{fix}", node)
        return None

    def size(self, node: yaml.Node, path: str) -> str | None:
        """A size such as ``5GB``, or plain bytes as a decimal integer."""
        if _kind(node) == "int" and _PLAIN_INT.fullmatch(node.value):
            return str(node.value)
        return self.string(node, path)

    def boolean(self, node: yaml.Node, path: str) -> bool | None:
        if _kind(node) == "bool":
            return bool(self._constructor.construct_object(node))
        quoted = _kind(node) == "str" and node.value.lower() in _BOOL_WORDS
        self.add(path, f"expected true or false, found {self.found(node)}" + "; remove the quotes" * quoted, node)
        return None

    def integer(self, node: yaml.Node, path: str) -> int | None:
        kind, raw = _kind(node), getattr(node, "value", "")
        if kind == "int" and _PLAIN_INT.fullmatch(raw):
            return int(raw)
        quoted = kind == "str" and _PLAIN_INT.fullmatch(raw)
        plain = "a plain decimal integer" if kind == "int" else "an integer"
        self.add(path, f"expected {plain}, found {self.found(node)}" + "; remove the quotes" * bool(quoted), node)
        return None

    def number(self, node: yaml.Node, path: str) -> float | None:
        kind, raw = _kind(node), getattr(node, "value", "")
        if kind in ("int", "float") and _PLAIN_FLOAT.fullmatch(raw):
            return float(self._constructor.construct_object(node))
        fix, what = "", "a plain decimal number" if kind in ("int", "float") else "a number"
        if kind == "str" and _PLAIN_FLOAT.fullmatch(raw):
            trap = "YAML 1.1 reads a float only with a '.' and, after an `e`, a sign"
            fix = "; remove the quotes" if node.style in ("'", '"') else f" ({trap}); write {_scalar(float(raw))}"
        self.add(path, f"expected {what}, found {self.found(node)}{fix}", node)
        return None


def load_recipe(path: str | Path, *, allow_unpinned: bool = False) -> Recipe:
    """Read and check the recipe file ``path`` (named as given in messages); ``allow_unpinned`` accepts a branch
    or tag as ``source.revision``. Raises ``RecipeError`` listing every problem, or naming why the file is
    unreadable or not YAML."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as exc:
        raise RecipeError(f"cannot read the recipe: {exc.strerror or exc}", where=str(path), hint=HINT) from exc
    except UnicodeDecodeError as exc:
        raise RecipeError(f"byte {exc.start} is not UTF-8 text: not a YAML recipe", where=str(path), hint=HINT) from exc
    return loads_recipe(text, name=str(path), allow_unpinned=allow_unpinned)


def loads_recipe(text: str, *, name: str = "<recipe>", allow_unpinned: bool = False) -> Recipe:
    """``load_recipe`` for YAML text; ``name`` stands for the file in messages."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = exc.problem or exc.context or "cannot be parsed"
        if "expected a single document" in str(exc.context):
            what = "it holds more than one YAML document (---); put one recipe in a file"
        raise RecipeError(f"not valid YAML{at}: {what}", where=name, hint=HINT) from exc
    except yaml.YAMLError as exc:
        raise RecipeError(f"not valid YAML: {exc}", where=name, hint=HINT) from exc
    finally:
        loader.dispose()
    r = _Reader(name)
    if not isinstance(root, yaml.MappingNode):
        found = "an empty file" if root is None else r.found(root)
        raise RecipeError(f"a recipe is a mapping with the keys {', '.join(KEYS[''])}; found {found}", where=name)
    nodes = r.mapping(root, "")
    for section in _SECTIONS:
        nodes.update({f"{section}.{k}": n for k, n in r.mapping(nodes.get(section), section).items()})

    def defaults_apply(section: str) -> bool:  # a mapping, or an optional section absent or empty
        node, optional = nodes.get(section), not KEYS[""][section]
        return isinstance(node, yaml.MappingNode) or (optional and (node is None or _kind(node) == "null"))

    values: dict[str, Any] = {}
    for path, f in SCHEMA.items():
        if path in nodes:
            if (value := getattr(r, f.metadata.get("read", _READ[str(f.type)]))(nodes[path], path)) is not None:
                values[path] = value
        elif path in _DEFAULTS and ("." not in path or defaults_apply(path.split(".")[0])):
            values[path] = _DEFAULTS[path]
    checks = _problems(values)
    repo, revision = values.get("source.repo"), values.get("source.revision")
    if repo and revision and not allow_unpinned and not is_pinned(revision):
        if not any(path in ("source.repo", "source.revision") for path, _ in checks):
            checks.append(("source.revision", pin_message(repo, revision)))
    for path, message in checks:
        r.add(path, message, nodes.get(path, nodes.get(path.split(".")[0])))
    if r.problems:
        raise _error([text for _, text in sorted(r.problems, key=lambda p: p[0])], name)
    return _build(values)


# ---- using and writing -------------------------------------------------------------------------------
def to_convert_options(recipe: Recipe, *, overwrite: bool = False, progress: bool = False) -> ConvertOptions:
    """The ``ConvertOptions`` a recipe stands for (``format: auto`` -> None: detect). A flag given on the
    command line wins: apply it afterwards with ``dataclasses.replace``."""
    from fp8convert.pipeline import ConvertOptions

    return ConvertOptions(
        targets=recipe.target.targets,
        overwrite=overwrite,
        format=None if recipe.source.format == AUTO_FORMAT else recipe.source.format,
        quantize_unquantized=recipe.options.quantize_unquantized,
        max_shard_bytes=recipe.options.max_shard_bytes,
        progress=progress,
    )


def _scalar(value: object) -> str:
    """YAML for one value: strings always double-quoted (no YAML 1.1 or 1.2 reader takes a quoted scalar for a
    number or a boolean), numbers and booleans as PyYAML writes them (``1e-05`` -> ``1.0e-05``)."""
    if isinstance(value, str):
        return str(yaml.safe_dump(value, default_style='"', allow_unicode=True, width=10**9)).strip()
    return str(yaml.safe_dump(value)).split("\n", 1)[0]


def dump_recipe(recipe: Recipe, *, header: Iterable[str] = ()) -> str:
    """YAML text for a recipe (``header`` lines become comments) that ``loads_recipe`` reads back equal.
    Keys whose value is None are left out."""
    lines = [f"# {h}".rstrip() for h in header]
    for path, value in ((p, v) for p, v in recipe.values().items() if v is not None):
        section, _, key = path.rpartition(".")
        if section and f"{section}:" not in lines:
            lines.append(f"{section}:")
        lines.append(f"{'  ' if section else ''}{key}: {_scalar(value)}")
    return "\n".join(lines) + "\n"


def emit_recipe(
    *,
    repo: str,
    revision: str,
    format_name: str,
    targets: Iterable[Target | str],
    architecture: str | None = None,
    quantize_unquantized: bool = False,
    max_shard_size: str = DEFAULT_MAX_SHARD_SIZE,
    sqnr_min_db: float | None = None,
    prompt: str | None = None,
    min_cosine: float | None = None,
    notes: str | None = None,
    allow_unpinned: bool = False,
) -> str:
    """The text of a recipe for ``inspect --emit-recipe``, with a comment header saying how it was made.
    ``revision`` is the commit sha the files came from (a branch only with ``allow_unpinned``), ``format_name``
    a ``formats.REGISTRY`` key or "auto", ``architecture`` config.json's ``architectures[0]``. Raises
    ``RecipeError`` for an invalid value or an unpinned revision."""
    wanted = {Target(t) for t in targets}
    recipe = Recipe(
        source=RecipeSource(repo=repo, revision=revision, format=format_name, architecture=architecture),
        target=RecipeTarget(aiu=Target.AIU in wanted, cpu=Target.CPU in wanted),
        options=RecipeOptions(quantize_unquantized=quantize_unquantized, max_shard_size=max_shard_size),
        verify=RecipeVerify(sqnr_min_db=sqnr_min_db, prompt=prompt, min_cosine=min_cosine),
        notes=notes,
    )
    if not recipe.pinned and not allow_unpinned:
        raise _error([f"source.revision: {pin_message(repo, revision)}"], "emitted recipe")
    made = f"fp8convert recipe for {repo}@{revision}, written by `fp8convert inspect --emit-recipe` ({__version__})."
    again = "Reproduce: fp8convert pull-and-convert --recipe THIS_FILE OUT (a flag on the command line wins)."
    return dump_recipe(recipe, header=[made, again, ""])
