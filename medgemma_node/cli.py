"""The `medgemma-node` command line."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from pydicom.errors import InvalidDicomError
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from config.settings import NodeSettings
from core.version import node_version
from delivery.worker import DeliveryWorker
from dicom_node.scu import AssociationFailed, FileToSend, echo, inspect_file, iter_files, send_files
from dicom_node.statuses import describe_status
from inference.prompts import PromptTemplateError, check_templates
from medgemma_node import audit_cli, jobs_cli, ops_cli
from medgemma_node.cli_common import (
    ConfigOption,
    DataDirOption,
    console,
    errors,
    opened_database,
    settings_or_exit,
)
from medgemma_node.logs import setup_logging
from medgemma_node.pidfile import AlreadyRunning, write_pid_file
from medgemma_node.predict_run import AnswerLanguage
from medgemma_node.runtime import read_runtime_state
from medgemma_node.service import (
    Node,
    delivery_worker,
    open_database,
    start_serving,
    start_worker,
)
from medgemma_node.status import collect_status, print_status, redact_url
from storage import outbox, users
from storage.db import Database
from storage.models import OutboxItem, OutboxStatus, UserRole

app = typer.Typer(help="DICOM node that runs MedGemma on received studies.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
app.add_typer(db_app, name="db")
outbox_app = typer.Typer(
    help="Results waiting for their destinations, sent, or given up on.", no_args_is_help=True
)
app.add_typer(outbox_app, name="outbox")
api_app = typer.Typer(help="REST API users and their bearer tokens.", no_args_is_help=True)
app.add_typer(api_app, name="api")
app.add_typer(jobs_cli.app, name="jobs")
app.add_typer(audit_cli.app, name="audit")


def _print_version(value: bool) -> None:
    if value:
        sys.stdout.write(f"medgemma-node {node_version()}\n")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit"
        ),
    ] = False,
) -> None:
    """DICOM node that runs MedGemma on received studies."""


def templates_or_exit(settings: NodeSettings) -> None:
    """The question templates the worker will load (shipped + model.prompts_dir) must load:
    a broken one is a configuration error now, not a worker restarting every minute."""
    try:
        check_templates(settings.model)
    except PromptTemplateError as exc:
        errors.print(f"[red]configuration error[/red]\n{escape(str(exc))}")
        raise typer.Exit(2) from exc


def pdf_fonts_or_exit(settings: NodeSettings) -> None:
    """When destinations want PDF reports, the fonts of the configured language must be
    installed: a clear error naming the Debian package rather than PDFs without text."""
    if not any(d.enabled and d.wants_pdf for d in settings.destinations):
        return
    from delivery.pdf_fonts import PdfFontMissing, check_pdf_fonts  # WeasyPrint loads later

    try:
        check_pdf_fonts(settings.model.language)
    except PdfFontMissing as exc:
        errors.print(f"[red]configuration error[/red]\n{escape(str(exc))}")
        raise typer.Exit(2) from exc


@app.command()
def serve(
    config: ConfigOption = None,
    port: Annotated[int | None, typer.Option(help="Override dicom.port")] = None,
    data_dir: DataDirOption = None,
) -> None:
    """Run the node: DICOM SCP, study completion, inference and delivery workers."""
    settings = settings_or_exit(config, port=port, data_dir=data_dir)
    templates_or_exit(settings)
    pdf_fonts_or_exit(settings)
    _run_node(Node(settings), lambda node: start_serving(node, config), pid_file=True)


@app.command()
def worker(config: ConfigOption = None, data_dir: DataDirOption = None) -> None:
    """Run only the inference worker (e.g. a second GPU box on the same PostgreSQL)."""
    settings = settings_or_exit(config, data_dir=data_dir)
    templates_or_exit(settings)
    _run_node(Node(settings, with_scp=False), start_worker)


@app.command(hidden=True)
def receive(
    index: Annotated[int, typer.Option(help="This receiver's number (serve is 0)")],
    port: Annotated[int, typer.Option(help="serve's DICOM port")],
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """One more process receiving on serve's port; started and supervised by serve."""
    settings = settings_or_exit(config, port=port, data_dir=data_dir)
    _run_node(Node(settings, receiver=index), lambda node: node.start())


