"""What the REST API reads and changes in the database, on SQLite and PostgreSQL: the derived
study status of the worklist, its filters, API users, and the job retry."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select, update

from api.schemas import StudyStatus
from api.worklist import StudyFilters, list_studies, study_row
from storage.db import Database
from storage.jobs import list_jobs, retry_job
from storage.models import (
    JobStatus,
    OutboxItem,
    OutboxStatus,
    Report,
    Study,
    User,
    UserRole,
    utcnow,
)
from storage.users import (
    UserError,
    authenticate,
    create_user,
    hash_token,
    list_users,
    revoke_user,
)
from tests.api_support import add_report, complete, receive, set_job


def status_of(db: Database, study_uid: str) -> StudyStatus:
    with db.session() as session:
        row = study_row(session, study_uid)
    assert row is not None
    return row.status


def test_derived_status_of_every_stage(db: Database) -> None:
    later = utcnow() + timedelta(hours=1)
    receive(db, "1.1")
    set_job(db, complete(db, receive(db, "1.2")), JobStatus.QUEUED)
    set_job(db, complete(db, receive(db, "1.3")), JobStatus.QUEUED, available_at=later)
    set_job(db, complete(db, receive(db, "1.4")), JobStatus.RUNNING)
    set_job(db, complete(db, receive(db, "1.5")), JobStatus.FAILED)
    set_job(db, complete(db, receive(db, "1.6")), "skipped")
    add_report(db, complete(db, receive(db, "1.7")), [])
    add_report(db, complete(db, receive(db, "1.8")), [OutboxStatus.SENT, OutboxStatus.PENDING])
    add_report(db, complete(db, receive(db, "1.9")), [OutboxStatus.SENT, OutboxStatus.SENT])
    add_report(db, complete(db, receive(db, "1.10")), [OutboxStatus.SENT, OutboxStatus.DEAD])
    expected = {
        "1.1": StudyStatus.RECEIVING,
        "1.2": StudyStatus.QUEUED,
        "1.3": StudyStatus.WAITING,
        "1.4": StudyStatus.REPORTING,
        "1.5": StudyStatus.FAILED,
        "1.6": StudyStatus.OUT_OF_SCOPE,
        "1.7": StudyStatus.REPORTED,
        "1.8": StudyStatus.REPORTED,
        "1.9": StudyStatus.DELIVERED,
        "1.10": StudyStatus.FAILED,
    }
    assert {uid: status_of(db, uid) for uid in expected} == expected
    appended = append_report(db, "1.10", [OutboxStatus.PENDING])  # supersedes the dead one's
    assert status_of(db, "1.10") == StudyStatus.REPORTED
    set_outbox(db, appended, OutboxStatus.SENT)
    assert status_of(db, "1.10") == StudyStatus.DELIVERED
    receive(db, "1.9")  # a late instance: a new version is coming
    assert status_of(db, "1.9") == StudyStatus.RECEIVING
    complete(db, db_study_id(db, "1.9"))
    assert status_of(db, "1.9") == StudyStatus.QUEUED  # the newest version's job counts


def append_report(db: Database, study_uid: str, deliveries: list[OutboxStatus]) -> int:
    """A report appended to from a conversation: no job, superseding the newest report."""
    with db.session() as session:
        previous = session.scalars(
            select(Report)
            .join(Study, Study.id == Report.study_id)
            .where(Study.study_instance_uid == study_uid)
            .order_by(Report.id.desc())
        ).first()
        assert previous is not None
        report = Report(
            job_id=None,
            study_id=previous.study_id,
            study_version_id=previous.study_version_id,
            parse_status="ok",
            content_json={"parse_status": "ok"},
            model_json={"model_id": "m"},
            supersedes_report_id=previous.id,
        )
        session.add(report)
        session.flush()
        for index, state in enumerate(deliveries):
            session.add(
                OutboxItem(
                    report_id=report.id,
                    destination=f"d{index}",
                    kind="file",
                    message_id=f"appended{report.id}.{index}",
                    payload_path="x",
                    status=state,
                )
            )
        return report.id


def set_outbox(db: Database, report_id: int, state: OutboxStatus) -> None:
    with db.session() as session:
        session.execute(
            update(OutboxItem).where(OutboxItem.report_id == report_id).values(status=state)
        )


def db_study_id(db: Database, uid: str) -> int:
    with db.session() as session:
        return int(session.scalar(select(Study.id).where(Study.study_instance_uid == uid)))


def page(
    db: Database, limit: int = 50, offset: int = 0, **filters: object
) -> tuple[list[str], int]:
    arguments = {"statuses": [], "modality": None, "since": None, "until": None, "text": None}
    with db.session() as session:
        rows, total = list_studies(
            session,
            StudyFilters(**{**arguments, **filters}),
            limit,
            offset,  # type: ignore[arg-type]
        )
    return [row.study.study_instance_uid for row in rows], total


def test_worklist_filters_pages_and_escapes_wildcards(db: Database) -> None:
    add_report(db, complete(db, receive(db, "2.1", "CR", "XRAY_A")), [OutboxStatus.SENT])
    receive(db, "2.2", "CT", "CT_B")
    set_job(db, complete(db, receive(db, "2.3", "DX", "XRAY_A")), JobStatus.FAILED)
    assert page(db) == (["2.3", "2.2", "2.1"], 3)
    assert page(db, limit=2, offset=1) == (["2.2", "2.1"], 3)
    assert page(db, statuses=[StudyStatus.DELIVERED, StudyStatus.RECEIVING]) == (["2.2", "2.1"], 2)
    assert page(db, modality="ct") == (["2.2"], 1)
    assert page(db, text="xray_a") == (["2.3", "2.1"], 2)
    assert page(db, text="SPICULATED") == (["2.1"], 1)  # the report's text
    assert page(db, text="chest")[1] == 3  # body part
    # % and _ are text, not LIKE wildcards (as wildcards both would match XRAY_A)
    assert page(db, text="R%A")[1] == 0 and page(db, text="R_Y")[1] == 0
    now = utcnow()
    assert page(db, since=now - timedelta(hours=1), until=now + timedelta(hours=1))[1] == 3
    assert page(db, since=now + timedelta(minutes=5))[1] == 0


def test_users_store_only_a_hash_and_revocation_is_immediate(db: Database) -> None:
    token = create_user(db, "dr-li", UserRole.RADIOLOGIST)
    assert token.startswith("mgn_") and len(token) > 40
    user = authenticate(db, token)
    assert user is not None and user.name == "dr-li" and user.role == UserRole.RADIOLOGIST
    assert authenticate(db, token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert authenticate(db, "not-even-a-token") is None
    with db.session() as session:
        stored = session.execute(select(User.name, User.role, User.token_hash)).all()
    assert token not in repr(stored) and hash_token(token) in repr(stored)
    with pytest.raises(UserError, match="exists"):
        create_user(db, "dr-li", UserRole.ADMIN)
    with pytest.raises(UserError):
        create_user(db, "  ", UserRole.VIEWER)
    assert revoke_user(db, "dr-li") is True and revoke_user(db, "dr-li") is False
    assert authenticate(db, token) is None
    second = create_user(db, "dr-li", UserRole.VIEWER)
    assert authenticate(db, second) is not None and authenticate(db, token) is None
    [listed] = list_users(db)
    assert listed.role == UserRole.VIEWER and listed.active


def test_job_retry_only_for_failed_or_waiting_jobs(db: Database) -> None:
    failed = complete(db, receive(db, "3.1"))
    set_job(db, failed, JobStatus.FAILED, attempts=3, finished_at=utcnow())
    done = complete(db, receive(db, "3.2"))
    add_report(db, done, [])
    assert retry_job(db, failed) == (JobStatus.FAILED, "3.1")
    assert retry_job(db, done) == (JobStatus.DONE, "3.2")
    assert retry_job(db, 999999) is None
    rows, total = list_jobs(db, JobStatus.QUEUED)
    assert total == 1 and rows[0].job.id == failed and rows[0].job.attempts == 0
    assert rows[0].study_instance_uid == "3.1" and rows[0].version_number == 1
    assert list_jobs(db, JobStatus.DONE)[0][0].job.id == done
    assert list_jobs(db)[1] == 2
