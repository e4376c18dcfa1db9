"""Study completion: a study is complete once it has been quiet for its rule's period.

DICOM has no "study complete" message that modalities reliably send (Storage Commitment,
PS3.4 Annex J, says nothing about completeness), so the node waits for a quiet period per
modality and calling AE (config: [completion]).
"""

from __future__ import annotations

import logging
import threading

from config.settings import CompletionSettings
from storage.db import Database
from storage.ingest import close_quiet_studies
from storage.jobs import requeue_expired_leases

log = logging.getLogger("medgemma_node.completion")


class CompletionScheduler:
    """Background thread: quiet studies → study versions + jobs; expired leases → queue."""

    def __init__(self, db: Database, settings: CompletionSettings) -> None:
        self.db = db
        self.settings = settings
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="completion", daemon=True)
        self.last_error: str | None = None

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=10)

    def tick(self) -> list[int]:
        job_ids = close_quiet_studies(self.db, self.settings.quiet_seconds)
        for job_id in job_ids:
            log.info("study complete: job %d queued", job_id)
        requeued = requeue_expired_leases(self.db)
        if requeued:
            log.warning("%d jobs whose worker stopped returned to the queue", requeued)
        return job_ids

    def _run(self) -> None:
        while not self.stop_event.wait(self.settings.poll_interval_s):
            try:
                self.tick()
                self.last_error = None
            except Exception as exc:  # keep scheduling; the database may come back
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("completion scheduler tick failed")
