"""The audit trail: associations (accepted with their count, rejected with the reason),
deliveries, conversations, start-up and stop, `audit export`, and forwarding as DICOM audit
messages over syslog to a real listener on loopback (UDP, TCP, TLS)."""

from __future__ import annotations

import csv
import io
import json
import shutil
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE
from sqlalchemy import select
from typer.testing import CliRunner

from config.ops_settings import SyslogSettings, settings_fingerprint
from config.settings import NodeSettings
from core.version import node_version
from delivery.syslog_client import SyslogUnavailable
from dicom_node.scp import StorageSCP
from medgemma_node.audit_forwarder import AuditForwarder
from medgemma_node.cli import app
from medgemma_node.service import Node
from peers.dicom_files import make_ct_study
from peers.net import free_port, wait_for
from storage import audit
from storage.conversations import start_conversation
from storage.db import Database
from storage.models import AuditEvent
from storage.outbox import Failure, claim_due, finish
from tests.api_support import receive
from tests.audit_listener import SyslogListener, check_audit_message, parse_rfc5424
from tests.delivery_rows import make_report, queue
from tests.nodecheck import store_with_pynetdicom
from tests.tls_support import self_signed_certificate


def audit_rows(db: Database, kind: str) -> list[AuditEvent]:
    with db.session() as session:
        rows = list(session.scalars(select(AuditEvent).where(AuditEvent.kind == kind)))
        session.expunge_all()
        return rows


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[Database]:
    (tmp_path / "data").mkdir()
    db = Database(f"sqlite:///{(tmp_path / 'data' / 'node.db').resolve()}")
    db.upgrade()
    yield db
    db.dispose()


def test_associations_are_audited_with_their_count_or_reason(
    sqlite_db: Database, tmp_path: Path
) -> None:
    settings = NodeSettings.model_validate(
        {
            "storage": {"data_dir": tmp_path / "data"},
            "dicom": {"bind_address": "127.0.0.1", "port": free_port(),
                      "allowed_calling_aets": ["PYSCU"]},
        }
    )  # fmt: skip
    scp = StorageSCP(settings, sqlite_db, b"salt")
    scp.start()
    try:
        paths = make_ct_study(tmp_path / "ct", slices=2)
        assert store_with_pynetdicom(scp.port, paths) == [0, 0]
        stranger = AE(ae_title="STRANGER")
        stranger.add_requested_context("1.2.840.10008.1.1")
        assoc = stranger.associate("127.0.0.1", scp.port, ae_title="MEDGEMMA")
        assert assoc.is_rejected
        rows = wait_for(
            lambda: (
                (found := audit_rows(sqlite_db, "dicom.association")) and len(found) >= 2 and found
            ),
            20,
            message="no association audit rows",
        )
    finally:
        scp.stop()
    by_actor = {row.actor: row for row in rows}
    accepted, rejected = by_actor["PYSCU"], by_actor["STRANGER"]
    assert accepted.outcome == "success" and accepted.address.startswith("127.0.0.1:")
    assert accepted.detail["stored"] == 2 and accepted.detail["failed"] == 0
    assert accepted.detail["ended"] == "released"
    assert (
        rejected.outcome == "rejected"
        and "calling AE title not recognised" in (rejected.detail["reason"])
    )


def test_delivery_attempts_and_outcomes_are_audited(sqlite_db: Database, tmp_path: Path) -> None:
    report = make_report(sqlite_db, tmp_path / "data", 1)
    queue(sqlite_db, report, "pacs", "dicom")
    claimed = claim_due(sqlite_db, "pacs", "dicom", "worker-1", 10, 60)
    assert len(claimed) == 2
    finish(sqlite_db, [claimed[0]], [Failure(claimed[1], "association rejected", None)])
    [sent] = audit_rows(sqlite_db, "delivery.sent")
    [dead] = audit_rows(sqlite_db, "delivery.dead")
    assert sent.actor == "pacs" and sent.study_instance_uid == report.study_uid
    assert sent.detail["attempt"] == 1 and sent.detail["message_id"] == claimed[0].message_id
    assert dead.outcome == "failure" and dead.detail["reason"] == "association rejected"


def test_conversations_and_start_stop_are_audited(sqlite_db: Database, tmp_path: Path) -> None:
    receive(sqlite_db, "7.1")
    start_conversation(sqlite_db, "7.1", created_by="dr-wang")
    [started] = audit_rows(sqlite_db, "conversation.started")
    assert started.actor == "dr-wang" and started.study_instance_uid == "7.1"

    settings = NodeSettings.model_validate({"storage": {"data_dir": tmp_path / "data"}})
    node = Node(settings, with_scp=False)
    node.prepare()
    node.start()
    node.stop()
    [start] = audit_rows(sqlite_db, "node.start")
    [stop] = audit_rows(sqlite_db, "node.stop")
    assert start.actor == "worker" and start.detail["version"] == node_version()
    assert start.detail["config_fingerprint"] == settings_fingerprint(settings)
    assert stop.detail["pid"] == start.detail["pid"]


