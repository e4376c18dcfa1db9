"""Study completion: a study is complete once it has been quiet for its rule's period.

DICOM has no "study complete" message that modalities reliably send (Storage Commitment,
PS3.4 Annex J, says nothing about completeness), so the node waits for a quiet period per
modality and calling AE (config: [completion]). Modalities that send Modality Performed
Procedure Steps (dicom_node/mpps.py) can say so: a COMPLETED step whose instances have all
arrived completes the study at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from config.settings import CompletionSettings
from core.loop import LoopThread
from storage.db import Database
from storage.ingest import close_and_schedule
from storage.jobs import requeue_expired_leases

log = logging.getLogger(__name__)

MIN_WAIT_S = 0.005


class CompletionScheduler:
    """Background thread: quiet studies → study versions + jobs; expired leases → queue."""

    def __init__(
        self,
        db: Database,
        settings: CompletionSettings,
        on_jobs: Callable[[list[int]], None] | None = None,
        *,
        use_mpps: bool = False,
    ) -> None:
        self.db = db
        self.settings = settings
        self.use_mpps = use_mpps
        self.on_jobs = on_jobs  # e.g. ring the inference worker's doorbell
        self.next_due_s: float | None = None
        # A failed tick (e.g. the database is away) is retried at the next poll.
        self.loop = LoopThread(
            "completion",
            self._tick_then_wait,
            interval_s=settings.poll_interval_s,
            first_wait_s=settings.poll_interval_s,
            log=log,
        )

    @property
    def last_error(self) -> str | None:
        return self.loop.last_error

    def start(self) -> None:
        self.loop.start()

    def stop(self) -> None:
        self.loop.stop(timeout_s=10)

    def wake(self) -> None:
        """Look now (an MPPS step completed, or an instance of such a study arrived)."""
        self.loop.wake()

    def tick(self) -> list[int]:
        completion = close_and_schedule(
            self.db, self.settings.quiet_seconds, use_mpps=self.use_mpps
        )
        job_ids, self.next_due_s = completion.job_ids, completion.next_due_s
        for job_id in job_ids:
            log.info("study complete: job %d queued", job_id)
        if job_ids and self.on_jobs is not None:
            self.on_jobs(job_ids)
        requeued = requeue_expired_leases(self.db)
        if requeued:
            log.warning("%d jobs whose worker stopped returned to the queue", requeued)
        return job_ids

    def _wait_s(self) -> float:
        """Until the next poll, or sooner when an open study becomes quiet before it."""
        poll = self.settings.poll_interval_s
        if self.next_due_s is None:
            return poll
        return min(poll, max(self.next_due_s, MIN_WAIT_S))

    def _tick_then_wait(self) -> float:
        self.tick()
        return self._wait_s()
