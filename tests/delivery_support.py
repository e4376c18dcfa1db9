"""Delivery workers and destinations for the delivery tests (tests/test_delivery*.py): fast
retries, short polls, and the peers' destinations on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from config.settings import DicomDestination, HL7Destination, HttpDestination, RetrySettings
from delivery.worker import DeliveryWorker
from medgemma_node.service import sender_registry
from peers.mllp_listener import MLLPListener, ReplyMode
from peers.orthanc import OrthancServer
from storage.db import Database

FAST_RETRY = RetrySettings(
    max_attempts=100, max_age_s=600, initial_backoff_s=0.1, max_backoff_s=0.3
)


def make_worker(
    db: Database, data_dir: Path, destinations: list[Any], **options: Any
) -> DeliveryWorker:
    settings: dict[str, Any] = {
        "poll_interval_s": 0.05,
        "watch_interval_s": 0.2,
        "batch_size": 8,
        "lease_s": 30.0,
        "join_timeout_s": 15.0,
    }
    senders = sender_registry(db, data_dir, calling_aet="MEDGEMMA")
    return DeliveryWorker(db, data_dir, destinations, senders, **{**settings, **options})


def pacs_destination(pacs: OrthancServer, name: str = "pacs") -> DicomDestination:
    return DicomDestination(
        kind="dicom",
        name=name,
        ae_title=pacs.aet,
        host="127.0.0.1",
        port=pacs.dicom_port,
        retry=FAST_RETRY,
    )


def his_destination(port: int, ack_timeout_s: float = 1.0, **retry: Any) -> HL7Destination:
    return HL7Destination(
        kind="hl7",
        name="his",
        host="127.0.0.1",
        port=port,
        connect_timeout_s=1.0,
        ack_timeout_s=ack_timeout_s,
        retry=RetrySettings(**{**FAST_RETRY.model_dump(), **retry}),
    )


def http_destination(url: str) -> HttpDestination:
    return HttpDestination(
        kind="http",
        name="ris-api",
        url=url,
        headers={"X-Site": "ward-3"},
        bearer_token="s3cret",
        timeout_s=2.0,
        retry=FAST_RETRY,
    )


# The fixtures both delivery test modules use (imported there by these names).


@pytest.fixture(name="data_dir")
def data_dir_fixture(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture(name="orthanc")
def orthanc_fixture(tmp_path: Path) -> Iterator[OrthancServer]:
    with OrthancServer(tmp_path / "orthanc") as server:
        yield server


@pytest.fixture(name="listener")
def listener_fixture() -> Iterator[MLLPListener]:
    with MLLPListener(ReplyMode.AA) as started:
        yield started
