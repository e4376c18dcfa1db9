"""ASGI middleware: the audit trail of every API access, the request body limit, and one
JSON 500 for anything unexpected.

Audit: one ``audit_events`` row per request (``kind = "api.access"``): the user and role, the
route template (never the query string, which may hold a searched name), the method, the
status and the study UID when the request concerns one. The row is committed before the
response starts, so whoever got an answer is already on record. Only /api/ is recorded: health
checks, the static documentation and the console's files and settings hold no data
(and probes would flood the table).
"""

from __future__ import annotations

import json
import logging
import traceback
from typing import Any

import anyio
from fastapi import HTTPException, status
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from storage.db import Database
from storage.models import AuditEvent
from storage.users import UserInfo

log = logging.getLogger("api")

AUDIT_KIND = "api.access"
NOT_AUDITED = ("/api/health", "/api/docs", "/api/openapi.json", "/api/static/")


class AuditMiddleware:
    def __init__(self, app: ASGIApp, db: Database) -> None:
        self.app = app
        self.db = db

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/api/") or path.startswith(NOT_AUDITED):
            await self.app(scope, receive, send)
            return
        recorded = False

        async def send_after_audit(message: Message) -> None:
            nonlocal recorded
            if message["type"] == "http.response.start" and not recorded:
                recorded = True
                await self._record(scope, int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, send_after_audit)
        except Exception:
            if not recorded:
                recorded = True
                await self._record(scope, status.HTTP_500_INTERNAL_SERVER_ERROR)
            raise

    async def _record(self, scope: Scope, status_code: int) -> None:
        event = audit_event(scope, status_code)
        try:
            await anyio.to_thread.run_sync(self._write, event)
        except Exception as exc:  # the answer still goes out; the failure is logged
            log.error("audit event not written (%s: %s)", type(exc).__name__, exc)

    def _write(self, event: AuditEvent) -> None:
        with self.db.session() as session:
            session.add(event)


def audit_event(scope: Scope, status_code: int) -> AuditEvent:
    state: dict[str, Any] = scope.get("state") or {}
    user: UserInfo | None = state.get("user")
    route = scope.get("route")
    path_params: dict[str, Any] = scope.get("path_params") or {}
    study_uid = state.get("audit_study") or path_params.get("study_uid")
    detail: dict[str, Any] = {
        "user": user.name if user else None,
        "role": user.role.value if user else None,
        "action": getattr(route, "name", None),
        "method": scope["method"],
        "route": getattr(route, "path", None),
        "status": status_code,
        **(state.get("audit_detail") or {}),
    }
    uid = str(study_uid)[:64] if study_uid else None
    client = scope.get("client") or ("", 0)
    return AuditEvent(
        kind=AUDIT_KIND,
        study_instance_uid=uid,
        detail=detail,
        actor=user.name if user else "",
        address=str(client[0] or "")[:64],
        outcome="success" if status_code < 400 else "failure",
    )


class BodyLimitMiddleware:
    """413 for a request body over ``limit_bytes``, by Content-Length or as it streams in."""

    def __init__(self, app: ASGIApp, limit_bytes: int) -> None:
        self.app = app
        self.limit = limit_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._too_large(send)
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, self._detail())
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except HTTPException as exc:
            if exc.status_code != status.HTTP_413_CONTENT_TOO_LARGE or started:
                raise
            await self._too_large(send)

    def _detail(self) -> str:
        limit = self.limit
        return f"the request body is larger than the limit of {limit} bytes (api.max_upload_mb)"

    async def _too_large(self, send: Send) -> None:
        await _send_json(send, status.HTTP_413_CONTENT_TOO_LARGE, {"detail": self._detail()})


class UnexpectedErrorMiddleware:
    """Anything a handler did not expect becomes a JSON 500, and the connection stays usable.

    (Starlette's outermost handler answers 500 too but re-raises, and uvicorn then drops the
    keep-alive connection.) The log names the route and the exception type with the stack, not
    the exception's message: library messages may quote values (pydantic quotes its input).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            route = getattr(scope.get("route"), "path", None)
            stack = "".join(traceback.format_tb(exc.__traceback__))
            log.error("API request %s failed: %s\n%s", route, type(exc).__name__, stack)
            if started:
                raise
            await _send_json(
                send,
                status.HTTP_500_INTERNAL_SERVER_ERROR,
                {"detail": "internal error; the node keeps serving (see the node log)"},
            )


async def _send_json(send: Send, status_code: int, content: dict[str, Any]) -> None:
    body = json.dumps(content).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status_code,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