def _run_node(node: Node, start: Callable[[Node], None], *, pid_file: bool = False) -> None:
    node.prepare()
    node.catch_signals()  # before the pid file: whoever reads it may signal at once
    if pid_file:
        # Before the parts start: `stop` can end a node that is still starting.
        try:
            node.pid_file = write_pid_file(node.data_dir)
        except AlreadyRunning as exc:
            errors.print(f"[red]cannot start:[/red] {escape(str(exc))}")
            raise typer.Exit(1) from exc
    try:
        start(node)
    except OSError as exc:
        errors.print(f"[red]cannot start:[/red] {exc}")
        node.stop()
        raise typer.Exit(1) from exc
    node.run_until_signal()


@app.command("demo-model")
def demo_model(
    path: Annotated[Path, typer.Argument(help="Directory to write the model into")],
) -> None:
    """Write the tiny random TEST model (offline; every output it makes is marked as a test)."""
    from inference.demo_model import write_demo_model  # torch: only for this command

    write_demo_model(path)
    console.print(f"demo TEST model written to {path} (not for clinical use)")


@app.command("validate-config")
def validate_config(config: ConfigOption = None) -> None:
    """Print the effective settings, or the errors naming each bad key."""
    settings = settings_or_exit(config)
    templates_or_exit(settings)
    console.print_json(settings.model_dump_json(indent=2))


@db_app.command("upgrade")
def db_upgrade(config: ConfigOption = None, data_dir: DataDirOption = None) -> None:
    """Create or migrate the database schema to the newest revision."""
    settings = settings_or_exit(config, data_dir=data_dir)
    db = Database(settings.database_url)
    db.upgrade()
    console.print(f"database at revision head: {redact_url(settings.database_url)}")


DEFAULT_CALLING_AET = "MEDGEMMA_SCU"
CallingAetOption = Annotated[
    str | None,
    typer.Option(
        "--aet",
        help="Calling AE title (default: dicom.ae_title with --config, "
        f"else {DEFAULT_CALLING_AET})",
    ),
]


def calling_aet_or_exit(aet: str | None, config: Path | None) -> str:
    """--aet, else the node's own AE title from --config, else the default."""
    if aet is not None:
        return aet
    if config is not None:
        return settings_or_exit(config).dicom.ae_title
    return DEFAULT_CALLING_AET


@app.command("echo")
def echo_command(
    host: str,
    port: int,
    aet: CallingAetOption = None,
    aec: Annotated[str, typer.Option(help="Called AE title")] = "ANY-SCP",
    config: ConfigOption = None,
) -> None:
    """C-ECHO a DICOM peer."""
    calling = calling_aet_or_exit(aet, config)
    try:
        status = echo(host, port, calling, aec)
    except AssociationFailed as exc:
        errors.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(1) from exc
    if status != 0:
        errors.print(f"[red]C-ECHO status {escape(describe_status(status))}[/red]")
        raise typer.Exit(1)
    console.print(f"C-ECHO {aec}@{host}:{port}: success")


@app.command()
def send(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders")],
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 11112,
    aec: Annotated[str, typer.Option(help="Called AE title")] = "MEDGEMMA",
    aet: CallingAetOption = None,
    config: ConfigOption = None,
) -> None:
    """C-STORE files and folders to a DICOM node, with a progress bar."""
    aet = calling_aet_or_exit(aet, config)
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
            errors.print(f"[red]{escape(str(exc))}[/red]")
            raise typer.Exit(1) from exc
    console.print(
        f"sent {len(summary.sent)}, warnings {len(summary.warnings)}, "
        f"failed {len(summary.failed)}, not accepted {len(summary.skipped)}"
    )
    for path, reason in [*summary.failed, *summary.skipped]:
        errors.print(f"  {escape(str(path))}: {escape(reason)}")
    if summary.failed or summary.skipped:
        raise typer.Exit(1)


