"""engine = "openai", the engine alone: concurrency, image order and size, batch outcomes, the
served model's name, Retry-After, settings, and mutual TLS; and `serve` as a process with the
server down, then up.

The server is peers/openai_double.py, a TEST DOUBLE on loopback (vLLM's CPU build cannot
serve Gemma 3 on the test machines: benchmarks/RESULTS.md says why) that checks every request
against the chat completions schema and answers like vLLM.
"""

from __future__ import annotations

import io
import json
import shutil
import ssl
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from config.settings import ModelSettings, OpenAIServerSettings
from inference.engine import (
    BatchPartlyFailed,
    EngineRequestFailed,
    EngineRequestRejected,
    EngineUnavailable,
    JoinError,
    JoiningEngine,
    PreparedBatch,
)
from inference.openai_engine import (
    fit_to_model,
    png_data_url,
    retry_after_seconds,
)
from peers.dcmtk import dcmtk_storescu
from peers.dicom_files import copy_with_new_uids, testdata
from peers.net import free_port, wait_for
from peers.node_process import NodeProcess, run_cli
from peers.openai_double import OpenAIDouble, Reply
from tests.openai_support import SERVED, engine_for, request, solid
from tests.test_worker import CHEST_ANSWER
from tests.tls_support import self_signed_certificate


@pytest.fixture
def double() -> Any:
    with OpenAIDouble(served_model=SERVED) as server:
        yield server
    assert server.schema_errors == [], "every request must follow the chat completions schema"


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


def test_prepared_pieces_join_into_the_batch_one_prepare_gives(double: OpenAIDouble) -> None:
    engine = engine_for(double.base_url)
    try:
        requests = [request([solid(i)], f"question {i}") for i in range(5)]
        whole = engine.prepare(requests)
        joined = engine.join([engine.prepare(requests[:2]), engine.prepare(requests[2:])])
        assert isinstance(engine, JoiningEngine)
        assert joined.requests == requests and joined.inputs == whole.inputs
        results = engine.generate_prepared(joined)
        with pytest.raises(JoinError, match="not prepared"):
            engine.join([whole, PreparedBatch(requests[:1], inputs="elsewhere")])
    finally:
        engine.close()
    assert len(results) == 5 and all(r.batch_size == 5 for r in results)
    assert sorted(sent.texts[0] for sent in double.requests) == [f"question {i}" for i in range(5)]


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
        OpenAIServerSettings(base_url="http://gpu:8000/v1", api_key_file=Path("k"), api_key_env="K")
    with pytest.raises(ValueError, match=r"needs model\.openai\.base_url"):
        ModelSettings(engine="openai")


# --------------------------------------------------------------------------- TLS


def test_mutual_tls_with_a_site_ca_and_a_client_certificate(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make test certificates")
    server_cert, server_key = self_signed_certificate(tmp_path, "server")
    node_cert, node_key = self_signed_certificate(tmp_path, "node")
    stranger_cert, _ = self_signed_certificate(tmp_path, "stranger")
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
