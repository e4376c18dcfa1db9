"""Studies that come due while a batch decodes join it (inference/decode_joins.py), through
the whole worker: render process, the next batch built in pieces, the transformers engine with
the fast decode loop (its eager step on the CPU, the tiny demo model), a real database
(SQLite and PostgreSQL). The first decode step is held until the next batch has prepared its
pieces, so the join happens at a known point."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import select

from config.settings import ModelSettings
from inference.demo_model import write_demo_model
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
    write_demo_model(directory)
    engine = TransformersEngine(settings, weights_dir=directory)
    generator = FastGreedyGenerator(engine.model, max_batch=4, max_total_len=2048)
    reached = threading.Event()
    step = generator._run_step

    def first_step_held(state: DecodeState) -> None:
        reached.set()
        release.wait(60)
        step(state)

    generator._run_step = first_step_held  # type: ignore[method-assign]
    engine.attach_fast_generator(generator)
    return engine, reached


def held_burst(
    tmp_path: Path, db: Database, rg1_unci: Path, studies: int
) -> tuple[list[int], list[int], list[int]]:
    """A burst's first study decodes, its first step held, while ``studies`` more come due and
    the batch being built prepares them all (pieces of one: max_batch 4); then the step goes
    on. Returns what the first ``run_once`` and then a second one finished, and the job ids
    of the first study and of the later ones."""
    settings = make_settings(tmp_path, db.url, max_batch=4, max_new_tokens=16)
    data_dir, work = settings.storage.data_dir, tmp_path / "in"
    release = threading.Event()
    engine, reached = held_engine(tmp_path / "demo", settings.model, release)
    first = queue_studies(db, data_dir, rg1_unci, work, 1)
    worker = InferenceWorker(db, settings, lambda: engine, None, render_processes=1)
    worker.start_pools()
    finished: list[int] = []
    running = threading.Thread(target=lambda: finished.append(worker.run_once()))
    try:
        wait_for(lambda: worker.pools_ready, 120, message="render process")
        running.start()
        wait_for(reached.is_set, 60, message="the first study decoding")
        later = queue_studies(db, data_dir, rg1_unci, work, studies)
        prepared = lambda: len(getattr(worker._feed._build, "_pieces", [])) == studies  # noqa: E731
        wait_for(prepared, 60, message="the next batch's pieces prepared")
        release.set()
        running.join(60)
        finished.append(worker.run_once())
    finally:
        release.set()
        worker.stop()
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