@app.command()
def predict(
    paths: Annotated[list[Path], typer.Argument(help="Files and folders of DICOM, PNG, JPEG")],
    question: Annotated[
        list[str], typer.Option("--question", "-q", help="A question (repeatable)")
    ] = [],  # noqa: B006 - typer copies list defaults per call
    questions_file: Annotated[
        Path | None, typer.Option(help="More questions, one a line ('#' comments)")
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="JSONL results (resumed)")] = Path(
        "results.jsonl"
    ),
    language: Annotated[
        AnswerLanguage | None, typer.Option(help="Default: the question's, else model.language")
    ] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option(min=1, help="Default: interactive.max_new_tokens")
    ] = None,
    config: ConfigOption = None,
    api: Annotated[
        str | None, typer.Option(help="A running node's API URL: its priority lane answers")
    ] = None,
    token: Annotated[
        str | None, typer.Option(envvar="MEDGEMMA_NODE_TOKEN", help="Bearer token for --api")
    ] = None,
) -> None:
    """Ask questions about files and folders of images: one JSON line per (file, question)."""
    from medgemma_node.predict import PredictOptions, PredictRunError, predict_files, read_questions

    settings = settings_or_exit(config)
    try:
        questions = read_questions(question, questions_file)
    except OSError as exc:
        errors.print(f"[red]cannot read {escape(str(questions_file))}: {exc.strerror}[/red]")
        raise typer.Exit(2) from exc
    if not questions:
        errors.print("[red]no question: give --question TEXT or --questions-file FILE[/red]")
        raise typer.Exit(2)
    if api is None:
        templates_or_exit(settings)
    lang = language.value if language is not None else None
    options = PredictOptions(paths, questions, out, lang, max_new_tokens, api, token)
    try:
        status = predict_files(settings, options, errors)
    except PredictRunError as exc:
        errors.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(1) from exc
    raise typer.Exit(status)


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
        print_status(report, console)
    if not report["scp"].get("echo_ok"):
        raise typer.Exit(3)


# ---------------------------------------------------------------------------------------------
# outbox: list, retry, purge, deliver


