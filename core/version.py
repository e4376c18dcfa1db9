"""The node's version: the installed distribution's, else pyproject.toml's (a source tree)."""

from __future__ import annotations

import re
from functools import cache
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "medgemma-node"


@cache
def node_version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        pass
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        match = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.MULTILINE)
    except OSError:
        match = None
    return match.group(1) if match else "unknown"
