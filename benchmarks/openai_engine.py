"""Node throughput with ``engine = "openai"``, and the local engine's figure beside it.

What runs is the node's inference worker (inference/worker.py) as `medgemma-node worker` runs
it: claim → read and preprocess the DICOM files → engine → parse → report row + SR and GSPS
built and stored, one transaction per study, on SQLite in a temporary directory. The studies are
copies of the real chest CR RG1_UNCI (1955 × 1841, MONOCHROME1), queued before the clock
starts; one study is run first, untimed (imports, first connections).

Engines, each through the node's EngineProvider:

* ``openai``: OpenAIEngine against peers/openai_double.py, a TEST DOUBLE of vLLM's OpenAI server
  on loopback (vLLM's CPU build cannot serve Gemma 3 here: RESULTS.md). It answers every
  request after ``--server-seconds`` (a stand-in for the GPU server's time per study; 0 measures
  what the node itself costs) with a structured chest answer, so findings, regions and the GSPS
  are built. It checks each request's schema but does not decode the PNGs, to keep its own CPU
  time out of the node's figure (the server is another machine).
* ``local``: TransformersEngine with the tiny random demo model on this CPU (its answers are
  gibberish, so reports are narrative-only). MedGemma-4B itself is far slower on a CPU; this is
  the node's own path with the model cost near zero.

    python -m benchmarks.openai_engine [--studies 24] [--server-seconds 0,1] \\
        [--concurrency 8] [--max-batch 8] [--new-tokens 32] [--no-local]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from config.settings import ModelSettings, NodeSettings, OpenAIServerSettings, load_settings
from inference.demo_model import write_demo_model
from inference.loader import EngineProvider
from inference.worker import InferenceWorker
from medgemma_node.outputs import ReportOutputs
from peers.dicom_files import testdata
from peers.local_ingest import ingest_study
from peers.openai_double import OpenAIDouble, Reply
from storage.db import Database
from storage.ingest import close_quiet_studies
from storage.models import Job, JobStatus, Report

ANSWER = json.dumps(
    {
        "findings": [
            {"label": "nodule", "location": "right upper lobe", "box_2d": [210, 180, 330, 300]}
        ],
        "impression": "Right upper lobe nodule.",
        "recommendation": "CT chest.",
        "urgency": "routine",
    }
)


@dataclass
class CaseResult:
    case: str
    studies: int
    seconds: float
    batches: int
    preprocess_s: float  # median per study
    request_kb: float | None  # median chat request body (openai only)
    max_in_flight: int | None

    @property
    def per_hour(self) -> float:
        return self.studies * 3600 / self.seconds


def queue_copies(db: Database, data_dir: Path, work: Path, count: int) -> list[int]:
    """Store ``count`` copies of RG1_UNCI as new studies, as the SCP does; queue their jobs."""
    source = testdata("RG1_UNCI.dcm")
    for _ in range(count):
        ingest_study(db, data_dir, source, work)
    return close_quiet_studies(db, lambda _modality, _ae: 0.0)


def drain(worker: InferenceWorker, db: Database, expected: int) -> None:
    """Run the worker until ``expected`` jobs are done (bounded)."""
    deadline = time.monotonic() + 3600
    while time.monotonic() < deadline:
        worker.run_once()
        with db.session() as session:
            done = session.scalar(
                select(func.count()).select_from(Job).where(Job.status == JobStatus.DONE)
            )
            failed = session.scalar(
                select(func.count()).select_from(Job).where(Job.status == JobStatus.FAILED)
            )
        if failed:
            raise RuntimeError(f"{failed} jobs failed")
        if done == expected:
            return
    raise TimeoutError("the worker did not finish")


def node_settings(work: Path, model: ModelSettings) -> NodeSettings:
    settings = load_settings()
    settings.storage.data_dir = work / "data"
    settings.storage.database_url = f"sqlite:///{work / 'node.db'}"
    settings.model = model
    settings.destinations = []
    return settings


def run_case(case: str, model: ModelSettings, studies: int, double: OpenAIDouble | None) -> Any:
    work = Path(tempfile.mkdtemp(prefix="mgn-openai-bench-"))
    settings = node_settings(work, model)
    db = Database(settings.database_url)
    db.upgrade()
    provider = EngineProvider(settings)
    if provider() is None:
        raise RuntimeError(f"{case}: engine not available: {provider.state}")
    worker = InferenceWorker(db, settings, provider, ReportOutputs(settings))
    try:
        queue_copies(db, settings.storage.data_dir, work / "in", 1)
        drain(worker, db, 1)  # untimed warm-up study
        queue_copies(db, settings.storage.data_dir, work / "in", studies)
        if double is not None:
            double.request_bytes.clear()
            double.max_in_flight = 0
        batches_before = worker.stats.batches
        started = time.perf_counter()
        drain(worker, db, studies + 1)
        seconds = time.perf_counter() - started
        with db.session() as session:
            timings = [t for t in session.scalars(select(Report.timings_json)) if t][1:]
    finally:
        worker.stop()
        db.dispose()
    return CaseResult(
        case=case,
        studies=studies,
        seconds=seconds,
        batches=worker.stats.batches - batches_before,
        preprocess_s=statistics.median(t["preprocess_seconds"] for t in timings),
        request_kb=statistics.median(double.request_bytes) / 1024 if double else None,
        max_in_flight=double.max_in_flight if double else None,
    )


def openai_model(base_url: str, concurrency: int, max_batch: int, new_tokens: int) -> ModelSettings:
    server = OpenAIServerSettings(base_url=base_url, max_concurrent_requests=concurrency)
    return ModelSettings(
        engine="openai",
        openai=server,
        max_batch=max_batch,
        batch_wait_ms=0,
        max_new_tokens=new_tokens,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=24)
    parser.add_argument("--server-seconds", default="0,1", help="comma-separated")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--no-local", action="store_true")
    args = parser.parse_args()

    results: list[CaseResult] = []
    for delay in [float(s) for s in args.server_seconds.split(",")]:
        with OpenAIDouble() as double:
            double.decode_images = False
            double.responder = lambda _record, d=delay: Reply(text=ANSWER, delay_s=d)
            model = openai_model(double.base_url, args.concurrency, args.max_batch, args.new_tokens)
            case = f"openai, server {delay:g} s/study"
            results.append(run_case(case, model, args.studies, double))
            if double.schema_errors:
                raise RuntimeError(f"schema errors: {double.schema_errors[:3]}")
        print(_row(results[-1]), flush=True)
    if not args.no_local:
        demo = Path(tempfile.mkdtemp(prefix="mgn-demo-")) / "demo-model"
        write_demo_model(demo)
        model = ModelSettings(
            model_path=demo,
            device="cpu",
            max_batch=args.max_batch,
            batch_wait_ms=0,
            max_new_tokens=args.new_tokens,
        )
        results.append(run_case("local, demo model on CPU", model, args.studies, None))
        print(_row(results[-1]), flush=True)
    print()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(
        "| case | studies | seconds | studies/h | batches | preprocess s | request KB "
        "| max in flight |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for result in results:
        print(_row(result))


def _row(r: CaseResult) -> str:
    kb = f"{r.request_kb:,.0f}" if r.request_kb is not None else ""
    in_flight = str(r.max_in_flight) if r.max_in_flight is not None else ""
    return (
        f"| {r.case} | {r.studies} | {r.seconds:.1f} | {r.per_hour:,.0f} | {r.batches} | "
        f"{r.preprocess_s:.2f} | {kb} | {in_flight} |"
    )


if __name__ == "__main__":
    main()
