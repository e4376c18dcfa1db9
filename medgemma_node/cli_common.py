"""What every `medgemma-node` command module shares: the consoles, the --config and
--data-dir options, loading the settings and opening the database."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from config.settings import ConfigError, DicomSettings, NodeSettings, StorageSettings, load_settings
from medgemma_node.service import open_database
from storage.db import Database

console = Console()
# Errors are read by people and by scripts: never wrapped at the terminal width.
errors = Console(stderr=True, soft_wrap=True)

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML settings file (see node.example.toml)")
]
DataDirOption = Annotated[Path | None, typer.Option("--data-dir", help="Override storage.data_dir")]


@contextmanager
def opened_database(settings: NodeSettings) -> Iterator[Database]:
    """The node's database (schema upgraded if needed), disposed of afterwards."""
    db = open_database(settings)
    try:
        yield db
    finally:
        db.dispose()


def settings_or_exit(
    config: Path | None, *, port: int | None = None, data_dir: Path | None = None
) -> NodeSettings:
    """Load settings; command-line overrides beat the environment and the file."""
    try:
        settings = load_settings(config)
        if port is not None:
            settings.dicom = DicomSettings.model_validate(
                {**settings.dicom.model_dump(), "port": port}
            )
        if data_dir is not None:
            settings.storage = StorageSettings.model_validate(
                {**settings.storage.model_dump(), "data_dir": data_dir}
            )
    except (ConfigError, ValueError) as exc:
        errors.print(f"[red]configuration error[/red]\n{escape(str(exc))}")
        raise typer.Exit(2) from exc
    return settings
