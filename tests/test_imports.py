"""The layering rule (STYLE.md 2.1): who may import what, checked on the source with ast."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "fp8convert"
#: third-party modules each package module may import (stdlib and torch/safetensors are always allowed)
ONLY_IN = {
    "click": {"cli", "cli_hub"},
    "tqdm": {"pipeline"},
    "huggingface_hub": {"hub"},
    "yaml": {"recipe"},
    "transformers": {"fakequant"},
    "fms": {"verify"},
    "fms_mo": {"verify"},
    "tokenizers": {"verify"},
}
#: package modules that may not import these package modules
FORBIDDEN = {
    "spec": {"numerics", "shards", "formats", "normalize", "writers", "pipeline", "cli", "verify"},
    "numerics": {"shards", "formats", "normalize", "writers", "pipeline", "cli"},
    "normalize": {"shards", "formats", "writers", "pipeline", "cli"},
    "fakequant": {"shards", "formats", "normalize", "writers", "pipeline", "cli"},
    "pipeline": {"cli"},
    "verify": {"pipeline", "cli"},
    "writers": {"formats", "pipeline", "cli"},
    "formats": {"normalize", "writers", "pipeline", "cli"},
}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_layering() -> None:
    problems = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).with_suffix("")
        name = rel.parts[0] if rel.parts[0] in ("formats", "writers") else rel.stem
        for imp in _imports(path):
            top = imp.split(".")[0]
            if top in ONLY_IN and name not in ONLY_IN[top]:
                problems.append(f"{rel} imports {imp}")
            if top == "fp8convert" and len(imp.split(".")) > 1:
                target = imp.split(".")[1]
                if target in FORBIDDEN.get(name, set()):
                    problems.append(f"{rel} imports {imp}")
    assert not problems


def test_no_module_over_500_lines() -> None:
    long = {str(p.relative_to(PKG)): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > 500}
    assert not long


def test_nothing_reads_shared() -> None:
    root = PKG.parent
    hits = [
        str(p.relative_to(root))
        for d in ("fp8convert", "tests")
        for p in (root / d).rglob("*.py")
        if p != Path(__file__).resolve() and any(m in p.read_text() for m in ("../" + "shared", "work/" + "shared"))
    ]
    assert not hits
