"""Retention: only settled studies are pruned (never one with a pending job, a pending or dead
delivery, an open conversation or instances in their quiet period), by age or, below the
free-space target, oldest first; files go, rows stay, every prune is audited; the SCP prunes
before it answers 0xA700; `prune --dry-run`, `prune` and `status`."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update
from typer.testing import CliRunner

from config.settings import NodeSettings
from dicom_node.scp import StorageSCP
from medgemma_node.cli import app
from medgemma_node.retention_part import Pruner
from peers.dicom_files import make_ct_study
from peers.net import free_port
from storage import retention
from storage.conversations import start_conversation
from storage.db import Database
from storage.ingest import close_quiet_study
from storage.models import (
    AuditEvent,
    Instance,
    Job,
    JobStatus,
    OutboxItem,
    OutboxStatus,
    PriorInstance,
    PriorStudy,
    Report,
    Study,
    utcnow,
)
from storage.priors import (
    PriorInstanceRecord,
    prior_relpath,
    record_prior_instance,
    stored_study_paths,
)
from tests.api_support import add_report, complete, receive, set_job
from tests.nodecheck import store_with_pynetdicom

DAY = timedelta(days=1)
NO_SPACE_SHORTFALL = retention.RetentionPolicy(30, 365, free_space_target_mb=0)


def with_files(db: Database, data_dir: Path, study_id: int) -> list[Path]:
    """Give the study's instances (and reports) files on disk, as the SCP and worker do."""
    paths = []
    with db.session() as session:
        for instance in session.scalars(select(Instance).where(Instance.study_id == study_id)):
            paths.append(data_dir / instance.path)
        for report_id in session.scalars(select(Report.id).where(Report.study_id == study_id)):
            paths.append(data_dir / "reports" / str(report_id) / "sr.dcm")
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0" * 1000)
    return paths


def age(db: Database, study_id: int, days: float) -> None:
    """Move every time of the study ``days`` into the past."""
    when = utcnow() - days * DAY
    with db.session() as session:
        session.execute(update(Study).where(Study.id == study_id).values(last_received_at=when))
        session.execute(update(Report).where(Report.study_id == study_id).values(created_at=when))
        report_ids = select(Report.id).where(Report.study_id == study_id).scalar_subquery()
        session.execute(
            update(OutboxItem).where(OutboxItem.report_id.in_(report_ids)).values(sent_at=when)
        )


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def sqlite_db(data_dir: Path) -> Database:
    db = Database(f"sqlite:///{(data_dir / 'node.db').resolve()}")
    db.upgrade()
    return db


def make_studies(db: Database, data_dir: Path) -> dict[str, int]:
    """One study in each state that matters, all 40 days old."""
    studies: dict[str, int] = {}
    studies["delivered"] = receive(db, "1.1")
    add_report(db, complete(db, studies["delivered"]), [OutboxStatus.SENT])
    studies["cancelled"] = receive(db, "1.2")
    set_job(db, complete(db, studies["cancelled"]), JobStatus.CANCELLED)
    studies["pending_delivery"] = receive(db, "1.3")
    add_report(db, complete(db, studies["pending_delivery"]), [OutboxStatus.PENDING])
    studies["dead_delivery"] = receive(db, "1.4")
    add_report(db, complete(db, studies["dead_delivery"]), [OutboxStatus.DEAD])
    studies["failed_job"] = receive(db, "1.5")
    set_job(db, complete(db, studies["failed_job"]), JobStatus.FAILED)
    studies["queued_job"] = receive(db, "1.6")
    complete(db, studies["queued_job"])
    studies["conversation"] = receive(db, "1.7")
    add_report(db, complete(db, studies["conversation"]), [OutboxStatus.SENT])
    start_conversation(db, "1.7", created_by="dr-wang")
    studies["receiving"] = receive(db, "1.8")
    for name, study_id in studies.items():
        with_files(db, data_dir, study_id)
        age(db, study_id, 45 if name == "cancelled" else 40)
    return studies


