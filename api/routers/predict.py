"""Predict: a question about an uploaded image, answered by the inference worker; and the
answers to questions that were not ready in time (api/answers.py says how waiting works).

``POST /api/predict`` takes either form:

    multipart/form-data   file (PNG, JPEG or DICOM Part 10), question, max_new_tokens, language
    application/json      {"image": "data:image/png;base64,...", "question": "...",
                           "max_new_tokens": 384, "language": "zh"}

The file's type is read from its bytes (storage.interactive.upload_kind: PNG and JPEG
signatures, "DICM" after the PS3.10 preamble), never from a file name or a declared media type.
Errors: a body over ``[api] max_upload_mb`` 413 (the whole request body, so a data: URL's base64
counts); not PNG/JPEG/DICOM, or a body neither multipart nor JSON, 415; a question over
``[api] max_question_chars``, a malformed data: URL or field 422; then api/answers.py.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, HTTPException, Path, Query, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field, ValidationError
from starlette.datastructures import UploadFile

from api.answers import (
    PREDICT_ERRORS,
    answer_responses,
    outcome_response,
    queue_full_response,
)
from api.deps import ApiContext, Context, Radiologist, Viewer, audit_study
from storage.interactive import PredictResult, QueueFull, get_outcome, submit_predict, upload_kind
from storage.models import InteractiveRequest, UserRole

router = APIRouter(prefix="/api", tags=["questions"])

DATA_URL = re.compile(r"^data:(?P<media>[^;,]*)(?P<params>(;[^;,]*)*);base64,(?P<data>.*)$", re.S)
MAX_FORM_FIELDS = 8


class PredictFields(BaseModel):
    """What comes with the image, in either form."""

    question: str = Field(
        default="",
        description="Empty: the node's template question for the image's modality",
    )
    max_new_tokens: int | None = Field(
        default=None,
        ge=1,
        description="Answer length; default [interactive] max_new_tokens, capped by "
        "[model] max_new_tokens",
    )
    language: Literal["en", "zh"] | None = Field(
        default=None,
        description="Language of the answer; default: the question's (Chinese characters: "
        "zh), else [model] language",
    )


class PredictJson(PredictFields):
    image: str = Field(description="A data: URL, base64: data:image/png;base64,...")


PREDICT_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file"],
                "properties": {
                    "file": {
                        "type": "string",
                        "format": "binary",
                        "description": "PNG, JPEG or DICOM (Part 10) file",
                    },
                    "question": {"type": "string"},
                    "max_new_tokens": {"type": "integer", "minimum": 1},
                    "language": {"type": "string", "enum": ["en", "zh"]},
                },
            }
        },
        "application/json": {"schema": PredictJson.model_json_schema()},
    },
}


def _invalid(field: str, message: str, value: object = None) -> RequestValidationError:
    """The same shape as FastAPI's own 422 answers: one error naming the field."""
    error = {"type": "value_error", "loc": ("body", field), "msg": message, "input": value}
    return RequestValidationError([error])


def _unsupported(message: str) -> HTTPException:
    return HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, message)


async def _multipart(request: Request) -> tuple[bytes, PredictFields]:
    form = await request.form(max_files=1, max_fields=MAX_FORM_FIELDS)
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise _invalid("file", "a file field with the image is required")
    fields = {k: v for k, v in form.items() if k != "file" and isinstance(v, str)}
    try:
        parsed = PredictFields.model_validate(fields)
    except ValidationError as exc:
        raise RequestValidationError(_body_errors(exc)) from exc
    return await upload.read(), parsed


