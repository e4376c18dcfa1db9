"""SQLAlchemy 2.x models: what the node has received, what it must do, what it has sent.

Tables:
    studies ─< series ─< instances
    studies ─< study_versions >─< instances   (the set a job covers)
    study_versions ─ jobs ─ reports ─< report_objects
                             reports ─< outbox
                             reports ─ reports  (supersedes_report_id: a report appended to)
    studies ─< conversations ─< conversation_turns  (follow-up questions anchored to regions)
    interactive_requests   (the worker's priority lane: predict and conversation turns)
    audit_events   (the audit trail: storage/audit.py)
    mpps           (Modality Performed Procedure Steps received by N-CREATE / N-SET)
    installation   (one row: this installation's random id)
    id_counters    (report ids handed out before their row is written: storage/report_ids.py)
    users                        (REST API accounts; only a hash of each token)
    prior_studies ─< prior_instances   (the prior store: earlier studies fetched from PACS)
    reports ─ prior_links              (what each report was compared with, or why not)

Schema changes go through Alembic (storage/migrations); ``serve`` upgrades a fresh database.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Connection,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    event,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Mapper, mapped_column, relationship

UID = String(64)  # DICOM PS3.5 §9: a UID is at most 64 characters


def utcnow() -> datetime:
    return datetime.now(UTC)


class TZDateTime(TypeDecorator[datetime]):
    """UTC timestamps that come back timezone-aware on SQLite too (it stores naive text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given; use UTC-aware datetimes")
        if value is not None and dialect.name == "sqlite":
            return value.astimezone(UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"  # outside the validated scope with [scope] out_of_scope = "skip"
    # Set aside by an operator (`jobs cancel`) or because the modality discontinued the
    # procedure step (MPPS DISCONTINUED): never run unless retried.
    CANCELLED = "cancelled"


class InteractiveKind(StrEnum):
    PREDICT = "predict"
    CONVERSATION_TURN = "conversation_turn"


class ConversationState(StrEnum):
    OPEN = "open"
    APPENDED = "appended"  # its turns became a new report version; no more questions
    CLOSED = "closed"


class OutboxStatus(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    DEAD = "dead"


class UserRole(StrEnum):
    """REST API roles, each allowed what the one before it may do and more."""

    VIEWER = "viewer"  # read studies, reports, images
    RADIOLOGIST = "radiologist"  # ask questions, append to reports
    ADMIN = "admin"  # retry jobs and deliveries, purge, users


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True, index=True)
    patient_hash: Mapped[str] = mapped_column(String(32), default="")
    modality: Mapped[str] = mapped_column(String(16), default="")
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    first_received_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow)
    # True while instances exist that no study version covers yet (the scheduler's work list).
    has_unversioned: Mapped[bool] = mapped_column(Boolean, default=True, index=True)
    # When retention last deleted files of this study (migration 0007).
    pruned_at: Mapped[datetime | None] = mapped_column(TZDateTime(), nullable=True)

    series: Mapped[list[Series]] = relationship(back_populates="study")
    versions: Mapped[list[StudyVersion]] = relationship(
        back_populates="study", order_by="StudyVersion.version_number"
    )


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True, index=True)
    modality: Mapped[str] = mapped_column(String(16), default="")
    body_part: Mapped[str] = mapped_column(String(64), default="")

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


version_instances = Table(
    "study_version_instances",
    Base.metadata,
    Column("version_id", ForeignKey("study_versions.id"), primary_key=True),
    Column("instance_id", ForeignKey("instances.id"), primary_key=True),
)


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True, index=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(Text)  # relative to the data directory
    size_bytes: Mapped[int] = mapped_column(Integer)
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    received_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow)
    # Its file was deleted by retention (migration 0007): no later version covers it.
    pruned_at: Mapped[datetime | None] = mapped_column(TZDateTime(), nullable=True)

    series: Mapped[Series] = relationship(back_populates="instances")


