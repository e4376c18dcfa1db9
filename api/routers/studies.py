"""Studies: the worklist, one study with everything the node did with it, reports, images."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path as FilePath
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Path, Query, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.deps import ApiContext, Context, DbSession, Viewer
from api.images import (
    Box,
    RenderError,
    model_view,
    png_bytes,
    read_instance,
    render_frame,
    sized_view,
)
from api.schemas import (
    DeliveryOut,
    InstanceOut,
    JobOut,
    ReportObjectOut,
    ReportOut,
    ReportSummary,
    SeriesOut,
    StudyDetail,
    StudyPage,
    StudyStatus,
    StudySummary,
    VersionOut,
)
from api.worklist import StudyFilters, list_studies, study_row, summary
from core.errors import ConfigError, NodeError
from delivery.preparing_sender import PayloadInputMissing
from storage.files import uid_component
from storage.models import (
    Instance,
    Job,
    OutboxItem,
    Report,
    Series,
    Study,
    StudyVersion,
)
from storage.priors import prior_comparison
from storage.report_schema import (
    AI_DISCLAIMER,
    TEST_MODEL_BANNER,
    ModelIdentity,
    ReportContent,
)

router = APIRouter(prefix="/api/studies", tags=["studies"])

# DICOM UIDs are at most 64 characters (PS3.5 §9.1).
StudyUID = Annotated[str, Path(min_length=1, max_length=64, description="Study Instance UID")]
SopUID = Annotated[str, Path(min_length=1, max_length=64, description="SOP Instance UID")]
ReportId = Annotated[int, Path(ge=1, description="Report id")]


def _utc(value: datetime | None) -> datetime | None:
    """Times without a zone are read as UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


@router.get("", response_model=StudyPage, summary="The worklist, newest first")
def worklist(
    context: Context,
    session: DbSession,
    _user: Viewer,
    status_: Annotated[
        list[StudyStatus], Query(alias="status", description="Only these statuses (repeatable)")
    ] = [],  # noqa: B006 - FastAPI copies query defaults per request
    modality: Annotated[
        str | None, Query(max_length=16, pattern=r"^[A-Za-z0-9_]+$", description="e.g. CR")
    ] = None,
    since: Annotated[
        datetime | None,
        Query(description="Received at or after (ISO 8601; a date means its midnight, UTC)"),
    ] = None,
    until: Annotated[datetime | None, Query(description="Received before (ISO 8601)")] = None,
    q: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=128,
            description="Text in the study UID, calling AE, modality, body part or report",
        ),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> StudyPage:
    since, until = _utc(since), _utc(until)
    if since is not None and until is not None and until <= since:
        # The same shape as FastAPI's own 422 answers: one error naming the parameter.
        error = {"type": "value_error", "loc": ("query", "until"), "msg": "must be after since"}
        raise RequestValidationError([{**error, "input": until.isoformat()}])
    filters = StudyFilters(status_, modality, since, until, q)
    rows, total = list_studies(session, filters, limit, offset)
    items = [StudySummary.model_validate(summary(row, context.data_dir)) for row in rows]
    return StudyPage(items=items, total=total, limit=limit, offset=offset)


def _study_or_404(session: Session, study_uid: str) -> Study:
    study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
    if study is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no study {study_uid}")
    return study


@router.get(
    "/{study_uid}",
    response_model=StudyDetail,
    summary="One study: series, instances, versions, jobs, reports, deliveries",
    responses={404: {"description": "No such study"}},
)
def study_detail(
    context: Context, session: DbSession, _user: Viewer, study_uid: StudyUID
) -> StudyDetail:
    row = study_row(session, study_uid)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no study {study_uid}")
    study = row.study
    return StudyDetail(
        **summary(row, context.data_dir),
        series=_series(session, study.id),
        versions=_versions(session, study.id),
        jobs=_jobs(session, study),
        reports=[_report_summary(session, r) for r in _reports(session, study.id)],
        deliveries=_deliveries(session, study.id),
    )


def _series(session: Session, study_id: int) -> list[SeriesOut]:
    found = session.scalars(select(Series).where(Series.study_id == study_id).order_by(Series.id))
    result = []
    for series in found:
        instances = session.scalars(
            select(Instance)
            .where(Instance.series_id == series.id)
            .order_by(Instance.instance_number, Instance.id)
        )
        result.append(
            SeriesOut(
                series_instance_uid=series.series_instance_uid,
                modality=series.modality,
                body_part=series.body_part,
                instances=[_instance(i) for i in instances],
            )
        )
    return result


