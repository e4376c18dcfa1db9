"""Delivery lanes around the senders: a killed worker, leases, rows nobody serves, the retry
policy of each outcome, and the `outbox` CLI; real peers on loopback (Orthanc, an MLLP
listener) where a peer is involved.

Rows are built the way the report code writes them (tests/delivery_rows.py).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from config.settings import (
    HL7Destination,
    HttpDestination,
    RetrySettings,
)
from core.errors import DeliveryError
from delivery.file_sender import delivered_file_name
from delivery.scripted import ScriptedSender
from delivery.senders import SenderRegistry
from delivery.worker import DeliveryWorker
from medgemma_node.cli import app
from peers.mllp_listener import REJECT_TEXT, MLLPListener, ReplyMode
from peers.net import wait_for
from peers.node_process import REPO, write_toml
from peers.orthanc import OrthancServer
from storage import outbox
from storage.db import Database
from storage.delivery_types import DeliveryOutcome
from storage.models import OutboxItem, OutboxStatus, utcnow
from tests.delivery_rows import all_in, make_report, outbox_rows, queue
from tests.delivery_support import (  # the fixtures: data directory, Orthanc, MLLP listener
    data_dir_fixture,  # noqa: F401
    his_destination,
    http_destination,
    listener_fixture,  # noqa: F401
    make_worker,
    orthanc_fixture,  # noqa: F401
)

# ---------------------------------------------------------------------------------------------
# Crash safety, leases, unserved rows


def test_killed_worker_resends_the_same_payloads_and_loses_nothing(
    db: Database, db_url: str, data_dir: Path, tmp_path: Path,
    orthanc: OrthancServer, listener: MLLPListener,
) -> None:  # fmt: skip
    listener.reply_mode = ReplyMode.SILENT  # the first attempt never gets its ACK
    reports = [make_report(db, data_dir, number) for number in range(1, 5)]
    for report in reports:
        queue(db, report, "pacs", "dicom")
        queue(db, report, "his", "hl7")
    retry = {"initial_backoff_s": 0.2, "max_backoff_s": 0.5, "max_attempts": 100}
    config = write_toml(
        tmp_path / "node.toml",
        {
            "dicom": {"ae_title": "MEDGEMMA"},
            "storage": {"data_dir": str(data_dir), "database_url": db_url},
            "logging": {"level": "INFO"},
            "metrics": {"enabled": False},
            "destinations": [
                {"kind": "dicom", "name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1",
                 "port": orthanc.dicom_port, "retry": retry},
                {"kind": "hl7", "name": "his", "host": "127.0.0.1", "port": listener.port,
                 "ack_timeout_s": 2.0, "retry": retry},
            ],
        },
    )  # fmt: skip
    log_path = tmp_path / "deliver.log"
    first = _start_deliver_process(config, log_path)
    try:
        wait_for(
            lambda: listener.received and orthanc.instance_ids(),
            20,
            message=f"nothing sent before the kill:\n{log_path.read_text()}",
        )
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
    assert not all_in(db, OutboxStatus.SENT, "his")
    listener.reply_mode = ReplyMode.AA
    second = _start_deliver_process(config, log_path)
    try:
        wait_for(
            lambda: all_in(db, OutboxStatus.SENT),
            30,
            message=f"not all delivered after the restart:\n{log_path.read_text()}",
        )
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0

    expected_sops = sorted(uid for report in reports for uid in report.sop_uids)
    assert sorted(orthanc.sop_instance_uids()) == expected_sops
    by_control_id: dict[str, set[bytes]] = {}
    for message in listener.received:
        by_control_id.setdefault(message.control_id, set()).add(message.raw)
    assert sorted(by_control_id) == sorted(report.control_id for report in reports)
    for report in reports:  # one form per report: the payload written with the report
        assert by_control_id[report.control_id] == {(data_dir / report.oru_path).read_bytes()}
    counts = Counter(message.control_id for message in listener.received)
    assert max(counts.values()) >= 2  # the message in flight at the kill was sent again


def _start_deliver_process(config: Path, log_path: Path) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "medgemma_node.cli", "outbox", "deliver", "--config", str(config),
        "--poll-interval", "0.1", "--lease-seconds", "2",
    ]  # fmt: skip
    with log_path.open("ab") as log:
        return subprocess.Popen(
            command, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=log, stderr=log
        )


def test_claims_are_disjoint_and_expire(db: Database, data_dir: Path) -> None:
    report = make_report(db, data_dir, 1)
    with db.session() as session:
        session.add_all(
            OutboxItem(
                report_id=report.report_id, destination="his", kind="hl7",
                message_id=f"MG{n}", payload_path=report.oru_path,
            )
            for n in range(40)
        )  # fmt: skip
    claimed: list[int] = []
    lock = threading.Lock()

    def claim_until_empty(owner: str) -> None:
        while items := outbox.claim_due(db, "his", "hl7", owner, 3, 30.0):
            with lock:
                claimed.extend(item.id for item in items)

    threads = [threading.Thread(target=claim_until_empty, args=(f"w{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    all_ids = [row.id for row in outbox_rows(db)]
    assert sorted(claimed) == all_ids  # every row once, none twice
    assert all(row.attempts == 1 for row in outbox_rows(db))

    assert outbox.release_leases(db) == 40
    (first,) = outbox.claim_due(db, "his", "hl7", "a", 1, 0.3)
    assert outbox.claim_due(db, "his", "hl7", "b", 1, 30.0)[0].id != first.id
    time.sleep(0.4)
    retaken = [item for item in outbox.claim_due(db, "his", "hl7", "c", 40, 30.0)]
    assert first.id in [item.id for item in retaken]
    assert next(item for item in retaken if item.id == first.id).attempts == 3
    # The first owner's late failure no longer applies; its late success still counts.
    outbox.finish(db, [], [outbox.Failure(first, "late", None)])
    row = next(row for row in outbox_rows(db) if row.id == first.id)
    assert (row.status, row.last_error) == (OutboxStatus.PENDING, None)
    outbox.finish(db, [first], [])
    row = next(row for row in outbox_rows(db) if row.id == first.id)
    assert row.status == OutboxStatus.SENT and row.lease_owner is None


def test_rows_nobody_serves_stay_pending_with_a_note(
    db: Database, data_dir: Path, listener: MLLPListener, caplog: pytest.LogCaptureFixture
) -> None:
    report = make_report(db, data_dir, 1)
    queue(db, report, "gone", "hl7")
    queue(db, report, "his", "dicom")  # a destination renamed to another kind
    queue(db, report, "paused", "hl7")
    paused = HL7Destination(kind="hl7", name="paused", host="127.0.0.1", port=1, enabled=False)
    worker = make_worker(db, data_dir, [his_destination(listener.port), paused])
    with caplog.at_level(logging.WARNING, logger="delivery"):
        worker.deliver_once()
        worker.deliver_once()
    notes = {row.destination: row.last_error or "" for row in outbox_rows(db)}
    assert all(row.status == OutboxStatus.PENDING for row in outbox_rows(db))
    assert "'gone' is not configured" in notes["gone"]
    assert "'his' is 'hl7'" in notes["his"]
    assert "'paused' is disabled" in notes["paused"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3  # one per route, not one per pass
    assert all("DELIVERY^TEST" not in message for message in caplog.messages)
    assert listener.received == []
    assert worker.last_error is not None and "gone (hl7): unserved" in worker.last_error


def test_backoff_doubles_up_to_the_maximum_then_dead_letters() -> None:
    settings = RetrySettings(max_attempts=6, max_age_s=3600, initial_backoff_s=2, max_backoff_s=10)
    policy = settings.policy()
    now = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)

    def item(attempts: int, age_s: float = 0) -> outbox.ClaimedItem:
        return outbox.ClaimedItem(
            1,
            1,
            "d",
            "hl7",
            "m",
            "p",
            attempts,
            now - timedelta(seconds=age_s),
            "t",
            "1.2",
            None,
            None,
        )

    def next_attempt(row: outbox.ClaimedItem, retry_after_s: float | None = None) -> Any:
        return policy.next_attempt(row.attempts, row.created_at, now, retry_after_s)

    delays = [(next_attempt(item(n)) - now).total_seconds() for n in range(1, 6)]
    assert delays == [2, 4, 8, 10, 10]
    assert next_attempt(item(6)) is None
    assert next_attempt(item(1, age_s=3600)) is None
    assert policy.give_up_reason(6) == "gave up after 6 attempts"
    assert policy.give_up_reason(1) == "gave up: older than 3600 s"
    retry_after = next_attempt(item(1), retry_after_s=7)
    assert retry_after == now + timedelta(seconds=7)
    assert delivered_file_name(item(1)) == "1.2_1_p"


def test_each_outcome_is_recorded_by_the_destinations_retry_policy(
    db: Database, data_dir: Path
) -> None:
    for number in (1, 2, 3):
        queue(db, make_report(db, data_dir, number), "ris-api", "http")
    scripted = ScriptedSender(
        [
            DeliveryOutcome.retry("busy", "HTTP 503", retry_after_s=5),
            DeliveryOutcome.rejected("no such patient", "HTTP 404"),
            DeliveryOutcome.delivered("", "HTTP 200"),
        ]
    )
    senders = SenderRegistry().register(HttpDestination, lambda _destination: scripted)
    destination = http_destination("http://127.0.0.1:1/unused")
    worker = DeliveryWorker(db, data_dir, [destination], senders)
    before = utcnow()
    assert worker.deliver_once() == 3
    waiting, rejected, sent = outbox_rows(db)
    assert scripted.sent == [waiting.message_id, rejected.message_id, sent.message_id]
    assert (waiting.status, waiting.last_error) == (OutboxStatus.PENDING, "busy")
    assert waiting.next_attempt_at >= before + timedelta(seconds=0.3)  # FAST_RETRY's cap
    assert (rejected.status, rejected.last_error) == (OutboxStatus.DEAD, "no such patient")
    assert sent.status == OutboxStatus.SENT
    counts = worker.counters.snapshot()
    assert [counts[name]["ris-api"] for name in ("retry", "rejected", "dead", "delivered")] == [
        1, 1, 1, 1,
    ]  # fmt: skip


def test_a_sender_must_answer_every_row_and_every_kind_needs_one(
    db: Database, data_dir: Path
) -> None:
    queue(db, make_report(db, data_dir, 1), "ris-api", "http")
    destination = http_destination("http://127.0.0.1:1/unused")

    class Silent:
        def send(self, parcels: Any) -> list[DeliveryOutcome]:
            return []

    senders = SenderRegistry().register(HttpDestination, lambda _destination: Silent())
    with pytest.raises(DeliveryError, match="0 outcomes for 1 rows"):
        DeliveryWorker(db, data_dir, [destination], senders).deliver_once()
    (row,) = outbox_rows(db)
    assert (row.status, row.attempts) == (OutboxStatus.PENDING, 1)  # the lease runs out
    with pytest.raises(DeliveryError, match="kind 'http'"):
        DeliveryWorker(db, data_dir, [destination], SenderRegistry())


# ---------------------------------------------------------------------------------------------
# CLI


def test_outbox_cli_lists_retries_and_purges(
    db: Database, db_url: str, data_dir: Path, tmp_path: Path, listener: MLLPListener
) -> None:
    listener.reply_mode = ReplyMode.AR
    rejected = make_report(db, data_dir, 1)
    queue(db, rejected, "his", "hl7")
    waiting = make_report(db, data_dir, 2)
    queue(db, waiting, "elsewhere", "hl7")
    worker = make_worker(db, data_dir, [his_destination(listener.port)])
    worker.deliver_once()
    config = write_toml(
        tmp_path / "node.toml",
        {"storage": {"data_dir": str(data_dir), "database_url": db_url}},
    )
    runner = CliRunner()

    def run(*args: str) -> Any:
        return runner.invoke(app, ["outbox", *args, "--config", str(config)])

    table = run("list", "--status", "dead")
    assert table.exit_code == 0, table.output
    assert "dead" in table.output and "pending" not in table.output
    listed = json.loads(run("list", "--status", "dead", "--json").output)
    assert [(row["message_id"], row["status"]) for row in listed] == [(rejected.control_id, "dead")]
    assert REJECT_TEXT in listed[0]["last_error"]
    elsewhere = json.loads(run("list", "--destination", "elsewhere", "--json").output)
    assert [row["message_id"] for row in elsewhere] == [waiting.control_id]
    assert "not configured" in elsewhere[0]["last_error"]

    retried = run("retry", "--dead")
    assert retried.exit_code == 0 and "1 dead row(s)" in retried.output
    (dead_row,) = outbox_rows(db, "his")
    assert (dead_row.status, dead_row.attempts) == (OutboxStatus.PENDING, 0)
    assert dead_row.next_attempt_at <= utcnow()
    listener.reply_mode = ReplyMode.AA
    worker.deliver_once()
    assert all_in(db, OutboxStatus.SENT, "his")

    again = run("retry", str(dead_row.id))
    assert again.exit_code == 1 and "already sent" in again.output
    assert run("retry", "99999").exit_code == 1
    assert run("retry").exit_code == 2

    kept = run("purge", "--older-than", "1")
    assert kept.exit_code == 0 and "0 sent row(s)" in kept.output
    purged = run("purge", "--older-than", "0")
    assert purged.exit_code == 0 and "1 sent row(s)" in purged.output
    assert [row.destination for row in outbox_rows(db)] == ["elsewhere"]  # pending rows stay
