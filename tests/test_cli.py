"""The command line through click's CliRunner: help texts, exit codes, human and --json output, targets,
sharding, verify, and byte-for-byte deterministic output; plus the installed console script."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from safetensors import safe_open

from fp8convert import __version__
from fp8convert.cli import main

SMALL = {"hidden": 64, "intermediate": 128, "vocab": 64}
INDEX = "model.safetensors.index.json"
REPORT = "fp8convert-report.json"
EXIT_EPILOG = (
    "Exit codes: 0 ok, 1 conversion error (bad input, unsupported layout,",
    "2 usage error, 3 verification failed.",
)


def run(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def src(make_ct: Callable[..., Path]) -> Path:
    return make_ct("FP8_DYNAMIC", **SMALL)


# ---- help and version ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("command", "example"),
    [
        (None, "fp8convert convert ./Llama-FP8 out/"),
        ("inspect", "fp8convert inspect ./model --json | jq .linears"),
        ("convert", "fp8convert convert ./model out/ --target cpu --overwrite"),
        ("verify", "fp8convert verify out/ --source ./Llama-FP8 --aiu-check"),
        ("smoke-test", "fp8convert smoke-test out/cpu --numerics hardware"),
        ("demo", "fp8convert demo /tmp/fp8-demo --overwrite"),
    ],
)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help(command, example, flag):
    result = run(*([command] if command else []), flag)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Usage: ")
    assert example in result.stdout
    for line in EXIT_EPILOG:
        assert line in result.stdout


def test_group_help_lists_every_command():
    out = run("--help").stdout
    for command in ("inspect", "convert", "verify", "smoke-test", "demo"):
        assert f"\n  {command} " in out


def test_version():
    result = run("--version")
    assert result.exit_code == 0
    assert result.stdout == f"fp8convert, version {__version__}\n"


def test_console_script():
    exe = Path(sys.executable).parent / "fp8convert"
    assert exe.is_file(), f"console script missing next to {sys.executable}"
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: fp8convert [OPTIONS] COMMAND [ARGS]...")
    proc = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=120)
    assert proc.stdout == f"fp8convert, version {__version__}\n"


# ---- convert -------------------------------------------------------------------------------------------
def test_convert_human(src, tmp_path):
    out = tmp_path / "out"
    result = run("convert", src, out)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        f"Converted {src} (compressed-tensors) -> {out}",
        "  target: weights channel + activations dynamic-token, bf16 scales",
        "  linears: 14 (14 exact, 0 changed)",
        f"  report: {out / REPORT}",
    ]
    assert sorted(p.name for p in out.iterdir()) == ["aiu", "cpu", REPORT]


def test_convert_json(src, tmp_path):
    out = tmp_path / "out"
    result = run("convert", src, out, "--json")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("\n") == 1 and result.stdout.endswith("}\n")  # exactly one JSON document
    doc = json.loads(result.stdout)
    assert doc["ok"] is True and doc["command"] == "convert" and doc["output"] == str(out)
    assert doc["source"]["format"] == "compressed-tensors"
    assert doc["summary"]["linears"] == 14
    written = tree(out)
    del written[REPORT]
    assert {name: info["sha256"] for name, info in doc["files"].items()} == written
    assert all(info["size"] == (out / name).stat().st_size for name, info in doc["files"].items())
    assert json.loads((out / REPORT).read_text()) == {
        k: v for k, v in doc.items() if k not in ("command", "ok", "output")
    }


def test_convert_target_cpu(src, tmp_path):
    out = tmp_path / "out"
    result = run("convert", src, out, "--target", "cpu")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["cpu", REPORT]
    report = json.loads((out / REPORT).read_text())
    assert report["options"]["targets"] == ["cpu"]
    assert all(name.startswith("cpu/") for name in report["files"])
    assert (out / "cpu" / "fp8convert.json").is_file()


@pytest.mark.parametrize(("option", "value"), [("--target", "bogus"), ("--max-shard-size", "lots")])
def test_bad_option_value_is_a_usage_error(src, tmp_path, option, value):
    result = run("convert", src, tmp_path / "out", option, value)
    assert not (tmp_path / "out").exists()
    assert "internal error" not in result.output
    assert result.exit_code == 2, result.output


def test_bad_option_value_is_refused_without_writing(src, tmp_path):
    for option, value, message in (
        ("--target", "bogus", "'bogus': use aiu, cpu or aiu,cpu"),
        ("--max-shard-size", "lots", "'lots': use a size such as 5GB or 500MB"),
    ):
        result = run("convert", src, tmp_path / "out", option, value)
        assert result.exit_code != 0
        assert message in result.stderr
        assert not (tmp_path / "out").exists()


def _check_sharded(directory: Path) -> int:
    index = json.loads((directory / INDEX).read_text())
    shards = sorted(p.name for p in directory.glob("*.safetensors"))
    assert sorted(set(index["weight_map"].values())) == shards
    held: dict[str, str] = {}
    total = 0
    for shard in shards:
        with safe_open(str(directory / shard), framework="pt") as f:
            for key in f.keys():
                held[key] = shard
                total += f.get_tensor(key).nbytes
    assert index["weight_map"] == held  # every tensor, in the shard the index names
    assert index["metadata"]["total_size"] == total
    return len(shards)


def test_max_shard_size(src, tmp_path):
    out = tmp_path / "out"
    result = run("convert", src, out, "--max-shard-size", "50KB")
    assert result.exit_code == 0, result.output
    assert json.loads((out / REPORT).read_text())["options"]["max_shard_bytes"] == 50_000
    shards = _check_sharded(out / "aiu")
    assert shards >= 2
    assert all((out / "aiu" / f"model-{i:05d}-of-{shards:05d}.safetensors").stat().st_size <= 51_000 for i in (1, 2))
    _check_sharded(out / "cpu")
    one = tmp_path / "one"
    assert run("convert", src, one).exit_code == 0
    assert _check_sharded(one / "aiu") == 1


def test_format_option(src, tmp_path, make_ct):
    result = run("convert", src, tmp_path / "out", "--format", "compressed-tensors")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / REPORT).read_text())["options"]["format"] == "compressed-tensors"
    result = run("convert", src, tmp_path / "out2", "--format", "gguf")
    assert result.exit_code == 2
    assert "Invalid value for '--format': 'gguf' is not one of" in result.stderr
    assert "'compressed-tensors'" in result.stderr
    assert not (tmp_path / "out2").exists()


def test_forced_format_that_does_not_match(make_ct, tmp_path):
    plain = make_ct("FP8_DYNAMIC", **SMALL)
    config = json.loads((plain / "config.json").read_text())
    del config["quantization_config"]
    (plain / "config.json").write_text(json.dumps(config))
    result = run("inspect", plain, "--format", "compressed-tensors", "--json")
    assert result.exit_code == 1
    error = json.loads(result.stdout)["error"]
    assert error["type"] == "UnknownFormatError"
    assert error["message"] == "--format compressed-tensors was given, but the checkpoint is not in that layout"
    assert "config.json has no quantization_config" in error["problems"]


def test_convert_into_non_empty_output_and_overwrite(src, tmp_path):
    out = tmp_path / "out"
    assert run("convert", src, out).exit_code == 0
    before = tree(out)
    result = run("convert", src, out)
    assert result.exit_code == 1
    assert "the output directory is not empty (3 entries)" in result.stderr
    assert "Fix: pass --overwrite" in result.stderr
    assert tree(out) == before
    result = run("convert", src, out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert tree(out) == before


def test_conversion_is_deterministic(src, tmp_path):
    for name in ("a", "b"):
        assert run("convert", src, tmp_path / name).exit_code == 0
    a, b = tree(tmp_path / "a"), tree(tmp_path / "b")
    assert len([n for n in a if n.startswith(("aiu/", "cpu/"))]) >= 10
    assert a == b  # every file under aiu/ and cpu/, and the report, byte for byte


# ---- inspect -------------------------------------------------------------------------------------------
def test_inspect_human(src):
    result = run("inspect", src)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == str(src)
    assert lines[1] == "  layout:       compressed-tensors (quant_method is compressed-tensors (FORMATS.md 7, step 3))"
    assert "  architecture: LlamaForCausalLM" in lines
    assert "  AIU target:   weights channel + activations dynamic-token" in lines
    assert "  linears (14):" in lines
    q0 = next(line for line in lines if "model.layers.0.self_attn.q_proj " in line)
    assert q0.split() == [
        "model.layers.0.self_attn.q_proj",
        "channel",
        "bfloat16",
        "dynamic-token",
        "->",
        "keep",
        "(exact)",
    ]


@pytest.mark.parametrize(
    ("scheme", "described", "action"),
    [
        ("FP8_DYNAMIC", "channel", "keep (exact)"),
        ("FP8_BLOCK", "block 128x128", "requantize per channel (lossy; error reported)"),
    ],
)
def test_inspect_json(make_ct, scheme, described, action):
    src = make_ct(scheme, **SMALL)
    result = run("inspect", src, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["ok"] is True and doc["command"] == "inspect"
    assert doc["format"] == "compressed-tensors"
    assert doc["source"] == str(src)
    assert len(doc["linears"]) == 14
    assert {(lin["scheme"], lin["action"]) for lin in doc["linears"]} == {(described, action)}
    assert doc["linears"][0]["module"] == "model.layers.0.mlp.down_proj"
    assert doc["linears"][0]["shape"] == [64, 128]
    assert doc["aiu_problems"] == []


# ---- verify --------------------------------------------------------------------------------------------
@pytest.fixture
def converted(src, tmp_path) -> Path:
    out = tmp_path / "out"
    assert run("convert", src, out).exit_code == 0
    return out


def test_verify_ok(converted):
    result = run("verify", converted, "--no-aiu-check")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == f"Verified {converted}"
    assert f"  ok  checksums: {len(json.loads((converted / REPORT).read_text())['files'])} files match" in result.stdout
    assert "WARN" not in result.stdout
    result = run("verify", converted, "--no-aiu-check", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["ok"] is True and doc["command"] == "verify" and doc["output"] == str(converted)
    names = [c["check"] for c in doc["checks"]]
    assert "checksums" in names and "numbers against the source" in names
    assert all(c["ok"] for c in doc["checks"])


def test_verify_detects_tampering(converted):
    shard = converted / "aiu" / "model-00001-of-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01  # one bit of the last tensor's data; the header stays valid
    shard.unlink()  # break a hardlink to cpu/, if any: only aiu/ is tampered with
    shard.write_bytes(bytes(data))
    result = run("verify", converted, "--no-aiu-check")
    assert result.exit_code == 3, result.output
    assert "aiu/model-00001-of-00001.safetensors differs from the report (size or sha256)" in result.stderr
    assert "Fix: re-run `fp8convert convert --overwrite`" in result.stderr
    result = run("verify", converted, "--no-aiu-check", "--json")
    assert result.exit_code == 3
    error = json.loads(result.stdout)["error"]
    assert error["type"] == "VerificationError" and error["exit_code"] == 3
    assert any("aiu/model-00001-of-00001.safetensors differs" in p for p in error["problems"])


def test_verify_without_a_report(tmp_path):
    result = run("verify", tmp_path, "--no-aiu-check")
    assert result.exit_code == 1
    assert f"Error: {tmp_path / REPORT}: {REPORT} not found" in result.stderr


# ---- demo ----------------------------------------------------------------------------------------------
def test_demo_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    result = run("demo", tmp_path, "--json")
    assert result.exit_code == 1
    error = json.loads(result.stdout)["error"]
    assert error["type"] == "OutputError"
    assert error["message"] == "the demo directory is not empty" and error["hint"] == "pass --overwrite"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


def test_format_names_match_the_registry():
    from fp8convert.cli import FORMAT_NAMES
    from fp8convert.formats import REGISTRY

    assert sorted(FORMAT_NAMES) == sorted(REGISTRY)


def test_help_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys; from fp8convert.cli import main; assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0
