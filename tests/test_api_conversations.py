"""Conversations through the REST API on a real uvicorn server with the inference worker in a
thread (scripted engine answers with boxes): start, a three-turn conversation with anchors, a
crop and a distance in mm, the whole conversation read back, the error statuses, and append:
a second SR delivered to a real Orthanc that names the first as its predecessor, and an ORU.

The study is a real chest radiograph (RG1_UNCI) with Pixel Spacing added, reported by the
worker (one boxed nodule: A1), as in tests/test_interactive_conversation.py.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from config.settings import DicomDestination, FileDestination, NodeSettings
from hl7_out import oru
from medgemma_node.outputs import ReportOutputs
from medgemma_node.service import delivery_worker
from peers.net import wait_for
from peers.orthanc import OrthancServer
from storage.interactive import ErrorCode
from storage.models import AuditEvent, ReportObject, UserRole
from tests.api_support import RunningApi, running_api
from tests.test_api_questions import question_settings
from tests.test_interactive_conversation import TURN1, Node, centre, reported_study

SPACING_MM = 0.2
RADIOLOGIST = UserRole.RADIOLOGIST
SR_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."


@dataclass
class ChatNode:
    api: RunningApi
    node: Node

    def start(self) -> int:
        with self.api.client(RADIOLOGIST) as client:
            started = client.post(f"/api/studies/{self.node.study_uid}/conversations")
        assert started.status_code == 200, started.text
        return int(started.json()["id"])

    def ask(self, conversation_id: int, question: str, **body: object) -> dict[str, object]:
        with self.api.client(RADIOLOGIST) as client:
            answered = client.post(
                f"/api/conversations/{conversation_id}/messages",
                json={"question": question, **body},
            )
        assert answered.status_code == 200, answered.text
        return dict(answered.json())


@contextmanager
def chat_node(
    tmp_path: Path, rg1_unci: Path, answers: list[str], settings: NodeSettings | None = None
) -> Iterator[ChatNode]:
    settings = settings or question_settings(tmp_path)
    with running_api(settings, on_report=ReportOutputs(settings)) as api:
        node = reported_study(
            tmp_path, api.db, rg1_unci, answers, settings, PixelSpacing=[SPACING_MM] * 2
        )
        node.worker.start()
        try:
            yield ChatNode(api, node)
        finally:
            node.worker.stop()


def test_three_turns_with_anchors_a_crop_and_a_distance(tmp_path: Path, rg1_unci: Path) -> None:
    with chat_node(tmp_path, rg1_unci, [TURN1, "边缘不规则。"]) as chat:
        conversation_id = chat.start()
        first = chat.ask(conversation_id, "Is this nodule spiculated?")
        crop_request = chat.node.engine.calls[-1][0]
        second = chat.ask(conversation_id, "What is the distance between A1 and A2?")
        third = chat.ask(conversation_id, "这个结节边缘是否规则？")
        with chat.api.client(UserRole.VIEWER) as viewer:
            view = viewer.get(f"/api/conversations/{conversation_id}")
            audit = _audit(chat)

    assert first["referenced_anchor_id"] == "A1" and first["new_anchor_ids"] == ["A2"]
    assert first["answer"] == "Spiculated margins." and first["answered_by"] == "model"
    assert len(crop_request.all_images) == 2, "the study image and a crop of A1"
    anchors = {a["id"]: a for a in first["anchors"]}  # type: ignore[attr-defined]
    assert anchors["A2"]["label"] == "hilum" and anchors["A2"]["source"] == "answer"
    assert anchors["A2"]["image_sop_uid"] == anchors["A1"]["image_sop_uid"]
    assert "not evaluated for multi-turn" in str(first["disclaimer"])

    [measurement] = second["measurements"]  # type: ignore[misc]
    (ax, ay), (bx, by) = centre(anchors["A1"]["box"]), centre(anchors["A2"]["box"])
    expected_mm = math.hypot(ax - bx, ay - by) * SPACING_MM
    assert measurement["mm"] == pytest.approx(expected_mm, abs=0.1)
    assert second["answered_by"] == "node" and f"{expected_mm:.1f} mm" in str(second["answer"])
    assert third["referenced_anchor_id"] == "A2" and third["answer"] == "边缘不规则。"

    assert view.status_code == 200
    body = view.json()
    assert [t["turn_index"] for t in body["turns"]] == [1, 2, 3]
    assert [a["id"] for a in body["anchors"]] == ["A1", "A2"]
    assert {t["asked_by"] for t in body["turns"]} == {"radiologist-user"}
    assert body["created_by"] == "radiologist-user" and "physician" in body["disclaimer"]
    asked = [d for d in audit if d["route"] == "/api/conversations/{conversation_id}/messages"]
    assert [(d["user"], d["status"], d["conversation_id"]) for d in asked] == [
        ("radiologist-user", 200, conversation_id)
    ] * 3


def _audit(chat: ChatNode) -> list[dict[str, object]]:
    with chat.api.db.session() as session:
        events = session.scalars(select(AuditEvent).where(AuditEvent.kind == "api.access"))
        return [
            {**e.detail, "study": e.study_instance_uid}
            for e in events
            if e.study_instance_uid == chat.node.study_uid
        ]


def test_refusals_of_the_conversation_endpoints(tmp_path: Path, rg1_unci: Path) -> None:
    with chat_node(tmp_path, rg1_unci, []) as chat:
        conversation_id = chat.start()
        base = f"/api/conversations/{conversation_id}"
        with chat.api.client(RADIOLOGIST) as client, chat.api.client(UserRole.VIEWER) as viewer:
            study = f"/api/studies/{chat.node.study_uid}/conversations"
            assert viewer.post(study).status_code == 403
            assert viewer.post(f"{base}/messages", json={"question": "Q?"}).status_code == 403
            assert viewer.post(f"{base}/append").status_code == 403
            assert client.post("/api/studies/1.2.3.4/conversations").status_code == 404
            for missing in ("/api/conversations/999", "/api/conversations/999/append"):
                call = client.get if missing.endswith("999") else client.post
                assert call(missing).status_code == 404, missing
            unknown = client.post("/api/conversations/999/messages", json={"question": "Q?"})
            assert unknown.status_code == 404
            for body, field in (
                ({"question": "Q?", "anchor_id": "nodule"}, "anchor_id"),
                ({"question": "x" * 201}, "question"),
                ({"question": "   "}, "question"),
                ({"question": ""}, "question"),
            ):
                refused = client.post(f"{base}/messages", json=body)
                assert refused.status_code == 422, (body, refused.text)
                assert refused.json()["detail"][0]["loc"][-1] == field
            # An unknown anchor is found by the worker: invalid_input, 422, its message.
            stray = client.post(f"{base}/messages", json={"question": "Distance A1 to A7?"})
            nothing = client.post(f"{base}/append")
    assert stray.status_code == 422
    assert stray.json()["error_code"] == ErrorCode.INVALID_INPUT
    assert stray.json()["detail"] == "unknown anchor A7; this conversation has: A1"
    assert nothing.status_code == 409 and "no answered question" in nothing.json()["detail"]


def test_append_sends_a_second_sr_to_orthanc_naming_the_first(
    tmp_path: Path, rg1_unci: Path
) -> None:
    with OrthancServer(tmp_path / "orthanc") as pacs:
        settings = question_settings(tmp_path)
        settings.destinations = [
            DicomDestination(
                kind="dicom", name="pacs", ae_title=pacs.aet, host="127.0.0.1",
                port=pacs.dicom_port,
            ),
            FileDestination(kind="file", name="archive", directory=tmp_path / "out"),
        ]  # fmt: skip
        with chat_node(tmp_path, rg1_unci, [TURN1], settings) as chat:
            deliveries = delivery_worker(settings, chat.api.db)
            deliveries.deliver_once()
            [first_sr] = _srs(pacs)
            conversation_id = chat.start()
            chat.ask(conversation_id, "Is this nodule spiculated?")
            with chat.api.client(RADIOLOGIST) as client:
                appended = client.post(f"/api/conversations/{conversation_id}/append")
                again = client.post(f"/api/conversations/{conversation_id}/append")
                more = client.post(
                    f"/api/conversations/{conversation_id}/messages", json={"question": "Q?"}
                )
                study = client.get(f"/api/studies/{chat.node.study_uid}").json()
            deliveries.deliver_once()
            wait_for(lambda: len(_srs(pacs)) == 2, 30, message="the second SR did not arrive")
            with chat.api.db.session() as session:
                new_sr_uid = session.scalars(
                    select(ReportObject.sop_instance_uid).where(
                        ReportObject.report_id == appended.json()["report_id"],
                        ReportObject.kind == "sr",
                    )
                ).one()
        srs = {sr.SOPInstanceUID: sr for sr in _srs(pacs)}

    assert appended.status_code == 200, appended.text
    result = appended.json()
    assert result["conversation_id"] == conversation_id
    assert result["supersedes_report_id"] == study["reports"][0]["id"]
    assert [r["id"] for r in study["reports"]] == [
        result["supersedes_report_id"],
        result["report_id"],
    ]
    assert again.status_code == 409 and more.status_code == 409
    # The second SR at the PACS names the first as its predecessor (PS3.3 C.17.2.1).
    second_sr = srs[new_sr_uid]
    predecessor = second_sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert predecessor.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first_sr.SOPInstanceUID
    assert second_sr.StudyInstanceUID == first_sr.StudyInstanceUID == chat.node.study_uid
    # The ORU of the new version carries the follow-up. OBR-25 is 'C' (corrected) where the
    # ORU builder marks superseding reports, else still 'P' (preliminary).
    data_dir = settings.storage.data_dir
    message = (data_dir / "reports" / str(result["report_id"]) / "oru-archive.hl7").read_text()
    assert "Is this nodule spiculated?" in message
    [obr] = [s.split("|") for s in message.splitlines() if s.startswith("OBR|")]
    corrected = getattr(oru, "RESULT_STATUS_CORRECTED", None)
    assert obr[25] == (corrected or oru.RESULT_STATUS_PRELIMINARY)


def _srs(pacs: OrthancServer) -> list[pydicom.Dataset]:
    found = []
    for orthanc_id in pacs.instance_ids():
        dataset = pydicom.dcmread(io.BytesIO(pacs.instance_file(orthanc_id)))
        if str(dataset.SOPClassUID).startswith(SR_CLASS_PREFIX):
            found.append(dataset)
    return found