class StudyVersion(Base):
    """The set of instances one job covers; a later arrival makes the next version."""

    __tablename__ = "study_versions"
    __table_args__ = (UniqueConstraint("study_id", "version_number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    version_number: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow)

    study: Mapped[Study] = relationship(back_populates="versions")
    instances: Mapped[list[Instance]] = relationship(secondary=version_instances)
    job: Mapped[Job | None] = relationship(back_populates="study_version")


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_version_id: Mapped[int] = mapped_column(ForeignKey("study_versions.id"), unique=True)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED, index=True)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    available_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow)
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(TZDateTime(), nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    last_traceback: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(TZDateTime(), nullable=True)

    study_version: Mapped[StudyVersion] = relationship(back_populates="job")


class Report(Base):
    """One report version of a study: a model run (job_id) or a report appended to from a
    conversation (job_id None, supersedes_report_id set; migration 0004)."""

    __tablename__ = "reports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), unique=True, nullable=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    study_version_id: Mapped[int] = mapped_column(ForeignKey("study_versions.id"))
    created_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow)
    language: Mapped[str] = mapped_column(String(16), default="en")
    parse_status: Mapped[str] = mapped_column(String(32))
    urgency: Mapped[str | None] = mapped_column(String(16), nullable=True)
    question: Mapped[str] = mapped_column(Text, default="")
    # The question came before the images (a question_first template; migration 0009): a
    # conversation replays the report's turn in that order.
    question_first: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    raw_text: Mapped[str] = mapped_column(Text, default="")
    content_json: Mapped[dict[str, Any]] = mapped_column(
        JSON
    )  # storage.report_schema.ReportContent
    model_json: Mapped[dict[str, Any]] = mapped_column(JSON)  # storage.report_schema.ModelIdentity
    timings_json: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    is_test_model: Mapped[bool] = mapped_column(Boolean, default=False)
    # The report this version replaces (PS3.3 C.17.2 Predecessor Documents; HL7 'C' result).
    supersedes_report_id: Mapped[int | None] = mapped_column(
        ForeignKey("reports.id"), nullable=True, index=True
    )
    # Its files under <data>/reports/<id>/ were deleted by retention (the row stays).
    outputs_pruned_at: Mapped[datetime | None] = mapped_column(TZDateTime(), nullable=True)

    objects: Mapped[list[ReportObject]] = relationship(back_populates="report")


@event.listens_for(Report, "before_insert")
def _report_id_from_counter(
    _mapper: Mapper[Report], connection: Connection, report: Report
) -> None:
    """A report added without an id takes the counter's next (storage/report_ids.py), so it
    never collides with an id handed out ahead to a report still being built."""
    if report.id is None:
        from storage.report_ids import take_report_ids  # it imports this module

        report.id = take_report_ids(connection, 1).start


class ReportObject(Base):
    """A built output object (SR, GSPS, PDF) on disk under <data>/reports/."""

    __tablename__ = "report_objects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    report_id: Mapped[int] = mapped_column(ForeignKey("reports.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # "sr" | "gsps" | "pdf"
    sop_class_uid: Mapped[str] = mapped_column(UID)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    path: Mapped[str] = mapped_column(Text)  # relative to the data directory
    created_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow)

    report: Mapped[Report] = relationship(back_populates="objects")


