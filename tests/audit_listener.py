"""A syslog collector on loopback for the audit forwarding tests: UDP datagrams (RFC 5426), or
TCP / TLS streams framed by octet counting (RFC 6587 3.4.1, RFC 5425 4.3). It keeps the raw
messages it received; the tests parse them as RFC 5424."""

from __future__ import annotations

import re
import socket
import ssl
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

RFC5424 = re.compile(
    rb"^<(?P<pri>\d{1,3})>1 (?P<timestamp>\S+) (?P<hostname>\S+) (?P<app>\S+) "
    rb"(?P<procid>\S+) (?P<msgid>\S+) (?P<sd>-|(?:\[[^\]]*\])+) (?P<msg>.*)$",
    re.DOTALL,
)
TIMESTAMP = re.compile(rb"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|[+-]\d{2}:\d{2})$")


@dataclass
class SyslogListener:
    transport: str  # udp | tcp | tls
    context: ssl.SSLContext | None = None
    messages: list[bytes] = field(default_factory=list)
    received: threading.Condition = field(default_factory=threading.Condition)

    def __post_init__(self) -> None:
        kind = socket.SOCK_DGRAM if self.transport == "udp" else socket.SOCK_STREAM
        self.sock = socket.socket(socket.AF_INET, kind)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.stopping = False
        if self.transport != "udp":
            self.sock.listen(4)
        self.sock.settimeout(0.2)
        target = self._serve_udp if self.transport == "udp" else self._serve_streams
        self.thread = threading.Thread(target=target, name="syslog-listener", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping = True
        self.thread.join(5)
        self.sock.close()

    def wait_for(self, count: int, timeout_s: float = 20.0) -> list[bytes]:
        with self.received:
            self.received.wait_for(lambda: len(self.messages) >= count, timeout_s)
            return list(self.messages)

    def _keep(self, message: bytes) -> None:
        with self.received:
            self.messages.append(message)
            self.received.notify_all()

    def _serve_udp(self) -> None:
        while not self.stopping:
            try:
                data, _ = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            self._keep(data)

    def _serve_streams(self) -> None:
        while not self.stopping:
            try:
                client, _ = self.sock.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._read_frames, args=(client,), daemon=True).start()

    def _read_frames(self, client: socket.socket) -> None:
        client.settimeout(10)
        if self.context is not None:
            client = self.context.wrap_socket(client, server_side=True)
        buffer = b""
        with client:
            while not self.stopping:
                try:
                    chunk = client.recv(65536)
                except (TimeoutError, OSError):
                    return
                if not chunk:
                    return
                buffer += chunk
                buffer = self._take_frames(buffer)

    def _take_frames(self, buffer: bytes) -> bytes:
        while b" " in buffer:
            length_text, rest = buffer.split(b" ", 1)
            length = int(length_text)  # a malformed frame fails the test loudly
            if len(rest) < length:
                break
            self._keep(rest[:length])
            buffer = rest[length:]
        return buffer


def parse_rfc5424(message: bytes) -> dict[str, bytes]:
    match = RFC5424.match(message)
    assert match is not None, f"not RFC 5424: {message[:120]!r}"
    fields = match.groupdict()
    assert TIMESTAMP.match(fields["timestamp"]), fields["timestamp"]
    return fields


def check_audit_message(xml: bytes) -> ET.Element:
    """The element structure and required attributes of PS3.15 A.5.1 (the DICOM audit
    message schema): EventIdentification, ActiveParticipant+, AuditSourceIdentification,
    ParticipantObjectIdentification*, in that order; coded values as csd-code triplets."""
    root = ET.fromstring(xml)
    assert root.tag == "AuditMessage"
    tags = [child.tag for child in root]
    assert tags[0] == "EventIdentification"
    participants = 1
    while participants < len(tags) and tags[participants] == "ActiveParticipant":
        participants += 1
    assert participants >= 2, tags  # at least one ActiveParticipant
    assert tags[participants] == "AuditSourceIdentification", tags
    assert all(tag == "ParticipantObjectIdentification" for tag in tags[participants + 1 :])
    event = root[0]
    assert event.get("EventActionCode") in {"C", "R", "U", "D", "E"}
    assert TIMESTAMP.match((event.get("EventDateTime") or "").encode())
    assert event.get("EventOutcomeIndicator") in {"0", "4", "8", "12"}
    assert event[0].tag == "EventID"
    for coded in root.iter():
        if coded.tag in ("EventID", "EventTypeCode", "RoleIDCode", "AuditSourceTypeCode",
                         "ParticipantObjectIDTypeCode"):  # fmt: skip
            assert (
                coded.get("csd-code") and coded.get("codeSystemName") and coded.get("originalText")
            ), coded.attrib
    for participant in root.findall("ActiveParticipant"):
        assert participant.get("UserID")
        assert participant.get("UserIsRequestor") in ("true", "false")
    assert root.find("AuditSourceIdentification").get("AuditSourceID")  # type: ignore[union-attr]
    for item in root.findall("ParticipantObjectIdentification"):
        assert item.get("ParticipantObjectID")
        assert item[0].tag == "ParticipantObjectIDTypeCode"
    return root
