"""Studies still in their quiet period, and the jobs they become, for a worker that runs them
early (inference/early_start.py).

A study is complete once nothing has arrived for its quiet period (storage/ingest.py); only
then does it get a version and a job. A worker with nothing due may run a study before that,
from the instances it has so far, and keep the answer aside. The answer becomes a report only
through the job: ``claim_early_jobs`` leases the study's job once the completion scheduler has
made it, and only when its version covers exactly the instances the answer was made from. A
study that received another instance meanwhile gets a version the answer does not match: the
answer is dropped and the job runs as any other. So "exactly one result per study version"
holds as before, and nothing here writes anything but the lease.

Only a study's first version is run early: a study that already has one (a re-sent or late
instance) waits for its quiet period, as do volumes (CT, MR: many instances over minutes).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Exists, exists, func, select
from sqlalchemy.orm import Session

from storage.db import Database
from storage.ingest import QuietPeriod
from storage.jobs import has_volume, lease_jobs
from storage.models import Instance, Job, JobStatus, Study, StudyVersion, version_instances


@dataclass(frozen=True)
class OpenStudy:
    """A study still in its quiet period, as it stands now."""

    study_id: int
    study_uid: str
    calling_ae: str
    quiet_ends_at: datetime  # its last instance's time plus its rule's quiet period
    instance_ids: frozenset[int]
    paths: list[str]  # its instances' files, relative to the data directory


@dataclass(frozen=True)
class EarlyClaim:
    """A study's job, leased to the worker that ran the study early, with its report id."""

    job_id: int
    study_version_id: int
    report_id: int


def open_studies(
    db: Database,
    limit: int,
    quiet_seconds: QuietPeriod,
    max_quiet_s: float,
    exclude: Collection[int] = (),
) -> list[OpenStudy]:
    """Up to ``limit`` studies with instances and no version yet, none of them volumes, whose
    rule's quiet period is at most ``max_quiet_s``, those closest to complete first; the
    studies in ``exclude`` left out. Reads only."""
    with db.session() as session:
        query = (
            select(Study.id, Study.study_instance_uid, Study.modality, Study.calling_ae)
            .add_columns(Study.last_received_at)
            .where(Study.has_unversioned.is_(True), ~_has_version(), ~has_volume(Study.id))
            .order_by(Study.last_received_at, Study.id)
        )
        if exclude:
            query = query.where(Study.id.not_in(list(exclude)))
        found: list[tuple[int, str, str, datetime]] = []
        for study_id, uid, modality, calling_ae, last_received in session.execute(query):
            quiet = quiet_seconds(modality, calling_ae)
            if quiet <= max_quiet_s:
                ends = last_received + timedelta(seconds=quiet)
                found.append((study_id, uid, calling_ae, ends))
            if len(found) == limit:
                break
        files = _instances(session, [study_id for study_id, *_ in found])
    return [
        OpenStudy(
            study_id, uid, ae, ends, frozenset(i for i, _ in files[study_id]),
            [path for _, path in files[study_id]],
        )
        for study_id, uid, ae, ends in found
        if files.get(study_id)
    ]  # fmt: skip


def claim_early_jobs(
    db: Database,
    owner: str,
    expected: Mapping[int, frozenset[int]],
    lease_seconds: float,
) -> dict[int, EarlyClaim | None]:
    """For each study of ``expected`` (study id: the instances its answer was made from):

    * an ``EarlyClaim`` when its first version covers exactly those instances and its job
      was queued: the job is now leased to ``owner``, with a new report id for its answer;
    * None when that can no longer be: the study has other instances now, or its job is not
      queued (another worker has it; an MPPS step discontinued it);
    * nothing while the study is still open with those instances (ask again later).
    """
    if not expected:
        return {}
    with db.session() as session:
        versions = _first_versions(session, list(expected), lock=not db.is_sqlite)
        counts = _instance_counts(session, [s for s in expected if s not in versions])
        covered = _covered(session, [version.id for version, _ in versions.values()])
        outcome: dict[int, EarlyClaim | None] = {}
        leased: list[tuple[int, StudyVersion, Job]] = []
        for study_id, instances in expected.items():
            if study_id in versions:
                version, job = versions[study_id]
                same = covered.get(version.id, frozenset()) == instances
                outcome[study_id] = None
                if same and job.status == JobStatus.QUEUED:
                    leased.append((study_id, version, job))
            elif counts.get(study_id, 0) != len(instances):
                outcome[study_id] = None  # instances only come (or go to retention): changed
        report_ids: list[int] = []
        lease_jobs(session, [job for *_, job in leased], owner, lease_seconds, report_ids)
        for (study_id, version, job), report_id in zip(leased, report_ids, strict=True):
            outcome[study_id] = EarlyClaim(job.id, version.id, report_id)
    return outcome


def _has_version() -> Exists:
    return exists().where(StudyVersion.study_id == Study.id)


def _instances(session: Session, study_ids: list[int]) -> dict[int, list[tuple[int, str]]]:
    """Each study's instances that retention has not removed (those a version would cover:
    storage/ingest.py close_quiet_study), as (id, path)."""
    files: dict[int, list[tuple[int, str]]] = {}
    if not study_ids:
        return files
    rows = session.execute(
        select(Instance.study_id, Instance.id, Instance.path)
        .where(Instance.study_id.in_(study_ids), Instance.pruned_at.is_(None))
        .order_by(Instance.id)
    )
    for study_id, instance_id, path in rows:
        files.setdefault(study_id, []).append((instance_id, path))
    return files


def _instance_counts(session: Session, study_ids: list[int]) -> dict[int, int]:
    if not study_ids:
        return {}
    rows = session.execute(
        select(Instance.study_id, func.count())
        .where(Instance.study_id.in_(study_ids), Instance.pruned_at.is_(None))
        .group_by(Instance.study_id)
    )
    return {int(study_id): int(count) for study_id, count in rows}


def _first_versions(
    session: Session, study_ids: list[int], *, lock: bool
) -> dict[int, tuple[StudyVersion, Job]]:
    """Each study's first version with its job (made together: storage/ingest.py); with
    ``lock`` (PostgreSQL) the jobs' rows locked, those locked already left out."""
    query = (
        select(StudyVersion, Job)
        .join(Job, Job.study_version_id == StudyVersion.id)
        .where(StudyVersion.study_id.in_(study_ids), StudyVersion.version_number == 1)
    )
    if lock:
        # Two workers asking for one job: the second finds it locked and asks again later.
        query = query.with_for_update(skip_locked=True, of=Job)
    return {version.study_id: (version, job) for version, job in session.execute(query).all()}


def _covered(session: Session, version_ids: list[int]) -> dict[int, frozenset[int]]:
    if not version_ids:
        return {}
    rows = session.execute(
        select(version_instances.c.version_id, version_instances.c.instance_id).where(
            version_instances.c.version_id.in_(version_ids)
        )
    )
    covered: dict[int, set[int]] = {}
    for version_id, instance_id in rows:
        covered.setdefault(int(version_id), set()).add(int(instance_id))
    return {version_id: frozenset(ids) for version_id, ids in covered.items()}
