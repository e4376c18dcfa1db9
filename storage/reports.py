"""Reads of stored reports that the output builders need.

    document = report_document(session, report)        # the Report row as a ReportDocument
    paths = source_paths(session, report.study_version_id, wanted_uids)
    path = predecessor_sr_path(session, study_uid, report_id)
    superseded = latest_report_id(session, study_id)     # before a new report of the study
    stored = stored_report(db, report_id)              # delivery side: a PDF built on demand

``predecessor_sr_path`` finds the SR of the newest earlier report of the same study: the
document a new SR names in its Predecessor Documents Sequence (PS3.3 C.17.2.1). Reading that
file's identity is the SR builder's business (dicom_node.sr.SrReference).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.db import Database
from storage.models import Instance, Report, ReportObject, Study, StudyVersion
from storage.priors import prior_comparison
from storage.report_schema import ModelIdentity, PriorComparison, ReportContent, ReportDocument


def report_document(
    session: Session, report: Report, own_prior: PriorComparison | None = None
) -> ReportDocument:
    """The validated document of a Report row (content and model as pydantic models).
    ``own_prior``: the report's prior link when its row is not written yet (the worker builds
    the outputs first: inference/report_store.py)."""
    version = session.get_one(StudyVersion, report.study_version_id)
    study = session.get_one(Study, report.study_id)
    return ReportDocument(
        report_id=report.id,
        study_instance_uid=study.study_instance_uid,
        version_number=version.version_number,
        created_at=report.created_at,
        content=ReportContent.model_validate(report.content_json),
        model=ModelIdentity.model_validate(report.model_json),
        question=report.question,
        source_sop_instance_uids=list(report.timings_json.get("source_sop_instance_uids", [])),
        supersedes_report_id=report.supersedes_report_id,
        prior=own_prior or _prior_of(session, report),
    )


def latest_report_id(session: Session, study_id: int) -> int | None:
    """The study's newest report: the one a new report of the study supersedes (a new study
    version after late instances, a re-run), or None for the study's first."""
    return session.scalar(
        select(Report.id).where(Report.study_id == study_id).order_by(Report.id.desc()).limit(1)
    )


def _prior_of(session: Session, report: Report) -> PriorComparison | None:
    """The report's own prior link; a report appended to from a conversation keeps the
    comparison of the report it supersedes."""
    seen: set[int] = set()
    current: Report | None = report
    while current is not None and current.id not in seen:
        seen.add(current.id)
        found = prior_comparison(session, current.id)
        if found is not None or current.supersedes_report_id is None:
            return found
        current = session.get(Report, current.supersedes_report_id)
    return None


def source_paths(session: Session, study_version_id: int, wanted: list[str]) -> list[str]:
    """The files (relative to the data directory) of the version's instances whose SOP
    Instance UIDs are in ``wanted`` (the images the model saw), in the order they were stored;
    the version's first instance when none is (a report without that list)."""
    instances = session.execute(
        select(Instance.sop_instance_uid, Instance.path)
        .join(StudyVersion.instances)
        .where(StudyVersion.id == study_version_id)
        .order_by(Instance.id)
    ).all()
    chosen = set(wanted)
    paths = [path for uid, path in instances if uid in chosen]
    return paths or [path for _, path in instances[:1]]


def predecessor_sr_path(session: Session, study_instance_uid: str, report_id: int) -> str | None:
    """The SR file (relative to the data directory) of the newest report of the same study
    made before ``report_id``, or None when this is the study's first."""
    row = session.execute(
        select(ReportObject.path)
        .join(Report, Report.id == ReportObject.report_id)
        .join(Study, Study.id == Report.study_id)
        .where(
            Study.study_instance_uid == study_instance_uid,
            Report.id < report_id,
            ReportObject.kind == "sr",
        )
        .order_by(Report.id.desc())
        .limit(1)
    ).first()
    return None if row is None else str(row[0])


@dataclass(frozen=True)
class StoredReport:
    """A report as the delivery side rebuilds an output from it, outside the worker's
    transaction: the document, its source files (the images the model saw, else the study
    version's first) and the time of the report it supersedes, if any."""

    document: ReportDocument
    source_paths: list[str]  # relative to the data directory
    superseded_at: datetime | None


def stored_report(db: Database, report_id: int) -> StoredReport:
    """LookupError when there is no such report."""
    with db.session() as session:
        report = session.get(Report, report_id)
        if report is None:
            raise LookupError(f"report {report_id} does not exist")
        document = report_document(session, report)
        paths = source_paths(session, report.study_version_id, document.source_sop_instance_uids)
        superseded = (
            session.get(Report, report.supersedes_report_id)
            if report.supersedes_report_id is not None
            else None
        )
        return StoredReport(
            document=document,
            source_paths=paths,
            superseded_at=superseded.created_at if superseded is not None else None,
        )
