"""Reads of stored reports that the output builders need.

    document = report_document(session, report)        # the Report row as a ReportDocument
    paths = source_instance_paths(session, report.study_version_id)
    path = predecessor_sr_path(session, study_uid, report_id)

``predecessor_sr_path`` finds the SR of the newest earlier report of the same study: the
document a new SR names in its Predecessor Documents Sequence (PS3.3 C.17.2.1). Reading that
file's identity is the SR builder's business (dicom_node.sr.SrReference).
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.models import Instance, Report, ReportObject, Study, StudyVersion
from storage.report_schema import ModelIdentity, ReportContent, ReportDocument


def report_document(session: Session, report: Report) -> ReportDocument:
    """The validated document of a Report row (content and model as pydantic models)."""
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
    )


def source_instance_paths(session: Session, study_version_id: int) -> list[str]:
    """The files (relative to the data directory) of the instances a study version covers,
    in the order they were stored."""
    return list(
        session.scalars(
            select(Instance.path)
            .join(StudyVersion.instances)
            .where(StudyVersion.id == study_version_id)
            .order_by(Instance.id)
        )
    )


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
