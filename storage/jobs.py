"""The job queue: claim with a lease, finish, fail with backoff (rq-style status enum).

A job's status changes only here:
    queued --claim_jobs--> running --complete_job--> done
                                   --fail_job-----> queued (backoff) | failed
                                   --release_jobs / requeue_expired_leases--> queued
    queued | failed --cancel_job--> cancelled --retry_job--> queued
Every change is an audit row (``job.<new state>``) in the same transaction.

A batch holds studies of one kind: volumes (a CT or MR series: up to 85 slices a prompt) or
projection images. A radiograph claimed with a CT study would wait for the CT study's whole
prompt pass and decode (about 2.7 s on an H200 against 1.2 s for a batch of 8 radiographs).

PostgreSQL: several workers claim safely with SELECT … FOR UPDATE SKIP LOCKED.
SQLite: one worker process; its single writer lock serialises claims.
"""

from __future__ import annotations

import traceback
from collections.abc import Collection, MutableSequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Exists, exists, func, or_, select, update
from sqlalchemy.orm import InstrumentedAttribute, Session

from core.modalities import CROSS_SECTIONAL_MODALITIES
from core.redaction import error_text, scrub_traceback
from core.retry import RetryPolicy
from storage import audit
from storage.db import Database
from storage.models import Job, JobStatus, Series, Study, StudyVersion, utcnow
from storage.report_ids import take_report_ids

# A job that cannot succeed however often it runs (e.g. a study without a usable image).
NO_RETRY = RetryPolicy(max_attempts=1, initial_backoff_s=0.0)


def job_retry_policy(max_attempts: int, backoff_s: float) -> RetryPolicy:
    """The queue's policy from [model] max_attempts / retry_backoff_s: backoff doubles after
    each failed attempt, without a cap or an age limit (attempts bound it)."""
    return RetryPolicy(
        max_attempts=max_attempts, initial_backoff_s=backoff_s, max_backoff_s=None, max_age_s=None
    )


def has_volume(study_id: ColumnElement[int] | InstrumentedAttribute[int]) -> Exists:
    """The study ``study_id`` (a column of the query it is correlated to) has a CT or MR
    series."""
    return exists().where(
        Series.study_id == study_id, Series.modality.in_(CROSS_SECTIONAL_MODALITIES)
    )


def _is_volume() -> Exists:
    """The job's study has a CT or MR series (correlated to the query's ``StudyVersion``)."""
    return has_volume(StudyVersion.study_id)


def _claim_kind(session: Session, now: datetime, like: int | None) -> bool | None:
    """Whether the batch claims volumes: job ``like``'s kind, else the first due job's; None
    when there is no such job."""
    query = (
        select(_is_volume())
        .select_from(Job)
        .join(StudyVersion, StudyVersion.id == Job.study_version_id)
    )
    if like is not None:
        query = query.where(Job.id == like)
    else:
        query = query.where(*_due(now)).order_by(Job.priority.desc(), Job.id).limit(1)
    kind = session.scalar(query)
    return None if kind is None else bool(kind)


def _due(now: datetime) -> tuple[ColumnElement[bool], ...]:
    return (Job.status == JobStatus.QUEUED, Job.available_at <= now)


def _not_of(studies: Collection[int]) -> tuple[ColumnElement[bool], ...]:
    """Jobs not of ``studies`` (the query joins ``StudyVersion``)."""
    return (StudyVersion.study_id.not_in(list(studies)),) if studies else ()


def claim_jobs(
    db: Database,
    owner: str,
    limit: int,
    lease_seconds: float,
    *,
    like: int | None = None,
    report_ids: MutableSequence[int] | None = None,
    exclude_studies: Collection[int] = (),
) -> list[int]:
    """Lease up to ``limit`` due jobs to ``owner``; return their ids (oldest, highest first).

    All of one kind (volumes or not, see above): that of job ``like`` when given (a second
    claim that fills the same batch), else that of the first due job. With ``report_ids``,
    one new report id per claimed job is taken in the same transaction and appended to it
    (storage/report_ids.py): the worker then stores a batch's answers without a write of its
    own between two batches. ``exclude_studies``: jobs of these studies are left queued (the
    worker already runs them early: storage/early_jobs.py)."""
    now = utcnow()
    with db.session() as session:
        volumes = _claim_kind(session, now, like)
        if volumes is None:
            return []
        query = (
            select(Job)
            .join(StudyVersion, StudyVersion.id == Job.study_version_id)
            .where(*_due(now), _is_volume() if volumes else ~_is_volume())
            .where(*_not_of(exclude_studies))
            .order_by(Job.priority.desc(), Job.id)
            .limit(limit)
        )
        if not db.is_sqlite:
            query = query.with_for_update(skip_locked=True, of=Job)
        jobs = list(session.scalars(query))
        lease_jobs(session, jobs, owner, lease_seconds, report_ids)
        return [job.id for job in jobs]


