"""The worklist: studies with a status derived in SQL, filtered and paged in the database.

Status of a study (first rule that applies), from its newest version's job, the newest report
of that version (a report appended to from a conversation supersedes the job's) and that
report's deliveries:

    receiving     instances arrived that no version covers yet (the quiet period runs)
    out_of_scope  the job was skipped as outside the validated scope
    cancelled     the job was cancelled (by an operator, or its MPPS was DISCONTINUED)
    failed        the job failed for good
    reporting     the job is running
    waiting       the job is queued but not due: a failed attempt waits for its retry
    queued        the job is queued and due
    failed        a delivery of the report was given up (dead)
    delivered     every delivery of the report was sent
    reported      otherwise (deliveries pending, or no destination configured)

Patient name/ID, study date, accession and description are not database columns (the
database keeps only a salted hash of the patient): they are read from the header of one
stored instance per study on the page.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from pydicom import dcmread
from sqlalchemy import (
    ColumnElement,
    Select,
    and_,
    case,
    exists,
    func,
    literal,
    or_,
    select,
)
from sqlalchemy.orm import Session, aliased

from api.schemas import Patient, StudyStatus, StudySummary
from storage.models import (
    Instance,
    Job,
    JobStatus,
    OutboxItem,
    OutboxStatus,
    Report,
    Series,
    Study,
    StudyVersion,
    TZDateTime,
    utcnow,
)

SKIPPED_JOB_STATUS = "skipped"  # set by the scope check (outside the validated scope)
HEADER_TAGS = [
    "SpecificCharacterSet",  # PS3.5 §6.1: needed to decode the names below
    "PatientName",
    "PatientID",
    "StudyDate",
    "AccessionNumber",
    "StudyDescription",
]


@dataclass(frozen=True)
class StudyFilters:
    statuses: list[StudyStatus]
    modality: str | None
    since: datetime | None
    until: datetime | None
    text: str | None


@dataclass(frozen=True)
class HeaderFields:
    patient: Patient
    study_date: str | None = None
    accession_number: str | None = None
    study_description: str | None = None


def _outbox_counts() -> Any:
    def counted(state: OutboxStatus) -> Any:
        return func.sum(case((OutboxItem.status == state, 1), else_=0))

    return (
        select(
            OutboxItem.report_id.label("report_id"),
            func.count().label("total"),
            counted(OutboxStatus.PENDING).label("pending"),
            counted(OutboxStatus.DEAD).label("dead"),
        )
        .group_by(OutboxItem.report_id)
        .subquery("outbox_counts")
    )


def status_rows() -> Select[Any]:
    """One row per study: its id and derived status."""
    now = literal(utcnow(), TZDateTime())
    newest_version = (
        select(func.max(StudyVersion.id))
        .where(StudyVersion.study_id == Study.id)
        .correlate(Study)
        .scalar_subquery()
    )
    newest_report = (
        select(func.max(Report.id))
        .where(Report.study_version_id == newest_version)
        .scalar_subquery()
    )
    counts = _outbox_counts()
    derived = case(
        (Study.has_unversioned.is_(True), StudyStatus.RECEIVING.value),
        (Job.id.is_(None), StudyStatus.RECEIVING.value),
        (Job.status == SKIPPED_JOB_STATUS, StudyStatus.OUT_OF_SCOPE.value),
        (Job.status == JobStatus.CANCELLED.value, StudyStatus.CANCELLED.value),
        (Job.status == JobStatus.FAILED.value, StudyStatus.FAILED.value),
        (Job.status == JobStatus.RUNNING.value, StudyStatus.REPORTING.value),
        (
            and_(Job.status == JobStatus.QUEUED.value, Job.available_at > now),
            StudyStatus.WAITING.value,
        ),
        (Job.status == JobStatus.QUEUED.value, StudyStatus.QUEUED.value),
        (func.coalesce(counts.c.dead, 0) > 0, StudyStatus.FAILED.value),
        (
            and_(func.coalesce(counts.c.total, 0) > 0, func.coalesce(counts.c.pending, 0) == 0),
            StudyStatus.DELIVERED.value,
        ),
        else_=StudyStatus.REPORTED.value,
    )
    return (
        select(Study.id.label("study_id"), derived.label("status"))
        .outerjoin(Job, Job.study_version_id == newest_version)
        .outerjoin(counts, counts.c.report_id == newest_report)
    )


def _text_matches(text: str) -> ColumnElement[bool]:
    """Study UID, calling AE, modality, a series' body part or the text of a report."""
    # Aliases: the status query joins reports itself; these look at every report of the study.
    any_series, any_report = aliased(Series), aliased(Report)
    return or_(
        Study.study_instance_uid.icontains(text, autoescape=True),
        Study.calling_ae.icontains(text, autoescape=True),
        Study.modality.icontains(text, autoescape=True),
        exists(
            select(any_series.id)
            .where(
                any_series.study_id == Study.id,
                any_series.body_part.icontains(text, autoescape=True),
            )
            .correlate(Study)
        ),
        exists(
            select(any_report.id)
            .where(
                any_report.study_id == Study.id,
                any_report.raw_text.icontains(text, autoescape=True),
            )
            .correlate(Study)
        ),
    )


