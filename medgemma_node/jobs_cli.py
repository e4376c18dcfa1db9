"""`medgemma-node jobs list / retry / cancel`: the inference job queue for operators."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from medgemma_node.cli_common import (
    ConfigOption,
    DataDirOption,
    console,
    errors,
    opened_database,
    settings_or_exit,
)
from storage.jobs import JobRow, cancel_job, list_jobs, retry_job
from storage.models import JobStatus

app = typer.Typer(help="Inference jobs: list, queue again, cancel.", no_args_is_help=True)

OPERATOR = "cli"  # the actor of audit rows written by these commands
COLOURS = {
    JobStatus.QUEUED: "yellow",
    JobStatus.RUNNING: "cyan",
    JobStatus.DONE: "green",
    JobStatus.FAILED: "red",
    JobStatus.CANCELLED: "magenta",
}


@app.command("list")
def jobs_list(
    status: Annotated[JobStatus | None, typer.Option(help="Only jobs in this state")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many, newest first")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Jobs newest first: study, version, state, attempts, when due, last error."""
    settings = settings_or_exit(config, data_dir=data_dir)
    with opened_database(settings) as db:
        rows, total = list_jobs(db, status, limit)
    if as_json:
        sys.stdout.write(json.dumps([job_dict(row) for row in rows], indent=2, default=str) + "\n")
        return
    if not rows:
        console.print("no jobs")
        return
    console.print(_table(rows))
    if total > len(rows):
        console.print(f"{len(rows)} of {total} shown (--limit)")


def job_dict(row: JobRow) -> dict[str, Any]:
    job = row.job
    return {
        "id": job.id,
        "study_instance_uid": row.study_instance_uid,
        "version": row.version_number,
        "status": job.status,
        "attempts": job.attempts,
        "available_at": job.available_at,
        "created_at": job.created_at,
        "finished_at": job.finished_at,
        "lease_owner": job.lease_owner,
        "last_error": job.last_error,
    }


def _table(rows: list[JobRow]) -> Table:
    table = Table("id", "status", "tries", "due / finished")
    table.add_column("study", overflow="fold")
    table.add_column("last error", overflow="fold")
    for row in rows:
        job = row.job
        colour = COLOURS.get(JobStatus(job.status), "white") if job.status in COLOURS else "white"
        when = job.finished_at or job.available_at
        table.add_row(
            str(job.id),
            f"[{colour}]{job.status}[/{colour}]",
            str(job.attempts),
            when.strftime("%m-%d %H:%M:%S") if when else "",
            f"{row.study_instance_uid} v{row.version_number}",
            escape((job.last_error or "")[:200]),
        )
    return table


@app.command("retry")
def jobs_retry(
    job_id: Annotated[int, typer.Argument(help="The job id (jobs list)")],
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Queue a failed, cancelled or waiting job again, due now, with its attempts reset."""
    settings = settings_or_exit(config, data_dir=data_dir)
    with opened_database(settings) as db:
        found = retry_job(db, job_id, actor=OPERATOR)
    if found is None:
        errors.print(f"[red]no job {job_id}[/red]")
        raise typer.Exit(1)
    before, study_uid = found
    if before not in (JobStatus.FAILED, JobStatus.QUEUED, JobStatus.CANCELLED):
        errors.print(f"[yellow]job {job_id} is {before}; left as it is[/yellow]")
        raise typer.Exit(1)
    console.print(f"job {job_id} ({before}) of study {study_uid} queued again, due now")


@app.command("cancel")
def jobs_cancel(
    job_id: Annotated[int, typer.Argument(help="The job id (jobs list)")],
    reason: Annotated[str, typer.Option(help="Why (kept as the job's last error)")] = "",
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Set a queued or failed job aside: never run unless retried. A running job finishes."""
    settings = settings_or_exit(config, data_dir=data_dir)
    with opened_database(settings) as db:
        before = cancel_job(db, job_id, actor=OPERATOR, reason=reason)
    if before is None:
        errors.print(f"[red]no job {job_id}[/red]")
        raise typer.Exit(1)
    if before not in (JobStatus.QUEUED, JobStatus.FAILED):
        errors.print(f"[yellow]job {job_id} is {before}; left as it is[/yellow]")
        raise typer.Exit(1)
    console.print(f"job {job_id} ({before}) cancelled")
