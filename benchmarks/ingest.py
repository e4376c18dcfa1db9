"""Ingest throughput: the node's Storage SCP against DCMTK's storescp, in the same run.

200 Secondary Capture instances of ~40 KB (new UIDs each; with --cr copies of the 7.2 MB chest CR
RG1_UNCI, each a new study) are sent in ONE association by DCMTK's storescu (TCP_NODELAY=1) to
    (a) `medgemma-node serve` (full durability: file fsync + rename + directory fsync + committed
        row before each Success), default settings except data dir, port, quiet periods and
        metrics (off, so the run needs no fixed port), measured once its inference worker child
        has started;
    (b) DCMTK's storescp writing to a temp dir (no fsync: an upper bound, not a peer in
        durability);
    (c) with --pynetdicom, pynetdicom's own storescp app (no fsync, no database).
Each is measured `--rounds` times, alternating; median and best files/s and the ratio are printed.

    .venv/bin/python -m benchmarks.ingest [--count 200] [--rounds 5] [--pynetdicom] [--cr]
                                         [--database-url postgresql+psycopg://...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import create_engine, func, select, text

from peers.dicom_files import copy_with_new_uids, testdata
from peers.net import free_port
from storage.models import Instance

REPO = Path(__file__).resolve().parent.parent

ROWS, COLUMNS = 128, 160  # 128 x 160 x 16 bit = 40 960 bytes of pixel data
STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def make_instances(directory: Path, count: int) -> list[Path]:
    """One study, one series, ``count`` SC images with distinct pixel data and new UIDs."""
    directory.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    rng = np.random.default_rng(7)
    paths = []
    for number in range(1, count + 1):
        path = directory / f"sc{number:04d}.dcm"
        dataset = secondary_capture(study, series, number, rng)
        dataset.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def make_radiographs(directory: Path, count: int) -> list[Path]:
    """``count`` copies of the chest CR RG1_UNCI (7.2 MB, explicit VR little endian), each a
    new study: what a radiography room sends."""
    source = testdata("RG1_UNCI.dcm")
    return [copy_with_new_uids(source, directory / f"cr{n:04d}.dcm") for n in range(1, count + 1)]


def secondary_capture(study: str, series: str, number: int, rng: np.random.Generator) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality, ds.ConversionType = "OT", "WSD"
    ds.PatientName, ds.PatientID = "Bench^Mark", "BENCH001"
    ds.InstanceNumber = number
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = ROWS, COLUMNS
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = rng.integers(0, 4096, (ROWS, COLUMNS), dtype=np.uint16).tobytes()
    return ds


def echo_ok(port: int) -> bool:
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 2
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="MEDGEMMA")
    except OSError:
        return False
    if not assoc.is_established:
        return False
    assoc.release()
    return True


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        if echo_ok(port):
            return
        time.sleep(0.1)
    raise TimeoutError("server did not start")


def send(port: int, files: list[Path]) -> float:
    """Seconds storescu takes to send every file in one association."""
    started = time.perf_counter()
    result = subprocess.run(
        [STORESCU, "-aec", "MEDGEMMA", "127.0.0.1", str(port), *map(str, files)],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"storescu failed:\n{result.stderr[-2000:]}")
    return elapsed


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@contextmanager
def node_server(workdir: Path, database_url: str | None) -> Iterator[tuple[int, str]]:
    port = free_port()
    data_dir = workdir / "data"
    storage = f'data_dir = "{data_dir}"\n'
    if database_url:
        storage += f'database_url = "{database_url}"\n'
    config = workdir / "node.toml"
    config.write_text(
        f'[dicom]\nbind_address = "127.0.0.1"\nport = {port}\n'
        f"[storage]\n{storage}"
        "[completion]\ndefault_seconds = 5.0\nrules = []\n"
        "[metrics]\nenabled = false\n"
        "[api]\nenabled = false\n"
    )
    command = [sys.executable, "-m", "medgemma_node.cli", "serve", "--config", str(config)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDGEMMA_NODE_")}
    with (workdir / "serve.log").open("ab") as log:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=log)
    try:
        wait_listening(port, proc)
        wait_for_worker(data_dir)
        yield port, database_url or f"sqlite:///{data_dir / 'node.db'}"
    finally:
        stop(proc)


def wait_for_worker(data_dir: Path, timeout: float = 90) -> None:
    """`serve` starts its inference worker child, which spends seconds of CPU importing the
    model stack: measure ingest after that, as on a node that has been up a while."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any((data_dir / "run").glob("worker-*.json")):
            return
        time.sleep(0.2)
    print(f"  (no inference worker status after {timeout:.0f} s; measuring anyway)")


