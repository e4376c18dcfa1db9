"""Pydantic models of every request and response: the OpenAPI document is the contract.

Times are UTC ISO 8601. Patient name and ID (DICOM PN/LO as received, read from the stored
header) appear only in responses to signed-in users; the database holds a salted hash only.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field

from storage.models import OutboxStatus, UserRole
from storage.report_schema import ModelIdentity, PriorComparison, ReportContent


class StudyStatus(StrEnum):
    """Where a study is, derived from its newest version, job, report and deliveries."""

    RECEIVING = "receiving"  # instances arrived that no version covers yet (quiet period)
    WAITING = "waiting"  # its job failed an attempt and waits for the retry
    QUEUED = "queued"  # its job waits for the inference worker
    REPORTING = "reporting"  # the worker is running it
    REPORTED = "reported"  # a report exists; deliveries pending (or none configured)
    DELIVERED = "delivered"  # every delivery of the report was sent
    FAILED = "failed"  # the job failed for good, or a delivery was given up (dead)
    OUT_OF_SCOPE = "out_of_scope"  # skipped: outside the model's validated scope
    CANCELLED = "cancelled"  # its job was cancelled (`jobs cancel`, or MPPS DISCONTINUED)


class Health(BaseModel):
    status: str = Field(examples=["ok"])


class ScpCheck(BaseModel):
    listening: bool
    ae_title: str
    host: str
    port: int
    error: str | None = None


class DatabaseCheck(BaseModel):
    reachable: bool
    error: str | None = None


class ModelCheck(BaseModel):
    loaded: bool
    status: str = Field(description="'loaded', 'missing weights', 'not loaded', 'error', ...")
    message: str | None = Field(
        default=None, description="Why not loaded; for missing weights, how to provide them"
    )
    identity: ModelIdentity | None = None


class Readiness(BaseModel):
    ready: bool
    reasons: list[str] = Field(description="Why not ready; empty when ready")
    scp: ScpCheck
    database: DatabaseCheck
    model: ModelCheck


class Me(BaseModel):
    name: str
    role: UserRole


class Patient(BaseModel):
    """As received in the DICOM header (PS3.3 C.7.1.1); None when not stored or unreadable."""

    name: str | None = None
    id: str | None = None


class StudySummary(BaseModel):
    study_instance_uid: str
    status: StudyStatus
    modality: str
    body_part: str
    calling_ae: str
    first_received_at: datetime
    last_received_at: datetime
    series_count: int
    instance_count: int
    patient: Patient
    study_date: str | None = Field(default=None, description="DICOM DA, YYYYMMDD")
    accession_number: str | None = None
    study_description: str | None = None
    latest_report_id: int | None = None
    urgency: str | None = Field(default=None, description="Of the newest report")


class StudyPage(BaseModel):
    items: list[StudySummary]
    total: int = Field(description="Studies matching the filters")
    limit: int
    offset: int


class InstanceOut(BaseModel):
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    instance_number: int | None
    size_bytes: int
    calling_ae: str
    received_at: datetime


class SeriesOut(BaseModel):
    series_instance_uid: str
    modality: str
    body_part: str
    instances: list[InstanceOut]


class JobOut(BaseModel):
    id: int
    study_instance_uid: str
    version_number: int
    status: str = Field(description="queued | running | done | failed (| skipped)")
    priority: int
    attempts: int
    available_at: datetime
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    last_error: str | None
    lease_owner: str | None


class VersionOut(BaseModel):
    version_number: int
    created_at: datetime
    sop_instance_uids: list[str]
    job_id: int | None


class ReportObjectOut(BaseModel):
    kind: str = Field(description="sr | gsps | pdf")
    sop_class_uid: str
    sop_instance_uid: str


class ReportSummary(BaseModel):
    id: int
    version_number: int
    created_at: datetime
    parse_status: str
    urgency: str | None
    is_test_model: bool
    supersedes_report_id: int | None = Field(
        default=None, description="The report this version replaces (appended conversation)"
    )
    objects: list[ReportObjectOut]


class DeliveryOut(BaseModel):
    id: int
    report_id: int
    destination: str
    kind: str
    status: OutboxStatus
    attempts: int
    message_id: str
    created_at: datetime
    next_attempt_at: datetime
    sent_at: datetime | None
    last_error: str | None


class StudyDetail(StudySummary):
    series: list[SeriesOut]
    versions: list[VersionOut]
    jobs: list[JobOut]
    reports: list[ReportSummary]
    deliveries: list[DeliveryOut]


class ReportOut(ReportSummary):
    study_instance_uid: str
    language: str
    question: str
    raw_text: str = Field(description="The model's text as generated")
    content: ReportContent
    model: ModelIdentity
    timings: dict[str, Any]
    disclaimer: str = Field(description="What this is: AI output, preliminary, unverified")
    prior: PriorComparison | None = Field(
        default=None,
        description="[priors]: the prior study compared with, or why there was none",
    )
    prior_statement: str | None = Field(
        default=None,
        description="The comparison line of the report's SR, ORU and PDF, in the report's "
        "language: what it was compared with, or why no prior was",
    )


class JobPage(BaseModel):
    items: list[JobOut]
    total: int
    limit: int
    offset: int


class RetryResult(BaseModel):
    id: int
    previous_status: str
    status: str


class RetryDeadResult(BaseModel):
    count: int = Field(description="Dead deliveries made pending again")
