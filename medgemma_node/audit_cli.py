"""`medgemma-node audit export`: the audit trail as CSV or JSON Lines."""

from __future__ import annotations

import re
import sys
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from medgemma_node.cli_common import (
    ConfigOption,
    DataDirOption,
    errors,
    opened_database,
    settings_or_exit,
)
from storage import audit

app = typer.Typer(help="The audit trail (audit_events).", no_args_is_help=True)

RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


class ExportFormat(StrEnum):
    CSV = "csv"
    JSON = "json"


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """ISO 8601 (a date, or a time; without an offset it is UTC) or an age: 30m, 24h, 7d."""
    match = RELATIVE.match(text.strip())
    if match:
        amount = float(match.group(1))
        return (now or datetime.now(UTC)) - timedelta(**{UNITS[match.group(2)]: amount})
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise typer.BadParameter(
            f"{text!r} is neither ISO 8601 (2026-11-01, 2026-11-01T08:00:00+08:00) "
            "nor an age (30m, 24h, 7d)"
        ) from exc
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


@app.command("export")
def audit_export(
    since: Annotated[
        str, typer.Option(help="From this time: ISO 8601, or an age such as 24h or 7d")
    ] = "1d",
    export_format: Annotated[
        ExportFormat, typer.Option("--format", help="csv, or json (one object per line)")
    ] = ExportFormat.CSV,
    kind: Annotated[
        list[str] | None, typer.Option("--kind", help="Only this kind (repeatable)")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here instead of stdout")
    ] = None,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Audit events since a time, oldest first, with kind, outcome, actor, address, study."""
    start = parse_since(since)
    settings = settings_or_exit(config, data_dir=data_dir)
    with opened_database(settings) as db:
        events = audit.events_after(db, since=start, kinds=kind or ())
    lines = (
        audit.export_csv(events)
        if export_format == ExportFormat.CSV
        else (audit.export_json(events))
    )
    if output is None:
        for line in lines:
            sys.stdout.write(line)
    else:
        with output.open("w", encoding="utf-8", newline="") as handle:
            handle.writelines(lines)
    errors.print(f"{len(events)} audit event(s) since {start.isoformat()}")
