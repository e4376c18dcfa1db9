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
model they fail at once with the message status shows.

Priors ([priors], issue 17): with a PriorFinder the worker asks for each job's prior while it
loads the job (bounded by the finder's limit; the jobs of a batch search at the same time),
shows the model the prior image first and asks the comparison question
(inference/comparison.py); the report's prior link says what was compared, or why not.

Pipelining: when the engine can build its inputs ahead (inference.engine.PreparingEngine) and
more jobs are due, one background thread claims batch N+1, preprocesses it and runs
engine.prepare while batch N generates; batch N+1 then starts with engine.generate_prepared.
A lone study is not held up: with nothing else due it goes straight through. A batch built
ahead and never run (stop()) goes back to the queue with its attempt not counted.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from sqlalchemy.orm import Session

from config.settings import NodeSettings
from core.errors import InferenceError
from core.loop import LoopThread
from core.redaction import error_text
from inference.comparison import (
    PriorInput,
    comparison_question,
    current_query,
    load_prior,
    rebase_findings,
    without_prior,
)
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
    PreparedBatch,
    PreparingEngine,
)
from inference.interactive import InteractiveLane
from inference.parsing import parse_report
from inference.prefetch import Prefetcher
from inference.preprocess import PreparedStudy, PreprocessError, attach_regions, prepare_study
from inference.prompts import Prompt, PromptLibrary, PromptTemplateError
from inference.scope import StudyHeader, StudyOutOfScope, decide_scope
from storage.db import Database
from storage.doorbell import DELIVERY_DOORBELL, WORKER_DOORBELL, Doorbell, ring
from storage.jobs import (
    NO_RETRY,
    claim_jobs,
    complete_job,
    extend_lease,
    fail_job,
    has_due_jobs,
    job_retry_policy,
    release_jobs,
    skip_job,
)
from storage.models import Job, JobStatus, Report, Study, StudyVersion, utcnow
from storage.priors import PriorFinder, link_prior
from storage.report_schema import ScopeVerdict
from storage.reports import latest_report_id

log = logging.getLogger(__name__)

ReportHook = Callable[[Session, Report], None]
EngineProvider = Callable[[], Engine | None]


class PermanentJobError(InferenceError):
    """Retrying cannot help (the study has no usable image); the job fails at once."""


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
    scope: ScopeVerdict | None = None  # decided from the header (inference/scope.py)
    prior: PriorInput | None = None  # set when [priors] is enabled

    @property
    def prior_images(self) -> list[Any]:
        return self.prior.images if self.prior is not None and self.prior.compared else []


@dataclass
class ClaimedBatch:
    """Claimed job ids, the jobs whose studies loaded, and the engine's inputs when built ahead."""

    job_ids: list[int]
    jobs: list[PreparedJob]
    inputs: PreparedBatch | None = None


@dataclass
class WorkerStats:
    batches: int = 0
    jobs_done: int = 0
    jobs_failed: int = 0
    last_batch_seconds: float = 0.0
    last_batch_size: int = 0
    inference_seconds_total: float = 0.0
    recent: list[dict[str, Any]] = field(default_factory=list)


