"""Conversations about a study, anchored to regions (storage/conversations.py; answered by the
inference worker, inference/conversation.py).

    POST /api/studies/{uid}/conversations    radiologist   a new conversation; anchors A1..An
                                                           are the latest report's boxes
    POST /api/conversations/{id}/messages    radiologist   ask; the answer as for predict
                                                           (200, 202 + Location, errors:
                                                           api/answers.py)
    GET  /api/conversations/{id}             viewer        every turn with its anchors
    POST /api/conversations/{id}/append      radiologist   the turns become a new report
                                                           version superseding the one the
                                                           conversation started from

Append writes the new report's SR (the previous SR as Predecessor Document, PS3.3 C.17.2.1),
ORU and outbox rows in one transaction through the outputs hook ``serve`` gives the API
(medgemma_node.outputs.ReportOutputs), then wakes the delivery worker: the new version goes
to every destination like any report. Who started, asked and appended is stored with the rows
and in the audit trail.
"""

from __future__ import annotations

from typing import Annotated, Any

import anyio
from fastapi import APIRouter, HTTPException, Path, Request, status
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from api.answers import answer_responses, outcome_response, queue_full_response
from api.deps import ApiContext, Context, Radiologist, Viewer, audit_study
from api.routers.predict import Wait, check_question, wait_seconds
from api.routers.studies import StudyUID
from storage.conversations import (
    ANCHOR_ID,
    ConversationConflict,
    ConversationNotFound,
    ConversationView,
    StudyNotFound,
    append_conversation,
    ask,
    get_conversation,
    start_conversation,
)
from storage.interactive import QueueFull, TurnResult

router = APIRouter(prefix="/api", tags=["conversations"])

ConversationId = Annotated[int, Path(ge=1, description="Conversation id")]
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "No such conversation"}}


class QuestionIn(BaseModel):
    question: str = Field(min_length=1, description="At most [api] max_question_chars")
    anchor_id: str | None = Field(
        default=None,
        pattern=ANCHOR_ID.pattern,
        description="The region asked about (A1, A2, ...); without it, a question that says "
        "'this', 'that lesion', '这个', '上述' refers to the most recent anchor",
    )
    max_new_tokens: int | None = Field(default=None, ge=1)


class AppendResult(BaseModel):
    report_id: int = Field(description="The new report version")
    supersedes_report_id: int
    conversation_id: int
    study_instance_uid: str


def _not_found(exc: LookupError) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, str(exc))


def _conflict(exc: ConversationConflict) -> HTTPException:
    return HTTPException(status.HTTP_409_CONFLICT, str(exc))


@router.post(
    "/studies/{study_uid}/conversations",
    response_model=ConversationView,
    tags=["studies"],
    summary="Start a conversation about a study (anchors A1..An from its latest report)",
    responses={404: {"description": "No such study"}},
)
def start(
    request: Request, context: Context, user: Radiologist, study_uid: StudyUID
) -> ConversationView:
    try:
        view = start_conversation(context.db, study_uid, created_by=user.name)
    except StudyNotFound as exc:
        raise _not_found(exc) from exc
    audit_study(request, study_uid, conversation_id=view.id)
    return view


@router.get(
    "/conversations/{conversation_id}",
    response_model=ConversationView,
    summary="A conversation: every turn with its anchors",
    responses=NOT_FOUND,
)
def conversation(
    request: Request, context: Context, _user: Viewer, conversation_id: ConversationId
) -> ConversationView:
    try:
        view = get_conversation(context.db, conversation_id)
    except ConversationNotFound as exc:
        raise _not_found(exc) from exc
    audit_study(request, view.study_instance_uid, conversation_id=conversation_id)
    return view


