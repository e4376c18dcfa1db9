"""engine = "openai": studies sent to an OpenAI-compatible chat completions server.

The server is peers/openai_double.py, a TEST DOUBLE on loopback (vLLM's CPU build cannot serve
on these machines: benchmarks/RESULTS.md says why) that checks every request against the chat
completions schema and answers like vLLM. The node side is real: the engine provider, the
inference worker, the job queue on SQLite and PostgreSQL, the report outputs, real images.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import ssl
import subprocess
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
    BatchPartlyFailed,
    ChatTurn,
    EngineRequestFailed,
    EngineRequestRejected,
    EngineUnavailable,
    GenerationRequest,
    GenerationSettings,
    PreparingEngine,
)
from inference.loader import EngineProvider
from inference.openai_engine import (
    OpenAIEngine,
    fit_to_model,
    png_data_url,
    retry_after_seconds,
)
from inference.preprocess import prepare_study
from inference.worker import InferenceWorker
from medgemma_node.outputs import ReportOutputs
from peers.dcmtk import dcmtk_storescu
from peers.dicom_files import copy_with_new_uids, testdata
from peers.net import free_port, wait_for
from peers.node_process import NodeProcess, run_cli
from peers.openai_double import VLLM_VERSION, OpenAIDouble, Reply
from storage.db import Database
from storage.interactive import ErrorCode, get_outcome, submit_predict
from storage.models import Job, JobStatus, Report, ReportObject, utcnow
from tests.test_worker import CHEST_ANSWER, queue_studies

SERVED = "google/medgemma-1.5-4b-it"


@pytest.fixture
def double() -> Any:
    with OpenAIDouble(served_model=SERVED) as server:
        yield server
    assert server.schema_errors == [], "every request must follow the chat completions schema"


def openai_settings(
    tmp_path: Path, db_url: str, base_url: str, **openai: object
) -> NodeSettings:
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


def engine_for(base_url: str, **openai: object) -> OpenAIEngine:
    engine = OpenAIEngine(
        ModelSettings(engine="openai", openai=OpenAIServerSettings(base_url=base_url, **openai))
    )
    engine.connect()
    return engine


def solid(value: int, side: int = 64) -> Image.Image:
    return Image.new("RGB", (side, side), (value, value, value))


def request(images: list[Image.Image], prompt: str = "Describe.") -> GenerationRequest:
    return GenerationRequest(images, prompt, GenerationSettings(max_new_tokens=32))


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
        sr_path = next(
            o.path for o in session.scalars(select(ReportObject)) if o.kind == "sr"
        )
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


# --------------------------------------------------------------------------- the engine alone


def test_concurrency_is_capped_at_max_concurrent_requests(double: OpenAIDouble) -> None:
    double.hold_until_in_flight = 3  # answers wait until 3 are in flight (bounded)
    engine = engine_for(double.base_url, max_concurrent_requests=3)
    try:
        results = engine.generate([request([solid(i)]) for i in range(7)])
    finally:
        engine.close()
    assert len(results) == 7 and len(double.requests) == 7
    assert double.max_in_flight == 3
    assert all(r.batch_size == 7 and r.new_tokens > 0 for r in results)


def test_prior_then_current_image_order_and_pixels(double: OpenAIDouble) -> None:
    prior, current = solid(40), solid(200)
    current.putpixel((3, 5), (255, 0, 0))
    engine = engine_for(double.base_url)
    try:
        engine.generate([request([prior, current], "Compare with the prior.")])
    finally:
        engine.close()
    [sent] = double.requests
    content = sent.body["messages"][0]["content"]
    assert [part["type"] for part in content] == ["image_url", "image_url", "text"]
    assert content[2]["text"] == "Compare with the prior."
    for got, want in zip(sent.images, (prior, current), strict=True):
        assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(want))


def test_images_larger_than_the_model_input_are_shrunk_smaller_ones_kept() -> None:
    wide = Image.new("RGB", (2000, 1000), (10, 20, 30))
    assert fit_to_model(wide, 896).size == (896, 448)
    assert fit_to_model(wide, 0).size == (2000, 1000)
    small = solid(7, side=500)
    assert np.array_equal(np.asarray(fit_to_model(small, 896)), np.asarray(small))


def test_png_data_url_decodes_to_the_same_pixels() -> None:
    image = Image.fromarray(np.arange(48 * 32 * 3, dtype=np.uint8).reshape(32, 48, 3) % 251)
    url = png_data_url(image)
    assert url.startswith("data:image/png;base64,")
    import base64

    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert decoded.format == "PNG" and np.array_equal(np.asarray(decoded), np.asarray(image))


def test_batch_outcomes_say_which_request_failed(double: OpenAIDouble) -> None:
    double.responder = lambda record: (
        Reply(status=422, error="bad image") if "second" in record.texts[0] else Reply()
    )
    engine = engine_for(double.base_url)
    try:
        with pytest.raises(BatchPartlyFailed) as caught:
            engine.generate([request([solid(1)], n) for n in ("first", "second", "third")])
        with pytest.raises(EngineRequestRejected, match="HTTP 422: bad image"):
            engine.generate([request([solid(1)], "second")])
    finally:
        engine.close()
    outcomes = caught.value.outcomes
    assert isinstance(outcomes[1], EngineRequestRejected)
    assert [type(o).__name__ for o in (outcomes[0], outcomes[2])] == ["GenerationResult"] * 2
    assert str(caught.value) == "1 of 3 requests failed (EngineRequestRejected)"


def test_model_choice_on_a_server_that_lists_another(double: OpenAIDouble) -> None:
    with pytest.raises(EngineUnavailable, match=r"does not serve model\.openai\.model = 'other'"):
        engine_for(double.base_url, model="other")
    engine = engine_for(double.base_url, model=SERVED)
    engine.close()
    assert engine.identity.model_id == SERVED and engine.unavailable_reason is None


def test_retry_after_forms() -> None:
    assert retry_after_seconds("30") == 30.0
    assert retry_after_seconds("999999") == 3600.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None


def test_engine_request_failed_carries_retry_after(double: OpenAIDouble) -> None:
    double.replies = [Reply(status=429, headers={"Retry-After": "7"})]
    engine = engine_for(double.base_url)
    try:
        with pytest.raises(EngineRequestFailed) as caught:
            engine.generate([request([solid(3)])])
    finally:
        engine.close()
    assert caught.value.retry_after_s == 7.0


def test_settings_refuse_credentials_in_the_url_and_two_key_sources() -> None:
    with pytest.raises(ValueError, match="credentials do not belong in the URL"):
        OpenAIServerSettings(base_url="http://user:secret@gpu:8000/v1")
    with pytest.raises(ValueError, match="not both"):
        OpenAIServerSettings(
            base_url="http://gpu:8000/v1", api_key_file=Path("k"), api_key_env="K"
        )
    with pytest.raises(ValueError, match=r"needs model\.openai\.base_url"):
        ModelSettings(engine="openai")


# --------------------------------------------------------------------------- TLS


def _certificate(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return cert, key


def test_mutual_tls_with_a_site_ca_and_a_client_certificate(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make test certificates")
    server_cert, server_key = _certificate(tmp_path, "server")
    node_cert, node_key = _certificate(tmp_path, "node")
    stranger_cert, _ = _certificate(tmp_path, "stranger")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(server_cert, server_key)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(node_cert)
    with OpenAIDouble(served_model=SERVED, ssl_context=context) as server:
        assert server.base_url.startswith("https://")
        engine = engine_for(
            server.base_url, ca_file=server_cert, cert_file=node_cert, key_file=node_key
        )
        try:
            [result] = engine.generate([request([solid(9)])])
        finally:
            engine.close()
        assert result.text and len(server.requests) == 1
        with pytest.raises(EngineUnavailable, match=r"cannot be reached .*CERTIFICATE_VERIFY"):
            engine_for(server.base_url, ca_file=stranger_cert)
        with pytest.raises(EngineUnavailable, match=r"cannot use the TLS files of model\.openai"):
            engine_for(server.base_url, ca_file=tmp_path / "no-such-ca.pem")
    assert server.schema_errors == []


# --------------------------------------------------------------------------- the node process


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_serve_with_the_server_down_says_so_in_status_then_reports(tmp_path: Path) -> None:
    port = free_port()
    sections = {
        "completion": {"default_seconds": 0.5, "poll_interval_s": 0.1, "rules": []},
        "model": {
            "engine": "openai",
            "max_new_tokens": 64,
            "openai": {"base_url": f"http://127.0.0.1:{port}/v1", "check_interval_s": 0.5},
        },
    }
    node = NodeProcess(tmp_path / "node", sections)
    node.start()
    server = OpenAIDouble(served_model=SERVED, port=port)
    server.responder = lambda _record: Reply(text=CHEST_ANSWER)
    try:
        image = copy_with_new_uids(testdata("RG1_UNCI.dcm"), tmp_path / "in" / "rg1.dcm")
        assert dcmtk_storescu(node.port, [image]).returncode == 0

        def status() -> dict[str, Any]:
            result = run_cli("status", "--config", str(node.config_path), "--json")
            return dict(json.loads(result.stdout)) if result.returncode == 0 else {}

        def held() -> dict[str, Any] | None:
            found = status()
            workers = found.get("workers") or [{}]
            model = workers[0].get("model", {})
            queued = found.get("database", {}).get("jobs", {}).get("queued")
            return found if queued and model.get("status") == "server unavailable" else None

        waiting = wait_for(held, 240, message="no queued job with the server reported down")
        assert f"127.0.0.1:{port}/v1 cannot be reached" in waiting["workers"][0]["model"]["message"]
        server.start()
        done = wait_for(
            lambda: status().get("database", {}).get("jobs") == {"done": 1} and status(),
            240,
            message="the job did not complete once the server answered",
        )
        logs = node.log_text()
    finally:
        server.stop()
        assert node.terminate() == 0
    assert done["workers"][0]["model"]["identity"]["model_id"] == SERVED
    assert "cannot be reached" in logs
    assert server.schema_errors == [] and len(server.requests) == 1
