"""The package layers and the directions their imports may point (see ``docs/design.md``).

Every ``import`` statement in the project's packages is parsed (including imports inside functions),
and each must name a package at the same or a lower layer that this table allows. A new package
must be added here, which forces a decision about where it sits.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# package -> the project packages it may import (besides itself)
ALLOWED: dict[str, set[str]] = {
    "cloc_hf": set(),
    "cloc_data": {"cloc_hf"},
    "llava_bridge": {"cloc_hf"},
    "training": {"cloc_hf", "cloc_data", "llava_bridge"},
    "eval": {"cloc_hf", "cloc_data", "llava_bridge"},
    "model_cards": {"cloc_hf", "eval"},
    "cloc_demo": {"cloc_hf", "cloc_data", "llava_bridge", "training", "eval", "model_cards"},
    "benchmarks": {"cloc_hf", "cloc_data", "llava_bridge", "training", "eval"},
}
PROJECT = set(ALLOWED)


def _imported_packages(path: Path) -> list[tuple[int, str]]:
    """(line, top-level project package) for every absolute import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top in PROJECT:
                found.append((node.lineno, top))
    return found


def _relative_escapes(path: Path, package: str) -> list[int]:
    """Lines of relative imports that climb above the file's own top-level package."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    depth = len(path.relative_to(ROOT / package).parts) - 1  # folders below the package root
    return [n.lineno for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level > depth + 1]


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_every_package_is_placed():
    on_disk = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert on_disk - PROJECT == set(), "a new top-level package needs a row in ALLOWED (and docs/design.md)"


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_down(package):
    bad = []
    for path in _modules(package):
        for line, top in _imported_packages(path):
            if top != package and top not in ALLOWED[package]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {top}")
        bad += [f"{path.relative_to(ROOT)}:{line} relative import leaves {package}"
                for line in _relative_escapes(path, package)]
    assert not bad, f"{package} may import only {sorted(ALLOWED[package])}:\n" + "\n".join(bad)


def test_nothing_imports_the_main_job():
    users = [
        f"{path.relative_to(ROOT)}:{line}"
        for package in sorted(PROJECT - {"cloc_demo"})
        for path in _modules(package)
        for line, top in _imported_packages(path)
        if top == "cloc_demo"
    ]
    assert not users, users


def test_checker_catches_an_upward_import(tmp_path, monkeypatch):
    """The checker itself must fail on a violation (guards against a test that cannot fail)."""
    fake = tmp_path / "cloc_hf"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "bad.py").write_text("def f():\n    from training.pretrain import Trainer\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    with pytest.raises(AssertionError, match="imports training"):
        test_imports_point_down("cloc_hf")
