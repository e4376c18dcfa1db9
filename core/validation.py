"""One wording for pydantic validation errors: one ``key.path: message`` per problem.

Used wherever a file or request is checked against a pydantic model (config/settings.py,
inference/prompts.py), so every such error names the bad key the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


def format_validation_error(
    exc: ValidationError, *, separator: str = "\n", root: str = "(root)"
) -> str:
    """Each error as ``dotted.location: message``; ``root`` names an error on the whole input."""
    return separator.join(
        f"{error_key(error['loc'], root)}: {error['msg']}" for error in exc.errors()
    )


def error_key(location: Sequence[object], root: str = "(root)") -> str:
    """The bad key as written in the file: ``destinations.0.port``; ``root`` for the input."""
    return ".".join(str(part) for part in location) or root
