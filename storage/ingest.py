"""Recording received instances and turning quiet studies into study versions and jobs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    Connection,
    CursorResult,
    Table,
    bindparam,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from storage.db import Database
from storage.models import (
    AuditEvent,
    Instance,
    Job,
    JobStatus,
    Series,
    Study,
    StudyVersion,
    utcnow,
)
from storage.mpps import Verdict, studies_with_steps, verdict


@dataclass(frozen=True)
class ReceivedInstance:
    """What the SCP knows about one stored instance (file already durable)."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    relpath: str
    size_bytes: int
    calling_ae: str
    modality: str
    body_part: str
    instance_number: int | None
    patient_hash: str


# The per-C-STORE statements, built once on the tables (not the ORM classes): building and
# compiling statements per call cost more CPU than the rest of the C-STORE handler.
_INSTANCES = cast(Table, Instance.__table__)
_SERIES = cast(Table, Series.__table__)
_STUDIES = cast(Table, Study.__table__)
_FIND_INSTANCE = select(_INSTANCES.c.id).where(_INSTANCES.c.sop_instance_uid == bindparam("uid"))
_LOCK_STUDY = (
    select(_STUDIES.c.id).where(_STUDIES.c.study_instance_uid == bindparam("uid")).with_for_update()
)
_FIND_SERIES = select(_SERIES.c.id).where(_SERIES.c.series_instance_uid == bindparam("uid"))
_TOUCH_STUDY = (
    update(_STUDIES)
    .where(_STUDIES.c.id == bindparam("study_id"))
    .values(last_received_at=bindparam("now"), has_unversioned=True)
)


def instance_exists(db: Database, sop_uid: str) -> bool:
    with db.connect() as connection:
        return connection.scalar(_FIND_INSTANCE, {"uid": sop_uid}) is not None


RECORD_ATTEMPTS = 3


def record_instance(db: Database, item: ReceivedInstance) -> bool:
    """Insert the instance row (and its study/series); False when the SOP UID is already known.

    The study row is touched first so that, on PostgreSQL, its row lock orders this insert
    against the completion scheduler (see close_quiet_study).
    """
    for attempt in range(1, RECORD_ATTEMPTS + 1):
        try:
            with db.begin() as connection:
                return _record(connection, item)
        except IntegrityError:
            # Two associations raced to create the same study, series or instance; the
            # other one committed first, so the next attempt finds its rows.
            if attempt == RECORD_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


def _record(connection: Connection, item: ReceivedInstance) -> bool:
    if connection.scalar(_FIND_INSTANCE, {"uid": item.sop_uid}) is not None:
        return False
    study_id = _touch_study(connection, item)
    series_id = _series_id(connection, study_id, item)
    connection.execute(insert(_INSTANCES), _instance_values(item, study_id, series_id))
    return True


def _touch_study(connection: Connection, item: ReceivedInstance) -> int:
    now = utcnow()
    study_id = connection.scalar(_LOCK_STUDY, {"uid": item.study_uid})
    if study_id is None:
        values = {
            "study_instance_uid": item.study_uid,
            "patient_hash": item.patient_hash,
            "modality": item.modality,
            "calling_ae": item.calling_ae,
            "first_received_at": now,
            "last_received_at": now,
            "has_unversioned": True,
        }
        return _new_id(connection.execute(insert(_STUDIES), values))
    connection.execute(_TOUCH_STUDY, {"study_id": study_id, "now": now})
    return int(study_id)


def _series_id(connection: Connection, study_id: int, item: ReceivedInstance) -> int:
    series_id = connection.scalar(_FIND_SERIES, {"uid": item.series_uid})
    if series_id is None:
        values = {
            "study_id": study_id,
            "series_instance_uid": item.series_uid,
            "modality": item.modality,
            "body_part": item.body_part,
        }
        return _new_id(connection.execute(insert(_SERIES), values))
    return int(series_id)


def _new_id(result: CursorResult[Any]) -> int:
    key = result.inserted_primary_key
    assert key is not None, "INSERT returned no primary key"
    return int(key[0])


def _instance_values(item: ReceivedInstance, study_id: int, series_id: int) -> dict[str, object]:
    return {
        "study_id": study_id,
        "series_id": series_id,
        "sop_instance_uid": item.sop_uid,
        "sop_class_uid": item.sop_class_uid,
        "transfer_syntax_uid": item.transfer_syntax_uid,
        "path": item.relpath,
        "size_bytes": item.size_bytes,
        "calling_ae": item.calling_ae,
        "instance_number": item.instance_number,
        "received_at": utcnow(),
    }


