"""Storing a generated answer: parse → Report row + job done + outputs/outbox rows, one commit.

``store_report`` is what the inference worker does with each answer. It needs no engine and no
images (``StoreTask`` carries what the report is made from), so it runs either on the worker
thread or in ``StorePool``'s processes, off the generating loop: building the SR, GSPS, ORU and
JSON of a batch of 64 takes seconds of Python, and the GPU would otherwise wait for it.

The guarantees do not move with it (design.md, non-negotiables): the job is marked done in the
same transaction as its report and every outbox row (``storage.jobs.complete_job``), and only
while this worker still holds the job's lease. Until that commit the job stays leased to the
worker; a crash before it loses nothing (the lease expires and the study runs again), and a
commit after the lease was lost does not happen, so each study version gets one report.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import wait as wait_futures
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from inference.comparison import rebase_findings
from inference.parsing import parse_report
from inference.preprocess import SquareGeometry, attach_regions
from storage.db import Database
from storage.doorbell import DELIVERY_DOORBELL, ring
from storage.jobs import complete_job
from storage.models import Report, utcnow
from storage.priors import PriorComparison, link_prior
from storage.report_schema import ModelIdentity, ScopeVerdict
from storage.reports import latest_report_id

log = logging.getLogger(__name__)

ReportHook = Callable[[Session, Report], None]


@dataclass(frozen=True)
class StoreTask:
    """One answer and what its report is made from (picklable: no images, no engine)."""

    job_id: int
    study_id: int
    study_version_id: int
    study_uid: str
    question: str
    language: str
    sop_instance_uids: list[str]
    geometries: list[SquareGeometry]
    preprocess_seconds: float
    text: str
    identity: ModelIdentity
    batch_seconds: float
    prepare_seconds: float
    batch_size: int
    prompt_tokens: int
    new_tokens: int
    prior_images: int = 0  # the prior's images came first in the request (inference/comparison.py)
    prior_comparison: PriorComparison | None = None  # what was compared, or why nothing was
    scope: ScopeVerdict | None = None  # the node's verdict (inference/scope.py)
    batch_stamps: dict[str, float] = field(default_factory=dict)  # ClaimedBatch.stamps


class StoreOutcome(StrEnum):
    STORED = "stored"
    LEASE_LOST = "lease lost"  # the job went back to the queue meanwhile: result dropped


def store_report(
    db: Database, owner: str, task: StoreTask, on_report: ReportHook | None
) -> StoreOutcome:
    """Parse the answer and commit the report, the job's end and the outputs together."""
    image_count = task.prior_images + len(task.geometries)
    parsed = parse_report(task.text, task.language, image_count=image_count)
    for note in parsed.notes:
        log.info("study %s: %s", task.study_uid, note)
    rebased, removed = rebase_findings(parsed.content, task.prior_images)
    if removed:
        log.info("study %s: %d boxes on the prior image removed", task.study_uid, removed)
    content = attach_regions(rebased, task.geometries)
    if task.scope is not None:  # carried in the content, as ReportContent.scope documents
        content = content.model_copy(update={"scope": task.scope})
    with db.session() as session:
        began = time.perf_counter()
        # Done together with its report and outbox rows: one commit, or none of them.
        if not complete_job(session, task.job_id, owner):
            log.warning("job %d lost its lease while running; result dropped", task.job_id)
            return StoreOutcome.LEASE_LOST
        # On SQLite the job's update waits for the database's one write lock, which this
        # transaction then holds until its commit: both in the timings.
        locked = time.perf_counter()
        # A new version of a reported study replaces that report: its ORU says C
        # (correction) and its SR names the earlier SR as Predecessor Document.
        superseded = latest_report_id(session, task.study_id)
        report = Report(
            job_id=task.job_id,
            study_id=task.study_id,
            study_version_id=task.study_version_id,
            language=content.language,
            parse_status=content.parse_status,
            urgency=content.urgency,
            question=task.question,
            raw_text=task.text,
            content_json=content.model_dump(mode="json"),
            model_json=task.identity.model_dump(mode="json"),
            timings_json={
                "batch_seconds": round(task.batch_seconds, 4),
                "prepare_seconds": round(task.prepare_seconds, 4),
                "batch_size": task.batch_size,
                "prompt_tokens": task.prompt_tokens,
                "new_tokens": task.new_tokens,
                "preprocess_seconds": round(task.preprocess_seconds, 4),
                "source_sop_instance_uids": task.sop_instance_uids,
                "batch_stamps": task.batch_stamps,
            },
            is_test_model=task.identity.is_test_model,
            created_at=utcnow(),
            supersedes_report_id=superseded,
        )
        session.add(report)
        session.flush()
        if task.prior_comparison is not None:
            link_prior(session, report.id, task.prior_comparison)
        measured: dict[str, float] = {}
        if on_report is not None:
            started = time.perf_counter()
            on_report(session, report)
            measured["outputs_seconds"] = round(time.perf_counter() - started, 4)
        report.timings_json = {
            **report.timings_json,
            **measured,
            "store_wait_seconds": round(locked - began, 4),
            "store_held_seconds": round(time.perf_counter() - locked, 4),  # before the commit
        }
    log.info(
        "study %s: report stored (%s, %d findings, urgency %s)",
        task.study_uid,
        content.parse_status,
        len(content.findings),
        content.urgency or "-",
    )
    return StoreOutcome.STORED


