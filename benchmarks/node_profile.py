"""What a `node_gpu` run left in the node's database, read back after the run: per-stage
medians from the reports' timings, the run's timeline (when the last instance, job, batch,
report and delivery happened), each batch's stages from its stamps (inference/worker_jobs.py
ClaimedBatch) and the rate while the queue was full."""

from __future__ import annotations

import itertools
import statistics
from typing import Any


def read_profile(database_url: str) -> dict[str, Any]:
    """Per-stage figures from the reports' timings and the file destination's outbox rows."""
    from sqlalchemy import select

    from storage.db import Database
    from storage.models import Job, OutboxItem, Report

    db = Database(database_url)
    try:
        with db.session() as session:
            reports = session.execute(
                select(Report.timings_json, Job.created_at, Job.finished_at).outerjoin(
                    Job, Report.job_id == Job.id
                )
            ).all()
            timings = [t for t, _, _ in reports]
            rows = session.execute(
                select(OutboxItem.created_at, OutboxItem.sent_at).where(
                    OutboxItem.sent_at.is_not(None)
                )
            ).all()
            timeline = read_timeline(session, timings)
    finally:
        db.dispose()
    batches = {
        (t["batch_seconds"], t.get("prepare_seconds", 0.0), t["batch_size"]) for t in timings
    }
    delivery = sorted((sent - created).total_seconds() for created, sent in rows if sent)
    studies = [(due.timestamp(), t) for t, due, _ in reports if due is not None]  # job queued
    stored = [(t, done.timestamp()) for t, _, done in reports if done is not None]
    if "batch_rows" in timeline:
        first = timeline["first_instance_at"]
        timeline["batch_rows"] = with_waiting(timeline["batch_rows"], studies, first)

    def median(key: str) -> float:
        return statistics.median(float(t.get(key, 0.0)) for t in timings) if timings else 0.0

    return {
        "reports": len(timings),
        "batches": len(batches),
        "mean_batch": statistics.mean(b[2] for b in batches) if batches else 0.0,
        "render_s_per_study": median("preprocess_seconds"),
        "prepare_s_per_batch": statistics.median(b[1] for b in batches) if batches else 0.0,
        "generate_s_per_batch": statistics.median(b[0] - b[1] for b in batches) if batches else 0,
        "generate_s_total": sum(b[0] - b[1] for b in batches),
        "outputs_s_per_study": median("outputs_seconds"),
        "store_wait_s_per_study": median("store_wait_seconds"),
        "store_held_s_per_study": median("store_held_seconds"),
        "delivery_s_p50": statistics.median(delivery) if delivery else 0.0,
        "delivery_s_p95": delivery[max(0, round(0.95 * len(delivery)) - 1)] if delivery else 0.0,
        "new_tokens_min": min((int(t["new_tokens"]) for t in timings), default=0),
        "new_tokens_max": max((int(t["new_tokens"]) for t in timings), default=0),
        "study_ways": study_ways(studies),
        "last_batch_stores": last_batch_stores(stored),
        **timeline,
    }


def last_batch_stores(stored: list[tuple[dict[str, Any], float]]) -> dict[str, float]:
    """The tail's own figures: how many reports the last batch to end had, when the first and
    the last of them had their job marked done, in seconds after its generate ended, and how
    long their transactions then waited for the job's update (SQLite's write lock: the job is
    marked done before that wait, its commit comes after).
    ``stored``: (a report's timings, when its job was done) for each report."""
    ended = [(t.get("batch_stamps") or {}).get("generate_ended") for t, _ in stored]
    last = max((e for e in ended if e is not None), default=None)
    if last is None:
        return {}
    own = [(t, at) for (t, at), end in zip(stored, ended, strict=True) if end == last]
    done = [at for _, at in own]
    waits = [float(t["store_wait_seconds"]) for t, _ in own if "store_wait_seconds" in t]
    figures = {"reports": len(done), "first_s": min(done) - last, "last_s": max(done) - last}
    if waits:
        figures |= {"wait_p50_s": statistics.median(waits), "wait_max_s": max(waits)}
    return figures