@router.post(
    "/conversations/{conversation_id}/messages",
    response_model=None,
    summary="Ask a question (optionally about one anchor); the answer with its anchors",
    responses=answer_responses(
        TurnResult,
        {
            404: "No such conversation",
            409: "The conversation was appended or closed: start a new one",
            422: "An empty question, one over [api] max_question_chars, or a malformed anchor_id",
        },
    ),
)
async def message(
    request: Request,
    context: Context,
    user: Radiologist,
    conversation_id: ConversationId,
    body: QuestionIn,
    wait: Wait = None,
) -> Response:
    """The model sees the conversation so far as chat turns, the anchors with their
    coordinates and, for a question about one anchor, a zoomed crop of it; distances and sizes
    are measured by the node from the pixel spacing. Each box in the answer becomes a new
    anchor. Waits for the answer up to `wait` seconds, else 202 with the location of the
    answer (GET /api/answers/{request_id}).

    HTTP status of each worker error_code: invalid_input 422 (e.g. an unknown anchor),
    not_found 404, conflict 409 (appended meanwhile), model_unavailable 503 (the message says
    how to provide weights), worker_stopped 503, internal 500. Too many questions queued
    ([api] max_queued_questions): 429 + Retry-After.
    """
    check_question(context, body.question)
    try:
        request_id, study_uid = await anyio.to_thread.run_sync(
            _ask, context, conversation_id, body, user.name
        )
    except ConversationNotFound as exc:
        raise _not_found(exc) from exc
    except ConversationConflict as exc:
        raise _conflict(exc) from exc
    except QueueFull as exc:
        return queue_full_response(exc)
    except ValueError as exc:  # an empty question
        detail = [{"type": "value_error", "loc": ["body", "question"], "msg": str(exc)}]
        return JSONResponse({"detail": detail}, status.HTTP_422_UNPROCESSABLE_CONTENT)
    audit_study(request, study_uid, conversation_id=conversation_id, request_id=request_id)
    outcome = await context.answers.wait(request_id, wait_seconds(context, wait))
    return outcome_response(outcome)


def _ask(context: ApiContext, conversation_id: int, body: QuestionIn, user: str) -> tuple[int, str]:
    settings = context.settings
    request_id = ask(
        context.db,
        context.data_dir,
        conversation_id,
        body.question,
        anchor_id=body.anchor_id,
        asked_by=user,
        max_new_tokens=body.max_new_tokens or settings.interactive.max_new_tokens,
        max_queued=settings.api.max_queued_questions,
    )
    return request_id, get_conversation(context.db, conversation_id).study_instance_uid


@router.post(
    "/conversations/{conversation_id}/append",
    response_model=AppendResult,
    summary="Append the conversation to the report: a new version that supersedes it",
    responses={
        **NOT_FOUND,
        409: {
            "description": "Already appended or closed, no answered question, no report to "
            "append to, or a newer report exists"
        },
        503: {"description": "This API process cannot write reports (no outputs configured)"},
    },
)
def append(
    request: Request, context: Context, user: Radiologist, conversation_id: ConversationId
) -> AppendResult:
    """The question-and-answer turns (and the regions the answers marked, as findings) become
    a new report version: a new SR with the previous SR as Predecessor Document, an ORU, the
    JSON, and deliveries to every destination, like any report."""
    if context.on_report is None:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, "this API process cannot write report outputs"
        )
    try:
        report_id = append_conversation(
            context.db,
            conversation_id,
            appended_by=user.name,
            on_report=context.on_report,
            data_dir=context.data_dir,
        )
        view = get_conversation(context.db, conversation_id)
    except ConversationNotFound as exc:
        raise _not_found(exc) from exc
    except ConversationConflict as exc:
        raise _conflict(exc) from exc
    audit_study(
        request, view.study_instance_uid, conversation_id=conversation_id, report_id=report_id
    )
    assert view.report_id is not None  # append needs the report it started from
    return AppendResult(
        report_id=report_id,
        supersedes_report_id=view.report_id,
        conversation_id=conversation_id,
        study_instance_uid=view.study_instance_uid,
    )