def _filtered(filters: StudyFilters) -> Any:
    rows = status_rows()
    if filters.modality:
        rows = rows.where(func.upper(Study.modality) == filters.modality.upper())
    if filters.since is not None:
        rows = rows.where(Study.first_received_at >= filters.since)
    if filters.until is not None:
        rows = rows.where(Study.first_received_at < filters.until)
    if filters.text:
        rows = rows.where(_text_matches(filters.text))
    derived = rows.subquery("derived")
    if filters.statuses:
        return derived, derived.c.status.in_([s.value for s in filters.statuses])
    return derived, None


@dataclass(frozen=True)
class StudyRow:
    study: Study
    status: StudyStatus
    report_id: int | None
    urgency: str | None
    series_count: int
    instance_count: int
    body_part: str
    first_instance_path: str | None


def list_studies(
    session: Session, filters: StudyFilters, limit: int, offset: int
) -> tuple[list[StudyRow], int]:
    """A page of studies, newest first, and how many match in all."""
    derived, status_filter = _filtered(filters)
    conditions = [status_filter] if status_filter is not None else []
    total = session.scalar(select(func.count()).select_from(derived).where(*conditions)) or 0
    page = session.execute(
        select(Study, derived.c.status)
        .join(derived, derived.c.study_id == Study.id)
        .where(*conditions)
        .order_by(Study.first_received_at.desc(), Study.id.desc())
        .limit(limit)
        .offset(offset)
    ).all()
    return [_with_counts(session, *row) for row in page], int(total)


def study_row(session: Session, study_uid: str) -> StudyRow | None:
    derived = status_rows().where(Study.study_instance_uid == study_uid).subquery("derived")
    row = session.execute(
        select(Study, derived.c.status).join(derived, derived.c.study_id == Study.id)
    ).first()
    return _with_counts(session, *row) if row is not None else None


def _with_counts(session: Session, study: Study, status: str) -> StudyRow:
    series = session.execute(
        select(func.count(Series.id), func.max(Series.body_part)).where(Series.study_id == study.id)
    ).one()
    instances = session.execute(
        select(func.count(Instance.id), func.min(Instance.id)).where(Instance.study_id == study.id)
    ).one()
    first_path = (
        session.scalar(select(Instance.path).where(Instance.id == instances[1]))
        if instances[1] is not None
        else None
    )
    newest_report = session.execute(
        select(Report.id, Report.urgency)
        .where(Report.study_id == study.id)
        .order_by(Report.id.desc())
        .limit(1)
    ).first()
    return StudyRow(
        study=study,
        status=StudyStatus(status),
        report_id=newest_report[0] if newest_report else None,
        urgency=newest_report[1] if newest_report else None,
        series_count=int(series[0]),
        instance_count=int(instances[0]),
        body_part=str(series[1] or ""),
        first_instance_path=first_path,
    )


def read_header(data_dir: Path, relpath: str | None) -> HeaderFields:
    """Patient and study attributes from one stored instance; empty when unreadable."""
    if relpath is None:
        return HeaderFields(Patient())
    try:
        ds = dcmread(data_dir / relpath, stop_before_pixels=True, specific_tags=HEADER_TAGS)
    except (OSError, ValueError, EOFError):  # pruned or damaged file: show what the DB has
        return HeaderFields(Patient())

    def text(keyword: str) -> str | None:
        value = ds.get(keyword)
        return str(value) if value not in (None, "") else None

    return HeaderFields(
        patient=Patient(name=text("PatientName"), id=text("PatientID")),
        study_date=text("StudyDate"),
        accession_number=text("AccessionNumber"),
        study_description=text("StudyDescription"),
    )


def summary(row: StudyRow, data_dir: Path) -> dict[str, Any]:
    """The fields of StudySummary for one row (a dict, so StudyDetail can extend it)."""
    header = read_header(data_dir, row.first_instance_path)
    study = row.study
    return StudySummary(
        study_instance_uid=study.study_instance_uid,
        status=row.status,
        modality=study.modality,
        body_part=row.body_part,
        calling_ae=study.calling_ae,
        first_received_at=study.first_received_at,
        last_received_at=study.last_received_at,
        series_count=row.series_count,
        instance_count=row.instance_count,
        patient=header.patient,
        study_date=header.study_date,
        accession_number=header.accession_number,
        study_description=header.study_description,
        latest_report_id=row.report_id,
        urgency=row.urgency,
    ).model_dump()
