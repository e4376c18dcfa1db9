"""One study, end to end, through `medgemma-node serve` and real peers on loopback.

DCMTK storescu --C-STORE--> serve (subprocess) --> inference worker (child process)
    --> SR + GSPS --C-STORE--> Orthanc        (checked through its REST API + dciodvfy)
    --> ORU^R01   --MLLP-----> MLLP listener  (parsed with hl7apy strict and `hl7`)
    --> JSON/HL7/DICOM files in a file destination
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import hl7
import httpx
import pydicom
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

from hl7_out.encoding import unescape_text
from peers.dcmtk import dcmtk_storescu
from peers.dicom_files import copy_with_new_uids, testdata
from peers.mllp_listener import MLLPListener
from peers.net import free_port, wait_for
from peers.node_process import NodeProcess
from peers.orthanc import OrthancServer
from storage.files import TEMP_MARK

PATIENT_NAME = "Quendolyn^Zarkowitz"
SR_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
GSPS_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"

ANSWER_EN = {
    "findings": [
        {
            "label": "nodule",
            "location": "right upper lobe",
            "size_mm": 14,
            "density": "solid",
            "boundary": "well defined",
            "box_2d": [210, 180, 330, 300],
        },
        {"label": "pleural effusion", "location": "left costophrenic angle"},
    ],
    "impression": "Right upper lobe nodule; small left pleural effusion.",
    "recommendation": "CT chest with contrast.",
    "urgency": "urgent",
}
ANSWER_ZH = {
    "findings": [
        {"label": "结节", "location": "右肺上叶", "size_mm": 9, "box_2d": [250, 200, 320, 270]}
    ],
    "impression": "右肺上叶结节。",
    "recommendation": "建议3个月后复查胸部CT。",
    "urgency": "routine",
}


def finished_files(directory: Path, pattern: str) -> list[Path]:
    """Files in place: a durable write's temp file (storage.files.TEMP_MARK) is not one yet."""
    return [path for path in directory.glob(pattern) if TEMP_MARK not in path.name]


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancServer]:
    with OrthancServer(tmp_path / "orthanc") as server:
        yield server


@pytest.fixture
def his() -> Iterator[MLLPListener]:
    listener = MLLPListener().start()
    try:
        yield listener
    finally:
        listener.stop()


def node_sections(
    tmp_path: Path, orthanc: OrthancServer, his: MLLPListener, model: dict[str, Any]
) -> dict[str, Any]:
    return {
        "completion": {"default_seconds": 1.0, "poll_interval_s": 0.1, "rules": []},
        "model": {"max_new_tokens": 12, "batch_wait_ms": 0, **model},
        "destinations": [
            {
                "name": "pacs",
                "kind": "dicom",
                "ae_title": orthanc.aet,
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
                "retry": {"initial_backoff_s": 0.2, "max_backoff_s": 1.0},
            },
            {
                "name": "his",
                "kind": "hl7",
                "host": "127.0.0.1",
                "port": his.port,
                "ack_timeout_s": 5.0,
                "retry": {"initial_backoff_s": 0.2, "max_backoff_s": 1.0},
            },
            {"name": "files", "kind": "file", "directory": str(tmp_path / "results")},
        ],
    }


def scripted(tmp_path: Path, answer: dict[str, Any], language: str) -> dict[str, Any]:
    responses = tmp_path / f"answers-{language}.json"
    responses.write_text(json.dumps([json.dumps(answer, ensure_ascii=False)]), encoding="utf-8")
    return {"engine": "scripted", "scripted_responses_file": str(responses), "language": language}


def send_chest(
    tmp_path: Path, port: int, name: str = "RG1_J2KI.dcm", flag: str = "-xw"
) -> pydicom.Dataset:
    """DCMTK storescu with the real chest CR (JPEG 2000 lossy), as a new study."""
    copy = copy_with_new_uids(testdata(name), tmp_path / "send" / name, PatientName=PATIENT_NAME)
    result = dcmtk_storescu(port, [copy], flag)
    assert result.returncode == 0, result.stderr
    return pydicom.dcmread(copy, stop_before_pixels=True)


def orthanc_objects(orthanc: OrthancServer) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {"sr": [], "gsps": []}
    for orthanc_id in orthanc.instance_ids():
        tags = orthanc.instance_tags(orthanc_id)
        kind = "sr" if tags["SOPClassUID"].startswith(SR_CLASS_PREFIX) else "gsps"
        if tags["SOPClassUID"] in (GSPS_CLASS,) or kind == "sr":
            found[kind].append({"id": orthanc_id, **tags})
    return found


def download(orthanc: OrthancServer, orthanc_id: str, target: Path) -> Path:
    response = orthanc._http.get(f"/instances/{orthanc_id}/file")
    response.raise_for_status()
    target.write_bytes(response.content)
    return target


def dciodvfy_errors(path: Path) -> list[str]:
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [
        line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")
    ]


