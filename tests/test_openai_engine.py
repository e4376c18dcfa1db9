"""engine = "openai": studies and questions sent to an OpenAI-compatible chat completions
server through the inference worker (the engine alone, TLS and `serve`: test_openai_client.py).

The server is peers/openai_double.py, a TEST DOUBLE on loopback (vLLM's CPU build cannot
serve Gemma 3 on the test machines: benchmarks/RESULTS.md says why) that checks every request
against the chat completions schema and answers like vLLM. The node side is real: the engine
provider, the inference worker, the job queue on SQLite and PostgreSQL, the report outputs, real
images.
"""

from __future__ import annotations

import io
import json
import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from sqlalchemy import select, update

from config.settings import ModelSettings, NodeSettings, OpenAIServerSettings, load_settings
from inference.engine import (
    ChatTurn,
    EngineUnavailable,
    GenerationRequest,
    GenerationSettings,
    PreparingEngine,
)
from inference.loader import EngineProvider
from inference.openai_engine import (
    OpenAIEngine,
    fit_to_model,
)
from inference.preprocess import prepare_study
from inference.worker import InferenceWorker
from medgemma_node.outputs import ReportOutputs
from peers.net import free_port, wait_for
from peers.openai_double import VLLM_VERSION, OpenAIDouble, Reply
from storage.db import Database
from storage.interactive import ErrorCode, get_outcome, submit_predict
from storage.models import Job, JobStatus, Report, ReportObject, utcnow
from tests.openai_support import SERVED, engine_for, solid
from tests.test_worker import CHEST_ANSWER, queue_studies


@pytest.fixture
def double() -> Any:
    with OpenAIDouble(served_model=SERVED) as server:
        yield server
    assert server.schema_errors == [], "every request must follow the chat completions schema"


def openai_settings(tmp_path: Path, db_url: str, base_url: str, **openai: object) -> NodeSettings:
    settings = load_settings()
    settings.storage.data_dir = tmp_path / "data"
    settings.storage.database_url = db_url
    server = OpenAIServerSettings(base_url=base_url, check_interval_s=0.05, **openai)
    settings.model = ModelSettings(
        engine="openai",
        openai=server,
        batch_wait_ms=0,
        retry_backoff_s=0.0,
        max_new_tokens=64,
        max_attempts=4,
    )
    settings.destinations = []
    return settings


def job_row(db: Database, job_id: int) -> Job:
    with db.session() as session:
        job = session.get_one(Job, job_id)
        session.expunge(job)
        return job


def make_due(db: Database, job_id: int) -> None:
    """The job's backoff has passed (instead of sleeping through it)."""
    with db.session() as session:
        session.execute(update(Job).where(Job.id == job_id).values(available_at=utcnow()))


# --------------------------------------------------------------------------- through the worker


def test_study_reaches_a_report_naming_the_server_model(
    tmp_path: Path, db: Database, rg1_unci: Path, double: OpenAIDouble
) -> None:
    double.replies = [Reply(text=CHEST_ANSWER, system_fingerprint="fp-2026-11")]
    settings = openai_settings(tmp_path, db.url, double.base_url)
    [job_id] = queue_studies(db, settings.storage.data_dir, rg1_unci, tmp_path / "in", 1)
    provider = EngineProvider(settings)
    worker = InferenceWorker(db, settings, provider, ReportOutputs(settings))

    assert worker.run_once() == 1

    assert provider.state["status"] == "loaded"
    assert isinstance(provider.engine, PreparingEngine)
    with db.session() as session:
        report = session.scalars(select(Report)).one()
        kinds = sorted(obj.kind for obj in session.scalars(select(ReportObject)))
        sr_path = next(o.path for o in session.scalars(select(ReportObject)) if o.kind == "sr")
    assert job_row(db, job_id).status == JobStatus.DONE
    assert report.parse_status == "ok" and report.urgency == "urgent"
    assert report.content_json["findings"][0]["label"] == "nodule"
    identity = report.model_json
    assert identity["model_id"] == SERVED
    assert identity["revision"] == "fp-2026-11"  # the answer's system_fingerprint
    assert identity["device"] == f"inference server {double.base_url}"
    assert identity["library_versions"]["vllm"] == VLLM_VERSION
    assert identity["server"]["root"] == double.root
    assert identity["server"]["system_fingerprint"] == "fp-2026-11"
    assert identity["is_test_model"] is False and not report.is_test_model
    assert kinds == ["gsps", "sr"]
    # TID 4019 in the SR: the served model and its reported version.
    sr = pydicom.dcmread(settings.storage.data_dir / sr_path)
    texts = {item.TextValue for item in _content_items(sr) if "TextValue" in item}
    assert SERVED in texts and "fp-2026-11" in texts

    [sent] = double.requests
    assert sent.roles == ["user"]
    assert sent.max_tokens == settings.model.max_new_tokens
    assert sent.texts[0] == report.question and "box_2d" in report.question
    assert sent.body["temperature"] == 0
    [image] = sent.images
    [prepared] = prepare_study([next(settings.storage.data_dir.glob("instances/**/*.dcm"))]).images
    assert prepared.size == (1955, 1955) and image.size == (896, 896)  # shrunk on the node
    expected = fit_to_model(prepared, 896)
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(expected))


