"""The API server itself: its OpenAPI contract, offline docs, TLS, limits, supervision.

The API runs as `serve` runs it (uvicorn in a thread on a real socket, api/server.py), here
without the SCP and the worker; `serve` itself is started where the test is about it.
"""

from __future__ import annotations

import re
import shutil
import socket
import ssl
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlparse

import httpx
import pytest
import uvicorn
from openapi_spec_validator import validate
from sqlalchemy import update
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from api.middleware import BodyLimitMiddleware
from api.server import ApiServer
from config.settings import ConfigError, load_settings
from peers.net import free_port, wait_for
from peers.node_process import NodeProcess
from storage.models import Report, UserRole
from tests.api_support import RunningApi, add_report, api_settings, complete, receive, running_api
from tests.tls_support import self_signed_certificate


@pytest.fixture
def api(tmp_path: Path) -> Iterator[RunningApi]:
    with running_api(api_settings(tmp_path / "data")) as running:
        yield running


# --------------------------------------------------------------------------- contract and docs


def test_openapi_document_validates_and_describes_every_answer(api: RunningApi) -> None:
    with api.client() as anonymous:
        document = anonymous.get("/api/openapi.json").json()
    validate(document)  # OpenAPI 3.1 schema, with openapi-spec-validator
    assert document["openapi"].startswith("3.1")
    assert document["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            ok = operation["responses"]["200"]["content"]
            assert ok, f"{method} {path}: no 200 content"
            if path != "/api/health":
                assert operation.get("security") == [{"HTTPBearer": []}], f"{method} {path}"
            if "application/json" in ok and path != "/api/studies/{study_uid}/reports/{report_id}":
                assert ok["application/json"]["schema"], f"{method} {path}: no schema"
    image = document["paths"]["/api/studies/{study_uid}/instances/{sop_uid}/image.png"]
    assert "image/png" in image["get"]["responses"]["200"]["content"]


class _References(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.urls.append(value)


def test_docs_page_and_every_asset_come_from_the_node(api: RunningApi) -> None:
    with api.client() as anonymous:
        page = anonymous.get("/api/docs")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        html = page.text
        parser = _References()
        parser.feed(html)
        referenced = parser.urls + re.findall(r"url: '([^']+)'", html)
        assert len(referenced) >= 4  # css, icon, js bundle, the OpenAPI document
        sizes = {}
        for url in referenced:
            target = urlparse(urljoin(api.url + "/api/docs", url))
            assert target.netloc == urlparse(api.url).netloc, url
            response = anonymous.get(target.path)
            assert response.status_code == 200, url
            sizes[target.path] = len(response.content)
    other_hosts = [
        url
        for url in re.findall(r"https?://[^\s'\"<>)]+", html)
        if urlparse(url).netloc != urlparse(api.url).netloc
    ]
    assert other_hosts == []
    assert sizes["/api/static/swagger-ui/swagger-ui-bundle.js"] > 1_000_000  # the real bundle
    assert '"validatorUrl": null' in html  # Swagger UI would send the document to its validator


CHROMIUM = Path("/usr/bin/chromium")  # Debian's; browsers are never downloaded


def test_swagger_ui_renders_in_a_browser_that_may_reach_only_the_node(api: RunningApi) -> None:
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.is_file():
        pytest.fail("Debian's chromium is needed (apt-get install chromium)")
    node = urlparse(api.url).netloc
    requested: list[str] = []

    def only_the_node(route: Route) -> None:
        allowed = urlparse(route.request.url).netloc == node
        route.continue_() if allowed else route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.on("request", lambda request: requested.append(request.url))
            page.route("**/*", only_the_node)
            page.goto(f"{api.url}/api/docs")
            page.wait_for_selector(".opblock", timeout=30_000)
            operations = page.locator(".opblock").count()
            authorize = page.locator(".btn.authorize").count()
        finally:
            browser.close()
    assert operations >= 12 and authorize == 1
    assert {urlparse(url).netloc for url in requested} == {node}


def test_docs_can_be_turned_off(tmp_path: Path) -> None:
    with running_api(api_settings(tmp_path / "data", docs="off")) as api, api.client() as client:
        assert client.get("/api/docs").status_code == 404
        assert client.get("/api/openapi.json").status_code == 404
        assert client.get("/api/health").status_code == 200


def test_api_settings_defaults_and_environment_override(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = load_settings().api
    assert (defaults.enabled, defaults.host, defaults.port) == (True, "127.0.0.1", 8080)
    monkeypatch.setenv("MEDGEMMA_NODE_API__PORT", "18080")
    monkeypatch.setenv("MEDGEMMA_NODE_API__MAX_UPLOAD_MB", "5")
    overridden = load_settings().api
    assert overridden.port == 18080 and overridden.max_upload_mb == 5
    monkeypatch.setenv("MEDGEMMA_NODE_API__PORT", "70000")
    with pytest.raises(ConfigError, match=r"api\.port"):
        load_settings()


# --------------------------------------------------------------------------- limits and errors


def test_request_body_over_the_limit_is_413(tmp_path: Path) -> None:
    settings = api_settings(tmp_path / "data", max_upload_mb=0.001)  # 1048 bytes
    with running_api(settings) as api, api.client(UserRole.ADMIN) as admin:
        declared = admin.post("/api/jobs/1/retry", content=b"x" * 5000)
        small = admin.post("/api/jobs/1/retry", content=b"x" * 100)
    assert declared.status_code == 413 and "api.max_upload_mb" in declared.json()["detail"]
    assert small.status_code == 404  # under the limit: served (there is no job 1)


def test_a_streamed_body_is_cut_off_at_the_limit(tmp_path: Path) -> None:
    """Chunked uploads declare no length: the limit applies as the body is read."""
    seen: list[int] = []

    async def upload(request: Request) -> JSONResponse:
        seen.append(len(await request.body()))
        return JSONResponse({"bytes": seen[-1]})

    routes = [
        Route("/api/health", lambda _request: JSONResponse({"status": "ok"})),
        Route("/upload", upload, methods=["POST"]),
    ]

    def prepare(server: ApiServer) -> None:
        server.app = BodyLimitMiddleware(Starlette(routes=routes), limit_bytes=2000)  # type: ignore[assignment]

    with running_api(api_settings(tmp_path / "data"), prepare) as api, api.client() as client:
        streamed = client.post("/upload", content=iter([b"x" * 800] * 4))
        fits = client.post("/upload", content=iter([b"x" * 800] * 2))
    assert streamed.status_code == 413 and "2000 bytes" in streamed.text
    assert fits.json() == {"bytes": 1600} and seen == [1600]


def test_an_unexpected_error_is_a_500_and_the_server_keeps_serving(api: RunningApi) -> None:
    job_id = complete(api.db, receive(api.db, "9.1"))
    report_id = add_report(api.db, job_id, [])
    with api.db.session() as session:  # a row no code writes: the handler cannot read it
        session.execute(
            update(Report).where(Report.id == report_id).values(content_json={"parse_status": 7})
        )
    with api.client(UserRole.VIEWER) as client:
        broken = client.get(f"/api/studies/9.1/reports/{report_id}")
        assert broken.status_code == 500
        assert "keeps serving" in broken.json()["detail"]
        assert client.get("/api/studies/9.1").status_code == 200
        assert client.get("/api/health").status_code == 200


# --------------------------------------------------------------------------- TLS


def test_https_when_tls_is_configured(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make the test certificate")
    cert, key = self_signed_certificate(tmp_path, "api")
    tls = {"enabled": True, "cert_file": str(cert), "key_file": str(key)}
    settings = api_settings(tmp_path / "data", tls=tls)
    with running_api(settings) as api:
        assert api.url.startswith("https://")
        trusting = ssl.create_default_context(cafile=str(cert))
        with api.client(UserRole.VIEWER, verify=trusting) as client:
            assert client.get("/api/me").json()["name"] == "viewer-user"
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{api.server.port}/api/health", timeout=5)
        with pytest.raises(httpx.ConnectError):  # a client that does not trust it refuses
            httpx.get(f"{api.url}/api/health", timeout=5)


# --------------------------------------------------------------------------- supervision


def test_uvicorn_stopping_on_its_own_is_recorded_and_served_again(tmp_path: Path) -> None:
    runs: list[int] = []

    def crash_once(server: uvicorn.Server, sock: socket.socket) -> None:
        runs.append(1)
        if len(runs) == 1:
            raise RuntimeError("simulated crash")
        server.run(sockets=[sock])

    def prepare(server: ApiServer) -> None:
        server.serve_once = crash_once

    with running_api(api_settings(tmp_path / "data"), prepare) as api:
        assert api.server.restarts == 1
        assert api.server.last_error == "RuntimeError: simulated crash"
        with api.client(UserRole.VIEWER) as client:
            assert client.get("/api/me").status_code == 200
    assert len(runs) == 2


def test_api_port_in_use_is_an_error_at_start(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        settings = api_settings(tmp_path / "data", port=port)
        server = ApiServer(settings, None)  # type: ignore[arg-type]
        with pytest.raises(OSError, match=rf"REST API cannot listen on 127\.0\.0\.1:{port}"):
            server.start()
        node = NodeProcess(tmp_path / "node", {"api": {"enabled": True, "port": port}})
        node.start(wait=False)
        assert node.proc is not None
        returncode = node.proc.wait(60)
    assert returncode == 1
    assert f"REST API cannot listen on 127.0.0.1:{port}" in node.stderr()


def test_serve_shows_the_api_in_its_status_file(tmp_path: Path) -> None:
    port = free_port()
    node = NodeProcess(tmp_path / "node", {"api": {"enabled": True, "port": port}}).start()
    try:
        state: dict[str, Any] = wait_for(
            lambda: _api_state(node), 30, message="no api entry in status.json"
        )
        health = httpx.get(f"{node.api_url}/health", timeout=10)
    finally:
        assert node.terminate() == 0
    assert state["api"]["url"] == f"http://127.0.0.1:{port}/api"
    assert state["parts"]["api"] == {"last_error": None}
    assert health.json() == {"status": "ok"}


def _api_state(node: NodeProcess) -> dict[str, Any] | None:
    from medgemma_node.runtime import read_runtime_state

    state = read_runtime_state(node.data_dir)
    return state if state and state.get("api") and "api" in state.get("parts", {}) else None
