"""Waiting for the inference worker's answers, and what each outcome is in HTTP.

Questions (``POST /api/predict``, ``POST /api/conversations/{id}/messages``) are queued for the
worker's priority lane (storage/interactive.py); the model never runs in the API process. The
endpoint then waits for the answer, at most ``?wait=`` seconds (default and maximum
``[interactive] wait_timeout_s``):

    answered in time      200 with the answer
    not yet               202 {"request_id", "status", "location"}, ``Location:
                          /api/answers/{request_id}`` and ``Retry-After``; the answer is stored
                          when it comes: GET that location (again with ``?wait=``)
    failed                the status of its ErrorCode (ERROR_STATUS), body {"detail",
                          "error_code", "request_id"}
    too many queued       429 with ``Retry-After`` (storage.interactive.QueueFull)

A waiting request holds a thread of its own pool (``max_queued_questions`` x 2 of them), never
one of the pool that serves the other endpoints; when that pool is full, the answer is 202 at
once. Waiters wake on the API doorbell the worker rings (storage.doorbell.SharedDoorbell) and
otherwise re-read the row every ``[interactive] poll_interval_s``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Any

import anyio
from fastapi import status
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from storage.db import Database
from storage.doorbell import API_DOORBELL, SharedDoorbell
from storage.interactive import ErrorCode, QueueFull, RequestOutcome, get_outcome, wait_for_result
from storage.models import JobStatus

# One HTTP status per ErrorCode (storage/interactive.py): the same map for every endpoint.
ERROR_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_INPUT: status.HTTP_422_UNPROCESSABLE_CONTENT,
    ErrorCode.NOT_FOUND: status.HTTP_404_NOT_FOUND,
    ErrorCode.CONFLICT: status.HTTP_409_CONFLICT,
    ErrorCode.MODEL_UNAVAILABLE: status.HTTP_503_SERVICE_UNAVAILABLE,
    ErrorCode.WORKER_STOPPED: status.HTTP_503_SERVICE_UNAVAILABLE,
    ErrorCode.INTERNAL: status.HTTP_500_INTERNAL_SERVER_ERROR,
}
ERROR_MEANING: dict[ErrorCode, str] = {
    ErrorCode.INVALID_INPUT: "the upload or question cannot be answered as asked "
    "(unreadable image, unknown anchor)",
    ErrorCode.NOT_FOUND: "the conversation is gone",
    ErrorCode.CONFLICT: "the conversation was appended or closed meanwhile",
    ErrorCode.MODEL_UNAVAILABLE: "no model can answer (no weights: the message says how to "
    "provide them, as `status` does; an inference server is down)",
    ErrorCode.WORKER_STOPPED: "the inference worker stopped while answering; ask again",
    ErrorCode.INTERNAL: "an unexpected error (see the node log)",
}
PENDING_RETRY_AFTER_S = 2
WAITERS_PER_QUEUED = 2


class PendingAnswer(BaseModel):
    """Not answered yet: GET ``location`` later (the answer is kept)."""

    request_id: int
    status: str = Field(description="queued | running")
    location: str = Field(description="GET it for the answer: /api/answers/{request_id}")
    detail: str


class FailedAnswer(BaseModel):
    detail: str = Field(description="Why, for the user (no patient data)")
    error_code: ErrorCode
    request_id: int


def answer_location(request_id: int) -> str:
    return f"/api/answers/{request_id}"


def error_status(code: str | None) -> int:
    try:
        return ERROR_STATUS[ErrorCode(code or "")]
    except ValueError:
        return status.HTTP_500_INTERNAL_SERVER_ERROR


def outcome_response(outcome: RequestOutcome) -> JSONResponse:
    """200 with the stored answer, 202 while waiting, or the failure's status."""
    if outcome.status == JobStatus.DONE:
        return JSONResponse(outcome.result)
    if outcome.status == JobStatus.FAILED:
        code = outcome.error_code if outcome.error_code in ERROR_STATUS else ErrorCode.INTERNAL
        body = FailedAnswer(
            detail=outcome.error or "the request failed",
            error_code=ErrorCode(code),
            request_id=outcome.request_id,
        )
        return JSONResponse(body.model_dump(mode="json"), status_code=error_status(code))
    location = answer_location(outcome.request_id)
    pending = PendingAnswer(
        request_id=outcome.request_id,
        status=outcome.status,
        location=location,
        detail=f"not answered yet; GET {location} (?wait=seconds to wait for it)",
    )
    return JSONResponse(
        pending.model_dump(),
        status_code=status.HTTP_202_ACCEPTED,
        headers={"Location": location, "Retry-After": str(PENDING_RETRY_AFTER_S)},
    )


