"""MLLP client against a real listener on 127.0.0.1: every ACK kind, silence, garbage, TLS."""

from __future__ import annotations

import shutil
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from config.settings import HL7Destination, TLSSettings
from hl7_out.ack import AckCode, AckParseError, parse_ack
from hl7_out.mllp import MLLPClient, frame, judge_ack, message_control_id, send_message
from hl7_out.oru import OruHeader, build_oru
from hl7_out.scripted import ScriptedMLLP
from hl7_out.sender import HL7OruSender
from peers.mllp_listener import ERROR_TEXT, REJECT_TEXT, MLLPListener, ReplyMode
from storage.delivery_types import DeliveryOutcome, Parcel, Verdict
from storage.outbox import ClaimedItem
from storage.report_schema import (
    Finding,
    ModelIdentity,
    ParseStatus,
    ReportContent,
    ReportDocument,
    Urgency,
)
from tests.tls_support import self_signed_certificate

ACK_TIMEOUT_S = 0.5
CONTROL_ID = "MG000101"
CHINESE = "右肺上叶结节"

ListenerFactory = Callable[..., MLLPListener]


@pytest.fixture(scope="module")
def oru() -> str:
    path = get_testdata_file("RG1_UNCI.dcm", download=False)
    if path is None:
        pytest.fail("RG1_UNCI.dcm is not bundled; install pydicom-data")
    report = ReportDocument(
        report_id=1,
        study_instance_uid="1.3.6.1.4.1.5962.1.2.9.20040826185059.5457",
        version_number=1,
        created_at=datetime(2024, 5, 1, 10, 0, tzinfo=UTC),
        content=ReportContent(
            parse_status=ParseStatus.OK,
            language="zh",
            findings=[Finding(label="结节", location="右肺上叶", size_mm=8)],
            impression=CHINESE + " | ^ & ~ \\",
            urgency=Urgency.URGENT,
        ),
        model=ModelIdentity(model_id="google/medgemma-1.5-4b-it", is_test_model=True),
    )
    source = pydicom.dcmread(str(path), stop_before_pixels=True)
    return build_oru(
        report, source, OruHeader(), CONTROL_ID, datetime(2024, 5, 1, 10, 0, 1, tzinfo=UTC)
    )


def destination_for(port: int, tls: TLSSettings | None = None) -> HL7Destination:
    return HL7Destination(
        kind="hl7",
        name="his",
        host="127.0.0.1",
        port=port,
        connect_timeout_s=2.0,
        ack_timeout_s=ACK_TIMEOUT_S,
        tls=tls or TLSSettings(),
    )


@pytest.fixture
def start_listener() -> Iterator[ListenerFactory]:
    started: list[MLLPListener] = []

    def start(mode: ReplyMode = ReplyMode.AA, **kwargs: object) -> MLLPListener:
        listener = MLLPListener(mode, **kwargs)  # type: ignore[arg-type]
        started.append(listener.start())
        return listener

    yield start
    for listener in started:
        listener.stop()


def send_to(listener: MLLPListener, message: str) -> DeliveryOutcome:
    return send_message(message, destination_for(listener.port))


def test_accepted_message_arrives_exactly(start_listener: ListenerFactory, oru: str) -> None:
    listener = start_listener(ReplyMode.AA)

    outcome = send_to(listener, oru)

    assert outcome.verdict is Verdict.DELIVERED  # MSA-2 answered CONTROL_ID (judge_ack)
    assert outcome.code == AckCode.APPLICATION_ACCEPT.value
    assert not outcome.destination_down
    (received,) = listener.wait_for(1)
    assert received.raw == oru.encode("utf-8")
    assert received.text == oru
    assert CHINESE in received.text
    assert received.control_id == CONTROL_ID
    obx = received.message.segments("OBX")
    assert received.message.unescape(str(obx[1](5))) == CHINESE + " | ^ & ~ \\"


def test_commit_accept_is_delivered(start_listener: ListenerFactory, oru: str) -> None:
    assert send_to(start_listener(ReplyMode.CA), oru).verdict is Verdict.DELIVERED


def test_several_messages_each_get_their_own_ack(start_listener: ListenerFactory, oru: str) -> None:
    listener = start_listener(ReplyMode.AA)
    second = oru.replace(CONTROL_ID, "MG000102", 1)

    outcomes = [send_to(listener, oru), send_to(listener, second)]

    assert [(o.verdict, o.code) for o in outcomes] == [(Verdict.DELIVERED, "AA")] * 2
    assert [r.control_id for r in listener.wait_for(2)] == [CONTROL_ID, "MG000102"]


