"""A report's files are built before its transaction (inference/report_store.py), under an id
handed out ahead (storage/report_ids.py), on SQLite and PostgreSQL: ids never repeat, a report
not stored leaves no files (a crash's leftovers are removed at start once the lease is over),
and a report of the same study stored in between is named as the
predecessor (the files are then built again in the transaction under a new id)."""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from config.settings import FileDestination, NodeSettings
from inference.report_store import StoreOutcome, StoreTask, store_report
from medgemma_node.outputs import REPORT_JSON, ReportOutputs, StagedOutputs
from storage.db import Database
from storage.ingest import close_quiet_studies
from storage.installation import ensure_installation_id
from storage.models import Job, JobStatus, OutboxItem, Report, utcnow
from storage.priors import PriorComparison
from storage.recovery import recover
from storage.report_ids import reserve_report_ids
from storage.report_schema import ModelIdentity
from tests.test_worker import CHEST_ANSWER, ingest_copy, make_settings

OWNER = "this-worker"


def queued_job(db: Database, settings: NodeSettings, rg1_unci: Path, work: Path) -> StoreTask:
    """A new study's job, leased to OWNER, and the task storing its answer (the installation
    id made first, as `serve` does at start)."""
    with db.session() as session:
        ensure_installation_id(session, settings.storage.data_dir)
    ingest_copy(db, settings.storage.data_dir, rg1_unci, work)
    [job_id] = close_quiet_studies(db, lambda _modality, _ae: 0.0)
    with db.session() as session:
        job = session.get_one(Job, job_id)
        job.status, job.lease_owner = JobStatus.RUNNING, OWNER
        version, study = job.study_version, job.study_version.study
        ids = (version.id, study.id, study.study_instance_uid, version.instances[0])
    version_id, study_id, study_uid, instance = ids
    return StoreTask(
        job_id=job_id,
        study_id=study_id,
        study_version_id=version_id,
        study_uid=study_uid,
        question="q",
        language="en",
        sop_instance_uids=[instance.sop_instance_uid],
        geometries=[],
        preprocess_seconds=0.0,
        text=CHEST_ANSWER,
        identity=ModelIdentity(model_id="scripted", is_test_model=True),
        batch_seconds=1.0,
        prepare_seconds=0.5,
        batch_size=1,
        prompt_tokens=10,
        new_tokens=10,
    )


def appended_report(session: Session, task: StoreTask, supersedes: int | None) -> Report:
    """A report added the way an appended conversation adds one: no id given."""
    report = Report(
        job_id=None,
        study_id=task.study_id,
        study_version_id=task.study_version_id,
        parse_status="ok",
        content_json={},
        model_json={},
        created_at=utcnow(),
        supersedes_report_id=supersedes,
    )
    session.add(report)
    session.flush()
    return report


def with_files(settings: NodeSettings) -> NodeSettings:
    settings.destinations = [
        FileDestination(name="files", kind="file", directory=settings.storage.data_dir / "out")
    ]
    return settings


def test_report_ids_are_handed_out_once(tmp_path: Path, db: Database, rg1_unci: Path) -> None:
    settings = make_settings(tmp_path, db.url)
    task = queued_job(db, settings, rg1_unci, tmp_path / "in")
    first = reserve_report_ids(db, 64)
    second = reserve_report_ids(db, 3)
    assert len(first) == 64 and second.start == first.stop and len(second) == 3
    with db.session() as session:  # a report added without an id takes the counter's next
        added = appended_report(session, task, None).id
    assert added == second.stop
    with db.session() as session:  # one written with an explicit id ahead of the counter
        session.add(
            Report(
                id=added + 100, study_id=task.study_id, study_version_id=task.study_version_id,
                parse_status="ok", content_json={}, model_json={}, created_at=utcnow(),
            )
        )  # fmt: skip
    assert reserve_report_ids(db, 1).start == added + 101  # ...is stepped over


def test_a_staged_report_is_stored_under_its_reserved_id(
    tmp_path: Path, db: Database, rg1_unci: Path
) -> None:
    settings = with_files(make_settings(tmp_path, db.url))
    task = queued_job(db, settings, rg1_unci, tmp_path / "in")
    [reserved] = reserve_report_ids(db, 1)
    staged = StoreTask(**{**task.__dict__, "report_id": reserved})
    assert store_report(db, OWNER, staged, ReportOutputs(settings)) is StoreOutcome.STORED
    with db.session() as session:
        report = session.scalars(select(Report)).one()
        outbox = session.scalars(select(OutboxItem)).one()
        job = session.get_one(Job, task.job_id)
        row = (report.id, job.status, outbox.payload_path, report.timings_json)
    report_id, status, payload, timings = row
    assert (report_id, status) == (reserved, JobStatus.DONE)
    assert payload == f"reports/{reserved}/{REPORT_JSON}"
    assert (settings.storage.data_dir / payload).is_file()
    assert timings["store_held_seconds"] < timings["outputs_seconds"]


