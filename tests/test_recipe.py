"""Recipes (fp8convert/recipe.py): every shipped recipe in recipes/, the emit -> load round trip, the text of
each error (unknown keys, types, missing keys, YAML 1.1 traps, files that are not recipes), and the mapping
to ConvertOptions."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fp8convert.errors import RecipeError
from fp8convert.formats import REGISTRY
from fp8convert.pipeline import DEFAULT_SHARD_BYTES, ConvertOptions
from fp8convert.recipe import (
    AUTO_FORMAT,
    KEYS,
    Recipe,
    RecipeOptions,
    RecipeSource,
    RecipeTarget,
    RecipeVerify,
    dump_recipe,
    emit_recipe,
    is_pinned,
    load_recipe,
    loads_recipe,
    parse_size,
    pin_message,
    to_convert_options,
)
from fp8convert.spec import Target
from fp8convert.writers.aiu import AIU_ARCHITECTURES

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))
#: a made-up sha for tests only (never shipped)
SHA = "0123456789abcdef0123456789abcdef01234567"
#: formats without a shipped recipe, and why
NO_RECIPE = {
    "mistral": "the public Mistral-native FP8 repos (Ministral 3, Devstral 2, Mistral Large 3) are vision, YaRN or "
    "MoE models that the mistral reader refuses by name",
}
#: the shipped recipes that must exist: one per family of issue 5
FAMILIES = {
    "ibm-granite/granite-3.3-8b-instruct-FP8": "compressed-tensors",
    "RedHatAI/Meta-Llama-3.1-8B-Instruct-FP8-dynamic": "compressed-tensors",
    "Qwen/Qwen3-8B-FP8": "fp8",
    "deepseek-ai/DeepSeek-V3": "fp8",
    "nvidia/Llama-3.1-8B-Instruct-FP8": "modelopt",
    "meta-llama/Llama-3.1-405B-Instruct-FP8": "fbgemm",
    "amd/Llama-3.1-8B-Instruct-FP8-KV-Quark-test": "quark",
}
VALID = f"""\
version: 1
source:
  repo: org/Model-FP8
  revision: "{SHA}"
  format: compressed-tensors
  architecture: LlamaForCausalLM
target:
  aiu: true
  cpu: true
options:
  quantize-unquantized: false
  max-shard-size: 5GB
verify:
  sqnr-min-db: 24.0
  prompt: "The capital of France is"
  min-cosine: 0.99
