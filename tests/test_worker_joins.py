"""Studies that come due while a batch decodes join it (inference/decode_joins.py), through
the whole worker: render process, the next batch built in pieces, the transformers engine with
the fast decode loop (its eager step on the CPU, the tiny demo model), a real database
(SQLite and PostgreSQL). The first decode step is held until the next batch has prepared its
pieces, so the join happens at a known point."""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from config.settings import ModelSettings, NodeSettings
from inference import decode_joins
from inference.demo_model import write_demo_model
from inference.engine import GenerationResult, JoinFeed, PreparedBatch
from inference.fast_buffers import DecodeState
from inference.fast_decode import FastGreedyGenerator
from inference.transformers_engine import TransformersEngine
from inference.worker import InferenceWorker
from peers.net import wait_for
from storage.db import Database
from storage.models import Job, JobStatus, Report
from tests.test_worker import make_settings, queue_studies


def held_engine(
    directory: Path, settings: ModelSettings, release: threading.Event
) -> tuple[TransformersEngine, threading.Event]:
    """The demo engine with the fast loop attached; its first decode step waits for
    ``release``. Returns it and the event set when that step is reached."""
    engine, generator = demo_engine(directory, settings)
    reached = threading.Event()
    step = generator._run_step

    def first_step_held(state: DecodeState) -> None:
        reached.set()
        release.wait(60)
        step(state)

    generator._run_step = first_step_held  # type: ignore[method-assign]
    return engine, reached


def demo_engine(
    directory: Path, settings: ModelSettings
) -> tuple[TransformersEngine, FastGreedyGenerator]:
    """The demo engine with the fast loop attached (four rows), and that loop."""
    write_demo_model(directory)
    engine = TransformersEngine(settings, weights_dir=directory)
    generator = FastGreedyGenerator(engine.model, max_batch=4, max_total_len=2048)
    engine.attach_fast_generator(generator)
    return engine, generator


def held_burst(
    tmp_path: Path, db: Database, rg1_unci: Path, studies: int
) -> tuple[list[int], list[int], list[int]]:
    """A burst's first study decodes, its first step held, while ``studies`` more come due and
    the batch being built prepares them all (pieces of one: max_batch 4); then the step goes
    on. Returns what the first ``run_once`` and then a second one finished, and the job ids
    of the first study and of the later ones."""
    settings = make_settings(tmp_path, db.url, max_batch=4, max_new_tokens=16)
    release = threading.Event()
    engine, reached = held_engine(tmp_path / "demo", settings.model, release)
    prepared = lambda worker: len(getattr(worker._feed._build, "_pieces", [])) == studies  # noqa: E731
    return run_held(tmp_path, db, rg1_unci, settings, engine, (reached, release), studies, prepared)


@contextlib.contextmanager
def running_once(
    db: Database, settings: NodeSettings, engine: TransformersEngine, *holds: threading.Event
) -> Iterator[tuple[InferenceWorker, list[int], threading.Thread]]:
    """A worker with its render process ready and a thread running its ``run_once``, which
    appends what it finished to the list yielded; on the way out the ``holds`` the engine may
    wait on are released before the worker stops."""
    worker = InferenceWorker(db, settings, lambda: engine, None, render_processes=1)
    worker.start_pools()
    finished: list[int] = []
    running = threading.Thread(target=lambda: finished.append(worker.run_once()))
    try:
        wait_for(lambda: worker.pools_ready, 120, message="render process")
        running.start()
        yield worker, finished, running
    finally:
        for hold in holds:
            hold.set()
        worker.stop()


def run_held(
    tmp_path: Path,
    db: Database,
    rg1_unci: Path,
    settings: NodeSettings,
    engine: TransformersEngine,
    held: tuple[threading.Event, threading.Event],
    studies: int,
    ready: Callable[[InferenceWorker], bool],
) -> tuple[list[int], list[int], list[int]]:
    """One study queued and run; once the engine has reached the point it holds at
    (``held``: reached, release), ``studies`` more are queued and, when ``ready`` says so,
    the engine goes on. Returns what the first ``run_once`` and then a second one finished,
    and the job ids of the first study and of the later ones."""
    (reached, release), data_dir = held, settings.storage.data_dir
    first = queue_studies(db, data_dir, rg1_unci, tmp_path / "in", 1)
    with running_once(db, settings, engine, release) as (worker, finished, running):
        wait_for(reached.is_set, 60, message="the first study's batch held")
        later = queue_studies(db, data_dir, rg1_unci, tmp_path / "in", studies)
        wait_for(lambda: ready(worker), 60, message="the next batch's studies")
        release.set()
        running.join(60)
        finished.append(worker.run_once())
    return finished, first, later


