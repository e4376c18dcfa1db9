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

The files come first: with a hook that stages (medgemma_node.outputs.ReportOutputs) the SR,
GSPS, ORU and JSON are written, durably, under the report's id reserved ahead
(storage/report_ids.py) before the transaction, which then only adds rows. A report not stored
after all (lease lost, an error before the commit) has its files removed; a process that dies
between the two leaves a directory no row names (removed at the next start once older than the
job lease: storage/report_ids.py), and the study runs again under a new id.
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
from typing import Any, Protocol, TypeVar, runtime_checkable

from sqlalchemy.orm import Session

from inference.comparison import rebase_findings
from inference.engine import GenerationResult
from inference.parsing import parse_report
from inference.preprocess import SquareGeometry, attach_regions
from inference.worker_jobs import PreparedJob
from storage.db import Database
from storage.doorbell import DELIVERY_DOORBELL, ring
from storage.jobs import complete_job
from storage.models import Report, utcnow
from storage.priors import PriorComparison, link_prior
from storage.report_ids import reserve_report_ids, take_report_ids
from storage.report_schema import ModelIdentity, ReportContent, ScopeVerdict
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
    question_first: bool = False  # the question came before the images (the template's order)
    prior_images: int = 0  # the prior's images came first in the request (inference/comparison.py)
    prior_comparison: PriorComparison | None = None  # what was compared, or why nothing was
    scope: ScopeVerdict | None = None  # the node's verdict (inference/scope.py)
    batch_stamps: dict[str, float] = field(default_factory=dict)  # ClaimedBatch.stamps
    study_stamps: dict[str, float] = field(default_factory=dict)  # PreparedJob.stamps
    report_id: int | None = None  # reserved ahead (storage/report_ids.py); None: taken later


def store_task(
    job: PreparedJob,
    result: GenerationResult,
    identity: ModelIdentity,
    stamps: dict[str, float],
    report_id: int | None = None,
) -> StoreTask:
    """What a generated answer's report is made from."""
    return StoreTask(
        job_id=job.job_id,
        study_id=job.study_id,
        study_version_id=job.study_version_id,
        study_uid=job.study_uid,
        question=job.question,
        question_first=job.question_first,
        language=job.language,
        sop_instance_uids=job.prepared.sop_instance_uids,
        geometries=job.prepared.geometries,
        preprocess_seconds=job.preprocess_seconds,
        text=result.text,
        identity=identity,
        batch_seconds=result.seconds,
        prepare_seconds=result.prepare_seconds,
        batch_size=result.batch_size,
        prompt_tokens=result.prompt_tokens,
        new_tokens=result.new_tokens,
        prior_images=len(job.prior_images),
        prior_comparison=job.prior.comparison if job.prior is not None else None,
        scope=job.scope,
        batch_stamps=dict(stamps),
        study_stamps=dict(job.stamps),
        report_id=report_id,
    )


class StoreOutcome(StrEnum):
    STORED = "stored"
    LEASE_LOST = "lease lost"  # the job went back to the queue meanwhile: result dropped


class StagedFiles(Protocol):
    def discard(self) -> None:
        """Remove the files of a report that was not stored."""


StagedT = TypeVar("StagedT", bound=StagedFiles)


@runtime_checkable
class StagingHook(Protocol[StagedT]):
    """A ReportHook that can also build its files before the report's transaction
    (medgemma_node.outputs.ReportOutputs): ``prepare`` only reads the database, ``commit``
    adds the rows."""

    def __call__(self, session: Session, report: Report) -> None: ...

    def prepare(
        self, session: Session, report: Report, own_prior: PriorComparison | None = None
    ) -> StagedT: ...

    def commit(self, session: Session, report: Report, staged: StagedT) -> None: ...


def store_report(
    db: Database, owner: str, task: StoreTask, on_report: ReportHook | None
) -> StoreOutcome:
    """Parse the answer and commit the report, the job's end and the outputs together.

    With a StagingHook the outputs are built first, outside any write: the transaction then
    holds the write lock (SQLite's one, for the whole database) for a few inserts, not for the
    SR/GSPS build and its fsyncs, which every C-STORE commit and job claim would wait behind.
    """
    report = _draft_report(task, _report_content(task))
    measured: dict[str, float] = {}
    staged: StagedFiles | None = None
    if isinstance(on_report, StagingHook):
        started = time.perf_counter()
        staged = _stage(db, task, report, on_report)
        measured["outputs_seconds"] = round(time.perf_counter() - started, 4)
    with db.session() as session:
        try:
            outcome = _add_rows(session, owner, task, report, staged, on_report, measured)
        except BaseException:
            if staged is not None:
                staged.discard()  # the transaction rolls back: no row will name these files
            raise
    if outcome is StoreOutcome.LEASE_LOST and staged is not None:
        staged.discard()  # nothing was stored: no row names these files
    if outcome is StoreOutcome.STORED:
        log.info(
            "study %s: report stored (%s, %d findings, urgency %s)",
            task.study_uid,
            report.parse_status,
            len(report.content_json.get("findings", [])),
            report.urgency or "-",
        )
    return outcome


def _add_rows(
    session: Session,
    owner: str,
    task: StoreTask,
    report: Report,
    staged: StagedFiles | None,
    on_report: ReportHook | None,
    measured: dict[str, float],
) -> StoreOutcome:
    """The store transaction's work: the job's end, the report row and its outputs' rows."""
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
    if staged is not None and superseded != report.supersedes_report_id:
        # Another report of the study was stored meanwhile: the files name the wrong
        # predecessor. Built again below, in this transaction, under a new id.
        staged.discard()
        staged = None
        report.id = take_report_ids(session.connection(), 1).start
    report.supersedes_report_id = superseded
    session.add(report)
    session.flush()
    if task.prior_comparison is not None:
        link_prior(session, report.id, task.prior_comparison)
    if staged is not None and isinstance(on_report, StagingHook):
        on_report.commit(session, report, staged)
    elif on_report is not None:
        started = time.perf_counter()
        on_report(session, report)
        measured["outputs_seconds"] = round(time.perf_counter() - started, 4)
    report.timings_json = {
        **report.timings_json,
        **measured,
        "store_wait_seconds": round(locked - began, 4),
        "store_held_seconds": round(time.perf_counter() - locked, 4),  # before the commit
    }
    return StoreOutcome.STORED


def _report_content(task: StoreTask) -> ReportContent:
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
    return content


def _draft_report(task: StoreTask, content: ReportContent) -> Report:
    """The Report row, not yet added: its id is the one reserved for it (or none yet)."""
    return Report(
        id=task.report_id,
        job_id=task.job_id,
        study_id=task.study_id,
        study_version_id=task.study_version_id,
        language=content.language,
        parse_status=content.parse_status,
        urgency=content.urgency,
        question=task.question,
        question_first=task.question_first,
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
            "study_stamps": task.study_stamps,
        },
        is_test_model=task.identity.is_test_model,
        created_at=utcnow(),
    )


def _stage(db: Database, task: StoreTask, report: Report, hook: StagingHook[StagedT]) -> StagedT:
    """Build the report's files before its transaction, its predecessor as the database has
    it now (checked again in the transaction)."""
    with db.session() as session:  # reads only: on SQLite no write lock is taken
        report.supersedes_report_id = latest_report_id(session, task.study_id)
        if report.id is None or report.id <= (report.supersedes_report_id or 0):
            # No id reserved for it, or one older than the study's newest report: a report
            # never names a predecessor with a higher id than its own.
            report.id = reserve_report_ids(db, 1).start
        return hook.prepare(session, report, task.prior_comparison)


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
