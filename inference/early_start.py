"""Studies run during their quiet period ([model] early_start).

A study is complete once nothing has arrived for its quiet period (dicom_node/completion.py:
0.5-5 s for radiographs), and until then the GPU of a worker with nothing due waits. At the
start of a burst that wait is the whole quiet period before the first batch; a single
radiograph's report comes its quiet period plus its run after its last instance. Here such a
worker renders, questions and runs the studies still arriving as any others (their rows are
marked by a negative job id, the study's id negated), and keeps each answer aside until the
study's job exists. Then ``storage.early_jobs.claim_early_jobs`` leases the job, if its
version covers exactly the instances the answer was made from, and the answer is stored as
the job's report, in the same transaction as ever. A study that received another instance
meanwhile (its version does not match), whose job another worker took, or that is not
complete some time after its quiet period should have ended, has its answer dropped: its job
runs as any other. So reports come from complete studies only, and the work done early is
lost at worst, never a study.

While a study runs early, the worker's claims leave its job queued (``exclude``): the next
batch must not run it a second time. Only what the GPU would not otherwise do runs early: the
worker takes open studies only when no job is due. Only first versions of studies of
projection images are taken, whose quiet period is at most [model] early_start_max_quiet_s
(storage/early_jobs.py).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from config.settings import NodeSettings
from core.loop import LoopThread
from inference.worker_jobs import JobSource, PreparedJob
from storage.db import Database
from storage.early_jobs import EarlyClaim, OpenStudy, claim_early_jobs, open_studies
from storage.models import utcnow

log = logging.getLogger(__name__)

BIND_POLL_S = 0.02  # between two asks for the jobs of answers kept aside
# Studies dropped are not taken early again (one that cannot be rendered, or whose
# instances keep coming, would otherwise be run again at every look): the latest so many.
REMEMBERED_DROPS = 4096
IDLE_S = 1.0  # the binding thread's wait with nothing kept aside (it is woken for answers)

# Stores an answer kept aside as its job's report, given the report id claimed with the job.
StoreAnswer = Callable[[int], None]


def is_early(job_id: int) -> bool:
    """A row run early: its job id is its study's id negated (no job exists yet)."""
    return job_id < 0


@dataclass
class _EarlyStudy:
    instance_ids: frozenset[int]
    give_up_at: datetime  # no job by then: the answer is dropped (the job runs later)
    job: PreparedJob | None = None  # set once its answer is kept aside
    store: StoreAnswer | None = None


class EarlyStart:
    """The worker's studies running early: taken, answered, bound to their jobs (module
    docstring). Thread-safe: the worker's loop and its build thread take and drop; a thread
    of its own binds answers to jobs."""

    def __init__(self, db: Database, settings: NodeSettings, owner: str) -> None:
        self.db = db
        self.settings = settings
        self.enabled = settings.model.early_start
        self.owner = owner
        self.data_dir: Path = settings.storage.data_dir
        # The completion scheduler looks at least this often: after the quiet period, a job
        # may take that long (twice, and a second) to appear.
        self._grace = timedelta(seconds=2 * settings.completion.poll_interval_s + 1.0)
        self._studies: dict[int, _EarlyStudy] = {}
        self._dropped: OrderedDict[int, None] = OrderedDict()
        # For status: studies taken early, their jobs claimed for their answers, dropped.
        self.counts = {"taken": 0, "claimed": 0, "dropped": 0}
        self._lock = threading.Lock()
        self._binding = False  # the binding thread has been started
        self._binder = LoopThread("early-start", self._bind_round, interval_s=IDLE_S, log=log)

    def take(self, limit: int) -> list[JobSource]:
        """Up to ``limit`` open studies not yet taken, as job sources with early job ids."""
        if not self.enabled or limit < 1:
            return []
        model, completion = self.settings.model, self.settings.completion
        with self._lock:
            skip = frozenset(self._studies) | frozenset(self._dropped)
        found = open_studies(
            self.db, limit, completion.quiet_seconds, model.early_start_max_quiet_s, skip
        )
        sources = []
        with self._lock:
            for study in found:
                if study.study_id in self._studies:
                    continue
                give_up = study.quiet_ends_at + self._grace
                self._studies[study.study_id] = _EarlyStudy(study.instance_ids, give_up)
                self.counts["taken"] += 1
                sources.append(self._source(study))
        if sources:
            log.info("%d studies taken in their quiet period to run early", len(sources))
        return sources

    def _source(self, study: OpenStudy) -> JobSource:
        return JobSource(
            job_id=-study.study_id,
            study_id=study.study_id,
            study_version_id=0,
            study_uid=study.study_uid,
            calling_ae=study.calling_ae,
            paths=[self.data_dir / path for path in study.paths],
        )

    def exclude(self) -> frozenset[int]:
        """The studies running early: the worker's claims leave their jobs queued."""
        with self._lock:
            return frozenset(self._studies)

    def drop(self, job_id: int, why: object) -> None:
        """A study run early that will not be stored (it failed before its answer, or its
        batch never ran): its job, when it comes, runs as any other."""
        with self._lock:
            dropped = self._studies.pop(-job_id, None)
            if dropped is not None:
                self._forget(-job_id)
        if dropped is not None:
            log.info("study %d run early: dropped (%s); it runs once complete", -job_id, why)

    def _forget(self, study_id: int) -> None:
        """Count a drop and keep the study from being taken early again (lock held)."""
        self.counts["dropped"] += 1
        self._dropped[study_id] = None
        while len(self._dropped) > REMEMBERED_DROPS:
            self._dropped.popitem(last=False)

    def answered(self, job: PreparedJob, store: StoreAnswer) -> None:
        """Keep ``job``'s answer aside until its study's job can be claimed."""
        with self._lock:
            study = self._studies.get(job.study_id)
            if study is None:
                return
            study.job, study.store = job, store
            start = not self._binding and not self._binder.stopping
            self._binding = self._binding or start
        if start:
            self._binder.start()
        self._binder.wake()

    def stop(self) -> None:
        """Drop what is kept aside (the jobs run as any other) and end the binding thread."""
        self._binder.stop()  # also keeps a thread never started from starting
        with self._lock:
            kept, self._studies = len(self._studies), {}
        if kept:
            log.info("%d studies run early dropped at stop; they run once complete", kept)

    def _bind_round(self) -> float:
        """Claim the jobs of the answers kept aside and store them; drop those whose jobs
        cannot be theirs. Returns the wait before the next round."""
        with self._lock:
            waiting = {sid: s for sid, s in self._studies.items() if s.store is not None}
        if not waiting:
            return IDLE_S
        expected = {study_id: study.instance_ids for study_id, study in waiting.items()}
        lease = self.settings.model.lease_seconds
        claims = claim_early_jobs(self.db, self.owner, expected, lease)
        now = utcnow()
        for study_id, study in waiting.items():
            if study_id in claims:
                self._bound(study_id, study, claims[study_id])
            elif now > study.give_up_at:
                self.drop(-study_id, "not complete in time")
        return BIND_POLL_S

    def _bound(self, study_id: int, study: _EarlyStudy, claim: EarlyClaim | None) -> None:
        with self._lock:
            self._studies.pop(study_id, None)
            if claim is None:
                self._forget(study_id)
            else:
                self.counts["claimed"] += 1
        if claim is None:
            log.info("study %d run early: its version is not what ran; it runs again", study_id)
            return
        assert study.job is not None and study.store is not None
        study.job.job_id, study.job.study_version_id = claim.job_id, claim.study_version_id
        study.store(claim.report_id)
