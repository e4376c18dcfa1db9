"""What the console keeps up to date: the node's status page and a stream of change events.

GET /api/status   queue, model, destinations and their last errors, disk (api/node_status)
GET /api/events   server-sent events: ``change`` with a token whenever the worklist or a
                  study could look different (api/changes); comments keep it open; the
                  stream ends after STREAM_LIFETIME_S so the token is checked again
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from api.changes import change_token
from api.deps import Context, DbSession, Viewer
from api.node_status import NodeStatus, collect
from api.routers.console import LIVE_INTERVAL_S
from storage.db import Database

log = logging.getLogger(__name__)

KEEPALIVE_S = 15.0  # a comment line now and then, so proxies keep the stream open
STREAM_LIFETIME_S = 300.0  # then the client reconnects, and its token is checked again
RECONNECT_MS = 3000

router = APIRouter(prefix="/api", tags=["status"])


@router.get("/status", response_model=NodeStatus, summary="Queue, model, destinations, disk")
def node_status(context: Context, session: DbSession, _user: Viewer) -> NodeStatus:
    return collect(context.settings, session)


@router.get(
    "/events",
    summary="Server-sent events: `change` whenever the worklist or a study may have changed",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def events(request: Request, context: Context, _user: Viewer) -> StreamingResponse:
    return StreamingResponse(
        change_events(request, context.db),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


def _token(db: Database) -> str:
    with db.session() as session:
        return change_token(session)


async def change_events(
    request: Request,
    db: Database,
    interval_s: float = LIVE_INTERVAL_S,
    lifetime_s: float = STREAM_LIFETIME_S,
) -> AsyncIterator[str]:
    yield f"retry: {RECONNECT_MS}\n\n"
    last_token: str | None = None
    last_sent = started = time.monotonic()
    while time.monotonic() - started < lifetime_s and not await request.is_disconnected():
        try:
            token = await anyio.to_thread.run_sync(_token, db)
        except Exception as exc:  # database away: say so and end; the client reconnects
            log.warning("change events stopped: %s", type(exc).__name__)
            yield "event: unavailable\ndata: {}\n\n"
            return
        if token != last_token:
            last_token, last_sent = token, time.monotonic()
            yield f"event: change\ndata: {json.dumps({'token': token})}\n\n"
        elif time.monotonic() - last_sent >= KEEPALIVE_S:
            last_sent = time.monotonic()
            yield ": keep-alive\n\n"
        await anyio.sleep(interval_s)
