"""End-to-end latency of the node's own pipeline, with real peers on loopback.

For each of N studies (the real chest CR RG1_UNCI, each as a new study) sent one at a time by a
pynetdicom SCU to `medgemma-node serve` (scripted engine: the model itself takes ~0 s):

    latency = (SR stored at Orthanc and ORU received by the MLLP listener, whichever is later)
              - (Success of the last C-STORE)
              - the study's quiet period
              - the model's time for that study (Report.timings_json.batch_seconds)

That is the time the node adds: completion scheduling, preprocessing, SR/GSPS/ORU building,
database commits, delivery. Target: p50 <= 0.5 s.

``--mpps on|both`` sends each study as a modality with MPPS does: N-CREATE (IN PROGRESS), the
C-STORE, then N-SET COMPLETED listing the image, in one association; the study is complete
when the N-SET arrives instead of after its quiet period. Each run then also prints the whole
time from the last C-STORE's Success to the results (nothing subtracted): ``both`` measures it
without and with MPPS on the same settings, side by side.

    .venv/bin/python -m benchmarks.e2e [--studies 50] [--quiet 1.0]   # from the repository root
    .venv/bin/python -m benchmarks.e2e --studies 10 --quiet 5 --mpps both  # CR's 5 s default
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pydicom
from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from sqlalchemy import select

from peers.dicom_files import copy_with_new_uids, testdata
from peers.mllp_listener import MLLPListener
from peers.node_process import NodeProcess
from peers.orthanc import OrthancServer
from storage.db import Database
from storage.models import Report, Study

ANSWER = {
    "findings": [
        {"label": "nodule", "location": "right upper lobe", "box_2d": [210, 180, 330, 300]}
    ],
    "impression": "Right upper lobe nodule.",
    "recommendation": "CT chest.",
    "urgency": "routine",
}
POLL_S = 0.005


class SrWatcher:
    """Polls Orthanc's REST API and notes when each study's SR arrived."""

    def __init__(self, orthanc: OrthancServer) -> None:
        self.orthanc = orthanc
        self.arrived: dict[str, float] = {}
        self.seen: set[str] = set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            # Orthanc busy (a loaded machine): look again at the next poll.
            with contextlib.suppress(httpx.HTTPError):
                self._look()
            time.sleep(POLL_S)

    def _look(self) -> None:
        for orthanc_id in set(self.orthanc.instance_ids()) - self.seen:
            now = time.perf_counter()
            self.seen.add(orthanc_id)
            tags = self.orthanc.instance_tags(orthanc_id)
            if str(tags.get("SOPClassUID", "")).startswith("1.2.840.10008.5.1.4.1.1.88."):
                self.arrived[tags["StudyInstanceUID"]] = now


MPPS_SOP_CLASS = "1.2.840.10008.3.1.2.3.3"


def send(path: Path, port: int, mpps: bool = False) -> float:
    dataset = pydicom.dcmread(path)
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
    ae.add_requested_context(MPPS_SOP_CLASS)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDGEMMA")
    step = generate_uid()
    if mpps:
        _mpps(assoc.send_n_create(_step("IN PROGRESS", dataset), MPPS_SOP_CLASS, step))
    status = assoc.send_c_store(dataset)
    acked = time.perf_counter()
    if mpps:
        _mpps(assoc.send_n_set(_step("COMPLETED", dataset), MPPS_SOP_CLASS, step))
    assoc.release()
    if not status or status.Status != 0:
        raise RuntimeError(f"C-STORE failed: {status}")
    return acked


def _step(status: str, image: Dataset) -> Dataset:
    """The attributes of an MPPS N-CREATE / N-SET the node reads (PS3.4 F.7.2)."""
    step = Dataset()
    step.PerformedProcedureStepStatus = status
    scheduled = Dataset()
    scheduled.StudyInstanceUID = image.StudyInstanceUID
    step.ScheduledStepAttributesSequence = [scheduled]
    reference = Dataset()
    reference.ReferencedSOPClassUID = image.SOPClassUID
    reference.ReferencedSOPInstanceUID = image.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = image.SeriesInstanceUID
    series.ReferencedImageSequence = [reference] if status == "COMPLETED" else []
    step.PerformedSeriesSequence = [series]
    return step


def _mpps(answer: tuple[Dataset | None, Dataset | None]) -> None:
    status = answer[0]
    if status is None or int(status.Status) != 0:
        raise RuntimeError(f"MPPS failed: {status}")


def oru_times(listener: MLLPListener) -> dict[str, float]:
    """Arrival time per study: the ORU's OBR carries no UID, so match on MSH-10 order."""
    return {message.control_id: message.received_at for message in listener.received}


def report_timings(db: Database) -> dict[str, dict[str, float]]:
    with db.session() as session:
        rows = session.execute(
            select(Study.study_instance_uid, Report.timings_json).join(
                Report, Report.study_id == Study.id
            )
        ).all()
    return {uid: timings for uid, timings in rows}


