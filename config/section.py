"""The base of every settings table (config/settings.py, config/ops_settings.py,
config/openai_settings.py)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A settings table: a misspelt key is an error, not a silently ignored line."""

    model_config = ConfigDict(extra="forbid")
