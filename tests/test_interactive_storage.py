"""The priority lane's queue (storage/interactive.py) and migration 0004, on SQLite and
PostgreSQL: claim order, overflow (HTTP 429), bounded waits, the answer doorbell."""

from __future__ import annotations

import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import update

from storage.db import Database, alembic_config
from storage.doorbell import API_DOORBELL, SharedDoorbell
from storage.interactive import (
    ErrorCode,
    QueueFull,
    RequestNotFound,
    claim_next,
    complete,
    fail,
    fail_abandoned,
    get_outcome,
    release,
    submit,
    submit_predict,
    upload_kind,
    wait_for_result,
)
from storage.models import Base, InteractiveKind, InteractiveRequest, JobStatus, utcnow

PNG_BYTES = b"\x89PNG\r\n\x1a\n" + b"\0" * 64
REPO = Path(__file__).resolve().parent.parent


def queue(db: Database, count: int, max_queued: int = 100, priority: int = 0) -> list[int]:
    return [
        submit(
            db,
            InteractiveKind.CONVERSATION_TURN,
            {"conversation_id": 1, "question": f"q{n}"},
            requested_by="dr.a",
            max_queued=max_queued,
            priority=priority,
        )
        for n in range(count)
    ]


def test_migration_matches_the_models_and_downgrades(db: Database) -> None:
    with db.engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    config = alembic_config()
    for target in ("0002", "head"):
        with db.engine.begin() as connection:
            config.attributes["connection"] = connection
            (command.downgrade if target == "0002" else command.upgrade)(config, target)
    assert db.is_current()


def test_claim_takes_priority_then_oldest_and_leases(db: Database) -> None:
    first, second = queue(db, 2)
    [urgent] = queue(db, 1, priority=5)
    claimed = claim_next(db, "w1", 2, lease_seconds=60)
    assert [c.id for c in claimed] == [urgent, first]
    assert claimed[1].payload == {"conversation_id": 1, "question": "q0"}
    assert claimed[1].requested_by == "dr.a"
    assert [c.id for c in claim_next(db, "w2", 5, lease_seconds=60)] == [second]
    assert claim_next(db, "w2", 5, lease_seconds=60) == []
    release(db, [first], "w1")
    assert [c.id for c in claim_next(db, "w2", 5, lease_seconds=60)] == [first]


def test_overflow_raises_queue_full_and_stores_no_upload(db: Database, tmp_path: Path) -> None:
    queue(db, 3)
    with pytest.raises(QueueFull) as raised:
        submit_predict(db, tmp_path, PNG_BYTES, "q", max_new_tokens=8, max_queued=3)
    assert raised.value.queued == 3 and raised.value.retry_after_s >= 1
    assert not (tmp_path / "interactive").exists()
    request_id = submit_predict(db, tmp_path, PNG_BYTES, "q", max_new_tokens=8, max_queued=4)
    with db.session() as session:
        payload = session.get_one(InteractiveRequest, request_id).payload
    assert payload["upload_kind"] == "png"
    assert (tmp_path / payload["upload_path"]).read_bytes() == PNG_BYTES


def test_retry_after_follows_recent_answer_times(db: Database) -> None:
    done = queue(db, 2)
    for request_id in done:
        claim_next(db, "w", 1, 60)
        complete(db, request_id, {"answer": "x"})
    now = utcnow()
    with db.session() as session:
        session.execute(
            update(InteractiveRequest)
            .where(InteractiveRequest.id.in_(done))
            .values(started_at=now - timedelta(seconds=4), finished_at=now)
        )
    queue(db, 2)
    with pytest.raises(QueueFull) as raised:
        queue(db, 1, max_queued=2)
    assert raised.value.retry_after_s == 8  # 2 waiting x 4 s each


def test_upload_kind_by_signature() -> None:
    assert upload_kind(PNG_BYTES) == "png"
    assert upload_kind(b"\xff\xd8\xff\xe0" + b"\0" * 8) == "jpeg"
    assert upload_kind(b"\0" * 128 + b"DICM" + b"\0" * 8) == "dicom"
    assert upload_kind(b"%PDF-1.7") is None
    with pytest.raises(ValueError, match="not a PNG, JPEG or DICOM"):
        submit_predict(
            Database("sqlite://"),
            Path("/nonexistent"),
            b"hello",
            "q",
            max_new_tokens=1,
            max_queued=1,
        )


def test_wait_returns_the_answer_or_the_state_at_timeout(db: Database) -> None:
    [request_id] = queue(db, 1)
    outcome = wait_for_result(db, request_id, timeout_s=0.2, poll_interval_s=0.05)
    assert outcome.status == JobStatus.QUEUED and not outcome.finished
    claim_next(db, "w", 1, 60)
    finisher = threading.Timer(0.1, complete, args=(db, request_id, {"answer": "yes"}))
    finisher.start()
    outcome = wait_for_result(db, request_id, timeout_s=60, poll_interval_s=0.05)
    finisher.join()
    assert outcome.finished and outcome.status == JobStatus.DONE
    assert outcome.result == {"answer": "yes"} and outcome.error is None
    with pytest.raises(RequestNotFound):
        get_outcome(db, request_id + 1000)


def test_failures_carry_a_code_and_abandoned_requests_fail(db: Database) -> None:
    first, second, third = queue(db, 3)
    claim_next(db, "w", 2, lease_seconds=60)
    fail(db, first, "unknown anchor A9", ErrorCode.INVALID_INPUT)
    outcome = get_outcome(db, first)
    assert outcome.status == JobStatus.FAILED and outcome.error_code == "invalid_input"
    assert fail_abandoned(db) == 0, "the lease of the second has not expired"
    with db.session() as session:
        session.execute(
            update(InteractiveRequest)
            .where(InteractiveRequest.id == second)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )
    assert fail_abandoned(db) == 1
    assert get_outcome(db, second).error_code == ErrorCode.WORKER_STOPPED
    assert get_outcome(db, third).status == JobStatus.QUEUED


def test_answer_doorbell_wakes_waiters_rung_from_another_process(tmp_path: Path) -> None:
    bell = SharedDoorbell(tmp_path, API_DOORBELL)
    bell.start()
    try:
        assert bell.listening
        token = bell.token()
        assert bell.wait(token, 0.05) is False, "nothing rang yet"
        code = (
            "from pathlib import Path; from storage.doorbell import ring; "
            f"ring(Path({str(tmp_path)!r}), {API_DOORBELL!r})"
        )
        subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
        woken: list[bool] = []
        waiters = [
            threading.Thread(target=lambda: woken.append(bell.wait(token, 30))) for _ in range(3)
        ]
        for waiter in waiters:
            waiter.start()
        for waiter in waiters:
            waiter.join()
        assert woken == [True, True, True], "one ring wakes every waiter holding the token"
        assert bell.wait(bell.token(), 0.05) is False
    finally:
        bell.stop()