def test_studies_due_meanwhile_join_the_running_batch(
    tmp_path: Path, db: Database, rg1_unci: Path
) -> None:
    finished, first, later = held_burst(tmp_path, db, rg1_unci, 2)
    assert finished == [3, 0]  # one batch: the first study and the two that joined it
    with db.session() as session:
        statuses = session.scalars(select(Job.status).where(Job.id.in_(first + later))).all()
        reports = session.scalars(select(Report).order_by(Report.job_id)).all()
    assert statuses == [JobStatus.DONE] * 3
    # Copies of one image with one question: the same answer, also for the rows that joined
    # (their prompt KV placed at the column the batch had reached), and one batch's stamps.
    assert len({r.raw_text for r in reports}) == 1 and reports[0].raw_text
    started = {r.timings_json["batch_stamps"]["generate_started"] for r in reports}
    assert len(started) == 1


def test_a_complete_next_batch_still_hands_its_pieces_to_the_running_one(
    tmp_path: Path, db: Database, rg1_unci: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The batch being built is complete (4 of max_batch 4) before the running batch asks: it
    keeps offering its pieces while that batch takes rows, and the three that fit join in one
    prompt pass; the study left runs next."""
    with caplog.at_level("INFO", logger="inference.decode_joins"):
        finished, first, later = held_burst(tmp_path, db, rg1_unci, 4)
    assert finished == [4, 1]  # the first study and three that joined; then the last one
    assert "3 joined in 1 groups" in caplog.text
    with db.session() as session:
        statuses = session.scalars(select(Job.status).where(Job.id.in_(first + later))).all()
    assert statuses == [JobStatus.DONE] * 5


@pytest.fixture
def long_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hold that no slow render or claim on a test machine ends early."""
    monkeypatch.setattr(decode_joins, "HOLD_S", 60.0)
    monkeypatch.setattr(decode_joins, "HOLD_GAP_S", 30.0)


def test_the_first_batch_of_a_burst_holds_its_first_step_for_the_studies_on_their_way(
    tmp_path: Path, db: Database, rg1_unci: Path, caplog: pytest.LogCaptureFixture, long_hold: None
) -> None:
    """The first study's batch starts while three more are claimed and rendering: it takes
    them in before its first decode step (they join at step 0) and runs no step more than a
    batch started with all four would."""
    settings = make_settings(tmp_path, db.url, max_batch=4, max_new_tokens=16)
    engine, _ = demo_engine(tmp_path / "demo", settings.model)
    reached, release = threading.Event(), threading.Event()
    joining = engine.generate_joining

    def started_once_claimed(batch: PreparedBatch, feed: JoinFeed) -> list[GenerationResult]:
        reached.set()
        release.wait(60)
        return joining(batch, feed)

    engine.generate_joining = started_once_claimed  # type: ignore[method-assign]
    claimed = lambda worker: len(getattr(worker._feed._build, "claimed", [])) == 3  # noqa: E731
    with caplog.at_level("INFO", logger="inference.decode_joins"):
        finished, first, later = run_held(
            tmp_path, db, rg1_unci, settings, engine, (reached, release), 3, claimed
        )
    assert finished == [4, 0]
    held = r"batch held [0-9.]+ s for 4 rows, from [0-9.]+ s after it began: [1-3] takes of rows"
    assert re.search(held, caplog.text)
    assert_three_joined_at_step_zero(caplog.text, db, first + later)


def test_the_first_batch_holds_while_the_batch_after_it_still_claims(
    tmp_path: Path,
    db: Database,
    rg1_unci: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    long_hold: None,
) -> None:
    """The first study's batch asks whether studies are coming before the build started for
    the next batch has claimed anything (its claim waits, as for SQLite's lock under a
    burst): it holds, and the three studies that build then claims join at step 0."""
    settings = make_settings(tmp_path, db.url, max_batch=4, max_new_tokens=16)
    data_dir = settings.storage.data_dir
    engine, _ = demo_engine(tmp_path / "demo", settings.model)
    first = queue_studies(db, data_dir, rg1_unci, tmp_path / "in", 1)
    worker = InferenceWorker(db, settings, lambda: engine, None, render_processes=1)
    asked, later = threading.Event(), list[int]()
    feed_coming, claim = worker._feed.coming, worker._claim

    def coming() -> bool:
        asked.set()
        return feed_coming()

    def claim_once_asked(limit: int, like: int | None = None) -> list[int]:
        if threading.current_thread() is not main and not later:
            asked.wait(60)  # the build's first claim: the running batch has asked by now
            later.extend(queue_studies(db, data_dir, rg1_unci, tmp_path / "in", 3))
        return claim(limit, like)

    main = threading.current_thread()
    monkeypatch.setattr(worker._feed, "coming", coming)
    monkeypatch.setattr(worker, "_claim", claim_once_asked)
    worker.start_pools()
    try:
        wait_for(lambda: worker.pools_ready, 120, message="render process")
        with caplog.at_level("INFO", logger="inference.decode_joins"):
            finished = [worker.run_once(), worker.run_once()]
    finally:
        worker.stop()
    assert asked.is_set() and finished == [4, 0]
    assert_three_joined_at_step_zero(caplog.text, db, first + later)


def assert_three_joined_at_step_zero(log_text: str, db: Database, jobs: list[int]) -> None:
    """Three studies joined the first one's batch at step 0, however their renders came
    (together or one by one: one to three takes), and the four jobs are done."""
    assert re.search(r"3 joined in [1-3] groups, the last at step 0; 16 steps", log_text)
    with db.session() as session:
        statuses = session.scalars(select(Job.status).where(Job.id.in_(jobs))).all()
    assert statuses == [JobStatus.DONE] * 4


def test_a_batch_that_starts_short_has_the_rows_it_takes_claimed_again_behind_it(
    tmp_path: Path, db: Database, rg1_unci: Path, long_hold: None
) -> None:
    """Three studies run as a batch of max_batch 4; meanwhile six more come due and the batch
    being built claims four of them, complete, before the running batch first asks (after
    its own prompt pass). The running batch takes one before its first step, and the build
    claims another in its place (PieceFeed.batch_starts), so the next batch starts full:
    4, 4, then 1. Before, a complete build stopped claiming: 4, 3, 2."""
    settings = make_settings(tmp_path, db.url, max_batch=4, max_new_tokens=16)
    data_dir = settings.storage.data_dir
    engine, generator = demo_engine(tmp_path / "demo", settings.model)
    began, go, stepped, step_on = (threading.Event() for _ in range(4))
    joining, step = engine.generate_joining, generator._run_step

    def held_joining(batch: PreparedBatch, feed: JoinFeed) -> list[GenerationResult]:
        began.set()
        go.wait(60)
        return joining(batch, feed)

    def held_step(state: DecodeState) -> None:
        stepped.set()
        step_on.wait(60)
        step(state)

    engine.generate_joining = held_joining  # type: ignore[method-assign]
    generator._run_step = held_step  # type: ignore[method-assign]
    queue_studies(db, data_dir, rg1_unci, tmp_path / "in", 3)
    with running_once(db, settings, engine, go, step_on) as (worker, finished, running):
        claimed = lambda: len(getattr(worker._feed._build, "claimed", []))  # noqa: E731
        prepared = lambda: bool(getattr(worker._feed._build, "_pieces", []))  # noqa: E731
        wait_for(began.is_set, 60, message="the batch of three")
        queue_studies(db, data_dir, rg1_unci, tmp_path / "in", 6)
        wait_for(lambda: claimed() == 4 and prepared(), 60, message="the next batch complete")
        go.set()
        wait_for(stepped.is_set, 60, message="the batch's first step, its hold over")
        assert len(worker._feed.jobs) == 1  # it took one study in its hold
        wait_for(lambda: claimed() == 4, 60, message="a study claimed in place of the one taken")
        step_on.set()
        running.join(60)
        finished += [worker.run_once(), worker.run_once()]
    assert finished == [4, 4, 1]
