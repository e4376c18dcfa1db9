"""The one background loop of the node's parts: a daemon thread that calls ``step()`` until
stopped, and survives its failures.

    loop = LoopThread("completion", scheduler.tick, interval_s=0.5, log=log)
    loop.start()   ...   loop.wake()   ...   loop.stop()
    status shows loop.last_error

``step()`` returns the seconds to wait before its next call (``None``: ``interval_s``; ``0``: at
once). An exception in ``step`` never ends the loop: it becomes ``last_error`` (``"Type:
message"``, what ``status`` shows), is logged once with its traceback (the same error again only
at DEBUG, so an outage of minutes does not fill the log), and the step runs again after
``error_wait_s``. The next step that succeeds clears ``last_error`` and logs the recovery.

Waiting is on an event that ``wake()`` and ``stop()`` set. A part woken by something else (a
doorbell rung by another process, storage/doorbell.py) passes ``wait`` (block up to n seconds)
and ``interrupt`` (make that wait return at once; ``wake()`` and ``stop()`` call it).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

MAX_ERROR_CHARS = 500

Step = Callable[[], float | None]


class LoopThread:
    """``step()`` in a daemon thread: start(), wake(), stop(); ``last_error`` while failing.

    ``first_wait_s``: wait this long before the first step (a scheduler that polls).
    ``on_exit``: runs in the thread as it ends, e.g. to give back work claimed ahead.
    ``traceback_in_log``: False logs only the exception type at ERROR and the rest at DEBUG,
    for steps whose errors may quote a peer's words.
    """

    def __init__(
        self,
        name: str,
        step: Step,
        *,
        interval_s: float,
        error_wait_s: float | None = None,
        first_wait_s: float = 0.0,
        wait: Callable[[float], object] | None = None,
        interrupt: Callable[[], None] | None = None,
        on_exit: Callable[[], None] | None = None,
        log: logging.Logger | None = None,
        traceback_in_log: bool = True,
    ) -> None:
        self.name = name
        self.step = step
        self.interval_s = interval_s
        self.error_wait_s = interval_s if error_wait_s is None else error_wait_s
        self.first_wait_s = first_wait_s
        self.on_exit = on_exit
        self.log = log or logging.getLogger(__name__)
        self.traceback_in_log = traceback_in_log
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.last_error: str | None = None
        self.failures = 0  # failed steps in a row
        self._woken = threading.Event()
        self._wait = wait
        self._interrupt = interrupt

    @property
    def stopping(self) -> bool:
        return self.stop_event.is_set()

    def is_alive(self) -> bool:
        return self.thread.is_alive()

    def start(self) -> None:
        self.thread.start()

    def wake(self) -> None:
        """Run the next step now instead of at the end of the current wait."""
        self._woken.set()
        if self._interrupt is not None:
            self._interrupt()

    def request_stop(self) -> None:
        """Ask the loop to end after the current step, without waiting for it."""
        self.stop_event.set()
        self.wake()

    def join(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the thread to end; True when it is not running."""
        if self.thread.is_alive():
            self.thread.join(timeout_s)
            if self.thread.is_alive():
                self.log.warning("%s did not stop within %.0f s", self.name, timeout_s)
        return not self.thread.is_alive()

    def stop(self, timeout_s: float = 10.0) -> bool:
        """End the loop and wait for its thread; True when it has ended (or never started)."""
        self.request_stop()
        return self.join(timeout_s)

    def run_step(self) -> float:
        """One step with the loop's error handling; return the seconds to wait after it."""
        try:
            delay = self.step()
        except Exception as exc:  # the loop survives; status shows last_error
            self._record_failure(exc)
            return self.error_wait_s
        if self.failures:
            self.log.info("%s: recovered after %d failed attempt(s)", self.name, self.failures)
        self.failures = 0
        self.last_error = None
        return self.interval_s if delay is None else max(delay, 0.0)

    def _run(self) -> None:
        try:
            delay = self.first_wait_s
            while not self.stop_event.is_set():
                if delay > 0:
                    self._pause(delay)
                    if self.stop_event.is_set():
                        break
                delay = self.run_step()
        finally:
            self._exit()

    def _pause(self, seconds: float) -> None:
        if self._wait is not None:
            self._wait(seconds)
        else:
            self._woken.wait(seconds)
        self._woken.clear()  # a wake() during the step just run made this wait return at once

    def _exit(self) -> None:
        if self.on_exit is None:
            return
        try:
            self.on_exit()
        except Exception:
            self.log.exception("%s: cleanup on exit failed", self.name)

    def _record_failure(self, exc: Exception) -> None:
        error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
        repeated = error == self.last_error
        self.failures += 1
        self.last_error = error
        if repeated:
            self.log.debug("%s failed again (%d in a row): %s", self.name, self.failures, error)
        elif self.traceback_in_log:
            self.log.error(
                "%s failed; trying again in %.1f s", self.name, self.error_wait_s, exc_info=exc
            )
        else:
            self.log.error("%s failed: %s", self.name, type(exc).__name__)
            self.log.debug("%s failure detail", self.name, exc_info=exc)
