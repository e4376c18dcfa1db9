"""What the inference worker (inference/worker.py) holds about the jobs it runs: where a
claimed job's images are, the study prepared with its question (and prior), a claimed batch,
and the counters status shows."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import selectinload

from core.errors import InferenceError
from inference.comparison import PriorInput
from inference.engine import Engine, GenerationRequest, GenerationResult, OutOfMemory, PreparedBatch
from inference.preprocess import PreparedStudy
from storage.db import Database
from storage.jobs import extend_lease
from storage.models import Job, Study, StudyVersion
from storage.report_schema import ScopeVerdict

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


class PermanentJobError(InferenceError):
    """Retrying cannot help (the study has no usable image); the job fails at once."""


@dataclass(frozen=True)
class JobSource:
    """What the database says about a claimed job: where its images are, who sent them."""

    job_id: int
    study_id: int
    study_version_id: int
    study_uid: str
    calling_ae: str
    paths: list[Path]


def job_sources(db: Database, data_dir: Path, job_ids: list[int]) -> dict[int, JobSource]:
    """The sources of a batch's jobs in one query (a session and three lookups a job took
    ~20 ms each on SQLite beside a busy SCP); jobs not found are left out."""
    with db.session() as session:
        rows = session.execute(
            select(Job.id, StudyVersion, Study)
            .join(StudyVersion, StudyVersion.id == Job.study_version_id)
            .join(Study, Study.id == StudyVersion.study_id)
            .where(Job.id.in_(job_ids))
            .options(selectinload(StudyVersion.instances))
        ).all()
        return {
            job_id: JobSource(
                job_id=job_id,
                study_id=study.id,
                study_version_id=version.id,
                study_uid=study.study_instance_uid,
                calling_ae=study.calling_ae,
                paths=[data_dir / instance.path for instance in version.instances],
            )
            for job_id, version, study in rows
        }


def batch_sources(db: Database, data_dir: Path, job_ids: list[int]) -> dict[int, JobSource] | None:
    """A batch's sources at once; None on an error (each job is then looked up, and fails,
    alone)."""
    try:
        return job_sources(db, data_dir, job_ids)
    except Exception:
        log.warning("reading the batch's jobs failed; reading them one by one", exc_info=True)
        return None


def job_source(db: Database, data_dir: Path, job_id: int) -> JobSource:
    source = job_sources(db, data_dir, [job_id]).get(job_id)
    if source is None:
        raise LookupError(f"job {job_id} not found")
    return source


@dataclass
class PreparedJob:
    job_id: int
    study_id: int
    study_version_id: int
    study_uid: str
    prepared: PreparedStudy
    question: str
    language: str  # the template's: a site template with English only answers in English
    preprocess_seconds: float = 0.0
    prior: PriorInput | None = None  # set when [priors] is enabled
    scope: ScopeVerdict | None = None  # decided from the header (inference/scope.py)
    question_first: bool = False  # the template's order: the question before the images
    # Wall-clock times of this study's own way to the GPU, with render processes (inference/
    # batch_pieces.py): submitted (sent to render), rendered, asked, ready (its piece
    # prepared), joined (taken into a running batch); kept in its report's timings.
    stamps: dict[str, float] = field(default_factory=dict)

    @property
    def prior_images(self) -> list[Any]:
        return self.prior.images if self.prior is not None and self.prior.compared else []


@dataclass
class ClaimedBatch:
    """Claimed job ids, the jobs whose studies loaded, and the engine's inputs when built ahead."""

    job_ids: list[int]
    jobs: list[PreparedJob]
    inputs: PreparedBatch | None = None
    # Wall-clock times (time.time()) of the batch's stages, kept in each report's timings so
    # that a run's gaps between batches can be told apart: claimed; with render processes
    # sources (jobs read from the database), topped_up (no more studies taken in while the
    # batch before ran), rendered, asked (questions built); built (the
    # engine's inputs too, when built ahead); next_asked (the batch before stored, the worker
    # asks for this one), taken (its build over); run_started (taken to run), stores_below (fewer
    # than two batches of answers storing), generate_started (old leases renewed),
    # generate_ended.
    stamps: dict[str, float] = field(default_factory=dict)


@dataclass
class WorkerStats:
    batches: int = 0
    jobs_done: int = 0
    jobs_failed: int = 0
    last_batch_seconds: float = 0.0
    last_batch_size: int = 0
    inference_seconds_total: float = 0.0
    recent: list[dict[str, Any]] = field(default_factory=list)

    def record_batch(self, size: int, seconds: float) -> None:
        self.batches += 1
        self.last_batch_size = size
        self.last_batch_seconds = seconds
        self.inference_seconds_total += seconds


def map_side_by_side(
    func: Callable[[Item], Result], items: Sequence[Item], side_by_side: bool
) -> list[Result]:
    """``func`` over ``items``; with ``side_by_side`` in a thread each. Prior searches wait on
    PACS: the jobs of a batch search at the same time, so no study waits longer than the
    finder's limit for its neighbours' priors."""
    if not side_by_side or len(items) < 2:
        return [func(item) for item in items]
    with ThreadPoolExecutor(len(items), thread_name_prefix="prior") as threads:
        return list(threads.map(func, items))


def generate_halving(engine: Engine, requests: list[GenerationRequest]) -> list[GenerationResult]:
    """``engine.generate``; on OutOfMemory the batch halved and each half tried the same way,
    down to one study (whose OutOfMemory then fails its job)."""
    try:
        return engine.generate(requests)
    except OutOfMemory:
        if len(requests) == 1:
            raise
        half = len(requests) // 2
        log.warning(
            "out of memory at batch %d: retrying as %d + %d",
            len(requests), half, len(requests) - half,
        )  # fmt: skip
        return generate_halving(engine, requests[:half]) + generate_halving(engine, requests[half:])


def renew_old_leases(db: Database, batch: ClaimedBatch, owner: str, lease_seconds: float) -> None:
    """Renew the batch's leases before it generates when a quarter of one has passed since
    its claim. A write, which under a burst's C-STOREs can wait seconds for SQLite's write
    lock with the GPU idle, so not for a batch claimed moments ago: its jobs, and those that
    join it (claimed later), keep three quarters of their lease at least, and generating and
    storing take seconds."""
    if time.time() - batch.stamps.get("claimed", 0.0) > lease_seconds / 4:
        extend_lease(db, [job.job_id for job in batch.jobs], owner, lease_seconds)