@outbox_app.command("list")
def outbox_list(
    status: Annotated[OutboxStatus | None, typer.Option(help="Only rows in this state")] = None,
    destination: Annotated[str | None, typer.Option(help="Only rows for this destination")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many rows, newest first")] = 200,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Show outbox rows: destination, state, attempts, next attempt or sent time, last error."""
    settings = settings_or_exit(config, data_dir=data_dir)
    with opened_database(settings) as db:
        items = outbox.list_items(db, status, destination, limit)
    if as_json:
        rows = [_outbox_row(item) for item in items]
        sys.stdout.write(json.dumps(rows, indent=2, default=str) + "\n")
    elif items:
        console.print(_outbox_table(items))
    else:
        console.print("no outbox rows")


def _outbox_row(item: OutboxItem) -> dict[str, Any]:
    keys = (
        "id", "report_id", "destination", "kind", "status", "attempts", "message_id",
        "next_attempt_at", "sent_at", "created_at", "last_error", "payload_path", "lease_owner",
    )  # fmt: skip
    return {key: getattr(item, key) for key in keys}


def _outbox_table(items: list[OutboxItem]) -> Table:
    table = Table("id", "report", "destination", "kind", "status", "tries", "when")
    table.add_column("message id", overflow="fold")
    table.add_column("last error", overflow="fold")
    colours = {OutboxStatus.PENDING: "yellow", OutboxStatus.SENT: "green", OutboxStatus.DEAD: "red"}
    for item in items:
        colour = colours.get(OutboxStatus(item.status), "white")
        when = item.sent_at if item.status == OutboxStatus.SENT else item.next_attempt_at
        table.add_row(
            str(item.id),
            str(item.report_id),
            escape(item.destination),
            item.kind,
            f"[{colour}]{item.status}[/{colour}]",
            str(item.attempts),
            _short_time(when),
            escape(item.message_id),
            escape((item.last_error or "")[:200]),
        )
    return table


def _short_time(value: datetime | None) -> str:
    return value.strftime("%m-%d %H:%M:%S") if value is not None else ""


@outbox_app.command("retry")
def outbox_retry(
    item_id: Annotated[int | None, typer.Argument(help="The outbox row id")] = None,
    dead: Annotated[bool, typer.Option("--dead", help="Every dead row")] = False,
    destination: Annotated[
        str | None, typer.Option(help="With --dead: only this destination's rows")
    ] = None,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Make a row (or every dead row) pending again, due now, with its attempts reset."""
    if (item_id is None) == (not dead):
        errors.print("[red]give either an outbox row id or --dead[/red]")
        raise typer.Exit(2)
    settings = settings_or_exit(config, data_dir=data_dir)
    with opened_database(settings) as db:
        if dead:
            count = outbox.retry_dead(db, destination)
            console.print(f"{count} dead row(s) pending again")
            return
        assert item_id is not None
        before = outbox.retry_item(db, item_id)
    if before is None:
        errors.print(f"[red]no outbox row {item_id}[/red]")
        raise typer.Exit(1)
    if before == OutboxStatus.SENT:
        errors.print(f"[yellow]outbox row {item_id} was already sent; left as it is[/yellow]")
        raise typer.Exit(1)
    console.print(f"outbox row {item_id} ({before}) pending again, due now")


@outbox_app.command("purge")
def outbox_purge(
    older_than: Annotated[
        float, typer.Option("--older-than", min=0, help="Delete SENT rows sent over DAYS ago")
    ],
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Delete sent rows older than DAYS. Pending and dead rows are never deleted."""
    settings = settings_or_exit(config, data_dir=data_dir)
    with opened_database(settings) as db:
        count = outbox.purge_sent(db, timedelta(days=older_than))
    console.print(f"{count} sent row(s) deleted")


@outbox_app.command("deliver")
def outbox_deliver(
    once: Annotated[bool, typer.Option("--once", help="Send what is due now, then exit")] = False,
    poll_interval: Annotated[
        float | None,
        typer.Option(min=0.01, help="Seconds between looks [default: delivery.poll_interval_s]"),
    ] = None,
    lease_seconds: Annotated[
        float, typer.Option(min=1, help="A claimed row returns to others after this long")
    ] = 300.0,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Run the delivery worker alone (in the foreground, until SIGTERM or Ctrl-C)."""
    settings = settings_or_exit(config, data_dir=data_dir)
    setup_logging(
        settings.logging.level,
        settings.logging.file or settings.storage.data_dir / "logs" / "node.log",
    )
    db = open_database(settings)
    if db.is_sqlite and _serving_pid(settings.storage.data_dir) is not None:
        errors.print("[red]`serve` is running on this SQLite database and delivers already[/red]")
        db.dispose()
        raise typer.Exit(1)
    worker = delivery_worker(
        settings,
        db,
        poll_interval_s=poll_interval or settings.delivery.poll_interval_s,
        lease_s=lease_seconds,
    )
    try:
        if once:
            console.print(f"{worker.deliver_once()} row(s) handled")
            return
        _run_worker_until_signal(worker)
    finally:
        db.dispose()


def _run_worker_until_signal(worker: DeliveryWorker) -> None:
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    worker.start()
    try:
        while not stop.wait(1.0):
            pass
    finally:
        worker.stop()


def _serving_pid(data_dir: Path) -> int | None:
    state = read_runtime_state(data_dir)
    pid = (state or {}).get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


# ---------------------------------------------------------------------------------------------
# api: users of the REST API


@api_app.command("add-user")
def api_add_user(
    name: Annotated[str, typer.Argument(metavar="NAME", help="User name (in the audit trail)")],
    role: Annotated[UserRole, typer.Option(help="viewer: read; radiologist: ask; admin: all")],
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Create a user; the new bearer token is the last line of the output (shown only once)."""
    settings = settings_or_exit(config, data_dir=data_dir)
    with opened_database(settings) as db:
        try:
            token = users.create_user(db, name, role)
        except users.UserError as exc:
            errors.print(f"[red]{escape(str(exc))}[/red]")
            raise typer.Exit(1) from exc
    console.print(f"user {escape(name.strip())} ({role.value}) created; its bearer token:")
    # Plain write, never wrapped: scripts take the last line.
    sys.stdout.write(token + "\n")


@api_app.command("list-users")
def api_list_users(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Users, their roles, and when they were created or revoked (never their tokens)."""
    settings = settings_or_exit(config, data_dir=data_dir)
    with opened_database(settings) as db:
        found = users.list_users(db)
    if as_json:
        rows = [
            {
                "name": u.name,
                "role": u.role.value,
                "active": u.active,
                "created_at": u.created_at,
                "revoked_at": u.revoked_at,
            }
            for u in found
        ]
        sys.stdout.write(json.dumps(rows, indent=2, default=str) + "\n")
        return
    if not found:
        console.print("no users")
        return
    table = Table("name", "role", "created", "revoked")
    for user in found:
        revoked = _short_time(user.revoked_at) if user.revoked_at else ""
        table.add_row(escape(user.name), user.role.value, _short_time(user.created_at), revoked)
    console.print(table)


@api_app.command("revoke-user")
def api_revoke_user(
    name: Annotated[str, typer.Argument(metavar="NAME", help="User name")],
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Revoke a user's token at once (the user stays in the audit trail)."""
    settings = settings_or_exit(config, data_dir=data_dir)
    with opened_database(settings) as db:
        revoked = users.revoke_user(db, name)
    if not revoked:
        errors.print(f"[red]no active user {escape(name)}[/red]")
        raise typer.Exit(1)
    console.print(f"user {escape(name)} revoked")


ops_cli.register(app)  # stop, prune, self-check: listed after the commands above

if __name__ == "__main__":
    app()