QuietPeriod = Callable[[str, str], float]  # (modality, calling AE) -> seconds


def close_quiet_studies(db: Database, quiet_seconds: QuietPeriod) -> list[int]:
    """Make a version + job for each study quiet for its rule's period; return the job ids."""
    return close_and_schedule(db, quiet_seconds).job_ids


@dataclass(frozen=True)
class CompletionRound:
    job_ids: list[int]
    next_due_s: float | None  # seconds until the next open study becomes quiet, if any


def close_and_schedule(
    db: Database, quiet_seconds: QuietPeriod, *, use_mpps: bool = False
) -> CompletionRound:
    """close_quiet_studies, also saying when to look again (so the scheduler need not poll).

    ``use_mpps``: a study whose performed procedure steps say it is complete does not wait
    for its quiet period; one whose steps were all discontinued is not processed
    (storage/mpps.py).
    """
    with db.session() as session:
        candidates = session.execute(
            select(
                Study.id,
                Study.study_instance_uid,
                Study.modality,
                Study.calling_ae,
                Study.last_received_at,
            ).where(Study.has_unversioned.is_(True))
        ).all()
        uids = [str(uid) for _, uid, *_ in candidates]
        with_steps = studies_with_steps(session, uids) if use_mpps else set()
    now = utcnow()
    job_ids: list[int] = []
    waits: list[float] = []
    for study_id, study_uid, modality, calling_ae, last_received in candidates:
        remaining = quiet_seconds(modality, calling_ae) - (now - last_received).total_seconds()
        step = Verdict.QUIET_PERIOD
        if study_uid in with_steps:
            with db.session() as session:
                step = verdict(session, study_id, study_uid)
        if remaining > 0 and step != Verdict.COMPLETE:
            waits.append(remaining)
            continue
        cancel = "MPPS DISCONTINUED: not processed" if step == Verdict.DISCONTINUED else None
        job_id = close_quiet_study(
            db, study_id, last_received, cancelled_reason=cancel, completed_by=step.value
        )
        if job_id is not None and cancel is None:
            job_ids.append(job_id)
    return CompletionRound(job_ids, min(waits) if waits else None)


def close_quiet_study(
    db: Database,
    study_id: int,
    seen_last_received: datetime,
    *,
    cancelled_reason: str | None = None,
    completed_by: str = "quiet_period",
) -> int | None:
    """Record a version covering every instance of the study, and queue its job (or, with
    ``cancelled_reason``, record it cancelled: the worker never runs it).

    The guarded UPDATE is the claim: if an instance arrived since we looked, last_received_at
    moved and nothing happens now; the study is picked up again after its next quiet period.
    """
    with db.session() as session:
        claimed = session.execute(
            update(Study)
            .where(
                Study.id == study_id,
                Study.has_unversioned.is_(True),
                Study.last_received_at == seen_last_received,
            )
            .values(has_unversioned=False)
        )
        if claimed.rowcount != 1:  # type: ignore[attr-defined]
            return None
        # Instances whose files retention deleted are no longer part of the study's versions.
        instances = session.scalars(
            select(Instance).where(Instance.study_id == study_id, Instance.pruned_at.is_(None))
        ).all()
        number = (
            session.scalar(
                select(func.max(StudyVersion.version_number)).where(
                    StudyVersion.study_id == study_id
                )
            )
            or 0
        ) + 1
        version = StudyVersion(study_id=study_id, version_number=number, instances=list(instances))
        session.add(version)
        session.flush()
        job = Job(study_version_id=version.id, status=JobStatus.QUEUED)
        if cancelled_reason is not None:
            job.status, job.last_error, job.finished_at = (
                JobStatus.CANCELLED,
                cancelled_reason,
                utcnow(),
            )
        session.add(job)
        session.flush()
        study_uid = session.scalar(select(Study.study_instance_uid).where(Study.id == study_id))
        session.add(
            AuditEvent(
                kind="study.version_created",
                study_instance_uid=study_uid,
                detail={
                    "version": number,
                    "instances": len(instances),
                    "job_id": job.id,
                    "job_status": job.status,
                    "completed_by": completed_by,
                },
            )
        )
        return job.id
