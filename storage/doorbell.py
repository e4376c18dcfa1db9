"""Wake-ups between the node's processes that share a data directory.

The database is the source of truth and every loop still polls it (that is all a worker on
another host gets). On one host, the process that just wrote work rings the doorbell of the
process that will do it, so a study goes from "complete" to "report delivered" without waiting
for poll ticks:

    completion scheduler --ring "worker"-->   inference worker   (a job was queued)
    API                  --ring "worker"-->   inference worker   (a question was queued)
    inference worker     --ring "delivery"--> delivery worker    (outbox rows were written)
    inference worker     --ring "api"-->      API process        (a question was answered)
    receiver (`receive`) --ring "completion"--> completion scheduler (an MPPS step completed)

In the API process many request threads wait for their answers at once: ``SharedDoorbell``
listens in one thread and wakes all of them; each re-reads its row.

A doorbell is a Linux abstract-namespace datagram socket named after the data directory (no
file to clean up, no path-length limit). Ringing a doorbell nobody listens to does nothing.
"""

from __future__ import annotations

import hashlib
import select
import socket
import threading
from pathlib import Path

_PREFIX = "\0medgemma-node"
WORKER_DOORBELL = "worker"
DELIVERY_DOORBELL = "delivery"
API_DOORBELL = "api"
COMPLETION_DOORBELL = "completion"


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


class SharedDoorbell:
    """One doorbell many threads wait on (the API process: one waiter per open request).

    A waiter takes ``token()`` before it looks at the database and then calls
    ``wait(token, timeout)``: a ring that arrives between the two is not missed. Every waiter
    must still bound its wait and re-check the database: workers on other hosts cannot ring.
    """

    def __init__(self, data_dir: Path, name: str) -> None:
        self.data_dir = data_dir
        self.name = name
        self._doorbell: Doorbell | None = None
        self._rings = 0
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, name=f"doorbell-{name}", daemon=True)

    @property
    def listening(self) -> bool:
        """False when another process on this host took the name: waits then just time out."""
        return self._doorbell is not None and self._doorbell.socket is not None

    def start(self) -> None:
        self._doorbell = Doorbell(self.data_dir, self.name)
        self._thread.start()

    def _listen(self) -> None:
        assert self._doorbell is not None
        while not self._stop.is_set():
            if self._doorbell.wait(1.0):
                with self._changed:
                    self._rings += 1
                    self._changed.notify_all()

    def token(self) -> int:
        with self._changed:
            return self._rings

    def wait(self, token: int, timeout: float) -> bool:
        """True when rung since ``token`` was taken (at once if it already was), else False
        after ``timeout`` seconds."""
        with self._changed:
            return self._changed.wait_for(lambda: self._rings != token, max(timeout, 0.0))

    def stop(self) -> None:
        self._stop.set()
        ring(self.data_dir, self.name)
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if self._doorbell is not None:
            self._doorbell.close()
