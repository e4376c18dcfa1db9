"""The whole node on one GPU: real CR studies by C-STORE into `serve` → report JSON files,
beside the engine's own pipelined rate in the same run.

For each ``max_batch`` (``--max-batch``, then each of ``--sweep``):

* ``medgemma-node serve`` as a subprocess (peers.node_process) with the MedGemma-4B
  architecture with random weights, written once by the engine benchmark's own writer
  (benchmarks.engine_gpu.write_weights: ``TransformersEngine`` loads it, fast path attached at
  start), 256 new tokens, quiet period 0.5 s, one file destination (JSON, ORU, SR/GSPS copies),
  SQLite. The chest question is the shipped one cut to 400 characters as a site template, as
  benchmarks/engine_gpu.py uses it (the demo tokenizer has one token per character).
* Sender: ``--studies`` copies of the real chest CR RG1_UNCI (7.2 MB, MONOCHROME1), each a new
  study (new Study/Series/SOP UIDs), written to disk before the clock starts and sent as files
  (pynetdicom sends a file's bytes without decoding them) over ``--associations`` associations,
  each in a process of its own so the sender is not the limit.
* Node studies/h = studies × 3600 / (first C-STORE → the last report JSON in the destination).
* Per stage, from the reports' timings and the outbox rows: ingest (first C-STORE → last
  Success), decode/render per study (in the render processes), prepare and generate per batch
  (processor + copy, in the prefetch thread; generate_prepared on the GPU), outputs per study
  (SR, GSPS, ORU, JSON + outbox rows), delivery (outbox row written → file written).
* Engine reference, same run and same weights, after the node has stopped:
  ``engine_gpu.time_sustained`` pipelined (the worker's prepare-ahead), ``--engine-batches``
  batches of ``max_batch`` synthetic studies.

    python -m benchmarks.node_gpu --studies 640 --max-batch 64 --sweep 32,128,256
    python -m benchmarks.node_gpu --tiny --studies 8 --max-batch 4 --new-tokens 8  # CPU
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
import tomllib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import generate_uid

from benchmarks.node_profile import BUILD_STAGES, RUN_STAGES, full_queue, read_profile
from peers.node_process import NodeProcess

CHEST_TEMPLATE = Path(__file__).resolve().parents[1] / "config" / "prompts" / "chest_xray.toml"


# -- studies and the sender ------------------------------------------------------------------


def write_copies(source: Path, directory: Path, indices: list[int]) -> list[Path]:
    """Copies of ``source`` as new studies (in a process of the pool)."""
    dataset = pydicom.dcmread(source)
    paths = []
    for index in indices:
        dataset.StudyInstanceUID = generate_uid()
        dataset.SeriesInstanceUID = generate_uid()
        dataset.SOPInstanceUID = generate_uid()
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        path = directory / f"{index:05d}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def make_studies(source: Path, directory: Path, count: int, processes: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    chunks = [list(range(k, count, processes)) for k in range(processes)]
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        parts = pool.map(write_copies, [source] * processes, [directory] * processes, chunks)
        return sorted(path for part in parts for path in part)


def send_files(port: int, paths: list[Path]) -> tuple[float, float, int]:
    """One association sending ``paths`` in turn; (first request, last Success, failures)."""
    from pynetdicom import AE

    header = pydicom.dcmread(paths[0], stop_before_pixels=True)
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(header.SOPClassUID, header.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDGEMMA")
    if not assoc.is_established:
        return time.time(), time.time(), len(paths)
    started, failures = time.time(), 0
    for path in paths:
        status = assoc.send_c_store(path)  # the file's bytes, not decoded
        failures += not status or status.Status != 0
    acked = time.time()
    assoc.release()
    return started, acked, failures


def _ready() -> None:
    """Imports done in a sender process before the clock starts."""
    import pynetdicom  # noqa: F401


# -- one node run ----------------------------------------------------------------------------


def write_site_prompts(directory: Path, characters: int, question_first: bool = False) -> Path:
    """The shipped chest template with its English question cut (the engine benchmark's);
    ``question_first``: asked before the image (the template option)."""
    from benchmarks.medgemma_4b import chest_question

    shipped = tomllib.loads(CHEST_TEMPLATE.read_text(encoding="utf-8"))
    match = shipped["match"]
    question = chest_question(characters).replace('"""', "'''")
    directory.mkdir(parents=True, exist_ok=True)
    lines = [
        'description = "Chest radiograph (benchmark: question cut to the real token count)"',
        f'en = """{question}"""',
        f"question_first = {json.dumps(question_first)}",
        "[match]",
        *(f"{key} = {json.dumps(value)}" for key, value in match.items()),
    ]
    (directory / "chest_xray.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


def node_sections(args: argparse.Namespace, case: dict[str, Any], work: Path) -> dict[str, Any]:
    model: dict[str, Any] = {
        "engine": "transformers",
        "model_path": str(args.weights),
        "max_batch": case["max_batch"],
        "max_new_tokens": args.new_tokens,
        "prompts_dir": str(args.prompts),
        "lease_seconds": 3600.0,
        "join_running_batch": not args.no_joins,
        "early_start": not args.no_early_start,
    }
    for key in ("render_processes", "output_processes"):
        if case.get(key) is not None:
            model[key] = case[key]
    receivers = (
        {} if args.receive_processes is None else {"receive_processes": args.receive_processes}
    )
    storage = {"database_url": args.database_url} if args.database_url else {}
    return {
        "storage": storage,
        "completion": {"default_seconds": args.quiet, "rules": []},
        "model": model,
        "dicom": {"max_associations": args.associations + 4, **receivers},
        "logging": {"level": args.log_level},
        "destinations": [
            {"name": "files", "kind": "file", "directory": str(work / "delivered")},
        ],
    }


def wait_model_loaded(node: NodeProcess, timeout_s: float) -> float:
    """Seconds until the worker's status file says the model is loaded (fast path warm)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        assert node.proc is not None
        if node.proc.poll() is not None:
            raise RuntimeError(f"serve exited:\n{node.stderr()[-4000:]}")
        for path in (node.data_dir / "run").glob("worker-*.json"):
            try:
                state = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            status = state.get("model", {}).get("status")
            if status == "loaded":
                return time.monotonic() - started
            if status in ("error", "missing weights"):
                raise RuntimeError(f"model not loaded: {state['model']}")
        time.sleep(0.2)
    raise TimeoutError(f"model not loaded in {timeout_s} s:\n{node.stderr()[-4000:]}")


def wait_processes_ready(node: NodeProcess, timeout_s: float) -> None:
    """Until the worker's render and store processes have started (its status file says so)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if worker_state(node).get("processes_ready"):
            return
        time.sleep(0.2)
    raise TimeoutError(f"render and store processes not started in {timeout_s} s")


def worker_state(node: NodeProcess) -> dict[str, Any]:
    for path in (node.data_dir / "run").glob("worker-*.json"):
        try:
            return dict(json.loads(path.read_text()).get("model", {}).get("worker", {}))
        except (OSError, ValueError):
            continue
    return {}


def wait_reports(directory: Path, count: int, timeout_s: float) -> float:
    """time.time() when the ``count``-th report JSON is in the destination directory."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if directory.is_dir() and sum(1 for _ in directory.glob("*_report.json")) >= count:
            return time.time()
        time.sleep(0.02)
    found = sum(1 for _ in directory.glob("*_report.json")) if directory.is_dir() else 0
    raise TimeoutError(f"{found} of {count} report JSON files after {timeout_s} s")


def flush_page_cache() -> float:
    """Write out what this benchmark wrote before the burst (the study copies, the model's
    weights: gigabytes); seconds taken. Left dirty, they can hold up the SCP's first fsyncs
    (ext4 writes them with the journal commit an fsync waits for): one run, whose model had
    loaded soonest after they were written, took 2.1 s to store its first instance, against
    0.0-0.1 s in the others (benchmarks/RESULTS.md, eleventh session)."""
    started = time.monotonic()
    os.sync()
    return time.monotonic() - started


def held_lines(log_path: Path) -> list[str]:
    """The worker's account of each batch that held for its rows (inference/decode_joins.py:
    how long, its prompt passes and their GPU time), as the node logged it."""
    try:
        text = log_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    return [line.split(": ", 1)[-1] for line in text.splitlines() if "batch held" in line]


def run_node(args: argparse.Namespace, case: dict[str, Any], files: list[Path]) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"node-mb{case['max_batch']}-", dir=args.work))
    node = NodeProcess(work / "node", node_sections(args, case, work)).start()
    holds: list[str] = []
    try:
        load_s = wait_model_loaded(node, args.load_timeout)
        wait_processes_ready(node, args.load_timeout)  # as on a node that runs for days
        flush_s = flush_page_cache()
        time.sleep(1.0)
        studies = files[: case["studies"]]
        associations = min(args.associations, len(studies))  # no sender without a study
        chunks = [studies[k::associations] for k in range(associations)]
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(associations, mp_context=spawn) as senders:
            for future in [senders.submit(_ready) for _ in chunks]:
                future.result()
            sent = [senders.submit(send_files, node.port, chunk) for chunk in chunks]
            results = [future.result() for future in sent]
        first, last_ack = min(r[0] for r in results), max(r[1] for r in results)
        failures = sum(r[2] for r in results)
        done = wait_reports(work / "delivered", len(studies) - failures, args.report_timeout)
        time.sleep(2.5)  # the worker's status file is written every 2 s
        stats = worker_state(node)
        profile = read_profile(node.database_url)
    finally:
        node.terminate(timeout=120)
        holds = held_lines(node.stderr_path)
        if args.keep_log is not None:
            args.keep_log.mkdir(parents=True, exist_ok=True)
            log_name = f"serve-mb{case['max_batch']}-{case['studies']}.log"
            shutil.copy(node.stderr_path, args.keep_log / log_name)
        shutil.rmtree(work, ignore_errors=True)
    count = len(studies)
    return {
        **case,
        "model_load_s": load_s,
        "flush_s": flush_s,
        "ingest_s": last_ack - first,
        "ingest_per_hour": count * 3600 / (last_ack - first),
        "store_failures": failures,
        "seconds": done - first,
        "node_per_hour": count * 3600 / (done - first),
        # From the first C-STORE's start to its instance in the database.
        "first_instance_s": profile.get("first_instance_at", first) - first,
        "last_json_s": done - profile.get("first_instance_at", first),
        "worker": stats,
        "holds": holds,
        **profile,
    }


# -- the engine reference ---------------------------------------------------------------------


def engine_reference(args: argparse.Namespace, max_batch: int, batches: int) -> dict[str, Any]:
    """The engine alone, pipelined as the worker runs it, from the same weights directory."""
    import gc

    import torch

    from benchmarks.engine_gpu import (
        IMAGE_4B,
        IMAGE_TINY,
        sustained_requests,
        time_sustained,
    )
    from config.settings import load_settings
    from inference.loader import attach_fast_path
    from inference.transformers_engine import TransformersEngine

    settings = load_settings()
    settings.model = settings.model.model_copy(
        update={
            "model_path": args.weights,
            "max_batch": max_batch,
            "max_new_tokens": args.new_tokens,
            "prompts_dir": args.prompts,
        }
    )
    engine = TransformersEngine(settings.model)
    attach_fast_path(engine, settings)
    side = IMAGE_TINY if args.tiny else IMAGE_4B
    work = sustained_requests(batches, max_batch, args.new_tokens, side)
    if args.question_first:  # the node's template order, so both run the same prompts
        work = [[replace(r, question_first=True) for r in batch] for batch in work]
    row = time_sustained(engine, work, pipelined=True)
    row.pop("texts")
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


# -- the run ----------------------------------------------------------------------------------


def cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    processes = {
        "render_processes": args.render_processes,
        "output_processes": args.output_processes,
    }
    main = {"max_batch": args.max_batch, "studies": args.studies, **processes}
    sweep = [int(b) for b in args.sweep.split(",") if b] if args.sweep else []
    planned = [main] + [
        {"max_batch": b, "studies": b * args.sweep_batches, **processes}
        for b in sweep
        if b != args.max_batch
    ]
    if args.baseline_studies:
        planned.append(
            {
                "max_batch": args.max_batch,
                "studies": args.baseline_studies,
                "render_processes": 0,
                "output_processes": 0,
            }
        )
    return planned


def engine_batches(args: argparse.Namespace, max_batch: int) -> int:
    """``--engine-batches`` for the main size; about the same number of studies for others."""
    if max_batch == args.max_batch:
        return args.engine_batches
    return max(3, args.engine_batches * args.max_batch // max_batch)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from benchmarks.engine_gpu import write_weights
    from peers.dicom_files import testdata

    started = time.monotonic()
    planned = cases(args)
    source = Path(args.source) if args.source else testdata("RG1_UNCI.dcm")
    count = max(case["studies"] for case in planned)
    files = make_studies(source, args.work / "studies", count, args.copy_processes)
    print(f"{count} studies written ({time.monotonic() - started:.1f} s)", flush=True)
    args.weights = args.work / "model"
    print(f"weights written in {write_weights(args.weights, args.tiny):.1f} s", flush=True)
    args.prompts = write_site_prompts(
        args.work / "prompts", args.question_chars, args.question_first
    )
    rows: list[dict[str, Any]] = []
    seen_reference: dict[int, dict[str, Any]] = {}
    for case in planned:
        if time.monotonic() - started > args.budget_s:
            print(f"budget of {args.budget_s:.0f} s spent: skipped {case}", flush=True)
            continue
        row = run_node(args, case, files)
        size = case["max_batch"]
        if size not in seen_reference:
            seen_reference[size] = engine_reference(args, size, engine_batches(args, size))
        row["engine"] = seen_reference[size]
        rows.append(row)
        print_row(row, header=len(rows) == 1)
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(rows, indent=2, default=str))
    return rows


COLUMNS = (
    ("max_batch", "mb", "{:d}"),
    ("studies", "studies", "{:d}"),
    ("procs", "r/o procs", "{}"),
    ("node_per_hour", "node/h", "{:,.0f}"),
    ("engine_per_hour", "engine/h", "{:,.0f}"),
    ("ratio", "node/eng", "{:.3f}"),
    ("ingest_s", "ingest s", "{:.1f}"),
    ("ingest_per_hour", "ingest/h", "{:,.0f}"),
    ("render_s_per_study", "render s", "{:.3f}"),
    ("prepare_s_per_batch", "prepare s", "{:.3f}"),
    ("generate_s_per_batch", "generate s", "{:.3f}"),
    ("engine_generate_s", "eng gen s", "{:.3f}"),
    ("outputs_s_per_study", "outputs s", "{:.3f}"),
    ("delivery_s_p50", "deliv p50", "{:.3f}"),
    ("batches", "batches", "{:d}"),
    ("gpu_busy", "gen/wall", "{:.2f}"),
)


def print_last_batch_stores(row: dict[str, Any]) -> None:
    """The tail: when the last batch's reports were stored, after its generate ended."""
    tail = row.get("last_batch_stores") or {}
    if tail:
        waited = (
            f"; their transactions then waited {tail['wait_p50_s']:.3f} s (p50), at most "
            f"{tail['wait_max_s']:.3f} s, for the write lock"
            if "wait_max_s" in tail
            else ""
        )
        print(
            f"    the last batch's {tail['reports']:.0f} reports' jobs marked done from "
            f"{tail['first_s']:.3f} to {tail['last_s']:.3f} s after its generate ended{waited}",
            flush=True,
        )


def print_row(row: dict[str, Any], header: bool) -> None:
    engine = row["engine"]
    row["engine_per_hour"] = engine["steady_per_hour"] or engine["studies_per_hour"]
    row["engine_generate_s"] = engine["generate_s"]
    row["ratio"] = row["node_per_hour"] / row["engine_per_hour"]
    row["gpu_busy"] = row["generate_s_total"] / row["seconds"]
    render, output = row.get("render_processes"), row.get("output_processes")
    row["procs"] = f"{'auto' if render is None else render}/{'auto' if output is None else output}"
    if header:
        print(" ".join(f"{title:>10s}" for _, title, _ in COLUMNS))
    print(" ".join(f"{fmt.format(row[key]):>10s}" for key, _, fmt in COLUMNS), flush=True)
    print(
        f"    {row['reports']} reports, new tokens {row['new_tokens_min']}-"
        f"{row['new_tokens_max']}, mean batch {row['mean_batch']:.1f}, model load "
        f"{row['model_load_s']:.1f} s, page cache flushed before the burst in "
        f"{row.get('flush_s', 0.0):.1f} s, delivery p95 {row['delivery_s_p95']:.3f} s, C-STORE "
        f"failures {row['store_failures']}, engine pipelined {engine['batches']} x "
        f"{engine['batch']} (all batches {engine['studies_per_hour']:,.0f}/h, prepare "
        f"{engine['prepare_s']:.3f} s)",
        flush=True,
    )
    stages: tuple[str, ...] = ("last_received_s", "last_job_created_s", "last_generate_ended_s")
    stages += ("last_report_s", "last_outbox_row_s", "last_sent_s")
    print(
        "    from the first instance: "
        + ", ".join(
            f"{key[:-2].replace('_', ' ')} {row.get(key, float('nan')):.1f} s" for key in stages
        )
        + f", last report JSON {row.get('last_json_s', float('nan')):.1f} s (first C-STORE "
        f"{row.get('first_instance_s', float('nan')):.1f} s before the first instance)"
        + f"; per study p50: completion wait {row.get('completion_wait_s_p50', 0.0):.2f} s, "
        f"job to report {row.get('job_to_report_s_p50', 0.0):.2f} s",
        flush=True,
    )
    print_last_batch_stores(row)
    print(
        f"    report transaction p50: waited {row.get('store_wait_s_per_study', 0.0):.3f} s "
        f"for the job's update, then held {row.get('store_held_s_per_study', 0.0):.3f} s "
        "before its commit",
        flush=True,
    )
    batches = row.get("batch_rows") or []
    for stage in (*BUILD_STAGES[1:], "after_previous", *RUN_STAGES[1:]):
        seconds = [b[f"{stage}_s"] for b in batches if f"{stage}_s" in b]
        if seconds:
            print(
                f"    build stage '{stage}': median {statistics.median(seconds):.3f} s, "
                f"max {max(seconds):.3f} s"
            )
    for name, ways in (row.get("study_ways") or {}).items():
        print(
            f"    each study, {name}: "
            + ", ".join(f"to {stage} {seconds:.3f} s" for stage, seconds in ways.items())
        )
    sustained = full_queue(batches, row["max_batch"])
    if sustained is not None:
        print(
            f"    while the queue was full ({sustained['batches']:.0f} batches, "
            f"{sustained['studies']:.0f} studies): {sustained['per_hour']:,.0f}/h, "
            f"{sustained['per_hour'] / row['engine_per_hour']:.3f} x the engine",
            flush=True,
        )
    early = row["worker"].get("early_start")
    if early:
        print(
            f"    studies run in their quiet period: {early.get('taken', 0)} taken, "
            f"{early.get('claimed', 0)} stored under their jobs, {early.get('dropped', 0)} dropped"
        )
    for line in row.get("holds", []):
        print(f"    {line}")
    print(
        "    batches (s from the first instance): claimed / build / GPU idle before / generate"
        " / rows / studies due at its start that ran later (a short batch before full ones"
        " leaves its missing rows to a batch at the end; with studies waiting, its build cut it"
        " short)"
    )
    for index in range(0, len(batches), 4):
        print(
            "     "
            + " | ".join(
                f"{b['claimed_s']:6.1f} {b['build_s']:5.2f} {b['idle_before_s']:5.2f} "
                f"{b['generate_s']:5.2f} {b.get('size', 0):3d} {b.get('waiting', 0):3d}"
                for b in batches[index : index + 4]
            ),
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--studies", type=int, default=640)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--sweep", default="", help="more max_batch values, e.g. 32,128,256")
    parser.add_argument("--sweep-batches", type=int, default=5, help="studies = this x max_batch")
    parser.add_argument(
        "--baseline-studies",
        type=int,
        default=0,
        help="also run max_batch with render/output processes 0 (in-process)",
    )
    parser.add_argument("--associations", type=int, default=4)
    parser.add_argument("--quiet", type=float, default=0.5, help="quiet period, seconds")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--question-chars", type=int, default=400)
    parser.add_argument(
        "--question-first",
        action="store_true",
        help="the template asks the question before the image (its shared prefix runs once)",
    )
    parser.add_argument("--engine-batches", type=int, default=10)
    parser.add_argument("--render-processes", type=int, default=None)
    parser.add_argument("--output-processes", type=int, default=None)
    parser.add_argument("--copy-processes", type=int, default=4)
    parser.add_argument("--database-url", default=None, help="default: SQLite in the data dir")
    parser.add_argument(
        "--receive-processes",
        type=int,
        default=None,
        help="[dicom] receive_processes (node default)",
    )
    parser.add_argument("--source", default=None, help="the DICOM file (default: RG1_UNCI)")
    parser.add_argument("--tiny", action="store_true", help="CPU-sized model (development)")
    parser.add_argument("--load-timeout", type=float, default=300.0)
    parser.add_argument("--report-timeout", type=float, default=600.0)
    parser.add_argument(
        "--budget-s", type=float, default=1e9, help="start no new case after this many seconds"
    )
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--work", type=Path, default=None, help="work directory (default: temp)")
    parser.add_argument("--keep-log", type=Path, default=None, help="copy serve's log here")
    parser.add_argument("--log-level", default="WARNING", help="serve's [logging] level")
    parser.add_argument(
        "--no-joins", action="store_true", help="[model] join_running_batch = false"
    )
    parser.add_argument("--no-early-start", action="store_true", help="[model] early_start = false")
    args = parser.parse_args()  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="node-gpu-", dir=args.work) as directory:
        args.work = Path(directory)
        run(args)


if __name__ == "__main__":
    main()
