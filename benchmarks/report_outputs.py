"""A report's outputs on the CPU: what an output process does for each answer.

``inference.report_store.store_report`` parses the answer, builds and durably writes the SR,
the JSON and the ORU of the file destination (``medgemma_node.outputs.ReportOutputs``), then
commits the report, the job's end and the outbox rows. The last batch of a burst is built
after its generate ends, over the output processes (one per core): at batch 256 on 16 cores,
16 reports each, so this time is most of a burst's tail (benchmarks/RESULTS.md).

This stores ``--reports`` reports of new studies (copies of a real CR, SQLite in a temporary
data directory) and prints the median per report, the parts inside it, and beside them in
the same run their references: the SR re-read for its query methods (``build_sr``'s default,
which the outputs leave out), the SR as highdicom's constructor builds it given the whole
content tree (``dicom_node.sr._comprehensive_sr`` gives it the root alone) and the ORU's strict
parse-back alone (the validation every ORU passes: the floor of ``build_oru``).

    python -m benchmarks.report_outputs [--reports 40] [--answer chest|narrative]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import highdicom as hd
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

from config.settings import FileDestination, NodeSettings, load_settings
from dicom_node import sr as sr_module
from hl7_out import oru as oru_module
from inference.report_store import StoreOutcome, StoreTask, store_report
from medgemma_node import outputs
from medgemma_node.outputs import ReportOutputs
from peers.dicom_files import testdata
from peers.local_ingest import ingest_study
from storage.db import Database
from storage.ingest import close_quiet_studies
from storage.installation import ensure_installation_id
from storage.models import Job, JobStatus
from storage.report_ids import reserve_report_ids
from storage.report_schema import ModelIdentity

OWNER = "benchmark"
# A structured answer with a boxed finding, as MedGemma gives for a chest radiograph.
CHEST_ANSWER = json.dumps(
    {
        "findings": [{"label": "nodule", "size_mm": 12, "box_2d": [200, 150, 300, 260]}],
        "impression": "Solitary right upper lobe nodule.",
        "recommendation": "CT chest in 3 months.",
        "urgency": "urgent",
    }
)
# What the random-weight model of the GPU benchmarks gives: text that is no JSON report.
NARRATIVE_ANSWER = " ".join(f"word{index}" for index in range(160))


def node_settings(data_dir: Path) -> NodeSettings:
    settings = load_settings()
    settings.storage.data_dir = data_dir
    settings.storage.database_url = f"sqlite:///{data_dir / 'node.db'}"
    settings.destinations = [
        FileDestination(name="files", kind="file", directory=data_dir / "delivered")
    ]
    return settings


def leased_tasks(db: Database, answer: str) -> list[StoreTask]:
    """The queued jobs leased to OWNER, each with the task that stores its answer."""
    job_ids = close_quiet_studies(db, lambda _modality, _ae: 0.0)
    ids = reserve_report_ids(db, len(job_ids))
    tasks = []
    with db.session() as session:
        for job_id, report_id in zip(job_ids, ids, strict=True):
            job = session.get_one(Job, job_id)
            job.status, job.lease_owner = JobStatus.RUNNING, OWNER
            version = job.study_version
            tasks.append(
                StoreTask(
                    job_id=job_id,
                    study_id=version.study.id,
                    study_version_id=version.id,
                    study_uid=version.study.study_instance_uid,
                    question="Describe the chest radiograph.",
                    language="en",
                    sop_instance_uids=[version.instances[0].sop_instance_uid],
                    geometries=[],
                    preprocess_seconds=0.0,
                    text=answer,
                    identity=ModelIdentity(model_id="benchmark", is_test_model=True),
                    batch_seconds=1.0,
                    prepare_seconds=0.1,
                    batch_size=len(job_ids),
                    prompt_tokens=600,
                    new_tokens=256,
                    report_id=report_id,
                )
            )
    return tasks


class Parts:
    """Seconds spent in each named call, per report."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = defaultdict(list)
        self.last_call: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}

    def timed(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.last_call[name] = (args, kwargs)
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[name].append(time.perf_counter() - started)

        return call


@contextmanager
def measured(parts: Parts) -> Iterator[None]:
    """The outputs' builders, timed where ReportOutputs calls them."""
    with (
        mock.patch.object(outputs, "build_sr", parts.timed("SR built", outputs.build_sr)),
        mock.patch.object(
            outputs, "write_datasets", parts.timed("SR written", outputs.write_datasets)
        ),
        mock.patch.object(outputs, "build_oru", parts.timed("ORU built", outputs.build_oru)),
    ):
        yield


def references(parts: Parts) -> dict[str, float]:
    """Median seconds of the references, on the last report's own inputs."""
    sr_args, sr_kwargs = parts.last_call["SR built"]
    oru_args, oru_kwargs = parts.last_call["ORU built"]
    text = oru_module.build_oru(*oru_args, **oru_kwargs)
    queryable = {**sr_kwargs, "queryable": True}
    with mock.patch.object(sr_module, "_comprehensive_sr", highdicom_around_the_whole_tree):
        whole_tree = median_of(lambda: sr_module.build_sr(*sr_args, **sr_kwargs))
    return {
        "SR built, re-read for its query methods": median_of(
            lambda: sr_module.build_sr(*sr_args, **queryable)
        ),
        "SR built, highdicom given the whole tree": whole_tree,
        "ORU strict parse-back alone": median_of(
            lambda: parse_message(text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
        ),
    }


def highdicom_around_the_whole_tree(
    content: Any, evidence: Any, **attributes: Any
) -> hd.sr.ComprehensiveSR:
    """The SR as highdicom builds it given the whole content tree (before ``_comprehensive_sr``:
    a deep copy and three searches of the tree)."""
    return hd.sr.ComprehensiveSR(evidence=evidence, content=content, **attributes)


def median_of(function: Callable[[], object], runs: int = 20) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def run(reports: int, answer: str, source: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="report-outputs-") as directory:
        data_dir = Path(directory)
        settings = node_settings(data_dir)
        db = Database(settings.storage.database_url)
        db.upgrade()
        with db.session() as session:
            ensure_installation_id(session, data_dir)
        (data_dir / "in").mkdir()
        for _ in range(reports + 1):
            ingest_study(db, data_dir, source, data_dir / "in")
        tasks = leased_tasks(db, answer)
        hook = ReportOutputs(settings)
        store_report(db, OWNER, tasks[0], hook)  # warm: imports, highdicom's tables
        parts, totals = Parts(), []
        with measured(parts):
            for task in tasks[1:]:
                started = time.perf_counter()
                if store_report(db, OWNER, task, hook) is not StoreOutcome.STORED:
                    raise RuntimeError(f"job {task.job_id}: report not stored")
                totals.append(time.perf_counter() - started)
        print_figures(reports, answer, totals, parts, references(parts))
        db.dispose()


def print_figures(
    reports: int, answer: str, totals: list[float], parts: Parts, reference: dict[str, float]
) -> None:
    kind = "chest JSON answer" if answer == CHEST_ANSWER else "narrative answer"
    print(f"{reports} reports ({kind}), file destination with ORU, SQLite, one process")
    print(f"  per report, median     {statistics.median(totals) * 1000:7.1f} ms")
    print(f"  per report, p90        {sorted(totals)[int(len(totals) * 0.9)] * 1000:7.1f} ms")
    for name, seconds in parts.seconds.items():
        print(f"    {name:<21}{statistics.median(seconds) * 1000:7.1f} ms")
    print("  references, same run (last report's inputs):")
    for name, seconds in reference.items():
        print(f"    {name:<41}{seconds * 1000:7.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", type=int, default=40)
    parser.add_argument("--answer", choices=("chest", "narrative"), default="chest")
    parser.add_argument("--source", type=Path, default=None, help="default: RG1_UNCI.dcm")
    args = parser.parse_args()
    source = args.source or testdata("RG1_UNCI.dcm")
    answer = CHEST_ANSWER if args.answer == "chest" else NARRATIVE_ANSWER
    run(args.reports, answer, source)


if __name__ == "__main__":
    main()
