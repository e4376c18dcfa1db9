"""The inference worker: queued study versions → model → stored reports.

One batch at a time:
    claim ready jobs with a lease (wait up to batch_wait_ms to fill max_batch)
    → read each version's instances from disk → preprocess → question
    → engine.generate(batch)    (CUDA out of memory: halve the batch and retry)
    → parse → Report row + job done + outputs/outbox rows, in ONE transaction per job.
Failures keep their traceback; retried with backoff, then the job ends `failed`.
An engine whose backend is out of reach (EngineUnavailable: an inference server that is down)
gives the batch back to the queue, attempts not counted, and the worker asks the engine
provider again, which holds the jobs and says why in status until the backend answers. An
engine that sends a batch's requests separately reports per request (BatchPartlyFailed): good
answers are stored, failed ones retried (at least the server's Retry-After later) or, when the
server refused the request itself (EngineRequestRejected), failed at once.

Priority lane: before each batch (and when the API rings the doorbell while idle) the worker
answers waiting questions and predict requests first (inference/interactive.py); without a
model they fail at once with the message status shows. While a batch generates on an engine
that steps (the transformers engine on the CUDA fast path) they are also answered between its
decode steps, without waiting for the batch to end (inference/lane_steps.py).

Priors ([priors], issue 17): with a PriorFinder the worker asks for each job's prior while it
loads the job (bounded by the finder's limit; the jobs of a batch search at the same time),
shows the model the prior image first and asks the comparison question
(inference/comparison.py); the report's prior link says what was compared, or why not.

Pipelining: when the engine can build its inputs ahead (inference.engine.PreparingEngine), one
background thread claims batch N+1, preprocesses it and runs engine.prepare while batch N
generates (with render processes N+1 keeps taking studies that come due until N ends or it is
full); N+1 then starts with engine.generate_prepared. Until N+1 is complete, N takes its
prepared pieces into the rows it leaves free as it decodes ([model] join_running_batch,
inference/decode_joins.py). A batch built ahead and never run (stop()) goes back to the
queue with its attempt not counted.

Early start ([model] early_start, with render processes): with no job due, the batch (and the
next one, while it tops up) takes studies still in their quiet period, and each answer is
stored only once its study's job can be claimed for the instances it was made from
(inference/early_start.py). Claiming and building batches: inference/worker_build.py.

Processes (``render_processes``, ``store_processes``; `serve` sets them from [model]): DICOM
reading and rendering (inference/render_pool.py) and the storing of each answer with its
outputs (inference/report_store.py: SR, GSPS, ORU, JSON, outbox rows, one commit) run in
processes of their own, so neither holds the interpreter lock the decode loop needs nor makes
the GPU wait between batches. The next batch generates while the last one's reports are
stored; its jobs stay leased until their commit, and stop() waits for those commits.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

from config.settings import NodeSettings
from core.errors import InferenceError
from core.loop import LoopThread
from core.redaction import error_text
from inference.batch_pieces import PieceFeed, piece_size
from inference.early_start import EarlyStart, is_early
from inference.engine import (
    BatchPartlyFailed,
    Engine,
    EngineRequestFailed,
    EngineRequestRejected,
    EngineUnavailable,
    GenerationRequest,
    GenerationResult,
    GenerationSettings,
    OutOfMemory,
    PreparingEngine,
    RowJoiningEngine,
    SquareInputEngine,
)
from inference.interactive import InteractiveLane
from inference.job_questions import JobQuestions
from inference.lane_steps import LaneBetweenSteps
from inference.prefetch import Prefetcher, TopUp
from inference.prompts import PromptLibrary
from inference.render_pool import RenderPool
from inference.report_store import (
    ReportHook,
    StoreOutcome,
    StorePool,
    StoreTask,
    store_report,
    store_task,
)
from inference.scope import StudyOutOfScope
from inference.worker_build import BatchBuilding
from inference.worker_jobs import (
    ClaimedBatch,
    PermanentJobError,
    PreparedJob,
    WorkerStats,
    generate_halving,
    renew_old_leases,
)
from storage.db import Database
from storage.doorbell import DELIVERY_DOORBELL, WORKER_DOORBELL, Doorbell, ring
from storage.jobs import (
    NO_RETRY,
    fail_job,
    job_retry_policy,
    release_jobs,
    skip_job,
)
from storage.models import JobStatus
from storage.priors import PriorFinder

log = logging.getLogger(__name__)

EngineProvider = Callable[[], Engine | None]


class InferenceWorker(BatchBuilding):
    """A supervised part: start() runs the loop in a thread, stop() ends it."""

    def __init__(
        self,
        db: Database,
        settings: NodeSettings,
        engine_provider: EngineProvider,
        on_report: ReportHook | None = None,
        owner: str | None = None,
        prior_finder: PriorFinder | None = None,
        *,
        render_processes: int = 0,
        store_processes: int = 0,
        process_setup: Callable[[], None] | None = None,
    ) -> None:
        self.db = db
        self.settings = settings
        self.model_settings = settings.model
        self.data_dir = settings.storage.data_dir
        self.engine_provider = engine_provider
        self.on_report = on_report
        self.prior_finder = prior_finder
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}"
        self.prompts = PromptLibrary.load(settings.model.prompts_dir)
        self.questions = JobQuestions(
            self.prompts,
            settings.model.language,
            settings.scope.out_of_scope,
            prior_finder,
            self.data_dir,
        )
        self.retry = job_retry_policy(settings.model.max_attempts, settings.model.retry_backoff_s)
        self.engine: Engine | None = None
        self._image_side: int | None = None  # the engine's (SquareInputEngine)
        self.stats = WorkerStats()
        self.poll_interval_s = settings.model.poll_interval_s
        self.doorbell: Doorbell | None = None
        # Idle (or after a failure) the loop waits on the doorbell that the completion
        # scheduler rings when it queues a job; polling covers jobs queued from other hosts.
        self.loop = LoopThread(
            "inference",
            self._run_step,
            interval_s=self.poll_interval_s,
            wait=self._wait_for_jobs,
            interrupt=lambda: ring(self.data_dir, WORKER_DOORBELL),
            on_exit=self._release_prefetched,
            log=log,
        )
        self.stop_event = self.loop.stop_event  # set once stop() is called
        self.thread = self.loop.thread
        self._prefetcher: Prefetcher[ClaimedBatch] = Prefetcher("inference-prefetch")
        self._topping_up = TopUp()  # the batch built ahead grows while this one runs
        self._piece = piece_size(self.model_settings.max_batch)  # studies prepared at a time
        # The next batch's pieces, offered to the running one, which says when it will end.
        self._feed = PieceFeed(self._topping_up.ends_in)
        # Report ids taken with the claims, for the stores. Bounded: jobs given back unrun (an
        # engine that is out of reach) leave theirs here, and the oldest then go unused.
        self._report_ids: deque[int] = deque(maxlen=4 * self.model_settings.max_batch)
        self._stats_lock = threading.Lock()  # _fail runs in the prefetch thread too
        self.lane = InteractiveLane(db, settings, self.prompts, self.owner)
        self.lane_steps = LaneBetweenSteps(
            self.lane,
            settings.interactive.max_rounds_between_batches,
            self.poll_interval_s,
            self.stop_event,
        )
        # Off the generating process's interpreter lock (0: in this process's threads):
        # DICOM reading and rendering, and the reports with their outputs (report_store.py).
        self.render_processes = render_processes
        self.store_processes = store_processes
        self.process_setup = process_setup
        self._render_pool: RenderPool | None = None
        self._store_pool: StorePool | None = None
        self.early = EarlyStart(db, settings, self.owner)  # studies run in their quiet period

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def last_error(self) -> str | None:
        return self.loop.last_error

    def start(self) -> None:
        self.doorbell = Doorbell(self.data_dir, WORKER_DOORBELL)
        self.lane.recover()
        self.start_pools()
        self.loop.start()

    def start_pools(self) -> None:
        """The render and store processes, started now; until they run (a few seconds of
        imports) the worker renders and stores in its own threads, so no study waits."""
        if self.render_processes > 0 and self._render_pool is None:
            self._render_pool = RenderPool(self.render_processes)
            self._render_pool.warm_up()
        if self.store_processes > 0 and self._store_pool is None:
            self._store_pool = StorePool(
                self.store_processes, self.db.url, self.data_dir, self.on_report, self.process_setup
            )
            self._store_pool.warm_up()

    @property
    def pools_ready(self) -> bool:
        """The render and store processes (those configured) have all started."""
        pools = (self._render_pool, self._store_pool)
        return all(pool.ready for pool in pools if pool is not None)

    def stop(self) -> None:
        if self.loop.stop(timeout_s=60):
            # The loop released its batch built ahead on the way out; this covers run_once
            # driven without the thread. While a late batch still runs, the loop does it.
            self._release_prefetched()
        self.early.stop()
        self.close_pools()
        if self.doorbell is not None:
            self.doorbell.close()

    def close_pools(self) -> None:
        """Wait for the reports still being stored (each commits or fails its job), then end
        the processes."""
        if self._store_pool is not None:
            self._store_pool.close()
            self._store_pool = None
        if self._render_pool is not None:
            self._render_pool.close()
            self._render_pool = None

    def _run_step(self) -> float | None:
        """One batch; straight on to the next while there was work, else wait (interval)."""
        return 0.0 if self.run_once() else None

    def _wait_for_jobs(self, seconds: float) -> None:
        if self.doorbell is not None:
            self.doorbell.wait(seconds)

    def _release_prefetched(self) -> None:
        """Give a batch claimed ahead and never run back to the queue, attempts not counted."""
        try:
            batch = self._prefetcher.close()
        except Exception:  # its claim failed: nothing of it is leased to this worker
            log.exception("building the next batch failed")
            return
        job_ids = [job.job_id for job in batch.jobs] if batch is not None else []
        self._drop_early(job_ids, "its batch did not run")
        if job_ids:
            release_jobs(self.db, job_ids, self.owner)
            log.info("released %d jobs prepared ahead back to the queue", len(job_ids))

    def ensure_engine(self) -> Engine | None:
        if self.engine is None:
            self.engine = self.engine_provider()
            # Studies are rendered at the model's input side where it has one (preprocess.py).
            sized = self.engine if isinstance(self.engine, SquareInputEngine) else None
            self._image_side = sized.image_side() if sized is not None else None
        return self.engine

    # -- one batch ------------------------------------------------------------------------

    def run_once(self) -> int:
        """Answer waiting interactive requests, then process at most one batch; return how
        many requests and jobs it finished (done or failed).

        The batch is the one built ahead during the previous call, if any; while it runs, the
        next one is built in the background when more jobs are due.
        """
        engine = self.ensure_engine()
        if engine is None:
            self.lane.refuse_all(self._model_unavailable())
            return 0
        answered = self.lane.serve(engine)
        asked = time.time()  # for a batch built ahead: from here the GPU waits for its build
        batch = self._prefetcher.take()
        if batch is None or not batch.job_ids:
            batch = self._claim_and_load()
        else:
            batch.stamps.update(next_asked=asked, taken=time.time())
        if not batch.job_ids:
            return answered
        given_back = 0
        if batch.jobs:
            self._topping_up.begin(len(batch.jobs), self.model_settings.max_batch)
            free_rows = len(batch.jobs) < self.model_settings.max_batch
            self._feed.batch_starts(free_rows and self._joiner(engine) is not None)
            try:
                self._prefetch_next(engine)
                given_back = self._run_batch(engine, batch)
            finally:
                self._topping_up.end()
            answered += self.lane_steps.answered  # questions answered inside the batch
            ring(self.data_dir, DELIVERY_DOORBELL)  # its outbox rows are committed
        return answered + len(batch.job_ids) - given_back

    def _model_unavailable(self) -> str:
        """What status shows about the model (inference.loader.EngineProvider.state)."""
        state = getattr(self.engine_provider, "state", None) or {}
        return str(state.get("message") or "the model is not loaded")

    def _run_batch(self, engine: Engine, batch: ClaimedBatch) -> int:
        """Run the batch and store or fail each job; return how many went back to the queue
        unrun (the engine's backend was out of reach)."""
        jobs = batch.jobs
        batch.stamps["run_started"] = time.time()
        if self._store_pool is not None:
            # Answers wait for their outputs at most two batches deep (their jobs stay leased).
            self._store_pool.wait_below(2 * self.model_settings.max_batch)
        batch.stamps["stores_below"] = time.time()
        renew_old_leases(self.db, batch, self.owner, self.model_settings.lease_seconds)
        started = time.monotonic()
        batch.stamps["generate_started"] = time.time()
        outcomes: list[GenerationResult] | list[GenerationResult | InferenceError]
        try:
            with self.lane_steps.during(engine, self.doorbell):
                outcomes = self._generate(engine, batch)
        except EngineUnavailable as exc:
            self._engine_lost(exc, jobs)
            return len(jobs)
        except BatchPartlyFailed as exc:
            outcomes = exc.outcomes
        except Exception as exc:
            for job in jobs:
                self._fail(job.job_id, exc)
            return 0
        elapsed = time.monotonic() - started
        batch.stamps["generate_ended"] = time.time()
        self.stats.record_batch(len(jobs), elapsed)
        self._topping_up.record_generate(len(jobs), elapsed)
        lost: dict[int, EngineUnavailable] = {}
        # Ids taken with the jobs' claims: a write here could wait seconds for SQLite's write
        # lock under a burst's C-STOREs, with the GPU idle. Should none be left, each store
        # takes its own (report_store._stage).
        report_ids = (self._report_ids.popleft() if self._report_ids else None for _ in jobs)
        for job, outcome in zip(jobs, outcomes, strict=True):
            if is_early(job.job_id) and isinstance(outcome, GenerationResult):
                self.early.answered(job, self._store_later(engine, job, outcome, batch.stamps))
            elif isinstance(outcome, EngineUnavailable):
                lost[job.job_id] = outcome
            elif isinstance(outcome, InferenceError):
                self._fail(job.job_id, outcome)
            else:
                self._store_or_fail(engine, job, outcome, batch.stamps, next(report_ids))
        if lost:
            first = next(iter(lost.values()))
            self._engine_lost(first, [job for job in jobs if job.job_id in lost])
        return len(lost)

    def _store_or_fail(
        self,
        engine: Engine,
        job: PreparedJob,
        result: GenerationResult,
        stamps: dict[str, float],
        report_id: int | None,
    ) -> None:
        """Store the answer: in the store pool when there is one (the next batch does not wait
        for the outputs), else here."""
        try:
            task = store_task(job, result, result.identity or engine.identity, stamps, report_id)
            pool = self._store_pool
            if pool is not None and pool.ready:  # until its processes run: in this thread
                pool.submit(self.owner, task, self._stored)
                return
            outcome = store_report(self.db, self.owner, task, self.on_report)
        except Exception as exc:
            self._fail(job.job_id, exc)
            return
        if outcome is StoreOutcome.STORED:
            with self._stats_lock:
                self.stats.jobs_done += 1

    def _store_later(
        self, engine: Engine, job: PreparedJob, result: GenerationResult, stamps: dict[str, float]
    ) -> Callable[[int], None]:
        """The store of an answer made early, once its job is claimed (early_start.py)."""
        return lambda report_id: self._store_or_fail(engine, job, result, stamps, report_id)

    def _drop_early(self, job_ids: list[int], why: str) -> None:
        for job_id in job_ids:
            if is_early(job_id):
                self.early.drop(job_id, why)

    def _engine_lost(self, exc: EngineUnavailable, jobs: list[PreparedJob]) -> None:
        """The backend cannot be reached: nothing ran, so the jobs (and a batch built ahead)
        go back to the queue with the attempt not counted; the provider is asked again."""
        self._drop_early([job.job_id for job in jobs], "the engine is unavailable")
        release_jobs(self.db, [job.job_id for job in jobs], self.owner)
        self.engine = None
        try:
            ahead = self._prefetcher.take()
        except Exception:  # its claim failed: nothing of it is leased to this worker
            log.exception("building the next batch failed")
            ahead = None
        if ahead is not None and ahead.job_ids:
            self._drop_early(ahead.job_ids, "the engine is unavailable")
            release_jobs(self.db, ahead.job_ids, self.owner)
        log.warning("engine unavailable, %d jobs back in the queue: %s", len(jobs), exc)

    def _generate(self, engine: Engine, batch: ClaimedBatch) -> list[GenerationResult]:
        """A batch built ahead runs from its prepared inputs; with render processes, pieces of
        the batch being built join it as it decodes and become part of it. Any other batch, or
        one that ran out of memory, goes through engine.generate and its halving. Once it ends
        the next batch takes no more studies (and _engine_lost may wait for it)."""
        inputs, batch.inputs = batch.inputs, None
        joiner = self._joiner(engine)
        try:
            if isinstance(engine, PreparingEngine):
                try:
                    if inputs is None and joiner is not None:
                        inputs = joiner.prepare([self._request(job) for job in batch.jobs])
                    if inputs is not None and joiner is not None:
                        return joiner.generate_joining(inputs, self._feed)
                    if inputs is not None:
                        return engine.generate_prepared(inputs)
                except OutOfMemory:
                    log.warning("out of memory at prepared batch %d: retrying", len(batch.jobs))
                del inputs  # its device memory is free before the batch is tried again
            jobs = batch.jobs + self._feed.jobs
            return generate_halving(engine, [self._request(job) for job in jobs])
        finally:
            self._topping_up.end()
            joined = self._feed.end()  # studies that joined the batch are now part of it
            batch.jobs.extend(joined)
            batch.job_ids.extend(job.job_id for job in joined)

    def _joiner(self, engine: Engine) -> RowJoiningEngine | None:
        """``engine`` if its running batch takes pieces of the next (join_running_batch)."""
        pool, joins = self._render_pool, self.model_settings.join_running_batch
        joins = joins and pool is not None and pool.ready
        return engine if joins and isinstance(engine, RowJoiningEngine) else None

    def _request(self, job: PreparedJob) -> GenerationRequest:
        return GenerationRequest(
            images=[*job.prior_images, *job.prepared.images],  # prior first, then current
            prompt=job.question,
            settings=GenerationSettings(max_new_tokens=self.model_settings.max_new_tokens),
            question_first=job.question_first,
        )

    def _stored(self, task: StoreTask, future: Future[StoreOutcome]) -> None:
        """A store run in the pool ended (in a thread of the pool): count it or fail the job."""
        try:
            outcome = future.result()
        except Exception as exc:  # the build failed, or its process died (BrokenProcessPool)
            self._fail(task.job_id, exc)
            return
        if outcome is StoreOutcome.STORED:
            with self._stats_lock:
                self.stats.jobs_done += 1

    def _fail(self, job_id: int, exc: BaseException) -> None:
        if is_early(job_id):  # no job yet: once complete, the study runs (and fails) as usual
            self.early.drop(job_id, error_text(exc))
            return
        if isinstance(exc, StudyOutOfScope):  # [scope] out_of_scope = "skip": not a failure
            if skip_job(self.db, job_id, self.owner, str(exc)):
                log.info("job %d skipped: outside the validated scope: %s", job_id, exc)
            return
        permanent = isinstance(exc, PermanentJobError | EngineRequestRejected)
        policy = NO_RETRY if permanent else self.retry
        retry_after = exc.retry_after_s if isinstance(exc, EngineRequestFailed) else None
        status = fail_job(self.db, job_id, exc, policy, retry_after_s=retry_after)
        with self._stats_lock:
            self.stats.jobs_failed += status == JobStatus.FAILED
        log.error("job %d: %s (now %s)", job_id, error_text(exc), status)
