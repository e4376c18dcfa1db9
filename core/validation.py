"""One wording for pydantic validation errors: one ``key.path: message`` per problem.

Used wherever a file or request is checked against a pydantic model (config/settings.py,
inference/prompts.py), so every such error names the bad key the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


def format_validation_error(
    exc: ValidationError, *, separator: str = "\n", root: str = "(root)"
) -> str:
    """Each error as ``dotted.location: message``; ``root`` names an error on the whole input."""
    return separator.join(
        f"{'.'.join(str(part) for part in error['loc']) or root}: {error['msg']}"
        for error in exc.errors()
    )
