"""Helpers for REST API tests: an in-process API server on a free port, users, auth headers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from api.server import ApiServer
from config.settings import NodeSettings
from storage.db import Database
from storage.models import UserRole
from storage.users import create_user
from tests.nodeproc import wait_for


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass
class RunningApi:
    server: ApiServer
    db: Database
    tokens: dict[UserRole, str]

    @property
    def url(self) -> str:
        return f"{self.server.scheme}://127.0.0.1:{self.server.port}"

    def client(self, role: UserRole | None = None, **options: Any) -> httpx.Client:
        headers = bearer(self.tokens[role]) if role is not None else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **options)


def api_settings(data_dir: Path, **api: Any) -> NodeSettings:
    return NodeSettings.model_validate(
        {
            "storage": {"data_dir": data_dir},
            "dicom": {"port": 1},  # nothing listens there: readiness says so
            "api": {"host": "127.0.0.1", "port": 0, **api},
        }
    )


@contextmanager
def running_api(
    settings: NodeSettings, prepare: Callable[[ApiServer], None] | None = None
) -> Iterator[RunningApi]:
    """The API alone (no SCP, no worker) in this process, as `serve` runs it: uvicorn in a
    thread on a real socket. ``prepare`` may change the server before it starts."""
    db = Database(settings.database_url)
    db.upgrade()
    tokens = {role: create_user(db, f"{role.value}-user", role) for role in UserRole}
    server = ApiServer(settings, db)
    if prepare is not None:
        prepare(server)
    server.start()
    running = RunningApi(server, db, tokens)
    try:
        wait_for(lambda: _answers(running), 15, message="the API did not answer")
        yield running
    finally:
        server.stop()
        db.dispose()


def _answers(running: RunningApi) -> bool:
    try:
        with running.client(verify=False) as client:
            return client.get("/api/health").status_code == 200
    except httpx.HTTPError:
        return False
