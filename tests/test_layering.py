"""Imports point one way (docs/architecture.md): every module's imports are read with ``ast``.

    core/                          imports no package of the node
    config/, storage/              core/
    dicom_node/, inference/,       core/, config/, storage/ (and themselves)
    hl7_out/, delivery/
    api/, medgemma_node/           anything

Every ``import`` statement counts: at module level, inside functions, under ``TYPE_CHECKING``.

No Python file of the project (tests and benchmarks included) is longer than MAX_MODULE_LINES.
"""

from __future__ import annotations

import ast
import os
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
MAX_MODULE_LINES = 600
# Not the project's files: the virtual environment, caches, version control.
NOT_PROJECT = frozenset({".venv", "venv", "node_modules", "__pycache__"})


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


def python_files(root: Path) -> list[Path]:
    """Every .py file under ``root`` but those of NOT_PROJECT and hidden folders (.git, caches)."""
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [
            name for name in subfolders if name not in NOT_PROJECT and not name.startswith(".")
        ]
        found += [Path(folder) / name for name in files if name.endswith(".py")]
    return sorted(found)


def overlong_files(root: Path) -> list[str]:
    """``path: n lines`` for each Python file over MAX_MODULE_LINES."""
    found = []
    for path in python_files(root):
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_MODULE_LINES:
            found.append(f"{path.relative_to(root)}: {lines} lines")
    return found


def test_no_python_file_is_over_the_line_limit() -> None:
    """Split a file that grows past the limit into cohesive modules."""
    assert overlong_files(ROOT) == []


def test_the_line_limit_names_each_long_file_and_skips_the_venv(tmp_path: Path) -> None:
    long_text = "x = 1\n" * (MAX_MODULE_LINES + 1)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "long.py").write_text(long_text, encoding="utf-8")
    (tmp_path / "pkg" / "short.py").write_text("x = 1\n" * MAX_MODULE_LINES, encoding="utf-8")
    (tmp_path / ".venv" / "lib").mkdir(parents=True)
    (tmp_path / ".venv" / "lib" / "vendored.py").write_text(long_text, encoding="utf-8")
    assert overlong_files(tmp_path) == [f"pkg/long.py: {MAX_MODULE_LINES + 1} lines"]