async def _json(request: Request) -> tuple[bytes, PredictFields]:
    try:
        parsed = PredictJson.model_validate(json.loads(await request.body()))
    except (ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, ValidationError):
            raise RequestValidationError(_body_errors(exc)) from exc
        raise _invalid("", "the body is not valid JSON") from exc
    match = DATA_URL.match(parsed.image)
    if match is None:
        raise _invalid("image", "not a base64 data: URL (data:image/png;base64,...)")
    try:
        data = base64.b64decode(match["data"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _invalid("image", "the data: URL's base64 is malformed") from exc
    return data, parsed


def _body_errors(exc: ValidationError) -> list[dict[str, Any]]:
    return [
        {"type": e["type"], "loc": ("body", *e["loc"]), "msg": e["msg"], "input": e.get("input")}
        for e in exc.errors(include_url=False)
    ]


async def _read_predict(request: Request) -> tuple[bytes, PredictFields]:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media == "multipart/form-data":
        return await _multipart(request)
    if media == "application/json":
        return await _json(request)
    raise _unsupported(
        f"send multipart/form-data (a file field) or application/json (a data: URL), "
        f"not {media or 'no Content-Type'}"
    )


def check_question(context: ApiContext, question: str) -> None:
    limit = context.settings.api.max_question_chars
    if len(question) > limit:
        raise _invalid(
            "question",
            f"the question has {len(question)} characters; at most {limit} "
            "([api] max_question_chars)",
        )


def wait_seconds(context: ApiContext, wait: float | None) -> float:
    """The wait asked for, within [0, interactive.wait_timeout_s] (its default)."""
    longest = context.settings.interactive.wait_timeout_s
    return longest if wait is None else min(max(wait, 0.0), longest)


Wait = Annotated[
    float | None,
    Query(
        ge=0,
        description="Seconds to wait for the answer before a 202; default and maximum "
        "[interactive] wait_timeout_s (120)",
    ),
]


@router.post(
    "/predict",
    response_model=None,
    summary="Ask about an uploaded image (PNG, JPEG or DICOM): answer, findings, boxes",
    openapi_extra={"requestBody": PREDICT_BODY},
    responses=answer_responses(
        PredictResult,
        {
            413: "The request body is over [api] max_upload_mb",
            415: "Not a PNG, JPEG or DICOM file, or a body neither multipart nor JSON",
            422: "A question over [api] max_question_chars, a malformed data: URL or field",
        },
        PREDICT_ERRORS,
    ),
)
async def predict(
    request: Request, context: Context, user: Radiologist, wait: Wait = None
) -> Response:
    """The image goes to the inference worker's priority lane with the same preprocessing as
    received studies (DICOM windowing, padding to a square); boxes come back in pixels of the
    uploaded image ([x0, y0, x1, y1], (0, 0) top-left). Waits for the answer up to `wait`
    seconds, else 202 with the location of the answer.

    HTTP status of each worker error_code: invalid_input 422, model_unavailable 503 (the
    message says how to provide weights), worker_stopped 503, internal 500. Too many questions
    queued ([api] max_queued_questions): 429 + Retry-After.
    """
    data, fields = await _read_predict(request)
    check_question(context, fields.question)
    kind = upload_kind(data)
    if kind is None:
        raise _unsupported("the upload is not a PNG, JPEG or DICOM (Part 10) file")
    settings = context.settings
    try:
        request_id = await anyio.to_thread.run_sync(
            lambda: submit_predict(
                context.db,
                context.data_dir,
                data,
                fields.question,
                max_new_tokens=fields.max_new_tokens or settings.interactive.max_new_tokens,
                language=fields.language,
                requested_by=user.name,
                max_queued=settings.api.max_queued_questions,
            )
        )
    except QueueFull as exc:
        return queue_full_response(exc)
    audit_study(request, None, request_id=request_id, upload_kind=kind, upload_bytes=len(data))
    outcome = await context.answers.wait(request_id, wait_seconds(context, wait))
    return outcome_response(outcome)


@router.get(
    "/answers/{request_id}",
    response_model=None,
    summary="The answer to a question that was not ready in time (202 while it is not)",
    responses=answer_responses(
        PredictResult, {404: "No such request, or another user's (admins see all)"}
    ),
)
async def answer(
    request: Request,
    context: Context,
    user: Viewer,
    request_id: Annotated[int, Path(ge=1)],
    wait: Annotated[
        float | None,
        Query(
            ge=0,
            description="Seconds to wait for the answer (default 0, at most "
            "[interactive] wait_timeout_s)",
        ),
    ] = None,
) -> Response:
    """The stored answer of a predict request (PredictResult) or a conversation turn
    (TurnResult, as POST /api/conversations/{id}/messages answers): 200, 202 while queued or
    running (wait up to `wait` seconds), or the failure's status (as for predict). Only the
    user who asked, or an admin, may read it."""
    owner = await anyio.to_thread.run_sync(_requested_by, context, request_id)
    if owner is None or (owner != user.name and user.role != UserRole.ADMIN):
        return JSONResponse(
            {"detail": f"no request {request_id} of yours"}, status.HTTP_404_NOT_FOUND
        )
    audit_study(request, None, request_id=request_id)
    if wait is not None and wait > 0:
        return outcome_response(await context.answers.wait(request_id, wait_seconds(context, wait)))
    return outcome_response(await anyio.to_thread.run_sync(get_outcome, context.db, request_id))


def _requested_by(context: ApiContext, request_id: int) -> str | None:
    with context.db.session() as session:
        row = session.get(InteractiveRequest, request_id)
        return None if row is None else row.requested_by
