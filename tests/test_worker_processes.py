"""The inference worker with its render and store processes (inference/render_pool.py,
inference/report_store.py), on a real database (SQLite and PostgreSQL) and real files.

The scripted engine (a test double for MedGemma) answers; reading and rendering the DICOM
files and storing each report with its SR, GSPS, ORU, JSON and outbox rows happen in spawned
processes, as `serve` runs them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from sqlalchemy import select

from config.settings import FileDestination
from inference.engine import GenerationRequest, JoiningEngine, PreparedBatch, SquareInputEngine
from inference.preprocess import prepare_study
from inference.render_pool import (
    FILE_PREFIX,
    RenderPool,
    remove_orphans,
    shared_dir,
    take_study,
)
from inference.scripted_engine import ScriptedEngine
from inference.worker import InferenceWorker
from medgemma_node.outputs import ReportOutputs
from peers.net import wait_for
from storage.db import Database
from storage.files import uid_component
from storage.ingest import close_quiet_studies
from storage.models import Job, JobStatus, OutboxItem, Report, ReportObject
from tests.test_worker import (
    CHEST_ANSWER,
    TwoStepScripted,
    ingest_copy,
    make_settings,
    queue_studies,
)


def test_reports_and_outputs_are_stored_by_the_processes(
    tmp_path: Path, db: Database, rg1_unci: Path
) -> None:
    settings = make_settings(tmp_path, db.url, max_batch=4)
    settings.destinations = [
        FileDestination(name="files", kind="file", directory=tmp_path / "delivered")
    ]
    data_dir = settings.storage.data_dir
    good = ingest_copy(db, data_dir, rg1_unci, tmp_path / "in")
    bad = ingest_copy(db, data_dir, rg1_unci, tmp_path / "in")
    for path in data_dir.glob(f"instances/{uid_component(bad)}/**/*.dcm"):
        dataset = pydicom.dcmread(path)
        del dataset.PixelData
        dataset.save_as(path)
    close_quiet_studies(db, lambda _modality, _ae: 0.0)
    engine = ScriptedEngine(texts=[CHEST_ANSWER])
    worker = InferenceWorker(
        db,
        settings,
        lambda: engine,
        ReportOutputs(settings),
        render_processes=1,
        store_processes=1,
    )
    worker.start_pools()
    try:
        wait_for(lambda: worker.pools_ready, 120, message="render and store processes")
        assert worker.run_once() == 2
    finally:
        worker.close_pools()  # waits for the report being stored
    with db.session() as session:
        jobs = {
            job.study_version.study.study_instance_uid: job for job in session.scalars(select(Job))
        }
        report = session.scalars(select(Report)).one()
        kinds = sorted(obj.kind for obj in session.scalars(select(ReportObject)))
        outbox = session.scalars(select(OutboxItem)).all()
        statuses = {uid: (job.status, job.attempts, job.last_error) for uid, job in jobs.items()}
    assert statuses[good][0] == JobStatus.DONE
    status, attempts, error = statuses[bad]
    # The render process's PreprocessError fails the job at once, as in the worker's thread.
    assert status == JobStatus.FAILED and attempts == 1 and "pixel" in (error or "").lower()
    assert report.parse_status == "ok" and report.content_json["findings"][0]["region"]
    assert report.timings_json["preprocess_seconds"] > 0
    assert "outputs_seconds" in report.timings_json and "prepare_seconds" in report.timings_json
    assert report.timings_json["store_wait_seconds"] >= 0
    # The outputs were built before the transaction, which held the write lock for rows only.
    assert report.timings_json["store_held_seconds"] < report.timings_json["outputs_seconds"]
    stamps = report.timings_json["batch_stamps"]
    stages = ["claimed", "sources", "rendered", "asked", "built", "run_started", "stores_below"]
    stages += ["generate_started"]
    times = [stamps[stage] for stage in [*stages, "generate_ended"]]
    assert times == sorted(times), stamps
    # Every image came back from its shared-memory file, and the file is gone.
    assert not list(shared_dir().glob(f"{FILE_PREFIX}{os.getpid()}-*"))
    assert kinds == ["gsps", "sr"]
    assert [(row.destination, row.payload_path.endswith("report.json")) for row in outbox] == [
        ("files", True)
    ]
    assert worker.stats.jobs_done == 1 and worker.stats.jobs_failed == 1


def run_two_batches(
    tmp_path: Path,
    db: Database,
    rg1_unci: Path,
    engine: TwoStepScripted,
    meanwhile: Callable[[Callable[[int], list[int]]], list[int]],
) -> None:
    """A burst's first study runs alone, held, while ``meanwhile`` queues more studies
    (through the function it is given: count -> job ids) and waits for what it tests; then
    the first batch ends and the next one runs. Every study's job ends done."""
    settings = make_settings(tmp_path, db.url, max_batch=4)
    data_dir, work = settings.storage.data_dir, tmp_path / "in"
    first = queue_studies(db, data_dir, rg1_unci, work, 1)
    worker = InferenceWorker(db, settings, lambda: engine, None, render_processes=1)
    worker.start_pools()
    running = threading.Thread(target=worker.run_once)
    assert engine.hold is not None
    try:
        wait_for(lambda: worker.pools_ready, 120, message="render processes")
        running.start()
        wait_for(lambda: engine.steps, 30, message="the first batch generating")
        later = meanwhile(lambda count: queue_studies(db, data_dir, rg1_unci, work, count))
        wait_for(lambda: claimed(db, later), 30, message="the next batch taking the studies")
        engine.hold.set()
        running.join(30)
        assert worker.run_once() == len(later)
    finally:
        engine.hold.set()
        worker.stop()
    with db.session() as session:
        done = session.scalars(select(Job.id).where(Job.status == JobStatus.DONE))
        assert sorted(done) == sorted(first + later)


