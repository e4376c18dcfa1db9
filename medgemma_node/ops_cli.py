"""Operator commands registered on the main app: `stop` (more below as they are added)."""

from __future__ import annotations

from typing import Annotated

import typer

from medgemma_node.cli_common import (
    ConfigOption,
    DataDirOption,
    console,
    errors,
    settings_or_exit,
)
from medgemma_node.pidfile import stop_node


def register(app: typer.Typer) -> None:
    app.command("stop")(stop)


def stop(
    timeout: Annotated[
        float, typer.Option(min=0, help="Seconds to wait for the node to exit")
    ] = 60.0,
    kill: Annotated[
        bool, typer.Option("--kill", help="SIGKILL the node if it has not exited in time")
    ] = False,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Stop `serve` on this data directory: SIGTERM (PID file), then wait for it to exit."""
    settings = settings_or_exit(config, data_dir=data_dir)
    result = stop_node(settings.storage.data_dir, timeout, kill=kill)
    if result.outcome == "not running":
        console.print("not running (no PID file)")
    elif result.outcome == "stale pid file":
        console.print(f"not running (stale PID file of pid {result.pid} removed)")
    elif result.outcome == "still running":
        errors.print(f"[red]pid {result.pid} still running after {timeout:.0f} s[/red]")
        raise typer.Exit(1)
    else:
        console.print(f"pid {result.pid} {result.outcome} after {result.waited_s:.1f} s")
