"""One background thread that builds the next batch while the caller runs the current one.

The inference worker claims, preprocesses and prepares batch N+1 here while batch N generates;
benchmarks/engine_gpu.py --sustained times engine.prepare through the same class. ``TopUp``
tells the building thread how long batch N still runs, so N+1 may keep taking studies that
come due meanwhile (inference/worker.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

T = TypeVar("T")


class Prefetcher(Generic[T]):
    """At most one result built ahead: ``take`` waits for it, ``close`` returns one not taken."""

    def __init__(self, thread_name: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)
        self._pending: Future[T] | None = None

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def start(self, build: Callable[[], T]) -> None:
        """Run ``build`` in the background thread."""
        if self._pending is not None:
            raise RuntimeError("a prefetched result is still waiting to be taken")
        self._pending = self._executor.submit(build)

    def take(self) -> T | None:
        """The result started last (waiting for it), or None when none was started.

        Re-raises what ``build`` raised.
        """
        future, self._pending = self._pending, None
        return None if future is None else future.result()

    def close(self) -> T | None:
        """End the thread; return a result built but never taken, so the caller can undo it."""
        try:
            return self.take()
        finally:
            self._executor.shutdown(wait=True)


class TopUp:
    """Whether the batch before the one being built still runs (set by the thread that runs
    it), and the wait between two looks for more studies while it does."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self._ended = threading.Event()
        self._ended.set()  # nothing runs yet

    def begin(self) -> None:
        self._ended.clear()

    def end(self) -> None:
        """The batch has generated (or failed): stop topping up the next one at once."""
        self._ended.set()

    def still_running(self) -> bool:
        """Wait one interval (less when the batch ends first); True while it still runs."""
        return not self._ended.wait(self.interval_s)
