"""Syslog messages (RFC 5424) to a collector over UDP (RFC 5426), TCP (RFC 6587 octet
counting) or TLS (RFC 5425, which also frames by octet counting).

PS3.15 A.6 (audit messages over syslog): facility 10 (security/authorization), severity 5
(notice) for routine events, MSGID "DICOM+RFC3881", the XML in MSG as UTF-8 with its BOM.
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Sequence
from datetime import UTC, datetime

from config.ops_settings import SyslogSettings
from core.errors import DeliveryError

FACILITY_AUTHPRIV = 10
SEVERITY_NOTICE = 5
SEVERITY_WARNING = 4
AUDIT_MSGID = "DICOM+RFC3881"
BOM = b"\xef\xbb\xbf"  # RFC 5424 6.4: MSG-UTF8 starts with the byte order mark
NILVALUE = "-"


class SyslogUnavailable(DeliveryError):
    """The collector cannot be reached or the connection failed; the messages stay queued."""


def _header_field(value: str, limit: int) -> str:
    """RFC 5424 6.2: PRINTUSASCII (33-126), at most ``limit`` characters, else NILVALUE."""
    cleaned = "".join(ch for ch in value if 33 <= ord(ch) <= 126)[:limit]
    return cleaned or NILVALUE


def rfc5424_message(
    msg: bytes,
    *,
    app_name: str,
    msgid: str = AUDIT_MSGID,
    severity: int = SEVERITY_NOTICE,
    hostname: str | None = None,
    timestamp: datetime | None = None,
) -> bytes:
    """``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - BOM MSG`` (no structured data)."""
    when = (timestamp or datetime.now(UTC)).astimezone(UTC)
    stamp = when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"
    header = " ".join(
        (
            f"<{FACILITY_AUTHPRIV * 8 + severity}>1",
            stamp,
            _header_field(hostname or socket.getfqdn(), 255),
            _header_field(app_name, 48),
            _header_field(str(os.getpid()), 128),
            _header_field(msgid, 32),
            NILVALUE,
        )
    )
    return header.encode("ascii") + b" " + BOM + msg


class SyslogClient:
    """Sends syslog messages; TCP and TLS keep one connection open between batches."""

    def __init__(self, settings: SyslogSettings) -> None:
        self.settings = settings
        self._stream: socket.socket | None = None

    def send(self, messages: Sequence[bytes]) -> None:
        """Send every message or raise SyslogUnavailable (a resend may duplicate some: syslog
        has no acknowledgement, so delivery is at least once)."""
        try:
            if self.settings.transport == "udp":
                self._send_udp(messages)
            else:
                self._send_stream(messages)
        except OSError as exc:
            self.close()
            target = f"{self.settings.host}:{self.settings.port}"
            raise SyslogUnavailable(
                f"syslog {self.settings.transport} {target}: {type(exc).__name__}: {exc}"
            ) from exc

    def _send_udp(self, messages: Sequence[bytes]) -> None:
        family = socket.AF_INET6 if ":" in self.settings.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as udp:
            udp.settimeout(self.settings.timeout_s)
            for message in messages:
                udp.sendto(message, (self.settings.host, self.settings.port))

    def _send_stream(self, messages: Sequence[bytes]) -> None:
        stream = self._stream or self._connect()
        self._stream = stream
        framed = b"".join(f"{len(message)} ".encode() + message for message in messages)
        stream.sendall(framed)

    def _connect(self) -> socket.socket:
        settings = self.settings
        raw = socket.create_connection((settings.host, settings.port), settings.timeout_s)
        if settings.transport != "tls":
            return raw
        context = ssl.create_default_context(
            cafile=str(settings.ca_file) if settings.ca_file else None
        )
        context.minimum_version = ssl.TLSVersion.TLSv1_2  # PS3.15 A.6
        if settings.cert_file is not None and settings.key_file is not None:
            context.load_cert_chain(settings.cert_file, settings.key_file)
        try:
            return context.wrap_socket(raw, server_hostname=settings.host)
        except (ssl.SSLError, OSError):
            raw.close()
            raise

    def close(self) -> None:
        if self._stream is not None:
            try:
                self._stream.close()
            finally:
                self._stream = None