class InferenceWorker:
    """A supervised part: start() runs the loop in a thread, stop() ends it."""

    def __init__(
        self,
        db: Database,
        settings: NodeSettings,
        engine_provider: EngineProvider,
        on_report: ReportHook | None = None,
        owner: str | None = None,
        prior_finder: PriorFinder | None = None,
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
        self.retry = job_retry_policy(settings.model.max_attempts, settings.model.retry_backoff_s)
        self.engine: Engine | None = None
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
        self._stats_lock = threading.Lock()  # _fail runs in the prefetch thread too
        self.lane = InteractiveLane(db, settings, self.prompts, self.owner)

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def last_error(self) -> str | None:
        return self.loop.last_error

    def start(self) -> None:
        self.doorbell = Doorbell(self.data_dir, WORKER_DOORBELL)
        self.lane.recover()
        self.loop.start()

    def stop(self) -> None:
        if self.loop.stop(timeout_s=60):
            # The loop released its batch built ahead on the way out; this covers run_once
            # driven without the thread. While a late batch still runs, the loop does it.
            self._release_prefetched()
        if self.doorbell is not None:
            self.doorbell.close()

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
        if job_ids:
            release_jobs(self.db, job_ids, self.owner)
            log.info("released %d jobs prepared ahead back to the queue", len(job_ids))

    def ensure_engine(self) -> Engine | None:
        if self.engine is None:
            self.engine = self.engine_provider()
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
        batch = self._prefetcher.take()
        if batch is None or not batch.job_ids:
            batch = self._claim_and_load()
        if not batch.job_ids:
            return answered
        given_back = 0
        if batch.jobs:
            self._prefetch_next(engine)
            given_back = self._run_batch(engine, batch)
            ring(self.data_dir, DELIVERY_DOORBELL)  # its outbox rows are committed
        return answered + len(batch.job_ids) - given_back

    def _model_unavailable(self) -> str:
        """What status shows about the model (inference.loader.EngineProvider.state)."""
        state = getattr(self.engine_provider, "state", None) or {}
        return str(state.get("message") or "the model is not loaded")

    def _claim_and_load(self) -> ClaimedBatch:
        job_ids = self._claim_batch()
        if self.prior_finder is not None and len(job_ids) > 1:
            # Prior searches wait on PACS: the batch's jobs search side by side, so no study
            # waits longer than the finder's limit for its neighbours' priors.
            with ThreadPoolExecutor(len(job_ids), thread_name_prefix="prior") as pool:
                loaded = list(pool.map(self._prepare, job_ids))
        else:
            loaded = [self._prepare(job_id) for job_id in job_ids]
        return ClaimedBatch(job_ids, [job for job in loaded if job])

    def _prefetch_next(self, engine: Engine) -> None:
        """Start building the next batch in the background, when the engine can and more jobs
        are due (checked here, so a lone study never waits for a claim)."""
        if not isinstance(engine, PreparingEngine) or self.stop_event.is_set():
            return
        if has_due_jobs(self.db):
            self._prefetcher.start(lambda: self._claim_and_build(engine))

    def _claim_and_build(self, engine: PreparingEngine) -> ClaimedBatch:
        """The prefetch thread: claim, load and preprocess, then the engine's inputs."""
        if self.stop_event.is_set():
            return ClaimedBatch([], [])
        batch = self._claim_and_load()
        if batch.jobs and not self.stop_event.is_set():
            try:
                batch.inputs = engine.prepare([self._request(job) for job in batch.jobs])
            except Exception:
                # Runs later as an unprepared batch: engine.generate meets the same error,
                # and the usual handling (halving on OutOfMemory, failing the jobs) applies.
                log.warning("preparing the next batch failed", exc_info=True)
        return batch

    def _claim_batch(self) -> list[int]:
        limit = self.model_settings.max_batch
        lease = self.model_settings.lease_seconds
        job_ids = claim_jobs(self.db, self.owner, limit, lease)
        if job_ids and len(job_ids) < limit and self.model_settings.batch_wait_ms > 0:
            # A burst arrives over a few milliseconds: wait briefly to serve it as one batch.
            time.sleep(self.model_settings.batch_wait_ms / 1000)
            job_ids += claim_jobs(self.db, self.owner, limit - len(job_ids), lease)
        return job_ids

    def _prepare(self, job_id: int) -> PreparedJob | None:
        try:
            return self._load_job(job_id)
        except StudyOutOfScope as exc:
            if skip_job(self.db, job_id, self.owner, str(exc)):
                log.info("job %d skipped: outside the validated scope: %s", job_id, exc)
            return None
        except Exception as exc:
            self._fail(job_id, exc)
            return None

    def _scope(self, paths: list[Path]) -> ScopeVerdict | None:
        """The study's scope from its first instance's header; None when it cannot be read
        (preprocessing then says why the study cannot be used). Raises StudyOutOfScope with
        the reason when the study is outside it and ``[scope] out_of_scope = "skip"``."""
        try:
            header = StudyHeader.of(dcmread(paths[0], stop_before_pixels=True))
        except Exception:
            return None
        scope = decide_scope(header, self.prompts.scope_rules)
        if not scope.in_scope and self.settings.scope.out_of_scope == "skip":
            raise StudyOutOfScope(scope.reason)
        return scope

    def _load_job(self, job_id: int) -> PreparedJob:
        with self.db.session() as session:
            job = session.get_one(Job, job_id)
            version = session.get_one(StudyVersion, job.study_version_id)
            study = session.get_one(Study, version.study_id)
            paths = [self.data_dir / instance.path for instance in version.instances]
            calling_ae = study.calling_ae
            job_ids = {"job_id": job.id, "study_id": study.id, "study_version_id": version.id}
            study_uid = study.study_instance_uid
        scope = self._scope(paths) if paths else None
        started = time.perf_counter()
        try:
            prepared = prepare_study(paths)
        except PreprocessError as exc:
            raise PermanentJobError(str(exc)) from exc
        preprocess_seconds = time.perf_counter() - started
        prior = self._prior(paths, study_uid, prepared) if self.prior_finder else None
        in_scope = scope is None or scope.in_scope
        prompt, prior = self._question(prepared, calling_ae, prior, in_scope)
        question = prompt.text
        if prior is not None and prior.compared:
            question = comparison_question(prompt.text, prior.comparison)
        return PreparedJob(
            **job_ids,
            study_uid=study_uid,
            prepared=prepared,
            question=question,
            language=prompt.language,
            preprocess_seconds=preprocess_seconds,
            scope=scope,
            prior=prior,
        )

    def _prior(self, paths: list[Path], study_uid: str, prepared: PreparedStudy) -> PriorInput:
        assert self.prior_finder is not None
        query = current_query(paths, study_uid, prepared.modality, prepared.body_part)
        prior = load_prior(self.prior_finder, query, self.data_dir)
        log.info("study %s: %s", study_uid, prior.comparison.statement())
        return prior

    def _question(
        self,
        prepared: PreparedStudy,
        calling_ae: str,
        prior: PriorInput | None,
        in_scope: bool = True,
    ) -> tuple[Prompt, PriorInput | None]:
        """The comparison template when there is a prior (and one matches), else the usual;
        outside the validated scope, only templates that declare no scope."""
        language = self.model_settings.language
        if prior is not None and prior.compared:
            try:
                prompt = self.prompts.select(
                    prepared.modality,
                    prepared.body_part,
                    calling_ae,
                    language,
                    comparison=True,
                    in_scope=in_scope,
                )
                return prompt, prior
            except PromptTemplateError:
                prior = without_prior(prior, "no comparison question template matches the study")
        prompt = self.prompts.select(
            prepared.modality, prepared.body_part, calling_ae, language, in_scope=in_scope
        )
        return prompt, prior

    def _run_batch(self, engine: Engine, batch: ClaimedBatch) -> int:
        """Run the batch and store or fail each job; return how many went back to the queue
        unrun (the engine's backend was out of reach)."""
        jobs = batch.jobs
        extend_lease(
            self.db, [job.job_id for job in jobs], self.owner, self.model_settings.lease_seconds
        )
        started = time.monotonic()
        outcomes: list[GenerationResult] | list[GenerationResult | InferenceError]
        try:
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
        self._record_batch_stats(len(jobs), elapsed)
        lost: dict[int, EngineUnavailable] = {}
        for job, outcome in zip(jobs, outcomes, strict=True):
            if isinstance(outcome, EngineUnavailable):
                lost[job.job_id] = outcome
            elif isinstance(outcome, InferenceError):
                self._fail(job.job_id, outcome)
            else:
                self._store_or_fail(engine, job, outcome)
        if lost:
            first = next(iter(lost.values()))
            self._engine_lost(first, [job for job in jobs if job.job_id in lost])
        return len(lost)

    def _store_or_fail(self, engine: Engine, job: PreparedJob, result: GenerationResult) -> None:
        try:
            self._store(engine, job, result)
        except Exception as exc:
            self._fail(job.job_id, exc)

    def _engine_lost(self, exc: EngineUnavailable, jobs: list[PreparedJob]) -> None:
        """The backend cannot be reached: nothing ran, so the jobs (and a batch built ahead)
        go back to the queue with the attempt not counted; the provider is asked again."""
        release_jobs(self.db, [job.job_id for job in jobs], self.owner)
        self.engine = None
        try:
            ahead = self._prefetcher.take()
        except Exception:  # its claim failed: nothing of it is leased to this worker
            log.exception("building the next batch failed")
            ahead = None
        if ahead is not None and ahead.job_ids:
            release_jobs(self.db, ahead.job_ids, self.owner)
        log.warning("engine unavailable, %d jobs back in the queue: %s", len(jobs), exc)

    def _generate(self, engine: Engine, batch: ClaimedBatch) -> list[GenerationResult]:
        """A batch built ahead runs from its prepared inputs; any other, or one that ran out
        of memory that way, goes through engine.generate and its halving."""
        inputs, batch.inputs = batch.inputs, None
        if inputs is not None and isinstance(engine, PreparingEngine):
            try:
                return engine.generate_prepared(inputs)
            except OutOfMemory:
                log.warning("out of memory at prepared batch %d: retrying", len(batch.jobs))
            del inputs  # its device memory is free before the batch is tried again
        return self._generate_splitting(engine, batch.jobs)

    def _generate_splitting(
        self, engine: Engine, jobs: list[PreparedJob]
    ) -> list[GenerationResult]:
        """On OutOfMemory halve the batch, down to one study (which then fails the job)."""
        requests = [self._request(job) for job in jobs]
        try:
            return engine.generate(requests)
        except OutOfMemory:
            if len(jobs) == 1:
                raise
            half = len(jobs) // 2
            log.warning(
                "out of memory at batch %d: retrying as %d + %d", len(jobs), half, len(jobs) - half
            )
            return self._generate_splitting(engine, jobs[:half]) + self._generate_splitting(
                engine, jobs[half:]
            )

    def _request(self, job: PreparedJob) -> GenerationRequest:
        return GenerationRequest(
            images=[*job.prior_images, *job.prepared.images],  # prior first, then current
            prompt=job.question,
            settings=GenerationSettings(max_new_tokens=self.model_settings.max_new_tokens),
        )

    def _store(self, engine: Engine, job: PreparedJob, result: GenerationResult) -> None:
        prior_count = len(job.prior_images)
        image_count = prior_count + len(job.prepared.images)
        parsed = parse_report(result.text, job.language, image_count=image_count)
        for note in parsed.notes:
            log.info("study %s: %s", job.study_uid, note)
        rebased, removed = rebase_findings(parsed.content, prior_count)
        if removed:
            log.info("study %s: %d boxes on the prior image removed", job.study_uid, removed)
        content = attach_regions(rebased, job.prepared.geometries)
        if job.scope is not None:  # the node's verdict, carried in the content (ReportContent)
            content = content.model_copy(update={"scope": job.scope})
        with self.db.session() as session:
            # Done together with its report and outbox rows: one commit, or none of them.
            if not complete_job(session, job.job_id, self.owner):
                log.warning("job %d lost its lease while running; result dropped", job.job_id)
                return
            identity = result.identity or engine.identity
            # A new version of a reported study replaces that report: its ORU says C
            # (correction) and its SR names the earlier SR as Predecessor Document.
            superseded = latest_report_id(session, job.study_id)
            report = Report(
                job_id=job.job_id,
                study_id=job.study_id,
                study_version_id=job.study_version_id,
                language=content.language,
                parse_status=content.parse_status,
                urgency=content.urgency,
                question=job.question,
                raw_text=result.text,
                content_json=content.model_dump(mode="json"),
                model_json=identity.model_dump(mode="json"),
                timings_json={
                    "batch_seconds": round(result.seconds, 4),
                    "batch_size": result.batch_size,
                    "prompt_tokens": result.prompt_tokens,
                    "new_tokens": result.new_tokens,
                    "preprocess_seconds": round(job.preprocess_seconds, 4),
                    "source_sop_instance_uids": job.prepared.sop_instance_uids,
                },
                is_test_model=identity.is_test_model,
                created_at=utcnow(),
                supersedes_report_id=superseded,
            )
            session.add(report)
            session.flush()
            if job.prior is not None:
                link_prior(session, report.id, job.prior.comparison)
            if self.on_report is not None:
                started = time.perf_counter()
                self.on_report(session, report)
                report.timings_json = {
                    **report.timings_json,
                    "outputs_seconds": round(time.perf_counter() - started, 4),
                }
        self.stats.jobs_done += 1
        log.info(
            "study %s: report stored (%s, %d findings, urgency %s)",
            job.study_uid,
            content.parse_status,
            len(content.findings),
            content.urgency or "-",
        )

    def _fail(self, job_id: int, exc: BaseException) -> None:
        permanent = isinstance(exc, PermanentJobError | EngineRequestRejected)
        policy = NO_RETRY if permanent else self.retry
        retry_after = exc.retry_after_s if isinstance(exc, EngineRequestFailed) else None
        status = fail_job(self.db, job_id, exc, policy, retry_after_s=retry_after)
        with self._stats_lock:
            self.stats.jobs_failed += status == JobStatus.FAILED
        log.error("job %d: %s (now %s)", job_id, error_text(exc), status)

    def _record_batch_stats(self, size: int, seconds: float) -> None:
        self.stats.batches += 1
        self.stats.last_batch_size = size
        self.stats.last_batch_seconds = seconds
        self.stats.inference_seconds_total += seconds
