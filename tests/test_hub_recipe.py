"""Recipes end to end against the loopback Hub: `inspect REPO --emit-recipe` pins the repo and commit sha,
`pull-and-convert --recipe` reproduces the conversion byte for byte, and flags typed on the command line win."""

from __future__ import annotations

import json

from test_hub import REPO, fp8convert, hf_env, home, hub, one_json, outputs, reference, source  # noqa: F401

from fp8convert.recipe import load_recipe


def test_emit_then_run_recipe_reproduces_the_conversion(hub, home, tmp_path, reference) -> None:  # noqa: F811
    env = hf_env(home, hub.server)
    recipe = tmp_path / "recipes" / "tiny.yaml"
    proc = fp8convert(env, "inspect", REPO, "--revision", "v1.0", "--emit-recipe", recipe)
    assert proc.returncode == 0, proc.stderr
    loaded = load_recipe(recipe)
    assert loaded.source.repo == REPO and loaded.source.revision == hub.shas["v1.0"]
    assert loaded.source.format == "compressed-tensors" and loaded.target.targets == {"aiu", "cpu"}
    out = tmp_path / "out"
    proc = fp8convert(env, "pull-and-convert", "--recipe", recipe, out, "--json")
    assert proc.returncode == 0, proc.stderr
    doc = one_json(proc.stdout)
    assert doc["source"]["repo"] == REPO and doc["source"]["revision"] == hub.shas["v1.0"]
    assert outputs(out) == reference


def test_flags_typed_on_the_command_line_win(hub, home, tmp_path) -> None:  # noqa: F811
    env = hf_env(home, hub.server)
    recipe = tmp_path / "tiny.yaml"
    assert fp8convert(env, "inspect", REPO, "--emit-recipe", recipe).returncode == 0
    out = tmp_path / "out"
    proc = fp8convert(env, "pull-and-convert", "--recipe", recipe, out, "--target", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert not (out / "aiu").exists() and (out / "cpu").is_dir()
    report = json.loads((out / "fp8convert-report.json").read_text())
    assert report["source"]["revision"] == hub.shas["main"]


def test_recipe_errors_download_nothing(hub, home, tmp_path) -> None:  # noqa: F811
    env = hf_env(home, hub.server)
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"version: 1\nsource: {{repo: {REPO}, revision: main}}\ntarget: {{aiuu: true}}\n")
    proc = fp8convert(env, "pull-and-convert", "--recipe", recipe, tmp_path / "out")
    assert proc.returncode == 1
    assert "target.aiuu" in proc.stderr and "did you mean 'aiu'" in proc.stderr
    assert not hub.server.requests() and not (tmp_path / "out").exists()
    other = tmp_path / "other.yaml"
    assert fp8convert(env, "inspect", REPO, "--emit-recipe", other).returncode == 0
    proc = fp8convert(env, "pull-and-convert", "acme/another", tmp_path / "out2", "--recipe", other)
    assert proc.returncode == 1 and "differs from the recipe's source.repo" in proc.stderr


def test_emit_recipe_needs_a_hub_snapshot(tmp_path, source) -> None:  # noqa: F811
    env = hf_env(tmp_path, None)
    proc = fp8convert(env, "inspect", source, "--emit-recipe", tmp_path / "r.yaml")
    assert proc.returncode == 1 and "not a Hub snapshot" in proc.stderr
    assert not (tmp_path / "r.yaml").exists()
