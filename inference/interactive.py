"""The inference worker's priority lane: predict requests and conversation turns.

The worker (inference/worker.py) calls ``InteractiveLane.serve(engine)`` before it runs each
batch of studies, and when the API rings its doorbell while it is idle; on the CUDA fast path
also between decode steps of the running batch (inference/lane_steps.py, one round at a
time), so a question does not wait for that batch to end either. Each round claims up to
``interactive.max_batch`` requests (storage/interactive.py, with a lease) and runs them
through the same engine as studies, as one batch; at most
``interactive.max_rounds_between_batches`` rounds run before the next study batch (and as
many inside it), so a steady stream of questions cannot starve the studies.

    predict            the upload (DICOM: the same preprocessing as received studies; PNG/JPEG
                       as RGB, padded to a square) + the question (default: the template of
                       its modality) -> answer, findings, boxes in pixels of the upload
    conversation_turn  inference/conversation.py: the conversation as chat turns, anchors,
                       a crop for a question about one anchor; distances and sizes measured
                       by the node without the model

Without a model (no weights) every waiting request fails at once with the message ``status``
shows (how to provide weights). A request that cannot be answered as asked (unreadable
upload, unknown anchor, conversation already appended) fails with ``invalid_input`` or
``conflict``; one failure never affects the other requests of the round.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from config.settings import NodeSettings
from core.errors import InferenceError
from inference.conversation import (
    ImageView,
    PastTurn,
    Reference,
    StudyImages,
    TurnError,
    build_turn_request,
    question_language,
    read_answer,
    requested_measurements,
    resolve_reference,
    spacings_by_sop_uid,
)
from inference.engine import (
    BatchPartlyFailed,
    Engine,
    EngineRequestFailed,
    EngineRequestRejected,
    EngineUnavailable,
    GenerationRequest,
    GenerationResult,
    OutOfMemory,
)
from inference.parsing import strip_thinking
from inference.predict import (
    PredictSource,
    UnusableImage,
    answer_language,
    dicom_source,
    disclaimer,
    picture_source,
    predict_request,
    predict_result,
    template_language,
)
from inference.preprocess import PreprocessError, prepare_study
from inference.prompts import PromptLibrary
from storage.conversations import current_anchors
from storage.db import Database
from storage.doorbell import API_DOORBELL, ring
from storage.interactive import (
    Anchor,
    ClaimedRequest,
    ErrorCode,
    Measurement,
    TurnResult,
    claim_next,
    complete,
    complete_in,
    fail,
    fail_abandoned,
    has_queued,
    release,
    remove_upload,
)
from storage.models import (
    Conversation,
    ConversationState,
    ConversationTurn,
    InteractiveKind,
    InteractiveRequest,
    Report,
    StudyVersion,
    utcnow,
)
from storage.report_schema import ModelIdentity, ReportContent

log = logging.getLogger("medgemma_node.interactive")

STUDY_CACHE_SIZE = 4  # studies kept rendered: a conversation's turns reuse its images
ABANDONED_CHECK_S = 30.0
NODE_MEASURED = "Measured by the node from the image header between AI-generated regions."


class RequestRefused(InferenceError):
    """This request cannot be answered as asked; ``code`` says why (storage ErrorCode)."""

    def __init__(self, message: str, code: ErrorCode) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class PredictPlan:
    source: PredictSource
    language: str


@dataclass
class TurnContext:
    """What answering one turn needs from the database and the study's files."""

    id: int
    turn_index: int
    anchors: list[Anchor]
    report_question: str | None
    report_content: ReportContent | None
    report_question_first: bool
    past: list[PastTurn]
    is_test_model: bool
    study: StudyImages


@dataclass
class TurnPlan:
    context: TurnContext
    question: str
    language: str
    reference: Reference
    measurements: list[Measurement]  # non-empty: the node answers, the model does not run
    views: list[ImageView]  # what each box_2d image_index of the answer means


@dataclass
class LaneItem:
    """One claimed request, ready to run: its engine request (None: answered by the node)."""

    claimed: ClaimedRequest
    request: GenerationRequest | None
    plan: PredictPlan | TurnPlan
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def conversation_id(self) -> int | None:
        return self.plan.context.id if isinstance(self.plan, TurnPlan) else None


