"""The inference worker on a real database and real files (SQLite and PostgreSQL).

The tiny demo model goes through the real transformers loading and batched generate path (its
text is gibberish, so only the narrative-only path and the identity are checked); the scripted
engine (a test double) drives content, failures and out-of-memory splitting. Pipelining (the
next batch claimed and prepared while the current one generates) is checked with the demo
model and with a scripted engine that offers the two-step API and records when each step runs.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
import torch
from sqlalchemy import select

from config.settings import NodeSettings, load_settings
from inference import worker_jobs
from inference.demo_model import write_demo_model
from inference.engine import (
    Engine,
    GenerationRequest,
    GenerationResult,
    PreparedBatch,
    PreparingEngine,
)
from inference.scripted_engine import ScriptedEngine
from inference.transformers_engine import TransformersEngine
from inference.worker import InferenceWorker
from medgemma_node.outputs import ReportOutputs
from peers.dicom_files import copy_with_new_uids
from peers.local_ingest import store_received
from storage.db import Database
from storage.files import uid_component
from storage.ingest import close_quiet_studies
from storage.jobs import release_jobs
from storage.models import Job, JobStatus, OutboxItem, Report, ReportObject, Study
from storage.report_schema import ParseStatus

CHEST_ANSWER = json.dumps(
    {
        "findings": [
            {
                "label": "nodule",
                "location": "right upper lobe",
                "size_mm": 12,
                "box_2d": [200, 150, 300, 260],
            }
        ],
        "impression": "Solitary right upper lobe nodule.",
        "recommendation": "CT chest in 3 months.",
        "urgency": "urgent",
    }
)


def make_settings(tmp_path: Path, db_url: str, **model: object) -> NodeSettings:
    settings = load_settings()
    settings.storage.data_dir = tmp_path / "data"
    settings.storage.database_url = db_url
    # Studies are queued complete here; tests/test_early_start.py runs them early.
    defaults = {"batch_wait_ms": 0, "retry_backoff_s": 0.0, "max_new_tokens": 8}
    settings.model = settings.model.model_copy(update={**defaults, "early_start": False, **model})
    settings.destinations = []
    return settings


def ingest_copy(
    db: Database, data_dir: Path, source: Path, work: Path, **attributes: object
) -> str:
    """Store a copy of a real image as a new study, the way the SCP does; return its UID."""
    copy = copy_with_new_uids(source, work / f"{pydicom.uid.generate_uid()}.dcm", **attributes)
    return ingest_file(db, data_dir, copy)


def ingest_file(db: Database, data_dir: Path, copy: Path) -> str:
    """Store an image file the way the SCP does; return its Study Instance UID."""
    return store_received(db, data_dir, copy, calling_ae="MODALITY", patient_hash="x")[0]


def ingest_without_pixels(db: Database, data_dir: Path, source: Path, work: Path) -> str:
    """A study received whose image has no Pixel Data (it cannot be rendered); its UID."""
    study_uid = ingest_copy(db, data_dir, source, work)
    for path in data_dir.glob(f"instances/{uid_component(study_uid)}/**/*.dcm"):
        dataset = pydicom.dcmread(path)
        del dataset.PixelData
        dataset.save_as(path)
    return study_uid


def queue_studies(db: Database, data_dir: Path, source: Path, work: Path, count: int) -> list[int]:
    for _ in range(count):
        ingest_copy(db, data_dir, source, work)
    return close_quiet_studies(db, lambda _modality, _ae: 0.0)


def test_demo_model_batch_of_two_through_real_loading_path(
    tmp_path: Path, db: Database, rg1_unci: Path
) -> None:
    settings = make_settings(tmp_path, db.url, max_batch=2)
    job_ids = queue_studies(db, settings.storage.data_dir, rg1_unci, tmp_path / "in", 2)
    write_demo_model(tmp_path / "demo")
    engine = TransformersEngine(settings.model, weights_dir=tmp_path / "demo")
    batches: list[int] = []
    original = engine.generate

    def counting(requests: list[GenerationRequest]):  # type: ignore[no-untyped-def]
        batches.append(len(requests))
        return original(requests)

    engine.generate = counting  # type: ignore[method-assign]
    worker = InferenceWorker(db, settings, lambda: engine, ReportOutputs(settings))
    assert worker.run_once() == 2
    assert batches == [2], "both studies must run as one batch"
    with db.session() as session:
        reports = session.scalars(select(Report).order_by(Report.id)).all()
        statuses = {job.status for job in session.scalars(select(Job).where(Job.id.in_(job_ids)))}
    assert len(reports) == 2 and statuses == {JobStatus.DONE}
    for report in reports:
        assert report.parse_status in (ParseStatus.NARRATIVE_ONLY, ParseStatus.EMPTY)
        assert report.content_json["findings"] == []
        assert report.is_test_model
        identity = report.model_json
        assert identity["is_test_model"] is True
        assert identity["dtype"] == "float32" and identity["device"] == "cpu"
        assert (
            "torch" in identity["library_versions"]
            and "transformers" in identity["library_versions"]
        )
        assert 0 < report.timings_json["new_tokens"] <= 8


def test_scripted_answer_becomes_findings_with_pixel_regions_and_sr(
    tmp_path: Path, db: Database, rg1_unci: Path
) -> None:
    settings = make_settings(tmp_path, db.url)
    queue_studies(db, settings.storage.data_dir, rg1_unci, tmp_path / "in", 1)
    engine = ScriptedEngine(texts=[CHEST_ANSWER])
    worker = InferenceWorker(db, settings, lambda: engine, ReportOutputs(settings))
    assert worker.run_once() == 1
    prompt = engine.calls[0][0].prompt
    assert "box_2d" in prompt and "JSON" in prompt
    with db.session() as session:
        report = session.scalars(select(Report)).one()
        kinds = sorted(obj.kind for obj in session.scalars(select(ReportObject)))
    content = report.content_json
    assert report.parse_status == ParseStatus.OK and report.urgency == "urgent"
    [finding] = content["findings"]
    assert finding["label"] == "nodule" and finding["size_mm"] == 12
    region = finding["region"]
    # RG1_UNCI is 1841 columns x 1955 rows: padded to a 1955 square, 57 columns each side.
    side, column_offset = 1955, (1955 - 1841) // 2
    assert region["y0"] == pytest.approx(0.200 * side, abs=1)
    assert region["x0"] == pytest.approx(0.150 * side - column_offset, abs=1)
    assert region["x1"] == pytest.approx(0.260 * side - column_offset, abs=1)
    assert kinds == ["gsps", "sr"]


def test_job_failing_three_times_ends_failed_with_traceback(
    tmp_path: Path, db: Database, rg1_unci: Path
) -> None:
    settings = make_settings(tmp_path, db.url, max_attempts=3)
    [job_id] = queue_studies(db, settings.storage.data_dir, rg1_unci, tmp_path / "in", 1)

    def broken(_request: GenerationRequest) -> str:
        raise RuntimeError("model exploded")

    worker = InferenceWorker(db, settings, lambda: ScriptedEngine(responder=broken), None)
    for attempt in range(1, 4):
        assert worker.run_once() == 1, f"attempt {attempt} should claim the job"
    assert worker.run_once() == 0
    with db.session() as session:
        job = session.get_one(Job, job_id)
    assert job.status == JobStatus.FAILED and job.attempts == 3
    assert job.last_error == "RuntimeError: model exploded"
    assert job.last_traceback is not None and "model exploded" in job.last_traceback
    assert "Traceback" in job.last_traceback


def test_out_of_memory_halves_the_batch(tmp_path: Path, db: Database, rg1_unci: Path) -> None:
    settings = make_settings(tmp_path, db.url, max_batch=4)
    queue_studies(db, settings.storage.data_dir, rg1_unci, tmp_path / "in", 4)
    engine = ScriptedEngine(responder=lambda _r: CHEST_ANSWER, oom_above=1)
    worker = InferenceWorker(db, settings, lambda: engine, None)
    assert worker.run_once() == 4
    assert [len(call) for call in engine.calls] == [4, 2, 1, 1, 2, 1, 1]
    with db.session() as session:
        assert session.scalars(select(Job.status)).all() == [JobStatus.DONE] * 4


def test_study_without_pixel_data_fails_at_once(
    tmp_path: Path, db: Database, rg1_unci: Path
) -> None:
    settings = make_settings(tmp_path, db.url)
    data_dir = settings.storage.data_dir
    study_uid = ingest_without_pixels(db, data_dir, rg1_unci, tmp_path / "in")
    [job_id] = close_quiet_studies(db, lambda _m, _a: 0.0)
    worker = InferenceWorker(db, settings, lambda: ScriptedEngine(texts=[CHEST_ANSWER]), None)
    assert worker.run_once() == 1
    with db.session() as session:
        job = session.get_one(Job, job_id)
    assert job.status == JobStatus.FAILED and job.attempts == 1, study_uid
    assert job.last_error is not None and "pixel" in job.last_error.lower()


def test_no_engine_keeps_jobs_queued(tmp_path: Path, db: Database, rg1_unci: Path) -> None:
    settings = make_settings(tmp_path, db.url)
    [job_id] = queue_studies(db, settings.storage.data_dir, rg1_unci, tmp_path / "in", 1)
    worker = InferenceWorker(db, settings, lambda: None, None)
    assert worker.run_once() == 0
    with db.session() as session:
        assert session.get_one(Job, job_id).status == JobStatus.QUEUED
        assert session.scalars(select(OutboxItem)).all() == []


# --------------------------------------------------------------------------- pipelining

# Other windows, polarity and body parts: other pixels and questions for each study.
VARIANTS: list[dict[str, object]] = [
    {},
    {"WindowCenter": 9000, "WindowWidth": 6000, "BodyPartExamined": "HAND"},
    {"WindowCenter": 20000, "WindowWidth": 12000},
    {"PhotometricInterpretation": "MONOCHROME2"},
    {"WindowCenter": 12000, "WindowWidth": 20000, "BodyPartExamined": "KNEE"},
]


@dataclass
class TwoStepScripted(ScriptedEngine):
    """ScriptedEngine with prepare/generate_prepared; ``steps`` records (step, batch size,
    thread) in order.

    Generation n waits (10 s at most) for prepare call n while n < ``overlapped``, so a worker
    that does not prepare the next batch during the current one fails instead of passing by
    timing; with ``hold`` set every generation also waits for that event.
    """

    overlapped: int = 0
    hold: threading.Event | None = None
    steps: list[tuple[str, int, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.prepared = [threading.Event() for _ in range(self.overlapped)]
        self.generations = 0

    def _step(self, name: str, requests: list[GenerationRequest]) -> None:
        self.steps.append((name, len(requests), threading.current_thread().name))

    def prepare(self, requests: list[GenerationRequest]) -> PreparedBatch:
        index = sum(step[0] == "prepare" for step in self.steps)
        self._step("prepare", requests)
        if index < self.overlapped:
            self.prepared[index].set()
        return PreparedBatch(list(requests), inputs="scripted")

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        return self._generation("generate", requests)

    def generate_prepared(self, batch: PreparedBatch) -> list[GenerationResult]:
        return self._generation("generate_prepared", batch.requests)

    def _generation(self, name: str, requests: list[GenerationRequest]) -> list[GenerationResult]:
        index, self.generations = self.generations, self.generations + 1
        self._step(f"{name} start", requests)
        if index < self.overlapped and not self.prepared[index].wait(10):
            raise AssertionError(f"generation {index} ended before the next batch was prepared")
        if self.hold is not None:
            self.hold.wait(10)
        results = ScriptedEngine.generate(self, requests)
        self._step(f"{name} end", requests)
        return results


class Unprepared:
    """An engine seen through the one-step Engine protocol only: the worker cannot pipeline."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.identity = engine.identity

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        return self.engine.generate(requests)


