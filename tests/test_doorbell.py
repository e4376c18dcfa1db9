"""Doorbells between processes sharing a data directory (storage/doorbell.py)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from storage.doorbell import Doorbell, ring


def test_ring_from_another_process_wakes_the_listener(tmp_path: Path) -> None:
    bell = Doorbell(tmp_path, "worker")
    try:
        assert bell.wait(0.05) is False, "nothing rang yet"
        code = (
            "from pathlib import Path; from storage.doorbell import ring; "
            f"ring(Path({str(tmp_path)!r}), 'worker')"
        )
        subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)
        started = time.monotonic()
        assert bell.wait(10.0) is True
        assert time.monotonic() - started < 1.0
        assert bell.wait(0.05) is False, "rings are drained, not counted twice"
    finally:
        bell.close()


def test_doorbells_are_per_data_directory_and_name(tmp_path: Path) -> None:
    bell = Doorbell(tmp_path / "a", "worker")
    try:
        ring(tmp_path / "b", "worker")
        ring(tmp_path / "a", "delivery")
        assert bell.wait(0.1) is False
        ring(tmp_path / "a", "worker")
        assert bell.wait(1.0) is True
    finally:
        bell.close()


def test_ringing_nobody_and_a_second_listener_are_harmless(tmp_path: Path) -> None:
    ring(tmp_path, "nobody-listens")  # must not raise
    first, second = Doorbell(tmp_path, "worker"), Doorbell(tmp_path, "worker")
    try:
        ring(tmp_path, "worker")
        assert first.wait(1.0) is True
        started = time.monotonic()
        assert second.wait(0.2) is False, "the second listener only polls"
        assert time.monotonic() - started >= 0.15
    finally:
        first.close()
        second.close()
