"""Delivery worker against real peers on loopback: Orthanc (DICOM), an MLLP listener (HL7),
a directory, and an HTTP server; outages, a slow destination.

Rows are built the way the report code writes them (tests/delivery_rows.py); crash safety,
leases, unserved rows, the retry policy and the CLI are in tests/test_delivery_lanes.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pydicom
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from config.settings import (
    DicomDestination,
    FileDestination,
    RetrySettings,
)
from delivery import file_sender
from delivery.metrics import DeliveryCollector
from peers.mllp_listener import ERROR_TEXT, REJECT_TEXT, MLLPListener, ReplyMode
from peers.net import free_port, wait_for
from peers.orthanc import OrthancServer
from storage.db import Database
from storage.models import OutboxItem, OutboxStatus, utcnow
from tests.delivery_rows import all_in, make_report, outbox_rows, queue
from tests.delivery_support import (  # the fixtures: data directory, Orthanc, MLLP listener
    FAST_RETRY,
    data_dir_fixture,  # noqa: F401
    his_destination,
    http_destination,
    listener_fixture,  # noqa: F401
    make_worker,
    orthanc_fixture,  # noqa: F401
    pacs_destination,
)

# ---------------------------------------------------------------------------------------------
# DICOM


def test_dicom_destination_delivers_each_object_to_orthanc(
    db: Database, data_dir: Path, orthanc: OrthancServer
) -> None:
    reports = [make_report(db, data_dir, number) for number in (1, 2)]
    for report in reports:
        queue(db, report, "pacs", "dicom")
    worker = make_worker(db, data_dir, [pacs_destination(orthanc)])
    worker.start()
    try:
        wait_for(lambda: all_in(db, OutboxStatus.SENT), 15, message="rows not all SENT")
    finally:
        worker.stop()

    stored = [orthanc.instance_tags(orthanc_id) for orthanc_id in orthanc.instance_ids()]
    assert sorted(tags["SOPInstanceUID"] for tags in stored) == sorted(
        uid for report in reports for uid in report.sop_uids
    )
    study_by_sop = {tags["SOPInstanceUID"]: tags["StudyInstanceUID"] for tags in stored}
    for report in reports:
        assert all(study_by_sop[uid] == report.study_uid for uid in report.sop_uids)
    study_uids = {
        orthanc.study(i)["MainDicomTags"]["StudyInstanceUID"] for i in orthanc.get("/studies")
    }
    assert study_uids == {report.study_uid for report in reports}
    for row in outbox_rows(db):
        assert (row.attempts, row.last_error, row.lease_owner) == (1, None, None)
        assert row.sent_at is not None
    assert worker.counters.get("delivered", "pacs") == 4
    assert worker.last_error is None
    registry = CollectorRegistry()
    registry.register(DeliveryCollector(worker.counters))
    exposition = generate_latest(registry).decode()
    assert 'medgemma_delivery_worker_delivered_total{destination="pacs"} 4.0' in exposition
    assert 'medgemma_delivery_worker_attempts_total{destination="pacs"} 4.0' in exposition


def test_pacs_outage_then_recovery_delivers_each_object_exactly_once(
    db: Database, data_dir: Path, orthanc: OrthancServer
) -> None:
    orthanc.stop()
    reports = [make_report(db, data_dir, number) for number in (1, 2, 3)]
    for report in reports:
        queue(db, report, "pacs", "dicom")
    worker = make_worker(db, data_dir, [pacs_destination(orthanc)])
    worker.start()
    try:
        wait_for(
            lambda: all(row.attempts >= 2 for row in outbox_rows(db)),
            10,
            message="the worker did not keep retrying during the outage",
        )
        rows = outbox_rows(db)
        assert all(row.status == OutboxStatus.PENDING for row in rows)
        assert all("association failed" in (row.last_error or "") for row in rows)
        assert worker.last_error is not None and "pacs" in worker.last_error
        orthanc.start()
        wait_for(lambda: all_in(db, OutboxStatus.SENT), 10, message="not delivered after recovery")
    finally:
        worker.stop()

    sop_uids = orthanc.sop_instance_uids()
    expected = sorted(uid for report in reports for uid in report.sop_uids)
    assert sorted(sop_uids) == expected  # every object, none twice
    assert worker.counters.get("delivered", "pacs") == len(expected)
    assert worker.counters.get("dead", "pacs") == 0


def test_down_destinations_never_delay_the_others(
    db: Database, data_dir: Path, orthanc: OrthancServer, listener: MLLPListener
) -> None:
    listener.reply_mode = ReplyMode.SILENT  # the HIS reads and never answers
    ack_timeout_s = 6.0
    destinations = [
        DicomDestination(
            kind="dicom", name="old-pacs", ae_title="GONE", host="127.0.0.1",
            port=free_port(), retry=FAST_RETRY,
        ),
        his_destination(listener.port, ack_timeout_s=ack_timeout_s),
        pacs_destination(orthanc),
    ]  # fmt: skip
    reports = [make_report(db, data_dir, number) for number in (1, 2, 3)]
    for report in reports:
        queue(db, report, "old-pacs", "dicom")
        queue(db, report, "his", "hl7")
        queue(db, report, "pacs", "dicom")
    worker = make_worker(db, data_dir, destinations)
    started = time.monotonic()
    worker.start()
    try:
        wait_for(lambda: all_in(db, OutboxStatus.SENT, "pacs"), 5, interval=0.05)
        elapsed = time.monotonic() - started
        assert elapsed < ack_timeout_s * 0.75, f"pacs waited for the silent HIS: {elapsed:.1f} s"
        assert len(orthanc.instance_ids()) == 6
        assert all(row.status == OutboxStatus.PENDING for row in outbox_rows(db, "his"))
        wait_for(
            lambda: all(row.attempts >= 3 for row in outbox_rows(db, "old-pacs")),
            5,
            message="the unreachable PACS is not retried",
        )
        wait_for(
            lambda: all("no complete ACK" in (r.last_error or "") for r in outbox_rows(db, "his")),
            ack_timeout_s + 3,
            message="the silent HIS attempt did not end in a retry",
        )
    finally:
        worker.stop()
    assert all(row.status == OutboxStatus.PENDING for row in outbox_rows(db, "old-pacs"))
    # Each HIS attempt sent the batch's first message only; the rest waited for an answer.
    assert {message.control_id for message in listener.received} == {reports[0].control_id}


# ---------------------------------------------------------------------------------------------
# HL7 over MLLP


def test_hl7_accepted_message_is_sent_once_exactly(
    db: Database, data_dir: Path, listener: MLLPListener
) -> None:
    report = make_report(db, data_dir, 1)
    queue(db, report, "his", "hl7")
    worker = make_worker(db, data_dir, [his_destination(listener.port)])
    assert worker.deliver_once() == 1
    (row,) = outbox_rows(db)
    assert (row.status, row.attempts, row.sent_at is not None) == (OutboxStatus.SENT, 1, True)
    (received,) = listener.received
    assert received.raw == (data_dir / report.oru_path).read_bytes()
    assert received.control_id == report.control_id == row.message_id
    assert worker.deliver_once() == 0
    assert len(listener.received) == 1


def test_hl7_application_error_is_retried_until_accepted(
    db: Database, data_dir: Path, listener: MLLPListener
) -> None:
    listener.reply_mode = ReplyMode.AE
    report = make_report(db, data_dir, 1)
    queue(db, report, "his", "hl7")
    worker = make_worker(db, data_dir, [his_destination(listener.port)])
    before = utcnow()
    worker.deliver_once()
    (row,) = outbox_rows(db)
    assert (row.status, row.attempts) == (OutboxStatus.PENDING, 1)
    assert row.last_error is not None and "AE" in row.last_error and ERROR_TEXT in row.last_error
    assert row.next_attempt_at >= before + timedelta(seconds=0.1)
    listener.reply_mode = ReplyMode.AA
    wait_for(lambda: worker.deliver_once() and all_in(db, OutboxStatus.SENT), 5)
    (row,) = outbox_rows(db)
    assert row.attempts == 2
    texts = {message.raw for message in listener.received}
    assert len(listener.received) == 2 and texts == {(data_dir / report.oru_path).read_bytes()}


def test_hl7_application_reject_is_dead_at_once(
    db: Database, data_dir: Path, listener: MLLPListener
) -> None:
    listener.reply_mode = ReplyMode.AR
    queue(db, make_report(db, data_dir, 1), "his", "hl7")
    worker = make_worker(db, data_dir, [his_destination(listener.port)])
    worker.deliver_once()
    (row,) = outbox_rows(db)
    assert (row.status, row.attempts) == (OutboxStatus.DEAD, 1)
    assert row.last_error is not None and REJECT_TEXT in row.last_error
    assert worker.counters.get("dead", "his") == 1
    worker.deliver_once()
    assert len(listener.received) == 1


@pytest.mark.parametrize(
    ("mode", "reason"),
    [(ReplyMode.GARBAGE, "unreadable ACK"), (ReplyMode.SILENT, "no complete ACK")],
)
def test_hl7_without_a_readable_ack_is_retried(
    db: Database, data_dir: Path, listener: MLLPListener, mode: ReplyMode, reason: str
) -> None:
    listener.reply_mode = mode
    for number in (1, 2):
        queue(db, make_report(db, data_dir, number), "his", "hl7")
    worker = make_worker(db, data_dir, [his_destination(listener.port, ack_timeout_s=0.3)])
    before = utcnow()
    worker.deliver_once()
    rows = outbox_rows(db)
    assert [(row.status, row.attempts) for row in rows] == [(OutboxStatus.PENDING, 1)] * 2
    assert all(reason in (row.last_error or "") for row in rows)
    assert all(row.next_attempt_at > before for row in rows)
    assert len(listener.received) == 1  # the receiver was taken as down after the first


def test_hl7_gives_up_after_max_attempts(
    db: Database, data_dir: Path, listener: MLLPListener
) -> None:
    listener.reply_mode = ReplyMode.AE
    queue(db, make_report(db, data_dir, 1), "his", "hl7")
    destination = his_destination(listener.port, max_attempts=2, initial_backoff_s=0)
    worker = make_worker(db, data_dir, [destination])
    worker.deliver_once()
    worker.deliver_once()
    (row,) = outbox_rows(db)
    assert (row.status, row.attempts) == (OutboxStatus.DEAD, 2)
    assert "gave up after 2 attempts" in (row.last_error or "")
    assert len(listener.received) == 2


# ---------------------------------------------------------------------------------------------
# File and HTTP


def test_file_destination_writes_each_report_file_once_by_name(
    db: Database, data_dir: Path, tmp_path: Path
) -> None:
    report = make_report(db, data_dir, 1)
    (row_id,) = queue(db, report, "archive", "file")
    queue(db, report, "json-only", "file")
    target, json_only = tmp_path / "out", tmp_path / "json-only"
    destinations = [
        FileDestination(kind="file", name="archive", directory=target),
        FileDestination(
            kind="file", name="json-only", directory=json_only, write_hl7=False, copy_dicom=False
        ),
    ]
    worker = make_worker(db, data_dir, destinations)
    assert worker.deliver_once() == 2
    assert all_in(db, OutboxStatus.SENT)
    stem = f"{report.study_uid}_{report.report_id}"
    (sr_uid, pdf_uid) = report.sop_uids
    expected = {
        f"{stem}_report.json": report.json_path,
        f"{stem}_oru.hl7": report.oru_path,
        f"{stem}_sr_{sr_uid}.dcm": report.objects[0][2],
        f"{stem}_pdf_{pdf_uid}.dcm": report.objects[1][2],
    }
    assert sorted(p.name for p in target.iterdir()) == sorted(expected)  # no temp files left
    for name, payload in expected.items():
        assert (target / name).read_bytes() == (data_dir / payload).read_bytes()
    assert pydicom.dcmread(target / f"{stem}_sr_{sr_uid}.dcm").SOPInstanceUID == sr_uid
    assert [p.name for p in json_only.iterdir()] == [f"{stem}_report.json"]
    written = {path.name: path.stat().st_mtime_ns for path in target.iterdir()}

    # A re-send (a crash before SENT was recorded) finds the same names and changes nothing.
    with db.session() as session:
        session.get_one(OutboxItem, row_id).status = OutboxStatus.PENDING
    assert worker.deliver_once() == 1
    assert {path.name: path.stat().st_mtime_ns for path in target.iterdir()} == written


def test_file_destination_writes_several_reports_at_once_each_json_last(
    db: Database, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One claim's reports are written in threads of their own: two reports' first files
    meet at a barrier (written one after the other, the barrier breaks and the rows stay
    pending); each report's JSON is still its last file."""
    reports = [make_report(db, data_dir, number) for number in (1, 2, 3, 4)]
    for report in reports:
        queue(db, report, "archive", "file")
    met = threading.Barrier(2, timeout=10)
    written: list[str] = []
    place = file_sender._place

    def placed(data: bytes, target: Path) -> int:
        if not any(name.split("_")[1] == target.name.split("_")[1] for name in written):
            written.append(target.name)
            if len(written) <= 2:
                met.wait()  # the first two reports' first files, in two threads at once
        else:
            written.append(target.name)
        return place(data, target)

    monkeypatch.setattr(file_sender, "_place", placed)
    destination = FileDestination(kind="file", name="archive", directory=tmp_path / "out")
    assert make_worker(db, data_dir, [destination]).deliver_once() == 4
    assert all_in(db, OutboxStatus.SENT)
    for report in reports:
        own = [name for name in written if name.split("_")[1] == str(report.report_id)]
        assert len(own) == 4 and own[-1].endswith("_report.json")