def lease_jobs(
    session: Session,
    jobs: list[Job],
    owner: str,
    lease_seconds: float,
    report_ids: MutableSequence[int] | None = None,
) -> None:
    """Queued ``jobs`` leased to ``owner`` in the caller's transaction, audited; with
    ``report_ids``, one new report id per job appended to it (claim_jobs)."""
    expires = utcnow() + timedelta(seconds=lease_seconds)
    for job in jobs:
        job.status = JobStatus.RUNNING
        job.lease_owner = owner
        job.lease_expires_at = expires
        job.attempts += 1
    _audit(session, jobs, "job.claimed", owner, attempts=None)
    if report_ids is not None and jobs:
        report_ids.extend(take_report_ids(session.connection(), len(jobs)))


def _study_uids(session: Session, job_ids: list[int]) -> dict[int, str]:
    rows = session.execute(
        select(Job.id, Study.study_instance_uid)
        .join(StudyVersion, StudyVersion.id == Job.study_version_id)
        .join(Study, Study.id == StudyVersion.study_id)
        .where(Job.id.in_(job_ids))
    ).all()
    return {int(job_id): str(uid) for job_id, uid in rows}


def _audit(session: Session, jobs: list[Job], kind: str, actor: str, **detail: object) -> None:
    """One ``job.*`` audit row per job (its id, attempts, error; never patient data)."""
    if not jobs:
        return
    uids = _study_uids(session, [job.id for job in jobs])
    extra: dict[str, Any] = {key: value for key, value in detail.items() if value is not None}
    audit.record_many(
        session,
        (
            audit.event(
                kind,
                study_uid=uids.get(job.id),
                actor=actor,
                outcome=audit.FAILURE if kind == "job.failed" else audit.SUCCESS,
                job_id=job.id,
                attempts=job.attempts,
                **extra,
            )
            for job in jobs
        ),
    )


def has_due_jobs(db: Database, exclude_studies: Collection[int] = ()) -> bool:
    """Whether any queued job is due now (one indexed lookup, no lock taken), jobs of
    ``exclude_studies`` left out."""
    with db.session() as session:
        query = select(Job.id).where(*_due(utcnow())).limit(1)
        if exclude_studies:
            query = query.join(StudyVersion, StudyVersion.id == Job.study_version_id)
            query = query.where(*_not_of(exclude_studies))
        return session.scalar(query) is not None


def extend_lease(db: Database, job_ids: list[int], owner: str, lease_seconds: float) -> None:
    with db.session() as session:
        session.execute(
            update(Job)
            .where(Job.id.in_(job_ids), Job.lease_owner == owner)
            .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
        )


def release_jobs(db: Database, job_ids: list[int], owner: str) -> None:
    """Give leased jobs back untouched (e.g. the batch was split after running out of memory)."""
    with db.session() as session:
        released: list[Job] = []
        for job in session.scalars(select(Job).where(Job.id.in_(job_ids))):
            if job.lease_owner == owner and job.status == JobStatus.RUNNING:
                job.status = JobStatus.QUEUED
                job.lease_owner = None
                job.lease_expires_at = None
                job.attempts = max(job.attempts - 1, 0)
                released.append(job)
        _audit(session, released, "job.released", owner)


def complete_job(session: Session, job_id: int, owner: str) -> bool:
    """Mark ``owner``'s running job done, in the caller's transaction (the one that stores its
    report, so both commit or neither). False, and nothing changed, when the job is no longer
    this owner's: its lease expired and it went back to the queue or to another worker."""
    job = session.get_one(Job, job_id)
    if job.lease_owner != owner or job.status != JobStatus.RUNNING:
        return False
    job.status = JobStatus.DONE
    job.finished_at = utcnow()
    job.lease_owner = None
    job.lease_expires_at = None
    job.last_error = None
    _audit(session, [job], "job.done", owner)
    return True


def skip_job(db: Database, job_id: int, owner: str, reason: str) -> bool:
    """End ``owner``'s running job as skipped (no report) with ``reason`` in its error column:
    the study is outside the validated scope (inference/scope.py). False when the job is no
    longer this owner's."""
    with db.session() as session:
        job = session.get_one(Job, job_id)
        if job.lease_owner != owner or job.status != JobStatus.RUNNING:
            return False
        job.status = JobStatus.SKIPPED
        job.finished_at = utcnow()
        job.lease_owner = None
        job.lease_expires_at = None
        job.last_error = reason[:2000]
        return True