def node_status(node: NodeProcess, with_worker: bool = False) -> dict[str, Any] | None:
    """`medgemma-node status --json`, as an operator runs it."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "medgemma_node.cli",
            "status",
            "--config",
            str(node.config_path),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=node.workdir,
    )
    if result.returncode != 0:
        return None
    status: dict[str, Any] = json.loads(result.stdout)
    if not with_worker:
        return status
    # A worker that is still loading its model reports "not loaded": wait for the outcome.
    models = [worker.get("model", {}).get("status") for worker in status["workers"]]
    return status if models and all(m not in (None, "not loaded") for m in models) else None


def scrape_when_delivered(port: int) -> str | None:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return text if 'destination="files",status="sent"' in text else None


def parse_oru_strict(raw: bytes) -> Any:
    text = raw.decode("utf-8")
    parse_message(text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    return hl7.parse(text)


def obx_texts(message: Any) -> list[str]:
    return [str(segment[5]) for segment in message.segments("OBX")]


@pytest.mark.slow
def test_tiny_model_study_reaches_orthanc_his_and_files(
    tmp_path: Path, orthanc: OrthancServer, his: MLLPListener
) -> None:
    sections = node_sections(tmp_path, orthanc, his, {"demo_model_if_missing": True})
    metrics_port = free_port()
    sections["metrics"] = {"enabled": True, "bind_address": "127.0.0.1", "port": metrics_port}
    node = NodeProcess(tmp_path / "node", sections)
    node.start()
    try:
        source = send_chest(tmp_path, node.port)
        objects = wait_for(lambda: orthanc_objects(orthanc)["sr"], 120, message="no SR at Orthanc")
        [message] = his.wait_for(1, timeout=60)
        json_files = wait_for(lambda: finished_files(tmp_path / "results", "*.json"), 30)
        status = wait_for(lambda: node_status(node, with_worker=True), 30)
        metrics = wait_for(lambda: scrape_when_delivered(metrics_port), 30)
    finally:
        assert node.terminate() == 0
    [worker] = status["workers"]
    assert worker["model"]["status"] == "loaded"
    assert worker["model"]["identity"]["is_test_model"] is True
    assert status["scp"]["echo_ok"] is True and status["database"]["jobs"] == {"done": 1}
    assert set(status["database"]["outbox"]) == {"pacs", "his", "files"}
    assert 'medgemma_instances_received_total{outcome="stored"} 1.0' in metrics
    assert 'medgemma_jobs{status="done"} 1.0' in metrics
    assert 'medgemma_outbox{destination="pacs",status="sent"} 1.0' in metrics
    [sr] = objects
    assert sr["StudyInstanceUID"] == source.StudyInstanceUID
    sr_file = download(orthanc, sr["id"], tmp_path / "sr.dcm")
    assert dciodvfy_errors(sr_file) == []
    dataset = pydicom.dcmread(sr_file)
    assert dataset.VerificationFlag == "UNVERIFIED" and dataset.PreliminaryFlag == "PRELIMINARY"
    assert "TEST MODEL" in json.dumps(pydicom.dcmread(sr_file).to_json_dict(), ensure_ascii=False)
    oru = parse_oru_strict(message.raw)
    assert "TEST MODEL" in str(oru)
    report = json.loads(json_files[0].read_text(encoding="utf-8"))
    assert report["report"]["model"]["is_test_model"] is True
    assert report["report"]["study_instance_uid"] == source.StudyInstanceUID
    logs = node.log_text()
    assert source.StudyInstanceUID in logs
    assert "Quendolyn" not in logs and "Zarkowitz" not in logs


@pytest.mark.slow
@pytest.mark.parametrize(("answer", "language"), [(ANSWER_EN, "en"), (ANSWER_ZH, "zh")])
def test_scripted_answer_content_in_sr_oru_and_json(
    tmp_path: Path, orthanc: OrthancServer, his: MLLPListener, answer: dict[str, Any], language: str
) -> None:
    sections = node_sections(tmp_path, orthanc, his, scripted(tmp_path, answer, language))
    node = NodeProcess(tmp_path / "node", sections).start()
    try:
        source = send_chest(tmp_path, node.port, "RG1_UNCI.dcm", "-xs")
        wait_for(
            lambda: orthanc_objects(orthanc)["gsps"] and orthanc_objects(orthanc)["sr"],
            90,
            message="SR and GSPS did not reach Orthanc",
        )
        [message] = his.wait_for(1, timeout=60)
        json_files = wait_for(lambda: finished_files(tmp_path / "results", "*.json"), 30)
    finally:
        assert node.terminate() == 0
    found = orthanc_objects(orthanc)
    assert len(found["sr"]) == 1 and len(found["gsps"]) == 1
    sr_path = download(orthanc, found["sr"][0]["id"], tmp_path / "sr.dcm")
    gsps_path = download(orthanc, found["gsps"][0]["id"], tmp_path / "gsps.dcm")
    assert dciodvfy_errors(sr_path) == [] and dciodvfy_errors(gsps_path) == []
    sr = hd.sr.srread(sr_path)
    groups = sr.content.get_planar_roi_measurement_groups()
    assert len(groups) == 1, "one boxed finding"
    region = groups[0].roi
    assert isinstance(region, hd.sr.ImageRegion)
    assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
    (referenced,) = region.ContentSequence[0].ReferencedSOPSequence
    assert referenced.ReferencedSOPInstanceUID == source.SOPInstanceUID
    # box_2d is [y0, x0, y1, x1] in 0..1000 of the padded square (1955 px; 57 px padding
    # left and right of RG1's 1841 columns); the SR holds source pixel coordinates.
    box = answer["findings"][0]["box_2d"]
    side, column_offset = 1955, (1955 - 1841) // 2
    first_point = region.value[0]
    assert first_point[0] == pytest.approx(box[1] / 1000 * side - column_offset, abs=1.5)
    assert first_point[1] == pytest.approx(box[0] / 1000 * side, abs=1.5)
    sr_text = json.dumps(pydicom.dcmread(sr_path).to_json_dict(), ensure_ascii=False)
    assert answer["impression"] in sr_text and answer["recommendation"] in sr_text
    oru_texts = "\n".join(obx_texts(parse_oru_strict(message.raw)))
    assert hl7.parse(message.raw.decode("utf-8")).segment("MSH")[18][0] == "UNICODE UTF-8"
    for finding in answer["findings"]:
        assert finding["label"] in sr_text
    assert answer["impression"].rstrip("。.") in unescape_text(oru_texts)
    report = json.loads(json_files[0].read_text(encoding="utf-8"))
    stored = report["report"]["content"]
    assert [f["label"] for f in stored["findings"]] == [f["label"] for f in answer["findings"]]
    assert stored["findings"][0]["region"]["sop_instance_uid"] == source.SOPInstanceUID
    assert stored["impression"] == answer["impression"] and stored["urgency"] == answer["urgency"]


@pytest.mark.slow
def test_kill_after_ack_before_delivery_gives_exactly_one_result(
    tmp_path: Path, orthanc: OrthancServer, his: MLLPListener
) -> None:
    sections = node_sections(tmp_path, orthanc, his, scripted(tmp_path, ANSWER_EN, "en"))
    sections["completion"]["default_seconds"] = 3.0
    node = NodeProcess(tmp_path / "node", sections).start()
    source = send_chest(tmp_path, node.port, "RG1_UNCI.dcm", "-xs")
    node.kill9()  # acknowledged, not yet complete: nothing built, nothing delivered
    assert orthanc_objects(orthanc)["sr"] == [] and his.received == []
    node.start()
    try:
        wait_for(lambda: orthanc_objects(orthanc)["sr"], 90, message="no SR after restart")
        his.wait_for(1, timeout=60)
        # Let the delivery lanes run a while longer: nothing more may arrive.
        wait_for(lambda: not _pending_outbox(node), 30, message="outbox not drained")
    finally:
        assert node.terminate() == 0
    found = orthanc_objects(orthanc)
    assert len(found["sr"]) == 1 and found["sr"][0]["StudyInstanceUID"] == source.StudyInstanceUID
    assert len(his.received) == 1


def _pending_outbox(node: NodeProcess) -> bool:
    from sqlalchemy import select

    from storage.db import Database
    from storage.models import OutboxItem, OutboxStatus

    db = Database(node.database_url)
    try:
        with db.session() as session:
            return bool(
                session.scalars(
                    select(OutboxItem.id).where(OutboxItem.status != OutboxStatus.SENT)
                ).first()
            )
    finally:
        db.dispose()


@pytest.mark.slow
def test_killed_inference_worker_is_restarted_while_the_scp_keeps_accepting(
    tmp_path: Path, orthanc: OrthancServer, his: MLLPListener
) -> None:
    sections = node_sections(tmp_path, orthanc, his, scripted(tmp_path, ANSWER_EN, "en"))
    node = NodeProcess(tmp_path / "node", sections).start()
    try:
        first = wait_for(lambda: node_status(node, with_worker=True), 120)
        [worker] = first["workers"]
        os.kill(worker["pid"], signal.SIGKILL)
        source = send_chest(tmp_path, node.port, "RG1_UNCI.dcm", "-xs")  # accepted meanwhile

        def restarted() -> dict[str, Any] | None:
            status = node_status(node, with_worker=True)
            pids = [w["pid"] for w in status["workers"]] if status else []
            return status if pids and worker["pid"] not in pids else None

        wait_for(restarted, 120, message="the worker was not restarted")
        objects = wait_for(lambda: orthanc_objects(orthanc)["sr"], 90, message="no SR")
        serve_log = node.log_text()
    finally:
        assert node.terminate() == 0
    assert objects[0]["StudyInstanceUID"] == source.StudyInstanceUID
    assert "inference worker exited with code -9; restarting" in serve_log
