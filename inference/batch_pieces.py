"""The batch being built ahead, questioned and prepared in pieces as its studies render.

With render processes the inference worker builds batch N+1 while batch N generates: it claims
the studies that come due (topping up, inference/prefetch.py), sends each to the render
processes, and once the batch is complete asked each study's question and ran
``engine.prepare`` over the whole batch. At the start of a burst that last step came after the
GPU had gone idle: 0.8 s for 64 radiographs on an H200 host, on top of the last renders.

``PiecewiseBuild`` takes the studies whose rendering is done while the batch still fills,
asks their questions and prepares them ``piece`` at a time; when the batch is complete only
the last studies are left, and ``JoiningEngine.join`` makes one batch of the pieces
(inference/device_inputs.py: the same inputs as one ``prepare``). An engine that cannot join,
or a piece that fails to prepare, leaves the batch to be prepared whole, as before.

Until the batch is complete, the batch that runs may take its prepared pieces into the rows
it leaves free (``PieceFeed``, inference/decode_joins.py): their jobs then leave this batch.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import TypeVar

from core.errors import InferenceError
from inference.engine import GenerationRequest, JoiningEngine, PreparedBatch
from inference.preprocess import PreparedStudy, PreprocessError
from inference.render_pool import RenderedStudy, take_study
from inference.worker_jobs import JobSource, PermanentJobError, PreparedJob

T = TypeVar("T")

log = logging.getLogger(__name__)

Rendered = tuple[JobSource, PreparedStudy, float]  # the study, its images, render seconds
Render = tuple[JobSource, Future[RenderedStudy]]
MAX_PIECE = 8  # studies a piece at most: the processor's fixed cost per call stays small
HELD_S = 0.1  # a running batch that asked this recently holds for pieces (it asks every 5 ms)
# A build that claimed studies this recently is taking in a burst still arriving: more count
# as coming though none is in flight at the moment asked (it claims every 50 ms: prefetch.py
# TopUp.interval_s). A hold that then gets nothing ends after decode_joins.HOLD_GAP_S.
CLAIMED_RECENTLY_S = 0.25


def piece_size(max_batch: int) -> int:
    """Studies a piece for batches of ``max_batch``: a quarter of it, 1 to ``MAX_PIECE``."""
    return max(1, min(MAX_PIECE, max_batch // 4))


def _stamp_rendered(times: dict[str, float]) -> Callable[[Future[RenderedStudy]], None]:
    """A render's done-callback: when it ended (it runs in the pool's result thread)."""

    def stamp(_: Future[RenderedStudy]) -> None:
        times.setdefault("rendered", time.time())

    return stamp


class PiecewiseBuild:
    """One batch's renders as they finish: questioned (``ask``) and, with a ``JoiningEngine``,
    prepared in pieces of ``piece`` studies. ``jobs`` are in the prepared inputs' order."""

    def __init__(
        self,
        engine: JoiningEngine | None,
        ask: Callable[[list[Rendered]], list[PreparedJob]],
        request: Callable[[PreparedJob], GenerationRequest],
        fail: Callable[[int, BaseException], None],
        piece: int = MAX_PIECE,
        claimed: list[int] | None = None,
    ) -> None:
        self._engine = engine
        self._ask, self._request, self._fail = ask, request, fail
        self._piece = max(1, piece)
        self._renders: list[Render] = []
        self._waiting: list[PreparedJob] = []  # questioned, in no piece yet
        self._pieces: list[PreparedBatch] = []
        # jobs: the pieces' jobs in order, then those waiting; claimed: the batch's job ids.
        self.jobs: list[PreparedJob] = []
        self.claimed = claimed if claimed is not None else []
        self._lock = threading.Lock()  # take_piece runs in the generating thread
        self._times: dict[int, dict[str, float]] = {}  # job id -> PreparedJob.stamps so far
        self._closed = False  # finish has begun joining: no piece leaves any more
        self._wanted = 0  # the size of the next piece, when a running batch wants fewer rows
        self._held = 0.0  # when a running batch last held its decode for pieces (monotonic)
        self._preparing = False  # a piece is being prepared (its studies left _waiting)
        self._claimed_at = -CLAIMED_RECENTLY_S  # when studies were last added (monotonic)

    def take_piece(
        self, rows: int, accept: Callable[[PreparedBatch], bool]
    ) -> tuple[PreparedBatch, list[PreparedJob]] | None:
        """The first prepared piece of at most ``rows`` requests that ``accept`` takes, with
        its jobs, taken out of this batch; else None. When the pieces are all larger than
        ``rows``, the next piece prepared is of ``rows`` studies: a running batch's last free
        rows fill too."""
        with self._lock:
            if self._closed or self._engine is None:
                return None
            offset = 0  # the piece's first job in self.jobs
            for index, piece in enumerate(self._pieces):
                size = len(piece.requests)
                if size <= rows and accept(piece):
                    del self._pieces[index]
                    jobs = self.jobs[offset : offset + size]
                    del self.jobs[offset : offset + size]
                    for job in jobs:
                        if job.job_id in self.claimed:
                            self.claimed.remove(job.job_id)
                    return piece, jobs
                offset += size
            if 0 < rows < self._piece:
                self._wanted = rows
            return None

    def coming(self) -> bool:
        """Studies are rendering or waiting for a piece, or pieces are prepared, or studies
        were claimed a moment ago (``CLAIMED_RECENTLY_S``): a running batch that holds its
        decode for them (inference/decode_joins.py) is told so, and from now the studies left
        when nothing renders make a piece of their own."""
        with self._lock:
            if self._closed or self._engine is None:
                return False
            self._held = now = time.monotonic()
            in_flight = self._renders or self._waiting or self._preparing or self._pieces
            return bool(in_flight) or now - self._claimed_at < CLAIMED_RECENTLY_S

    def add(self, renders: list[Render]) -> None:
        if renders:
            self._claimed_at = time.monotonic()
        now = time.time()
        for source, future in renders:
            self._times[source.job_id] = {"submitted": now}
            future.add_done_callback(_stamp_rendered(self._times[source.job_id]))
        self._renders.extend(renders)

    def harvest(self) -> None:
        """Question the studies rendered so far; prepare whole pieces of them."""
        done: list[Render] = []
        running: list[Render] = []
        for render in self._renders:
            (done if render[1].done() else running).append(render)
        if done:
            self._questioned(done)
        self._renders = running  # after: a study being asked is still on its way (coming)
        if self._wanted > len(self._waiting) and not self._renders:
            self._unprepare_last()  # no study is on its way to make the wanted piece
        held = time.monotonic() - self._held < HELD_S
        if held and not self._renders and 0 < len(self._waiting) < self._piece:
            self._wanted = self._wanted or len(self._waiting)  # a held batch waits for them
        while len(self._waiting) >= (size := self._wanted or self._piece):
            self._wanted = 0
            self._prepare_piece(size)

    def _unprepare_last(self) -> None:
        """The last prepared piece's studies back at the head of those waiting (``jobs``
        keeps its order: they are the last of the pieces' jobs)."""
        with self._lock:
            if not self._pieces:
                return
            size = len(self._pieces.pop().requests)
            end = len(self.jobs) - len(self._waiting)
            self._waiting = self.jobs[end - size : end] + self._waiting

    def finish(self, stamps: dict[str, float]) -> PreparedBatch | None:
        """Build each remaining study as its render ends, prepare the rest and join: the
        batch's inputs, or None when they are to be prepared whole (stamps: rendered, when
        the last render ended; asked; built)."""
        while self._renders:  # each study built as its render ends, not after the last
            futures = [future for _, future in self._renders]
            if len(wait(futures, return_when=FIRST_COMPLETED).done) == len(futures):
                stamps["rendered"] = time.time()
            self.harvest()
        stamps.setdefault("rendered", time.time())
        stamps["asked"] = time.time()
        with self._lock:
            self._closed = True
        if self._waiting:
            self._prepare_piece(len(self._waiting))
        if self._engine is None or not self._pieces:
            return None
        try:
            joined = self._engine.join(self._pieces)
        except InferenceError:
            log.warning(
                "joining the prepared pieces failed; preparing the batch whole", exc_info=True
            )
            self._engine = None
            return None
        stamps["built"] = time.time()
        return joined

    def _questioned(self, done: list[Render]) -> None:
        rendered: list[Rendered] = []
        for source, future in done:
            try:
                result = future.result()
                rendered.append((source, take_study(result), result.seconds))
            except PreprocessError as exc:
                self._fail(source.job_id, PermanentJobError(str(exc)))
            except Exception as exc:  # a process that died fails the job: it is retried
                self._fail(source.job_id, exc)
        jobs = self._ask(rendered)
        asked = time.time()
        for job in jobs:
            job.stamps.update(self._times.pop(job.job_id, {}), asked=asked)
        with self._lock:
            self.jobs.extend(jobs)
        self._waiting.extend(jobs)

    def _prepare_piece(self, size: int) -> None:
        piece, self._waiting = self._waiting[:size], self._waiting[size:]
        if self._engine is None:
            return
        self._preparing = True
        try:
            prepared = self._engine.prepare([self._request(job) for job in piece])
        except Exception:
            # The whole batch is prepared again at the handoff, where the usual handling of
            # its errors (halving on OutOfMemory, failing the jobs) applies.
            log.warning("preparing part of the next batch failed", exc_info=True)
            with self._lock:
                self._engine, self._pieces, self._preparing = None, [], False
            return
        ready = time.time()
        for job in piece:
            job.stamps["ready"] = ready
        with self._lock:
            self._pieces.append(prepared)
            self._preparing = False