def fail_job(
    db: Database,
    job_id: int,
    error: BaseException,
    policy: RetryPolicy,
    retry_after_s: float | None = None,
) -> str:
    """Record the failure with its traceback; requeue with backoff or end as failed.

    ``retry_after_s``: the least wait a peer asked for (an inference server's Retry-After).
    """
    with db.session() as session:
        job = session.get_one(Job, job_id)
        # Library messages can quote data set values (a patient's name): scrubbed (core.redaction).
        job.last_error = error_text(error)[:2000]
        job.last_traceback = scrub_traceback("".join(traceback.format_exception(error)))[-20000:]
        job.lease_owner = None
        job.lease_expires_at = None
        now = utcnow()
        retry_at = policy.next_attempt(
            job.attempts, first_at=job.created_at, now=now, retry_after_s=retry_after_s
        )
        if retry_at is None:
            job.status = JobStatus.FAILED
            job.finished_at = now
        else:
            job.status = JobStatus.QUEUED
            job.available_at = retry_at
        state = "job.failed" if retry_at is None else "job.retry_scheduled"
        _audit(session, [job], state, "", error=job.last_error[:500])
        return job.status


def requeue_expired_leases(db: Database, *, all_running: bool = False) -> int:
    """Jobs whose worker died (lease expired) return to the queue.

    ``all_running``: at start-up with SQLite there is only one worker — this process — so every
    running job belonged to the previous run and returns at once.
    """
    now = utcnow()
    expired = or_(Job.lease_expires_at.is_(None), Job.lease_expires_at < now)
    with db.session() as session:
        jobs = list(
            session.scalars(
                select(Job)
                .where(Job.status == JobStatus.RUNNING, *(() if all_running else (expired,)))
                .with_for_update()
            )
        )
        for job in jobs:
            job.status = JobStatus.QUEUED
            job.lease_owner = None
            job.lease_expires_at = None
        _audit(session, jobs, "job.requeued", "", reason="lease expired")
        return len(jobs)


# ---------------------------------------------------------------------------------------------
# Operator actions (REST API admin endpoints)


@dataclass(frozen=True)
class JobRow:
    """A job with the study and version it covers."""

    job: Job
    study_instance_uid: str
    version_number: int


def list_jobs(
    db: Database, status: JobStatus | None = None, limit: int = 100, offset: int = 0
) -> tuple[list[JobRow], int]:
    """Jobs newest first (optionally of one status) and how many match in all."""
    query = (
        select(Job, Study.study_instance_uid, StudyVersion.version_number)
        .join(StudyVersion, StudyVersion.id == Job.study_version_id)
        .join(Study, Study.id == StudyVersion.study_id)
    )
    count = select(func.count()).select_from(Job)
    if status is not None:
        query = query.where(Job.status == status)
        count = count.where(Job.status == status)
    with db.session() as session:
        rows = session.execute(query.order_by(Job.id.desc()).limit(limit).offset(offset)).all()
        total = int(session.scalar(count) or 0)
    return [JobRow(job, uid, number) for job, uid, number in rows], total


def retry_job(db: Database, job_id: int, actor: str = "") -> tuple[str, str] | None:
    """Queue a failed, cancelled (or waiting) job again, due now, with its attempts reset.

    Returns the status it had and its study UID, or None when there is no such job. Running
    and done jobs are left as they are (a done study gets a new version when it changes).
    """
    with db.session() as session:
        row = session.execute(
            select(Job, Study.study_instance_uid)
            .join(StudyVersion, StudyVersion.id == Job.study_version_id)
            .join(Study, Study.id == StudyVersion.study_id)
            .where(Job.id == job_id)
            .with_for_update(of=Job)
        ).first()
        if row is None:
            return None
        job, study_uid = row
        before = str(job.status)  # other states (e.g. skipped) are reported, not changed
        if before in (JobStatus.FAILED, JobStatus.QUEUED, JobStatus.CANCELLED):
            job.status = JobStatus.QUEUED
            job.attempts = 0
            job.available_at = utcnow()
            job.finished_at = None
            _audit(session, [job], "job.retried", actor, previous=before)
        return before, study_uid


def cancel_job(db: Database, job_id: int, actor: str = "", reason: str = "") -> str | None:
    """Set a queued (or waiting) or failed job aside for good: the worker never runs it, and
    retention may prune its study. Returns the status it had, None when there is no such job.
    A running job is left to finish (the worker holds it); done jobs stay done."""
    with db.session() as session:
        job = session.scalars(select(Job).where(Job.id == job_id).with_for_update()).first()
        if job is None:
            return None
        before = str(job.status)
        if before in (JobStatus.QUEUED, JobStatus.FAILED):
            job.status = JobStatus.CANCELLED
            job.finished_at = utcnow()
            job.last_error = reason or f"cancelled by {actor or 'an operator'}"
            _audit(session, [job], "job.cancelled", actor, previous=before, reason=reason)
        return before
