"""The worker's priority lane (inference/interactive.py): questions before the study backlog,
predict through the tiny demo model on the real transformers path (a DICOM and a PNG),
boxes in pixels of the upload, bad uploads, and no weights failing at once."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import func, select

from inference.demo_model import write_demo_model
from inference.engine import GenerationRequest, GenerationResult
from inference.loader import EngineProvider, attach_fast_path
from inference.scripted_engine import ScriptedEngine
from inference.transformers_engine import TransformersEngine, missing_weights_message
from inference.worker import InferenceWorker
from storage.db import Database
from storage.interactive import (
    ErrorCode,
    get_outcome,
    submit_predict,
    wait_for_result,
)
from storage.models import Job, JobStatus
from tests.test_worker import CHEST_ANSWER, make_settings, queue_studies

QUESTION = "Where is the nodule?"


def png_bytes(width: int, height: int) -> bytes:
    pixels = np.random.default_rng(7).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def demo_engine(tmp_path_factory: pytest.TempPathFactory) -> TransformersEngine:
    weights = tmp_path_factory.mktemp("demo") / "tiny"
    write_demo_model(weights)
    settings = make_settings(tmp_path_factory.mktemp("unused"), "sqlite://", device="cpu")
    return TransformersEngine(settings.model, weights_dir=weights)


class RecordingEngine:
    """Wraps an engine; keeps every batch it ran."""

    def __init__(self, inner: TransformersEngine) -> None:
        self.inner = inner
        self.identity = inner.identity
        self.batches: list[list[GenerationRequest]] = []

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        self.batches.append(list(requests))
        return self.inner.generate(requests)


def test_question_is_answered_before_the_study_backlog(
    tmp_path: Path, db: Database, rg1_unci: Path
) -> None:
    settings = make_settings(tmp_path, db.url, max_batch=2)
    data_dir = settings.storage.data_dir
    queue_studies(db, data_dir, rg1_unci, tmp_path / "in", 6)
    first_batch_running, question_queued = threading.Event(), threading.Event()
    order: list[str] = []
    jobs_left_at_question: list[int] = []

    def responder(request: GenerationRequest) -> str:
        if request.prompt == QUESTION:
            order.append("question")
            with db.session() as session:
                jobs_left_at_question.append(
                    session.scalar(
                        select(func.count()).select_from(Job).where(Job.status != JobStatus.DONE)
                    )
                    or 0
                )
            return "Right upper zone."
        order.append("study")
        if len(order) == 1:
            first_batch_running.set()
            assert question_queued.wait(30), "the test did not queue its question"
        return CHEST_ANSWER

    engine = ScriptedEngine(responder=responder)
    worker = InferenceWorker(db, settings, lambda: engine)
    worker.start()
    try:
        assert first_batch_running.wait(30)
        request_id = submit_predict(
            db, data_dir, png_bytes(64, 48), QUESTION, max_new_tokens=16, max_queued=4
        )
        question_queued.set()
        outcome = wait_for_result(db, request_id, timeout_s=60, poll_interval_s=0.05)
    finally:
        worker.stop()
    assert outcome.status == JobStatus.DONE, outcome.error
    assert order[:3] == ["study", "study", "question"], order
    assert jobs_left_at_question == [4], "answered after the running batch, before the backlog"
    assert [len(batch) for batch in engine.calls[:2]] == [2, 1]
    assert engine.calls[1][0].prompt == QUESTION


def test_predict_dicom_and_png_through_the_demo_model(
    tmp_path: Path, db: Database, rg1_unci: Path, demo_engine: TransformersEngine
) -> None:
    settings = make_settings(tmp_path, db.url, max_new_tokens=8)
    data_dir = settings.storage.data_dir
    engine = RecordingEngine(demo_engine)
    worker = InferenceWorker(db, settings, lambda: engine)
    dicom_id = submit_predict(
        db, data_dir, rg1_unci.read_bytes(), "", max_new_tokens=6, max_queued=4
    )
    png_id = submit_predict(
        db, data_dir, png_bytes(120, 80), QUESTION, max_new_tokens=6, max_queued=4
    )
    assert worker.run_once() == 2
    assert [len(batch) for batch in engine.batches] == [2], "one batch of both requests"
    dicom_request, png_request = engine.batches[0]
    # Same preprocessing as a received study: RG1_UNCI (1841 x 1955) padded to a 1955 square,
    # MONOCHROME1 inverted; the PNG as RGB padded to a 120 square.
    assert dicom_request.images[0].size == (1955, 1955)
    assert "JSON" in dicom_request.prompt, "no question: the chest template"
    assert png_request.images[0].size == (120, 120) and png_request.prompt == QUESTION
    for request_id, size in ((dicom_id, (1841, 1955)), (png_id, (120, 80))):
        outcome = get_outcome(db, request_id)
        assert outcome.status == JobStatus.DONE, outcome.error
        result = outcome.result
        assert result is not None
        assert (result["image"]["width"], result["image"]["height"]) == size
        assert isinstance(result["answer"], str)
        assert result["model"]["is_test_model"] is True
        assert result["disclaimer"].startswith("TEST MODEL") and "physician" in result["disclaimer"]
        assert 0 < result["timings"]["new_tokens"] <= 6
        assert result["timings"]["generate_s"] > 0
    assert list((data_dir / "interactive" / "uploads").iterdir()) == [], "uploads removed"


def test_predict_boxes_are_in_pixels_of_the_upload(tmp_path: Path, db: Database) -> None:
    settings = make_settings(tmp_path, db.url)
    answer = 'Here.\n```json\n[{"box_2d": [300, 100, 500, 300], "label": "nodule"}]\n```'
    worker = InferenceWorker(db, settings, lambda: ScriptedEngine(texts=[answer]))
    request_id = submit_predict(
        db, settings.storage.data_dir, png_bytes(400, 200), QUESTION, max_new_tokens=32,
        max_queued=4,
    )  # fmt: skip
    assert worker.run_once() == 1
    result = get_outcome(db, request_id).result
    assert result is not None
    # 400 x 200 padded to a 400 square, 100 rows above: y = 0.3 * 400 - 100 = 20, ...
    [box] = result["boxes"]
    assert box["label"] == "nodule" and box["image_sop_uid"] is None
    assert box["box"] == pytest.approx([40.0, 20.0, 120.0, 100.0])
    assert result["answer"] == "Here." and result["findings"][0]["region"]["y1"] == 100.0


def test_unreadable_upload_fails_alone(tmp_path: Path, db: Database) -> None:
    settings = make_settings(tmp_path, db.url)
    data_dir = settings.storage.data_dir
    worker = InferenceWorker(db, settings, lambda: ScriptedEngine(responder=lambda _r: "ok"))
    broken = submit_predict(
        db, data_dir, b"\x89PNG\r\n\x1a\n" + b"garbage" * 10, QUESTION, max_new_tokens=8,
        max_queued=4,
    )  # fmt: skip
    good = submit_predict(db, data_dir, png_bytes(32, 32), QUESTION, max_new_tokens=8, max_queued=4)
    assert worker.run_once() == 2
    failed = get_outcome(db, broken)
    assert failed.status == JobStatus.FAILED and failed.error_code == ErrorCode.INVALID_INPUT
    assert failed.error is not None and "PNG or JPEG" in failed.error
    assert get_outcome(db, good).status == JobStatus.DONE


def test_without_weights_questions_fail_at_once_saying_how_to_provide_them(
    tmp_path: Path, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    settings = make_settings(tmp_path, db.url, model_path=tmp_path / "no-weights")
    provider = EngineProvider(settings)
    worker = InferenceWorker(db, settings, provider)
    request_id = submit_predict(
        db, settings.storage.data_dir, png_bytes(32, 32), QUESTION, max_new_tokens=8,
        max_queued=4,
    )  # fmt: skip
    assert worker.run_once() == 0
    outcome = get_outcome(db, request_id)
    assert outcome.status == JobStatus.FAILED
    assert outcome.error_code == ErrorCode.MODEL_UNAVAILABLE
    assert outcome.error == missing_weights_message(settings.model)
    assert str(tmp_path / "no-weights") in outcome.error and "model_path" in outcome.error
    assert json.dumps(provider.state["message"]) == json.dumps(outcome.error), "same as status"


def test_question_is_answered_between_decode_steps_of_the_running_batch(
    tmp_path: Path, db: Database, rg1_unci: Path, demo_engine: TransformersEngine
) -> None:
    # The tiny model on the fast path as the loader attaches it on CUDA (eager on the CPU),
    # with its priority generator. The one stand-in is a spy around the step hook the worker
    # sets: the first time the running batch calls back it queues the question as the API
    # does, then runs the worker's hook; after each call it notes both statuses.
    settings = make_settings(tmp_path, db.url, max_batch=2, max_new_tokens=24, device="cpu")
    data_dir = settings.storage.data_dir
    [job_id] = queue_studies(db, data_dir, rg1_unci, tmp_path / "in", 1)
    engine = TransformersEngine(settings.model, weights_dir=demo_engine.weights_dir)
    engine.wants_fast_path = True  # what a CUDA device sets
    attach_fast_path(engine, settings)
    worker = InferenceWorker(db, settings, lambda: engine)
    request_ids: list[int] = []
    seen: list[tuple[str, str]] = []  # (question, study job) after each call of the hook
    set_step_hook = engine.set_step_hook

    def spy(hook: Callable[[], None] | None) -> None:
        def queue_then_serve() -> None:
            assert hook is not None
            if not request_ids:
                request_ids.append(
                    submit_predict(
                        db, data_dir, png_bytes(64, 48), QUESTION, max_new_tokens=6, max_queued=4
                    )
                )
            hook()
            seen.append((get_outcome(db, request_ids[0]).status, job_status(db, job_id)))

        set_step_hook(None if hook is None else queue_then_serve)

    engine.set_step_hook = spy  # type: ignore[method-assign]
    assert worker.run_once() == 2, "the study and the question answered inside its batch"
    assert seen[0] == (JobStatus.DONE, JobStatus.RUNNING), "answered while the batch ran"
    assert len(seen) > 1, "the batch went on decoding after the answer"
    assert job_status(db, job_id) == JobStatus.DONE
    result = get_outcome(db, request_ids[0]).result
    assert result is not None and 0 < result["timings"]["new_tokens"] <= 6
    assert engine._step_hook is None, "the hook is set only while a batch generates"


def job_status(db: Database, job_id: int) -> str:
    with db.session() as session:
        return str(session.get_one(Job, job_id).status)