def test_only_settled_studies_are_pruned_by_age(sqlite_db: Database, data_dir: Path) -> None:
    studies = make_studies(sqlite_db, data_dir)
    actions = retention.plan(sqlite_db, data_dir, NO_SPACE_SHORTFALL, free_mb=10**6)
    assert [a.study_uid for a in actions] == ["1.2", "1.1"]  # oldest settled first
    assert all(a.reason == "age" and a.instance_ids and not a.report_ids for a in actions)
    assert retention.plan(sqlite_db, data_dir, retention.RetentionPolicy(50, 0, 0), 10**6) == []

    done = retention.execute(sqlite_db, data_dir, actions, actor="test")
    assert len(done) == 2
    with sqlite_db.session() as session:
        instances = session.execute(select(Instance.study_id, Instance.path, Instance.pruned_at))
        for study_id, path, pruned_at in instances:
            pruned = study_id in (studies["delivered"], studies["cancelled"])
            assert (pruned_at is not None) is pruned
            assert (data_dir / path).exists() is not pruned
        audits = session.scalars(select(AuditEvent).where(AuditEvent.kind == "retention.prune"))
        assert sorted(a.study_instance_uid or "" for a in audits) == ["1.1", "1.2"]
        [report] = session.scalars(select(Report).where(Report.study_id == studies["delivered"]))
        assert report.outputs_pruned_at is None and report.raw_text  # the report stays
    assert (data_dir / "reports" / str(report.id) / "sr.dcm").exists()
    # Nothing is left to prune by age; the same plan again does nothing.
    assert retention.plan(sqlite_db, data_dir, NO_SPACE_SHORTFALL, free_mb=10**6) == []


def test_space_prunes_oldest_settled_first_and_outputs_too(
    sqlite_db: Database, data_dir: Path
) -> None:
    studies = make_studies(sqlite_db, data_dir)
    age(sqlite_db, studies["delivered"], 1)  # young: only space may prune it
    policy = retention.RetentionPolicy(30, 365, free_space_target_mb=1000)
    # 5 bytes short: the oldest study's instance (10 bytes as recorded) covers it.
    actions = retention.plan(sqlite_db, data_dir, policy, free_mb=1000 - 5 / retention.MB)
    assert [(a.study_uid, a.reason) for a in actions] == [("1.2", "age")]
    actions = retention.plan(sqlite_db, data_dir, policy, free_mb=990)
    assert [(a.study_uid, a.reason) for a in actions] == [("1.2", "age"), ("1.1", "space")]
    assert actions[1].report_ids and actions[1].output_bytes == 1000


def test_a_pruned_study_that_receives_again_gets_a_version_of_the_new_instances(
    sqlite_db: Database, data_dir: Path
) -> None:
    study_id = receive(sqlite_db, "2.1")
    add_report(sqlite_db, complete(sqlite_db, study_id), [OutboxStatus.SENT])
    with_files(sqlite_db, data_dir, study_id)
    age(sqlite_db, study_id, 40)
    plan = retention.plan(sqlite_db, data_dir, NO_SPACE_SHORTFALL, free_mb=10**6)
    assert len(retention.execute(sqlite_db, data_dir, plan, actor="test")) == 1
    receive(sqlite_db, "2.1")
    with sqlite_db.session() as session:
        last = session.get_one(Study, study_id).last_received_at
    job_id = close_quiet_study(sqlite_db, study_id, last)
    with sqlite_db.session() as session:
        version = session.get_one(Job, job_id).study_version
        assert len(version.instances) == 1 and version.instances[0].pruned_at is None