def test_audit_export_as_csv_and_json(sqlite_db: Database, tmp_path: Path) -> None:
    audit.record(sqlite_db, "retention.prune", study_uid="5.1", actor="retention", bytes=10)
    audit.record(sqlite_db, "api.access", actor="dr-li", outcome="failure", status=403)
    data_dir = str(tmp_path / "data")
    runner = CliRunner()
    result = runner.invoke(app, ["audit", "export", "--since", "1h", "--format", "json",
                                 "--data-dir", data_dir])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(e["kind"], e["actor"], e["outcome"]) for e in lines] == [
        ("retention.prune", "retention", "success"),
        ("api.access", "dr-li", "failure"),
    ]
    result = runner.invoke(app, ["audit", "export", "--since", "2000-01-01", "--kind",
                                 "api.access", "--data-dir", data_dir])  # fmt: skip
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [(r["kind"], json.loads(r["detail"])) for r in rows] == [("api.access", {"status": 403})]
    result = runner.invoke(app, ["audit", "export", "--since", "2999-01-01T00:00:00",
                                 "--data-dir", data_dir])  # fmt: skip
    assert result.stdout.splitlines() == [",".join(audit.EXPORT_COLUMNS)]
    result = runner.invoke(app, ["audit", "export", "--since", "yesterday", "--data-dir",
                                 data_dir])  # fmt: skip
    assert result.exit_code == 2 and "ISO 8601" in result.stderr


# -- forwarding ---------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["udp", "tcp", "tls"])
def test_forwarded_as_dicom_audit_messages_over_syslog(
    sqlite_db: Database, tmp_path: Path, transport: str
) -> None:
    context = None
    extra: dict[str, object] = {}
    if transport == "tls":
        if shutil.which("openssl") is None:
            pytest.skip("openssl is needed to make test certificates")
        cert, key = self_signed_certificate(tmp_path, "collector")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert), str(key))
        extra["ca_file"] = cert
    listener = SyslogListener(transport, context)
    try:
        audit.record(sqlite_db, "dicom.association", actor="CR_ROOM1",
                     address="10.1.2.3:40100", stored=3)  # fmt: skip
        audit.record(sqlite_db, "delivery.dead", study_uid="1.2.3", actor="pacs",
                     outcome="failure", reason="refused")  # fmt: skip
        settings = SyslogSettings(
            enabled=True, host="127.0.0.1", port=listener.port, transport=transport,
            enterprise_site_id="HOSPITAL-A", **extra,
        )  # fmt: skip
        forwarder = AuditForwarder(sqlite_db, settings, tmp_path / "data")
        assert forwarder.forward_once() == 2
        assert forwarder.forward_once() == 0  # the cursor moved past both
        forwarder.stop()
        messages = listener.wait_for(2)
    finally:
        listener.stop()
    assert len(messages) == 2
    headers = [parse_rfc5424(message) for message in messages]
    assert [int(h["pri"]) for h in headers] == [10 * 8 + 5, 10 * 8 + 4]  # authpriv notice/warn
    assert all(h["msgid"] == b"DICOM+RFC3881" and h["app"] == b"medgemma-node" for h in headers)
    assert all(h["msg"].startswith(b"\xef\xbb\xbf") for h in headers)
    association, dead = (check_audit_message(h["msg"][3:]) for h in headers)
    assert association.find("EventIdentification/EventID").get("csd-code") == "110104"  # type: ignore[union-attr]
    peer = association.findall("ActiveParticipant")[1]
    assert peer.get("UserID") == "CR_ROOM1" and peer.get("NetworkAccessPointID") == "10.1.2.3"
    assert peer.get("UserIsRequestor") == "true"
    event = dead.find("EventIdentification")
    assert event is not None and event.get("EventOutcomeIndicator") == "8"
    source = dead.find("AuditSourceIdentification")
    assert source is not None and source.get("AuditEnterpriseSiteID") == "HOSPITAL-A"
    study = dead.find("ParticipantObjectIdentification")
    assert study is not None and study.get("ParticipantObjectID") == "1.2.3"


def test_rows_wait_while_the_collector_is_down(sqlite_db: Database, tmp_path: Path) -> None:
    audit.record(sqlite_db, "node.start", actor="serve", version="x")
    port = free_port()  # nothing listens yet
    settings = SyslogSettings(enabled=True, host="127.0.0.1", port=port, transport="tcp")
    forwarder = AuditForwarder(sqlite_db, settings, tmp_path / "data")
    with pytest.raises(SyslogUnavailable, match="ConnectionRefused"):
        forwarder.forward_once()
    assert forwarder.cursor() == 0
    listener = SyslogListener("tcp")
    try:
        forwarder.settings = forwarder.client.settings = settings.model_copy(
            update={"port": listener.port}
        )
        assert forwarder.forward_once() == 1
        [message] = listener.wait_for(1)
        forwarder.stop()
    finally:
        listener.stop()
    root = check_audit_message(parse_rfc5424(message)["msg"][3:])
    assert root.find("EventIdentification/EventTypeCode").get("csd-code") == "110120"  # type: ignore[union-attr]