def _content_items(dataset: Any) -> Any:
    for item in dataset.get("ContentSequence", []):
        yield item
        yield from _content_items(item)


def test_busy_failing_and_slow_server_jobs_retried_later_then_succeed(
    tmp_path: Path, db: Database, rg1_unci: Path, double: OpenAIDouble
) -> None:
    double.replies = [
        Reply(status=429, headers={"Retry-After": "120"}, error="too many requests"),
        Reply(status=503, error="engine overloaded"),
        Reply(delay_s=4.0),  # longer than read_timeout_s
        Reply(text=CHEST_ANSWER),
    ]
    settings = openai_settings(tmp_path, db.url, double.base_url, read_timeout_s=2.0)
    [job_id] = queue_studies(db, settings.storage.data_dir, rg1_unci, tmp_path / "in", 1)
    worker = InferenceWorker(db, settings, EngineProvider(settings), None)

    before = utcnow()
    assert worker.run_once() == 1
    job = job_row(db, job_id)
    assert job.status == JobStatus.QUEUED and job.attempts == 1
    assert job.last_error is not None and "busy (HTTP 429: too many requests)" in job.last_error
    assert job.available_at >= before + timedelta(seconds=120)  # Retry-After, not backoff 0
    assert worker.run_once() == 0, "not due before Retry-After"

    make_due(db, job_id)
    assert worker.run_once() == 1
    job = job_row(db, job_id)
    assert job.status == JobStatus.QUEUED and job.attempts == 2
    assert job.last_error is not None and "HTTP 503: engine overloaded" in job.last_error

    make_due(db, job_id)
    assert worker.run_once() == 1
    job = job_row(db, job_id)
    assert job.status == JobStatus.QUEUED and job.attempts == 3
    assert job.last_error is not None and "no answer" in job.last_error
    assert "within 2 s" in job.last_error

    make_due(db, job_id)
    assert worker.run_once() == 1
    assert job_row(db, job_id).status == JobStatus.DONE
    assert len(double.requests) == 4


def test_a_request_the_server_refuses_fails_at_once(
    tmp_path: Path, db: Database, rg1_unci: Path, double: OpenAIDouble
) -> None:
    double.replies = [Reply(status=400, error="prompt is longer than max_model_len 8192")]
    settings = openai_settings(tmp_path, db.url, double.base_url)
    [job_id] = queue_studies(db, settings.storage.data_dir, rg1_unci, tmp_path / "in", 1)
    worker = InferenceWorker(db, settings, EngineProvider(settings), None)

    assert worker.run_once() == 1
    job = job_row(db, job_id)
    assert job.status == JobStatus.FAILED and job.attempts == 1
    assert job.last_error == (
        f"EngineRequestRejected: the inference server at {double.base_url} refused the "
        "request (HTTP 400: prompt is longer than max_model_len 8192)"
    )


def test_an_answer_that_is_not_json_is_a_clear_failure(
    tmp_path: Path, db: Database, rg1_unci: Path, double: OpenAIDouble
) -> None:
    double.replies = [Reply(raw_body=b"<html>502 Bad Gateway</html>")]
    double.responder = lambda _record: Reply(raw_body=b'{"choices": []}')
    settings = openai_settings(tmp_path, db.url, double.base_url)
    settings.model.max_attempts = 2
    [job_id] = queue_studies(db, settings.storage.data_dir, rg1_unci, tmp_path / "in", 1)
    worker = InferenceWorker(db, settings, EngineProvider(settings), None)

    assert worker.run_once() == 1
    job = job_row(db, job_id)
    assert job.status == JobStatus.QUEUED, "a garbled answer may be the proxy's: retried"
    assert job.last_error == (
        "EngineRequestFailed: the inference server answered HTTP 200 with 28 bytes that are "
        "not JSON (text/plain)"
    )
    make_due(db, job_id)  # now the responder's JSON that is not a completion
    assert worker.run_once() == 1
    job = job_row(db, job_id)
    assert job.status == JobStatus.FAILED and job.attempts == 2
    assert job.last_error is not None
    assert "not a chat completion (no choices[0].message.content text)" in job.last_error


