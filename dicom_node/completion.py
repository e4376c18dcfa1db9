"""Study completion: a study is complete once it has been quiet for its rule's period.

DICOM has no "study complete" message that modalities reliably send (Storage Commitment,
PS3.4 Annex J, says nothing about completeness), so the node waits for a quiet period per
modality and calling AE (config: [completion]).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from config.settings import CompletionSettings
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
    ) -> None:
        self.db = db
        self.settings = settings
        self.on_jobs = on_jobs  # e.g. ring the inference worker's doorbell
        self.next_due_s: float | None = None
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="completion", daemon=True)
        self.last_error: str | None = None

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=10)

    def tick(self) -> list[int]:
        completion = close_and_schedule(self.db, self.settings.quiet_seconds)
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

    def _run(self) -> None:
        while not self.stop_event.wait(self._wait_s()):
            try:
                self.tick()
                self.last_error = None
            except Exception as exc:  # keep scheduling; the database may come back
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("completion scheduler tick failed")