notes: a test recipe
"""


def problems(text: str, **kwargs: bool) -> list[str]:
    with pytest.raises(RecipeError) as info:
        loads_recipe(text, name="r.yaml", **kwargs)
    return info.value.problems


def edit(old: str, new: str) -> str:
    assert old in VALID
    return VALID.replace(old, new)


# ---- shipped recipes ---------------------------------------------------------------------------------
def test_shipped_recipes_cover_every_family():
    loaded = {load_recipe(p, allow_unpinned=True).source.repo: p for p in RECIPES}
    assert len(loaded) == len(RECIPES), "two recipes for one repo"
    assert {repo: load_recipe(loaded[repo], allow_unpinned=True).source.format for repo in FAMILIES} == FAMILIES
    formats = {load_recipe(p, allow_unpinned=True).source.format for p in RECIPES}
    assert formats == set(REGISTRY) - set(NO_RECIPE)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipe(path: Path):
    recipe = load_recipe(path, allow_unpinned=True)
    src = recipe.source
    assert path.stem == src.repo.replace("/", "--").lower()
    assert src.format in REGISTRY  # a shipped recipe names its layout
    assert src.architecture is not None
    # targets possible for the architecture: the AIU stack loads Llama and Granite only
    assert recipe.target.cpu
    assert recipe.target.aiu == (src.architecture in AIU_ARCHITECTURES)
    if src.format == "fbgemm" and recipe.target.aiu:
        assert recipe.options.quantize_unquantized  # FBGEMM leaves attention in bf16
    if src.architecture.startswith(("Qwen3", "Deepseek")):
        assert Target.AIU not in to_convert_options(recipe).targets
    # pinned, or refused by default with exactly the pinning message
    if recipe.pinned:
        assert load_recipe(path) == recipe
        assert recipe.warnings == ()
    else:
        with pytest.raises(RecipeError) as info:
            load_recipe(path)
        [problem] = info.value.problems
        assert problem.startswith(f"{path}: source.revision: {pin_message(src.repo, src.revision)} (line ")
        assert "pin a revision: run `fp8convert inspect" in problem
        assert "not a commit sha" in recipe.warnings[0]
    assert loads_recipe(dump_recipe(recipe), allow_unpinned=True) == recipe


# ---- emit -> load ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"architecture": "GraniteForCausalLM", "quantize_unquantized": True, "max_shard_size": "500MB"},
        {"sqnr_min_db": 1e-05, "prompt": "no", "min_cosine": 1.0, "notes": "012"},
        {"prompt": "yes: \"quoted\" 'single' # not a comment", "notes": "two\nlines, é, 😀, \u2028 and a tab\t"},
        {"sqnr_min_db": 25.0, "prompt": "1e-3", "notes": "on"},
    ],
)
@pytest.mark.parametrize(("targets", "fmt"), [(["aiu", "cpu"], "compressed-tensors"), ([Target.CPU], AUTO_FORMAT)])
def test_emit_round_trip(extra: dict, targets: list, fmt: str, tmp_path: Path):
    text = emit_recipe(repo="org/Model-FP8", revision=SHA, format_name=fmt, targets=targets, **extra)
    assert text.startswith("# fp8convert recipe for org/Model-FP8@")
    assert "`fp8convert inspect --emit-recipe`" in text
    path = tmp_path / "emitted.yaml"
    path.write_text(text, encoding="utf-8")
    recipe = load_recipe(path)
    expected = Recipe(
        source=RecipeSource(repo="org/Model-FP8", revision=SHA, format=fmt, architecture=extra.get("architecture")),
        target=RecipeTarget(aiu="aiu" in targets, cpu=True),
        options=RecipeOptions(
            quantize_unquantized=extra.get("quantize_unquantized", False),
            max_shard_size=extra.get("max_shard_size", "5GB"),
        ),
        verify=RecipeVerify(
            sqnr_min_db=extra.get("sqnr_min_db"), prompt=extra.get("prompt"), min_cosine=extra.get("min_cosine")
        ),
        notes=extra.get("notes"),
    )
    assert recipe == expected
    assert recipe.pinned and recipe.warnings == ()
    assert text.endswith(dump_recipe(recipe))  # the header, then exactly the recipe
    assert loads_recipe(dump_recipe(recipe)) == recipe


def test_emit_refuses_an_unpinned_revision():
    with pytest.raises(RecipeError) as info:
        emit_recipe(repo="org/M", revision="main", format_name="fp8", targets=["cpu"])
    assert info.value.problems == [f"source.revision: {pin_message('org/M', 'main')}"]
    text = emit_recipe(repo="org/M", revision="main", format_name="fp8", targets=["cpu"], allow_unpinned=True)
    recipe = loads_recipe(text, allow_unpinned=True)
    assert not recipe.pinned and "'main' is not a commit sha" in recipe.warnings[0]


def test_emit_refuses_invalid_values():
    with pytest.raises(RecipeError) as info:
        emit_recipe(
            repo="org/M",
            revision=SHA,
            format_name="fp9",
            targets=["aiu"],
            architecture="Qwen3ForCausalLM",
            max_shard_size="big",
        )
    assert info.value.problems == [
        "source.format: unknown format 'fp9'; did you mean 'fp8'? known: auto, " + ", ".join(sorted(REGISTRY)),
        "target.aiu: the AIU stack cannot load Qwen3ForCausalLM (only LlamaForCausalLM, GraniteForCausalLM); "
        "set aiu: false, cpu: true",
        "options.max-shard-size: 'big' is not a size; write e.g. 5GB or 500MB",
    ]


def test_recipe_built_in_python_is_checked():
    source = RecipeSource(repo="org/M", revision=SHA)
    with pytest.raises(RecipeError, match="target: no target is true"):
        Recipe(source=source, target=RecipeTarget())
    with pytest.raises(RecipeError, match="reads recipe version 1, not 2; upgrade fp8convert"):
        Recipe(version=2, source=source, target=RecipeTarget(cpu=True))


# ---- to_convert_options ------------------------------------------------------------------------------
def test_to_convert_options():
    recipe = loads_recipe(VALID)
    assert to_convert_options(recipe) == ConvertOptions(
        targets=frozenset({Target.AIU, Target.CPU}),
        format="compressed-tensors",
        quantize_unquantized=False,
        max_shard_bytes=5_000_000_000,
    )
    cpu_auto = loads_recipe(
        edit("format: compressed-tensors", "format: auto")
        .replace("aiu: true", "aiu: false")
        .replace("quantize-unquantized: false", "quantize-unquantized: true")
        .replace("5GB", "1.5GB")
    )
    options = to_convert_options(cpu_auto, overwrite=True, progress=True)
    assert options.targets == frozenset({Target.CPU})
    assert options.format is None  # auto: detect
    assert options.quantize_unquantized and options.overwrite and options.progress
    assert options.max_shard_bytes == 1_500_000_000
    # a flag given on the command line wins: replace() after the mapping
    assert dataclasses.replace(options, targets=None).targets is None


def test_defaults_match_the_cli():
    minimal = f"version: 1\nsource: {{repo: org/M, revision: '{SHA}'}}\ntarget: {{cpu: true}}\n"
    recipe = loads_recipe(minimal)
    assert recipe.source.format == AUTO_FORMAT and recipe.source.architecture is None
    assert to_convert_options(recipe).max_shard_bytes == DEFAULT_SHARD_BYTES
    assert recipe.verify == RecipeVerify() and recipe.notes is None
    assert loads_recipe(minimal + "options:\nverify:\n") == recipe  # empty optional sections


@pytest.mark.parametrize("text", ["5GB", "500MB", "1.5GB", "123", "2TB", " 7 kb ", "10B"])
def test_parse_size_reads_like_the_cli(text: str):
    from fp8convert.cli import _size

    assert parse_size(text) == _size(text)


def test_max_shard_size_as_plain_bytes():
    recipe = loads_recipe(edit("max-shard-size: 5GB", "max-shard-size: 1000000"))
    assert recipe.options.max_shard_size == "1000000" and to_convert_options(recipe).max_shard_bytes == 10**6


# ---- error messages ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        # unknown keys, with "did you mean"
        ("  aiu: true", "  aiuu: true", "r.yaml: target.aiuu: unknown key; did you mean 'aiu'? (line 8)"),
        (
            "max-shard-size",
            "max_shard_size",
            "r.yaml: options.max_shard_size: unknown key; did you mean 'max-shard-size'? "
            "(recipe keys are spelled like the CLI flags, with '-') (line 12)",
        ),
        ("notes:", "note:", "r.yaml: note: unknown key; did you mean 'notes'? (line 17)"),
        (
            "notes: a test recipe",
            "revision: main",
            "r.yaml: revision: unknown key here; 'revision' belongs under 'source'",
        ),
        (
            "notes: a test recipe",
            "on: 1",
            "r.yaml: on: unknown key; known keys: version, source, target, options, "
            "verify, notes (YAML 1.1 reads this key as a bool, not a string) (line 17)",
        ),
        # wrong types
        ("  aiu: true", "  aiu: 1", "r.yaml: target.aiu: expected true or false, found the integer 1"),
        (
            "  cpu: true",
            '  cpu: "true"',
            "target.cpu: expected true or false, found the string 'true' (quoted); remove the quotes (line 9)",
        ),
        (
            "version: 1",
            'version: "1"',
            "r.yaml: version: expected an integer, found the string '1' (quoted); remove the quotes (line 1)",
        ),
        ("version: 1", "version: 1.0", "r.yaml: version: expected an integer, found the number 1.0"),
        ("repo: org/Model-FP8", "repo: [org, Model-FP8]", "r.yaml: source.repo: expected a string, found a list"),
        (
            "target:\n  aiu: true\n  cpu: true",
            "target: [aiu, cpu]",
            "r.yaml: target: expected a mapping with keys aiu, cpu; found a list",
        ),
        (
            "target:\n  aiu: true\n  cpu: true",
            "target: auto",
            "found the string 'auto'; a recipe pins what it writes, so no `auto`: write e.g. {aiu: true, cpu: true}",
        ),
        (
            "min-cosine: 0.99",
            "min-cosine: .inf",
            "verify.min-cosine: expected a plain decimal number, found the number inf",
        ),
        (
            'prompt: "The capital of France is"',
            "prompt: 2024-01-01",
            "verify.prompt: expected a string, found the "
            'date 2024-01-01 (YAML reads `2024-01-01` as one); quote it: prompt: "2024-01-01"',
        ),
        (
            'prompt: "The capital of France is"',
            "prompt: !!python/name:os.system",
            "verify.prompt: expected a string, found a value tagged tag:yaml.org,2002:python/name:os.system",
        ),
        ('prompt: "The capital of France is"', "prompt:", "verify.prompt: expected a string, found no value"),
        # missing required keys
        ("version: 1\n", "", "r.yaml: version: missing; this key is required (line 1)"),
        (f'  revision: "{SHA}"\n', "", "r.yaml: source.revision: missing; this key is required (line 3)"),
        ("target:\n  aiu: true\n  cpu: true\n", "", "r.yaml: target: missing; this key is required (line 1)"),
        # YAML 1.1 traps
        (
            "sqnr-min-db: 24.0",
            "sqnr-min-db: 1e-3",
            "r.yaml: verify.sqnr-min-db: expected a number, found the "
            "string '1e-3' (YAML 1.1 reads a float only with a '.' and, after an `e`, a sign); write 0.001 (line 14)",
        ),
        (
            "sqnr-min-db: 24.0",
            "sqnr-min-db: 2.5e1",
            "found the string '2.5e1' (YAML 1.1 reads a float only with a '.' and, after an `e`, a sign); write 25.0",
        ),
        (
            "sqnr-min-db: 24.0",
            'sqnr-min-db: "24.0"',
            "verify.sqnr-min-db: expected a number, found the string '24.0' (quoted); remove the quotes",
        ),
        (
            'prompt: "The capital of France is"',
            "prompt: no",
            "r.yaml: verify.prompt: expected a string, found the "
            'boolean false (YAML 1.1 reads `no` as false); quote it: prompt: "no" (line 15)',
        ),
        (
            'prompt: "The capital of France is"',
            "prompt: On",
            'found the boolean true (YAML 1.1 reads `On` as true); quote it: prompt: "On"',
        ),
        (
            "notes: a test recipe",
            "notes: off",
            'the boolean false (YAML 1.1 reads `off` as false); quote it: notes: "off"',
        ),
        ("notes: a test recipe", "notes: yes", 'quote it: notes: "yes"'),
        (
            "notes: a test recipe",
            "notes: 012",
            "r.yaml: notes: expected a string, found the integer 10 (YAML 1.1 "
            'reads `012` as an octal number); quote it: notes: "012" (line 17)',
        ),
        (
            "version: 1",
            "version: 01",
            "r.yaml: version: expected a plain decimal integer, found the integer 1 "
            "(YAML 1.1 reads `01` as an octal number)",
        ),
        (
            "max-shard-size: 5GB",
            "max-shard-size: 0x10",
            "options.max-shard-size: expected a string, found the "
            'integer 16 (YAML reads `0x10` as 16); quote it: max-shard-size: "0x10"',
        ),
        (
            f'revision: "{SHA}"',
            "revision: 1234567890123456789012345678901234567890",
            "r.yaml: source.revision: "
            "expected a string, found the integer 1234567890123456789012345678901234567890 (YAML reads unquoted "
            'digits as a number); quote it: revision: "1234567890123456789012345678901234567890" (line 4)',
        ),
        (
            f'revision: "{SHA}"',
            "revision: 0123456701234567012345670123456701234567",
            "(YAML 1.1 reads "
            "`0123456701234567012345670123456701234567` as an octal number); quote it: revision: "
            '"0123456701234567012345670123456701234567"',
        ),
        (
            "  cpu: true",
            "  cpu: true\n  cpu: false",
            "r.yaml: target.cpu: given twice (first on line 9); YAML would keep the last silently (line 10)",
        ),
        # values
        (
            f'revision: "{SHA}"',
            f'revision: "{SHA.upper()}"',
            f"source.revision: write the commit sha '{SHA.upper()}' in lower case",
        ),
        (
            f'revision: "{SHA}"',
            "revision: 'a b'",
            "source.revision: 'a b' is neither a 40-hex commit sha nor a branch or tag name",
        ),
        (
            f'revision: "{SHA}"',
            "revision: 0123abc",
            "'0123abc' is a branch or tag, not a commit sha (a short sha is not a pin: write all 40 hex digits)",
        ),
        (
            "repo: org/Model-FP8",
            "repo: https://huggingface.co/org/Model-FP8",
            "source.repo: 'https://huggingface.co/org/Model-FP8' is not a Hub repo id; write org/name",
        ),
        ("repo: org/Model-FP8", "repo: Model-FP8", "source.repo: 'Model-FP8' is not a Hub repo id"),
        (
            "format: compressed-tensors",
            "format: compressed_tensors",
            "source.format: unknown format 'compressed_tensors'; did you mean 'compressed-tensors'? known: auto, ",
        ),
        (
            "architecture: LlamaForCausalLM",
            "architecture: Qwen3ForCausalLM",
            "r.yaml: target.aiu: the AIU stack "
            "cannot load Qwen3ForCausalLM (only LlamaForCausalLM, GraniteForCausalLM); set aiu: false, cpu: true",
        ),
        (
            "  aiu: true\n  cpu: true",
            "  aiu: false\n  cpu: false",
            "r.yaml: target: no target is true; set aiu: true, cpu: true, or both",
        ),
        (
            "version: 1",
            "version: 2",
            "r.yaml: version: fp8convert 0.1.0 reads recipe version 1, not 2; upgrade fp8convert (line 1)",
        ),
        (
            "max-shard-size: 5GB",
            "max-shard-size: 5XB",
            "options.max-shard-size: '5XB' is not a size; write e.g. 5GB or 500MB (line 12)",
        ),
        ("min-cosine: 0.99", "min-cosine: 1.5", "verify.min-cosine: 1.5 is outside (0, 1]"),
        ('prompt: "The capital of France is"', 'prompt: "  "', "verify.prompt: the prompt is empty"),
    ],
)
def test_problem_messages(old: str, new: str, expected: str):
    found = problems(edit(old, new))
    assert any(expected in p for p in found), found


def test_every_problem_of_a_file_in_one_error(tmp_path: Path):
    text = edit("  aiu: true", "  aiuu: true").replace("sqnr-min-db: 24.0", "sqnr-min-db: 1e-3")
    text = text.replace('prompt: "The capital of France is"', "prompt: no").replace("version: 1", "version: 01")
    path = tmp_path / "x.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    err = info.value
    lines = [int(p.rsplit("(line ", 1)[1].rstrip(")")) for p in err.problems]
    assert lines == [1, 8, 14, 15]  # sorted by line
    assert err.message == "invalid recipe: 4 problem(s); nothing was downloaded or converted"
    assert all(p.startswith(f"{path}: ") for p in err.problems)
    assert f"{path}: target.aiuu: unknown key; did you mean 'aiu'?" in err.render()
    assert err.to_dict()["problems"] == err.problems and err.exit_code == 1


def test_pinning_message_comes_with_the_other_problems():
    found = problems(edit(f'"{SHA}"', "main").replace("  aiu: true", "  aiuu: true"))
    assert found == [
        "r.yaml: source.revision: " + pin_message("org/Model-FP8", "main") + " (line 4)",
        "r.yaml: target.aiuu: unknown key; did you mean 'aiu'? (line 8)",
    ]
    recipe = loads_recipe(edit(f'"{SHA}"', "main"), allow_unpinned=True)
    assert not recipe.pinned and recipe.source.revision == "main"
    assert not is_pinned("main") and is_pinned(SHA) and not is_pinned(SHA[:12])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "",
            "a recipe is a mapping with the keys version, source, target, options, verify, notes; found an empty file",
        ),
        ("# only a comment\n", "found an empty file"),
        (
            "- version: 1\n- source: x\n",
            "a recipe is a mapping with the keys version, source, target, options, verify, notes; found a list",
        ),
        ("just some words\n", "found the string 'just some words'"),
        ("source: [unclosed\n", "not valid YAML at line 2, column 1: expected ',' or ']', but got '<stream end>'"),
        (
            "version: 1\n\tsource: x\n",
            "not valid YAML at line 2, column 1: found character '\\t' that cannot start any token",
        ),
        (
            "version: 1\n---\nversion: 1\n",
            "not valid YAML at line 2, column 1: it holds more than one YAML document (---); put one recipe in a file",
        ),
        ("a: *nowhere\n", "not valid YAML at line 1, column 4: found undefined alias 'nowhere'"),
    ],
)
def test_not_a_recipe(text: str, expected: str, tmp_path: Path):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert info.value.where == str(path)
    assert expected in info.value.message, info.value.message


def test_not_a_text_file(tmp_path: Path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00\xff\xfe{}")
    with pytest.raises(RecipeError, match=r"model.safetensors: byte 8 is not UTF-8 text: not a YAML recipe"):
        load_recipe(path)


def test_missing_file(tmp_path: Path):
    with pytest.raises(RecipeError, match=r"nope.yaml: cannot read the recipe: No such file or directory"):
        load_recipe(tmp_path / "nope.yaml")


def test_keys_are_spelled_like_the_cli_flags():
    assert KEYS["options"] == {"quantize-unquantized": False, "max-shard-size": False}
    assert all("_" not in key for section in KEYS.values() for key in section)


def test_sha_with_one_e_stays_a_string():
    # PyYAML reads a float only with a '.', so an unquoted sha of digits and one 'e' is a string here (a YAML 1.2
    # reader would take it for a float: emit_recipe always quotes the sha)
    sha = "1e" + "5" * 38
    assert loads_recipe(edit(f'"{SHA}"', sha)).source.revision == sha
    assert f'revision: "{sha}"' in emit_recipe(repo="org/M", revision=sha, format_name="fp8", targets=["cpu"])
