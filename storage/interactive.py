"""The priority lane's queue: predict requests and conversation turns for the inference worker.

The model never runs in the API process. The API queues a request here, rings the worker's
doorbell, and waits (bounded) for the worker to store the answer; the worker takes queued
requests before its next batch of studies, or between decode steps of the running one
(inference/interactive.py, inference/lane_steps.py).

Interface for the HTTP layer (every function takes the node's ``storage.db.Database``)::

    submit_predict(db, data_dir, upload, question, ...) -> request id
        upload: the bytes of a PNG, JPEG or DICOM file (``upload_kind`` tells which, None:
        answer 415); the file is kept under <data>/interactive/uploads/ until answered.
    storage.conversations.ask(db, data_dir, conversation_id, question, ...) -> request id
    wait_for_result(db, request_id, timeout_s, doorbell) -> RequestOutcome
        outcome.status "done": outcome.result is a PredictResult / TurnResult as JSON;
        "failed": outcome.error (a message for the user) and outcome.error_code;
        "queued"/"running": not answered within timeout_s (HTTP 504, or 202 + poll
        ``get_outcome`` later: the answer is still stored when it comes).
    get_outcome(db, request_id) -> RequestOutcome        RequestNotFound: 404

Errors and HTTP statuses:
    QueueFull (submit*, ask)       429 with ``Retry-After: exc.retry_after_s``
    RequestNotFound                404
    outcome.error_code             ErrorCode: invalid_input 422, not_found 404, conflict 409,
                                   model_unavailable 503 (the message says how to provide
                                   weights, as ``status`` does), worker_stopped 503, internal 500

The waiter: the API process starts one ``storage.doorbell.SharedDoorbell(data_dir,
API_DOORBELL)`` and passes it to every ``wait_for_result``; the worker rings it when it stores
an answer. Without it (or for a worker on another host) waiting falls back to polling every
``poll_interval_s``. ``wait_for_result`` blocks: call it from a plain ``def`` endpoint (FastAPI
runs those in its thread pool) or through ``anyio.to_thread.run_sync``.

Worker side: ``claim_next`` (highest priority, then oldest, with a lease), ``complete_in`` (in
the transaction that stores a turn) / ``complete``, ``fail`` (without a model every waiting
request fails at once with the how-to-provide-weights message), ``release``, ``fail_abandoned``
(requests whose worker died).

Payloads (``InteractiveRequest.payload``):
    predict            {"upload_path", "upload_kind", "question", "max_new_tokens",
                        "language" (None: the question's, else [model] language)}
    conversation_turn  {"conversation_id", "question", "anchor_id", "max_new_tokens"}
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from core.errors import StorageError
from storage.db import Database
from storage.doorbell import WORKER_DOORBELL, SharedDoorbell, ring
from storage.files import write_durably
from storage.models import InteractiveKind, InteractiveRequest, JobStatus, utcnow
from storage.report_schema import Finding, ModelIdentity

UPLOADS_DIR = Path("interactive") / "uploads"
DEFAULT_RETRY_AFTER_S = 5
RECENT_FOR_ESTIMATE = 20


class ErrorCode(StrEnum):
    """Why a request failed; the API maps each to one HTTP status (module docstring)."""

    INVALID_INPUT = "invalid_input"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    MODEL_UNAVAILABLE = "model_unavailable"
    WORKER_STOPPED = "worker_stopped"
    INTERNAL = "internal"


class QueueFull(StorageError):
    """Too many requests are waiting; ask again after ``retry_after_s`` seconds."""

    def __init__(self, queued: int, retry_after_s: int) -> None:
        super().__init__(
            f"{queued} questions are waiting for the model; try again in {retry_after_s} s"
        )
        self.queued = queued
        self.retry_after_s = retry_after_s


class RequestNotFound(StorageError, LookupError):
    """No interactive request has this id."""


# --------------------------------------------------------------------------- results (the contract)


class Box(BaseModel):
    """A box on the uploaded image or a study image, in its pixels: [x0, y0, x1, y1]."""

    label: str
    box: list[float] = Field(description="[x0, y0, x1, y1] in pixels, (0, 0) top-left")
    image_sop_uid: str | None = None  # the DICOM image's SOP Instance UID; None for PNG/JPEG


class Anchor(Box):
    """A region the conversation can refer to: A1..An from the report, then one per box an
    answer gave."""

    id: str  # "A1", "A2", ...
    frame_number: int | None = None
    source: str = "report"  # "report" | "answer"
    turn_index: int | None = None  # the turn whose answer gave it


class Measurement(BaseModel):
    """A distance or size the node computed from the header's pixel spacing (never the model)."""

    kind: str  # "distance" (between two anchors' centres) | "extent" (one anchor's box)
    anchor_ids: list[str]
    pixels: float | None = None  # distance in pixels (source image)
    width_px: float | None = None
    height_px: float | None = None
    mm: float | None = None  # distance in mm
    width_mm: float | None = None
    height_mm: float | None = None
    spacing_source: str | None = None  # "PixelSpacing" | "ImagerPixelSpacing" | None
    text: str  # the sentence the answer carries


