"""The serving process: wires the parts together and supervises them.

    serve  = SCP + completion scheduler + inference worker + delivery worker
    worker = inference worker only (a second GPU box on the same PostgreSQL)

Every part runs in its own thread; the model never runs in the SCP's association threads.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from config.settings import NodeSettings
from dicom_node.completion import CompletionScheduler
from dicom_node.scp import StorageSCP
from medgemma_node.logs import setup_logging
from storage.db import Database
from storage.phi import load_or_create_salt
from storage.recovery import recover

log = logging.getLogger("medgemma_node.service")

STATUS_FILE = Path("run") / "status.json"


class Part(Protocol):
    """A supervised component: start() returns at once, stop() returns when it has stopped."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


@dataclass
class RuntimeState:
    """What `status` shows about the running process (written to <data>/run/status.json)."""

    pid: int = field(default_factory=os.getpid)
    host: str = field(default_factory=socket.gethostname)
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    scp: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    parts: dict[str, dict[str, Any]] = field(default_factory=dict)


def open_database(settings: NodeSettings) -> Database:
    db = Database(settings.database_url)
    if not db.is_current():
        log.info("upgrading the database schema")
        db.upgrade()
    return db


class Node:
    """One serving process."""

    def __init__(self, settings: NodeSettings, *, with_scp: bool = True) -> None:
        self.settings = settings
        self.data_dir = settings.storage.data_dir
        self.with_scp = with_scp
        self.stop_event = threading.Event()
        self.state = RuntimeState()
        self.parts: dict[str, Part] = {}
        self.state_providers: list[Callable[[RuntimeState], None]] = []
        self.db: Database | None = None
        self.scp: StorageSCP | None = None

    def prepare(self) -> Database:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        setup_logging(
            self.settings.logging.level,
            self.settings.logging.file or self.data_dir / "logs" / "node.log",
        )
        self.db = open_database(self.settings)
        return self.db

    def start(self) -> None:
        db = self.db or self.prepare()
        salt = load_or_create_salt(self.data_dir, self.settings.storage.phi_hash_salt)
        if self.with_scp:
            report = recover(db, self.data_dir, salt)
            log.info("start-up check: %s", report)
            self.scp = StorageSCP(self.settings, db, salt)
            self.scp.start()
            self.state.scp = {
                "ae_title": self.settings.dicom.ae_title,
                "address": self.settings.dicom.bind_address,
                "port": self.scp.port,
            }
            self.add_part("completion", CompletionScheduler(db, self.settings.completion))
        self.write_state()

    def add_part(self, name: str, part: Part) -> None:
        self.parts[name] = part
        part.start()
        log.info("%s started", name)

    def write_state(self) -> None:
        for provider in self.state_providers:
            provider(self.state)
        for name, part in self.parts.items():
            self.state.parts[name] = {"last_error": getattr(part, "last_error", None)}
        path = self.data_dir / STATUS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_suffix(".tmp")
        temp.write_text(json.dumps(self.state.__dict__, default=str, indent=2))
        os.replace(temp, path)

    def run_until_signal(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        while not self.stop_event.wait(2.0):
            self.write_state()
        self.stop()

    def _on_signal(self, signum: int, _frame: object) -> None:
        log.info("signal %d received: stopping", signum)
        self.stop_event.set()

    def stop(self) -> None:
        if self.scp is not None:
            self.scp.stop()
        for name, part in reversed(list(self.parts.items())):
            part.stop()
            log.info("%s stopped", name)
        (self.data_dir / STATUS_FILE).unlink(missing_ok=True)
        if self.db is not None:
            self.db.dispose()
        log.info("stopped")


def read_runtime_state(data_dir: Path) -> dict[str, Any] | None:
    path = data_dir / STATUS_FILE
    try:
        state: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    age = time.time() - path.stat().st_mtime
    state["age_s"] = round(age, 1)
    return state
