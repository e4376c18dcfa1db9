"""Helpers for REST API tests: an in-process API server on a free port, users, auth headers."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select, update

from api.server import ApiServer
from config.settings import NodeSettings
from peers.net import wait_for
from storage.conversations import ReportHook
from storage.db import Database
from storage.ingest import ReceivedInstance, close_quiet_study, record_instance
from storage.models import Job, JobStatus, OutboxItem, OutboxStatus, Report, Study, UserRole
from storage.users import create_user


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
    settings: NodeSettings,
    prepare: Callable[[ApiServer], None] | None = None,
    on_report: ReportHook | None = None,
    report_pdf: Callable[[int], bytes] | None = None,
) -> Iterator[RunningApi]:
    """The API alone (no SCP, no worker) in this process, as `serve` runs it: uvicorn in a
    thread on a real socket. ``prepare`` may change the server before it starts; ``on_report``
    is what `serve` passes for appended reports (medgemma_node.outputs.ReportOutputs);
    ``report_pdf`` serves ?format=pdf."""
    db = Database(settings.database_url)
    db.upgrade()
    tokens = {role: create_user(db, f"{role.value}-user", role) for role in UserRole}
    server = ApiServer(settings, db, on_report, report_pdf)
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


# ------------------------------------------------------------- rows as the node writes them

_numbers = itertools.count(1)


def receive(db: Database, study_uid: str, modality: str = "CR", aet: str = "MOD") -> int:
    """Record one instance of ``study_uid`` (no file needed here); the study's id."""
    number = next(_numbers)
    record_instance(
        db,
        ReceivedInstance(
            study_uid=study_uid,
            series_uid=f"{study_uid}.1",
            sop_uid=f"{study_uid}.1.{number}",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            relpath=f"instances/{number}.dcm",
            size_bytes=10,
            calling_ae=aet,
            modality=modality,
            body_part="CHEST",
            instance_number=1,
            patient_hash="0" * 12,
        ),
    )
    with db.session() as session:
        return int(session.scalar(select(Study.id).where(Study.study_instance_uid == study_uid)))


def complete(db: Database, study_id: int) -> int:
    with db.session() as session:
        last = session.scalar(select(Study.last_received_at).where(Study.id == study_id))
    job_id = close_quiet_study(db, study_id, last)
    assert job_id is not None
    return job_id


def set_job(db: Database, job_id: int, status: str, **values: object) -> None:
    with db.session() as session:
        session.execute(update(Job).where(Job.id == job_id).values(status=status, **values))


def add_report(db: Database, job_id: int, deliveries: list[OutboxStatus]) -> int:
    set_job(db, job_id, JobStatus.DONE)
    with db.session() as session:
        job = session.get_one(Job, job_id)
        report = Report(
            job_id=job_id,
            study_id=job.study_version.study_id,
            study_version_id=job.study_version_id,
            parse_status="ok",
            urgency="urgent",
            raw_text="A spiculated nodule in the right upper lobe.",
            content_json={"parse_status": "ok"},
            model_json={"model_id": "m"},
        )
        session.add(report)
        session.flush()
        for index, state in enumerate(deliveries):
            session.add(
                OutboxItem(
                    report_id=report.id,
                    destination=f"d{index}",
                    kind="file",
                    message_id=f"m{report.id}.{index}",
                    payload_path="x",
                    status=state,
                )
            )
        return report.id
