"""Prometheus metrics of the serving process, at http://<metrics.bind_address>:<port>/metrics.

Values are read at scrape time from where they already live, so every process of the node
(SCP, workers in other processes or on other hosts) is covered without shared counters:
    the SCP's counters               instances received, by outcome
    the database                     jobs by status, queue depth, outbox rows and attempts
    inference workers' status files  studies, batches and seconds of inference, per worker
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from delivery.metrics import DeliveryCollector, DeliveryCounters
from dicom_node.scp_counters import COUNTER_NAMES, ScpCounters
from medgemma_node.runtime import read_worker_states
from storage.db import Database
from storage.models import Job, JobStatus, OutboxItem

log = logging.getLogger(__name__)


class NodeCollector(Collector):
    def __init__(
        self, db: Database, data_dir: Path, scp_counters: Callable[[], ScpCounters | None]
    ) -> None:
        self.db = db
        self.data_dir = data_dir
        self.scp_counters = scp_counters

    def collect(self) -> Iterator[Metric]:
        yield from self._instances()
        try:
            yield from self._database()
        except Exception as exc:  # a scrape must not fail because the database is down
            log.warning("metrics: database unavailable: %s", type(exc).__name__)
        yield from self._workers()

    def _instances(self) -> Iterator[Metric]:
        counters = self.scp_counters()
        received = CounterMetricFamily(
            "medgemma_instances_received",
            "C-STORE requests handled by the SCP, by outcome",
            labels=["outcome"],
        )
        if counters is not None:
            for outcome in COUNTER_NAMES:
                received.add_metric([outcome], getattr(counters, outcome))
        yield received

    def _database(self) -> Iterator[Metric]:
        with self.db.session() as session:
            jobs = dict(
                session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
            )
            outbox = session.execute(
                select(
                    OutboxItem.destination,
                    OutboxItem.status,
                    func.count(),
                    func.coalesce(func.sum(OutboxItem.attempts), 0),
                ).group_by(OutboxItem.destination, OutboxItem.status)
            ).all()
        by_status = GaugeMetricFamily("medgemma_jobs", "Jobs by status", labels=["status"])
        for status in JobStatus:
            by_status.add_metric([status.value], jobs.get(status.value, 0))
        yield by_status
        yield GaugeMetricFamily(
            "medgemma_queue_depth",
            "Jobs waiting for the model",
            value=jobs.get(JobStatus.QUEUED, 0),
        )
        yield from _outbox_metrics(outbox)

    def _workers(self) -> Iterator[Metric]:
        families = {
            "jobs_done": CounterMetricFamily(
                "medgemma_inference_studies", "Studies reported, per worker", labels=["worker"]
            ),
            "jobs_failed": CounterMetricFamily(
                "medgemma_inference_failures", "Jobs ended failed, per worker", labels=["worker"]
            ),
            "batches": CounterMetricFamily(
                "medgemma_inference_batches", "Model batches run, per worker", labels=["worker"]
            ),
            "inference_seconds_total": CounterMetricFamily(
                "medgemma_inference_seconds",
                "Seconds spent in the model, per worker",
                labels=["worker"],
            ),
        }
        # Studies run in their quiet period (inference/early_start.py), by what became of them.
        early = CounterMetricFamily(
            "medgemma_early_start_studies",
            "Studies run in their quiet period: taken, claimed (stored as their job's report) "
            "or dropped (their job runs as any other), per worker",
            labels=["worker", "outcome"],
        )
        for state in read_worker_states(self.data_dir):
            worker: dict[str, Any] = state.get("model", {}).get("worker", {})
            name = f"{state.get('host', '?')}:{state.get('pid', '?')}"
            for key, family in families.items():
                family.add_metric([name], float(worker.get(key, 0)))
            for outcome, count in (worker.get("early_start") or {}).items():
                early.add_metric([name, str(outcome)], float(count))
        yield from families.values()
        yield early


def _outbox_metrics(rows: Sequence[Any]) -> Iterator[Metric]:
    items = GaugeMetricFamily(
        "medgemma_outbox", "Deliveries by destination and status", labels=["destination", "status"]
    )
    attempts = CounterMetricFamily(
        "medgemma_delivery_attempts", "Delivery attempts, by destination", labels=["destination"]
    )
    dead = GaugeMetricFamily(
        "medgemma_delivery_dead", "Dead-lettered deliveries, by destination", labels=["destination"]
    )
    attempts_by_destination: dict[str, float] = {}
    for destination, status, count, attempt_sum in rows:
        items.add_metric([destination, status], count)
        attempts_by_destination[destination] = (
            attempts_by_destination.get(destination, 0) + attempt_sum
        )
        if status == "dead":
            dead.add_metric([destination], count)
    for destination, total in attempts_by_destination.items():
        attempts.add_metric([destination], total)
    yield from (items, attempts, dead)


@dataclass(frozen=True)
class MetricSources:
    db: Database
    data_dir: Path
    scp_counters: Callable[[], ScpCounters | None]
    delivery_counters: DeliveryCounters | None = None


def start_metrics_server(bind_address: str, port: int, sources: MetricSources) -> Any:
    registry = CollectorRegistry()
    registry.register(NodeCollector(sources.db, sources.data_dir, sources.scp_counters))
    if sources.delivery_counters is not None:
        registry.register(DeliveryCollector(sources.delivery_counters))
    server, _thread = start_http_server(port, addr=bind_address, registry=registry)
    log.info("metrics at http://%s:%d/metrics", bind_address, port)
    return server