def queue_variants(db: Database, data_dir: Path, source: Path, work: Path) -> dict[str, int]:
    """One study per VARIANTS entry, queued; study UID -> variant index."""
    uids = {ingest_copy(db, data_dir, source, work, **v): i for i, v in enumerate(VARIANTS)}
    close_quiet_studies(db, lambda _modality, _ae: 0.0)
    return uids


def drain(worker: InferenceWorker) -> list[int]:
    """run_once until nothing is left; the jobs each call finished."""
    finished = []
    while (count := worker.run_once()) > 0:
        finished.append(count)
    return finished


def reports_by_variant(db: Database, uids: dict[str, int]) -> dict[int, tuple[Any, ...]]:
    with db.session() as session:
        rows = session.execute(
            select(Report, Study.study_instance_uid).join(Study, Report.study_id == Study.id)
        ).all()
    return {
        uids[uid]: (
            report.question,
            report.raw_text,
            report.parse_status,
            report.content_json,
            {k: report.timings_json[k] for k in ("batch_size", "prompt_tokens", "new_tokens")},
        )
        for report, uid in rows
        if uid in uids
    }


def test_pipelined_reports_equal_unpipelined_ones_on_the_demo_model(
    tmp_path: Path, db: Database, rg1_unci: Path
) -> None:
    settings = make_settings(tmp_path, db.url, max_batch=2)
    data_dir, work = settings.storage.data_dir, tmp_path / "in"
    write_demo_model(tmp_path / "demo")
    engine = TransformersEngine(settings.model, weights_dir=tmp_path / "demo")
    assert isinstance(engine, PreparingEngine)
    prepared_in: list[str] = []
    calls: list[list[torch.Tensor]] = []  # per batch: input ids, pixels, new token ids
    prepare, generate_ids = engine.prepare, engine._generate_ids

    def recording_prepare(requests: list[GenerationRequest]) -> PreparedBatch:
        prepared_in.append(threading.current_thread().name)
        return prepare(requests)

    def recording_ids(inputs: Any, max_new_tokens: int) -> torch.Tensor:
        output = generate_ids(inputs, max_new_tokens)
        calls.append([inputs["input_ids"].clone(), inputs["pixel_values"].clone(), output.clone()])
        return output

    engine.prepare = recording_prepare  # type: ignore[method-assign]
    engine._generate_ids = recording_ids  # type: ignore[method-assign]

    serial_uids = queue_variants(db, data_dir, rg1_unci, work)
    serial = InferenceWorker(db, settings, lambda: Unprepared(engine), None)
    assert drain(serial) == [2, 2, 1]
    assert prepared_in == ["MainThread"] * 3  # inside engine.generate, in series
    serial_calls, calls[:], prepared_in[:] = list(calls), [], []

    piped_uids = queue_variants(db, data_dir, rg1_unci, work)
    piped = InferenceWorker(db, settings, lambda: engine, None)
    assert drain(piped) == [2, 2, 1]
    piped.stop()
    # Batch 1 through engine.generate; batches 2 and 3 prepared ahead in the prefetch thread.
    assert prepared_in[0] == "MainThread"
    assert [name.startswith("inference-prefetch") for name in prepared_in[1:]] == [True, True]

    assert len(calls) == len(serial_calls) == 3
    for piped_call, serial_call in zip(calls, serial_calls, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(piped_call, serial_call, strict=True))
    first_pixels = serial_calls[0][1]
    assert not torch.equal(first_pixels[0], first_pixels[1]), "the studies must differ"
    serial_reports = reports_by_variant(db, serial_uids)
    assert len(serial_reports) == len(VARIANTS)
    assert reports_by_variant(db, piped_uids) == serial_reports