def test_application_error_is_retried(start_listener: ListenerFactory, oru: str) -> None:
    outcome = send_to(start_listener(ReplyMode.AE), oru)

    assert outcome.verdict is Verdict.RETRY
    assert outcome.reason.startswith("AE: ")
    assert ERROR_TEXT in outcome.reason
    assert "207 Application internal error" in outcome.reason


def test_application_reject_is_rejected_with_reason(
    start_listener: ListenerFactory, oru: str
) -> None:
    outcome = send_to(start_listener(ReplyMode.AR), oru)

    assert outcome.verdict is Verdict.REJECTED
    assert outcome.reason == f"AR: {REJECT_TEXT}; PID-3 204 Unknown key identifier"


def test_ack_for_another_control_id_is_retried(start_listener: ListenerFactory, oru: str) -> None:
    outcome = send_to(start_listener(ReplyMode.WRONG_CONTROL_ID), oru)

    assert outcome.verdict is Verdict.RETRY
    assert f"{CONTROL_ID}X" in outcome.reason and "not" in outcome.reason


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        (ReplyMode.GARBAGE, "unreadable ACK"),
        (ReplyMode.UNFRAMED_GARBAGE, "closed before a complete ACK frame"),
        (ReplyMode.CLOSE, "closed without an ACK"),
    ],
)
def test_garbage_and_hang_ups_are_retried(
    mode: ReplyMode, reason: str, start_listener: ListenerFactory, oru: str
) -> None:
    listener = start_listener(mode)

    outcome = send_to(listener, oru)

    assert outcome.verdict is Verdict.RETRY
    assert reason in outcome.reason
    assert len(listener.wait_for(1)) == 1  # the listener did get the message


def test_silent_listener_times_out(start_listener: ListenerFactory, oru: str) -> None:
    listener = start_listener(ReplyMode.SILENT)

    started = time.monotonic()
    outcome = send_to(listener, oru)
    elapsed = time.monotonic() - started

    assert outcome.verdict is Verdict.RETRY
    assert "no complete ACK within 0.5 s" in outcome.reason
    assert ACK_TIMEOUT_S <= elapsed < ACK_TIMEOUT_S + 1.0


def test_fragmented_ack_with_lf_separators_is_read(
    start_listener: ListenerFactory, oru: str
) -> None:
    outcome = send_to(start_listener(ReplyMode.FRAGMENTED_LF), oru)

    assert outcome.verdict is Verdict.DELIVERED


def test_nothing_listening_is_retried(oru: str) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]

    outcome = send_message(oru, destination_for(free_port))

    assert outcome.verdict is Verdict.RETRY
    assert "cannot connect" in outcome.reason and "ConnectionRefusedError" in outcome.reason


def test_ack_judged_against_the_message_control_id() -> None:
    ack = f"MSH|^~\\&|HIS|H|MG|MG|20240101||ACK|1|P|2.5\rMSA|AA|{CONTROL_ID}\r".encode()

    assert judge_ack(ack, CONTROL_ID).verdict is Verdict.DELIVERED
    other = judge_ack(ack, "MG000102")
    assert (other.verdict, other.code, other.destination_down) == (Verdict.RETRY, "AA", False)


def test_transport_seams(start_listener: ListenerFactory, oru: str) -> None:
    listener = start_listener(ReplyMode.AR)
    destination = destination_for(listener.port)
    assert MLLPClient(destination).send(oru).verdict is Verdict.REJECTED
    scripted = ScriptedMLLP(destination, [DeliveryOutcome.retry("busy")])

    assert scripted.send(oru).verdict is Verdict.RETRY
    assert scripted.send(oru).verdict is Verdict.DELIVERED
    assert scripted.sent == [("his", oru), ("his", oru)]


def _parcel(path: Path, message_id: str) -> Parcel:
    item = ClaimedItem(
        1, 1, "his", "hl7", message_id, path.name, 1, datetime(2024, 5, 1, tzinfo=UTC),
        "token", "1.2.3", None, None,
    )  # fmt: skip
    return Parcel(item, path)


