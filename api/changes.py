"""A short token that changes whenever anything the worklist or a study page shows changes.

`GET /api/events` (server-sent events, the WHATWG HTML "text/event-stream" format) sends the
token when it differs from the last one sent; the console then fetches what it shows. One
stream per open console replaces a poll of the worklist every few seconds, so the audit trail
records what a user looked at rather than one row per poll.

The token covers: studies (count, newest instance, quiet periods running), jobs (count and
newest change per status, and queued jobs not yet due, which turn from "waiting" to "queued"
with time alone), reports (newest id), deliveries (count and attempts per status).
"""

from __future__ import annotations

import hashlib
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from storage.models import Job, JobStatus, OutboxItem, Report, Study, utcnow


def change_token(session: Session) -> str:
    parts: list[Any] = [
        tuple(
            session.execute(
                select(
                    func.count(Study.id),
                    func.max(Study.last_received_at),
                    func.sum(case((Study.has_unversioned.is_(True), 1), else_=0)),
                )
            ).one()
        ),
        sorted(
            tuple(row)
            for row in session.execute(
                select(Job.status, func.count(), func.max(Job.updated_at)).group_by(Job.status)
            ).all()
        ),
        session.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.status == JobStatus.QUEUED.value, Job.available_at > utcnow())
        ),
        session.scalar(select(func.max(Report.id))),
        sorted(
            tuple(row)
            for row in session.execute(
                select(OutboxItem.status, func.count(), func.sum(OutboxItem.attempts)).group_by(
                    OutboxItem.status
                )
            ).all()
        ),
    ]
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]