def test_next_batch_is_prepared_while_the_current_one_generates(
    tmp_path: Path, db: Database, rg1_unci: Path
) -> None:
    settings = make_settings(tmp_path, db.url, max_batch=2)
    queue_studies(db, settings.storage.data_dir, rg1_unci, tmp_path / "in", 5)
    engine = TwoStepScripted(responder=lambda _r: CHEST_ANSWER, overlapped=2)
    worker = InferenceWorker(db, settings, lambda: engine, None)
    assert drain(worker) == [2, 2, 1]
    worker.stop()

    steps = [(name, size) for name, size, _ in engine.steps]
    ends = [i for i, (name, _) in enumerate(steps) if name.endswith(" end")]
    prepares = [i for i, (name, _) in enumerate(steps) if name == "prepare"]
    assert [steps[i] for i in ends] == [
        ("generate end", 2),
        ("generate_prepared end", 2),
        ("generate_prepared end", 1),
    ]
    # Batch 2 was prepared before batch 1 ended, batch 3 while batch 2 ran; none after the
    # last batch, with nothing left to claim.
    assert [steps[i][1] for i in prepares] == [2, 1]
    assert prepares[0] < ends[0] < prepares[1] < ends[1]
    generating = {thread for name, _, thread in engine.steps if name != "prepare"}
    preparing = {thread for name, _, thread in engine.steps if name == "prepare"}
    assert generating == {"MainThread"} and preparing.isdisjoint(generating)
    with db.session() as session:
        assert session.scalars(select(Job.status)).all() == [JobStatus.DONE] * 5
        assert len(session.scalars(select(Report)).all()) == 5