def queue_full_response(exc: QueueFull) -> JSONResponse:
    return JSONResponse(
        {"detail": str(exc)},
        status_code=status.HTTP_429_TOO_MANY_REQUESTS,
        headers={"Retry-After": str(exc.retry_after_s)},
    )


# A predict request names no conversation: it cannot fail as gone or appended meanwhile.
PREDICT_ERRORS = tuple(c for c in ErrorCode if c not in (ErrorCode.NOT_FOUND, ErrorCode.CONFLICT))


def answer_responses(
    answer: type[BaseModel], extra: dict[int, str], codes: Iterable[ErrorCode] = tuple(ErrorCode)
) -> dict[int | str, Any]:
    """The OpenAPI ``responses`` of an endpoint that answers through the worker; ``extra``:
    the endpoint's own error statuses and what they mean; ``codes``: the worker failures it
    can answer with."""
    responses: dict[int | str, Any] = {
        200: {"model": answer, "description": "The answer"},
        202: {
            "model": PendingAnswer,
            "description": "Not answered within `wait` seconds: `Location` and `Retry-After` "
            "say where and when to look (GET /api/answers/{request_id})",
        },
        429: {"description": "Too many questions are queued; `Retry-After` says when to ask"},
    }
    for code in codes:
        meaning = f"error_code `{code.value}`: {ERROR_MEANING[code]}"
        known = responses.get(ERROR_STATUS[code])
        described = f"{known['description']}; or {meaning}" if known else meaning
        responses[ERROR_STATUS[code]] = {"model": FailedAnswer, "description": described}
    for code_status, description in extra.items():
        known = responses.get(code_status)
        described = f"{description}; or {known['description']}" if known else description
        responses[code_status] = {**(known or {}), "description": described}
    return responses


class AnswerWaiter:
    """Waits for answers without taking threads from the pool of the other endpoints."""

    def __init__(self, db: Database, data_dir: Path, max_waiters: int, poll_interval_s: float):
        self.db = db
        self.data_dir = data_dir
        self.max_waiters = max_waiters
        self.poll_interval_s = poll_interval_s
        self._doorbell: SharedDoorbell | None = None
        self._limiter: anyio.CapacityLimiter | None = None
        self._lock = threading.Lock()

    def _bell(self) -> SharedDoorbell:
        with self._lock:
            if self._doorbell is None:
                self._doorbell = SharedDoorbell(self.data_dir, API_DOORBELL)
                self._doorbell.start()
            return self._doorbell

    async def wait(self, request_id: int, timeout_s: float) -> RequestOutcome:
        """The outcome once answered, or as it stands after ``timeout_s`` (at once when every
        waiting thread is taken)."""
        if self._limiter is None:  # made in the event loop (anyio needs one)
            self._limiter = anyio.CapacityLimiter(self.max_waiters)
        if timeout_s <= 0 or self._limiter.available_tokens < 1:
            return await anyio.to_thread.run_sync(get_outcome, self.db, request_id)
        waiting = partial(
            wait_for_result,
            self.db,
            request_id,
            timeout_s,
            self._bell(),
            poll_interval_s=self.poll_interval_s,
        )
        return await anyio.to_thread.run_sync(waiting, limiter=self._limiter)

    def stop(self) -> None:
        with self._lock:
            if self._doorbell is not None:
                self._doorbell.stop()
                self._doorbell = None