class PredictResult(BaseModel):
    answer: str
    findings: list[Finding]
    boxes: list[Box]
    image: dict[str, Any]  # {"kind": "dicom"|"png"|"jpeg", "width": ..., "height": ...}
    parse_status: str
    model: ModelIdentity
    disclaimer: str
    timings: dict[str, float | int]


class TurnResult(BaseModel):
    conversation_id: int
    turn_index: int
    question: str
    answer: str
    answered_by: str  # "model" | "node" (a measurement)
    referenced_anchor_id: str | None
    findings: list[Finding]
    anchors: list[Anchor]  # every anchor known after this turn
    new_anchor_ids: list[str]
    measurements: list[Measurement]
    model: ModelIdentity | None
    disclaimer: str
    timings: dict[str, float | int]


@dataclass(frozen=True)
class RequestOutcome:
    request_id: int
    kind: str
    status: str  # JobStatus value
    result: dict[str, Any] | None
    error: str | None
    error_code: str | None

    @property
    def finished(self) -> bool:
        return self.status in (JobStatus.DONE, JobStatus.FAILED)


@dataclass(frozen=True)
class ClaimedRequest:
    id: int
    kind: str
    payload: dict[str, Any]
    requested_by: str


# --------------------------------------------------------------------------- API side


def upload_kind(data: bytes) -> str | None:
    """The upload's type by its signature: "png", "jpeg", "dicom" (PS3.10 7.1: "DICM" after
    the 128-byte preamble), or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    return None


def submit(
    db: Database,
    kind: InteractiveKind,
    payload: dict[str, Any],
    *,
    requested_by: str = "",
    max_queued: int,
    data_dir: Path | None = None,
    priority: int = 0,
) -> int:
    """Queue a request; ring the worker on this host. Raises QueueFull at ``max_queued``."""
    with db.session() as session:
        _check_room(session, max_queued)
        row = InteractiveRequest(
            kind=kind,
            status=JobStatus.QUEUED,
            priority=priority,
            payload=payload,
            requested_by=requested_by,
            created_at=utcnow(),
        )
        session.add(row)
        session.flush()
        request_id = row.id
    if data_dir is not None:
        ring(data_dir, WORKER_DOORBELL)
    return request_id


def submit_predict(
    db: Database,
    data_dir: Path,
    upload: bytes,
    question: str,
    *,
    max_new_tokens: int,
    language: str | None = None,
    requested_by: str = "",
    max_queued: int,
) -> int:
    """Keep the uploaded file and queue a predict request for it (see ``submit``)."""
    kind = upload_kind(upload)
    if kind is None:
        raise ValueError("the upload is not a PNG, JPEG or DICOM (Part 10) file")
    with db.session() as session:  # before writing the file: a full queue stores nothing
        _check_room(session, max_queued)
    relpath = UPLOADS_DIR / f"{uuid.uuid4().hex}.{'dcm' if kind == 'dicom' else kind}"
    write_durably(data_dir / relpath, upload)
    payload = {
        "upload_path": relpath.as_posix(),
        "upload_kind": kind,
        "question": question,
        "max_new_tokens": max_new_tokens,
        "language": language,
    }
    try:
        return submit(
            db,
            InteractiveKind.PREDICT,
            payload,
            requested_by=requested_by,
            max_queued=max_queued,
            data_dir=data_dir,
        )
    except BaseException:
        (data_dir / relpath).unlink(missing_ok=True)
        raise


def _check_room(session: Session, max_queued: int) -> None:
    queued = _queued(session)
    if queued >= max_queued:
        raise QueueFull(queued, retry_after_seconds(session, queued))


def _queued(session: Session) -> int:
    query = select(func.count()).where(InteractiveRequest.status == JobStatus.QUEUED)
    return int(session.scalar(query) or 0)


def retry_after_seconds(session: Session, queued: int) -> int:
    """How long until the queue has room: the recent mean answer time times the queue, >= 1."""
    recent = session.execute(
        select(InteractiveRequest.started_at, InteractiveRequest.finished_at)
        .where(
            InteractiveRequest.status == JobStatus.DONE,
            InteractiveRequest.started_at.is_not(None),
        )
        .order_by(InteractiveRequest.id.desc())
        .limit(RECENT_FOR_ESTIMATE)
    ).all()
    durations = [(end - start).total_seconds() for start, end in recent if start and end]
    if not durations:
        return DEFAULT_RETRY_AFTER_S
    mean = sum(durations) / len(durations)
    return max(1, math.ceil(mean * max(queued, 1)))


def get_outcome(db: Database, request_id: int) -> RequestOutcome:
    with db.session() as session:
        row = session.get(InteractiveRequest, request_id)
        if row is None:
            raise RequestNotFound(f"no interactive request {request_id}")
        return RequestOutcome(
            request_id=row.id,
            kind=row.kind,
            status=row.status,
            result=row.result,
            error=row.error,
            error_code=row.error_code,
        )


def wait_for_result(
    db: Database,
    request_id: int,
    timeout_s: float,
    doorbell: SharedDoorbell | None = None,
    poll_interval_s: float = 0.25,
) -> RequestOutcome:
    """The request's outcome once done or failed, or as it stands after ``timeout_s``.

    Wakes when the worker rings ``doorbell`` and otherwise re-reads the row every
    ``poll_interval_s`` (workers on other hosts cannot ring).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        token = doorbell.token() if doorbell is not None else 0
        outcome = get_outcome(db, request_id)
        remaining = deadline - time.monotonic()
        if outcome.finished or remaining <= 0:
            return outcome
        pause = min(poll_interval_s, remaining)
        if doorbell is not None:
            doorbell.wait(token, pause)
        else:
            time.sleep(pause)