def test_the_next_batch_takes_studies_that_come_due_while_the_current_one_runs(
    tmp_path: Path, db: Database, rg1_unci: Path
) -> None:
    """A burst's first study runs alone; the studies that come due while it generates fill
    the next batch (rendered as they are claimed), which runs as soon as the first ends."""
    engine = TwoStepScripted(responder=lambda _r: CHEST_ANSWER, hold=threading.Event())
    run_two_batches(tmp_path, db, rg1_unci, engine, lambda queue: queue(3))
    steps = [(name, size) for name, size, _ in engine.steps]
    assert steps == [
        ("generate start", 1),
        ("generate end", 1),
        ("prepare", 3),
        ("generate_prepared start", 3),
        ("generate_prepared end", 3),
    ]
    with db.session() as session:
        stamps = [r.timings_json["batch_stamps"] for r in session.scalars(select(Report))]
    # The second batch kept taking studies after its first claim, stopped growing when the
    # first batch ended, and started after that.
    topped = [s for s in stamps if "topped_up" in s]
    assert len(topped) == 3 and all(s["topped_up"] < s["generate_started"] for s in topped)


@dataclass
class JoiningScripted(TwoStepScripted):
    """TwoStepScripted that also joins prepared pieces (a JoiningEngine): ``joined`` holds
    the sizes of the pieces of each join."""

    joined: list[list[int]] = field(default_factory=list)

    def join(self, pieces: list[PreparedBatch]) -> PreparedBatch:
        requests = [request for piece in pieces for request in piece.requests]
        self._step("join", requests)
        self.joined.append([len(piece.requests) for piece in pieces])
        return PreparedBatch(requests, inputs="joined")