def test_reports_take_the_ids_claimed_with_their_jobs_and_fresh_leases_are_not_renewed(
    tmp_path: Path, db: Database, rg1_unci: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between two batches the worker writes nothing itself: the report ids came with the
    claims, and a lease taken moments ago is not renewed (each a write that can wait seconds
    for SQLite's lock while C-STOREs commit); a batch claimed a quarter lease ago is."""
    renewed: list[list[int]] = []
    monkeypatch.setattr(
        worker_jobs, "extend_lease", lambda _db, ids, _owner, _lease: renewed.append(ids)
    )
    settings = make_settings(tmp_path, db.url, max_batch=2)
    queue_studies(db, settings.storage.data_dir, rg1_unci, tmp_path / "in", 3)
    engine = TwoStepScripted(responder=lambda _r: CHEST_ANSWER)
    worker = InferenceWorker(db, settings, lambda: engine, None)
    worker._report_ids = claimed = RecordedIds()
    assert worker.run_once() == 2
    assert renewed == []  # claimed just before it ran
    batch = worker._prefetcher.take()  # the next batch, claimed while the first one ran
    assert batch is not None and len(batch.jobs) == 1
    batch.stamps["claimed"] -= settings.model.lease_seconds / 4 + 1
    worker._run_batch(engine, batch)
    worker.stop()
    assert renewed == [[batch.jobs[0].job_id]]
    with db.session() as session:
        ids = sorted(session.scalars(select(Report.id)))
    assert ids == sorted(claimed.taken) and len(set(ids)) == 3 and not claimed


def test_the_report_ids_of_jobs_given_back_unrun_do_not_pile_up(
    tmp_path: Path, db: Database, rg1_unci: Path
) -> None:
    settings = make_settings(tmp_path, db.url, max_batch=2)
    queue_studies(db, settings.storage.data_dir, rg1_unci, tmp_path / "in", 2)
    worker = InferenceWorker(db, settings, lambda: None, None)
    for _ in range(10):  # claimed, then given back as when the engine is out of reach
        claimed = worker._claim(2)
        assert len(claimed) == 2
        release_jobs(db, claimed, worker.owner)
    assert len(worker._report_ids) == 4 * 2
    assert list(worker._report_ids) == sorted(set(worker._report_ids))  # the newest kept


class RecordedIds(deque[int]):
    """The worker's pool of report ids, remembering every id put in."""

    def __init__(self) -> None:
        super().__init__()
        self.taken: list[int] = []

    def extend(self, ids: Iterable[int]) -> None:
        ids = list(ids)
        self.taken += ids
        super().extend(ids)


def test_a_lone_study_goes_straight_through(tmp_path: Path, db: Database, rg1_unci: Path) -> None:
    settings = make_settings(tmp_path, db.url)
    queue_studies(db, settings.storage.data_dir, rg1_unci, tmp_path / "in", 1)
    engine = TwoStepScripted(texts=[CHEST_ANSWER])
    worker = InferenceWorker(db, settings, lambda: engine, None)
    assert worker.run_once() == 1
    assert [step[0] for step in engine.steps] == ["generate start", "generate end"]
    assert not worker._prefetcher.pending


def test_stop_gives_a_batch_prepared_ahead_back_to_the_queue(
    tmp_path: Path, db: Database, rg1_unci: Path
) -> None:
    settings = make_settings(tmp_path, db.url, max_batch=2)
    job_ids = sorted(queue_studies(db, settings.storage.data_dir, rg1_unci, tmp_path / "in", 4))
    engine = TwoStepScripted(responder=lambda _r: CHEST_ANSWER, overlapped=1)
    worker = InferenceWorker(db, settings, lambda: engine, None)
    engine.hold = worker.stop_event  # batch 1 generates until stop() is called
    worker.start()
    assert engine.prepared[0].wait(10), "batch 2 was not prepared while batch 1 generated"
    worker.stop()

    assert not worker.thread.is_alive()
    assert [step[0] for step in engine.steps].count("prepare") == 1
    with db.session() as session:
        jobs = {job.id: job for job in session.scalars(select(Job))}
        reports = session.scalars(select(Report.job_id)).all()
    assert [jobs[i].status for i in job_ids[:2]] == [JobStatus.DONE] * 2
    assert sorted(reports) == job_ids[:2]
    for job_id in job_ids[2:]:
        job = jobs[job_id]
        assert (job.status, job.attempts, job.lease_owner) == (JobStatus.QUEUED, 0, None)


def test_out_of_memory_on_a_prepared_batch_runs_it_again_halving(
    tmp_path: Path, db: Database, rg1_unci: Path
) -> None:
    settings = make_settings(tmp_path, db.url, max_batch=2)
    queue_studies(db, settings.storage.data_dir, rg1_unci, tmp_path / "in", 4)
    engine = TwoStepScripted(responder=lambda _r: CHEST_ANSWER, oom_above=1)
    worker = InferenceWorker(db, settings, lambda: engine, None)
    assert drain(worker) == [2, 2]
    # Batch 2, prepared ahead, runs out of memory and goes the unpipelined way: 2, 1 + 1.
    assert [len(call) for call in engine.calls] == [2, 1, 1, 2, 2, 1, 1]
    assert [name for name, *_ in engine.steps if name.endswith("start")][3:5] == [
        "generate_prepared start",
        "generate start",
    ]
    with db.session() as session:
        assert session.scalars(select(Job.status)).all() == [JobStatus.DONE] * 4


def test_prefetched_study_without_pixel_data_fails_at_once(
    tmp_path: Path, db: Database, rg1_unci: Path
) -> None:
    settings = make_settings(tmp_path, db.url, max_batch=2)
    data_dir, work = settings.storage.data_dir, tmp_path / "in"
    for _ in range(2):
        ingest_copy(db, data_dir, rg1_unci, work)
    close_quiet_studies(db, lambda _m, _a: 0.0)
    broken_uid = ingest_copy(db, data_dir, rg1_unci, work)
    for path in data_dir.glob(f"instances/{uid_component(broken_uid)}/**/*.dcm"):
        dataset = pydicom.dcmread(path)
        del dataset.PixelData
        dataset.save_as(path)
    ingest_copy(db, data_dir, rg1_unci, work)
    close_quiet_studies(db, lambda _m, _a: 0.0)
    engine = TwoStepScripted(responder=lambda _r: CHEST_ANSWER, overlapped=1)
    worker = InferenceWorker(db, settings, lambda: engine, None)
    assert drain(worker) == [2, 2]
    assert [(name, size) for name, size, _ in engine.steps if name == "prepare"] == [("prepare", 1)]
    with db.session() as session:
        jobs = session.scalars(select(Job).order_by(Job.status)).all()
    assert [(job.status, job.attempts) for job in jobs] == [(JobStatus.DONE, 1)] * 3 + [
        (JobStatus.FAILED, 1)
    ]
    assert jobs[-1].last_error is not None and "pixel" in jobs[-1].last_error.lower()
