"""Imports point one way (docs/architecture.md): every module's imports are read with ``ast``.

    core/                          imports no package of the node
    config/, storage/              core/
    dicom_node/, inference/,       core/, config/, storage/ (and themselves)
    hl7_out/, delivery/
    api/, medgemma_node/           anything

Every ``import`` statement counts: at module level, inside functions, under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

GROUND = frozenset({"core"})
FOUNDATION = GROUND | {"config", "storage"}
STAGES = ("dicom_node", "inference", "hl7_out", "delivery")
ALLOWED: dict[str, frozenset[str]] = {
    "core": GROUND,
    "config": GROUND | {"config"},
    "storage": GROUND | {"storage"},
    **{stage: FOUNDATION | {stage} for stage in STAGES},
}
TOP_LEVEL = frozenset({*ALLOWED, "api", "medgemma_node"})  # the node's own packages
# Not part of the node: the tests, the benchmarks and the real-peer helpers they share.
SUPPORT = frozenset({"tests", "benchmarks", "peers"})


def project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) for every import of one of the node's packages in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.ImportFrom):  # relative: stays inside its own package
            continue
        else:
            continue
        found += [(node.lineno, name.split(".")[0]) for name in names]
    return sorted((line, package) for line, package in found if package in TOP_LEVEL)


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def violations(package: str) -> list[str]:
    allowed = ALLOWED[package]
    return [
        f"{path.relative_to(ROOT)}:{line} imports {imported}"
        for path in modules(package)
        for line, imported in project_imports(path)
        if imported not in allowed
    ]


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_its_layer_may(package: str) -> None:
    assert violations(package) == []


def test_the_rules_see_every_kind_of_import(tmp_path: Path) -> None:
    """The parser finds imports in functions, under TYPE_CHECKING, and as ``import a.b``."""
    source = tmp_path / "sample.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "import medgemma_node.cli\n"
        "if TYPE_CHECKING:\n"
        "    from inference.worker import InferenceWorker\n"
        "def later() -> None:\n"
        "    from storage import db\n"
        "from . import sibling\n"
        "import os\n",
        encoding="utf-8",
    )
    assert project_imports(source) == [(2, "medgemma_node"), (4, "inference"), (6, "storage")]


def test_every_layered_package_is_checked() -> None:
    """A new top-level package must be placed in a layer before it can be imported."""
    packages = {path.parent.name for path in ROOT.glob("*/__init__.py")}
    assert packages - TOP_LEVEL <= SUPPORT
    assert {"core", "config", "storage", "dicom_node", "inference", "hl7_out"} <= packages