def test_a_report_whose_lease_was_lost_leaves_no_files(
    tmp_path: Path, db: Database, rg1_unci: Path
) -> None:
    settings = with_files(make_settings(tmp_path, db.url))
    task = queued_job(db, settings, rg1_unci, tmp_path / "in")
    with db.session() as session:
        session.get_one(Job, task.job_id).lease_owner = "another-worker"
    outputs = ReportOutputs(settings)
    built: list[Path] = []
    original = outputs.prepare

    def prepare(session: Session, report: Report, own_prior: Any = None) -> StagedOutputs:
        staged = original(session, report, own_prior)
        built.append(staged.directory)
        assert (staged.directory / REPORT_JSON).is_file()
        return staged

    outputs.prepare = prepare  # type: ignore[method-assign]
    assert store_report(db, OWNER, task, outputs) is StoreOutcome.LEASE_LOST
    assert len(built) == 1 and not built[0].exists()
    with db.session() as session:
        assert session.scalars(select(Report)).all() == []
        job = session.get_one(Job, task.job_id)  # untouched: the other worker's to finish
        assert (job.status, job.lease_owner) == (JobStatus.RUNNING, "another-worker")


def test_a_report_stored_in_between_becomes_the_predecessor(
    tmp_path: Path, db: Database, rg1_unci: Path
) -> None:
    settings = with_files(make_settings(tmp_path, db.url))
    task = queued_job(db, settings, rg1_unci, tmp_path / "in")
    outputs = ReportOutputs(settings)
    original = outputs.prepare
    staged_dirs: list[Path] = []
    between: list[int] = []

    def prepare(
        session: Session, report: Report, own_prior: PriorComparison | None = None
    ) -> StagedOutputs:
        staged = original(session, report, own_prior)
        staged_dirs.append(staged.directory)
        if not between:  # once, after the first build: e.g. a conversation appended meanwhile
            with db.session() as other:
                between.append(appended_report(other, task, None).id)
        return staged

    outputs.prepare = prepare  # type: ignore[method-assign]
    assert store_report(db, OWNER, task, outputs) is StoreOutcome.STORED
    with db.session() as session:
        report = session.scalars(select(Report).where(Report.job_id == task.job_id)).one()
        ids = (report.id, report.supersedes_report_id)
    report_id, supersedes = ids
    assert supersedes == between[0] and report_id > between[0]
    # Built twice: the files that named no predecessor are gone, the new ones are kept.
    assert len(staged_dirs) == 2 and not staged_dirs[0].exists() and staged_dirs[1].exists()
    payload = json.loads(
        (settings.storage.data_dir / "reports" / str(report_id) / REPORT_JSON).read_text()
    )
    assert payload["supersedes"]["report_id"] == between[0]


def test_directories_of_reports_never_stored_are_removed_once_the_lease_is_over(
    tmp_path: Path, db: Database, rg1_unci: Path
) -> None:
    settings = with_files(make_settings(tmp_path, db.url))
    task = queued_job(db, settings, rg1_unci, tmp_path / "in")
    assert store_report(db, OWNER, task, ReportOutputs(settings)) is StoreOutcome.STORED
    reports_dir = settings.storage.data_dir / "reports"
    [stored] = list(reports_dir.iterdir())
    unstored_old, unstored_new = (reports_dir / str(n) for n in reserve_report_ids(db, 2))
    for directory in (unstored_old, unstored_new):
        directory.mkdir()
        (directory / REPORT_JSON).write_text("{}")
    hour_ago = time.time() - 3600
    for directory in (stored, unstored_old):
        os.utime(directory, (hour_ago, hour_ago))
    report = recover(db, settings.storage.data_dir, b"salt", job_lease_s=600)
    assert report.report_dirs_removed == 1
    assert not unstored_old.exists()
    assert unstored_new.exists()  # its worker may still commit it
    assert (stored / REPORT_JSON).is_file()


def test_a_failure_before_the_commit_leaves_no_files(
    tmp_path: Path, db: Database, rg1_unci: Path
) -> None:
    settings = with_files(make_settings(tmp_path, db.url))
    task = queued_job(db, settings, rg1_unci, tmp_path / "in")
    reports_dir = settings.storage.data_dir / "reports"
    outputs = ReportOutputs(settings)

    def json_fails(*_args: Any) -> Path:
        assert any(reports_dir.glob("*/sr-*.dcm"))  # the SR was written already
        raise OSError("disk full")

    outputs._write_json = json_fails  # type: ignore[method-assign]
    with pytest.raises(OSError, match="disk full"):
        store_report(db, OWNER, task, outputs)
    assert list(reports_dir.iterdir()) == []  # the half-built report is gone

    outputs = ReportOutputs(settings)

    def rows_fail(*_args: Any) -> None:
        raise RuntimeError("constraint")

    outputs.commit = rows_fail  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="constraint"):
        store_report(db, OWNER, task, outputs)
    assert list(reports_dir.iterdir()) == []  # rolled back: no row would name the files
    with db.session() as session:
        assert session.scalars(select(Report)).all() == []
        assert session.get_one(Job, task.job_id).status == JobStatus.RUNNING  # tried again


def test_ids_reserved_side_by_side_never_overlap(db: Database) -> None:
    """Several workers (threads here, each with its own connections) reserving at once."""

    def reserve_many(_index: int) -> list[int]:
        return [n for _ in range(10) for n in reserve_report_ids(db, 7)]

    with ThreadPoolExecutor(6) as threads:
        handed_out = [n for ids in threads.map(reserve_many, range(6)) for n in ids]
    assert len(handed_out) == len(set(handed_out)) == 6 * 10 * 7