def _instance(instance: Instance) -> InstanceOut:
    return InstanceOut(
        sop_instance_uid=instance.sop_instance_uid,
        sop_class_uid=instance.sop_class_uid,
        transfer_syntax_uid=instance.transfer_syntax_uid,
        instance_number=instance.instance_number,
        size_bytes=instance.size_bytes,
        calling_ae=instance.calling_ae,
        received_at=instance.received_at,
    )


def _versions(session: Session, study_id: int) -> list[VersionOut]:
    versions = session.scalars(
        select(StudyVersion)
        .where(StudyVersion.study_id == study_id)
        .order_by(StudyVersion.version_number)
    )
    return [
        VersionOut(
            version_number=version.version_number,
            created_at=version.created_at,
            sop_instance_uids=sorted(i.sop_instance_uid for i in version.instances),
            job_id=version.job.id if version.job is not None else None,
        )
        for version in versions
    ]


def job_out(job: Job, study_uid: str, version_number: int) -> JobOut:
    return JobOut(
        id=job.id,
        study_instance_uid=study_uid,
        version_number=version_number,
        status=job.status,
        priority=job.priority,
        attempts=job.attempts,
        available_at=job.available_at,
        created_at=job.created_at,
        updated_at=job.updated_at,
        finished_at=job.finished_at,
        last_error=job.last_error,
        lease_owner=job.lease_owner,
    )


def _jobs(session: Session, study: Study) -> list[JobOut]:
    rows = session.execute(
        select(Job, StudyVersion.version_number)
        .join(StudyVersion, StudyVersion.id == Job.study_version_id)
        .where(StudyVersion.study_id == study.id)
        .order_by(Job.id)
    ).all()
    return [job_out(job, study.study_instance_uid, number) for job, number in rows]


def _reports(session: Session, study_id: int) -> list[Report]:
    return list(
        session.scalars(select(Report).where(Report.study_id == study_id).order_by(Report.id))
    )


def _version_number(session: Session, report: Report) -> int:
    number = session.scalar(
        select(StudyVersion.version_number).where(StudyVersion.id == report.study_version_id)
    )
    return int(number or 0)


def _report_summary(session: Session, report: Report) -> ReportSummary:
    return ReportSummary(
        id=report.id,
        version_number=_version_number(session, report),
        created_at=report.created_at,
        parse_status=report.parse_status,
        urgency=report.urgency,
        is_test_model=report.is_test_model,
        supersedes_report_id=report.supersedes_report_id,
        objects=[
            ReportObjectOut(
                kind=o.kind, sop_class_uid=o.sop_class_uid, sop_instance_uid=o.sop_instance_uid
            )
            for o in sorted(report.objects, key=lambda o: o.id)
        ],
    )


def _deliveries(session: Session, study_id: int) -> list[DeliveryOut]:
    items = session.scalars(
        select(OutboxItem)
        .join(Report, Report.id == OutboxItem.report_id)
        .where(Report.study_id == study_id)
        .order_by(OutboxItem.id)
    )
    return [delivery_out(item) for item in items]


def delivery_out(item: OutboxItem) -> DeliveryOut:
    return DeliveryOut.model_validate(item, from_attributes=True)


def _report_or_404(session: Session, study_uid: str, report_id: int) -> Report:
    study = _study_or_404(session, study_uid)
    report = session.get(Report, report_id)
    if report is None or report.study_id != study.id:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no report {report_id} of this study")
    return report


@router.get(
    "/{study_uid}/reports/{report_id}",
    response_model=ReportOut,
    summary="One report as JSON, its DICOM SR file (?format=sr) or its PDF (?format=pdf)",
    responses={
        200: {
            "content": {"application/dicom": {}, "application/pdf": {}},
            "description": "JSON, the SR file, or the PDF report",
        },
        404: {
            "description": "No such study or report, the report has no SR, "
            "or the images its PDF shows are gone"
        },
        503: {"description": "PDF reports cannot be made here (a font is not installed)"},
    },
)
def report_detail(
    context: Context,
    session: DbSession,
    _user: Viewer,
    study_uid: StudyUID,
    report_id: ReportId,
    format: Annotated[
        Literal["json", "sr", "pdf"],
        Query(description="json (default), sr (application/dicom) or pdf (application/pdf)"),
    ] = "json",
) -> ReportOut | Response:
    report = _report_or_404(session, study_uid, report_id)
    if format == "sr":
        return _sr_file(context.data_dir, report)
    if format == "pdf":
        return _pdf_file(context, study_uid, report.id)
    summary_fields = _report_summary(session, report).model_dump()
    model = ModelIdentity.model_validate(report.model_json)
    disclaimer = (f"{TEST_MODEL_BANNER}. " if report.is_test_model else "") + AI_DISCLAIMER
    prior = prior_comparison(session, report.id)
    return ReportOut(
        **summary_fields,
        study_instance_uid=study_uid,
        language=report.language,
        question=report.question,
        raw_text=report.raw_text,
        content=ReportContent.model_validate(report.content_json),
        model=model,
        timings=report.timings_json or {},
        disclaimer=disclaimer,
        prior=prior,
        prior_statement=prior.statement(report.language) if prior is not None else None,
    )