class OutboxItem(Base):
    """One object for one destination. Written in the report's transaction (README)."""

    __tablename__ = "outbox"
    __table_args__ = (
        UniqueConstraint("report_id", "destination", "object_id", "kind"),
        Index("ix_outbox_due", "destination", "status", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    report_id: Mapped[int] = mapped_column(ForeignKey("reports.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # "dicom" | "hl7" | "file" | "http"
    object_id: Mapped[int | None] = mapped_column(ForeignKey("report_objects.id"), nullable=True)
    # Fixed at creation so every retry sends the same thing (HL7 MSH-10, HTTP idempotency key).
    message_id: Mapped[str] = mapped_column(String(64))
    # The exact bytes to send (ORU message, JSON report), built once with the report; for DICOM
    # the object's file (report_objects.path). Relative to the data directory.
    payload_path: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default=OutboxStatus.PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(TZDateTime(), nullable=True)
    # The delivery worker's claim while it sends (migration 0002): another worker skips the row
    # until the claim expires, so a worker that died mid-send gives its rows back by itself.
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(TZDateTime(), nullable=True)


class Installation(Base):
    """The one row naming this installation (database + data directory): its random id is
    part of every UID, HL7 control id and idempotency key the node mints, so two installations
    never reuse an identity (storage/installation.py)."""

    __tablename__ = "installation"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    installation_id: Mapped[str] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow)


class IdCounter(Base):
    """The next id of a table whose ids are handed out ahead of their rows (one row per
    table; storage/report_ids.py)."""

    __tablename__ = "id_counters"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    next_id: Mapped[int] = mapped_column(Integer)


class AuditEvent(Base):
    """One audited event (storage/audit.py lists the kinds). ``actor``: the API user, calling
    AE title or process; ``address``: the peer's network address; ``outcome``: "success",
    "failure" or "rejected" (columns of migration 0007)."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow, index=True)
    kind: Mapped[str] = mapped_column(String(64), index=True)
    study_instance_uid: Mapped[str | None] = mapped_column(UID, nullable=True)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    actor: Mapped[str] = mapped_column(String(128), default="")
    address: Mapped[str] = mapped_column(String(64), default="")
    outcome: Mapped[str] = mapped_column(String(16), default="success")


class PerformedProcedureStep(Base):
    """A Modality Performed Procedure Step (PS3.4 Annex F.7) as last created or set.

    ``sop_instance_uids``: the instances the step says it made (Performed Series Sequence >
    Referenced Image / Non-Image Composite SOP Instance Sequences); ``study_instance_uid``:
    from the (first item of the) Scheduled Step Attributes Sequence. A COMPLETED step whose
    instances have all arrived completes its study at once.
    """

    __tablename__ = "mpps"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    status: Mapped[str] = mapped_column(String(16))  # IN PROGRESS | COMPLETED | DISCONTINUED
    study_instance_uid: Mapped[str] = mapped_column(UID, default="", index=True)
    sop_instance_uids: Mapped[list[str]] = mapped_column(JSON, default=list)
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    created_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow)


class InteractiveRequest(Base):
    """A predict request or a conversation turn waiting for, or answered by, the worker.

    ``payload`` is what the worker needs (storage/interactive.py documents each kind);
    ``result`` the answer; ``error_code`` tells the API which HTTP status a failure is.
    """

    __tablename__ = "interactive_requests"
    __table_args__ = (Index("ix_interactive_requests_queue", "status", "priority", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))  # InteractiveKind
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    error_code: Mapped[str | None] = mapped_column(String(32), nullable=True)
    requested_by: Mapped[str] = mapped_column(String(128), default="")
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(TZDateTime(), nullable=True)
    created_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(TZDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(TZDateTime(), nullable=True)


class Conversation(Base):
    """Follow-up questions about one study, starting from its latest report (``report_id``)."""

    __tablename__ = "conversations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    report_id: Mapped[int | None] = mapped_column(ForeignKey("reports.id"), nullable=True)
    created_by: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow)
    state: Mapped[str] = mapped_column(String(16), default=ConversationState.OPEN)
    appended_report_id: Mapped[int | None] = mapped_column(ForeignKey("reports.id"), nullable=True)

    turns: Mapped[list[ConversationTurn]] = relationship(
        back_populates="conversation", order_by="ConversationTurn.turn_index"
    )


class ConversationTurn(Base):
    """One question and its answer. ``anchors`` holds every anchor known after this turn
    (A1..An from the report, then one per box an answer gave)."""

    __tablename__ = "conversation_turns"
    __table_args__ = (UniqueConstraint("conversation_id", "turn_index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id"), index=True)
    turn_index: Mapped[int] = mapped_column(Integer)  # 1, 2, ...
    question: Mapped[str] = mapped_column(Text)
    answer: Mapped[str] = mapped_column(Text, default="")
    raw_text: Mapped[str] = mapped_column(Text, default="")  # the model's text ("" when measured)
    answered_by: Mapped[str] = mapped_column(String(16), default="model")  # "model" | "node"
    referenced_anchor_id: Mapped[str | None] = mapped_column(String(16), nullable=True)
    anchors: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    findings: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    measurements: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    model_json: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    timings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    asked_by: Mapped[str] = mapped_column(String(128), default="")
    request_id: Mapped[int | None] = mapped_column(
        ForeignKey("interactive_requests.id"), nullable=True
    )
    created_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow)

    conversation: Mapped[Conversation] = relationship(back_populates="turns")


class User(Base):
    """A REST API account (migration 0003_api_users). The bearer token itself is never stored:
    only its SHA-256, so a copy of the database does not let anyone sign in."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(TZDateTime(), nullable=True)


class PriorStudy(Base):
    """An earlier study of a patient fetched from PACS for comparison (migration 0006).

    Its instances live in the prior store (``<data>/priors/``, ``prior_instances``), apart
    from received studies: a prior never starts a job of its own. ``requested_at`` is set
    before a C-MOVE so the SCP knows the study's instances are priors.
    """

    __tablename__ = "prior_studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True, index=True)
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    issuer_of_patient_id: Mapped[str] = mapped_column(String(64), default="")
    study_date: Mapped[str] = mapped_column(String(8), default="")
    modality: Mapped[str] = mapped_column(String(16), default="")
    body_part: Mapped[str] = mapped_column(String(64), default="")
    requested_at: Mapped[datetime | None] = mapped_column(TZDateTime(), nullable=True)
    created_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow)


class PriorInstance(Base):
    """One image of a prior study, on disk under ``<data>/priors/``."""

    __tablename__ = "prior_instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prior_study_id: Mapped[int] = mapped_column(ForeignKey("prior_studies.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True, index=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(Text)  # relative to the data directory
    size_bytes: Mapped[int] = mapped_column(Integer, default=0)
    received_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow)


class PriorLink(Base):
    """What one report was compared with (``status`` "compared"), or why it was made without
    a prior ("none"); ``detail`` is a storage.report_schema.PriorComparison."""

    __tablename__ = "prior_links"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    report_id: Mapped[int] = mapped_column(ForeignKey("reports.id"), unique=True)
    status: Mapped[str] = mapped_column(String(16))
    prior_study_instance_uid: Mapped[str | None] = mapped_column(UID, nullable=True, index=True)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow)
