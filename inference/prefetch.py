"""One background thread that builds the next batch while the caller runs the current one.

The inference worker claims, preprocesses and prepares batch N+1 here while batch N generates;
benchmarks/engine_gpu.py --sustained times engine.prepare through the same class. ``TopUp``
tells the building thread how long batch N still runs, so N+1 may keep taking studies that
come due meanwhile (inference/worker.py).
"""

from __future__ import annotations

import threading
import time
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
    """Whether the batch being built may still take studies: while the batch before it runs,
    and, once the worker has timed batches, no later than that batch's expected end less the
    time the new one needs after its last study (rendering it, the questions, engine.prepare).

    Why the limit: a study taken in at the last moment is rendered and prepared after the
    running batch ends, with the GPU waiting (a burst's last, partial batch of 256 waited
    4.9 s that way on an H200). The expected generation time is that of the largest batch
    timed so far that is no larger than the running one, a lower bound (a batch takes longer
    the more rows it has); with none timed yet, the batch grows until the running one ends.
    """

    RENDER_MARGIN_S = 0.25  # the last studies' rendering, in processes already warm

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self._ended = threading.Event()
        self._ended.set()  # nothing runs yet
        self._deadline: float | None = None
        self._generate_s: dict[int, float] = {}  # batch size -> its last generation, seconds
        self._tail_per_study_s = 0.0  # engine.prepare and the questions, per study
        self._tail_piece: int | None = None  # built in pieces of this many: the tail's cap
        self._max_batch = 1  # of the batch being built

    def record_generate(self, size: int, seconds: float) -> None:
        self._generate_s[size] = seconds

    def record_tail(self, studies: int, seconds: float, piece: int | None = None) -> None:
        """What building a batch of ``studies`` took after its last study was rendered.

        ``piece``: the batch was prepared in pieces of that many studies as they rendered
        (inference/batch_pieces.py), so what is left after the last render is one piece at
        most, whatever the batch's size; otherwise every study is prepared after it."""
        if studies > 0:
            self._tail_per_study_s = seconds / min(studies, piece or studies)
            self._tail_piece = piece

    def begin(self, size: int, max_batch: int) -> None:
        """A batch of ``size`` starts; the one built meanwhile may grow to ``max_batch``."""
        timed = [seconds for rows, seconds in self._generate_s.items() if rows <= size]
        self._deadline = None
        self._max_batch = max_batch
        if timed:
            self._deadline = time.monotonic() + max(timed) - self._tail(max_batch)
        self._ended.clear()

    def ends_in(self, seconds: float) -> None:
        """The running batch said when it ends (it takes no more rows: inference/
        decode_joins.py): the batch built meanwhile stops growing in time for it, as with a
        timed batch."""
        deadline = time.monotonic() + seconds - self._tail(self._max_batch)
        if self._deadline is None or deadline < self._deadline:
            self._deadline = deadline

    def _tail(self, max_batch: int) -> float:
        """The time a batch of up to ``max_batch`` needs after its last study is claimed."""
        after_last = min(max_batch, self._tail_piece or max_batch)
        return self._tail_per_study_s * after_last + self.RENDER_MARGIN_S

    def end(self) -> None:
        """The batch has generated (or failed): stop topping up the next one at once."""
        self._ended.set()

    def still_running(self) -> bool:
        """Wait one interval (less when the batch ends first); True while the batch being
        built may still grow."""
        if self._deadline is not None and time.monotonic() >= self._deadline:
            return False
        return not self._ended.wait(self.interval_s)