def test_one_failed_request_leaves_the_others_of_its_batch_stored(
    tmp_path: Path, db: Database, rg1_unci: Path, double: OpenAIDouble
) -> None:
    double.replies = [Reply(status=503, error="overloaded")]
    double.responder = lambda _record: Reply(text=CHEST_ANSWER)
    settings = openai_settings(tmp_path, db.url, double.base_url)
    job_ids = queue_studies(db, settings.storage.data_dir, rg1_unci, tmp_path / "in", 3)
    worker = InferenceWorker(db, settings, EngineProvider(settings), None)

    assert worker.run_once() == 3
    jobs = [job_row(db, job_id) for job_id in job_ids]
    assert sorted(job.status for job in jobs) == [JobStatus.DONE, JobStatus.DONE, JobStatus.QUEUED]
    [retried] = [job for job in jobs if job.status == JobStatus.QUEUED]
    assert retried.attempts == 1 and "HTTP 503: overloaded" in (retried.last_error or "")
    with db.session() as session:
        assert len(session.scalars(select(Report)).all()) == 2


def test_server_down_keeps_jobs_queued_and_says_why_until_it_answers(
    tmp_path: Path, db: Database, rg1_unci: Path
) -> None:
    port = free_port()  # nothing listens here yet
    settings = openai_settings(tmp_path, db.url, f"http://127.0.0.1:{port}/v1")
    [first] = queue_studies(db, settings.storage.data_dir, rg1_unci, tmp_path / "in", 1)
    provider = EngineProvider(settings)
    worker = InferenceWorker(db, settings, provider, None)

    assert worker.run_once() == 0
    assert provider.state["status"] == "server unavailable"
    message = provider.state["message"]
    assert f"http://127.0.0.1:{port}/v1 cannot be reached" in message
    assert "jobs wait" in message
    job = job_row(db, first)
    assert job.status == JobStatus.QUEUED and job.attempts == 0

    server = OpenAIDouble(served_model=SERVED, port=port)
    server.responder = lambda _record: Reply(text=CHEST_ANSWER)
    with server:
        wait_for(lambda: worker.run_once() == 1, 10, interval=0.05, message="server not found")
        assert job_row(db, first).status == JobStatus.DONE
        assert provider.state["status"] == "loaded"
    # Lost while running: the request finds nobody; the job goes back, attempt not counted.
    [second] = queue_studies(db, settings.storage.data_dir, rg1_unci, tmp_path / "in", 1)
    assert worker.run_once() == 0
    job = job_row(db, second)
    assert job.status == JobStatus.QUEUED and job.attempts == 0 and job.last_error is None
    assert worker.run_once() == 0  # the provider holds the jobs while the server is away
    assert provider.state["status"] == "server unavailable"
    assert "cannot be reached" in provider.state["message"]
    assert server.schema_errors == []

    with OpenAIDouble(served_model=SERVED, port=port) as again:
        again.responder = lambda _record: Reply(text=CHEST_ANSWER)
        wait_for(lambda: worker.run_once() == 1, 10, interval=0.05, message="not back")
    assert job_row(db, second).status == JobStatus.DONE