def test_file_destination_without_its_oru_is_dead(
    db: Database, data_dir: Path, tmp_path: Path
) -> None:
    report = make_report(db, data_dir, 1)
    queue(db, report, "archive", "file")
    (data_dir / f"reports/{report.report_id}/oru-archive.hl7").unlink()
    destination = FileDestination(kind="file", name="archive", directory=tmp_path / "out")
    make_worker(db, data_dir, [destination]).deliver_once()
    (row,) = outbox_rows(db)
    assert row.status == OutboxStatus.DEAD and "oru-archive.hl7" in (row.last_error or "")
    assert not (tmp_path / "out").exists()


class RecordingHttpServer:
    """An HTTP server on 127.0.0.1 that records requests and answers scripted statuses."""

    def __init__(self, replies: list[tuple[int, dict[str, str]]]) -> None:
        self.replies = list(replies)
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                recorder.requests.append((self.path, dict(self.headers.items()), body))
                status, headers = recorder.replies.pop(0) if recorder.replies else (200, {})
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *_: object) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/results"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def http_server() -> Iterator[Any]:
    servers: list[RecordingHttpServer] = []

    def start(replies: list[tuple[int, dict[str, str]]]) -> RecordingHttpServer:
        servers.append(RecordingHttpServer(replies))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def test_http_post_is_retried_with_the_same_idempotency_key(
    db: Database, data_dir: Path, http_server: Any
) -> None:
    server = http_server([(503, {})])
    report = make_report(db, data_dir, 1)
    queue(db, report, "ris-api", "http")
    worker = make_worker(db, data_dir, [http_destination(server.url)])
    worker.deliver_once()
    (row,) = outbox_rows(db)
    assert (row.status, row.attempts) == (OutboxStatus.PENDING, 1)
    assert "HTTP 503" in (row.last_error or "")
    wait_for(lambda: worker.deliver_once() and all_in(db, OutboxStatus.SENT), 5)
    assert len(server.requests) == 2
    payload = (data_dir / report.json_path).read_bytes()
    for path, headers, body in server.requests:
        assert (path, body) == ("/results", payload)
        assert headers["Idempotency-Key"] == row.message_id == f"report-{report.report_id}-ris-api"
        assert headers["Authorization"] == "Bearer s3cret"
        assert headers["X-Site"] == "ward-3"
        assert headers["Content-Type"] == "application/json"


def test_http_client_errors_are_dead_and_throttling_waits(
    db: Database, data_dir: Path, http_server: Any
) -> None:
    server = http_server([(400, {}), (429, {"Retry-After": "3"})])
    for number in (1, 2):
        queue(db, make_report(db, data_dir, number), "ris-api", "http")
    destination = http_destination(server.url).model_copy(
        update={"retry": RetrySettings(initial_backoff_s=0.1, max_backoff_s=10)}
    )
    worker = make_worker(db, data_dir, [destination])
    before = utcnow()
    worker.deliver_once()
    rejected, throttled = outbox_rows(db)
    assert rejected.status == OutboxStatus.DEAD and "HTTP 400" in (rejected.last_error or "")
    assert throttled.status == OutboxStatus.PENDING and "HTTP 429" in (throttled.last_error or "")
    assert throttled.next_attempt_at >= before + timedelta(seconds=2.9)  # Retry-After
    assert worker.deliver_once() == 0
