"""Detection: adjacent layouts refused by name, unknown and ambiguous checkpoints, forced formats,
pickle/GGUF-only repos, and HF files preferred over Mistral consolidated files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fp8convert import formats
from fp8convert.errors import AmbiguousFormatError, CheckpointError, UnknownFormatError, UnsupportedSchemeError
from fp8convert.formats import detect_format, open_source
from fp8convert.formats.base import Detection
from fp8convert.pipeline import convert
from fp8convert.shards import Checkpoint


@pytest.fixture
def src(make_ct) -> Path:
    return make_ct("FP8_DYNAMIC", hidden=64, intermediate=128, vocab=64)


def _set_qc(src: Path, qc: dict | None, **extra: object) -> None:
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config")
    if qc is not None:
        config["quantization_config"] = qc
    config.update(extra)
    (src / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("qc", "extra", "message"),
    [
        (
            {"quant_method": "torchao", "quant_type": {"default": {"_type": "Float8WeightOnlyConfig"}}},
            {},
            "torchao .* stores tensor subclasses",
        ),
        ({"quant_method": "mxfp8"}, {}, "MXFP8 .* e8m0 exponent per 32 weights"),
        ({"quant_method": "modelopt", "quant_algo": "MXFP8"}, {}, "MXFP8"),
        ({"quant_method": "compressed-tensors", "format": "mxfp8-quantized", "config_groups": {}}, {}, "MXFP8"),
        (
            {"quant_method": "fp8", "expert_dtype": "fp4", "weight_block_size": [128, 128]},
            {},
            "DeepSeek-V4 native .* FP4",
        ),
        ({"quant_method": "fp8"}, {"model_type": "deepseek_v4"}, "DeepSeek-V4"),
        ({"quant_method": "gptq", "bits": 4}, {}, "GPTQ .* is not an FP8 layout"),
        ({"quant_method": "awq"}, {}, "AWQ .* is not an FP8 layout"),
        (None, {"use_fp8_e4m3": True}, "use_fp8_e4m3.*private FP8 layout"),
    ],
    ids=[
        "torchao",
        "mxfp8",
        "modelopt-mxfp8",
        "ct-mxfp8",
        "deepseek-v4",
        "deepseek-v4-type",
        "gptq",
        "awq",
        "friendli",
    ],
)
def test_adjacent_layouts_are_refused_by_name(src: Path, tmp_path: Path, qc, extra, message: str) -> None:
    _set_qc(src, qc, **extra)
    with pytest.raises(UnsupportedSchemeError, match=message) as info:
        convert(src, tmp_path / "out")
    assert "unsupported layout" in info.value.message and "fp8 tensors" in info.value.problems[0]
    assert not (tmp_path / "out").exists()
    with pytest.raises(UnsupportedSchemeError, match=message):  # forcing a reader does not bypass it
        open_source(src, "compressed-tensors")


def test_no_quantization_config_is_unknown_with_evidence(src: Path) -> None:
    _set_qc(src, None)
    with pytest.raises(UnknownFormatError) as info:
        open_source(src)
    text = info.value.render()
    assert "no supported FP8 layout recognised" in text and "config.json has no quantization_config" in text
    assert "float8_e4m3fn x14" in text and "weight_scale" in text
    assert "compressed-tensors" in info.value.hint


def test_forced_format_mismatch(src: Path) -> None:
    _set_qc(src, {"quant_method": "something-else"})
    with pytest.raises(UnknownFormatError, match="--format compressed-tensors was given"):
        open_source(src, "compressed-tensors")


def test_ambiguous_detection_suggests_format(src: Path, monkeypatch) -> None:
    class Greedy:
        name = "greedy"
        description = "claims everything"

        def detect(self, ckpt, config):
            return Detection(format="greedy", rule="always")

    monkeypatch.setitem(formats.REGISTRY, "greedy", Greedy())
    ckpt = Checkpoint(src)
    with pytest.raises(AmbiguousFormatError) as info:
        detect_format(ckpt, ckpt.config())
    assert "several layouts match" in info.value.message and "--format NAME" in info.value.hint
    assert any(p.startswith("compressed-tensors:") for p in info.value.problems)
    assert detect_format(ckpt, ckpt.config(), forced="compressed-tensors")[0].name == "compressed-tensors"


@pytest.mark.parametrize("files", [["pytorch_model.bin"], ["model-q8_0.gguf", "model.pt"]])
def test_pickle_or_gguf_only_repo(tmp_path: Path, files: list[str]) -> None:
    (tmp_path / "config.json").write_text("{}")
    for f in files:
        (tmp_path / f).write_bytes(b"\x80\x04not read")
    with pytest.raises(CheckpointError, match="no \\*.safetensors files found; only") as info:
        Checkpoint(tmp_path)
    assert all(f in info.value.message for f in files) and "never unpickles" in info.value.hint


def test_hf_files_win_over_consolidated(src: Path) -> None:
    (src / "consolidated.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    assert Checkpoint(src).files == ["model.safetensors"]
    (src / "model.safetensors").rename(src / "consolidated-only.safetensors")
    (src / "consolidated.safetensors").unlink()
    assert Checkpoint(src).files == ["consolidated-only.safetensors"]
