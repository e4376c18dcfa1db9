"""Run a part of the node as a child process and restart it when it dies.

The inference worker runs in its own process: a crash in the model stack (CUDA, a native
decoder) cannot take down the SCP, and its leased jobs return to the queue when the next worker
starts (storage.recovery / requeue_expired_leases).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # linux/prctl.h

MAX_RESTART_DELAY_S = 60.0
STOP_GRACE_S = 60.0


class ChildProcess:
    """A supervised child: start() launches it, a watcher restarts it with backoff."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.last_error: str | None = None
        self.stop_event = threading.Event()
        self.watcher = threading.Thread(target=self._watch, name=f"watch-{name}", daemon=True)

    def start(self) -> None:
        self._launch()
        self.watcher.start()

    def _launch(self) -> None:
        self.process = subprocess.Popen(self.argv, env=self.env, preexec_fn=_die_with_parent())
        log.info("%s started (pid %d)", self.name, self.process.pid)

    def _watch(self) -> None:
        delay = 1.0
        while not self.stop_event.is_set():
            assert self.process is not None
            started = time.monotonic()
            code = self.process.wait()
            if self.stop_event.is_set():
                return
            self.last_error = f"exited with code {code}"
            log.error("%s exited with code %d; restarting in %.0f s", self.name, code, delay)
            if self.stop_event.wait(delay):
                return
            # A child that ran a while before dying starts the backoff afresh.
            delay = 1.0 if time.monotonic() - started > 300 else min(delay * 2, MAX_RESTART_DELAY_S)
            self.restarts += 1
            self._launch()

    def stop(self) -> None:
        self.stop_event.set()
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0f s: killing it", self.name, STOP_GRACE_S)
            process.kill()
            process.wait(10)


def _die_with_parent() -> Callable[[], None] | None:
    """A pre-exec hook that makes the child get SIGTERM when this process dies (Linux).

    Without it a `serve` killed with SIGKILL leaves its worker running: the restarted `serve`
    then starts a second one and requeues the jobs the orphan still holds.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).prctl  # resolved pre-fork
    parent = os.getpid()

    def hook() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the hook ran
            os._exit(1)

    return hook
