"""The FastAPI application: routers, auth, audit, limits, and offline docs.

    /api/health                       liveness, no token
    /api/ready, /api/me               readiness (503 when not ready), the signed-in user
    /api/studies...                   worklist, study, report (JSON, SR or PDF), instance image
    /api/predict, /api/answers/{id}   a question about an uploaded image; answers not ready
    /api/studies/{uid}/conversations, /api/conversations/...   questions about a study
    /api/jobs..., /api/outbox...      admin: lists and retries
    /api/status, /api/events          the node's status page; change events (SSE)
    /, /console/...                   the web console (api/routers/console.py)
    /api/openapi.json, /api/docs      the contract and Swagger UI, served from the package

Swagger UI is vendored (api/static/swagger-ui, from npm's swagger-ui-dist; update with
scripts/update-swagger-ui.sh): FastAPI's default page loads it from a CDN, and the node
never reaches the internet at run time.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from api.deps import ApiContext, ReportPdfSource
from api.middleware import AuditMiddleware, BodyLimitMiddleware, UnexpectedErrorMiddleware
from api.routers import admin, console, conversations, health, live, predict, studies
from config.settings import NodeSettings
from storage.conversations import ReportHook
from storage.db import Database

STATIC_DIR = Path(__file__).parent / "static"
SWAGGER_DIR = "/api/static/swagger-ui"
OPENAPI_URL = "/api/openapi.json"
DESCRIPTION = """\
The REST API of medgemma-node. Every answer about a study is **AI-generated, preliminary and
not verified: it must be reviewed by a physician**.

Every endpoint except `/api/health` needs a bearer token: create one with
`medgemma-node api add-user NAME --role viewer|radiologist|admin` and send
`Authorization: Bearer <token>` (the **Authorize** button here).
"""


def _version() -> str:
    try:
        return metadata.version("medgemma-node")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def create_app(
    settings: NodeSettings,
    db: Database,
    on_report: ReportHook | None = None,
    report_pdf: ReportPdfSource | None = None,
) -> FastAPI:
    """``on_report``: how an appended conversation becomes a report version (None: 503);
    ``report_pdf``: how to get a report's PDF (``?format=pdf``); None answers 503."""
    docs_public = settings.api.docs == "public"
    app = FastAPI(
        title="medgemma-node",
        version=_version(),
        description=DESCRIPTION,
        openapi_url=OPENAPI_URL if docs_public else None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.context = ApiContext(
        settings=settings, db=db, on_report=on_report, report_pdf=report_pdf
    )
    routers = (health, studies, conversations, predict, admin, live, console)
    for module in routers:
        app.include_router(module.router)
    app.mount("/console", StaticFiles(directory=console.CONSOLE_DIR), name="console")
    if docs_public:
        _add_docs(app)
    # Each add wraps the ones before: audit (outermost) sees every answer, 413 and 500 too.
    app.add_middleware(UnexpectedErrorMiddleware)
    app.add_middleware(BodyLimitMiddleware, limit_bytes=int(settings.api.max_upload_mb * 2**20))
    app.add_middleware(AuditMiddleware, db=db)
    return app


def _add_docs(app: FastAPI) -> None:
    app.mount("/api/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/api/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=OPENAPI_URL,
            title="medgemma-node API",
            swagger_js_url=f"{SWAGGER_DIR}/swagger-ui-bundle.js",
            swagger_css_url=f"{SWAGGER_DIR}/swagger-ui.css",
            swagger_favicon_url=f"{SWAGGER_DIR}/favicon-32x32.png",
            # validatorUrl null: Swagger UI would otherwise send the document to
            # validator.swagger.io for its badge.
            swagger_ui_parameters={"validatorUrl": None, "tryItOutEnabled": False},
        )