def test_api_key_from_a_file_is_sent_and_never_logged(
    tmp_path: Path, db: Database, rg1_unci: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = "sk-test-7d1f0c9e-never-in-a-log"
    key_file = tmp_path / "api-key"
    key_file.write_text(key + "\n", encoding="utf-8")
    caplog.set_level(logging.DEBUG)
    with OpenAIDouble(served_model=SERVED, api_key=key) as server:
        server.replies = [Reply(status=503), Reply(text=CHEST_ANSWER)]
        settings = openai_settings(tmp_path, db.url, server.base_url, api_key_file=key_file)
        [job_id] = queue_studies(db, settings.storage.data_dir, rg1_unci, tmp_path / "in", 1)
        provider = EngineProvider(settings)
        worker = InferenceWorker(db, settings, provider, None)
        assert worker.run_once() == 1
        assert job_row(db, job_id).last_error is not None
        make_due(db, job_id)
        assert worker.run_once() == 1
    assert server.auth_failures == 0 and len(server.requests) == 2
    job = job_row(db, job_id)
    assert job.status == JobStatus.DONE
    stored = json.dumps(provider.state) + (job.last_traceback or "")
    with db.session() as session:
        stored += json.dumps(session.scalars(select(Report.model_json)).one())
    assert key not in caplog.text and key not in stored


def test_a_rejected_key_keeps_jobs_queued_and_names_the_variable_not_the_key(
    tmp_path: Path, db: Database, rg1_unci: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MGN_TEST_INFERENCE_KEY", "sk-wrong-key")
    with OpenAIDouble(served_model=SERVED, api_key="sk-right-key") as server:
        settings = openai_settings(
            tmp_path, db.url, server.base_url, api_key_env="MGN_TEST_INFERENCE_KEY"
        )
        [job_id] = queue_studies(db, settings.storage.data_dir, rg1_unci, tmp_path / "in", 1)
        provider = EngineProvider(settings)
        assert InferenceWorker(db, settings, provider, None).run_once() == 0
    assert provider.state["status"] == "server unavailable"
    assert "rejected the API key (HTTP 401" in provider.state["message"]
    assert "sk-wrong-key" not in provider.state["message"]
    assert job_row(db, job_id).status == JobStatus.QUEUED and server.requests == []

    monkeypatch.delenv("MGN_TEST_INFERENCE_KEY")
    with pytest.raises(EngineUnavailable, match=r"MGN_TEST_INFERENCE_KEY .* is not set"):
        OpenAIEngine(settings.model).connect()


# --------------------------------------------------------------------------- questions


def png_upload(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 90, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_question_goes_to_the_server_before_the_study_backlog(
    tmp_path: Path, db: Database, rg1_unci: Path, double: OpenAIDouble
) -> None:
    double.responder = lambda record: Reply(
        text="Right upper zone." if record.texts[-1] == "Where?" else CHEST_ANSWER,
        system_fingerprint="fp-q",
    )
    settings = openai_settings(tmp_path, db.url, double.base_url)
    data_dir = settings.storage.data_dir
    job_ids = queue_studies(db, data_dir, rg1_unci, tmp_path / "in", 2)
    request_id = submit_predict(
        db, data_dir, png_upload(64, 48), "Where?", max_new_tokens=16, max_queued=4
    )
    worker = InferenceWorker(db, settings, EngineProvider(settings), None)

    assert worker.run_once() == 3
    assert double.requests[0].texts == ["Where?"], "the question before the studies"
    assert double.requests[0].max_tokens == 16
    outcome = get_outcome(db, request_id)
    assert outcome.status == JobStatus.DONE, outcome.error
    assert outcome.result is not None and outcome.result["answer"] == "Right upper zone."
    assert outcome.result["model"]["model_id"] == SERVED
    assert outcome.result["model"]["revision"] == "fp-q"
    assert {job_row(db, job_id).status for job_id in job_ids} == {JobStatus.DONE}


def test_questions_fail_at_once_saying_the_server_is_down_or_busy(
    tmp_path: Path, db: Database
) -> None:
    port = free_port()
    settings = openai_settings(tmp_path, db.url, f"http://127.0.0.1:{port}/v1")
    data_dir = settings.storage.data_dir
    provider = EngineProvider(settings)
    worker = InferenceWorker(db, settings, provider, None)
    down = submit_predict(db, data_dir, png_upload(32, 32), "Q?", max_new_tokens=8, max_queued=4)
    assert worker.run_once() == 0
    outcome = get_outcome(db, down)
    assert outcome.status == JobStatus.FAILED
    assert outcome.error_code == ErrorCode.MODEL_UNAVAILABLE
    assert outcome.error == provider.state["message"] and "cannot be reached" in outcome.error

    with OpenAIDouble(served_model=SERVED, port=port) as server:
        server.replies = [Reply(status=429, error="queue full")]
        # The provider looks again every check interval: a question it takes before it has seen
        # the server come back fails as unreachable (the case above), not as busy.
        wait_for(lambda: provider() is not None, 10, interval=0.05, message="server not seen")
        busy = submit_predict(
            db, data_dir, png_upload(32, 32), "Q?", max_new_tokens=8, max_queued=4
        )
        wait_for(lambda: worker.run_once() >= 1, 10, interval=0.05, message="not answered")
    outcome = get_outcome(db, busy)
    assert outcome.status == JobStatus.FAILED
    assert outcome.error_code == ErrorCode.MODEL_UNAVAILABLE
    assert outcome.error is not None and "busy (HTTP 429: queue full)" in outcome.error


def test_a_conversation_maps_onto_chat_messages(double: OpenAIDouble) -> None:
    first, second = solid(30), solid(220)
    history = [
        ChatTurn("user", "Any nodule?", [first]),
        ChatTurn("model", "Yes, right upper lobe [A1]."),
    ]
    engine = engine_for(double.base_url)
    try:
        engine.generate(
            [
                GenerationRequest(
                    [second], "How large is A1?", GenerationSettings(max_new_tokens=16), history
                )
            ]
        )
    finally:
        engine.close()
    [sent] = double.requests
    assert sent.roles == ["user", "assistant", "user"]
    assert sent.texts == ["Any nodule?", "Yes, right upper lobe [A1].", "How large is A1?"]
    assert sent.body["messages"][1]["content"] == "Yes, right upper lobe [A1]."
    for got, want in zip(sent.images, (first, second), strict=True):
        assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(want))
