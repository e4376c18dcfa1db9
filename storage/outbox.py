"""The outbox queue: claim due rows with a lease, record what happened, operator actions.

A row is *due* when it is pending, its ``next_attempt_at`` has passed and nobody holds a live
lease on it. Claiming sets ``lease_owner`` to a token unique to that claim and counts the
attempt, so an attempt cut short by a crash still counts; the lease expires by itself, and the
row is due again (the same payload is re-sent: the payload is never rebuilt here).

PostgreSQL: several workers claim safely with SELECT … FOR UPDATE SKIP LOCKED, and the
conditional UPDATE re-checks that nobody claimed the row meanwhile. SQLite: one delivery worker
process; its single writer lock serialises claims, and at start-up it takes back every lease.

Row identities are fixed when the row is written (design.md, "Exactly one result per study
version"): a DICOM row's message_id is its SOP Instance UID, an HL7 row's its MSH-10
(hl7_out.oru.hl7_control_id), a file or HTTP row's the report's ``idempotency_key``.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, delete, func, or_, select, update
from sqlalchemy.orm import Session

from storage import audit
from storage.db import Database
from storage.models import (
    AuditEvent,
    OutboxItem,
    OutboxStatus,
    Report,
    ReportObject,
    Study,
    utcnow,
)

LEASE_TOKEN_LENGTH = 128


@dataclass(frozen=True)
class ClaimedItem:
    """A leased outbox row with what a sender needs to know about its report and object."""

    id: int
    report_id: int
    destination: str
    kind: str
    message_id: str
    payload_path: str  # relative to the data directory
    attempts: int  # including this one
    created_at: datetime
    lease_token: str
    study_instance_uid: str
    object_kind: str | None  # report_objects.kind ("sr", "gsps", "pdf") for DICOM objects
    sop_instance_uid: str | None  # report_objects.sop_instance_uid for DICOM objects


@dataclass(frozen=True)
class Failure:
    """The end of a failed attempt: retry at ``next_attempt_at``, or dead when it is None."""

    item: ClaimedItem
    reason: str
    next_attempt_at: datetime | None


def idempotency_key(
    study_uid: str, report_id: int, destination: str, installation_id: str | None = None
) -> str:
    """The Idempotency-Key of a report's JSON delivery: a UUID (RFC 9562 v5) no other report
    of any installation shares: the installation id (storage.installation) tells installations
    apart, the Study Instance UID (globally unique, PS3.5 §9) and report id the reports."""
    installation = "" if installation_id is None else f"{installation_id}:"
    return str(
        uuid.uuid5(
            uuid.NAMESPACE_OID,
            f"medgemma-node:{installation}{study_uid}:{report_id}:{destination}",
        )
    )


def lease_token(owner: str) -> str:
    return f"{owner[: LEASE_TOKEN_LENGTH - 13]}/{uuid.uuid4().hex[:12]}"


def _claimable(now: datetime) -> ColumnElement[bool]:
    return and_(
        OutboxItem.status == OutboxStatus.PENDING,
        OutboxItem.next_attempt_at <= now,
        or_(OutboxItem.lease_expires_at.is_(None), OutboxItem.lease_expires_at < now),
    )


def claim_due(
    db: Database,
    destination: str,
    kind: str,
    owner: str,
    limit: int,
    lease_seconds: float,
) -> list[ClaimedItem]:
    """Lease up to ``limit`` due rows of ``destination`` whose kind is ``kind``, oldest first.

    PostgreSQL locks the candidates with FOR UPDATE SKIP LOCKED, so concurrent workers take
    disjoint rows without waiting. SQLite claims in one UPDATE … WHERE id IN (SELECT …): the
    transaction starts with its write, so it never has to upgrade a stale read snapshot.
    """
    now = utcnow()
    token = lease_token(owner)
    due = and_(_claimable(now), OutboxItem.destination == destination, OutboxItem.kind == kind)
    candidates = select(OutboxItem.id).where(due).order_by(OutboxItem.id).limit(limit)
    claim = update(OutboxItem).values(
        lease_owner=token,
        lease_expires_at=now + timedelta(seconds=lease_seconds),
        attempts=OutboxItem.attempts + 1,
    )
    with db.session() as session:
        if db.is_sqlite:
            session.execute(
                claim.where(OutboxItem.id.in_(candidates)).execution_options(
                    synchronize_session=False
                )
            )
        else:
            ids = list(session.scalars(candidates.with_for_update(skip_locked=True)))
            if not ids:
                return []
            session.execute(
                claim.where(OutboxItem.id.in_(ids), due).execution_options(
                    synchronize_session=False
                )
            )
        return _load_claimed(session, token)


def _load_claimed(session: Session, token: str) -> list[ClaimedItem]:
    rows = session.execute(
        select(
            OutboxItem, Study.study_instance_uid, ReportObject.kind, ReportObject.sop_instance_uid
        )
        .join(Report, Report.id == OutboxItem.report_id)
        .join(Study, Study.id == Report.study_id)
        .outerjoin(ReportObject, ReportObject.id == OutboxItem.object_id)
        .where(OutboxItem.lease_owner == token)
        .order_by(OutboxItem.id)
    ).all()
    return [
        ClaimedItem(
            id=item.id,
            report_id=item.report_id,
            destination=item.destination,
            kind=item.kind,
            message_id=item.message_id,
            payload_path=item.payload_path,
            attempts=item.attempts,
            created_at=item.created_at,
            lease_token=token,
            study_instance_uid=study_uid,
            object_kind=object_kind,
            sop_instance_uid=sop_uid,
        )
        for item, study_uid, object_kind, sop_uid in rows
    ]


def finish(db: Database, sent: Sequence[ClaimedItem], failures: Sequence[Failure]) -> None:
    """Record one batch in one transaction.

    A delivered row becomes SENT even if its lease was lost meanwhile (it did arrive). A failure
    is recorded only while the row is still ours, so a slow worker never overwrites the outcome
    of the worker that took the row over.
    """
    now = utcnow()
    with db.session() as session:
        if sent:
            session.execute(
                update(OutboxItem)
                .where(
                    OutboxItem.id.in_([item.id for item in sent]),
                    OutboxItem.status == OutboxStatus.PENDING,
                )
                .values(
                    status=OutboxStatus.SENT, sent_at=now, lease_owner=None, lease_expires_at=None
                )
                .execution_options(synchronize_session=False)
            )
        for failure in failures:
            session.execute(
                update(OutboxItem)
                .where(
                    OutboxItem.id == failure.item.id,
                    OutboxItem.lease_owner == failure.item.lease_token,
                    OutboxItem.status == OutboxStatus.PENDING,
                )
                .values(_failure_values(failure))
                .execution_options(synchronize_session=False)
            )
        audit.record_many(session, _delivery_events(sent, failures))


def _delivery_events(sent: Sequence[ClaimedItem], failures: Sequence[Failure]) -> list[AuditEvent]:
    """One audit row per attempt: delivery.sent, delivery.failed (retried) or delivery.dead."""

    def row(item: ClaimedItem, kind: str, outcome: str, **extra: Any) -> AuditEvent:
        return audit.event(
            kind,
            study_uid=item.study_instance_uid,
            actor=item.destination,
            outcome=outcome,
            outbox_id=item.id,
            report_id=item.report_id,
            destination_kind=item.kind,
            message_id=item.message_id,
            attempt=item.attempts,
            **extra,
        )

    rows = [row(item, "delivery.sent", audit.SUCCESS) for item in sent]
    for failure in failures:
        dead = failure.next_attempt_at is None
        rows.append(
            row(
                failure.item,
                "delivery.dead" if dead else "delivery.failed",
                audit.FAILURE,
                reason=failure.reason[:500],
            )
        )
    return rows


def _failure_values(failure: Failure) -> dict[str, object]:
    values: dict[str, object] = {
        "last_error": failure.reason[:4000],
        "lease_owner": None,
        "lease_expires_at": None,
    }
    if failure.next_attempt_at is None:
        values["status"] = OutboxStatus.DEAD
    else:
        values["next_attempt_at"] = failure.next_attempt_at
    return values


@dataclass(frozen=True)
class ObjectFile:
    """A built DICOM object of a report (report_objects row)."""

    kind: str
    sop_instance_uid: str
    path: str  # relative to the data directory


def report_object_files(db: Database, report_id: int) -> list[ObjectFile]:
    with db.session() as session:
        rows = session.execute(
            select(ReportObject.kind, ReportObject.sop_instance_uid, ReportObject.path)
            .where(ReportObject.report_id == report_id)
            .order_by(ReportObject.id)
        ).all()
    return [ObjectFile(kind, sop_uid, path) for kind, sop_uid, path in rows]


def release_leases(db: Database) -> int:
    """Take back every lease on pending rows (SQLite start-up: the previous owner is gone)."""
    with db.session() as session:
        result = session.execute(
            update(OutboxItem)
            .where(OutboxItem.status == OutboxStatus.PENDING, OutboxItem.lease_owner.is_not(None))
            .values(lease_owner=None, lease_expires_at=None)
            .execution_options(synchronize_session=False)
        )
        return int(result.rowcount)  # type: ignore[attr-defined]


def pending_routes(db: Database) -> dict[tuple[str, str], int]:
    """Pending row counts by (destination, kind)."""
    with db.session() as session:
        rows = session.execute(
            select(OutboxItem.destination, OutboxItem.kind, func.count())
            .where(OutboxItem.status == OutboxStatus.PENDING)
            .group_by(OutboxItem.destination, OutboxItem.kind)
        ).all()
    return {(destination, kind): int(count) for destination, kind, count in rows}


def note_on_pending(db: Database, destination: str, kind: str, note: str) -> int:
    """Set ``last_error`` on the pending rows of one route that nobody serves; return how many
    changed (rows that already carry the note are left alone)."""
    with db.session() as session:
        result = session.execute(
            update(OutboxItem)
            .where(
                OutboxItem.status == OutboxStatus.PENDING,
                OutboxItem.destination == destination,
                OutboxItem.kind == kind,
                or_(OutboxItem.last_error.is_(None), OutboxItem.last_error != note),
            )
            .values(last_error=note)
            .execution_options(synchronize_session=False)
        )
        return int(result.rowcount)  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------
# Operator actions (medgemma-node outbox ...)


def list_items(
    db: Database,
    status: OutboxStatus | None = None,
    destination: str | None = None,
    limit: int = 200,
) -> list[OutboxItem]:
    """Rows newest first, optionally of one status and one destination."""
    query = select(OutboxItem).order_by(OutboxItem.id.desc()).limit(limit)
    if status is not None:
        query = query.where(OutboxItem.status == status)
    if destination is not None:
        query = query.where(OutboxItem.destination == destination)
    with db.session() as session:
        return list(session.scalars(query))


def _requeue_values() -> dict[str, object]:
    return {
        "status": OutboxStatus.PENDING,
        "attempts": 0,
        "next_attempt_at": utcnow(),
        "lease_owner": None,
        "lease_expires_at": None,
    }


def retry_item(db: Database, item_id: int) -> OutboxStatus | None:
    """Make a dead or pending row due now with its attempts reset; SENT rows are left alone.

    Returns the status the row had, or None when there is no such row.
    """
    with db.session() as session:
        for status in (OutboxStatus.DEAD, OutboxStatus.PENDING):
            result = session.execute(
                update(OutboxItem)
                .where(OutboxItem.id == item_id, OutboxItem.status == status)
                .values(_requeue_values())
                .execution_options(synchronize_session=False)
            )
            if result.rowcount:  # type: ignore[attr-defined]
                return status
        found = session.scalar(select(OutboxItem.status).where(OutboxItem.id == item_id))
        return OutboxStatus(found) if found is not None else None


def retry_dead(db: Database, destination: str | None = None) -> int:
    """Every dead row (of one destination) back to pending, due now, attempts reset."""
    query = update(OutboxItem).where(OutboxItem.status == OutboxStatus.DEAD)
    if destination is not None:
        query = query.where(OutboxItem.destination == destination)
    with db.session() as session:
        result = session.execute(
            query.values(_requeue_values()).execution_options(synchronize_session=False)
        )
        return int(result.rowcount)  # type: ignore[attr-defined]


def purge_sent(db: Database, older_than: timedelta) -> int:
    """Delete SENT rows sent before now − ``older_than``; pending and dead rows are kept.

    Payload files are not touched: they belong to the report and other rows may share them.
    """
    cutoff = utcnow() - older_than
    with db.session() as session:
        result = session.execute(
            delete(OutboxItem)
            .where(OutboxItem.status == OutboxStatus.SENT, OutboxItem.sent_at < cutoff)
            .execution_options(synchronize_session=False)
        )
        return int(result.rowcount)  # type: ignore[attr-defined]
