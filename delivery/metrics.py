"""Delivery counters, per destination, readable as plain numbers and by Prometheus.

    counters = worker.counters                      # DeliveryCounters
    counters.snapshot()["attempts"]["pacs"]          # plain numbers for status output
    prometheus_client.REGISTRY.register(DeliveryCollector(counters))

Exposed metric families, counted by this process's worker since it started (the client
library adds ``_total``; the database-wide outbox gauges live in medgemma_node.metrics, which
serves this collector too):
    medgemma_delivery_worker_attempts{destination}   rows tried (a DICOM batch counts each row)
    medgemma_delivery_worker_delivered{destination}  rows that arrived (SENT)
    medgemma_delivery_worker_failures{destination,outcome}  outcome = retry | rejected
    medgemma_delivery_worker_dead{destination}       rows dead-lettered
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

COUNTER_NAMES = ("attempts", "delivered", "retry", "rejected", "dead")


class DeliveryCounters:
    """Thread-safe monotonically increasing counts by destination name."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, Counter[str]] = {name: Counter() for name in COUNTER_NAMES}

    def add(self, counter: str, destination: str, amount: int = 1) -> None:
        if counter not in self._counts:
            raise KeyError(f"unknown delivery counter {counter!r}")
        if amount:
            with self._lock:
                self._counts[counter][destination] += amount

    def get(self, counter: str, destination: str) -> int:
        with self._lock:
            return self._counts[counter][destination]

    def snapshot(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {name: dict(counts) for name, counts in self._counts.items()}


class DeliveryCollector(Collector):
    """A prometheus_client collector over DeliveryCounters (register it once per process)."""

    def __init__(self, counters: DeliveryCounters) -> None:
        self.counters = counters

    def collect(self) -> Iterator[CounterMetricFamily]:
        counts = self.counters.snapshot()
        yield _family("attempts", "Outbox rows tried, by destination", counts["attempts"])
        yield _family("delivered", "Outbox rows delivered, by destination", counts["delivered"])
        failures = CounterMetricFamily(
            "medgemma_delivery_worker_failures",
            "Failed delivery attempts, by destination and outcome",
            labels=["destination", "outcome"],
        )
        for outcome in ("retry", "rejected"):
            for destination, value in sorted(counts[outcome].items()):
                failures.add_metric([destination, outcome], value)
        yield failures
        yield _family("dead", "Outbox rows dead-lettered, by destination", counts["dead"])


def _family(name: str, documentation: str, values: dict[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(
        f"medgemma_delivery_worker_{name}", documentation, labels=["destination"]
    )
    for destination, value in sorted(values.items()):
        family.add_metric([destination], value)
    return family
