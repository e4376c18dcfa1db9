"""The background loop every part runs on (core/loop.py), and the parts built on it.

Threads are observed through events with bounded waits; nothing asserts how long a step took.
"""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path

import pytest

from core.loop import LoopThread
from medgemma_node.service import DoorbellRelay
from medgemma_node.supervisor import ChildProcess
from peers.net import wait_for
from storage.doorbell import ring

HOUR = 3600.0


class Flaky:
    """A step that fails with the scripted errors, then succeeds; counts its calls."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0
        self.called = threading.Event()

    def __call__(self) -> float | None:
        self.calls += 1
        self.called.set()
        if self.errors:
            raise self.errors.pop(0)
        return None


def test_a_failing_step_is_recorded_logged_once_and_cleared_on_success(
    caplog: pytest.LogCaptureFixture,
) -> None:
    step = Flaky(OSError("disk gone"), OSError("disk gone"), KeyError("other"))
    loop = LoopThread("sample", step, interval_s=5, error_wait_s=7)
    with caplog.at_level(logging.DEBUG, logger="core.loop"):
        assert loop.run_step() == 7
        assert (loop.last_error, loop.failures) == ("OSError: disk gone", 1)
        assert loop.run_step() == 7  # the same error again
        assert loop.run_step() == 7  # a different one
        assert (loop.last_error, loop.failures) == ("KeyError: 'other'", 3)
        assert loop.run_step() == 5  # success: the interval
    assert (loop.last_error, loop.failures) == (None, 0)
    errors = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert [record.exc_info is not None for record in errors] == [True, True]
    assert [type(record.exc_info[1]) for record in errors if record.exc_info] == [
        OSError,
        KeyError,
    ]
    assert any("failed again (2 in a row)" in message for message in caplog.messages)
    assert any("recovered after 3 failed attempt(s)" in message for message in caplog.messages)


def test_without_tracebacks_only_the_type_reaches_error_level(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop = LoopThread(
        "quiet", Flaky(RuntimeError("peer said PATIENT^NAME")), interval_s=1, traceback_in_log=False
    )
    with caplog.at_level(logging.INFO, logger="core.loop"):
        loop.run_step()
    assert caplog.messages == ["quiet failed: RuntimeError"]
    assert loop.last_error == "RuntimeError: peer said PATIENT^NAME"


def test_the_step_chooses_its_wait_and_none_means_the_interval() -> None:
    waits = iter([0.0, 2.5, None, -1.0])
    loop = LoopThread("waits", lambda: next(waits), interval_s=9)
    assert [loop.run_step() for _ in range(4)] == [0.0, 2.5, 9, 0.0]


def test_the_thread_keeps_looping_after_errors_and_wake_skips_the_wait() -> None:
    step = Flaky(ValueError("first"))
    loop = LoopThread("woken", step, interval_s=HOUR, error_wait_s=HOUR)
    loop.start()
    try:
        assert step.called.wait(10)
        wait_for(lambda: loop.last_error == "ValueError: first", 10)
        step.called.clear()
        loop.wake()  # instead of an hour's wait after the error
        assert step.called.wait(10)
        wait_for(lambda: loop.last_error is None, 10)
        step.called.clear()
        loop.wake()  # and after a success
        assert step.called.wait(10)
        assert loop.is_alive()
    finally:
        assert loop.stop(timeout_s=10)
    assert not loop.is_alive() and loop.stopping


def test_first_wait_then_stop_ends_the_wait_and_runs_on_exit() -> None:
    step, exited = Flaky(), threading.Event()
    loop = LoopThread("poller", step, interval_s=1, first_wait_s=HOUR, on_exit=exited.set)
    loop.start()
    assert loop.stop(timeout_s=10)
    assert exited.is_set()
    assert step.calls == 0  # stopped during the first wait: no step ran


def test_a_custom_wait_is_interrupted_by_stop() -> None:
    bell = threading.Event()
    waited = threading.Event()

    def wait(seconds: float) -> None:
        waited.set()
        bell.wait(seconds)

    loop = LoopThread("bell", lambda: None, interval_s=HOUR, wait=wait, interrupt=bell.set)
    loop.start()
    assert waited.wait(10)
    assert loop.stop(timeout_s=10)


def test_stop_before_start_is_harmless() -> None:
    loop = LoopThread("never", Flaky(), interval_s=1)
    assert loop.stop(timeout_s=1)


def test_doorbell_relay_calls_on_each_ring_and_survives_a_failing_action(tmp_path: Path) -> None:
    calls: list[int] = []
    called = threading.Event()

    def action() -> None:
        calls.append(len(calls))
        called.set()
        if len(calls) == 1:
            raise RuntimeError("delivery not ready")

    relay = DoorbellRelay(tmp_path, "delivery", action)
    relay.start()
    try:
        for expected in (1, 2):
            called.clear()
            ring(tmp_path, "delivery")
            assert called.wait(10)
            assert len(calls) >= expected
        assert relay.loop.is_alive()
        wait_for(lambda: relay.last_error is None, 10)
    finally:
        relay.stop()
    assert not relay.loop.is_alive()


def test_child_process_is_restarted_and_stopped(tmp_path: Path) -> None:
    started = tmp_path / "starts"
    script = (
        "import pathlib, sys, time; p = pathlib.Path(sys.argv[1]); "
        "p.write_text(p.read_text() + 'x' if p.exists() else 'x'); "
        "sys.exit(3) if len(p.read_text()) == 1 else time.sleep(600)"
    )
    child = ChildProcess("sample child", [sys.executable, "-c", script, str(started)])
    child.start()
    try:
        wait_for(lambda: child.restarts == 1, 30, message="the child was not restarted")
        assert child.last_error == "exited with code 3"
        wait_for(lambda: started.exists() and started.read_text() == "xx", 30)
        running = child.process
        assert running is not None and running.poll() is None
    finally:
        child.stop()
    assert running.poll() is not None  # terminated by stop()
    assert not child.loop.is_alive()
