"""benchmarks/node_profile.py: each study's way to the GPU from its report's stamps; and
benchmarks/node_gpu.py's reading of the held batches from the node's log."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.node_gpu import held_lines
from benchmarks.node_profile import (
    FIRST_STUDIES,
    RAMP_STUDIES,
    last_batch_stores,
    study_ways,
    with_waiting,
)


def timings(due: float, joined: bool) -> tuple[float, dict[str, object]]:
    own = {"submitted": due + 0.1, "rendered": due + 0.3, "asked": due + 0.35, "ready": due + 0.5}
    if joined:
        own["joined"] = due + 0.9
    return due, {"study_stamps": own, "batch_stamps": {"generate_started": due + 2.0}}


def test_each_stage_is_the_median_of_the_studies_own_stamps() -> None:
    studies = [timings(float(k), joined=k < RAMP_STUDIES) for k in range(RAMP_STUDIES + 40)]
    ways = study_ways(studies)
    expected = dict(submitted=0.1, rendered=0.2, asked=0.05, ready=0.15, started=0.4)
    assert ways["median (ramp)"] == pytest.approx({**expected, "due_to_started": 0.9})
    assert ways["median (all)"]["started"] == pytest.approx(0.4)  # 128 joined, 40 waited 1.5 s


def test_a_study_without_its_own_stamps_counts_from_its_batch_start() -> None:
    ways = study_ways([(5.0, {"batch_stamps": {"generate_started": 6.25}}), (7.0, {})])
    assert ways["median (all)"] == pytest.approx({"due_to_started": 1.25})


def test_the_first_studies_show_when_the_last_of_them_reached_each_stage() -> None:
    studies = [timings(float(k) / 10, joined=True) for k in range(FIRST_STUDIES + 10)]
    latest = study_ways(studies)[
        f"first {FIRST_STUDIES}, the latest to reach each stage (s from the first due)"
    ]
    last_due = (FIRST_STUDIES - 1) / 10
    assert latest == pytest.approx(
        dict(due=last_due, submitted=last_due + 0.1, rendered=last_due + 0.3,
             asked=last_due + 0.35, ready=last_due + 0.5, started=last_due + 0.9)
    )  # fmt: skip


def test_the_held_batches_are_read_from_the_node_log(tmp_path: Path) -> None:
    """node_gpu prints each hold as the worker logged it (a line of an H200 run's log)."""
    held = (
        "batch held 1.983 s for 64 rows, from 0.093 s after it began: 5 takes of rows, their "
        "prompt passes 1.680 s on the GPU, 1.672 s on the host; 0.001 s asking for none, "
        "0.293 s waiting; rows each took: 8 in 214 ms, 8 in 264 ms, 16 in 394 ms, 24 in 611 ms, "
        "7 in 197 ms"
    )
    log = tmp_path / "serve.log"
    log.write_text(
        "2026-11-30 05:55:52,101 [747] INFO    inference.worker: batch of 1 study\n"
        f"2026-11-30 05:55:54,582 [747] INFO    inference.decode_joins: {held}\n",
        encoding="utf-8",
    )
    assert held_lines(log) == [held]
    assert held_lines(tmp_path / "missing.log") == []


def test_each_batch_counts_the_studies_due_at_its_start_that_ran_later() -> None:
    """Batches at 10 s and 20 s after the first instance (at 100 s): of the studies due
    before the first started, one ran in the second; at the second's start none waits."""
    ran = lambda due, start: (due, {"batch_stamps": {"generate_started": start}})  # noqa: E731
    studies = [ran(102.0, 110.0), ran(105.0, 110.0), ran(108.0, 120.0), ran(115.0, 120.0)]
    batches = [{"started_s": 10.0, "size": 2}, {"started_s": 20.0, "size": 2}]
    rows = with_waiting(batches, studies, first=100.0)
    assert [row["waiting"] for row in rows] == [1, 0]
    assert rows[0]["size"] == 2 and "waiting" not in batches[0]


def test_the_last_batch_stores_count_from_its_generate_end() -> None:
    """The tail's figures come from the batch whose generate ended last, whatever the order
    its reports were stored in; a report without batch stamps (a question's) is left out."""
    early = {"batch_stamps": {"generate_ended": 10.0}}
    last = {"batch_stamps": {"generate_ended": 20.0}}
    stored = [(last, 20.7), (early, 10.4), (last, 20.2), ({}, 25.0), (last, 20.45)]
    assert last_batch_stores(stored) == pytest.approx({"reports": 3, "first_s": 0.2, "last_s": 0.7})
    assert last_batch_stores([({}, 1.0)]) == {}


def test_the_last_batch_stores_say_how_long_their_transactions_waited() -> None:
    """The job is marked done before its transaction waits for the write lock: the wait is
    read from the reports' timings (store_wait_seconds), the last batch's only."""
    stamps = {"generate_ended": 20.0}
    stored = [
        ({"batch_stamps": stamps, "store_wait_seconds": 0.30}, 20.5),
        ({"batch_stamps": stamps, "store_wait_seconds": 0.01}, 20.1),
        ({"batch_stamps": stamps, "store_wait_seconds": 0.02}, 20.2),
        ({"batch_stamps": {"generate_ended": 10.0}, "store_wait_seconds": 9.0}, 10.5),
    ]
    figures = last_batch_stores(stored)
    assert figures["reports"] == 3
    assert figures["wait_p50_s"] == pytest.approx(0.02)
    assert figures["wait_max_s"] == pytest.approx(0.30)
