"""POST /api/predict and GET /api/answers/{id} on a real uvicorn server (tests/api_support.py)
with the inference worker in a thread: the tiny demo model on the real transformers path (a PNG
upload and a DICOM one as a data: URL), every error status (401, 403, 413, 415, 422, 429,
404, 503 without weights, a worker's invalid_input as 422), 202 and polling, and the audit
trail naming who asked."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from api.answers import ERROR_STATUS, PREDICT_ERRORS
from config.settings import NodeSettings
from inference.engine import Engine
from inference.loader import EngineProvider
from inference.scripted_engine import ScriptedEngine
from inference.transformers_engine import TransformersEngine, missing_weights_message
from inference.worker import InferenceWorker
from storage.db import Database
from storage.interactive import ErrorCode
from storage.models import AuditEvent, InteractiveRequest, UserRole
from storage.users import create_user
from tests.api_support import RunningApi, running_api
from tests.test_interactive_worker import demo_engine  # noqa: F401  (module fixture)
from tests.test_worker import make_settings

QUESTION = "Where is the nodule?"
MAX_QUESTION_CHARS = 200
RADIOLOGIST = UserRole.RADIOLOGIST


def png_bytes(width: int, height: int, seed: int = 7) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes, media: str) -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def question_settings(tmp_path: Path, **api: Any) -> NodeSettings:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'node.db'}")
    settings.api = settings.api.model_copy(
        update={
            "host": "127.0.0.1",
            "port": 0,
            "max_question_chars": MAX_QUESTION_CHARS,
            "max_queued_questions": 2,
            **api,
        }
    )
    settings.interactive = settings.interactive.model_copy(update={"poll_interval_s": 0.1})
    return settings


@contextmanager
def worker_running(db: Database, settings: NodeSettings, provider: Any) -> Iterator[None]:
    worker = InferenceWorker(db, settings, provider)
    worker.start()
    try:
        yield
    finally:
        worker.stop()


@pytest.fixture
def settings(tmp_path: Path) -> NodeSettings:
    return question_settings(tmp_path)


@pytest.fixture
def api(settings: NodeSettings) -> Iterator[RunningApi]:
    with running_api(settings) as running:
        yield running


def predict(
    client: httpx.Client, data: bytes, question: str = QUESTION, wait: float | None = None,
    **fields: str,
) -> httpx.Response:  # fmt: skip
    params = {} if wait is None else {"wait": wait}
    files = {"file": ("upload.bin", data, "application/octet-stream")}
    return client.post(
        "/api/predict", files=files, data={"question": question, **fields}, params=params
    )


# --------------------------------------------------------------------------- answers


def test_predict_png_and_dicom_through_the_demo_model(
    api: RunningApi,
    settings: NodeSettings,
    rg1_unci: Path,
    demo_engine: TransformersEngine,  # noqa: F811
) -> None:
    engine: Engine = demo_engine
    with worker_running(api.db, settings, lambda: engine), api.client(RADIOLOGIST) as client:
        png = predict(client, png_bytes(120, 80), max_new_tokens="4")
        dicom = client.post(
            "/api/predict",
            json={"image": data_url(rg1_unci.read_bytes(), "application/dicom"), "question": ""},
        )
    assert png.status_code == 200, png.text
    assert dicom.status_code == 200, dicom.text
    for answer, kind, size in ((png, "png", (120, 80)), (dicom, "dicom", (1841, 1955))):
        result = answer.json()
        image = result["image"]
        assert (image["kind"], image["width"], image["height"]) == (kind, *size)
        assert isinstance(result["answer"], str) and isinstance(result["boxes"], list)
        assert result["model"]["is_test_model"] is True
        assert result["disclaimer"].startswith("TEST MODEL") and "physician" in result["disclaimer"]
        assert result["timings"]["generate_s"] > 0
    assert 0 < png.json()["timings"]["new_tokens"] <= 4
    with api.db.session() as session:
        askers = session.scalars(select(InteractiveRequest.requested_by)).all()
        audited = [
            e.detail
            for e in session.scalars(select(AuditEvent).order_by(AuditEvent.id))
            if e.detail.get("route") == "/api/predict"
        ]
    assert askers == ["radiologist-user", "radiologist-user"]
    assert [(d["user"], d["status"], d["upload_kind"]) for d in audited] == [
        ("radiologist-user", 200, "png"),
        ("radiologist-user", 200, "dicom"),
    ]
    assert {d["request_id"] for d in audited} == {1, 2}


def test_queue_full_is_429_and_a_late_answer_is_polled(
    api: RunningApi, settings: NodeSettings
) -> None:
    uploads = settings.storage.data_dir / "interactive" / "uploads"
    with api.client(RADIOLOGIST) as client:
        first = predict(client, png_bytes(32, 32), wait=0)
        second = predict(client, b"\x89PNG\r\n\x1a\n" + b"not really" * 8, wait=0)
        refused = predict(client, png_bytes(32, 32), wait=0)
    # No worker yet: both wait in the queue ([api] max_queued_questions = 2).
    assert (first.status_code, second.status_code) == (202, 202)
    location = first.headers["location"]
    assert location == f"/api/answers/{first.json()['request_id']}" == first.json()["location"]
    assert int(first.headers["retry-after"]) >= 1 and first.json()["status"] == "queued"
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["retry-after"]) >= 1 and "waiting" in refused.json()["detail"]
    assert len(list(uploads.iterdir())) == 2, "the refused upload is not kept"

    other_token = create_user(api.db, "dr-other", RADIOLOGIST)
    with api.client(RADIOLOGIST) as client, api.client(UserRole.ADMIN) as admin:
        assert client.get(location).status_code == 202
        assert admin.get(location).status_code == 202, "admins see every request"
        other = client.get(location, headers={"Authorization": f"Bearer {other_token}"})
        assert other.status_code == 404, "another user's request is not theirs to read"
        assert client.get("/api/answers/999").status_code == 404

        worker = InferenceWorker(api.db, settings, lambda: ScriptedEngine(texts=["Clear."]))
        assert worker.run_once() == 2
        answered = client.get(location, params={"wait": 5})
        failed = client.get(second.headers["location"])
    assert answered.status_code == 200 and answered.json()["answer"] == "Clear."
    # The worker could not read the second upload: invalid_input is 422, with its message.
    assert failed.status_code == 422
    assert failed.json()["error_code"] == ErrorCode.INVALID_INPUT
    assert "PNG or JPEG" in failed.json()["detail"]


def test_without_weights_the_answer_is_503_saying_how_to_provide_them(
    api: RunningApi, settings: NodeSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    settings.model = settings.model.model_copy(update={"model_path": tmp_path / "no-weights"})
    provider = EngineProvider(settings)
    with worker_running(api.db, settings, provider), api.client(RADIOLOGIST) as client:
        refused = predict(client, png_bytes(32, 32))
    assert refused.status_code == 503, refused.text
    assert refused.json()["error_code"] == ErrorCode.MODEL_UNAVAILABLE
    assert refused.json()["detail"] == missing_weights_message(settings.model)


# --------------------------------------------------------------------------- refusals


def test_predict_needs_a_radiologist(api: RunningApi) -> None:
    with api.client() as anonymous, api.client(UserRole.VIEWER) as viewer:
        assert predict(anonymous, png_bytes(8, 8)).status_code == 401
        assert predict(viewer, png_bytes(8, 8)).status_code == 403
        assert viewer.get("/api/answers/1").status_code == 404


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"files": {"file": ("a.png", b"just some text", "image/png")}}, "not a PNG"),
        ({"files": {"file": ("a.png", b"", "image/png")}}, "not a PNG"),
        ({"json": {"image": data_url(b"hello", "text/plain")}}, "not a PNG"),
        ({"content": b"\x89PNG", "headers": {"Content-Type": "image/png"}}, "multipart"),
        ({"content": b"x"}, "multipart"),
    ],
)
def test_not_an_image_or_dicom_is_415(api: RunningApi, body: dict[str, Any], reason: str) -> None:
    with api.client(RADIOLOGIST) as client:
        refused = client.post("/api/predict", **body)
    assert refused.status_code == 415, refused.text
    assert reason in refused.json()["detail"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"data": {"question": "x" * (MAX_QUESTION_CHARS + 1)}}, "question"),
        ({"data": {"max_new_tokens": "0"}}, "max_new_tokens"),
        ({"data": {"language": "fr"}}, "language"),
        ({"json": {"image": "data:image/png;base64,%%%"}}, "image"),
        ({"json": {"image": "https://example.org/x.png"}}, "image"),
        ({"json": {"question": "no image"}}, "image"),
        ({"json": {"image": data_url(b"x", "image/png"), "question": "y" * 201}}, "question"),
        ({"content": b"{not json", "headers": {"Content-Type": "application/json"}}, ""),
        ({"files": {"other": ("a.png", b"x", "image/png")}}, "file"),
    ],
)
def test_malformed_fields_are_422_naming_the_field(
    api: RunningApi, body: dict[str, Any], field: str
) -> None:
    if "data" in body:
        body = {**body, "files": {"file": ("a.png", png_bytes(8, 8), "image/png")}}
    with api.client(RADIOLOGIST) as client:
        refused = client.post("/api/predict", **body)
    assert refused.status_code == 422, refused.text
    [error] = refused.json()["detail"]
    assert error["loc"][0] == "body" and error["loc"][-1] == field


def test_an_upload_over_the_limit_is_413_and_the_api_keeps_serving(tmp_path: Path) -> None:
    settings = question_settings(tmp_path, max_upload_mb=0.05)  # 52 KiB
    big = png_bytes(200, 200)  # random pixels do not compress: ~120 KB
    assert len(big) > 0.05 * 2**20
    with running_api(settings) as api, api.client(RADIOLOGIST) as client:
        refused = predict(client, big, wait=0)
        as_json = client.post("/api/predict", json={"image": data_url(big, "image/png")})
        small = predict(client, png_bytes(16, 16), wait=0)
    assert refused.status_code == as_json.status_code == 413
    assert "max_upload_mb" in refused.json()["detail"]
    assert small.status_code == 202


def test_every_error_code_has_one_status_documented_in_the_openapi(api: RunningApi) -> None:
    assert set(ERROR_STATUS) == set(ErrorCode)
    with api.client() as anonymous:
        document = anonymous.get("/api/openapi.json").json()
    endpoints = {
        "/api/predict": set(PREDICT_ERRORS),
        "/api/conversations/{conversation_id}/messages": set(ErrorCode),
    }
    for path, codes in endpoints.items():
        operation = document["paths"][path]["post"]
        for code, code_status in ERROR_STATUS.items():
            documented = operation["responses"].get(str(code_status), {}).get("description", "")
            assert (f"`{code.value}`" in documented) == (code in codes), (path, code)
            assert (f"{code.value} {code_status}" in operation["description"]) == (code in codes)
        assert {"200", "202", "429"} <= set(operation["responses"])
    # A predict request names no conversation: no 404 or 409 from it.
    assert not {"404", "409"} & set(document["paths"]["/api/predict"]["post"]["responses"])
    predict_body = document["paths"]["/api/predict"]["post"]["requestBody"]["content"]
    assert set(predict_body) == {"multipart/form-data", "application/json"}
