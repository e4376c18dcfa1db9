"""Conversations anchored to regions (storage/conversations.py, inference/conversation.py).

A real chest radiograph (RG1_UNCI, 1841 x 1955) goes through the worker with a scripted
report (one boxed nodule: A1); follow-up questions then run through the worker's priority
lane: the model sees the conversation as chat turns and a crop for a question about one
anchor; boxes in answers become anchors; distances are measured by the node from the pixel
spacing (a copy with Pixel Spacing, and the original, whose Pixel Spacing is 0\\0); the
conversation is appended as a new report version that supersedes the first.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from PIL import Image
from sqlalchemy import select

from config.settings import FileDestination, NodeSettings
from inference.conversation import CropGeometry, StudyImages, crop_around, view_region
from inference.engine import ChatTurn, GenerationRequest
from inference.preprocess import prepare_study
from inference.scripted_engine import ScriptedEngine
from inference.transformers_engine import TransformersEngine
from inference.worker import InferenceWorker
from medgemma_node.outputs import ReportOutputs, report_document
from storage.conversations import (
    ConversationConflict,
    StudyNotFound,
    append_conversation,
    ask,
    get_conversation,
    start_conversation,
)
from storage.db import Database
from storage.ingest import close_quiet_studies
from storage.interactive import Anchor, ErrorCode, RequestOutcome, get_outcome
from storage.models import (
    Conversation,
    ConversationState,
    JobStatus,
    OutboxItem,
    Report,
    ReportObject,
)
from tests.test_interactive_worker import demo_engine  # noqa: F401  (module fixture)
from tests.test_worker import CHEST_ANSWER, ingest_copy, make_settings

SPACING_MM = 0.2
SIDE, COLUMN_OFFSET = 1955, (1955 - 1841) // 2  # RG1_UNCI padded to a square
TURN1 = 'Spiculated margins.\n```json\n[{"box_2d": [600, 500, 700, 600], "label": "hilum"}]\n```'


def source_box(box_2d: list[float]) -> list[float]:
    """[y0, x0, y1, x1] of the padded square -> [x0, y0, x1, y1] in RG1_UNCI pixels."""
    y0, x0, y1, x1 = (v / 1000 * SIDE for v in box_2d)
    return [x0 - COLUMN_OFFSET, y0, x1 - COLUMN_OFFSET, y1]


def centre(box: list[float]) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


@dataclass
class Node:
    db: Database
    settings: NodeSettings
    engine: ScriptedEngine
    worker: InferenceWorker
    study_uid: str

    def ask(self, conversation_id: int, question: str, anchor_id: str | None = None) -> int:
        return ask(
            self.db, self.settings.storage.data_dir, conversation_id, question,
            anchor_id=anchor_id, asked_by="dr.li", max_new_tokens=64, max_queued=8,
        )  # fmt: skip

    def answer(self, conversation_id: int, question: str, **kwargs: str) -> RequestOutcome:
        request_id = self.ask(conversation_id, question, **kwargs)
        assert self.worker.run_once() == 1
        return get_outcome(self.db, request_id)


def reported_study(
    tmp_path: Path,
    db: Database,
    rg1_unci: Path,
    turn_answers: list[str],
    settings: NodeSettings | None = None,
    **attributes: object,
) -> Node:
    """A copy of RG1_UNCI received and reported (finding A1); turns answered in order."""
    settings = settings or make_settings(tmp_path, db.url)
    data_dir = settings.storage.data_dir
    study_uid = ingest_copy(db, data_dir, rg1_unci, tmp_path / "in", **attributes)
    close_quiet_studies(db, lambda _modality, _ae: 0.0)
    answers = list(turn_answers)

    def responder(request: GenerationRequest) -> str:
        return (
            CHEST_ANSWER
            if not request.history and "JSON object" in request.prompt
            else (answers.pop(0))
        )

    engine = ScriptedEngine(responder=responder)
    worker = InferenceWorker(db, settings, lambda: engine, ReportOutputs(settings))
    assert worker.run_once() == 1, "the study is reported"
    return Node(db, settings, engine, worker, study_uid)


def done(outcome: RequestOutcome) -> dict[str, object]:
    assert outcome.status == JobStatus.DONE, outcome.error
    assert outcome.result is not None
    return outcome.result


def test_three_turns_with_anchors_a_crop_and_a_distance_in_mm(
    tmp_path: Path, db: Database, rg1_unci: Path
) -> None:
    node = reported_study(
        tmp_path, db, rg1_unci, [TURN1, "边缘不规则。"], PixelSpacing=[SPACING_MM, SPACING_MM]
    )
    conversation = start_conversation(db, node.study_uid, created_by="dr.li")
    [a1] = conversation.anchors
    assert (a1.id, a1.label, a1.source) == ("A1", "nodule", "report")
    assert a1.box == pytest.approx(source_box([200, 150, 300, 260]))

    # Turn 1: "this nodule" is the most recent anchor (A1); the model sees the report as its
    # first answer, then a crop of A1 as a second image.
    first = done(node.answer(conversation.id, "Is this nodule spiculated?"))
    request = node.engine.calls[-1][0]
    assert len(request.all_images) == 2, "the study image and the crop"
    assert [turn.role for turn in request.history] == ["user", "model"]
    assert len(request.history[0].images) == 1 and "JSON" in request.history[0].text
    assert not request.history[0].question_first  # the shipped template: images first
    assert json.loads(request.history[1].text)["findings"][0]["label"] == "nodule"
    assert "A1: nodule — image 0, box_2d [200, 150, 300, 260]" in request.prompt
    assert "enlarged view" in request.prompt and "Is this nodule spiculated?" in request.prompt
    crop = request.images[0]
    width = a1.box[2] - a1.box[0]
    assert crop.size[0] == crop.size[1] == pytest.approx(2 * width, abs=1)
    assert first["referenced_anchor_id"] == "A1" and first["answered_by"] == "model"
    assert first["answer"] == "Spiculated margins."
    assert first["new_anchor_ids"] == ["A2"]
    a2 = Anchor.model_validate(first["anchors"][1])  # type: ignore[index]
    assert (a2.label, a2.source, a2.turn_index) == ("hilum", "answer", 1)
    assert a2.box == pytest.approx(source_box([600, 500, 700, 600]))
    assert a2.image_sop_uid == a1.image_sop_uid
    assert "not evaluated for multi-turn" in str(first["disclaimer"])

    # Turn 2: a distance is measured by the node, never asked of the model.
    calls_before = len(node.engine.calls)
    second = done(node.answer(conversation.id, "What is the distance between A1 and A2?"))
    assert len(node.engine.calls) == calls_before, "the model did not run"
    [measurement] = second["measurements"]  # type: ignore[misc]
    (ax, ay), (bx, by) = centre(a1.box), centre(a2.box)
    expected_mm = math.hypot(ax - bx, ay - by) * SPACING_MM
    assert measurement["mm"] == pytest.approx(expected_mm, abs=0.1)
    assert measurement["spacing_source"] == "PixelSpacing"
    assert f"{expected_mm:.1f} mm" in str(second["answer"])
    assert second["answered_by"] == "node" and second["model"] is None
    assert "Measured by the node" in str(second["disclaimer"])

    # Turn 3, in Chinese: "这个" without an anchor id refers to the most recent anchor (A2).
    third = done(node.answer(conversation.id, "这个结节边缘是否规则？"))
    request = node.engine.calls[-1][0]
    assert third["referenced_anchor_id"] == "A2" and third["answer"] == "边缘不规则。"
    assert len(request.all_images) == 2
    assert [turn.role for turn in request.history] == ["user", "model"] * 3
    assert request.history[2].text == "Is this nodule spiculated?"
    assert request.history[4].text.startswith("What is the distance")
    assert f"{expected_mm:.1f} mm" in request.history[5].text, "the model sees the measurement"
    assert "问题：这个结节边缘是否规则？" in request.prompt and "A2: hilum" in request.prompt

    view = get_conversation(db, conversation.id)
    assert [t.turn_index for t in view.turns] == [1, 2, 3]
    assert [a.id for a in view.anchors] == ["A1", "A2"]
    assert [t.referenced_anchor_id for t in view.turns] == ["A1", None, "A2"]
    assert view.turns[1].measurements[0].mm == pytest.approx(expected_mm, abs=0.1)
    assert view.turns[0].findings[0].region is not None
    assert {t.asked_by for t in view.turns} == {"dr.li"}


def test_without_pixel_spacing_the_answer_says_so(
    tmp_path: Path, db: Database, rg1_unci: Path
) -> None:
    node = reported_study(tmp_path, db, rg1_unci, [TURN1])  # RG1_UNCI: Pixel Spacing 0\0
    conversation = start_conversation(db, node.study_uid)
    done(node.answer(conversation.id, "Any other finding near it?", anchor_id="A1"))
    distance = done(node.answer(conversation.id, "A1 到 A2 的距离是多少？"))
    [measurement] = distance["measurements"]  # type: ignore[misc]
    assert measurement["mm"] is None and measurement["pixels"] > 0
    assert "没有 Pixel Spacing" in str(distance["answer"])
    size = done(node.answer(conversation.id, "How big is A1?"))
    [extent] = size["measurements"]  # type: ignore[misc]
    assert extent["width_mm"] is None and extent["width_px"] > 0
    assert "no Pixel Spacing or Imager Pixel Spacing" in str(size["answer"])


def test_unknown_anchor_and_unknown_study_are_refused(
    tmp_path: Path, db: Database, rg1_unci: Path
) -> None:
    node = reported_study(tmp_path, db, rg1_unci, [])
    conversation = start_conversation(db, node.study_uid)
    outcome = node.answer(conversation.id, "What is the distance between A1 and A7?")
    assert outcome.status == JobStatus.FAILED and outcome.error_code == ErrorCode.INVALID_INPUT
    assert outcome.error == "unknown anchor A7; this conversation has: A1"
    with pytest.raises(ValueError, match="anchor_id"):
        node.ask(conversation.id, "Is it calcified?", anchor_id="nodule")
    with pytest.raises(StudyNotFound):
        start_conversation(db, "1.2.3.4")


def test_crop_boxes_map_back_to_source_pixels(rg1_unci: Path) -> None:
    prepared = prepare_study([rg1_unci])
    study = StudyImages(prepared)
    uid = prepared.sop_instance_uids[0]
    anchor = Anchor(id="A1", label="nodule", box=[100.0, 200.0, 140.0, 220.0], image_sop_uid=uid)
    cropped = crop_around(anchor, study)
    assert cropped is not None
    image, geometry = cropped
    assert isinstance(geometry, CropGeometry) and image.size == (80, 80)
    assert (geometry.left, geometry.top, geometry.side) == (80.0, 170.0, 80.0)
    region = view_region(geometry, [250, 250, 750, 750])  # the middle half of the crop
    assert region is not None
    assert [region.x0, region.y0, region.x1, region.y1] == [100.0, 190.0, 140.0, 230.0]
    corner = Anchor(id="A2", label="x", box=[0.0, 0.0, 10.0, 10.0], image_sop_uid=uid)
    _, edge = crop_around(corner, study) or (None, None)
    assert edge is not None and edge.left < 0, "near the edge the crop reaches into padding"
    clipped = view_region(edge, [0, 0, 1000, 1000])
    assert clipped is not None and (clipped.x0, clipped.y0) == (0.0, 0.0)


def test_a_turn_through_the_demo_model_with_history_and_two_images(
    tmp_path: Path,
    db: Database,
    rg1_unci: Path,
    demo_engine: TransformersEngine,  # noqa: F811
) -> None:
    node = reported_study(tmp_path, db, rg1_unci, [])
    conversation = start_conversation(db, node.study_uid)
    seen: list[GenerationRequest] = []
    original: Callable[[list[GenerationRequest]], object] = demo_engine.generate

    class Recording:
        identity = demo_engine.identity

        def generate(self, requests):  # type: ignore[no-untyped-def]
            seen.extend(requests)
            return original(requests)

    worker = InferenceWorker(db, node.settings, lambda: Recording())  # type: ignore[arg-type,return-value]
    request_id = node.ask(conversation.id, "Is it calcified?")
    assert worker.run_once() == 1
    result = done(get_outcome(db, request_id))
    [request] = seen
    assert len(request.all_images) == 2 and len(request.history) == 2
    assert result["referenced_anchor_id"] == "A1" and result["answered_by"] == "model"
    assert result["model"]["is_test_model"] is True  # type: ignore[index]
    assert str(result["disclaimer"]).startswith("TEST MODEL")
    assert 0 < result["timings"]["new_tokens"] <= 8  # type: ignore[index]


def test_append_makes_a_report_version_that_supersedes_the_first(
    tmp_path: Path, db: Database, rg1_unci: Path
) -> None:
    settings = make_settings(tmp_path, db.url)
    settings.destinations = [
        FileDestination(kind="file", name="archive", directory=tmp_path / "out")
    ]
    node = reported_study(
        tmp_path, db, rg1_unci, [TURN1], settings, PixelSpacing=[SPACING_MM, SPACING_MM]
    )
    conversation = start_conversation(db, node.study_uid, created_by="dr.li")
    with pytest.raises(ConversationConflict, match="no answered question"):
        append_conversation(db, conversation.id, on_report=ReportOutputs(settings))
    done(node.answer(conversation.id, "Is this nodule spiculated?"))
    distance = done(node.answer(conversation.id, "distance between A1 and A2"))
    data_dir = settings.storage.data_dir

    new_id = append_conversation(
        db, conversation.id, appended_by="dr.li", on_report=ReportOutputs(settings),
        data_dir=data_dir,
    )  # fmt: skip
    with db.session() as session:
        first, appended = session.scalars(select(Report).order_by(Report.id)).all()
        document = report_document(session, appended)
        objects = {
            report_id: {obj.kind: obj for obj in session.scalars(
                select(ReportObject).where(ReportObject.report_id == report_id))}
            for report_id in (first.id, appended.id)
        }  # fmt: skip
        outbox = session.scalars(select(OutboxItem).where(OutboxItem.report_id == new_id)).all()
        state = session.get_one(Conversation, conversation.id).state
    assert appended.id == new_id and appended.job_id is None
    assert appended.supersedes_report_id == first.id == document.supersedes_report_id
    assert appended.study_version_id == first.study_version_id
    content = document.content
    assert [f.question for f in content.follow_up] == [
        "Is this nodule spiculated?",
        "distance between A1 and A2",
    ]
    assert content.follow_up[1].answered_by == "node"
    assert [f.label for f in content.findings] == ["nodule", "hilum"], "A2 became a finding"
    assert str(distance["answer"]) in content.narrative and "multi-turn" in content.narrative
    assert state == ConversationState.APPENDED

    # The new SR names the first one as its predecessor (PS3.3 C.17.2); the ORU carries the
    # follow-up questions; outbox rows were written with the report.
    sr = pydicom.dcmread(data_dir / objects[appended.id]["sr"].path)
    first_sr_uid = objects[first.id]["sr"].sop_instance_uid
    predecessor = sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert predecessor.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first_sr_uid
    oru = (data_dir / "reports" / str(new_id) / "oru-archive.hl7").read_text(encoding="utf-8")
    assert "Follow-up questions" in oru and "distance between A1 and A2" in oru
    assert {item.destination for item in outbox} == {"archive"}
    with pytest.raises(ConversationConflict, match="appended"):
        node.ask(conversation.id, "One more?")


def test_chat_history_alternates_user_and_model_without_a_system_role() -> None:
    image = Image.new("RGB", (8, 8))
    request = GenerationRequest(
        [image], "Q2", history=[ChatTurn("user", "Q1", [image]), ChatTurn("model", "A1")]
    )
    assert [t.role for t in request.turns] == ["user", "model", "user"]
    assert len(request.all_images) == 2
    for history in (
        [ChatTurn("system", "be brief"), ChatTurn("model", "A1")],
        [ChatTurn("user", "Q1")],
        [ChatTurn("user", "Q1"), ChatTurn("model", "A1", [image])],
    ):
        with pytest.raises(ValueError):
            GenerationRequest([], "Q", history=history)


def test_a_report_asked_question_first_is_replayed_in_that_order(
    tmp_path: Path, db: Database, rg1_unci: Path
) -> None:
    """A site template that asks before the images: the report row keeps that order, and a
    conversation replays the report's turn as the model read it (the new question keeps the
    conversation's own order, after its images)."""
    site = tmp_path / "prompts"
    site.mkdir()
    (site / "chest.toml").write_text(
        'en = "List the findings as one JSON object."\nquestion_first = true\n'
        '[match]\nmodality = "CR"\nbody_part = "CHEST"\n',
        encoding="utf-8",
    )
    settings = make_settings(tmp_path, db.url, prompts_dir=site)
    node = reported_study(tmp_path, db, rg1_unci, ["The heart is not enlarged."], settings)
    assert node.engine.calls[0][0].question_first
    with db.session() as session:
        assert session.scalars(select(Report.question_first)).one() is True
    conversation = start_conversation(db, node.study_uid, created_by="dr.li")
    done(node.answer(conversation.id, "Is the heart enlarged?"))
    request = node.engine.calls[-1][0]
    assert request.history[0].question_first and "JSON object" in request.history[0].text
    assert not request.question_first
