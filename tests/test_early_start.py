"""Studies run during their quiet period (inference/early_start.py, storage/early_jobs.py):
what is open, when its job may be claimed for an answer made early, and the worker storing
such an answer once its study is complete, or dropping it and running the study again. Real
databases (SQLite and PostgreSQL), a real render process, the tiny demo model through the
transformers loading path; the ScriptedEngine (a labelled test double) where a test reads
the requests the engine was given."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import select

from config.settings import NodeSettings
from inference.demo_model import write_demo_model
from inference.engine import Engine
from inference.scripted_engine import ScriptedEngine
from inference.transformers_engine import TransformersEngine
from inference.worker import InferenceWorker
from medgemma_node.metrics import NodeCollector
from medgemma_node.service import Node
from peers.dicom_files import copy_with_new_uids
from peers.local_ingest import store_received
from peers.net import free_port, wait_for
from storage.db import Database
from storage.doorbell import WORKER_DOORBELL, Doorbell
from storage.early_jobs import claim_early_jobs, open_studies
from storage.ingest import close_quiet_studies
from storage.jobs import claim_jobs, has_due_jobs
from storage.models import Job, JobStatus, Report, Study, StudyVersion
from storage.report_ids import reserve_report_ids
from tests.nodecheck import store_with_pynetdicom
from tests.test_worker import ingest_copy, ingest_without_pixels, make_settings

NO_QUIET = lambda _modality, _ae: 0.0  # noqa: E731
CR_5_S = lambda modality, _ae: 5.0 if modality == "CR" else 30.0  # noqa: E731


def second_instance(db: Database, data_dir: Path, source: Path, work: Path, study_uid: str) -> None:
    """Another image of study ``study_uid`` received, as the SCP records it."""
    copy = copy_with_new_uids(source, work / "second.dcm", StudyInstanceUID=study_uid)
    store_received(db, data_dir, copy, calling_ae="MODALITY", patient_hash="x")


def study_id(db: Database, uid: str) -> int:
    with db.session() as session:
        return session.scalars(select(Study.id).where(Study.study_instance_uid == uid)).one()


def test_open_studies_are_the_radiographs_without_a_version_and_a_short_quiet_period(
    tmp_path: Path, db: Database, rg1_unci: Path
) -> None:
    data_dir, work = tmp_path / "data", tmp_path / "in"
    one = ingest_copy(db, data_dir, rg1_unci, work)
    two = ingest_copy(db, data_dir, rg1_unci, work)
    second_instance(db, data_dir, rg1_unci, work, two)
    ingest_copy(db, data_dir, rg1_unci, work, Modality="CT")  # a volume: waits
    found = open_studies(db, 10, CR_5_S, max_quiet_s=10.0)
    assert [(s.study_uid, len(s.instance_ids), len(s.paths)) for s in found] == [
        (one, 1, 1),
        (two, 2, 2),
    ]
    assert all((data_dir / path).is_file() for s in found for path in s.paths)
    assert found[0].quiet_ends_at < found[1].quiet_ends_at  # the closest to complete first
    assert [s.study_uid for s in open_studies(db, 1, CR_5_S, 10.0)] == [one]
    assert [s.study_uid for s in open_studies(db, 10, CR_5_S, 10.0, {found[0].study_id})] == [two]
    assert open_studies(db, 10, CR_5_S, max_quiet_s=4.0) == []  # 5 s is longer than allowed
    close_quiet_studies(db, NO_QUIET)
    assert open_studies(db, 10, CR_5_S, 10.0) == []  # versioned: no longer open


def test_a_job_is_claimed_for_an_early_answer_only_with_the_instances_it_was_made_from(
    tmp_path: Path, db: Database, rg1_unci: Path
) -> None:
    data_dir, work = tmp_path / "data", tmp_path / "in"
    same, grew = (ingest_copy(db, data_dir, rg1_unci, work) for _ in range(2))
    ran = {s.study_uid: s for s in open_studies(db, 10, CR_5_S, 10.0)}
    expected = {ran[uid].study_id: ran[uid].instance_ids for uid in (same, grew)}
    # Still open, unchanged: nothing to say yet.
    assert claim_early_jobs(db, "w", expected, 600.0) == {}
    second_instance(db, data_dir, rg1_unci, work, grew)
    # Another instance came: that answer can no longer be the study's.
    assert claim_early_jobs(db, "w", expected, 600.0) == {ran[grew].study_id: None}
    close_quiet_studies(db, NO_QUIET)
    claims = claim_early_jobs(db, "w", expected, 600.0)
    claim = claims[ran[same].study_id]
    assert claim is not None and claims[ran[grew].study_id] is None
    # Its report id was taken from the installation's sequence with the claim: the next one
    # handed out follows it.
    assert list(reserve_report_ids(db, 1)) == [claim.report_id + 1]
    with db.session() as session:
        job = session.get_one(Job, claim.job_id)
        version = session.get_one(StudyVersion, claim.study_version_id)
        grown = session.scalars(
            select(Job).join(StudyVersion).where(StudyVersion.study_id == ran[grew].study_id)
        ).one()
        assert (job.status, job.lease_owner, job.attempts) == (JobStatus.RUNNING, "w", 1)
        assert version.study_id == ran[same].study_id and job.study_version_id == version.id
        assert grown.status == JobStatus.QUEUED  # left for a worker to run from its 2 images
    # Claimed once: asked again, the job is no longer queued.
    assert claim_early_jobs(db, "w2", {ran[same].study_id: ran[same].instance_ids}, 600.0) == {
        ran[same].study_id: None
    }


def test_the_queue_leaves_the_jobs_of_studies_running_early_alone(
    tmp_path: Path, db: Database, rg1_unci: Path
) -> None:
    data_dir, work = tmp_path / "data", tmp_path / "in"
    early, other = (ingest_copy(db, data_dir, rg1_unci, work) for _ in range(2))
    close_quiet_studies(db, NO_QUIET)
    early_id, other_id = study_id(db, early), study_id(db, other)
    assert has_due_jobs(db, {early_id}) and not has_due_jobs(db, {early_id, other_id})
    claimed = claim_jobs(db, "w", 10, 600.0, exclude_studies={early_id})
    with db.session() as session:
        studies = session.scalars(
            select(StudyVersion.study_id).join(Job).where(Job.id.in_(claimed))
        ).all()
    assert studies == [other_id]
    assert has_due_jobs(db) and not has_due_jobs(db, {early_id})


@contextmanager
def worker_with_renders(
    db: Database, settings: NodeSettings, engine: Engine
) -> Iterator[InferenceWorker]:
    worker = InferenceWorker(db, settings, lambda: engine, None, render_processes=1)
    worker.start_pools()
    try:
        wait_for(lambda: worker.pools_ready, 120, message="render process")
        yield worker
    finally:
        worker.stop()


def reports_of(db: Database) -> list[tuple[int | None, int]]:
    with db.session() as session:
        return [(r.job_id, r.study_version_id) for r in session.scalars(select(Report))]


def test_a_study_runs_in_its_quiet_period_and_is_stored_once_complete(
    tmp_path: Path, db: Database, rg1_unci: Path
) -> None:
    """Through the demo model: the study runs while open, no job yet and nothing stored; once
    the completion scheduler has made its job, that job is claimed and the answer stored as
    its report; the study does not run again."""
    settings = make_settings(tmp_path, db.url, max_batch=4, early_start=True)
    write_demo_model(tmp_path / "demo")
    engine = TransformersEngine(settings.model, weights_dir=tmp_path / "demo")
    ingest_copy(db, settings.storage.data_dir, rg1_unci, tmp_path / "in")
    with worker_with_renders(db, settings, engine) as worker:
        assert worker.run_once() == 1
        with db.session() as session:
            assert session.scalars(select(Job)).all() == []  # still in its quiet period
        assert reports_of(db) == []
        [job_id] = close_quiet_studies(db, NO_QUIET)
        wait_for(lambda: bool(reports_of(db)), 30, message="the early answer stored")
        assert worker.run_once() == 0  # nothing left to run
    with db.session() as session:
        job = session.get_one(Job, job_id)
        report = session.scalars(select(Report)).one()
        assert (job.status, job.attempts) == (JobStatus.DONE, 1)
        assert (report.job_id, report.study_version_id) == (job_id, job.study_version_id)
        assert report.raw_text and report.is_test_model
    assert worker.early.counts == {"taken": 1, "claimed": 1, "dropped": 0}


def test_a_study_that_grows_in_its_quiet_period_runs_again_as_its_job(
    tmp_path: Path, db: Database, rg1_unci: Path
) -> None:
    settings = make_settings(tmp_path, db.url, max_batch=4, early_start=True)
    data_dir = settings.storage.data_dir
    engine = ScriptedEngine(texts=["run early", "run as its job"])
    uid = ingest_copy(db, data_dir, rg1_unci, tmp_path / "in")
    with worker_with_renders(db, settings, engine) as worker:
        assert worker.run_once() == 1  # early, from its one image
        second_instance(db, data_dir, rg1_unci, tmp_path / "in", uid)
        [job_id] = close_quiet_studies(db, NO_QUIET)
        wait_for(lambda: worker.early.counts["dropped"] == 1, 30, message="the answer dropped")
        assert worker.early.counts == {"taken": 1, "claimed": 0, "dropped": 1}
        assert worker.run_once() == 1  # the job, as any other
    assert [len(call) for call in engine.calls] == [1, 1]
    with db.session() as session:
        report = session.scalars(select(Report)).one()
        job = session.get_one(Job, job_id)
        assert len(job.study_version.instances) == 2
    assert (report.job_id, report.raw_text) == (job_id, "run as its job")
    assert (job.status, job.attempts) == (JobStatus.DONE, 1)


def test_a_study_that_cannot_render_is_not_taken_again_and_fails_as_its_job(
    tmp_path: Path, db: Database, rg1_unci: Path
) -> None:
    settings = make_settings(tmp_path, db.url, max_batch=4, early_start=True)
    data_dir = settings.storage.data_dir
    uid = ingest_without_pixels(db, data_dir, rg1_unci, tmp_path / "in")
    engine = ScriptedEngine(texts=[])
    with worker_with_renders(db, settings, engine) as worker:
        assert worker.run_once() == 1  # taken early; its render failed: dropped, no job failed
        assert worker.early.counts == {"taken": 1, "claimed": 0, "dropped": 1}
        assert worker.run_once() == 0  # not taken again
        close_quiet_studies(db, NO_QUIET)
        assert worker.run_once() == 1  # its job fails as it always did
    assert engine.calls == []
    with db.session() as session:
        job = session.scalars(select(Job)).one()
        assert job.study_version.study.study_instance_uid == uid
        assert job.status == JobStatus.FAILED and "pixel" in (job.last_error or "").lower()


@pytest.mark.parametrize("early_start", [False, True])
def test_open_studies_run_early_only_when_asked_and_below_the_quiet_limit(
    tmp_path: Path, db: Database, rg1_unci: Path, early_start: bool
) -> None:
    settings = make_settings(tmp_path, db.url, max_batch=4, early_start=early_start)
    settings.completion.rules = []
    settings.completion.default_seconds = 30.0  # above early_start_max_quiet_s (10 s)
    data_dir = settings.storage.data_dir
    ingest_copy(db, data_dir, rg1_unci, tmp_path / "in")
    engine = ScriptedEngine(texts=[])
    with worker_with_renders(db, settings, engine) as worker:
        assert worker.run_once() == 0
        settings.completion.default_seconds = 5.0
        assert worker.run_once() == (1 if early_start else 0)
    assert len(engine.calls) == (1 if early_start else 0)


@pytest.mark.parametrize("early_start", [True, False])
def test_the_receiver_rings_the_workers_doorbell_for_each_instance_when_early_start_is_on(
    tmp_path: Path, rg1_unci: Path, early_start: bool, restore_logging: None
) -> None:
    """A real SCP (the node's wiring) and a real C-STORE: the idle worker hears of a study
    still in its quiet period at once, not at its next poll."""
    settings = NodeSettings.model_validate(
        {
            "storage": {"data_dir": tmp_path / "data"},
            "dicom": {"bind_address": "127.0.0.1", "port": free_port(), "mpps": False},
            "model": {"early_start": early_start},
        }
    )
    node = Node(settings)
    db = node.prepare()
    doorbell = Doorbell(settings.storage.data_dir, WORKER_DOORBELL)
    try:
        node._start_scp(db, b"salt", lambda: None)
        assert node.scp is not None
        copy = copy_with_new_uids(rg1_unci, tmp_path / "in" / "one.dcm")
        assert store_with_pynetdicom(node.scp.port, [copy]) == [0]
        assert doorbell.wait(5.0 if early_start else 0.5) is early_start
    finally:
        doorbell.close()
        if node.scp is not None:
            node.scp.stop()
        db.dispose()


def test_the_metrics_count_the_studies_run_early_by_outcome(tmp_path: Path, db: Database) -> None:
    """What the worker's status file says (service._model_state) reaches the Prometheus
    endpoint's collector."""
    data_dir = tmp_path / "data"
    (data_dir / "run").mkdir(parents=True)
    counts = {"taken": 130, "claimed": 127, "dropped": 3}
    state = {"host": "gpu1", "pid": 42, "model": {"worker": {"batches": 2, "early_start": counts}}}
    (data_dir / "run" / "worker-gpu1-42.json").write_text(json.dumps(state))
    registry = CollectorRegistry()
    registry.register(NodeCollector(db, data_dir, lambda: None))
    text = generate_latest(registry).decode()
    for outcome, count in counts.items():
        labels = f'outcome="{outcome}",worker="gpu1:42"'
        assert f"medgemma_early_start_studies_total{{{labels}}} {count}.0" in text
