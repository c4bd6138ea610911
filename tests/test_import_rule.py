"""The import rule (docs/ARCHITECTURE.md): data flows model -> data -> adapters -> train -> export/evaluate ->
commands -> cli, and nothing imports against it. Read from the package's own source, so a new import that
breaks the rule fails here, wherever it hides (inside a function too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "homebake"

# Lowest first. A unit (a top-level module or subpackage of homebake) may import only units of lower layers.
LAYERS = [
    ["__init__", "errors"],
    ["fsutil", "device", "default_model", "chat_template", "spm"],
    ["run_folder", "metrics", "tokenizer"],
    ["model", "run_lock"],
    ["data"],
    ["adapters"],
    ["sources", "generate"],
    ["train"],
    ["baselines", "drift", "gguf_eval"],
    ["evaluate", "export", "report"],
    ["demo"],
    ["commands"],
    ["cli"],
    ["__main__"],  # `python -m homebake` (torchrun -m homebake train): the CLI, one layer above it
]
LAYER_OF = {unit: index for index, units in enumerate(LAYERS) for unit in units}


def unit_of(module: str) -> str:
    """homebake.train.loop -> train; homebake -> __init__; a name defined in homebake/__init__ -> __init__."""
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    name = parts[1]
    if (PACKAGE / f"{name}.py").is_file() or (PACKAGE / name).is_dir():
        return name
    return "__init__"


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every homebake import in a file, relative ones resolved."""
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    module = ".".join(rel.parts)
    package = module[: -len(".__init__")] if module.endswith(".__init__") else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                if node.module:
                    found.append((node.lineno, ".".join(base + [node.module])))
                else:
                    found += [(node.lineno, ".".join(base + [alias.name])) for alias in node.names]
            else:
                found.append((node.lineno, node.module or ""))
    return [(line, name) for line, name in found if name == "homebake" or name.startswith("homebake.")]


def test_every_unit_has_a_layer():
    units = {p.stem for p in PACKAGE.glob("*.py")} | {p.name for p in PACKAGE.iterdir()
                                                        if p.is_dir() and (p / "__init__.py").is_file()}
    assert units - set(LAYER_OF) == set(), "add the new module to LAYERS (and docs/ARCHITECTURE.md)"


def test_imports_follow_the_flow():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = unit_of(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        for line, module in imports_of(path):
            imported = unit_of(module)
            if imported != importer and LAYER_OF[imported] >= LAYER_OF[importer]:
                violations.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {importer} imports {module}")
    assert violations == []


@pytest.mark.parametrize("source, expected", [
    ("from ..export.gguf import write_model_gguf\n", "homebake.export.gguf"),
    ("from . import loss\n", "homebake.train.loss"),
    ("import homebake.cli\n", "homebake.cli"),
])
def test_the_reader_resolves_imports(tmp_path, source, expected, monkeypatch):
    # the rule test is only as good as its import reader: relative imports resolve from train/
    fake = PACKAGE / "train" / "loop.py"
    monkeypatch.setattr(Path, "read_text", lambda self, encoding=None: source if self == fake else "")
    assert imports_of(fake) == [(1, expected)]
