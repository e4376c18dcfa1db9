"""What `GET /api/status` shows: the facts of `medgemma-node status`, read on the API's own
database connection, for the console's status page.

queue         jobs by status, how many wait for a retry, the oldest waiting job
model         as readiness sees it (the inference workers' status files)
destinations  each configured one (and any the outbox still names): counts by status, the
              newest error of an unsent delivery, the last successful send
disk          free space of the data directory against the C-STORE watermark
parts         the serving process's parts and their last errors (<data>/run/status.json)

Error texts come from the outbox and job columns, which never hold patient data (README).
"""

from __future__ import annotations

import shutil
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.readiness import check_model, check_scp
from api.schemas import DatabaseCheck, ModelCheck, ScpCheck
from config.settings import Destination, NodeSettings
from medgemma_node.runtime import read_runtime_state
from storage.models import Instance, Job, JobStatus, OutboxItem, OutboxStatus, Study, utcnow


class QueueStatus(BaseModel):
    jobs: dict[str, int] = Field(description="Jobs by status (queued, running, done, failed…)")
    waiting_for_retry: int = Field(description="Queued jobs not yet due (a failed attempt)")
    oldest_queued_at: datetime | None = Field(description="When the oldest queued job was made")


class DestinationStatus(BaseModel):
    name: str
    kind: str
    target: str = Field(description="Where it sends (host:port, directory, URL without query)")
    configured: bool = Field(description="False: only old outbox rows name it")
    enabled: bool
    counts: dict[str, int] = Field(description="Deliveries by status: pending, sent, dead")
    last_error: str | None = Field(description="The newest error of an unsent delivery")
    last_sent_at: datetime | None


class DiskStatus(BaseModel):
    free_mb: float
    total_mb: float
    watermark_mb: int = Field(description="Below this, C-STORE is refused (storage setting)")
    ok: bool


class PartStatus(BaseModel):
    name: str
    last_error: str | None = None


class NodeStatus(BaseModel):
    checked_at: datetime
    scp: ScpCheck
    database: DatabaseCheck
    model: ModelCheck
    studies: int
    instances: int
    queue: QueueStatus
    destinations: list[DestinationStatus]
    disk: DiskStatus
    serving: bool = Field(description="The serving process wrote its status file recently")
    parts: list[PartStatus]


STALE_RUNTIME_S = 30.0  # the serving process rewrites run/status.json every few seconds


def collect(settings: NodeSettings, session: Session) -> NodeStatus:
    runtime = read_runtime_state(settings.storage.data_dir)
    total, free = _disk_mb(settings.storage.data_dir)
    watermark = settings.storage.min_free_disk_mb
    return NodeStatus(
        checked_at=utcnow(),
        scp=check_scp(settings),
        database=DatabaseCheck(reachable=True),  # this very query ran on it
        model=check_model(settings),
        studies=session.scalar(select(func.count()).select_from(Study)) or 0,
        instances=session.scalar(select(func.count()).select_from(Instance)) or 0,
        queue=_queue(session),
        destinations=_destinations(settings, session),
        disk=DiskStatus(free_mb=free, total_mb=total, watermark_mb=watermark, ok=free >= watermark),
        serving=runtime is not None and float(runtime.get("age_s", 1e9)) <= STALE_RUNTIME_S,
        parts=_parts(runtime),
    )


def _disk_mb(data_dir: Path) -> tuple[float, float]:
    """(total, free) of the file system holding the data directory (or where it will be)."""
    probe = data_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    return round(usage.total / 2**20, 1), round(usage.free / 2**20, 1)


def _queue(session: Session) -> QueueStatus:
    jobs = {
        str(status): int(count)
        for status, count in session.execute(
            select(Job.status, func.count()).group_by(Job.status)
        ).all()
    }
    queued = Job.status == JobStatus.QUEUED.value
    waiting = session.scalar(
        select(func.count()).select_from(Job).where(queued, Job.available_at > utcnow())
    )
    oldest = session.scalar(select(func.min(Job.created_at)).where(queued))
    return QueueStatus(jobs=jobs, waiting_for_retry=int(waiting or 0), oldest_queued_at=oldest)


def target_of(destination: Destination) -> str:
    """Where a destination sends, without anything secret (URL credentials, query)."""
    if destination.kind == "dicom":
        return f"{destination.ae_title}@{destination.host}:{destination.port}"
    if destination.kind == "hl7":
        return f"{destination.host}:{destination.port}"
    if destination.kind == "file":
        return str(destination.directory)
    parts = urlsplit(destination.url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _destinations(settings: NodeSettings, session: Session) -> list[DestinationStatus]:
    counts: dict[str, dict[str, int]] = {}
    kinds: dict[str, str] = {}
    for name, kind, status, count in session.execute(
        select(OutboxItem.destination, OutboxItem.kind, OutboxItem.status, func.count()).group_by(
            OutboxItem.destination, OutboxItem.kind, OutboxItem.status
        )
    ).all():
        counts.setdefault(name, {})[str(status)] = int(count)
        kinds[name] = str(kind)
    result = [
        _destination(session, d.name, d.kind, target_of(d), True, d.enabled, counts)
        for d in settings.destinations
    ]
    configured = {d.name for d in settings.destinations}
    for name in sorted(set(counts) - configured):
        result.append(_destination(session, name, kinds[name], "", False, False, counts))
    return result


def _destination(
    session: Session,
    name: str,
    kind: str,
    target: str,
    configured: bool,
    enabled: bool,
    counts: dict[str, dict[str, int]],
) -> DestinationStatus:
    of_destination = OutboxItem.destination == name
    last_error = session.scalar(
        select(OutboxItem.last_error)
        .where(
            of_destination,
            OutboxItem.status != OutboxStatus.SENT.value,
            OutboxItem.last_error.is_not(None),
        )
        .order_by(OutboxItem.id.desc())
        .limit(1)
    )
    last_sent = session.scalar(select(func.max(OutboxItem.sent_at)).where(of_destination))
    return DestinationStatus(
        name=name,
        kind=kind,
        target=target,
        configured=configured,
        enabled=enabled,
        counts=counts.get(name, {}),
        last_error=last_error,
        last_sent_at=last_sent,
    )


def _parts(runtime: dict[str, Any] | None) -> list[PartStatus]:
    parts: dict[str, Any] = (runtime or {}).get("parts") or {}
    return [
        PartStatus(name=str(name), last_error=(part or {}).get("last_error"))
        for name, part in sorted(parts.items())
    ]
