"""storage/: recording instances, study versions and jobs, the job queue, durable files.

The database tests run on SQLite and on a throwaway PostgreSQL database (the ``db`` fixture).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, event, func, select, text, update

from storage.db import Database
from storage.files import (
    TEMP_MARK,
    instance_relpath,
    remove_temp_files,
    uid_component,
    write_durably,
)
from storage.ingest import (
    ReceivedInstance,
    close_and_schedule,
    close_quiet_studies,
    record_instance,
)
from storage.jobs import (
    NO_RETRY,
    claim_jobs,
    complete_job,
    fail_job,
    job_retry_policy,
    requeue_expired_leases,
)
from storage.models import (
    Instance,
    Job,
    JobStatus,
    PerformedProcedureStep,
    Series,
    Study,
    StudyVersion,
    utcnow,
)
from storage.report_ids import reserve_report_ids

STUDY = "1.2.826.0.1.3680043.8.498.100"
SERIES = "1.2.826.0.1.3680043.8.498.100.1"


def never(_modality: str, _calling_ae: str) -> float:
    return 3600.0


def at_once(_modality: str, _calling_ae: str) -> float:
    return 0.0


def received(sop_uid: str, study: str = STUDY, series: str = SERIES) -> ReceivedInstance:
    return ReceivedInstance(
        study_uid=study,
        series_uid=series,
        sop_uid=sop_uid,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        relpath=instance_relpath(study, series, sop_uid).as_posix(),
        size_bytes=1234,
        calling_ae="MODALITY1",
        modality="CR",
        body_part="CHEST",
        instance_number=1,
        patient_hash="0123456789ab",
    )


def count(db: Database, model: type) -> int:
    with db.session() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def version_sizes(db: Database, study_uid: str = STUDY) -> list[int]:
    with db.session() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid)).one()
        return [len(version.instances) for version in study.versions]


def make_jobs(db: Database, how_many: int) -> list[int]:
    """One study (one instance) per job, each closed at once."""
    job_ids: list[int] = []
    for number in range(how_many):
        study = f"{STUDY}.{number}"
        record_instance(db, received(f"{study}.9", study=study, series=f"{study}.1"))
    job_ids.extend(close_quiet_studies(db, at_once))
    assert len(job_ids) == how_many
    return job_ids


def make_jobs_of(db: Database, modalities: list[str]) -> list[int]:
    """One single-series study per modality, closed in that order: one job each."""
    job_ids: list[int] = []
    for number, modality in enumerate(modalities):
        study = f"{STUDY}.{number}"
        instance = received(f"{study}.9", study=study, series=f"{study}.1")
        record_instance(db, dataclasses.replace(instance, modality=modality))
        job_ids.extend(close_quiet_studies(db, at_once))
    return job_ids


def job(db: Database, job_id: int) -> Job:
    with db.session() as session:
        return session.get_one(Job, job_id)


# -- record_instance -------------------------------------------------------------------------


def test_record_instance_creates_study_series_instance(db: Database) -> None:
    assert record_instance(db, received("1.2.3.1")) is True
    with db.session() as session:
        study = session.scalars(select(Study)).one()
        series = session.scalars(select(Series)).one()
        instance = session.scalars(select(Instance)).one()
        assert study.study_instance_uid == STUDY
        assert (study.modality, study.calling_ae, study.patient_hash) == (
            "CR",
            "MODALITY1",
            "0123456789ab",
        )
        assert study.has_unversioned is True
        assert series.study_id == study.id
        assert series.series_instance_uid == SERIES
        assert (series.modality, series.body_part) == ("CR", "CHEST")
        assert instance.series_id == series.id
        assert instance.study_id == study.id
        assert instance.sop_instance_uid == "1.2.3.1"
        assert instance.transfer_syntax_uid == "1.2.840.10008.1.2.1"
        assert instance.received_at.tzinfo is not None


def test_resent_sop_uid_is_deduplicated(db: Database) -> None:
    assert record_instance(db, received("1.2.3.1")) is True
    assert record_instance(db, received("1.2.3.1")) is False
    assert record_instance(db, received("1.2.3.2")) is True
    assert count(db, Instance) == 2
    assert count(db, Series) == 1
    assert count(db, Study) == 1


def test_concurrent_first_instances_of_a_new_study(db: Database) -> None:
    """Parallel associations sending the first instances of one study all get their rows."""
    threads_n, per_thread = 4, 5
    barrier = threading.Barrier(threads_n)
    results: list[bool] = []
    errors: list[BaseException] = []

    def sender(number: int) -> None:
        try:
            barrier.wait(timeout=10)
            for index in range(per_thread):
                results.append(record_instance(db, received(f"1.2.3.{number}.{index}")))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert results == [True] * threads_n * per_thread
    assert count(db, Study) == 1
    assert count(db, Series) == 1
    assert count(db, Instance) == threads_n * per_thread


# -- completion: study versions and jobs -------------------------------------------------------


def test_quiet_period_is_respected(db: Database) -> None:
    record_instance(db, received("1.2.3.1"))
    assert close_quiet_studies(db, never) == []
    assert count(db, StudyVersion) == 0
    assert count(db, Job) == 0

    seen: list[tuple[str, str]] = []

    def recording(modality: str, calling_ae: str) -> float:
        seen.append((modality, calling_ae))
        return 0.0

    job_ids = close_quiet_studies(db, recording)
    assert seen == [("CR", "MODALITY1")]  # the rule is asked with the study's own keys
    assert len(job_ids) == 1
    assert version_sizes(db) == [1]
    the_job = job(db, job_ids[0])
    assert the_job.status == JobStatus.QUEUED
    assert the_job.attempts == 0
    # Nothing new arrived: a second pass makes nothing.
    assert close_quiet_studies(db, at_once) == []
    assert count(db, Job) == 1


def test_late_instance_makes_version_two(db: Database) -> None:
    record_instance(db, received("1.2.3.1"))
    record_instance(db, received("1.2.3.2"))
    first = close_quiet_studies(db, at_once)
    assert len(first) == 1

    record_instance(db, received("1.2.3.3"))
    assert close_quiet_studies(db, never) == []
    second = close_quiet_studies(db, at_once)
    assert len(second) == 1 and second != first
    assert version_sizes(db) == [2, 3]  # the new version covers every instance
    with db.session() as session:
        versions = session.scalars(select(StudyVersion).order_by(StudyVersion.version_number))
        assert [(v.version_number, v.job.id) for v in versions if v.job] == [
            (1, first[0]),
            (2, second[0]),
        ]


def test_duplicate_does_not_reopen_a_closed_study(db: Database) -> None:
    record_instance(db, received("1.2.3.1"))
    close_quiet_studies(db, at_once)
    assert record_instance(db, received("1.2.3.1")) is False
    assert close_quiet_studies(db, at_once) == []
    assert count(db, StudyVersion) == 1


def test_one_query_finds_the_open_studies_with_procedure_steps(db: Database) -> None:
    for number in range(20):
        study = f"{STUDY}.{number}"
        record_instance(db, received(f"{study}.9", study=study, series=f"{study}.1"))
    with db.session() as session:  # study 7's modality says it made its one image
        session.add(
            PerformedProcedureStep(
                sop_instance_uid="1.2.9.7",
                status="COMPLETED",
                study_instance_uid=f"{STUDY}.7",
                sop_instance_uids=[f"{STUDY}.7.9"],
            )
        )
    step_queries: list[str] = []

    def note(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if "FROM mpps" in statement:
            step_queries.append(statement)

    event.listen(db.engine, "before_cursor_execute", note)
    try:
        completion = close_and_schedule(db, never, use_mpps=True)
    finally:
        event.remove(db.engine, "before_cursor_execute", note)

    # Study 7 is complete at once; the 19 others wait for their quiet period. The steps were
    # read once for all 20 open studies, then once for study 7's verdict.
    assert len(completion.job_ids) == 1
    assert completion.next_due_s is not None
    assert len(step_queries) == 2
    with db.session() as session:
        closed = session.scalars(select(Study.study_instance_uid).where(~Study.has_unversioned))
        assert list(closed) == [f"{STUDY}.7"]


# -- the job queue ----------------------------------------------------------------------------


def test_claim_leases_due_jobs_once(db: Database) -> None:
    job_ids = make_jobs(db, 3)
    claimed = claim_jobs(db, "worker-a", limit=2, lease_seconds=60)
    assert claimed == job_ids[:2]
    for job_id in claimed:
        leased = job(db, job_id)
        assert leased.status == JobStatus.RUNNING
        assert leased.lease_owner == "worker-a"
        assert leased.attempts == 1
        assert leased.lease_expires_at is not None
        assert leased.lease_expires_at > utcnow() + timedelta(seconds=50)
    assert claim_jobs(db, "worker-b", limit=5, lease_seconds=60) == job_ids[2:]
    assert claim_jobs(db, "worker-b", limit=5, lease_seconds=60) == []


def test_a_claim_can_take_a_report_id_for_each_job_in_its_transaction(db: Database) -> None:
    make_jobs(db, 3)
    ids: list[int] = []
    assert len(claim_jobs(db, "w", limit=2, lease_seconds=60, report_ids=ids)) == 2
    assert claim_jobs(db, "w", limit=5, lease_seconds=60, report_ids=ids) != []
    assert claim_jobs(db, "w", limit=5, lease_seconds=60, report_ids=ids) == []  # none: none
    assert len(ids) == len(set(ids)) == 3
    assert reserve_report_ids(db, 1).start > max(ids)  # the counter moved past them


def test_claim_takes_higher_priority_first(db: Database) -> None:
    job_ids = make_jobs(db, 3)
    with db.session() as session:
        session.execute(update(Job).where(Job.id == job_ids[2]).values(priority=5))
    assert claim_jobs(db, "w", limit=1, lease_seconds=60) == [job_ids[2]]


def claims_by_kind(db: Database) -> None:
    cr1, ct, cr2, mr, cr3 = make_jobs_of(db, ["CR", "CT", "CR", "MR", "DX"])

    # The first due job is a radiograph: the batch takes only projection images.
    assert claim_jobs(db, "w", limit=8, lease_seconds=60) == [cr1, cr2, cr3]
    assert claim_jobs(db, "w", limit=1, lease_seconds=60) == [ct]
    # A second claim filling the same batch takes the first job's kind.
    assert claim_jobs(db, "w", limit=8, lease_seconds=60, like=ct) == [mr]
    assert claim_jobs(db, "w", limit=8, lease_seconds=60) == []


def test_a_batch_holds_volumes_or_projection_images_not_both(db: Database) -> None:
    claims_by_kind(db)


def test_a_fill_claim_like_a_radiograph_skips_volumes(db: Database) -> None:
    ct, cr = make_jobs_of(db, ["CT", "CR"])
    assert claim_jobs(db, "w", limit=8, lease_seconds=60, like=cr) == [cr]
    assert claim_jobs(db, "w", limit=8, lease_seconds=60) == [ct]


def raise_inference_error() -> None:
    raise RuntimeError("model exploded")


def failure() -> RuntimeError:
    try:
        raise_inference_error()
    except RuntimeError as exc:
        return exc
    raise AssertionError("unreachable")


def make_due(db: Database, job_id: int) -> None:
    with db.session() as session:
        session.execute(
            update(Job).where(Job.id == job_id).values(available_at=utcnow() - timedelta(seconds=1))
        )


def test_fail_job_backs_off_then_fails_with_traceback(db: Database) -> None:
    (job_id,) = make_jobs(db, 1)
    policy = job_retry_policy(max_attempts=2, backoff_s=30)

    assert claim_jobs(db, "w", 1, 60) == [job_id]
    before = utcnow()
    assert fail_job(db, job_id, failure(), policy) == JobStatus.QUEUED
    retried = job(db, job_id)
    assert retried.status == JobStatus.QUEUED
    assert retried.lease_owner is None and retried.lease_expires_at is None
    assert retried.last_error == "RuntimeError: model exploded"
    # Backoff: not due again before backoff_s has passed.
    assert retried.available_at >= before + timedelta(seconds=29)
    assert claim_jobs(db, "w", 1, 60) == []

    make_due(db, job_id)
    assert claim_jobs(db, "w", 1, 60) == [job_id]
    assert fail_job(db, job_id, failure(), policy) == JobStatus.FAILED
    failed = job(db, job_id)
    assert failed.status == JobStatus.FAILED
    assert failed.attempts == 2
    assert failed.finished_at is not None
    assert failed.last_traceback is not None
    assert "raise_inference_error" in failed.last_traceback
    assert "RuntimeError: model exploded" in failed.last_traceback
    make_due(db, job_id)
    assert claim_jobs(db, "w", 1, 60) == []


def test_backoff_doubles() -> None:
    policy = job_retry_policy(max_attempts=5, backoff_s=10)
    assert [policy.delay(n).total_seconds() for n in (1, 2, 3, 8)] == [10, 20, 40, 1280]


def test_no_retry_fails_at_the_first_attempt(db: Database) -> None:
    (job_id,) = make_jobs(db, 1)
    assert claim_jobs(db, "w", 1, 60) == [job_id]
    assert fail_job(db, job_id, failure(), NO_RETRY) == JobStatus.FAILED
    assert job(db, job_id).finished_at is not None


def test_complete_job_only_for_the_lease_owner(db: Database) -> None:
    mine, lost = make_jobs(db, 2)
    assert claim_jobs(db, "w", 2, 60) == [mine, lost]
    with db.session() as session:
        session.execute(update(Job).where(Job.id == lost).values(lease_owner="other"))
    with db.session() as session:
        assert complete_job(session, mine, "w") is True
        assert complete_job(session, lost, "w") is False
    done, taken = job(db, mine), job(db, lost)
    assert (done.status, done.lease_owner, done.lease_expires_at) == (JobStatus.DONE, None, None)
    assert done.finished_at is not None
    assert (taken.status, taken.lease_owner) == (JobStatus.RUNNING, "other")
    with db.session() as session:  # a job already done is not done twice
        assert complete_job(session, mine, "w") is False


def test_expired_leases_return_to_the_queue(db: Database) -> None:
    short, long = make_jobs(db, 2)
    assert claim_jobs(db, "dead-worker", 1, lease_seconds=60) == [short]
    assert claim_jobs(db, "live-worker", 1, lease_seconds=600) == [long]
    with db.session() as session:
        session.execute(
            update(Job)
            .where(Job.id == short)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )
    assert requeue_expired_leases(db) == 1
    requeued = job(db, short)
    assert requeued.status == JobStatus.QUEUED
    assert requeued.lease_owner is None
    assert job(db, long).status == JobStatus.RUNNING
    assert claim_jobs(db, "new-worker", 5, 60) == [short]
    # At start-up with one worker (SQLite) every running job belonged to the previous run.
    assert requeue_expired_leases(db, all_running=True) == 2
    assert count(db, Job) == 2
    assert {job(db, j).status for j in (short, long)} == {JobStatus.QUEUED}


@pytest.fixture
def pg_db(pg_url: str) -> Iterator[Database]:
    database = Database(pg_url)
    database.upgrade()
    yield database
    database.dispose()


def test_concurrent_claims_are_disjoint_on_postgresql(pg_db: Database) -> None:
    job_ids = make_jobs(pg_db, 24)
    barrier = threading.Barrier(2)
    claimed: dict[str, list[int]] = {"a": [], "b": []}
    errors: list[BaseException] = []

    def worker(owner: str) -> None:
        try:
            for _ in range(8):
                barrier.wait(timeout=10)  # both claim at the same moment, every round
                claimed[owner].extend(claim_jobs(pg_db, owner, limit=2, lease_seconds=60))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(name,)) for name in claimed]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert set(claimed["a"]).isdisjoint(claimed["b"])
    everything = claimed["a"] + claimed["b"]
    assert len(everything) == len(set(everything))
    assert sorted(everything) == sorted(job_ids[: len(everything)])
    assert len(everything) >= 16


def test_a_batch_holds_one_kind_on_postgresql(pg_db: Database) -> None:
    claims_by_kind(pg_db)


def test_claim_skips_rows_locked_by_another_worker(pg_db: Database, pg_url: str) -> None:
    job_ids = make_jobs(pg_db, 3)
    other = create_engine(pg_url)
    try:
        with other.connect() as connection, connection.begin():
            # Another worker is in the middle of claiming the first job.
            connection.execute(
                text("SELECT id FROM jobs WHERE id = :id FOR UPDATE"), {"id": job_ids[0]}
            )
            result: list[int] = []
            claimer = threading.Thread(
                target=lambda: result.extend(claim_jobs(pg_db, "w", limit=3, lease_seconds=60))
            )
            claimer.start()
            claimer.join(timeout=10)
            assert not claimer.is_alive(), "claim_jobs waited for a locked row (no SKIP LOCKED)"
            assert result == job_ids[1:]
    finally:
        other.dispose()


# -- files ------------------------------------------------------------------------------------


def test_write_durably_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "instances" / "1.2" / "3.4" / "5.6.dcm"
    payload = b"DICM" * 10_000
    write_durably(target, payload)
    assert target.read_bytes() == payload
    assert [p for p in tmp_path.rglob("*") if TEMP_MARK in p.name] == []
    # Overwriting replaces the whole file atomically.
    write_durably(target, b"second")
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["5.6.dcm"]


def test_remove_temp_files_removes_only_stale_temp_files(tmp_path: Path) -> None:
    keep = tmp_path / "instances" / "1" / "2" / "3.dcm"
    keep.parent.mkdir(parents=True)
    keep.write_bytes(b"kept")
    stale = [
        keep.parent / f"{TEMP_MARK}abc123-4.dcm",
        tmp_path / "ignored" / f"{TEMP_MARK}def456-7.dcm",
    ]
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half written")
    assert remove_temp_files(tmp_path) == 2
    assert not any(path.exists() for path in stale)
    assert keep.read_bytes() == b"kept"
    assert remove_temp_files(tmp_path) == 0
    assert remove_temp_files(tmp_path / "absent") == 0


@pytest.mark.parametrize(
    "unsafe",
    ["../x", "../../etc/passwd", "1.2/../../3", "/abs", "1.2.3 ", "ABC", "1." * 40, ""],
)
def test_unsafe_uids_are_hashed(unsafe: str) -> None:
    component = uid_component(unsafe)
    assert component.startswith("x")
    assert len(component) == 41
    assert all(c in "0123456789abcdefx" for c in component)
    assert uid_component(unsafe) == component  # stable
    relpath = instance_relpath(unsafe, unsafe, unsafe)
    assert relpath.parts[0] == "instances"
    assert ".." not in relpath.parts
    assert len(relpath.parts) == 4


def test_plain_uids_are_kept() -> None:
    uid = "1.2.826.0.1.3680043.8.498.12345"
    assert uid_component(uid) == uid
    assert uid_component("../x") != uid_component("../y")


def test_completion_round_says_when_the_next_study_becomes_quiet(db: Database) -> None:
    record_instance(db, received("1.2.3.99.1"))
    quiet = 30.0
    first = close_and_schedule(db, lambda _modality, _ae: quiet)
    assert first.job_ids == []
    assert first.next_due_s is not None and quiet - 5 < first.next_due_s <= quiet
    done = close_and_schedule(db, lambda _modality, _ae: 0.0)
    assert len(done.job_ids) == 1 and done.next_due_s is None
