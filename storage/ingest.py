"""Recording received instances and turning quiet studies into study versions and jobs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import exists, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

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


def instance_exists(db: Database, sop_uid: str) -> bool:
    with db.session() as session:
        return session.scalar(select(exists().where(Instance.sop_instance_uid == sop_uid))) or False


def record_instance(db: Database, item: ReceivedInstance) -> bool:
    """Insert the instance row (and its study/series); False when the SOP UID is already known.

    The study row is touched first so that, on PostgreSQL, its row lock orders this insert
    against the completion scheduler (see close_quiet_study).
    """
    try:
        with db.session() as session:
            if session.scalar(select(Instance.id).where(Instance.sop_instance_uid == item.sop_uid)):
                return False
            study = _touch_study(session, item)
            series = _get_series(session, study, item)
            session.add(_instance_row(item, study, series))
        return True
    except IntegrityError:
        # Two associations raced on the same new UID; the other one recorded it.
        if instance_exists(db, item.sop_uid):
            return False
        raise


def _touch_study(session: Session, item: ReceivedInstance) -> Study:
    now = utcnow()
    study = session.scalar(
        select(Study).where(Study.study_instance_uid == item.study_uid).with_for_update()
    )
    if study is None:
        study = Study(
            study_instance_uid=item.study_uid,
            patient_hash=item.patient_hash,
            modality=item.modality,
            calling_ae=item.calling_ae,
            first_received_at=now,
        )
        session.add(study)
    study.last_received_at = now
    study.has_unversioned = True
    session.flush()
    return study


def _get_series(session: Session, study: Study, item: ReceivedInstance) -> Series:
    series = session.scalar(select(Series).where(Series.series_instance_uid == item.series_uid))
    if series is None:
        series = Series(
            study_id=study.id,
            series_instance_uid=item.series_uid,
            modality=item.modality,
            body_part=item.body_part,
        )
        session.add(series)
        session.flush()
    return series


def _instance_row(item: ReceivedInstance, study: Study, series: Series) -> Instance:
    return Instance(
        study_id=study.id,
        series_id=series.id,
        sop_instance_uid=item.sop_uid,
        sop_class_uid=item.sop_class_uid,
        transfer_syntax_uid=item.transfer_syntax_uid,
        path=item.relpath,
        size_bytes=item.size_bytes,
        calling_ae=item.calling_ae,
        instance_number=item.instance_number,
        received_at=utcnow(),
    )


QuietPeriod = Callable[[str, str], float]  # (modality, calling AE) -> seconds


def close_quiet_studies(db: Database, quiet_seconds: QuietPeriod) -> list[int]:
    """Make a version + job for each study quiet for its rule's period; return the job ids."""
    with db.session() as session:
        candidates = session.execute(
            select(Study.id, Study.modality, Study.calling_ae, Study.last_received_at).where(
                Study.has_unversioned.is_(True)
            )
        ).all()
    now = utcnow()
    job_ids = []
    for study_id, modality, calling_ae, last_received in candidates:
        if now - last_received < timedelta(seconds=quiet_seconds(modality, calling_ae)):
            continue
        job_id = close_quiet_study(db, study_id, last_received)
        if job_id is not None:
            job_ids.append(job_id)
    return job_ids


def close_quiet_study(db: Database, study_id: int, seen_last_received: datetime) -> int | None:
    """Record a version covering every instance of the study, and queue its job.

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
        instances = session.scalars(select(Instance).where(Instance.study_id == study_id)).all()
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
        session.add(job)
        session.flush()
        study_uid = session.scalar(select(Study.study_instance_uid).where(Study.id == study_id))
        session.add(
            AuditEvent(
                kind="study.version_created",
                study_instance_uid=study_uid,
                detail={"version": number, "instances": len(instances), "job_id": job.id},
            )
        )
        return job.id