def storescp_command(output: Path, port: int) -> list[str]:
    return [STORESCP, "-od", str(output), str(port)]


def pynetdicom_command(output: Path, port: int) -> list[str]:
    """pynetdicom's own storescp app (no fsync, no database): the library's own baseline."""
    return [sys.executable, "-m", "pynetdicom", "storescp", "-od", str(output), str(port)]


@contextmanager
def plain_server(workdir: Path, command: Callable[[Path, int], list[str]]) -> Iterator[int]:
    port = free_port()
    output = workdir / "received"
    output.mkdir(parents=True)
    proc = subprocess.Popen(
        command(output, port), env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_listening(port, proc)
        yield port
    finally:
        stop(proc)


def rows_stored(database_url: str) -> int:
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            return int(connection.scalar(select(func.count()).select_from(Instance)) or 0)
    finally:
        engine.dispose()


def measure_node(files: list[Path], scratch: Path, database_url: str | None) -> float:
    workdir = Path(tempfile.mkdtemp(prefix="node-", dir=scratch))
    with node_server(workdir, database_url) as (port, url):
        elapsed = send(port, files)
        stored = rows_stored(url)
    if stored != len(files):
        raise RuntimeError(f"node stored {stored} of {len(files)} instances")
    return len(files) / elapsed


def measure_plain(
    files: list[Path], scratch: Path, command: Callable[[Path, int], list[str]]
) -> float:
    workdir = Path(tempfile.mkdtemp(prefix="plain-", dir=scratch))
    with plain_server(workdir, command) as port:
        elapsed = send(port, files)
    stored = len(list((workdir / "received").iterdir()))
    if stored != len(files):
        raise RuntimeError(f"{command.__name__} stored {stored} of {len(files)} instances")
    return len(files) / elapsed


def fresh_database(admin_url: str, round_number: int) -> str:
    """PostgreSQL: one new database per round, so each round starts empty."""
    base = admin_url.rpartition("/")[0]
    name = f"bench_{os.getpid()}_{round_number}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return f"{base}/{name}"


def drop_database(admin_url: str, url: str) -> None:
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        name = url.rpartition("/")[2]
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def report(rates: dict[str, list[float]]) -> None:
    """Median and best: other load on the machine only ever slows a round down."""
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"{name:22s} median {median:7.1f} files/s   best {max(values):7.1f}")
    node, dcmtk = rates["node"], rates["storescp (DCMTK)"]
    print(
        f"ratio node/storescp: median {statistics.median(node) / statistics.median(dcmtk):.2f}, "
        f"best/best {max(node) / max(dcmtk):.2f} (target >= 0.5)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--database-url", default=None, help="PostgreSQL admin URL (default: SQLite)"
    )
    parser.add_argument(
        "--pynetdicom", action="store_true", help="also measure pynetdicom's storescp app"
    )
    parser.add_argument(
        "--cr", action="store_true", help="chest CRs of 7.2 MB (RG1_UNCI copies), not 40 KB SCs"
    )
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="ingest-bench-"))
    try:
        make = make_radiographs if args.cr else make_instances
        files = make(scratch / "instances", args.count)
        size_kb = sum(p.stat().st_size for p in files) / len(files) / 1024
        print(f"{len(files)} instances, {size_kb:.1f} KB each, one association per run")
        rates: dict[str, list[float]] = {"node": [], "storescp (DCMTK)": []}
        if args.pynetdicom:
            rates["storescp (pynetdicom)"] = []
        for round_number in range(1, args.rounds + 1):
            url = fresh_database(args.database_url, round_number) if args.database_url else None
            try:
                rates["node"].append(measure_node(files, scratch, url))
            finally:
                if url and args.database_url:
                    drop_database(args.database_url, url)
            rates["storescp (DCMTK)"].append(measure_plain(files, scratch, storescp_command))
            if args.pynetdicom:
                pynetdicom_rate = measure_plain(files, scratch, pynetdicom_command)
                rates["storescp (pynetdicom)"].append(pynetdicom_rate)
            line = "   ".join(f"{name} {values[-1]:7.1f}" for name, values in rates.items())
            print(f"  round {round_number}: {line} files/s")
        report(rates)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
