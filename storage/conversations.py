"""Conversations about a study: rows, anchors, questions queued for the worker, and append.

Interface for the HTTP layer (the answering itself is inference/conversation.py, run by the
inference worker; the model never runs in the API process)::

    start_conversation(db, study_uid, created_by) -> ConversationView
        POST /api/studies/{study_uid}/conversations     StudyNotFound: 404
    ask(db, data_dir, conversation_id, question, anchor_id=..., asked_by=..., ...) -> request id
        POST /api/conversations/{id}/messages, then storage.interactive.wait_for_result: the
        result is a storage.interactive.TurnResult (answer, findings, anchors, disclaimer)
        ConversationNotFound: 404; ConversationConflict (appended/closed): 409;
        QueueFull: 429 + Retry-After; a bad anchor id fails the request (invalid_input: 422)
    get_conversation(db, conversation_id) -> ConversationView
        GET /api/conversations/{id}: every turn with its anchors
    append_conversation(db, conversation_id, appended_by=..., on_report=...) -> report id
        POST /api/conversations/{id}/append (radiologist). on_report is the worker's outputs
        hook (medgemma_node.outputs.ReportOutputs(settings)): the new report's SR (with the
        previous SR as Predecessor Document), ORU and outbox rows are written in the same
        transaction; pass data_dir to wake the delivery worker. ConversationConflict: 409.

Anchors: the first turn starts from the study's latest report; its findings that have a
region are A1..An (box in source-image pixels [x0, y0, x1, y1], label, image SOP UID). Each box
a later answer gives becomes the next anchor. Each turn row keeps every anchor known after it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.errors import StorageError
from storage import audit
from storage.db import Database
from storage.doorbell import DELIVERY_DOORBELL, ring
from storage.interactive import Anchor, Measurement, submit
from storage.models import (
    AuditEvent,
    Conversation,
    ConversationState,
    ConversationTurn,
    InteractiveKind,
    Report,
    Study,
    utcnow,
)
from storage.report_schema import (
    AI_DISCLAIMER,
    FOLLOW_UP_DISCLAIMER,
    Finding,
    FollowUp,
    ReportContent,
    follow_up_text,
)

ANCHOR_ID = re.compile(r"^A[1-9][0-9]{0,3}$")
ReportHook = Callable[[Session, Report], None]


class StudyNotFound(StorageError, LookupError):
    """No study has this Study Instance UID."""


class ConversationNotFound(StorageError, LookupError):
    """No conversation has this id."""


class ConversationConflict(StorageError):
    """The conversation cannot take this action in its state (appended, closed, stale)."""


class TurnView(BaseModel):
    turn_index: int
    question: str
    answer: str
    answered_by: str
    referenced_anchor_id: str | None
    anchors: list[Anchor]
    findings: list[Finding]
    measurements: list[Measurement]
    asked_by: str
    created_at: datetime
    timings: dict[str, Any]


class ConversationView(BaseModel):
    id: int
    study_instance_uid: str
    report_id: int | None
    state: str
    created_by: str
    created_at: datetime
    appended_report_id: int | None
    anchors: list[Anchor]  # every anchor known now
    turns: list[TurnView]
    disclaimer: str = f"{AI_DISCLAIMER} {FOLLOW_UP_DISCLAIMER}"


# --------------------------------------------------------------------------- anchors


def anchors_from_report(content: ReportContent) -> list[Anchor]:
    """A1..An: the report's findings that have a region on a source image, in report order."""
    anchors: list[Anchor] = []
    for finding in content.findings:
        region = finding.region
        if region is None:
            continue
        anchors.append(
            Anchor(
                id=f"A{len(anchors) + 1}",
                label=finding.label,
                box=[region.x0, region.y0, region.x1, region.y1],
                image_sop_uid=region.sop_instance_uid,
                frame_number=region.frame_number,
                source="report",
            )
        )
    return anchors


