"""Follow-up answer latency through the priority lane, with and without a study backlog.

The node's real path in one process: ``EngineProvider`` loads the model from a local directory
(fast path attached and warmed up on CUDA, as at node start), the ``InferenceWorker`` runs in
its thread with the outputs hook (SR, GSPS, JSON), studies are real DICOM files (copies of
the chest CR RG1_UNCI) in a SQLite database. A radiologist's follow-up question is asked the
way the API asks it: ``start_conversation`` + ``ask`` (the worker's doorbell rings) and
``wait_for_result`` woken by the answer doorbell. Each sample is the first question of a new
conversation about one reported study whose report has one boxed finding, so the model sees
the report as its first answer, the anchors, the question and a crop: two images.

In the same run:
    idle     K questions on an idle node;
    backlog  N studies are queued, and K questions are asked one after another while the
             worker reports them (only answers that arrived before the backlog was done count);
             on CUDA the worker answers them between decode steps of the running study batch,
             on the priority generator ``attach_fast_path`` attaches (inference/lane_steps.py).

Latency = client wall time from ``ask`` to the stored answer (``queued_s``: waiting for the
running batch; ``generate_s``: the engine). The answer is limited to ``--new-tokens``; random
weights stop at an end token only by chance (the table shows the tokens made).

The test models use a character-level tokenizer: as in benchmarks/engine_gpu.py the chest
question is cut to 400 characters (what Gemma's tokenizer makes of the full question), so
prompts have about the real model's length.

    python -m benchmarks.interactive_latency --studies 200 --questions 20            # GPU, 4B
    python -m benchmarks.interactive_latency --model demo --studies 6 --questions 3 \\
        --new-tokens 16 --study-tokens 8 --max-batch 2 --warmup 1                   # CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import func, select

from benchmarks.medgemma_4b import chest_question
from config.settings import NodeSettings, load_settings
from inference.demo_model import write_demo_model
from inference.loader import EngineProvider
from inference.preprocess import attach_regions, prepare_study
from inference.worker import InferenceWorker
from medgemma_node.outputs import ReportOutputs
from peers.dicom_files import testdata
from peers.local_ingest import ingest_study
from storage.conversations import ask, start_conversation
from storage.db import Database
from storage.doorbell import API_DOORBELL, SharedDoorbell
from storage.ingest import close_quiet_studies
from storage.interactive import wait_for_result
from storage.models import Job, JobStatus, Report, Study
from storage.report_schema import Finding, ReportContent

QUESTION = "Is this lesion calcified, and are its margins well defined?"
ANCHOR_BOX = [200.0, 150.0, 300.0, 260.0]  # the report's finding, 0..1000 of the square
POLL_S = 0.05
MAX_QUEUED = 64


@dataclass
class Sample:
    latency_s: float
    queued_s: float
    generate_s: float
    new_tokens: int
    prompt_tokens: int
    images: int
    backlog_left: int  # studies not yet reported when the answer arrived


# --------------------------------------------------------------------------- the node


def write_weights(directory: Path, model: str) -> None:
    """demo: the node's tiny test model; 4b: MedGemma-4B's architecture, random weights
    (benchmarks/medgemma_4b.py); 4b-tiny: its CPU-sized stand-in (checks that path on a CPU)."""
    if model == "demo":
        write_demo_model(directory)
        return
    from benchmarks.engine_gpu import write_weights as write_4b

    write_4b(directory, tiny=model == "4b-tiny")


def node_settings(work: Path, weights: Path, args: argparse.Namespace) -> NodeSettings:
    prompts = work / "prompts"
    prompts.mkdir()
    # Same name as the shipped template: replaces it (a site template, inference/prompts.py).
    question = chest_question().replace('"""', "'''")
    (prompts / "chest_xray.toml").write_text(
        f'en = """\n{question}\n"""\n[match]\nmodality = ["CR", "DX"]\nbody_part = ["CHEST"]\n',
        encoding="utf-8",
    )
    settings = load_settings()
    settings.storage.data_dir = work / "data"
    settings.storage.database_url = f"sqlite:///{work / 'node.db'}"
    settings.destinations = []
    settings.model = settings.model.model_copy(
        update={
            "model_path": weights,
            "device": "auto" if args.model == "4b" else "cpu",
            "max_batch": args.max_batch,
            "max_new_tokens": max(args.study_tokens, args.new_tokens),
            "prompts_dir": prompts,
            "poll_interval_s": 0.1,
        }
    )
    settings.interactive = settings.interactive.model_copy(
        update={"max_new_tokens": args.new_tokens}
    )
    return settings