# --------------------------------------------------------------------------- worker side


def has_queued(db: Database) -> bool:
    """Whether any request waits (one indexed lookup, no lock): checked between batches, and
    inside a batch when the doorbell rang."""
    with db.session() as session:
        query = select(InteractiveRequest.id).where(InteractiveRequest.status == JobStatus.QUEUED)
        return session.scalar(query.limit(1)) is not None


def claim_next(db: Database, owner: str, limit: int, lease_seconds: float) -> list[ClaimedRequest]:
    """Lease up to ``limit`` queued requests to ``owner``: highest priority, then oldest.

    PostgreSQL: several workers claim safely (FOR UPDATE SKIP LOCKED).
    """
    now = utcnow()
    with db.session() as session:
        query = (
            select(InteractiveRequest)
            .where(InteractiveRequest.status == JobStatus.QUEUED)
            .order_by(InteractiveRequest.priority.desc(), InteractiveRequest.id)
            .limit(limit)
        )
        if not db.is_sqlite:
            query = query.with_for_update(skip_locked=True)
        rows = list(session.scalars(query))
        for row in rows:
            row.status = JobStatus.RUNNING
            row.lease_owner = owner
            row.lease_expires_at = now + timedelta(seconds=lease_seconds)
            row.started_at = now
        return [ClaimedRequest(r.id, r.kind, dict(r.payload), r.requested_by) for r in rows]


def release(db: Database, request_ids: list[int], owner: str) -> None:
    """Give claimed requests back to the queue untouched (not answerable in this round)."""
    with db.session() as session:
        session.execute(
            update(InteractiveRequest)
            .where(
                InteractiveRequest.id.in_(request_ids),
                InteractiveRequest.lease_owner == owner,
                InteractiveRequest.status == JobStatus.RUNNING,
            )
            .values(status=JobStatus.QUEUED, lease_owner=None, lease_expires_at=None)
        )


def complete_in(session: Session, request_id: int, result: dict[str, Any]) -> None:
    """Store the answer in the caller's transaction (with the rows it belongs to)."""
    row = session.get_one(InteractiveRequest, request_id)
    row.status = JobStatus.DONE
    row.result = result
    row.error = None
    row.error_code = None
    row.finished_at = utcnow()
    row.lease_owner = None
    row.lease_expires_at = None


def complete(db: Database, request_id: int, result: dict[str, Any]) -> None:
    with db.session() as session:
        complete_in(session, request_id, result)


def fail(db: Database, request_id: int, error: str, code: ErrorCode) -> None:
    """End a request as failed; ``error`` is shown to the user (no patient data in it)."""
    with db.session() as session:
        row = session.get_one(InteractiveRequest, request_id)
        row.status = JobStatus.FAILED
        row.error = error[:2000]
        row.error_code = code
        row.finished_at = utcnow()
        row.lease_owner = None
        row.lease_expires_at = None


def fail_abandoned(db: Database, *, all_running: bool = False) -> int:
    """Requests whose worker died while answering fail (their caller has long stopped
    waiting; asking again is quicker than a late answer). ``all_running``: SQLite at worker
    start, when every running request belonged to the previous run."""
    now = utcnow()
    expired = or_(
        InteractiveRequest.lease_expires_at.is_(None), InteractiveRequest.lease_expires_at < now
    )
    with db.session() as session:
        result = session.execute(
            update(InteractiveRequest)
            .where(
                InteractiveRequest.status == JobStatus.RUNNING,
                *(() if all_running else (expired,)),
            )
            .values(
                status=JobStatus.FAILED,
                error="the inference worker stopped while answering; please ask again",
                error_code=ErrorCode.WORKER_STOPPED,
                finished_at=now,
                lease_owner=None,
                lease_expires_at=None,
            )
        )
        return int(result.rowcount)  # type: ignore[attr-defined]


def remove_upload(data_dir: Path, payload: dict[str, Any]) -> None:
    """Delete a predict request's uploaded file once answered (it may carry patient data)."""
    relpath = payload.get("upload_path")
    if isinstance(relpath, str) and relpath.startswith(UPLOADS_DIR.as_posix() + "/"):
        (data_dir / relpath).unlink(missing_ok=True)