def test_the_next_batch_is_prepared_in_pieces_as_its_studies_render(
    tmp_path: Path, db: Database, rg1_unci: Path
) -> None:
    """With an engine that joins, a study that comes due while the batch before generates is
    rendered, questioned and prepared then, not after that batch ends (max_batch 4: pieces
    of one study); the pieces are joined into the batch that runs."""
    engine = JoiningScripted(responder=lambda _r: CHEST_ANSWER, hold=threading.Event())
    assert isinstance(engine, JoiningEngine)

    def meanwhile(queue: Callable[[int], list[int]]) -> list[int]:
        later = queue(1)
        prepared = lambda: any(step[0] == "prepare" for step in engine.steps)  # noqa: E731
        wait_for(prepared, 60, message="the piece prepared while the first batch runs")
        return later + queue(2)

    run_two_batches(tmp_path, db, rg1_unci, engine, meanwhile)
    steps = [(name, size) for name, size, _ in engine.steps]
    assert steps[0] == ("generate start", 1)
    assert steps.index(("prepare", 1)) < steps.index(("generate end", 1))
    assert [step for step in steps if step[0] == "prepare"] == [("prepare", 1)] * 3
    assert engine.joined == [[1, 1, 1]]
    assert steps[-3:] == [
        ("join", 3),
        ("generate_prepared start", 3),
        ("generate_prepared end", 3),
    ]


def claimed(db: Database, job_ids: list[int]) -> bool:
    with db.session() as session:
        statuses = session.scalars(select(Job.status).where(Job.id.in_(job_ids))).all()
    return len(statuses) == len(job_ids) and all(s == JobStatus.RUNNING for s in statuses)


def test_rendered_images_come_back_whole_through_shared_files(rg1_unci: Path) -> None:
    pool = RenderPool(1)
    pool.warm_up()
    try:
        wait_for(lambda: pool.ready, 120, message="render process")
        rendered = pool.submit([rg1_unci]).result(timeout=120)
        assert rendered.prepared.images == [] and [s.path.exists() for s in rendered.images] == [
            True
        ]
        study = take_study(rendered)
    finally:
        pool.close()
    here = prepare_study([rg1_unci])
    assert [image.size for image in study.images] == [image.size for image in here.images]
    assert np.array_equal(np.asarray(study.images[0]), np.asarray(here.images[0]))
    assert study.geometries == here.geometries and study.sop_instance_uids == here.sop_instance_uids
    assert not rendered.images[0].path.exists()


def test_shared_files_of_a_worker_that_ended_are_removed(tmp_path: Path) -> None:
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    orphan = shared_dir() / f"{FILE_PREFIX}{ended.pid}-{uuid.uuid4().hex}"
    ours = shared_dir() / f"{FILE_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
    orphan.write_bytes(b"x")
    ours.write_bytes(b"x")
    try:
        assert remove_orphans() >= 1
        assert not orphan.exists() and ours.exists()  # this process still runs
        assert remove_orphans(owner_pid=os.getpid()) >= 1 and not ours.exists()
    finally:
        orphan.unlink(missing_ok=True)
        ours.unlink(missing_ok=True)


@dataclass
class SquareScripted(JoiningScripted):
    """JoiningScripted whose model takes 64 x 64 images (a SquareInputEngine)."""

    def image_side(self) -> int | None:
        return 64


def test_studies_are_rendered_at_the_engines_input_side(
    tmp_path: Path, db: Database, rg1_unci: Path
) -> None:
    """The render processes shrink each study to the side the engine's processor resizes to,
    and each study's own way to the GPU is in its report's timings."""
    sizes: list[tuple[int, int]] = []

    def answer(request: GenerationRequest) -> str:
        sizes.extend(image.size for image in request.images)
        return CHEST_ANSWER

    engine = SquareScripted(responder=answer, hold=threading.Event())
    assert isinstance(engine, SquareInputEngine)
    run_two_batches(tmp_path, db, rg1_unci, engine, lambda queue: queue(2))
    assert sizes == [(64, 64)] * 3
    with db.session() as session:
        timings = [r.timings_json for r in session.scalars(select(Report))]
    ways = [t["study_stamps"] for t in timings]
    # The two studies built ahead were prepared in pieces; the first ran as it was claimed.
    assert sorted("ready" in way for way in ways) == [False, True, True]
    for way in ways:
        times = [
            way[stage] for stage in ("submitted", "rendered", "asked", "ready") if stage in way
        ]
        assert len(times) >= 3 and times == sorted(times)
    assert all(t["source_sop_instance_uids"] for t in timings)