def _sr_file(data_dir: FilePath, report: Report) -> FileResponse:
    sr = next((o for o in report.objects if o.kind == "sr"), None)
    if sr is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"report {report.id} has no SR")
    path = data_dir / sr.path
    if not path.is_file():
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"the SR of report {report.id} is gone")
    return FileResponse(path, media_type="application/dicom", filename=f"{sr.sop_instance_uid}.dcm")


def _pdf_file(context: ApiContext, study_uid: str, report_id: int) -> Response:
    """The report's PDF (issue 14), the same file the destinations get: built from the stored
    report and its source images on first request, then read back."""
    if context.report_pdf is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "PDF reports are not served here")
    try:
        pdf = context.report_pdf(report_id)
    except PayloadInputMissing as exc:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"the PDF of report {report_id} cannot be made: {exc}"
        ) from exc
    except ConfigError as exc:  # the font of the report's language is not installed
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from exc
    except NodeError as exc:
        raise HTTPException(
            status.HTTP_500_INTERNAL_SERVER_ERROR, f"the PDF of report {report_id} failed: {exc}"
        ) from exc
    # The name a file destination gives it (delivery/file_sender.py, write_pdf).
    name = f"{uid_component(study_uid)}_{report_id}_report.pdf"
    return Response(
        pdf,
        media_type="application/pdf",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


@router.get(
    "/{study_uid}/instances/{sop_uid}/image.png",
    response_class=Response,
    summary="An instance as PNG: as the model saw it, or at ?size=N; ?overlay=1 draws boxes",
    responses={
        200: {"content": {"image/png": {}}, "description": "The rendered image"},
        404: {"description": "No such study, instance or report"},
        422: {"description": "Bad parameters, or the stored image cannot be rendered"},
    },
)
def instance_image(
    context: Context,
    session: DbSession,
    _user: Viewer,
    study_uid: StudyUID,
    sop_uid: SopUID,
    size: Annotated[
        int | None,
        Query(
            ge=0,
            le=8192,
            description="Longer side in pixels, unpadded (0: as stored); "
            "absent: the padded 896 px square the model saw",
        ),
    ] = None,
    overlay: Annotated[bool, Query(description="Draw the report's boxes")] = False,
    report_id: Annotated[
        int | None, Query(ge=1, description="Whose boxes (default: the newest report)")
    ] = None,
    frame: Annotated[int, Query(ge=1, description="1-based frame of a multi-frame image")] = 1,
) -> Response:
    study = _study_or_404(session, study_uid)
    instance = session.scalar(
        select(Instance).where(Instance.sop_instance_uid == sop_uid, Instance.study_id == study.id)
    )
    if instance is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no instance {sop_uid} in this study")
    boxes = _overlay_boxes(session, study, sop_uid, frame, report_id) if overlay else []
    try:
        ds = read_instance(context.data_dir / instance.path)
        pixels = render_frame(ds, frame - 1)
    except FileNotFoundError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
    except RenderError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from exc
    image = model_view(pixels, sop_uid, boxes) if size is None else sized_view(pixels, size, boxes)
    return Response(png_bytes(image), media_type="image/png")


def _overlay_boxes(
    session: Session, study: Study, sop_uid: str, frame: int, report_id: int | None
) -> list[Box]:
    report: Report | None
    if report_id is not None:
        report = _report_or_404(session, study.study_instance_uid, report_id)
    else:
        report = session.scalar(
            select(Report).where(Report.study_id == study.id).order_by(Report.id.desc()).limit(1)
        )
    if report is None:
        return []
    content = ReportContent.model_validate(report.content_json)
    return [
        Box(finding.region, finding.label)
        for finding in content.findings
        if finding.region is not None
        and finding.region.sop_instance_uid == sop_uid
        and (finding.region.frame_number or 1) == frame
    ]