def with_waiting(
    batches: list[dict[str, float]], studies: list[tuple[float, dict[str, Any]]], first: float
) -> list[dict[str, float]]:
    """Each batch with ``waiting``: the studies already due (their job queued) when it started
    that ran in a later batch. A batch that starts short while studies wait was cut short by
    the build behind it; with none waiting, by the arrivals."""
    started = [
        (due, float((t.get("batch_stamps") or {}).get("generate_started", 0.0)))
        for due, t in studies
    ]
    rows = []
    for batch in batches:
        start = first + batch["started_s"]
        # 1 ms: a study of this very batch has its start stamp, up to float rounding.
        waiting = sum(1 for due, own in started if due < start and own > start + 1e-3)
        rows.append({**batch, "waiting": waiting})
    return rows


def read_timeline(session: Any, timings: list[dict[str, Any]]) -> dict[str, Any]:
    """When, from the first instance received, the last instance, job, report and delivery
    happened, and each study's median wait per stage: where a run's tail goes."""
    from sqlalchemy import func, select

    from storage.models import Instance, Job, OutboxItem, Report, Study, StudyVersion

    first = session.scalar(select(func.min(Instance.received_at)))
    lasts = {
        "last_received": session.scalar(select(func.max(Instance.received_at))),
        "last_job_created": session.scalar(select(func.max(Job.created_at))),
        "last_report": session.scalar(select(func.max(Report.created_at))),
        "last_outbox_row": session.scalar(select(func.max(OutboxItem.created_at))),
        "last_sent": session.scalar(select(func.max(OutboxItem.sent_at))),
    }
    waits = session.execute(
        select(Study.last_received_at, Job.created_at, Job.finished_at)
        .join(StudyVersion, StudyVersion.study_id == Study.id)
        .join(Job, Job.study_version_id == StudyVersion.id)
    ).all()
    if first is None:
        return {}
    timeline = {f"{key}_s": (at - first).total_seconds() for key, at in lasts.items() if at}
    stamps = [{**(t.get("batch_stamps") or {}), "size": t["batch_size"]} for t in timings]
    batches = batch_rows(stamps, first.timestamp())
    completion = [(job - received).total_seconds() for received, job, _ in waits]
    in_queue = [(done - job).total_seconds() for _, job, done in waits if done]
    ended = [s["generate_ended"] for s in stamps if "generate_ended" in s]
    if ended:  # the tail: what happens after the GPU's last batch
        timeline["last_generate_ended_s"] = max(ended) - first.timestamp()
    return {
        **timeline,
        "first_instance_at": first.timestamp(),
        "completion_wait_s_p50": statistics.median(completion) if completion else 0.0,
        "job_to_report_s_p50": statistics.median(in_queue) if in_queue else 0.0,
        "batch_rows": batches,
    }


BUILD_STAGES = ("claimed", "sources", "topped_up", "rendered", "asked", "built")
RUN_STAGES = ("next_asked", "taken", "run_started", "stores_below", "generate_started")


def build_parts(stamp: dict[str, float]) -> dict[str, float]:
    """Seconds of each stage of building and starting a batch, where the worker stamped
    them (a stage is named by its end)."""
    parts = {}
    for stages in (BUILD_STAGES, RUN_STAGES):
        present = [name for name in stages if stamp.get(name)]
        for earlier, later in itertools.pairwise(present):
            parts[f"{later}_s"] = stamp[later] - stamp[earlier]
    return parts