def run(studies: int, quiet: float, mpps: bool = False) -> list[float]:
    work = Path(tempfile.mkdtemp(prefix="mgn-e2e-"))
    responses = work / "answers.json"
    responses.write_text(json.dumps([json.dumps(ANSWER)]))
    latencies: list[float] = []
    with OrthancServer(work / "orthanc") as orthanc:
        listener = MLLPListener().start()
        sections = {
            # Poll intervals stay at the product defaults: the figure is what a site gets.
            "completion": {"default_seconds": quiet, "rules": []},
            "model": {
                "engine": "scripted",
                "scripted_responses_file": str(responses),
                "batch_wait_ms": 0,
            },
            "destinations": [
                {
                    "name": "pacs",
                    "kind": "dicom",
                    "ae_title": orthanc.aet,
                    "host": "127.0.0.1",
                    "port": orthanc.dicom_port,
                },
                {"name": "his", "kind": "hl7", "host": "127.0.0.1", "port": listener.port},
            ],
        }
        node = NodeProcess(work / "node", sections).start()
        watcher = SrWatcher(orthanc)
        watcher.thread.start()
        db = Database(node.database_url)
        try:
            latencies = _measure(studies, quiet, work, node, watcher, listener, db, mpps)
        finally:
            watcher.stop.set()
            node.terminate()
            listener.stop()
            db.dispose()
    return latencies


def _measure(
    studies: int,
    quiet: float,
    work: Path,
    node: NodeProcess,
    watcher: SrWatcher,
    listener: MLLPListener,
    db: Database,
    mpps: bool,
) -> list[float]:
    latencies = []
    source = testdata("RG1_UNCI.dcm")
    # Study 0 warms up the worker process (imports, first database connections); not counted.
    for index in range(studies + 1):
        path = copy_with_new_uids(source, work / "send" / f"{index}.dcm")
        study_uid = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
        acked = send(path, node.port, mpps)
        expected_orus = index + 1
        # The first study also waits for the worker process to start (imports: slow on a
        # loaded machine).
        deadline = time.monotonic() + (300 if index == 0 else 60)
        while study_uid not in watcher.arrived or len(listener.received) < expected_orus:
            if time.monotonic() > deadline:
                raise TimeoutError(f"study {index}: results did not arrive")
            time.sleep(POLL_S)
        oru_at = listener.received[-1].received_at
        done = max(watcher.arrived[study_uid], oru_at)
        timings = report_timings(db)[study_uid]
        if index > 0:
            wait = 0.0 if mpps else quiet  # with MPPS no quiet period is waited
            latencies.append(done - acked - wait - float(timings.get("batch_seconds", 0.0)))
            WHOLE.append(done - acked)
            BREAKDOWN.append(timings)
    return latencies


BREAKDOWN: list[dict[str, float]] = []
WHOLE: list[float] = []  # last C-STORE Success -> results, nothing subtracted


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--studies", type=int, default=50)
    parser.add_argument("--quiet", type=float, default=1.0, help="quiet period, seconds")
    parser.add_argument("--mpps", choices=("off", "on", "both"), default="off")
    args = parser.parse_args()
    if args.mpps == "off":
        report(run(args.studies, args.quiet), args.quiet)
        return
    for with_mpps in (False, True) if args.mpps == "both" else (True,):
        BREAKDOWN.clear()
        WHOLE.clear()
        report(run(args.studies, args.quiet, with_mpps), args.quiet, mpps=with_mpps)
        whole = sorted(WHOLE)
        print(
            f"  {'with' if with_mpps else 'without'} MPPS: last C-STORE -> results  "
            f"p50 {statistics.median(whole):.3f} s   min {whole[0]:.3f} s   max {whole[-1]:.3f} s"
        )


def report(latencies: list[float], quiet: float, *, mpps: bool = False) -> None:
    ordered = sorted(latencies)
    p50 = statistics.median(ordered)
    p95 = ordered[max(0, round(0.95 * len(ordered)) - 1)]
    waited = "MPPS: none waited" if mpps else "subtracted"
    print(f"studies: {len(ordered)}  quiet period: {quiet:.2f} s ({waited})  engine: scripted")
    spread = f"min {ordered[0]:.3f} s   max {ordered[-1]:.3f} s"
    print(f"node latency  p50 {p50:.3f} s   p95 {p95:.3f} s   {spread}")
    print(f"target        p50 <= 0.500 s   -> {'met' if p50 <= 0.5 else 'NOT met'}")
    for key in ("preprocess_seconds", "batch_seconds", "outputs_seconds"):
        values = [float(t.get(key, 0.0)) for t in BREAKDOWN]
        print(f"  inside the worker, median {key:20s} {statistics.median(values):.3f} s")


if __name__ == "__main__":
    main()
