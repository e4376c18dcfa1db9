"""The SCP's counts of C-STORE outcomes, for status and metrics. With several receiving
processes each counts its own, and `serve` adds up what they last wrote
(medgemma_node/runtime.py)."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field, fields


@dataclass
class ScpCounters:
    """Thread-safe counts for status and metrics."""

    stored: int = 0
    duplicates: int = 0
    ignored: int = 0
    failed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, name: str) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + 1)

    def snapshot(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in COUNTER_NAMES}


COUNTER_NAMES = tuple(f.name for f in fields(ScpCounters) if f.name != "lock")


def sum_counters(parts: Iterable[dict[str, int]]) -> ScpCounters:
    """One ScpCounters holding the sums of ``parts`` (snapshots)."""
    total = ScpCounters()
    for part in parts:
        for name in COUNTER_NAMES:
            setattr(total, name, getattr(total, name) + int(part.get(name, 0)))
    return total
