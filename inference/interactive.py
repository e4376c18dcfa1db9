"""The inference worker's priority lane: predict requests and conversation turns.

The worker (inference/worker.py) calls ``InteractiveLane.serve(engine)`` before it runs each
batch of studies, and when the API rings its doorbell while it is idle; so a question waits
at most for the batch that is generating when it arrives, never for the study queue. Each
round claims up to ``interactive.max_batch`` requests (storage/interactive.py, with a lease)
and runs them through the same engine as studies, as one batch; at most
``interactive.max_rounds_between_batches`` rounds run before the next study batch, so a
steady stream of questions cannot starve the studies.

    predict            the upload (DICOM: the same preprocessing as received studies;
                       PNG/JPEG as RGB, padded to a square) + the question (default: the
                       template of its modality) -> answer, findings, boxes in pixels of the
                       upload (inference/interactive_predict.py)
    conversation_turn  the conversation as chat turns, anchors, a crop for a question about
                       one anchor; distances and sizes measured by the node without the model
                       (inference/interactive_turns.py, inference/conversation.py)

Without a model (no weights) every waiting request fails at once with the message ``status``
shows (how to provide weights). A request that cannot be answered as asked (unreadable
upload, unknown anchor, conversation already appended) fails with ``invalid_input`` or
``conflict``; one failure never affects the other requests of the round.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from config.settings import NodeSettings
from core.errors import InferenceError
from inference.engine import (
    BatchPartlyFailed,
    Engine,
    EngineRequestFailed,
    EngineRequestRejected,
    EngineUnavailable,
    GenerationResult,
    OutOfMemory,
)
from inference.interactive_items import LaneItem, PredictPlan, RequestRefused
from inference.interactive_predict import PredictAnswers
from inference.interactive_turns import TurnAnswers
from inference.prompts import PromptLibrary
from storage.db import Database
from storage.doorbell import API_DOORBELL, ring
from storage.interactive import (
    ClaimedRequest,
    ErrorCode,
    claim_next,
    fail,
    fail_abandoned,
    has_queued,
    release,
    remove_upload,
)
from storage.models import InteractiveKind, InteractiveRequest, utcnow
from storage.report_schema import ModelIdentity

log = logging.getLogger(__name__)

ABANDONED_CHECK_S = 30.0


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
        self._next_abandoned_check = 0.0
        language = self.model_settings.language
        self._predict = PredictAnswers(db, self.data_dir, prompts, language, self._timings)
        self._turns = TurnAnswers(db, self.data_dir, language, self._timings)

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

    def serve(self, engine: Engine) -> int:
        """Answer waiting requests, in rounds of up to max_batch; return how many finished."""
        self._check_abandoned()
        finished = 0
        for _ in range(self.settings.max_rounds_between_batches):
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
        max_new_tokens = self._max_new_tokens(request.payload)
        if request.kind == InteractiveKind.PREDICT:
            return self._predict.prepare(request, max_new_tokens)
        if request.kind == InteractiveKind.CONVERSATION_TURN:
            return self._turns.prepare(request, max_new_tokens)
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
                self._predict.finish(item, item.plan, result, identity)
            else:
                self._turns.finish(item, item.plan, result, identity)
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


def _engine_error_code(error: InferenceError) -> ErrorCode:
    """An inference server's refusal of the request itself is the request's problem (its
    question or images); its absence, overload or failure means no model can answer now."""
    if isinstance(error, EngineRequestRejected):
        return ErrorCode.INVALID_INPUT
    if isinstance(error, EngineUnavailable | EngineRequestFailed):
        return ErrorCode.MODEL_UNAVAILABLE
    return ErrorCode.INTERNAL