def test_oru_sender_sends_only_the_rows_own_message(oru: str, tmp_path: Path) -> None:
    payload, not_hl7 = tmp_path / "oru-his.hl7", tmp_path / "other.hl7"
    payload.write_bytes(oru.encode("utf-8"))
    not_hl7.write_text("PID|1||x\r")
    destination = destination_for(1)
    transport = ScriptedMLLP(destination, [DeliveryOutcome.retry("busy", "AE")])
    sender = HL7OruSender(destination, transport)

    outcomes = sender.send(
        [
            _parcel(payload, CONTROL_ID),
            _parcel(payload, "MG999999"),  # the file is not this row's message
            _parcel(not_hl7, CONTROL_ID),
            _parcel(tmp_path / "gone.hl7", CONTROL_ID),
            _parcel(payload, CONTROL_ID),
        ]
    )

    assert [(o.verdict, o.code) for o in outcomes] == [
        (Verdict.RETRY, "AE"),
        (Verdict.REJECTED, "MSH-10-mismatch"),
        (Verdict.REJECTED, "no-MSH-10"),
        (Verdict.REJECTED, "payload-missing"),
        (Verdict.DELIVERED, "AA"),
    ]
    assert transport.sent == [("his", oru), ("his", oru)]  # CRs kept, nothing else sent


def test_frame_and_control_id(oru: str) -> None:
    block = frame(oru)

    assert block.startswith(b"\x0b") and block.endswith(b"\x1c\x0d")
    assert block[1:-2].decode("utf-8") == oru
    assert message_control_id(oru) == CONTROL_ID
    with pytest.raises(ValueError):
        message_control_id("PID|1||x\r")


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"HELLO",
        b"\xff\xfe\x00garbage",
        b"MSH|^~\\&|HIS|H|MG|MG|20240101||ACK|1|P|2.5\r",  # no MSA
        b"MSH|^~\\&|HIS|H|MG|MG|20240101||ACK|1|P|2.5\rMSA|OK|MG1\r",  # not table 0008
        b"MSH",
    ],
)
def test_garbage_is_not_an_ack(payload: bytes) -> None:
    with pytest.raises(AckParseError):
        parse_ack(payload)


def test_real_world_ack_variants_are_read() -> None:
    crlf = b"MSH|^~\\&|HIS|H|MG|MG|20240101||ACK^R01|9|P|2.3\r\nMSA|aa|MG1\r\n"
    old_err = "MSH|^~\\&|HIS|H\nMSA|AR|MG1\nERR|PID^1^3^101&Required field missing\n"
    latin1 = "MSH|^~\\&|HIS|H\rMSA|AE|MG1|Fehler: Größe\r".encode("latin-1")

    assert parse_ack(crlf).code is AckCode.APPLICATION_ACCEPT
    assert parse_ack(crlf).control_id == "MG1"
    assert parse_ack(old_err).reason == "AR: PID 1 3 101 Required field missing"
    assert parse_ack(latin1).reason == "AE: Fehler: Größe"


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make test certificates")
    directory = tmp_path_factory.mktemp("tls")
    return {name: self_signed_certificate(directory, name) for name in ("his", "node", "stranger")}


def _server_context(certificates: dict[str, tuple[Path, Path]]) -> ssl.SSLContext:
    """The HIS: its own certificate, and it requires the node's client certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*map(str, certificates["his"]))
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(str(certificates["node"][0]))
    return context


def _client_tls(certificates: dict[str, tuple[Path, Path]], trusted: str) -> TLSSettings:
    cert, key = certificates["node"]
    return TLSSettings(enabled=True, cert_file=cert, key_file=key, ca_file=certificates[trusted][0])


def test_mutual_tls_delivery(
    start_listener: ListenerFactory, oru: str, certificates: dict[str, tuple[Path, Path]]
) -> None:
    listener = start_listener(ReplyMode.AA, ssl_context=_server_context(certificates))

    outcome = send_message(oru, destination_for(listener.port, _client_tls(certificates, "his")))

    assert outcome.verdict is Verdict.DELIVERED
    assert listener.wait_for(1)[0].raw == oru.encode("utf-8")


def test_untrusted_server_certificate_is_retried(
    start_listener: ListenerFactory, oru: str, certificates: dict[str, tuple[Path, Path]]
) -> None:
    listener = start_listener(ReplyMode.AA, ssl_context=_server_context(certificates))
    tls = _client_tls(certificates, "stranger")

    outcome = send_message(oru, destination_for(listener.port, tls))

    assert outcome.verdict is Verdict.RETRY
    assert "TLS" in outcome.reason and "CERTIFICATE_VERIFY_FAILED" in outcome.reason
    assert listener.received == []
