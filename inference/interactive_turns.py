"""Conversation turns of the priority lane: the study as the model saw it, the turns so far,
the anchors (numbered regions) and a question about them (inference/conversation.py), answered
by the model, or by the node when it asks for a distance or size it can measure.

Each turn is stored with the request's answer in one transaction; a conversation closed or
appended meanwhile refuses the turn with ``conflict``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from inference.conversation import (
    PastTurn,
    StudyImages,
    TurnError,
    build_turn_request,
    question_language,
    read_answer,
    requested_measurements,
    resolve_reference,
    spacings_by_sop_uid,
)
from inference.engine import GenerationResult
from inference.interactive_items import (
    LaneItem,
    RequestRefused,
    TurnContext,
    TurnPlan,
    clean_text,
    disclaimer,
)
from inference.preprocess import PreprocessError, prepare_study
from storage.conversations import current_anchors
from storage.db import Database
from storage.interactive import ClaimedRequest, ErrorCode, TurnResult, complete_in
from storage.models import (
    Conversation,
    ConversationState,
    ConversationTurn,
    Report,
    StudyVersion,
    utcnow,
)
from storage.report_schema import ModelIdentity, ReportContent

STUDY_CACHE_SIZE = 4  # studies kept rendered: a conversation's turns reuse its images
NODE_MEASURED = "Measured by the node from the image header between AI-generated regions."

Timings = Callable[[LaneItem, GenerationResult | None], dict[str, float]]


class TurnAnswers:
    """Prepares conversation turns for the engine (or measures) and stores their answers."""

    def __init__(self, db: Database, data_dir: Path, language: str, timings: Timings) -> None:
        self.db = db
        self.data_dir = data_dir
        self.language = language  # [model] language: the default of questions and answers
        self._timings = timings
        self._studies: OrderedDict[int, StudyImages] = OrderedDict()

    def prepare(self, request: ClaimedRequest, max_new_tokens: int) -> LaneItem:
        payload = request.payload
        question = str(payload.get("question", "")).strip()
        anchor_id = payload.get("anchor_id")
        context = self._turn_context(int(payload.get("conversation_id") or 0))
        language = question_language(question, self.language)
        try:
            reference = resolve_reference(
                question, anchor_id if isinstance(anchor_id, str) else None, context.anchors
            )
        except TurnError as exc:
            raise RequestRefused(str(exc), ErrorCode.INVALID_INPUT) from exc
        measurements = requested_measurements(
            question, reference, context.anchors, context.study, language
        )
        plan = TurnPlan(context, question, language, reference, measurements, [])
        if measurements:
            return LaneItem(request, None, plan)
        generation, plan.views = build_turn_request(
            question=question,
            reference=reference,
            anchors=context.anchors,
            study=context.study,
            report_question=context.report_question,
            report_content=context.report_content,
            past=context.past,
            language=language,
            max_new_tokens=max_new_tokens,
        )
        return LaneItem(request, generation, plan)

    def finish(
        self,
        item: LaneItem,
        plan: TurnPlan,
        result: GenerationResult | None,
        identity: ModelIdentity,
    ) -> None:
        context = plan.context
        if result is None:  # measured by the node; the model did not run
            answer = " ".join(m.text for m in plan.measurements)
            findings, new_anchors, raw_text, model = [], [], "", None
            text = f"{NODE_MEASURED} {disclaimer(context.is_test_model, follow_up=True)}"
        else:
            read = read_answer(
                result.text, plan.language, plan.views, context.study, context.anchors,
                context.turn_index,
            )  # fmt: skip
            answer, findings, new_anchors = read.answer, read.findings, read.new_anchors
            raw_text, model = result.text, identity
            text = disclaimer(identity.is_test_model, follow_up=True)
        turn = TurnResult(
            conversation_id=context.id,
            turn_index=context.turn_index,
            question=plan.question,
            answer=answer,
            answered_by="node" if result is None else "model",
            referenced_anchor_id=plan.reference.anchor.id if plan.reference.anchor else None,
            findings=findings,
            anchors=[*context.anchors, *new_anchors],
            new_anchor_ids=[anchor.id for anchor in new_anchors],
            measurements=plan.measurements,
            model=model,
            disclaimer=text,
            timings=self._timings(item, result),
        )
        self._store_turn(item.claimed, turn, raw_text)

    def _store_turn(self, request: ClaimedRequest, turn: TurnResult, raw_text: str) -> None:
        """The turn row and the request's answer in one transaction."""
        with self.db.session() as session:
            conversation = session.get_one(Conversation, turn.conversation_id)
            if conversation.state != ConversationState.OPEN:
                raise RequestRefused(
                    f"conversation {conversation.id} was {conversation.state} meanwhile",
                    ErrorCode.CONFLICT,
                )
            session.add(
                ConversationTurn(
                    conversation_id=turn.conversation_id,
                    turn_index=turn.turn_index,
                    question=turn.question,
                    answer=turn.answer,
                    raw_text=raw_text,
                    answered_by=turn.answered_by,
                    referenced_anchor_id=turn.referenced_anchor_id,
                    anchors=[a.model_dump(mode="json") for a in turn.anchors],
                    findings=[f.model_dump(mode="json") for f in turn.findings],
                    measurements=[m.model_dump(mode="json") for m in turn.measurements],
                    model_json=turn.model.model_dump(mode="json") if turn.model else {},
                    timings=turn.timings,
                    asked_by=request.requested_by,
                    request_id=request.id,
                    created_at=utcnow(),
                )
            )
            complete_in(session, request.id, turn.model_dump(mode="json"))

    def _turn_context(self, conversation_id: int) -> TurnContext:
        with self.db.session() as session:
            conversation = session.get(Conversation, conversation_id)
            if conversation is None:
                raise RequestRefused(f"no conversation {conversation_id}", ErrorCode.NOT_FOUND)
            if conversation.state != ConversationState.OPEN:
                raise RequestRefused(
                    f"conversation {conversation_id} is {conversation.state}", ErrorCode.CONFLICT
                )
            report = (
                session.get_one(Report, conversation.report_id)
                if conversation.report_id is not None
                else None
            )
            version_id = (
                report.study_version_id
                if report is not None
                else _latest_version(session, conversation.study_id)
            )
            version = session.get_one(StudyVersion, version_id)
            paths = [self.data_dir / instance.path for instance in version.instances]
            turns = list(conversation.turns)
            anchors = current_anchors(session, conversation)
            past = [PastTurn(turn.question, _past_text(turn)) for turn in turns]
        return TurnContext(
            id=conversation_id,
            turn_index=len(turns) + 1,
            anchors=anchors,
            report_question=report.question if report is not None else None,
            report_content=(
                ReportContent.model_validate(report.content_json) if report is not None else None
            ),
            past=past,
            is_test_model=bool(report.is_test_model) if report is not None else False,
            study=self._study_images(version_id, paths),
        )

    def _study_images(self, version_id: int, paths: list[Path]) -> StudyImages:
        """The study rendered as the model saw it (kept for the next turns)."""
        cached = self._studies.get(version_id)
        if cached is not None:
            self._studies.move_to_end(version_id)
            return cached
        try:
            prepared = prepare_study(paths)
        except PreprocessError as exc:
            raise RequestRefused(
                f"the study images cannot be used: {exc}", ErrorCode.INVALID_INPUT
            ) from exc
        study = StudyImages(prepared, spacings_by_sop_uid(paths))
        self._studies[version_id] = study
        while len(self._studies) > STUDY_CACHE_SIZE:
            self._studies.popitem(last=False)
        return study


def _latest_version(session: Session, study_id: int) -> int:
    version_id = session.scalar(
        select(StudyVersion.id)
        .where(StudyVersion.study_id == study_id)
        .order_by(StudyVersion.version_number.desc())
        .limit(1)
    )
    if version_id is None:
        raise RequestRefused("the study has no images yet", ErrorCode.INVALID_INPUT)
    return int(version_id)


def _past_text(turn: ConversationTurn) -> str:
    """What the model said in an earlier turn (its thinking dropped), or the node's answer."""
    if turn.answered_by == "model" and turn.raw_text:
        return clean_text(turn.raw_text)
    return turn.answer
