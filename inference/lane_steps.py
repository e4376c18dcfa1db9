"""The priority lane inside a running batch: the inference worker's step hook (issue 13).

An engine that decodes step by step (inference.engine.SteppingEngine: the transformers engine
on the CUDA fast path) calls the hook every few decode steps, about every 0.1 s. Nothing waits
most of the time, so the hook first reads the worker's doorbell without blocking; only when it
was rung (the API queued a question, or a job was queued) or the poll for API processes on
other hosts is due (every ``poll_interval_s``) does it ask the database. When something waits
it runs one lane round (``InteractiveLane.serve``, up to [interactive] max_batch requests): the
engine runs that generate on its priority generator, and the batch goes on with its answers
unchanged. At most ``max_rounds`` rounds run inside one batch, so a steady stream of questions
cannot starve the studies; an error in the hook is logged and the batch goes on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from inference.engine import Engine, SteppingEngine
from inference.interactive import InteractiveLane
from storage.doorbell import Doorbell
from storage.interactive import has_queued

log = logging.getLogger(__name__)


class LaneBetweenSteps:
    """Serves ``lane`` from inside the batches the worker runs (``during``)."""

    def __init__(
        self,
        lane: InteractiveLane,
        max_rounds: int,
        poll_interval_s: float,
        stop_event: threading.Event,
    ) -> None:
        self.lane = lane
        self.max_rounds = max_rounds
        self.poll_interval_s = poll_interval_s
        self.stop_event = stop_event
        self.answered = 0  # requests finished inside the last batch
        self._rounds_left = 0
        self._doorbell: Doorbell | None = None
        self._next_poll = 0.0  # monotonic time of the next look-up without a ring

    @contextmanager
    def during(self, engine: Engine, doorbell: Doorbell | None) -> Iterator[None]:
        """While the batch in this block generates, the engine calls back between decode
        steps (an engine that cannot: nothing changes, the lane waits for the batch)."""
        self.answered = 0
        if not isinstance(engine, SteppingEngine):
            yield
            return
        self._rounds_left, self._doorbell = self.max_rounds, doorbell
        engine.set_step_hook(lambda: self._serve(engine))
        try:
            yield
        finally:
            engine.set_step_hook(None)
            self._doorbell = None

    def _serve(self, engine: Engine) -> None:
        """The step hook. The engine never calls it from a generate it made itself, so the
        lane never runs inside one of its own rounds."""
        if self._rounds_left <= 0 or self.stop_event.is_set() or not self._may_wait():
            return
        try:
            if finished := self.lane.serve(engine, max_rounds=1):
                self._rounds_left -= 1
                self.answered += finished
        except Exception:
            log.exception("answering questions during a study batch failed; the batch goes on")

    def _may_wait(self) -> bool:
        """Rung, or the poll for other hosts is due: then the database says. A ring drained
        here is not lost: after the batch the worker serves the lane and looks for jobs before
        it waits on the doorbell again."""
        rung = self._doorbell is not None and self._doorbell.wait(0.0)
        now = time.monotonic()
        if not rung and now < self._next_poll:
            return False
        self._next_poll = now + self.poll_interval_s
        try:
            return has_queued(self.lane.db)
        except Exception:
            log.exception("looking for questions during a study batch failed")
            return False