# -- the pool ------------------------------------------------------------------------------

_process: dict[str, Any] = {}  # in each pool process: its database, hook and data directory


def _start_process(
    database_url: str,
    data_dir: Path,
    on_report: ReportHook | None,
    setup: Callable[[], None] | None,
) -> None:
    if setup is not None:
        setup()
    _process.update(db=Database(database_url), data_dir=data_dir, on_report=on_report)


def _store_in_process(owner: str, task: StoreTask) -> StoreOutcome:
    outcome = store_report(_process["db"], owner, task, _process["on_report"])
    if outcome is StoreOutcome.STORED:
        ring(_process["data_dir"], DELIVERY_DOORBELL)  # its outbox rows are committed
    return outcome


def _ready() -> None:
    """A no-op run once per process at start, so the first batch does not pay the start-up."""


StoreDone = Callable[[StoreTask, "Future[StoreOutcome]"], None]


class StorePool:
    """``processes`` processes that run ``store_report``; ``on_report`` (and ``setup``, run
    first in each process: logging) must be picklable. Processes are spawned, not forked: the
    worker holds a CUDA context and threads.

    ``done(task, future)`` is called in a thread of the pool's parent once each task ends.
    ``wait_below(n)`` holds the caller while n or more tasks are waiting, so answers never
    pile up beyond what the processes keep up with (the jobs stay leased meanwhile).
    """

    def __init__(
        self,
        processes: int,
        database_url: str,
        data_dir: Path,
        on_report: ReportHook | None,
        setup: Callable[[], None] | None = None,
    ) -> None:
        self.processes = processes
        self._initargs = (database_url, data_dir, on_report, setup)
        self._executor = self._new_executor()
        self._pending: set[Future[StoreOutcome]] = set()
        self._warm_ups: list[Future[None]] = []

    def _new_executor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=self.processes,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_process,
            initargs=self._initargs,
        )

    def warm_up(self) -> None:
        """Start every process now (imports) rather than at first use; returns at once."""
        self._warm_ups = [self._executor.submit(_ready) for _ in range(self.processes)]

    @property
    def ready(self) -> bool:
        """Every process has started (until then the worker stores in its own thread)."""
        return all(future.done() for future in self._warm_ups)

    def submit(self, owner: str, task: StoreTask, done: StoreDone) -> None:
        try:
            future = self._executor.submit(_store_in_process, owner, task)
        except BrokenProcessPool:
            # A process died (its tasks fail and their jobs are retried): start new ones.
            log.error("a report store process ended unexpectedly; starting new ones")
            self._executor.shutdown(wait=False)
            self._executor = self._new_executor()
            future = self._executor.submit(_store_in_process, owner, task)
        self._pending.add(future)

        def finished(ended: Future[StoreOutcome]) -> None:
            self._pending.discard(ended)
            done(task, ended)

        future.add_done_callback(finished)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def wait_below(self, limit: int) -> None:
        while len(self._pending) >= max(limit, 1):
            wait_futures(list(self._pending), return_when="FIRST_COMPLETED")

    def close(self) -> None:
        """Wait for every task to end (their jobs commit or fail), then end the processes."""
        self._executor.shutdown(wait=True)
