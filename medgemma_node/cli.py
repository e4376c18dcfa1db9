"""The `medgemma-node` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from pydicom.errors import InvalidDicomError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import func, select

from config.settings import ConfigError, DicomSettings, NodeSettings, StorageSettings, load_settings
from dicom_node.scu import AssociationFailed, FileToSend, echo, inspect_file, iter_files, send_files
from medgemma_node.service import Node, open_database, read_runtime_state
from storage.db import Database
from storage.files import free_disk_mb
from storage.models import Instance, Job, Study

app = typer.Typer(help="DICOM node that runs MedGemma on received studies.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
app.add_typer(db_app, name="db")

console = Console()
errors = Console(stderr=True)

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML settings file (see node.example.toml)")
]
DataDirOption = Annotated[Path | None, typer.Option("--data-dir", help="Override storage.data_dir")]


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
        errors.print(f"[red]configuration error[/red]\n{exc}")
        raise typer.Exit(2) from exc
    return settings


@app.command()
def serve(
    config: ConfigOption = None,
    port: Annotated[int | None, typer.Option(help="Override dicom.port")] = None,
    data_dir: DataDirOption = None,
) -> None:
    """Run the node: DICOM SCP, study completion, inference and delivery workers."""
    settings = settings_or_exit(config, port=port, data_dir=data_dir)
    node = Node(settings)
    node.prepare()
    try:
        node.start()
    except OSError as exc:
        errors.print(f"[red]cannot start:[/red] {exc}")
        node.stop()
        raise typer.Exit(1) from exc
    node.run_until_signal()


@app.command("validate-config")
def validate_config(config: ConfigOption = None) -> None:
    """Print the effective settings, or the errors naming each bad key."""
    settings = settings_or_exit(config)
    console.print_json(settings.model_dump_json(indent=2))


@db_app.command("upgrade")
def db_upgrade(config: ConfigOption = None, data_dir: DataDirOption = None) -> None:
    """Create or migrate the database schema to the newest revision."""
    settings = settings_or_exit(config, data_dir=data_dir)
    db = Database(settings.database_url)
    db.upgrade()
    console.print(f"database at revision head: {_redact_url(settings.database_url)}")


@app.command("echo")
def echo_command(
    host: str,
    port: int,
    aet: Annotated[str, typer.Option(help="Calling AE title")] = "MEDGEMMA_SCU",
    aec: Annotated[str, typer.Option(help="Called AE title")] = "ANY-SCP",
) -> None:
    """C-ECHO a DICOM peer."""
    try:
        status = echo(host, port, aet, aec)
    except AssociationFailed as exc:
        errors.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    if status != 0:
        errors.print(f"[red]C-ECHO status 0x{status:04X}[/red]")
        raise typer.Exit(1)
    console.print(f"C-ECHO {aec}@{host}:{port}: success")


@app.command()
def send(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders")],
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 11112,
    aec: Annotated[str, typer.Option(help="Called AE title")] = "MEDGEMMA",
    aet: Annotated[str, typer.Option(help="Calling AE title")] = "MEDGEMMA_SCU",
) -> None:
    """C-STORE files and folders to a DICOM node, with a progress bar."""
    files = _inspect_all(iter_files(paths))
    if not files:
        errors.print("[red]no DICOM files to send[/red]")
        raise typer.Exit(1)
    with Progress(
        TextColumn("sending"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=errors,
    ) as progress:
        task = progress.add_task("send", total=len(files))
        try:
            summary = send_files(
                files, host, port, aet, aec, progress=lambda *_: progress.advance(task)
            )
        except AssociationFailed as exc:
            errors.print(f"[red]{exc}[/red]")
            raise typer.Exit(1) from exc
    console.print(
        f"sent {len(summary.sent)}, warnings {len(summary.warnings)}, "
        f"failed {len(summary.failed)}, not accepted {len(summary.skipped)}"
    )
    for path, reason in [*summary.failed, *summary.skipped]:
        errors.print(f"  {path}: {reason}")
    if summary.failed or summary.skipped:
        raise typer.Exit(1)


def _inspect_all(paths: list[Path]) -> list[FileToSend]:
    files = []
    for path in paths:
        try:
            files.append(inspect_file(path))
        except InvalidDicomError as exc:
            errors.print(f"[yellow]skipped[/yellow] {exc}")
    return files


@app.command()
def status(
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Show the node: listening address, C-ECHO to itself, queue counts, disk free."""
    settings = settings_or_exit(config, data_dir=data_dir)
    report = collect_status(settings)
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2, default=str) + "\n")
    else:
        _print_status(report)
    if not report["scp"].get("echo_ok"):
        raise typer.Exit(3)


def collect_status(settings: NodeSettings) -> dict[str, Any]:
    data_dir = settings.storage.data_dir
    runtime = read_runtime_state(data_dir)
    port = (runtime or {}).get("scp", {}).get("port", settings.dicom.port)
    host = (
        "127.0.0.1"
        if settings.dicom.bind_address in ("0.0.0.0", "::")
        else settings.dicom.bind_address
    )
    scp: dict[str, Any] = {"ae_title": settings.dicom.ae_title, "host": host, "port": port}
    try:
        scp["echo_ok"] = echo(host, port, "MEDGEMMA_STATUS", settings.dicom.ae_title) == 0
    except (AssociationFailed, OSError, RuntimeError) as exc:
        scp["echo_ok"] = False
        scp["echo_error"] = str(exc)
    return {
        "scp": scp,
        "process": runtime,
        "database": _database_counts(settings),
        "disk_free_mb": round(free_disk_mb(data_dir), 1),
        "disk_watermark_mb": settings.storage.min_free_disk_mb,
    }


def _database_counts(settings: NodeSettings) -> dict[str, Any]:
    try:
        db = open_database(settings)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    try:
        with db.session() as session:
            jobs = dict(
                session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
            )
            return {
                "url": _redact_url(settings.database_url),
                "studies": session.scalar(select(func.count()).select_from(Study)),
                "instances": session.scalar(select(func.count()).select_from(Instance)),
                "jobs": jobs,
            }
    finally:
        db.dispose()


def _print_status(report: dict[str, Any]) -> None:
    table = Table(show_header=False)
    scp = report["scp"]
    echo_text = (
        "[green]ok[/green]"
        if scp.get("echo_ok")
        else f"[red]failed[/red] {scp.get('echo_error', '')}"
    )
    table.add_row(
        "DICOM SCP", f"{scp['ae_title']} @ {scp['host']}:{scp['port']}  C-ECHO {echo_text}"
    )
    process = report["process"]
    table.add_row(
        "process",
        f"pid {process['pid']} since {process['started_at']}" if process else "not running",
    )
    database = report["database"]
    if "error" in database:
        table.add_row("database", f"[red]{database['error']}[/red]")
    else:
        table.add_row("database", database["url"])
        table.add_row("studies / instances", f"{database['studies']} / {database['instances']}")
        table.add_row(
            "jobs", ", ".join(f"{k}: {v}" for k, v in sorted(database["jobs"].items())) or "none"
        )
    table.add_row(
        "disk free", f"{report['disk_free_mb']:.0f} MB (watermark {report['disk_watermark_mb']} MB)"
    )
    console.print(table)


def _redact_url(url: str) -> str:
    """Hide a password in a database URL."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        credentials, host = rest.rsplit("@", 1)
        user = credentials.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in credentials else url
    return url


if __name__ == "__main__":
    app()