def batch_rows(stamps: list[dict[str, float]], first: float) -> list[dict[str, float]]:
    """Each batch's stages from the reports' stamps (inference/worker_jobs.py ClaimedBatch),
    in seconds from the first instance: when it was claimed, how long building it took (render,
    questions, processor), how long the GPU stood idle before it, and its generation."""
    unique = {tuple(sorted(s.items())): s for s in stamps if "generate_started" in s}
    ordered = sorted(unique.values(), key=lambda s: s["generate_started"])
    rows, previous_end = [], first
    for stamp in ordered:
        rows.append(
            {
                "size": stamp.get("size", 0),
                "started_s": stamp["generate_started"] - first,
                "claimed_s": stamp.get("claimed", first) - first,
                "build_s": stamp.get("built", 0.0) - stamp.get("claimed", 0.0),
                **build_parts(stamp),
                "idle_before_s": stamp["generate_started"] - previous_end,
                # the batch before's answers handed to the store processes, and the lane
                "after_previous_s": stamp.get("next_asked", previous_end) - previous_end,
                "generate_s": stamp["generate_ended"] - stamp["generate_started"],
            }
        )
        previous_end = stamp["generate_ended"]
    return rows


def full_queue(batches: list[dict[str, float]], max_batch: int) -> dict[str, float] | None:
    """Studies/h while the queue was full: from the start of the first batch of ``max_batch``
    to the end of the last one, every batch between them counted, idle gaps included. What the
    node sustains once a burst's start is over, set beside the engine's pipelined rate."""
    full = [index for index, batch in enumerate(batches) if batch.get("size") == max_batch]
    if len(full) < 2:
        return None
    first, last = batches[full[0]], batches[full[-1]]
    seconds = last["started_s"] + last["generate_s"] - first["started_s"]
    studies = sum(batch["size"] for batch in batches[full[0] : full[-1] + 1])
    return {
        "batches": full[-1] - full[0] + 1,
        "studies": studies,
        "per_hour": studies * 3600 / seconds,
    }


STUDY_STAGES = ("due", "submitted", "rendered", "asked", "ready", "started")
RAMP_STUDIES = 128  # the start of a burst: the first two batches of 64
FIRST_STUDIES = 64  # the first batch of a burst at max_batch 64


def study_ways(studies: list[tuple[float, dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Each study's way from due (its job queued) to the GPU (its batch's generation start, or
    the moment it joined a running batch), stage by stage from its own stamps (inference/
    worker_jobs.py PreparedJob.stamps): the median of each stage over all studies and over the
    first ``RAMP_STUDIES`` to come due, where a burst's start is decided; and when the last of
    the first ``FIRST_STUDIES`` reached each stage (``latest_stages``)."""
    ways = []
    for due, timings in sorted(studies, key=lambda study: study[0]):
        own = timings.get("study_stamps") or {}
        batch = timings.get("batch_stamps") or {}
        started = own.get("joined", batch.get("generate_started"))
        ways.append({"due": due, **own, "started": started} if started else {"due": due})
    result = {}
    for name, chosen in (("median (all)", ways), ("median (ramp)", ways[:RAMP_STUDIES])):
        stages: dict[str, float] = {}
        for earlier, later in itertools.pairwise(STUDY_STAGES):
            seconds = [w[later] - w[earlier] for w in chosen if earlier in w and later in w]
            if seconds:
                stages[later] = statistics.median(seconds)
        total = [w["started"] - w["due"] for w in chosen if "started" in w]
        if total:
            stages["due_to_started"] = statistics.median(total)
        result[name] = stages
    if ways:
        result[f"first {FIRST_STUDIES}, the latest to reach each stage (s from the first due)"] = (
            latest_stages(ways[:FIRST_STUDIES])
        )
    return result


def latest_stages(ways: list[dict[str, float]]) -> dict[str, float]:
    """When the last of ``ways`` reached each stage, from the first one's due: how far the
    pipeline lags behind the arrivals at a burst's start."""
    first = ways[0]["due"]
    return {
        stage: max(w[stage] for w in ways if stage in w) - first
        for stage in ("due", *STUDY_STAGES[1:])
        if any(stage in w for w in ways)
    }
