"""Several processes receive on serve's DICOM port ([dicom] receive_processes, SO_REUSEPORT).

Real peers: `medgemma-node serve` as a subprocess with three receiving processes, pynetdicom
SCUs opening one association per study. Every instance acknowledged by any process gets its
row and its study a job from serve's completion scheduler; the Prometheus counter adds up what
every process received; a receiver killed with SIGKILL is started again and the port keeps
answering; stopping serve stops its receivers.
"""

from __future__ import annotations

import json
import os
import signal
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from config.settings import DicomSettings, load_settings
from dicom_node.listener import receive_processes
from medgemma_node.service import Node
from peers.dicom_files import make_ct_study
from peers.net import echo_ok, free_port, wait_for
from peers.node_process import NodeProcess
from storage.db import Database
from tests.nodecheck import FAST_COMPLETION, store_with_pynetdicom, versions_of

RECEIVERS = 3
STUDIES = 12  # one association each: all on one of 3 processes by chance is 3 ** -11


def test_auto_is_one_receiver_per_four_cores_at_most_four(monkeypatch: pytest.MonkeyPatch) -> None:
    for cpus, expected in ((1, 1), (2, 1), (7, 1), (8, 2), (16, 4), (128, 4)):
        monkeypatch.setattr(os, "cpu_count", lambda cpus=cpus: cpus)
        assert receive_processes(DicomSettings()) == expected
    assert receive_processes(DicomSettings(receive_processes=6)) == 6


def test_a_receiver_listens_with_retention_as_its_last_resort(tmp_path: Path) -> None:
    settings = load_settings()
    settings.storage.data_dir = tmp_path / "data"
    settings.dicom.port = free_port()
    settings.dicom.bind_address = "127.0.0.1"
    node = Node(settings, receiver=1)
    node.prepare()
    try:
        node.start()
        assert node.scp is not None and node.scp.make_room is not None
        assert echo_ok(settings.dicom.port)
        assert (settings.storage.data_dir / "run" / "receiver-1.json").exists()
        assert "completion" not in node.parts  # serve's scheduler completes its studies
    finally:
        node.stop()
    assert not (settings.storage.data_dir / "run" / "receiver-1.json").exists()


def receiver_states(node: NodeProcess) -> dict[int, dict[str, Any]]:
    states = {}
    for path in (node.data_dir / "run").glob("receiver-*.json"):
        try:
            states[int(path.stem.split("-")[1])] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being rewritten
    return states


def stored_by_process(node: NodeProcess) -> list[int]:
    serve = json.loads((node.data_dir / "run" / "status.json").read_text())
    states = [serve, *receiver_states(node).values()]
    return [int(state.get("scp", {}).get("counters", {}).get("stored", 0)) for state in states]


def scraped_stored(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    for line in text.splitlines():
        if line.startswith('medgemma_instances_received_total{outcome="stored"}'):
            return float(line.split()[-1])
    raise AssertionError("no stored counter in the metrics")


def send_studies(node: NodeProcess, work: Path, count: int) -> list[str]:
    """``count`` one-instance CT studies, one association each; their Study UIDs."""
    study_uids = []
    for index in range(count):
        paths = make_ct_study(work / f"study-{index}", slices=1)
        assert store_with_pynetdicom(node.port, paths) == [0x0000]
        study_uids.append(str(_study_uid(paths[0])))
    return study_uids


def _study_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


@pytest.mark.slow
def test_three_receivers_share_the_port_and_lose_nothing(tmp_path: Path) -> None:
    metrics_port = free_port()
    sections = {
        "completion": FAST_COMPLETION,
        "dicom": {"receive_processes": RECEIVERS, "max_associations": 2},
        "metrics": {"enabled": True, "bind_address": "127.0.0.1", "port": metrics_port},
    }
    node = NodeProcess(tmp_path / "node", sections).start()
    db = Database(node.database_url)
    try:
        wait_for(lambda: len(receiver_states(node)) == RECEIVERS - 1, 60, message="receivers")
        study_uids = send_studies(node, tmp_path, STUDIES)
        for study_uid in study_uids:
            wait_for(lambda uid=study_uid: versions_of(db, uid), 30, message=f"job of {study_uid}")
        # Each process writes its counts every 2 s; serve's metrics add them up.
        wait_for(lambda: scraped_stored(metrics_port) == STUDIES, 15, message="counter sum")
        by_process = wait_for(
            lambda: (s := stored_by_process(node)) and sum(s) == STUDIES and s, 15
        )
        assert sum(1 for stored in by_process if stored) >= 2, by_process

        killed = receiver_states(node)[1]["pid"]
        os.kill(killed, signal.SIGKILL)
        wait_for(
            lambda: receiver_states(node).get(1, {}).get("pid") not in (None, killed),
            30,
            message="receiver 1 started again",
        )
        more = send_studies(node, tmp_path / "more", RECEIVERS * 2)
        for study_uid in more:
            wait_for(lambda uid=study_uid: versions_of(db, uid), 30, message=f"job of {study_uid}")
    finally:
        db.dispose()
        node.terminate()
    assert not list((node.data_dir / "run").glob("receiver-*.json"))
    assert not _processes_with(node.config_path)


def _processes_with(config: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(config).encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found
