"""A real MLLP listener (an HIS stand-in) for tests: TCP or TLS on 127.0.0.1, a free port.

Each connection may carry several messages. Every complete frame (``<VT> ... <FS><CR>``) is
recorded as received, parsed with the ``hl7`` package, and answered according to the
listener's ReplyMode with an ACK built for that message (MSA-2 = its MSH-10).

    listener = MLLPListener(ReplyMode.AA)
    listener.start()
    ...  # send to ("127.0.0.1", listener.port)
    listener.wait_for(1)
    listener.stop()
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import ssl
import threading
import time
from dataclasses import dataclass, field
from enum import StrEnum
from types import TracebackType

import hl7

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"
CONNECTION_TIMEOUT_S = 10.0


class ReplyMode(StrEnum):
    AA = "AA"  # application accept
    CA = "CA"  # commit accept (enhanced mode)
    AE = "AE"  # application error, MSA-3 and ERR say why
    AR = "AR"  # application reject, MSA-3 and ERR say why
    WRONG_CONTROL_ID = "wrong_control_id"  # AA, but MSA-2 is not the message's MSH-10
    GARBAGE = "garbage"  # a well-framed block that is not HL7
    UNFRAMED_GARBAGE = "unframed_garbage"  # bytes without MLLP framing, then close
    SILENT = "silent"  # read the message, never answer, keep the connection open
    CLOSE = "close"  # read the message, close without answering
    FRAGMENTED_LF = "fragmented_lf"  # AA with LF segment ends, sent a few bytes at a time


REJECT_TEXT = "Unknown patient"
# The answer to a frame that is not a readable HL7 message: AR without MSA-2 (§2.9.2).
UNREADABLE_ACK = (
    "MSH|^~\\&|HIS|HOSPITAL|||20240101000000||ACK|UNREADABLE|P|2.5\rMSA|AR||Unreadable\r"
)
ERROR_TEXT = "Database busy"


@dataclass(frozen=True)
class ReceivedMessage:
    raw: bytes  # the frame's content, exactly as received
    text: str  # raw decoded as UTF-8
    control_id: str  # MSH-10 as parsed by the hl7 package
    message: hl7.Message
    received_at: float = field(default_factory=time.perf_counter)  # for latency benchmarks


class MLLPListener:
    """An MLLP server in its own thread; ``received`` is safe to read from the test thread."""

    def __init__(
        self,
        reply_mode: ReplyMode = ReplyMode.AA,
        ssl_context: ssl.SSLContext | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.reply_mode = reply_mode
        self.ssl_context = ssl_context
        self.host = host
        self._received: list[ReceivedMessage] = []
        self._unreadable: list[bytes] = []
        self._condition = threading.Condition()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the listener is not started")
        return int(self._server.server_address[1])

    @property
    def received(self) -> list[ReceivedMessage]:
        with self._condition:
            return list(self._received)

    def start(self) -> MLLPListener:
        self._server = _Server((self.host, 0), self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="mllp-listener",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.close_connections()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None

    def wait_for(self, count: int, timeout: float = 5.0) -> list[ReceivedMessage]:
        """Block until ``count`` messages arrived; raise TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        with self._condition:
            while len(self._received) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{len(self._received)} of {count} messages arrived")
                self._condition.wait(remaining)
            return list(self._received)

    def __enter__(self) -> MLLPListener:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def unreadable(self) -> list[bytes]:
        """Frames that were not UTF-8 HL7 messages (answered AR)."""
        with self._condition:
            return list(self._unreadable)

    def record_unreadable(self, raw: bytes) -> None:
        with self._condition:
            self._unreadable.append(raw)

    def record(self, raw: bytes) -> ReceivedMessage:
        text = raw.decode("utf-8")
        message = hl7.parse(text)
        received = ReceivedMessage(raw, text, str(message.segment("MSH")(10)), message)
        with self._condition:
            self._received.append(received)
            self._condition.notify_all()
        return received


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], listener: MLLPListener) -> None:
        self.listener = listener
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        super().__init__(address, _Handler)

    def track(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.add(connection)

    def untrack(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.discard(connection)

    def close_connections(self) -> None:
        """Wake handlers blocked on open connections (SILENT mode) so stop() returns."""
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        raw_connection: socket.socket = self.request
        raw_connection.settimeout(CONNECTION_TIMEOUT_S)
        context = self.server.listener.ssl_context
        try:
            connection = (
                context.wrap_socket(raw_connection, server_side=True) if context else raw_connection
            )
        except OSError:  # failed TLS handshake: the client goes away with an error
            return
        self.server.track(connection)
        try:
            self._serve(connection)
        except OSError:
            return
        finally:
            self.server.untrack(connection)
            connection.close()

    def _serve(self, connection: socket.socket) -> None:
        buffer = bytearray()
        while True:
            frame = _take_frame(buffer)
            if frame is None:
                chunk = connection.recv(65536)
                if not chunk:
                    return
                buffer += chunk
            elif not self._answer(connection, frame):
                return

    def _answer(self, connection: socket.socket, frame: bytes) -> bool:
        """Record and answer one message; False when the connection should end."""
        listener = self.server.listener
        try:
            received = listener.record(frame)
        except (UnicodeDecodeError, hl7.ParseException, IndexError, KeyError):
            listener.record_unreadable(frame)
            connection.sendall(START_BLOCK + UNREADABLE_ACK.encode() + END_BLOCK)
            return True
        mode = listener.reply_mode
        if mode is ReplyMode.SILENT:
            while connection.recv(65536):
                pass
            return False
        if mode is ReplyMode.CLOSE:
            return False
        if mode is ReplyMode.UNFRAMED_GARBAGE:
            connection.sendall(b"\x00\xffnot an ack at all\r\n")
            return False
        if mode is ReplyMode.GARBAGE:
            connection.sendall(START_BLOCK + b"HELLO this is not HL7\r" + END_BLOCK)
            return True
        if mode is ReplyMode.FRAGMENTED_LF:
            block = START_BLOCK + build_ack(received, "AA").replace("\r", "\n").encode() + END_BLOCK
            for offset in range(0, len(block), 7):
                connection.sendall(block[offset : offset + 7])
                time.sleep(0.002)
            return True
        connection.sendall(START_BLOCK + _ack_for(received, mode).encode() + END_BLOCK)
        return True


def _ack_for(received: ReceivedMessage, mode: ReplyMode) -> str:
    if mode is ReplyMode.WRONG_CONTROL_ID:
        return build_ack(received, "AA", acknowledged_id=received.control_id + "X")
    return build_ack(received, mode.value)


def _take_frame(buffer: bytearray) -> bytes | None:
    start = buffer.find(START_BLOCK)
    end = buffer.find(END_BLOCK, start + 1) if start >= 0 else -1
    if end < 0:
        return None
    frame = bytes(buffer[start + 1 : end])
    del buffer[: end + len(END_BLOCK)]
    return frame


def build_ack(received: ReceivedMessage, code: str, acknowledged_id: str | None = None) -> str:
    """An original-mode ACK (HL7 v2.5 §2.9.2) for ``received``.

    MSH from the ``hl7`` package's ``create_ack`` (sender and receiver swapped, trigger
    copied); MSA-1 ``code``, MSA-2 the message's MSH-10 unless ``acknowledged_id`` is given;
    for AE and AR an MSA-3 text and an ERR segment (§2.15.5: ERR-2 location, ERR-3 HL7 error
    code from table 0357, ERR-4 severity E).
    """
    ack = received.message.create_ack(ack_code=code, message_id=f"ACK{received.control_id}")
    header = str(ack.segment("MSH"))
    msa = f"MSA|{code}|{received.control_id if acknowledged_id is None else acknowledged_id}"
    segments = [header, msa]
    if code == "AR":
        segments[1] += f"|{REJECT_TEXT}"
        segments.append("ERR||PID^1^3|204^Unknown key identifier^HL70357|E")
    elif code == "AE":
        segments[1] += f"|{ERROR_TEXT}"
        segments.append("ERR||MSH^1^10|207^Application internal error^HL70357|E")
    return "\r".join(segments) + "\r"