def jobs_not_done(db: Database) -> int:
    with db.session() as session:
        query = select(func.count()).select_from(Job).where(Job.status != JobStatus.DONE)
        return int(session.scalar(query) or 0)


def jobs_running(db: Database) -> int:
    with db.session() as session:
        query = select(func.count()).select_from(Job).where(Job.status == JobStatus.RUNNING)
        return int(session.scalar(query) or 0)


def wait_until(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(POLL_S)


def give_report_an_anchor(db: Database, study_uid: str, path: Path) -> None:
    """Random weights find nothing: the report gets one boxed finding (A1), as a real chest
    report with a nodule has, so the question carries a crop (speed does not depend on it)."""
    geometries = prepare_study([path]).geometries
    with db.session() as session:
        report = session.scalars(
            select(Report).join(Study).where(Study.study_instance_uid == study_uid)
        ).one()
        content = ReportContent.model_validate(report.content_json).model_copy(
            update={"findings": [Finding(label="nodule", box_2d=ANCHOR_BOX)]}
        )
        report.content_json = attach_regions(content, geometries).model_dump(mode="json")


# --------------------------------------------------------------------------- measuring


def ask_once(
    db: Database, settings: NodeSettings, study_uid: str, bell: SharedDoorbell, timeout_s: float
) -> Sample:
    conversation = start_conversation(db, study_uid, created_by="bench")
    started = time.perf_counter()
    request_id = ask(
        db,
        settings.storage.data_dir,
        conversation.id,
        QUESTION,
        max_new_tokens=settings.interactive.max_new_tokens,
        max_queued=MAX_QUEUED,
    )
    outcome = wait_for_result(db, request_id, timeout_s, bell, settings.interactive.poll_interval_s)
    latency = time.perf_counter() - started
    if outcome.result is None:
        raise RuntimeError(f"question {request_id}: {outcome.status} {outcome.error}")
    timings = outcome.result["timings"]
    return Sample(
        latency_s=latency,
        queued_s=float(timings.get("queued_s", 0.0)),
        generate_s=float(timings.get("generate_s", 0.0)),
        new_tokens=int(timings.get("new_tokens", 0)),
        prompt_tokens=int(timings.get("prompt_tokens", 0)),
        images=2 if outcome.result.get("referenced_anchor_id") else 1,
        backlog_left=jobs_not_done(db),
    )


def summary(label: str, samples: list[Sample]) -> dict[str, Any]:
    latencies = [s.latency_s for s in samples]
    return {
        "condition": label,
        "n": len(samples),
        "p50_s": float(np.percentile(latencies, 50)) if samples else float("nan"),
        "p95_s": float(np.percentile(latencies, 95)) if samples else float("nan"),
        "max_s": max(latencies, default=float("nan")),
        "queued_p50_s": statistics.median(s.queued_s for s in samples) if samples else 0.0,
        "generate_p50_s": statistics.median(s.generate_s for s in samples) if samples else 0.0,
        "new_tokens": sorted({s.new_tokens for s in samples}),
        "prompt_tokens": max((s.prompt_tokens for s in samples), default=0),
        "images": sorted({s.images for s in samples}),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    source = testdata("RG1_UNCI.dcm")
    with tempfile.TemporaryDirectory(prefix="interactive-bench-") as directory:
        work = Path(directory)
        weights = work / "weights"
        write_weights(weights, args.model)
        settings = node_settings(work, weights, args)
        data_dir = settings.storage.data_dir
        db = Database(settings.database_url)
        db.upgrade()
        provider = EngineProvider(settings)
        started = time.perf_counter()
        if provider() is None:
            raise RuntimeError(str(provider.state))
        load_s = time.perf_counter() - started
        worker = InferenceWorker(db, settings, provider, ReportOutputs(settings))
        bell = SharedDoorbell(data_dir, API_DOORBELL)
        worker.start()
        bell.start()
        try:
            study_uid, path = ingest_study(db, data_dir, source, work)
            close_quiet_studies(db, lambda _m, _a: 0.0)
            wait_until(lambda: jobs_not_done(db) == 0, args.timeout, "the first report")
            give_report_an_anchor(db, study_uid, path)
            for _ in range(args.warmup):
                ask_once(db, settings, study_uid, bell, args.timeout)
            idle = [
                ask_once(db, settings, study_uid, bell, args.timeout) for _ in range(args.questions)
            ]
            busy, backlog = measure_under_backlog(db, settings, study_uid, bell, source, work, args)
        finally:
            bell.stop()
            worker.stop()
            db.dispose()
    return {
        "model": provider.state.get("identity", {}),
        "load_s": load_s,
        "studies": args.studies,
        "max_batch": args.max_batch,
        "study_tokens": args.study_tokens,
        "new_tokens": args.new_tokens,
        "idle": summary("idle node", idle),
        "backlog": summary(f"backlog of {args.studies} studies", busy),
        "backlog_run": backlog,
    }


def measure_under_backlog(
    db: Database,
    settings: NodeSettings,
    study_uid: str,
    bell: SharedDoorbell,
    source: Path,
    work: Path,
    args: argparse.Namespace,
) -> tuple[list[Sample], dict[str, Any]]:
    """Queue the backlog, then ask while it is being reported; also time the backlog."""
    data_dir = settings.storage.data_dir
    for _ in range(args.studies):
        ingest_study(db, data_dir, source, work)
    queued_at = time.perf_counter()
    close_quiet_studies(db, lambda _m, _a: 0.0)
    wait_until(lambda: jobs_running(db) > 0, args.timeout, "the backlog to start")
    samples: list[Sample] = []
    while len(samples) < args.questions:
        sample = ask_once(db, settings, study_uid, bell, args.timeout)
        if sample.backlog_left == 0:
            break  # answered after the backlog was done: not a backlog sample
        samples.append(sample)
    wait_until(lambda: jobs_not_done(db) == 0, args.timeout * 10, "the backlog to finish")
    seconds = time.perf_counter() - queued_at
    return samples, {"seconds": seconds, "studies_per_hour": args.studies * 3600 / seconds}


def print_table(result: dict[str, Any]) -> None:
    print(
        f"model: {result['model'].get('model_id')} on {result['model'].get('device')}, "
        f"loaded in {result['load_s']:.1f} s; study answers {result['study_tokens']} tokens, "
        f"max_batch {result['max_batch']}"
    )
    columns = (
        "n", "p50 s", "p95 s", "max s", "queued p50", "generate p50", "new tok", "prompt tok",
        "images",
    )  # fmt: skip
    print(f"{'follow-up answer':32s} " + " ".join(f"{c:>12s}" for c in columns))
    for key in ("idle", "backlog"):
        row = result[key]
        values = (
            str(row["n"]),
            f"{row['p50_s']:.3f}",
            f"{row['p95_s']:.3f}",
            f"{row['max_s']:.3f}",
            f"{row['queued_p50_s']:.3f}",
            f"{row['generate_p50_s']:.3f}",
            ",".join(str(t) for t in row["new_tokens"]),
            str(row["prompt_tokens"]),
            ",".join(str(i) for i in row["images"]),
        )
        print(f"{row['condition']:32s} " + " ".join(f"{v:>12s}" for v in values))
    backlog = result["backlog_run"]
    print(
        f"backlog: {result['studies']} studies reported in {backlog['seconds']:.1f} s "
        f"({backlog['studies_per_hour']:.0f} studies/h) while the questions were answered"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--studies", type=int, default=200, help="backlog size N")
    parser.add_argument("--questions", type=int, default=20, help="samples per condition")
    parser.add_argument("--new-tokens", type=int, default=128, help="follow-up answer length")
    parser.add_argument("--study-tokens", type=int, default=256, help="report answer length")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured questions first")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument(
        "--model",
        choices=("4b", "demo", "4b-tiny"),
        default="4b",
        help="4b on the GPU; demo (the node's test model) or 4b-tiny on the CPU",
    )
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    result = run(args)
    print_table(result)
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")


if __name__ == "__main__":
    main()