def current_anchors(session: Session, conversation: Conversation) -> list[Anchor]:
    """The anchors after the newest turn, or the report's before the first."""
    last = session.scalars(
        select(ConversationTurn)
        .where(ConversationTurn.conversation_id == conversation.id)
        .order_by(ConversationTurn.turn_index.desc())
        .limit(1)
    ).first()
    if last is not None:
        return [Anchor.model_validate(a) for a in last.anchors]
    if conversation.report_id is None:
        return []
    report = session.get_one(Report, conversation.report_id)
    return anchors_from_report(ReportContent.model_validate(report.content_json))


def latest_report(session: Session, study_id: int) -> Report | None:
    return session.scalars(
        select(Report).where(Report.study_id == study_id).order_by(Report.id.desc()).limit(1)
    ).first()


# --------------------------------------------------------------------------- API functions


def start_conversation(db: Database, study_uid: str, created_by: str = "") -> ConversationView:
    """A new open conversation about the study, starting from its latest report (if any)."""
    with db.session() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid)).first()
        if study is None:
            raise StudyNotFound(f"no study {study_uid}")
        report = latest_report(session, study.id)
        conversation = Conversation(
            study_id=study.id,
            report_id=report.id if report is not None else None,
            created_by=created_by,
            created_at=utcnow(),
            state=ConversationState.OPEN,
        )
        session.add(conversation)
        session.flush()
        session.add(
            audit.event(
                "conversation.started",
                study_uid=study_uid,
                actor=created_by,
                conversation_id=conversation.id,
                report_id=conversation.report_id,
            )
        )
        return _view(session, conversation)


def get_conversation(db: Database, conversation_id: int) -> ConversationView:
    with db.session() as session:
        return _view(session, _conversation(session, conversation_id))


def ask(
    db: Database,
    data_dir: Path | None,
    conversation_id: int,
    question: str,
    *,
    anchor_id: str | None = None,
    asked_by: str = "",
    max_new_tokens: int,
    max_queued: int,
) -> int:
    """Queue a question of an open conversation for the worker; return the request id."""
    if not question.strip():
        raise ValueError("the question is empty")
    if anchor_id is not None and not ANCHOR_ID.match(anchor_id):
        raise ValueError(f"anchor_id {anchor_id!r} is not of the form A1, A2, ...")
    with db.session() as session:
        conversation = _conversation(session, conversation_id)
        _require_open(conversation)
        study_uid = session.get_one(Study, conversation.study_id).study_instance_uid
    payload = {
        "conversation_id": conversation_id,
        "question": question.strip(),
        "anchor_id": anchor_id,
        "max_new_tokens": max_new_tokens,
    }
    request_id = submit(
        db,
        InteractiveKind.CONVERSATION_TURN,
        payload,
        requested_by=asked_by,
        max_queued=max_queued,
        data_dir=data_dir,
    )
    # The question's text stays out of the trail: it may name the patient.
    audit.record(
        db,
        "conversation.asked",
        study_uid=study_uid,
        actor=asked_by,
        conversation_id=conversation_id,
        request_id=request_id,
        anchor_id=anchor_id,
    )
    return request_id


def append_conversation(
    db: Database,
    conversation_id: int,
    *,
    appended_by: str = "",
    on_report: ReportHook | None = None,
    data_dir: Path | None = None,
) -> int:
    """The conversation's turns become a new report version superseding the one it started
    from; return the new report's id. The conversation is then ``appended``."""
    with db.session() as session:
        conversation = _conversation(session, conversation_id)
        _require_open(conversation)
        base = _appendable_report(session, conversation)
        turns = list(conversation.turns)
        if not turns:
            raise ConversationConflict("the conversation has no answered question to append")
        report = _appended_report(base, turns, conversation.id)
        session.add(report)
        session.flush()
        if on_report is not None:
            on_report(session, report)
        conversation.state = ConversationState.APPENDED
        conversation.appended_report_id = report.id
        session.add(
            AuditEvent(
                kind="report_appended",
                actor=appended_by,
                study_instance_uid=session.get_one(Study, base.study_id).study_instance_uid,
                detail={
                    "conversation_id": conversation.id,
                    "report_id": report.id,
                    "supersedes_report_id": base.id,
                    "user": appended_by,
                },
            )
        )
        report_id = report.id
    if data_dir is not None:
        ring(data_dir, DELIVERY_DOORBELL)
    return report_id


