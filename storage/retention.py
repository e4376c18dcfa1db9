"""Retention: which studies' files may go, and pruning them ([retention], README).

A study is *settled* when nothing will read its files again on its own:
    no instance waits in a quiet period (has_unversioned is false),
    no job of it is queued, running or failed (a failed one may be retried; `jobs cancel`
        sets it aside),
    no delivery of its reports is pending or dead (dead ones may be retried),
    no conversation about it is open.
Its settle time is the latest of its last instance, its jobs' ends, its reports and their
deliveries. Pruning deletes files only: the received instances (``instances.pruned_at``) and
the report objects under <data>/reports/<id>/ (``reports.outputs_pruned_at``). Rows, report
text and the audit trail stay; every prune is a ``retention.prune`` audit row.

Two reasons to prune: *age* (instances N days, outputs M days after the settle time) and
*space* (free disk below the target: the oldest settled studies first, instances and outputs,
until the target is free again). Each study is checked again, under its row lock, just before
its files go, so a study that received an instance or a retry meanwhile is left alone.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import ColumnElement, exists, func, select, update
from sqlalchemy.orm import Session

from storage import audit
from storage.db import Database
from storage.models import (
    Conversation,
    ConversationState,
    Instance,
    Job,
    JobStatus,
    OutboxItem,
    OutboxStatus,
    Report,
    Study,
    StudyVersion,
    utcnow,
)

log = logging.getLogger(__name__)

MB = 1024 * 1024
AGE = "age"
SPACE = "space"


@dataclass(frozen=True)
class RetentionPolicy:
    instances_days: float  # 0: keep for ever
    outputs_days: float  # 0: keep for ever
    free_space_target_mb: float


@dataclass
class PruneAction:
    """What pruning one study deletes (or would delete)."""

    study_id: int
    study_uid: str
    settled_at: datetime
    reason: str  # "age" | "space"
    instance_ids: list[int] = field(default_factory=list)
    instance_paths: list[str] = field(default_factory=list)
    instance_bytes: int = 0
    report_ids: list[int] = field(default_factory=list)
    output_bytes: int = 0

    @property
    def bytes(self) -> int:
        return self.instance_bytes + self.output_bytes

    def as_dict(self) -> dict[str, object]:
        return {
            "study_instance_uid": self.study_uid,
            "settled_at": self.settled_at.isoformat(),
            "reason": self.reason,
            "instances": len(self.instance_ids),
            "reports": len(self.report_ids),
            "bytes": self.bytes,
        }


def _settled() -> list[ColumnElement[bool]]:
    """Conditions (on Study) under which a study is settled; see the module docstring."""
    busy_job = (
        select(Job.id)
        .join(StudyVersion, StudyVersion.id == Job.study_version_id)
        .where(
            StudyVersion.study_id == Study.id,
            Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.FAILED]),
        )
    )
    unsent = (
        select(OutboxItem.id)
        .join(Report, Report.id == OutboxItem.report_id)
        .where(
            Report.study_id == Study.id,
            OutboxItem.status.in_([OutboxStatus.PENDING, OutboxStatus.DEAD]),
        )
    )
    open_talk = select(Conversation.id).where(
        Conversation.study_id == Study.id, Conversation.state == ConversationState.OPEN
    )
    return [
        Study.has_unversioned.is_(False),
        ~exists(busy_job.correlate(Study)),
        ~exists(unsent.correlate(Study)),
        ~exists(open_talk.correlate(Study)),
    ]


def _settle_times(session: Session, study_ids: list[int]) -> dict[int, datetime]:
    times: dict[int, datetime] = {}

    def later(rows: object) -> None:
        for study_id, when in rows:  # type: ignore[attr-defined]
            if when is not None and (study_id not in times or when > times[study_id]):
                times[study_id] = when

    later(session.execute(select(Study.id, Study.last_received_at).where(Study.id.in_(study_ids))))
    later(
        session.execute(
            select(StudyVersion.study_id, func.max(Job.finished_at))
            .join(Job, Job.study_version_id == StudyVersion.id)
            .where(StudyVersion.study_id.in_(study_ids))
            .group_by(StudyVersion.study_id)
        )
    )
    later(
        session.execute(
            select(Report.study_id, func.max(Report.created_at))
            .where(Report.study_id.in_(study_ids))
            .group_by(Report.study_id)
        )
    )
    later(
        session.execute(
            select(Report.study_id, func.max(OutboxItem.sent_at))
            .join(OutboxItem, OutboxItem.report_id == Report.id)
            .where(Report.study_id.in_(study_ids))
            .group_by(Report.study_id)
        )
    )
    return times


def settled_studies(session: Session) -> list[tuple[int, str, datetime]]:
    """(study id, UID, settle time) of settled studies with files left, oldest first."""
    has_files = exists(
        select(Instance.id).where(Instance.study_id == Study.id, Instance.pruned_at.is_(None))
    ) | exists(
        select(Report.id).where(Report.study_id == Study.id, Report.outputs_pruned_at.is_(None))
    )
    rows = session.execute(
        select(Study.id, Study.study_instance_uid).where(*_settled(), has_files)
    ).all()
    times = _settle_times(session, [row[0] for row in rows])
    found = [(study_id, uid, times[study_id]) for study_id, uid in rows]
    return sorted(found, key=lambda item: item[2])


def plan(
    db: Database,
    data_dir: Path,
    policy: RetentionPolicy,
    free_mb: float,
    now: datetime | None = None,
) -> list[PruneAction]:
    """What pruning would delete now: studies past their age, then, while free disk is below
    the target, the oldest settled studies whatever their age."""
    now = now or utcnow()
    actions: list[PruneAction] = []
    shortfall = (policy.free_space_target_mb - free_mb) * MB
    with db.session() as session:
        for study_id, uid, settled in settled_studies(session):
            action = PruneAction(study_id, uid, settled, AGE)
            age = now - settled
            if policy.instances_days and age >= timedelta(days=policy.instances_days):
                _add_instances(session, action)
            if policy.outputs_days and age >= timedelta(days=policy.outputs_days):
                _add_outputs(session, action, data_dir)
            if shortfall > 0:
                if action.bytes == 0:
                    action.reason = SPACE
                _add_instances(session, action)
                _add_outputs(session, action, data_dir)
            if action.instance_ids or action.report_ids:
                shortfall -= action.bytes
                actions.append(action)
    return actions


def _add_instances(session: Session, action: PruneAction) -> None:
    if action.instance_ids:
        return
    rows = session.execute(
        select(Instance.id, Instance.path, Instance.size_bytes).where(
            Instance.study_id == action.study_id, Instance.pruned_at.is_(None)
        )
    ).all()
    action.instance_ids = [row[0] for row in rows]
    action.instance_paths = [row[1] for row in rows]
    action.instance_bytes = sum(row[2] or 0 for row in rows)


def _add_outputs(session: Session, action: PruneAction, data_dir: Path) -> None:
    if action.report_ids:
        return
    action.report_ids = list(
        session.scalars(
            select(Report.id).where(
                Report.study_id == action.study_id, Report.outputs_pruned_at.is_(None)
            )
        )
    )
    action.output_bytes = sum(_tree_bytes(report_dir(data_dir, rid)) for rid in action.report_ids)


def report_dir(data_dir: Path, report_id: int) -> Path:
    return data_dir / "reports" / str(report_id)


def _tree_bytes(path: Path) -> int:
    if not path.is_dir():
        return 0
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())


def execute(
    db: Database,
    data_dir: Path,
    actions: list[PruneAction],
    *,
    actor: str,
    free_mb: Callable[[], float] | None = None,
    target_mb: float | None = None,
) -> list[PruneAction]:
    """Prune each planned study that is still settled; return those pruned. With ``free_mb``
    and ``target_mb``, space pruning stops once the target is free."""
    done = []
    for action in actions:
        reached = free_mb is not None and target_mb is not None and free_mb() >= target_mb
        if action.reason == SPACE and reached:
            continue
        if _prune_one(db, data_dir, action, actor):
            done.append(action)
    return done


def _prune_one(db: Database, data_dir: Path, action: PruneAction, actor: str) -> bool:
    now = utcnow()
    with db.session() as session:
        locked = session.execute(
            select(Study.id).where(Study.id == action.study_id, *_settled()).with_for_update()
        ).first()
        if locked is None:
            log.info("study %s changed since it was planned: not pruned", action.study_uid)
            return False
        for path in action.instance_paths:
            (data_dir / path).unlink(missing_ok=True)
        for report_id in action.report_ids:
            shutil.rmtree(report_dir(data_dir, report_id), ignore_errors=True)
        if action.instance_ids:
            session.execute(
                update(Instance).where(Instance.id.in_(action.instance_ids)).values(pruned_at=now)
            )
        if action.report_ids:
            session.execute(
                update(Report).where(Report.id.in_(action.report_ids)).values(outputs_pruned_at=now)
            )
        session.execute(update(Study).where(Study.id == action.study_id).values(pruned_at=now))
        session.add(
            audit.event(
                "retention.prune",
                study_uid=action.study_uid,
                actor=actor,
                reason=action.reason,
                instances=len(action.instance_ids),
                reports=len(action.report_ids),
                bytes=action.bytes,
                settled_at=action.settled_at.isoformat(),
            )
        )
    log.info(
        "pruned study %s (%s): %d instance(s), %d report(s), %.1f MB",
        action.study_uid,
        action.reason,
        len(action.instance_ids),
        len(action.report_ids),
        action.bytes / MB,
    )
    return True
