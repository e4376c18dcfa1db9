"""How the inference worker (inference/worker.py) claims and builds its batches: the due jobs
claimed with their report ids, each study read and rendered (in the render processes, or in
the worker's threads until they run), questioned, and with an engine that joins rows,
prepared in pieces that the running batch may take. While a batch runs, the next one is
built in the background and grows with the studies that come due (topped up); with nothing
due, it takes studies still in their quiet period (inference/early_start.py)."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from config.settings import ModelSettings
from inference.batch_pieces import PieceFeed, PiecewiseBuild, Render, Rendered
from inference.early_start import EarlyStart, is_early
from inference.engine import (
    Engine,
    GenerationRequest,
    JoiningEngine,
    PreparedBatch,
    PreparingEngine,
)
from inference.job_questions import JobQuestions
from inference.prefetch import Prefetcher, TopUp
from inference.preprocess import PreprocessError, prepare_study
from inference.render_pool import RenderPool
from inference.worker_jobs import (
    ClaimedBatch,
    PermanentJobError,
    PreparedJob,
    batch_sources,
    job_source,
    map_side_by_side,
)
from storage.db import Database
from storage.jobs import claim_jobs, has_due_jobs
from storage.priors import PriorFinder

log = logging.getLogger(__name__)


class BatchBuilding:
    """The claiming and building half of ``InferenceWorker`` (which sets these)."""

    db: Database
    data_dir: Path
    owner: str
    model_settings: ModelSettings
    prior_finder: PriorFinder | None
    questions: JobQuestions
    early: EarlyStart
    stop_event: threading.Event
    _render_pool: RenderPool | None
    _prefetcher: Prefetcher[ClaimedBatch]
    _topping_up: TopUp
    _feed: PieceFeed
    _piece: int
    _report_ids: deque[int]
    _image_side: int | None
    _fail: Callable[[int, BaseException], None]
    _request: Callable[[PreparedJob], GenerationRequest]

    def _claim_and_load(
        self, top_up: bool = False, engine: PreparingEngine | None = None
    ) -> ClaimedBatch:
        """Claim a batch and load it (``top_up``, ``engine``: see _render_in_pool)."""
        claimed = time.time()
        job_ids = self._claim_batch()
        pool = self._render_pool
        if pool is not None and pool.ready:  # until its processes have started: in threads
            stamps = {"claimed": claimed}
            joiner = engine if isinstance(engine, JoiningEngine) else None
            ways = (self._questions_for, self._request, self._fail)
            build = PiecewiseBuild(joiner, *ways, self._piece, job_ids)
            inputs = self._render_in_pool(pool, job_ids, stamps, top_up, build)
            stamps.setdefault("built", time.time())
            return ClaimedBatch(job_ids, build.jobs, inputs, stamps=stamps)
        loaded = map_side_by_side(self._prepare, job_ids, self.prior_finder is not None)
        stamps = {"claimed": claimed, "built": time.time()}
        return ClaimedBatch(job_ids, [job for job in loaded if job], stamps=stamps)

    def _render_in_pool(
        self, pool: RenderPool, ids: list[int], stamps: dict[str, float], top_up: bool,
        build: PiecewiseBuild,
    ) -> PreparedBatch | None:  # fmt: skip
        """Render the batch's studies in the render processes as they are claimed; with
        ``top_up`` it grows (``ids`` in place) while the batch before runs, and (an engine
        that joins) is questioned and prepared in pieces meanwhile: its inputs, else None."""
        build.add(self._submit_renders(pool, ids))
        if not ids and not top_up:  # nothing due: the studies on their way
            self._add_early(pool, ids, build, self.model_settings.max_batch)
        stamps["sources"] = time.time()
        with self._feed.offering(build if top_up else None):  # its studies are on their way
            if top_up:
                self._top_up(pool, ids, build)
                stamps["topped_up"] = time.time()
            return build.finish(stamps)

    def _questions_for(self, rendered: list[Rendered]) -> list[PreparedJob]:
        jobs = map_side_by_side(self._question_for, rendered, self.prior_finder is not None)
        return [job for job in jobs if job]

    def _submit_renders(self, pool: RenderPool, job_ids: list[int]) -> list[Render]:
        """Each job's study sent to the render processes (a job that cannot be read fails)."""
        found = (batch_sources(self.db, self.data_dir, job_ids) if job_ids else None) or {}
        renders = []
        for job_id in job_ids:
            try:
                source = found.get(job_id) or job_source(self.db, self.data_dir, job_id)
                renders.append((source, pool.submit(source.paths, self._image_side)))
            except Exception as exc:
                self._fail(job_id, exc)
        return renders

    def _add_early(
        self, pool: RenderPool, job_ids: list[int], build: PiecewiseBuild, limit: int
    ) -> None:
        """Up to ``limit`` studies still in their quiet period (inference/early_start.py) added
        to the batch being built (``job_ids`` in place) and sent to the render processes."""
        early = self.early.take(limit)
        job_ids += [source.job_id for source in early]
        build.add([(source, pool.submit(source.paths, self._image_side)) for source in early])

    def _top_up(self, pool: RenderPool, job_ids: list[int], build: PiecewiseBuild) -> None:
        """While the batch before runs: claim what came due (its kind, up to max_batch), render
        and build it; full, go on while that batch takes pieces. At most half the lease."""
        limit, lease = self.model_settings.max_batch, self.model_settings.lease_seconds
        deadline = time.monotonic() + lease / 2
        while len(job_ids) < limit or self._feed.taking:
            running = self._topping_up.still_running()
            if not running or self.stop_event.is_set() or time.monotonic() > deadline:
                break
            build.harvest()
            if len(job_ids) >= limit:
                continue
            if not has_due_jobs(self.db, self.early.exclude()):
                self._add_early(pool, job_ids, build, limit - len(job_ids))  # nothing due
                continue
            like = next((job_id for job_id in job_ids if not is_early(job_id)), None)
            more = self._claim(limit - len(job_ids), like)
            job_ids += more
            build.add(self._submit_renders(pool, more))

    def _question_for(self, item: Rendered) -> PreparedJob | None:
        """A rendered study with its question (and prior); None when that failed the job."""
        source, prepared, seconds = item
        try:
            return self.questions.prepared_job(source, prepared, seconds)
        except Exception as exc:
            self._fail(source.job_id, exc)
            return None

    def _prefetch_next(self, engine: Engine) -> None:
        """Start building the next batch in the background, when the engine can and more jobs
        are due, or may come due while this batch runs (render processes: topped up)."""
        if not isinstance(engine, PreparingEngine) or self.stop_event.is_set():
            return
        pool = self._render_pool
        offers = pool is not None and pool.ready  # built in pieces, offered to this batch
        if offers or has_due_jobs(self.db, self.early.exclude()):
            # With render processes the batch is topped up while this one runs, so it is
            # started even when nothing is due yet: the studies of a burst are still arriving.
            build = lambda: self._claim_and_build(engine)  # noqa: E731
            self._prefetcher.start(self._feed.starting(build) if offers else build)

    def _claim_and_build(self, engine: PreparingEngine) -> ClaimedBatch:
        """The prefetch thread: claim, load and preprocess, then the engine's inputs (built
        in pieces meanwhile when the engine joins them, else here)."""
        if self.stop_event.is_set():
            return ClaimedBatch([], [])
        batch = self._claim_and_load(top_up=True, engine=engine)
        piece = self._piece if batch.inputs else None
        if batch.jobs and batch.inputs is None and not self.stop_event.is_set():
            try:
                batch.inputs = engine.prepare([self._request(job) for job in batch.jobs])
                batch.stamps["built"] = time.time()
            except Exception:
                # Runs later as an unprepared batch: engine.generate meets the same error,
                # and the usual handling (halving on OutOfMemory, failing the jobs) applies.
                log.warning("preparing the next batch failed", exc_info=True)
        if batch.inputs is not None:
            built = batch.stamps["built"]
            tail = built - batch.stamps.get("rendered", built)  # for TopUp's limit
            self._topping_up.record_tail(len(batch.jobs), tail, piece)
        return batch

    def _claim_batch(self) -> list[int]:
        limit = self.model_settings.max_batch
        job_ids = self._claim(limit)
        if job_ids and len(job_ids) < limit and self.model_settings.batch_wait_ms > 0:
            # A burst arrives over a few milliseconds: wait briefly to serve it as one batch.
            time.sleep(self.model_settings.batch_wait_ms / 1000)
            job_ids += self._claim(limit - len(job_ids), job_ids[0])
        return job_ids

    def _claim(self, limit: int, like: int | None = None) -> list[int]:
        """Due jobs leased to this worker, a report id for each put in ``_report_ids``."""
        lease, ids = self.model_settings.lease_seconds, self._report_ids
        return claim_jobs(
            self.db, self.owner, limit, lease, like=like, report_ids=ids,
            exclude_studies=self.early.exclude(),
        )  # fmt: skip

    def _prepare(self, job_id: int) -> PreparedJob | None:
        """Read, render and question one job in this process; None when that failed it."""
        try:
            source = job_source(self.db, self.data_dir, job_id)
            started = time.perf_counter()
            try:
                prepared = prepare_study(source.paths, self._image_side)
            except PreprocessError as exc:
                raise PermanentJobError(str(exc)) from exc
            return self.questions.prepared_job(source, prepared, time.perf_counter() - started)
        except Exception as exc:
            self._fail(job_id, exc)
            return None
