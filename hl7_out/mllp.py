"""Sending one HL7 message over MLLP and reading its acknowledgment.

HL7 v2.5 Appendix C.4 (MLLP release 1): a message travels as ``<VT> message <FS><CR>``
(0x0B ... 0x1C 0x0D) over TCP, optionally inside TLS. One connection per message: connect
(``connect_timeout_s``, TLS handshake included), send the frame, read one reply frame within
``ack_timeout_s``, close. The reply decides the outcome (storage.delivery_types), code = MSA-1:

    DELIVERED  MSA-1 AA or CA and MSA-2 equal to our MSH-10
    REJECTED   MSA-1 AR or CR: the receiver will not take this message; sending it again
               gives the same answer, so the caller dead-letters it
    RETRY      everything else: AE or CE, an ACK for another control id, an unreadable or
               missing ACK, a timeout, a refused, reset or closed connection, a TLS failure.
               Without a readable ACK the receiver is taken as down (code "no-ACK").

Nothing is retried here; the delivery worker owns backoff and dead letters.

The seam: ``MLLPTransport`` (one method, bound to a destination) with the real
``MLLPClient`` here and ``hl7_out.scripted.ScriptedMLLP`` for tests.
"""

from __future__ import annotations

import socket
import time
from typing import Protocol

from config.settings import HL7Destination
from config.tls import client_ssl_context
from core.errors import HL7Error
from hl7_out.ack import AckParseError, parse_ack
from storage.delivery_types import DeliveryOutcome

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"
MAX_ACK_BYTES = 1 << 20
_RECEIVE_SIZE = 65536
_MSH_CONTROL_ID_FIELD = 9  # MSH-10: MSH-1 is the separator itself, so index 9 after split
NO_ACK = "no-ACK"  # the outcome code when no readable acknowledgment came back


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
        return DeliveryOutcome.retry(str(exc), NO_ACK, destination_down=True)
    return judge_ack(payload, control_id)


def judge_ack(payload: bytes, control_id: str) -> DeliveryOutcome:
    """The outcome for an ACK frame's content answering the message ``control_id``
    (original acknowledgment mode, HL7 v2.5 §2.9.2)."""
    try:
        ack = parse_ack(payload)
    except AckParseError as exc:
        return DeliveryOutcome.retry(f"unreadable ACK: {exc}", NO_ACK, destination_down=True)
    code = ack.code.value
    if ack.control_id != control_id:
        reason = f"ACK answers control id {ack.control_id!r}, not {control_id!r}"
        return DeliveryOutcome.retry(reason, code)
    if ack.code.accepted:
        return DeliveryOutcome.delivered(ack.reason, code)
    if ack.code.rejected:
        return DeliveryOutcome.rejected(ack.reason, code)
    return DeliveryOutcome.retry(ack.reason, code)


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


class MLLPTransport(Protocol):
    """The MLLP seam, bound to one HL7 destination: send one message, judge its ACK."""

    def send(self, message: str) -> DeliveryOutcome: ...


class MLLPClient:
    """The real transport: ``send_message`` over TCP (and TLS) to one destination."""

    def __init__(self, destination: HL7Destination) -> None:
        self.destination = destination

    def send(self, message: str) -> DeliveryOutcome:
        return send_message(message, self.destination)
