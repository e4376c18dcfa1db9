"""Operator commands: --version, jobs list / retry / cancel (with their audit rows), `status`
showing studies in their quiet period, the pid in every log line, and `stop` against a real
`serve` subprocess."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from core.version import node_version
from medgemma_node.cli import app
from medgemma_node.logs import setup_logging
from medgemma_node.pidfile import pid_path, read_pid
from peers.node_process import NodeProcess, run_cli
from storage.db import Database
from storage.models import AuditEvent, Job, JobStatus, utcnow
from tests.api_support import complete, receive, set_job

runner = CliRunner()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def node_db(data_dir: Path) -> Database:
    data_dir.mkdir()
    db = Database(f"sqlite:///{(data_dir / 'node.db').resolve()}")
    db.upgrade()
    return db


def cli(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_version_names_the_distribution_version() -> None:
    code, out, _ = cli("--version")
    assert code == 0 and out.strip() == f"medgemma-node {node_version()}"
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", node_version())


def test_jobs_list_retry_cancel_and_their_audit_rows(node_db: Database, data_dir: Path) -> None:
    failed = complete(node_db, receive(node_db, "9.1"))
    set_job(node_db, failed, JobStatus.FAILED, attempts=3, last_error="OutOfMemory: CUDA")
    queued = complete(node_db, receive(node_db, "9.2"))
    code, out, _ = cli("jobs", "list", "--json", "--data-dir", str(data_dir))
    assert code == 0
    listed = {row["id"]: row for row in json.loads(out)}
    assert listed[failed]["status"] == "failed" and listed[failed]["attempts"] == 3
    assert listed[failed]["study_instance_uid"] == "9.1"
    assert listed[queued]["status"] == "queued"

    code, out, _ = cli("jobs", "cancel", str(queued), "--reason", "duplicate exam", "--data-dir",
                       str(data_dir))  # fmt: skip
    assert code == 0 and "cancelled" in out
    code, _, err = cli("jobs", "cancel", str(queued), "--data-dir", str(data_dir))
    assert code == 1 and "is cancelled; left as it is" in err
    code, out, _ = cli("jobs", "retry", str(failed), "--data-dir", str(data_dir))
    assert code == 0 and "queued again" in out
    code, out, _ = cli("jobs", "retry", str(queued), "--data-dir", str(data_dir))
    assert code == 0  # a cancelled job may be queued again
    code, _, err = cli("jobs", "retry", "999", "--data-dir", str(data_dir))
    assert code == 1 and "no job 999" in err

    with node_db.session() as session:
        jobs = {job.id: job for job in session.scalars(select(Job))}
        assert jobs[failed].status == JobStatus.QUEUED and jobs[failed].attempts == 0
        assert jobs[queued].status == JobStatus.QUEUED
        kinds = [
            (row.kind, row.study_instance_uid, row.actor, row.detail.get("job_id"))
            for row in session.scalars(select(AuditEvent).where(AuditEvent.kind.like("job.%")))
        ]
    assert kinds == [
        ("job.cancelled", "9.2", "cli", queued),
        ("job.retried", "9.1", "cli", failed),
        ("job.retried", "9.2", "cli", queued),
    ]
    node_db.dispose()


def test_status_lists_studies_in_their_quiet_period(node_db: Database, data_dir: Path) -> None:
    receive(node_db, "8.1", modality="CR")
    receive(node_db, "8.1", modality="CR")
    complete(node_db, receive(node_db, "8.2", modality="CT"))  # complete: not receiving
    code, out, _ = cli("status", "--json", "--data-dir", str(data_dir))
    assert code == 3  # nothing answers C-ECHO: the node is not running
    receiving = json.loads(out)["database"]["receiving"]
    assert [(s["study_instance_uid"], s["instances"]) for s in receiving] == [("8.1", 2)]
    assert receiving[0]["quiet_period_s"] == 5.0 and 0 <= receiving[0]["remaining_s"] <= 5.0
    code, out, _ = cli("status", "--data-dir", str(data_dir))
    text = " ".join(re.sub(r"[│┃|]", " ", out).split())  # the table may wrap the cell
    assert "receiving" in text and "8.1 CR from MOD: 2" in text and "quiet period" in text
    node_db.dispose()


def test_every_log_line_names_its_process(tmp_path: Path) -> None:
    log_file = tmp_path / "node.log"
    setup_logging("INFO", log_file)
    try:
        logging.getLogger("medgemma_node.test").info("one line")
    finally:
        setup_logging("INFO", None)
    [line] = [line for line in log_file.read_text().splitlines() if "one line" in line]
    assert f"[{os.getpid()}] INFO" in line


@pytest.mark.slow
def test_stop_ends_serve_through_its_pid_file(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path, {})
    node.start()
    try:
        assert node.proc is not None and read_pid(node.data_dir) == node.proc.pid
        second = run_cli("serve", "--config", str(node.config_path))
        assert second.returncode == 1 and "already running" in second.stderr
        stopped = run_cli("stop", "--config", str(node.config_path), "--timeout", "60")
        assert stopped.returncode == 0, stopped.stderr
        assert f"pid {node.proc.pid} stopped" in stopped.stdout
        assert node.proc.wait(10) == 0
        assert not pid_path(node.data_dir).exists()
        again = run_cli("stop", "--config", str(node.config_path))
        assert again.returncode == 0 and "not running" in again.stdout
        assert re.search(rf"\[{node.proc.pid}\] INFO .*stopped", node.log_text())
    finally:
        node.kill9()


def test_stop_removes_a_stale_pid_file(data_dir: Path) -> None:
    pid_path(data_dir).parent.mkdir(parents=True)
    pid_path(data_dir).write_text("999999\n")  # above the kernel's default pid_max
    code, out, _ = cli("stop", "--data-dir", str(data_dir))
    assert code == 0 and "stale PID file" in out and not pid_path(data_dir).exists()
    assert utcnow()
