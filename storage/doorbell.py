"""Wake-ups between the node's processes that share a data directory.

The database is the source of truth and every loop still polls it (that is all a worker on
another host gets). On one host, the process that just wrote work rings the doorbell of the
process that will do it, so a study goes from "complete" to "report delivered" without waiting
for poll ticks:

    completion scheduler --ring "worker"-->   inference worker   (a job was queued)
    inference worker     --ring "delivery"--> delivery worker    (outbox rows were written)

A doorbell is a Linux abstract-namespace datagram socket named after the data directory (no
file to clean up, no path-length limit). Ringing a doorbell nobody listens to does nothing.
"""

from __future__ import annotations

import hashlib
import select
import socket
from pathlib import Path

_PREFIX = "\0medgemma-node"
WORKER_DOORBELL = "worker"
DELIVERY_DOORBELL = "delivery"


def doorbell_address(data_dir: Path, name: str) -> str:
    digest = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:20]
    return f"{_PREFIX}-{digest}-{name}"


def ring(data_dir: Path, name: str) -> None:
    """Wake the listener of ``name``, if there is one; never blocks, never raises."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.setblocking(False)
            sender.sendto(b"!", doorbell_address(data_dir, name))
    except OSError:
        pass


class Doorbell:
    """The listening side. ``wait(timeout)`` returns early when rung (True) or at timeout."""

    def __init__(self, data_dir: Path, name: str) -> None:
        self.socket: socket.socket | None = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self.socket.bind(doorbell_address(data_dir, name))
        except OSError:
            # Another process already listens (a second worker on this host): it gets the
            # rings and this one falls back to polling, which is always correct.
            self.socket.close()
            self.socket = None
            return
        self.socket.setblocking(False)

    def wait(self, timeout: float) -> bool:
        if self.socket is None:
            select.select([], [], [], max(timeout, 0.0))
            return False
        readable, _, _ = select.select([self.socket], [], [], max(timeout, 0.0))
        if not readable:
            return False
        self._drain()
        return True

    def _drain(self) -> None:
        assert self.socket is not None
        try:
            while self.socket.recv(64):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close()
            self.socket = None
