"""Operator commands registered on the main app: `stop`, `prune`, `self-check`."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer
from rich.table import Table

from medgemma_node.cli_common import (
    ConfigOption,
    DataDirOption,
    console,
    errors,
    opened_database,
    settings_or_exit,
)
from medgemma_node.pidfile import stop_node
from medgemma_node.retention_part import Pruner
from medgemma_node.self_check import run_checks
from storage.retention import MB


def register(app: typer.Typer) -> None:
    app.command("stop")(stop)
    app.command("prune")(prune)
    app.command("self-check")(self_check)


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


def prune(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would be deleted, delete nothing")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Delete the files [retention] allows: settled studies past their age, and the oldest
    settled ones while free disk is below the target. Every prune is audited."""
    settings = settings_or_exit(config, data_dir=data_dir)
    with opened_database(settings) as db:
        pruner = Pruner(settings, db)
        actions = pruner.plan() if dry_run else pruner.prune("cli")
    if as_json:
        rows = [action.as_dict() for action in actions]
        sys.stdout.write(json.dumps({"dry_run": dry_run, "studies": rows}, indent=2) + "\n")
        return
    if actions:
        table = Table("study", "settled", "why", "instances", "reports", "MB")
        for action in actions:
            table.add_row(
                action.study_uid,
                action.settled_at.strftime("%Y-%m-%d %H:%M"),
                action.reason,
                str(len(action.instance_ids)),
                str(len(action.report_ids)),
                f"{action.bytes / MB:.1f}",
            )
        console.print(table)
    total = sum(action.bytes for action in actions) / MB
    verb = "would prune" if dry_run else "pruned"
    console.print(f"{verb} {len(actions)} study(ies), {total:.1f} MB")


def self_check(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """How this installation handles data; exits 1 on unsafe settings."""
    settings = settings_or_exit(config, data_dir=data_dir)
    report = run_checks(settings)
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        _print_self_check(report)
    if report["unsafe"]:
        raise typer.Exit(1)


def _print_self_check(report: dict[str, Any]) -> None:
    colours = {"ok": "green", "warn": "yellow", "unsafe": "bold red"}
    table = Table("", "setting", "finding")
    for finding in report["findings"]:
        colour = colours[finding["level"]]
        table.add_row(
            f"[{colour}]{finding['level']}[/{colour}]", finding["topic"], finding["message"]
        )
    console.print(table)
    console.print("data flows:")
    for flow in report["data_flows"]:
        console.print(f"  {flow}")
    console.print("versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()))
    if report["unsafe"]:
        errors.print(f"[red]{report['unsafe']} unsafe setting(s)[/red]")