class InteractiveLane:
    """Claims, runs and answers interactive requests for one inference worker."""

    def __init__(
        self, db: Database, settings: NodeSettings, prompts: PromptLibrary, owner: str
    ) -> None:
        self.db = db
        self.data_dir = settings.storage.data_dir
        self.settings = settings.interactive
        self.model_settings = settings.model
        self.prompts = prompts
        self.owner = owner
        self._studies: OrderedDict[int, StudyImages] = OrderedDict()
        self._next_abandoned_check = 0.0

    # -- entry points -----------------------------------------------------------------------

    def recover(self) -> int:
        """At worker start: requests a previous run left running fail (SQLite: all of them)."""
        return fail_abandoned(self.db, all_running=self.db.is_sqlite)

    def refuse_all(self, message: str) -> int:
        """No model: fail every waiting request now with ``message`` (how to provide weights)."""
        refused = 0
        if not has_queued(self.db):  # the idle worker asks every poll: no lock, one lookup
            return 0
        while claimed := claim_next(self.db, self.owner, 64, self.settings.lease_seconds):
            for request in claimed:
                self._fail(request, message, ErrorCode.MODEL_UNAVAILABLE)
            refused += len(claimed)
        if refused:
            ring(self.data_dir, API_DOORBELL)
        return refused

    def serve(self, engine: Engine, max_rounds: int | None = None) -> int:
        """Answer waiting requests, in rounds of up to max_batch (at most ``max_rounds``,
        default max_rounds_between_batches); return how many finished."""
        self._check_abandoned()
        finished = 0
        rounds = self.settings.max_rounds_between_batches if max_rounds is None else max_rounds
        for _ in range(rounds):
            if not has_queued(self.db):
                break
            claimed = claim_next(
                self.db, self.owner, self.settings.max_batch, self.settings.lease_seconds
            )
            if not claimed:
                break
            finished += self._round(engine, claimed)
            ring(self.data_dir, API_DOORBELL)
        return finished

    def _check_abandoned(self) -> None:
        if time.monotonic() >= self._next_abandoned_check:
            self._next_abandoned_check = time.monotonic() + ABANDONED_CHECK_S
            if failed := fail_abandoned(self.db):
                log.warning("%d interactive requests of a stopped worker failed", failed)

    # -- one round --------------------------------------------------------------------------

    def _round(self, engine: Engine, claimed: list[ClaimedRequest]) -> int:
        items, later = self._prepare_all(claimed)
        if later:
            release(self.db, [request.id for request in later], self.owner)
        results = self._generate(engine, [item for item in items if item.request is not None])
        for item in items:
            result = results.get(item.claimed.id)
            if item.request is None or result is not None:  # else it failed in _generate
                identity = result.identity if result and result.identity else engine.identity
                self._finish(item, result, identity)
        return len(claimed) - len(later)

    def _prepare_all(
        self, claimed: list[ClaimedRequest]
    ) -> tuple[list[LaneItem], list[ClaimedRequest]]:
        """Every request ready to run; a second turn of one conversation waits for the next
        round (it must see the first one's answer)."""
        items: list[LaneItem] = []
        later: list[ClaimedRequest] = []
        for request in claimed:
            conversation_id = request.payload.get("conversation_id")
            if conversation_id is not None and any(
                item.conversation_id == conversation_id for item in items
            ):
                later.append(request)
                continue
            started = time.perf_counter()
            try:
                item = self._prepare(request)
            except RequestRefused as exc:
                self._fail(request, str(exc), exc.code)
                continue
            except Exception as exc:
                log.exception("interactive request %d could not be prepared", request.id)
                self._fail(request, f"{type(exc).__name__}: {exc}", ErrorCode.INTERNAL)
                continue
            item.timings["preprocess_s"] = round(time.perf_counter() - started, 4)
            items.append(item)
        return items, later

    def _prepare(self, request: ClaimedRequest) -> LaneItem:
        if request.kind == InteractiveKind.PREDICT:
            return self._prepare_predict(request)
        if request.kind == InteractiveKind.CONVERSATION_TURN:
            return self._prepare_turn(request)
        raise RequestRefused(f"unknown request kind {request.kind!r}", ErrorCode.INVALID_INPUT)

    def _generate(self, engine: Engine, items: list[LaneItem]) -> dict[int, GenerationResult]:
        """One engine batch. Out of memory: one request at a time; a request that still fails
        fails alone."""
        if not items:
            return {}
        requests = [item.request for item in items if item.request is not None]
        started = time.perf_counter()
        try:
            results: list[GenerationResult | InferenceError] = list(engine.generate(requests))
        except BatchPartlyFailed as exc:  # an inference server: some requests answered
            results = exc.outcomes
        except (EngineUnavailable, EngineRequestFailed) as exc:
            for item in items:
                self._fail(item.claimed, str(exc), _engine_error_code(exc))
            return {}
        except OutOfMemory:
            if len(items) == 1:
                self._fail(items[0].claimed, "the device ran out of memory", ErrorCode.INTERNAL)
                return {}
            log.warning("out of memory at %d interactive requests: one at a time", len(items))
            return {k: v for item in items for k, v in self._generate(engine, [item]).items()}
        except Exception as exc:
            log.exception("interactive batch failed")
            for item in items:
                self._fail(item.claimed, f"{type(exc).__name__}: {exc}", ErrorCode.INTERNAL)
            return {}
        elapsed = round(time.perf_counter() - started, 4)
        answered: dict[int, GenerationResult] = {}
        for item, outcome in zip(items, results, strict=True):
            if isinstance(outcome, InferenceError):
                self._fail(item.claimed, str(outcome), _engine_error_code(outcome))
                continue
            item.timings["generate_s"] = elapsed
            item.timings["batch_size"] = len(items)
            answered[item.claimed.id] = outcome
        return answered

    def _finish(
        self, item: LaneItem, result: GenerationResult | None, identity: ModelIdentity
    ) -> None:
        try:
            if isinstance(item.plan, PredictPlan):
                self._finish_predict(item, item.plan, result, identity)
            else:
                self._finish_turn(item, item.plan, result, identity)
        except RequestRefused as exc:
            self._fail(item.claimed, str(exc), exc.code)
        except Exception as exc:
            log.exception("interactive request %d: storing the answer failed", item.claimed.id)
            self._fail(item.claimed, f"{type(exc).__name__}: {exc}", ErrorCode.INTERNAL)
        finally:
            remove_upload(self.data_dir, item.claimed.payload)

    def _fail(self, request: ClaimedRequest, message: str, code: ErrorCode) -> None:
        fail(self.db, request.id, message, code)
        remove_upload(self.data_dir, request.payload)
        log.info("interactive request %d failed (%s): %s", request.id, code, message)

    def _max_new_tokens(self, payload: dict[str, Any]) -> int:
        wanted = payload.get("max_new_tokens")
        value = wanted if isinstance(wanted, int) and wanted > 0 else self.settings.max_new_tokens
        return min(value, self.model_settings.max_new_tokens)

    def _timings(self, item: LaneItem, result: GenerationResult | None) -> dict[str, float]:
        """Seconds waiting in the queue, preprocessing, generating; the whole request so far."""
        with self.db.session() as session:
            row = session.get_one(InteractiveRequest, item.claimed.id)
            created, started = row.created_at, row.started_at or row.created_at
        timings = {
            **item.timings,
            "queued_s": round((started - created).total_seconds(), 4),
            "total_s": round((utcnow() - created).total_seconds(), 4),
        }
        if result is not None:
            timings["new_tokens"] = result.new_tokens
            timings["prompt_tokens"] = result.prompt_tokens
        return timings

    # -- predict ----------------------------------------------------------------------------

    def _prepare_predict(self, request: ClaimedRequest) -> LaneItem:
        """inference/predict.py: the same path as the `predict` command."""
        payload = request.payload
        path = self.data_dir / str(payload.get("upload_path", ""))
        kind = str(payload.get("upload_kind"))
        asked, default = payload.get("language"), self.model_settings.language
        template = template_language(asked, default)
        try:
            if kind == "dicom":
                source = dicom_source(path, self.prompts, template)
            else:
                source = picture_source(path.read_bytes(), kind, self.prompts, template)
        except (UnusableImage, OSError) as exc:  # OSError: the kept upload cannot be read
            raise RequestRefused(str(exc), ErrorCode.INVALID_INPUT) from exc
        question = str(payload.get("question") or "")
        generation, question = predict_request(source, question, self._max_new_tokens(payload))
        plan = PredictPlan(source, answer_language(asked, question, default))
        return LaneItem(request, generation, plan)

    def _finish_predict(
        self,
        item: LaneItem,
        plan: PredictPlan,
        result: GenerationResult | None,
        identity: ModelIdentity,
    ) -> None:
        assert result is not None
        timings = self._timings(item, result)
        predict = predict_result(result.text, plan.source, plan.language, identity, timings)
        complete(self.db, item.claimed.id, predict.model_dump(mode="json"))

    # -- conversation turns -------------------------------------------------------------------

    def _prepare_turn(self, request: ClaimedRequest) -> LaneItem:
        payload = request.payload
        question = str(payload.get("question", "")).strip()
        anchor_id = payload.get("anchor_id")
        context = self._turn_context(int(payload.get("conversation_id") or 0))
        language = question_language(question, self.model_settings.language)
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
            report_question_first=context.report_question_first,
            report_content=context.report_content,
            past=context.past,
            language=language,
            max_new_tokens=self._max_new_tokens(payload),
        )
        return LaneItem(request, generation, plan)

    def _finish_turn(
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
            report_question_first=bool(report.question_first) if report is not None else False,
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


def _engine_error_code(error: InferenceError) -> ErrorCode:
    """An inference server's refusal of the request itself is the request's problem (its
    question or images); its absence, overload or failure means no model can answer now."""
    if isinstance(error, EngineRequestRejected):
        return ErrorCode.INVALID_INPUT
    if isinstance(error, EngineUnavailable | EngineRequestFailed):
        return ErrorCode.MODEL_UNAVAILABLE
    return ErrorCode.INTERNAL


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
        return _clean_text(turn.raw_text)
    return turn.answer


def _clean_text(text: str) -> str:
    answer, _unclosed = strip_thinking(text)
    return answer.strip()
