"""Sending one HL7 message over MLLP and reading its acknowledgment.

HL7 v2.5 Appendix C.4 (MLLP release 1): a message travels as ``<VT> message <FS><CR>``
(0x0B ... 0x1C 0x0D) over TCP, optionally inside TLS. One connection per message: connect
(``connect_timeout_s``, TLS handshake included), send the frame, read one reply frame within
``ack_timeout_s``, close. The reply decides the outcome:

    DELIVERED  MSA-1 AA or CA and MSA-2 equal to our MSH-10
    REJECTED   MSA-1 AR or CR: the receiver will not take this message; sending it again
               gives the same answer, so the caller dead-letters it
    RETRY      everything else: AE or CE, an ACK for another control id, an unreadable or
               missing ACK, a timeout, a refused, reset or closed connection, a TLS failure

Nothing is retried here; the delivery worker owns backoff and dead letters.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from config.settings import HL7Destination
from config.tls import client_ssl_context
from core.errors import HL7Error
from hl7_out.ack import Acknowledgment, AckParseError, parse_ack

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"
MAX_ACK_BYTES = 1 << 20
_RECEIVE_SIZE = 65536
_MSH_CONTROL_ID_FIELD = 9  # MSH-10: MSH-1 is the separator itself, so index 9 after split


class DeliveryStatus(StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"
    REJECTED = "rejected"


@dataclass(frozen=True)
class DeliveryOutcome:
    """What happened to one send; ``reason`` says why for RETRY and REJECTED (no PHI of ours,
    but ACK texts are the receiver's own words)."""

    status: DeliveryStatus
    reason: str = ""
    ack: Acknowledgment | None = None


class _DeliveryFailed(HL7Error):
    """A transport failure, with the reason the outcome will carry."""


def frame(message: str) -> bytes:
    """The MLLP block for ``message``, encoded as UTF-8 (the ORU's MSH-18)."""
    return START_BLOCK + message.encode("utf-8") + END_BLOCK


def message_control_id(message: str) -> str:
    """MSH-10 of an ER7 message (HL7 v2.5 §2.15.9.10)."""
    if not message.startswith("MSH") or len(message) < 4:
        raise ValueError("the message does not start with an MSH segment")
    header = message.split("\r", 1)[0]
    fields = header.split(header[3])
    if len(fields) <= _MSH_CONTROL_ID_FIELD or not fields[_MSH_CONTROL_ID_FIELD]:
        raise ValueError("the message has no MSH-10 control id")
    return fields[_MSH_CONTROL_ID_FIELD]


def send_message(message: str, destination: HL7Destination) -> DeliveryOutcome:
    """Send ``message`` to ``destination`` over MLLP once and judge the ACK (Appendix C.4).

    Raises ValueError only for a message without MSH-10; every network or peer failure is a
    DeliveryOutcome.
    """
    control_id = message_control_id(message)
    try:
        payload = _exchange(frame(message), destination)
    except _DeliveryFailed as exc:
        return DeliveryOutcome(DeliveryStatus.RETRY, str(exc))
    return judge_ack(payload, control_id)


def judge_ack(payload: bytes, control_id: str) -> DeliveryOutcome:
    """The outcome for an ACK frame's content answering the message ``control_id``."""
    try:
        ack = parse_ack(payload)
    except AckParseError as exc:
        return DeliveryOutcome(DeliveryStatus.RETRY, f"unreadable ACK: {exc}")
    if ack.control_id != control_id:
        reason = f"ACK answers control id {ack.control_id!r}, not {control_id!r}"
        return DeliveryOutcome(DeliveryStatus.RETRY, reason, ack)
    if ack.code.accepted:
        return DeliveryOutcome(DeliveryStatus.DELIVERED, ack.reason, ack)
    if ack.code.rejected:
        return DeliveryOutcome(DeliveryStatus.REJECTED, ack.reason, ack)
    return DeliveryOutcome(DeliveryStatus.RETRY, ack.reason, ack)


def _exchange(block: bytes, destination: HL7Destination) -> bytes:
    connection = _connect(destination)
    with connection:
        deadline = time.monotonic() + destination.ack_timeout_s
        try:
            connection.settimeout(destination.ack_timeout_s)
            connection.sendall(block)
            return _read_frame(connection, deadline)
        except TimeoutError as exc:
            raise _DeliveryFailed(
                f"no complete ACK within {destination.ack_timeout_s:g} s"
            ) from exc
        except OSError as exc:
            raise _DeliveryFailed(f"connection failed while exchanging: {_describe(exc)}") from exc


def _connect(destination: HL7Destination) -> socket.socket:
    """TCP connect, then the TLS handshake when enabled, both within connect_timeout_s."""
    address = f"{destination.host}:{destination.port}"
    try:
        connection = socket.create_connection(
            (destination.host, destination.port), timeout=destination.connect_timeout_s
        )
    except TimeoutError as exc:
        raise _DeliveryFailed(
            f"connect to {address} timed out after {destination.connect_timeout_s:g} s"
        ) from exc
    except OSError as exc:
        raise _DeliveryFailed(f"cannot connect to {address}: {_describe(exc)}") from exc
    if not destination.tls.enabled:
        return connection
    try:
        context = client_ssl_context(destination.tls)
        assert context is not None  # TLS is enabled here
        return context.wrap_socket(connection, server_hostname=destination.host)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        connection.close()
        raise _DeliveryFailed(f"TLS with {address} failed: {_describe(exc)}") from exc


def _read_frame(connection: socket.socket, deadline: float) -> bytes:
    """Read until ``<FS><CR>`` ends a block; return the block's content.

    Bytes before ``<VT>`` are skipped; a peer that closes right after ``<FS>`` is accepted.
    """
    buffer = bytearray()
    while True:
        content = _frame_content(buffer)
        if content is not None:
            return content
        if len(buffer) > MAX_ACK_BYTES:
            raise _DeliveryFailed(f"reply larger than {MAX_ACK_BYTES} bytes without a frame end")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        connection.settimeout(remaining)
        chunk = connection.recv(_RECEIVE_SIZE)
        if not chunk:
            return _content_at_close(buffer)
        buffer += chunk


def _frame_content(buffer: bytearray) -> bytes | None:
    start = buffer.find(START_BLOCK)
    if start < 0:
        return None
    end = buffer.find(END_BLOCK, start + 1)
    return bytes(buffer[start + 1 : end]) if end >= 0 else None


def _content_at_close(buffer: bytearray) -> bytes:
    start = buffer.find(START_BLOCK)
    if not buffer:
        raise _DeliveryFailed("connection closed without an ACK")
    if start >= 0 and buffer.endswith(END_BLOCK[:1]):
        return bytes(buffer[start + 1 : -1])
    raise _DeliveryFailed("connection closed before a complete ACK frame")


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class HL7Sender(Protocol):
    """The seam between the delivery worker and the network: one method."""

    def send(self, message: str, destination: HL7Destination) -> DeliveryOutcome: ...


class MLLPSender:
    """The real sender: ``send_message`` over TCP (and TLS)."""

    def send(self, message: str, destination: HL7Destination) -> DeliveryOutcome:
        return send_message(message, destination)


@dataclass
class ScriptedSender:
    """A sender for tests: records each message and answers with the next scripted outcome
    (DELIVERED once the script is used up)."""

    outcomes: list[DeliveryOutcome] = field(default_factory=list)
    sent: list[tuple[str, str]] = field(default_factory=list)  # (destination name, message)

    def send(self, message: str, destination: HL7Destination) -> DeliveryOutcome:
        self.sent.append((destination.name, message))
        if self.outcomes:
            return self.outcomes.pop(0)
        return DeliveryOutcome(DeliveryStatus.DELIVERED, "scripted")