class PieceFeed:
    """The worker's ``JoinFeed`` (inference/engine.py): the pieces of the batch being built,
    while it is built, and the jobs the running batch has taken from it."""

    def __init__(self, on_closing: Callable[[float], None] | None = None) -> None:
        self._build: PiecewiseBuild | None = None
        self._on_closing = on_closing  # the running batch's end, in seconds from now
        self.jobs: list[PreparedJob] = []
        self.taking = False  # the running batch may take pieces and has not said it closes
        self._starting = False  # a build has been started and claims its first studies

    def batch_starts(self, free_rows: bool) -> None:
        """A batch is about to run; with ``free_rows`` it may take pieces (inference/
        decode_joins.py), so the batch built meanwhile keeps claiming what replaces the
        pieces taken from the start, as after a take. Its first ask comes only after its own
        prompt pass (about a second for 48 rows on an H200), by when a build complete at once
        had stopped claiming: each piece taken then left the next batch that much short."""
        self.taking = free_rows

    def starting(self, build: Callable[[], T]) -> Callable[[], T]:
        """``build``, to start now in another thread: until it offers a build (or ends),
        studies count as coming. The running batch reaches its first step while that build
        still claims (a write that can wait for SQLite's lock under a burst's C-STOREs);
        asked then, a feed with no build offered said nothing was coming, and the first
        batch of a burst did not hold."""
        self._starting = True

        def run() -> T:
            try:
                return build()
            finally:
                self._starting = False

        return run

    @contextlib.contextmanager
    def offering(self, build: PiecewiseBuild | None) -> Iterator[None]:
        """Offer the pieces of ``build`` (None: none) while the block runs."""
        self._build = build
        self._starting = False
        try:
            yield
        finally:
            self._build = None

    def take(self, rows: int, accept: Callable[[PreparedBatch], bool]) -> PreparedBatch | None:
        self.taking = True
        build = self._build
        taken = build.take_piece(rows, accept) if build is not None else None
        if taken is None:
            return None
        piece, jobs = taken
        joined = time.time()
        for job in jobs:
            job.stamps["joined"] = joined
        self.jobs.extend(jobs)
        return piece

    def coming(self) -> bool:
        build = self._build
        return build.coming() if build is not None else self._starting

    def closing(self, seconds: float) -> None:
        self.taking = False
        if self._on_closing is not None:
            self._on_closing(seconds)

    def end(self) -> list[PreparedJob]:
        """The jobs taken since the last call: they belong to the batch that ran."""
        jobs, self.jobs, self.taking = self.jobs, [], False
        return jobs
