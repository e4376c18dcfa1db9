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

from core.loop import LoopThread

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
        self.exit_note: str | None = None  # how the last child ended
        self._delay_s = 1.0
        self._started_at = 0.0
        self._relaunch = False
        self._launch_lock = threading.Lock()
        # Each step waits for the child to end; the pause after it is the restart backoff. A
        # launch that fails (e.g. the interpreter is gone) is tried again after the longest one.
        self.loop = LoopThread(
            f"watch-{name}",
            self._supervise,
            interval_s=0.0,
            error_wait_s=MAX_RESTART_DELAY_S,
            log=log,
        )

    @property
    def last_error(self) -> str | None:
        return self.loop.last_error or self.exit_note

    def start(self) -> None:
        self._launch()
        self.loop.start()

    def _launch(self) -> None:
        self.process = subprocess.Popen(self.argv, env=self.env, preexec_fn=_die_with_parent())
        self._started_at = time.monotonic()
        log.info("%s started (pid %d)", self.name, self.process.pid)

    def _supervise(self) -> float:
        """Launch again when due, wait for the child to end; return the wait before the next
        launch."""
        if self._relaunch:
            with self._launch_lock:  # stop() either sees this child or this launch sees stop()
                if self.loop.stopping:
                    return 0.0
                self._launch()
            self._relaunch = False
            self.restarts += 1
        assert self.process is not None
        code = self.process.wait()
        if self.loop.stopping:
            return 0.0
        delay = self._delay_s
        self.exit_note = f"exited with code {code}"
        log.error("%s exited with code %d; restarting in %.0f s", self.name, code, delay)
        # A child that ran a while before dying starts the backoff afresh.
        ran_s = time.monotonic() - self._started_at
        self._delay_s = 1.0 if ran_s > 300 else min(delay * 2, MAX_RESTART_DELAY_S)
        self._relaunch = True
        return delay

    def stop(self) -> None:
        self.loop.request_stop()
        with self._launch_lock:
            process = self.process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s: killing it", self.name, STOP_GRACE_S)
                process.kill()
                process.wait(10)
        self.loop.join(timeout_s=10)


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
