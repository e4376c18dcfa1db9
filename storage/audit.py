"""The audit trail: one ``audit_events`` row per event that a hospital's security officer asks
about. Rows are written in the transaction of the change they record where there is one (a
job's state, a report, a prune), so the trail never claims what did not commit.

Kinds (``kind``, with ``actor`` / ``address`` / ``outcome``):

    node.start              the serving or worker process started: version, config fingerprint
    dicom.association       an association ended (accepted: calling AE, address, stored count)
                            or was rejected (outcome "rejected", the reason)
    mpps.created / mpps.set a Modality Performed Procedure Step arrived or changed
    study.version_created   a study was complete: a version and its job
    job.<state>             a job changed state: claimed, done, queued (retry), failed,
                            cancelled, requeued (lease expired)
    report.created          a report (model run or appended conversation)
    delivery.sent / delivery.failed / delivery.dead   one delivery attempt and its outcome
    api.access              every REST API request (user, role, route, status)
    conversation.started / conversation.asked / report_appended   follow-up questions (user)
    retention.prune         retention deleted a study's files (what, why, bytes)
    retention.prune_priors  retention deleted prior images fetched from PACS (how many, age)

Detail never holds patient data: studies by UID, patients only as the salted hash.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.db import Database
from storage.models import AuditEvent, utcnow

SUCCESS = "success"
FAILURE = "failure"
REJECTED = "rejected"

EXPORT_COLUMNS = (
    "id", "at", "kind", "outcome", "actor", "address", "study_instance_uid", "detail",
)  # fmt: skip


def event(
    kind: str,
    *,
    study_uid: str | None = None,
    actor: str = "",
    address: str = "",
    outcome: str = SUCCESS,
    **detail: Any,
) -> AuditEvent:
    """An audit row to add to the caller's session."""
    return AuditEvent(
        at=utcnow(),
        kind=kind,
        study_instance_uid=study_uid,
        actor=actor[:128],
        address=address[:64],
        outcome=outcome,
        detail=detail,
    )


def record(db: Database, kind: str, **fields: Any) -> None:
    """Write one audit row in a transaction of its own (events without a change to join)."""
    with db.session() as session:
        session.add(event(kind, **fields))


def record_many(session: Session, rows: Iterable[AuditEvent]) -> None:
    session.add_all(list(rows))


@dataclass(frozen=True)
class ExportedEvent:
    id: int
    at: datetime
    kind: str
    outcome: str
    actor: str
    address: str
    study_instance_uid: str | None
    detail: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "at": self.at.isoformat(),
            "kind": self.kind,
            "outcome": self.outcome,
            "actor": self.actor,
            "address": self.address,
            "study_instance_uid": self.study_instance_uid,
            "detail": self.detail,
        }


def events_after(
    db: Database,
    *,
    since: datetime | None = None,
    after_id: int = 0,
    kinds: Sequence[str] = (),
    limit: int | None = None,
) -> list[ExportedEvent]:
    """Audit rows in id order: newer than ``since`` and with an id above ``after_id``."""
    query = select(AuditEvent).where(AuditEvent.id > after_id).order_by(AuditEvent.id)
    if since is not None:
        query = query.where(AuditEvent.at >= since)
    if kinds:
        query = query.where(AuditEvent.kind.in_(list(kinds)))
    if limit is not None:
        query = query.limit(limit)
    with db.session() as session:
        return [_exported(row) for row in session.scalars(query)]


def _exported(row: AuditEvent) -> ExportedEvent:
    return ExportedEvent(
        id=row.id,
        at=row.at,
        kind=row.kind,
        outcome=row.outcome or SUCCESS,
        actor=row.actor or "",
        address=row.address or "",
        study_instance_uid=row.study_instance_uid,
        detail=dict(row.detail or {}),
    )


def export_json(events: Iterable[ExportedEvent]) -> Iterator[str]:
    """JSON Lines: one object per event (streams, and every line parses on its own)."""
    for item in events:
        yield json.dumps(item.as_dict(), ensure_ascii=False, default=str) + "\n"


def export_csv(events: Iterable[ExportedEvent]) -> Iterator[str]:
    """CSV with a header row; ``detail`` is a JSON object in its column."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(EXPORT_COLUMNS)
    for item in events:
        row = item.as_dict()
        row["detail"] = json.dumps(row["detail"], ensure_ascii=False, default=str)
        writer.writerow(
            [row[column] if row[column] is not None else "" for column in EXPORT_COLUMNS]
        )
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
    if buffer.getvalue():
        yield buffer.getvalue()
