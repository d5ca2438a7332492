"""Every registered reader has a fixture builder, and every builder's default output is detected as its
own layout and converts."""

from __future__ import annotations

from pathlib import Path

import pytest

from fp8convert.formats import REGISTRY, open_source
from fp8convert.pipeline import ConvertOptions, convert
from fp8convert.spec import Target

from fixtures import BUILDERS


def test_every_reader_has_a_fixture_builder() -> None:
    assert set(REGISTRY) <= set(BUILDERS), f"readers without a fixture builder: {set(REGISTRY) - set(BUILDERS)}"


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_builder_output_is_detected_and_converts(name: str, tmp_path: Path) -> None:
    src = BUILDERS[name](tmp_path / "src")
    _ckpt, _config, reader, plan = open_source(src)
    assert reader.name == name == plan.format
    report = convert(src, tmp_path / "out", ConvertOptions(targets=frozenset({Target.CPU})))
    assert report["source"]["format"] == name and report["summary"]["linears"] > 0