def test_the_scp_prunes_before_it_refuses(
    sqlite_db: Database, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = NodeSettings.model_validate(
        {"storage": {"data_dir": data_dir, "min_free_disk_mb": 100},
         "dicom": {"bind_address": "127.0.0.1", "port": free_port()}}
    )  # fmt: skip
    study_id = receive(sqlite_db, "3.1")
    add_report(sqlite_db, complete(sqlite_db, study_id), [OutboxStatus.SENT])
    with_files(sqlite_db, data_dir, study_id)
    # Double of the disk's free space (a full disk cannot be made here): 50 MB until a study
    # has been pruned, then 500 MB.
    free = {"mb": 50.0}
    monkeypatch.setattr("dicom_node.scp.free_disk_mb", lambda _path: free["mb"])
    pruner = Pruner(settings, sqlite_db)
    pruner.free_mb = lambda: free["mb"]  # type: ignore[method-assign]

    def make_room() -> int:
        count = pruner.make_room()
        free["mb"] = 500.0 if count else free["mb"]
        return count

    scp = StorageSCP(settings, sqlite_db, b"salt")
    scp.make_room = make_room
    scp.start()
    try:
        [first, second] = make_ct_study(tmp_path / "ct", slices=2)
        assert store_with_pynetdicom(scp.port, [first]) == [0]  # 3.1 pruned to make room
        free["mb"] = 50.0
        assert store_with_pynetdicom(scp.port, [second]) == [0xA700]  # nothing left to prune
    finally:
        scp.stop()
    with sqlite_db.session() as session:
        assert session.get_one(Study, study_id).pruned_at is not None


def test_prune_command_and_status(sqlite_db: Database, data_dir: Path) -> None:
    make_studies(sqlite_db, data_dir)
    runner = CliRunner()
    args = ["--data-dir", str(data_dir)]
    result = runner.invoke(app, ["prune", "--dry-run", "--json", *args])
    assert result.exit_code == 0, result.stderr
    planned = json.loads(result.stdout)
    assert planned["dry_run"] and [s["study_instance_uid"] for s in planned["studies"]] == [
        "1.2",
        "1.1",
    ]
    result = runner.invoke(app, ["status", "--json", *args])
    status = json.loads(result.stdout)["retention"]
    assert status["prunable_studies"] == 2 and status["enabled"] is True
    with sqlite_db.session() as session:
        assert (
            session.scalar(select(Study.pruned_at).where(Study.study_instance_uid == "1.1")) is None
        )
    result = runner.invoke(app, ["prune", *args])
    assert result.exit_code == 0 and "pruned 2 study(ies)" in result.stdout
    result = runner.invoke(app, ["prune", "--dry-run", *args])
    assert "would prune 0 study(ies)" in result.stdout
    with sqlite_db.session() as session:
        actors = session.scalars(
            select(AuditEvent.actor).where(AuditEvent.kind == "retention.prune")
        )
        assert list(actors) == ["cli", "cli"]
    sqlite_db.dispose()


def test_the_settled_rules_hold_on_both_databases(db: Database, tmp_path: Path) -> None:
    data_dir = tmp_path / "files"
    data_dir.mkdir()
    make_studies(db, data_dir)
    policy = retention.RetentionPolicy(30, 35, free_space_target_mb=0)
    actions = retention.plan(db, data_dir, policy, free_mb=10**6)
    assert [(a.study_uid, bool(a.report_ids)) for a in actions] == [("1.2", False), ("1.1", True)]
    assert len(retention.execute(db, data_dir, actions, actor="test")) == 2
    assert retention.plan(db, data_dir, policy, free_mb=10**6) == []


def _prior_image(db: Database, data_dir: Path, study_uid: str) -> str:
    """A prior image in the prior store (file and rows), as a C-GET or C-MOVE leaves it."""
    relpath = prior_relpath(study_uid, f"{study_uid}.1", f"{study_uid}.1.1").as_posix()
    (data_dir / relpath).parent.mkdir(parents=True, exist_ok=True)
    (data_dir / relpath).write_bytes(b"DICM")
    record = PriorInstanceRecord(
        study_uid, f"{study_uid}.1.1", "1.2.840.10008.5.1.4.1.1.1", relpath, 4
    )
    assert record_prior_instance(db, record)
    return relpath


def test_prior_images_go_at_the_instances_age_and_are_fetched_again(
    sqlite_db: Database, data_dir: Path
) -> None:
    old, recent = _prior_image(sqlite_db, data_dir, "2.1"), _prior_image(sqlite_db, data_dir, "2.2")
    with sqlite_db.session() as session:
        session.execute(
            update(PriorInstance)
            .where(PriorInstance.path == old)
            .values(received_at=utcnow() - 40 * DAY)
        )
    result = CliRunner().invoke(app, ["prune", "--data-dir", str(data_dir)])  # 30 days
    assert result.exit_code == 0, result.stderr
    assert not (data_dir / old).exists() and (data_dir / recent).exists()
    assert stored_study_paths(sqlite_db, "2.1") == []  # the finder asks PACS again
    assert stored_study_paths(sqlite_db, "2.2") == [recent]
    with sqlite_db.session() as session:
        assert len(session.scalars(select(PriorStudy)).all()) == 2  # the studies' rows stay
        [audit_row] = session.scalars(
            select(AuditEvent).where(AuditEvent.kind == "retention.prune_priors")
        )
        assert (audit_row.actor, audit_row.detail["images"]) == ("cli", 1)
    sqlite_db.dispose()


def test_short_of_disk_the_prior_store_goes_first(sqlite_db: Database, data_dir: Path) -> None:
    settings = NodeSettings.model_validate(
        {"storage": {"data_dir": data_dir, "min_free_disk_mb": 100}}
    )
    hours_old, newest = (
        _prior_image(sqlite_db, data_dir, "4.1"),
        _prior_image(sqlite_db, data_dir, "4.2"),
    )
    with sqlite_db.session() as session:
        session.execute(
            update(PriorInstance)
            .where(PriorInstance.path == hours_old)
            .values(received_at=utcnow() - timedelta(hours=2))
        )
    pruner = Pruner(settings, sqlite_db)
    pruner.free_mb = lambda: 500.0  # type: ignore[method-assign]  # above the 200 MB target
    pruner.prune("test")
    assert (data_dir / hours_old).exists()  # 2 hours old, kept for instances_days (30)
    pruner.free_mb = lambda: 50.0  # type: ignore[method-assign]  # below it
    pruner.prune("test")
    assert not (data_dir / hours_old).exists()  # the cache goes first
    assert (data_dir / newest).exists()  # fetched within the hour: a batch may be using it
    sqlite_db.dispose()