# --------------------------------------------------------------------------- helpers


def _conversation(session: Session, conversation_id: int) -> Conversation:
    conversation = session.get(Conversation, conversation_id)
    if conversation is None:
        raise ConversationNotFound(f"no conversation {conversation_id}")
    return conversation


def _require_open(conversation: Conversation) -> None:
    if conversation.state != ConversationState.OPEN:
        raise ConversationConflict(
            f"conversation {conversation.id} is {conversation.state}: start a new one to ask more"
        )


def _appendable_report(session: Session, conversation: Conversation) -> Report:
    if conversation.report_id is None:
        raise ConversationConflict("the study had no report when the conversation started")
    newest = latest_report(session, conversation.study_id)
    if newest is not None and newest.id != conversation.report_id:
        raise ConversationConflict(
            f"the study has a newer report ({newest.id}) than the one this conversation started "
            f"from ({conversation.report_id}); start a new conversation"
        )
    return session.get_one(Report, conversation.report_id)


def _appended_report(base: Report, turns: list[ConversationTurn], conversation_id: int) -> Report:
    content = appended_content(ReportContent.model_validate(base.content_json), turns)
    turn_models = [t.model_json for t in turns if t.model_json]
    is_test = base.is_test_model or any(m.get("is_test_model") for m in turn_models)
    return Report(
        job_id=None,
        study_id=base.study_id,
        study_version_id=base.study_version_id,
        created_at=utcnow(),
        language=base.language,
        parse_status=base.parse_status,
        urgency=content.urgency,
        question=base.question,
        raw_text=base.raw_text,
        content_json=content.model_dump(mode="json"),
        model_json=base.model_json,
        timings_json={
            "source_sop_instance_uids": base.timings_json.get("source_sop_instance_uids", []),
            "conversation_id": conversation_id,
            "turns": len(turns),
        },
        is_test_model=is_test,
        supersedes_report_id=base.id,
    )


def appended_content(base: ReportContent, turns: list[ConversationTurn]) -> ReportContent:
    """The base report plus the follow-up Q&A (also in the narrative, which every output
    shows) and the regions the answers pointed at as further findings."""
    follow_up = [
        FollowUp(
            question=turn.question,
            answer=turn.answer,
            anchor_id=turn.referenced_anchor_id,
            answered_by=turn.answered_by,
        )
        for turn in turns
    ]
    new_findings = [
        Finding.model_validate(f) for turn in turns for f in turn.findings if f.get("region")
    ]
    narrative = "\n\n".join(part for part in (base.narrative, follow_up_text(follow_up)) if part)
    return base.model_copy(
        update={
            "follow_up": [*base.follow_up, *follow_up],
            "findings": [*base.findings, *new_findings],
            "narrative": narrative,
        }
    )


def _view(session: Session, conversation: Conversation) -> ConversationView:
    study = session.get_one(Study, conversation.study_id)
    turns = [
        TurnView(
            turn_index=t.turn_index,
            question=t.question,
            answer=t.answer,
            answered_by=t.answered_by,
            referenced_anchor_id=t.referenced_anchor_id,
            anchors=[Anchor.model_validate(a) for a in t.anchors],
            findings=[Finding.model_validate(f) for f in t.findings],
            measurements=[Measurement.model_validate(m) for m in t.measurements],
            asked_by=t.asked_by,
            created_at=t.created_at,
            timings=t.timings,
        )
        for t in conversation.turns
    ]
    return ConversationView(
        id=conversation.id,
        study_instance_uid=study.study_instance_uid,
        report_id=conversation.report_id,
        state=conversation.state,
        created_by=conversation.created_by,
        created_at=conversation.created_at,
        appended_report_id=conversation.appended_report_id,
        anchors=current_anchors(session, conversation),
        turns=turns,
    )
