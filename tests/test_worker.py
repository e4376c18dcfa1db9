"""The inference worker on a real database and real files (SQLite and PostgreSQL).

The tiny demo model goes through the real transformers loading and batched generate path (its
text is gibberish, so only the narrative-only path and the identity are checked); the scripted
engine (a test double) drives content, failures and out-of-memory splitting.
"""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from config.settings import NodeSettings, load_settings
from inference.demo_model import write_demo_model
from inference.engine import GenerationRequest
from inference.scripted_engine import ScriptedEngine
from inference.transformers_engine import TransformersEngine
from inference.worker import InferenceWorker
from medgemma_node.outputs import ReportOutputs
from storage.db import Database
from storage.files import instance_relpath, write_durably
from storage.ingest import ReceivedInstance, close_quiet_studies, record_instance
from storage.models import Job, JobStatus, OutboxItem, Report, ReportObject
from storage.report_schema import ParseStatus
from tests.conftest import copy_with_new_uids

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
    settings.model = settings.model.model_copy(
        update={"batch_wait_ms": 0, "retry_backoff_s": 0.0, "max_new_tokens": 8, **model}
    )
    settings.destinations = []
    return settings


def ingest_copy(db: Database, data_dir: Path, source: Path, work: Path) -> str:
    """Store a copy of a real image as a new study, the way the SCP does; return its UID."""
    copy = copy_with_new_uids(source, work / f"{pydicom.uid.generate_uid()}.dcm")
    dataset = pydicom.dcmread(copy)
    relpath = instance_relpath(
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID, dataset.SOPInstanceUID
    )
    write_durably(data_dir / relpath, copy.read_bytes())
    record_instance(
        db,
        ReceivedInstance(
            study_uid=dataset.StudyInstanceUID,
            series_uid=dataset.SeriesInstanceUID,
            sop_uid=dataset.SOPInstanceUID,
            sop_class_uid=dataset.SOPClassUID,
            transfer_syntax_uid=dataset.file_meta.TransferSyntaxUID,
            relpath=relpath.as_posix(),
            size_bytes=copy.stat().st_size,
            calling_ae="MODALITY",
            modality=str(dataset.Modality),
            body_part=str(dataset.get("BodyPartExamined", "")),
            instance_number=None,
            patient_hash="x",
        ),
    )
    return str(dataset.StudyInstanceUID)


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
    study_uid = ingest_copy(db, data_dir, rg1_unci, tmp_path / "in")
    for path in data_dir.glob("instances/**/*.dcm"):
        dataset = pydicom.dcmread(path)
        del dataset.PixelData
        dataset.save_as(path)
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
