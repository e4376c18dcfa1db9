"""Forwards the audit trail to a syslog collector as DICOM audit messages ([audit.syslog]).

A loop in the serving process reads ``audit_events`` rows after the last one forwarded (its id
kept in <data>/audit/forwarded-id, written durably after each batch went out), builds one
PS3.15 A.5 message per row (dicom_node/atna.py) and sends them (delivery/syslog_client.py).
A collector that is down costs nothing but a log line per try: the rows wait in the database
and go out, in order, when it is back. Delivery is at least once.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

from config.ops_settings import SyslogSettings
from core.loop import LoopThread
from delivery.syslog_client import (
    SEVERITY_NOTICE,
    SEVERITY_WARNING,
    SyslogClient,
    rfc5424_message,
)
from dicom_node.atna import audit_message
from storage import audit
from storage.db import Database
from storage.files import write_durably

log = logging.getLogger(__name__)

CURSOR_FILE = Path("audit") / "forwarded-id"


class AuditForwarder:
    def __init__(self, db: Database, settings: SyslogSettings, data_dir: Path) -> None:
        self.db = db
        self.settings = settings
        self.cursor_path = data_dir / CURSOR_FILE
        self.client = SyslogClient(settings)
        self.source_id = f"{settings.app_name}@{socket.getfqdn()}"
        self.forwarded = 0
        self.loop = LoopThread(
            "audit-forwarder",
            self._step,
            interval_s=settings.poll_interval_s,
            error_wait_s=max(settings.poll_interval_s, 5.0),
            log=log,
            traceback_in_log=False,  # a collector that is down is one line per try
        )

    @property
    def last_error(self) -> str | None:
        return self.loop.last_error

    def start(self) -> None:
        self.loop.start()

    def stop(self) -> None:
        self.loop.stop(timeout_s=10)
        self.client.close()

    def cursor(self) -> int:
        try:
            return int(self.cursor_path.read_text().strip())
        except (OSError, ValueError):
            return 0

    def forward_once(self) -> int:
        """Send the next batch of rows; return how many went out."""
        events = audit.events_after(
            self.db,
            after_id=self.cursor(),
            kinds=self.settings.kinds,
            limit=self.settings.batch_size,
        )
        if not events:
            return 0
        messages = [
            rfc5424_message(
                audit_message(
                    item, source_id=self.source_id, site_id=self.settings.enterprise_site_id
                ),
                app_name=self.settings.app_name,
                severity=SEVERITY_NOTICE if item.outcome == audit.SUCCESS else SEVERITY_WARNING,
            )
            for item in events
        ]
        self.client.send(messages)
        write_durably(self.cursor_path, f"{events[-1].id}\n".encode())
        self.forwarded += len(events)
        return len(events)

    def _step(self) -> float:
        sent = self.forward_once()
        return 0.0 if sent == self.settings.batch_size else self.settings.poll_interval_s
