"""Who answers `medgemma-node predict`: the configured engine here, or a running node's API.

    LocalAnswerer(engine, prompts, ...)   inference/predict.py in this process, a batch of
                                          pairs per engine call (``[model] max_batch``)
    ApiAnswerer(url, token, ...)          POST /api/predict (multipart: file, question,
                                          max_new_tokens, language), a batch of requests at
                                          once so the node's priority lane runs them together

Both give one record per pair, in order: the node's PredictResult (answer, findings, boxes in
pixels of the file, image, parse_status, model, disclaimer, timings) or ``error``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from inference.engine import (
    BatchPartlyFailed,
    Engine,
    GenerationRequest,
    GenerationResult,
    OutOfMemory,
)
from inference.predict import (
    PredictSource,
    UnusableImage,
    answer_language,
    dicom_source,
    picture_source,
    predict_request,
    predict_result,
    template_language,
)
from inference.prompts import PromptLibrary
from medgemma_node.predict_run import (
    Pair,
    PredictRunError,
    Record,
    answer_record,
    elapsed_s,
    error_record,
)
from storage.interactive import upload_kind

NOT_AN_IMAGE = "not a PNG, JPEG or DICOM (Part 10) file"
Outcome = GenerationResult | str  # the engine's answer, or why there is none


@dataclass
class _Prepared:
    index: int
    pair: Pair
    source: PredictSource
    request: GenerationRequest
    question: str  # as the model was asked it
    preprocess_s: float


class LocalAnswerer:
    """The configured engine in this process, on the node's own predict path."""

    def __init__(
        self,
        engine: Engine,
        prompts: PromptLibrary,
        *,
        default_language: str,
        asked_language: str | None,
        max_new_tokens: int,
        batch_size: int,
    ) -> None:
        self.engine = engine
        self.prompts = prompts
        self.default_language = default_language
        self.asked_language = asked_language
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        # Each file is read once for all its questions; only the last file of a batch is kept
        # (its questions may go on in the next batch).
        self._sources: dict[Path, tuple[PredictSource | str, float]] = {}

    def answer(self, pairs: Sequence[Pair]) -> list[Record]:
        records: list[Record | None] = [None] * len(pairs)
        prepared: list[_Prepared] = []
        for index, pair in enumerate(pairs):
            source, preprocess_s = self._source(pair.file)
            if isinstance(source, str):
                records[index] = error_record(pair, source)
                continue
            request, question = predict_request(source, pair.question, self.max_new_tokens)
            prepared.append(_Prepared(index, pair, source, request, question, preprocess_s))
        outcomes = self._generate([item.request for item in prepared])
        for item, outcome in zip(prepared, outcomes, strict=True):
            records[item.index] = self._record(item, outcome)
        if pairs:
            last = pairs[-1].file
            self._sources = {last: self._sources[last]} if last in self._sources else {}
        return [record for record in records if record is not None]

    def _source(self, path: Path) -> tuple[PredictSource | str, float]:
        if path not in self._sources:
            started = time.perf_counter()
            source = self._read(path)
            self._sources[path] = (source, elapsed_s(started))
        return self._sources[path]

    def _read(self, path: Path) -> PredictSource | str:
        """The file as the model will see it, or why it cannot be used."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            return f"cannot read the file: {exc.strerror or exc}"
        kind = upload_kind(data)
        template = template_language(self.asked_language, self.default_language)
        try:
            if kind == "dicom":
                return dicom_source(path, self.prompts, template)
            if kind is not None:
                return picture_source(data, kind, self.prompts, template)
        except UnusableImage as exc:
            return str(exc)
        except Exception as exc:  # a malformed file must not stop the run
            return f"the file cannot be used ({type(exc).__name__}: {exc})"
        return NOT_AN_IMAGE

    def _generate(self, requests: list[GenerationRequest]) -> list[Outcome]:
        """One engine batch; out of memory: halves; a failure fails its requests only."""
        if not requests:
            return []
        try:
            return list(self.engine.generate(requests))
        except BatchPartlyFailed as exc:
            return [o if isinstance(o, GenerationResult) else str(o) for o in exc.outcomes]
        except OutOfMemory:
            if len(requests) == 1:
                return ["the device ran out of memory"]
            half = len(requests) // 2
            return self._generate(requests[:half]) + self._generate(requests[half:])
        except Exception as exc:  # the engine's own errors and any other: recorded, go on
            return [f"the model failed ({type(exc).__name__}: {exc})"] * len(requests)

    def _record(self, item: _Prepared, outcome: Outcome) -> Record:
        if isinstance(outcome, str):
            return error_record(item.pair, outcome)
        timings: dict[str, float | int] = {
            "preprocess_s": item.preprocess_s,
            "generate_s": round(outcome.seconds, 4),
            "batch_size": outcome.batch_size,
            "prompt_tokens": outcome.prompt_tokens,
            "new_tokens": outcome.new_tokens,
        }
        language = answer_language(self.asked_language, item.question, self.default_language)
        identity = outcome.identity or self.engine.identity
        result = predict_result(outcome.text, item.source, language, identity, timings)
        return answer_record(item.pair, result.model_dump(mode="json"))


class ApiAnswerer:
    """A running node's ``POST /api/predict`` (its priority lane answers), with a token of
    the radiologist role."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        asked_language: str | None,
        max_new_tokens: int | None,
        batch_size: int,
        timeout_s: float = 300.0,
        busy_limit_s: float = 900.0,
    ) -> None:
        base = url.rstrip("/").removesuffix("/api")
        self.client = httpx.Client(
            base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=timeout_s
        )
        self.asked_language = asked_language
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        # How long one pair may wait while the node says 429 (queue full) or 202 (not ready).
        self.busy_limit_s = busy_limit_s

    def close(self) -> None:
        self.client.close()

    def answer(self, pairs: Sequence[Pair]) -> list[Record]:
        pool = ThreadPoolExecutor(max_workers=self.batch_size)
        try:
            return list(pool.map(self._one, pairs))
        finally:  # Ctrl-C: do not wait for the requests still out
            pool.shutdown(wait=False, cancel_futures=True)

    def _fields(self, pair: Pair) -> dict[str, str]:
        fields = {"question": pair.question}
        if self.max_new_tokens is not None:
            fields["max_new_tokens"] = str(self.max_new_tokens)
        if self.asked_language is not None:
            fields["language"] = self.asked_language
        return fields

    def _one(self, pair: Pair) -> Record:
        try:
            data = pair.file.read_bytes()
        except OSError as exc:
            return error_record(pair, f"cannot read the file: {exc.strerror or exc}")
        give_up_at = time.monotonic() + self.busy_limit_s
        while True:
            try:
                response = self.client.post(
                    "/api/predict", files={"file": (pair.file.name, data)}, data=self._fields(pair)
                )
                if response.status_code == httpx.codes.ACCEPTED:
                    response = self._wait_for_answer(response, give_up_at)
            except httpx.ConnectError as exc:
                message = f"cannot reach the node at {self.client.base_url}: {exc}"
                raise PredictRunError(message) from exc
            except httpx.HTTPError as exc:
                return error_record(pair, f"the request failed ({type(exc).__name__}: {exc})")
            if response.status_code != httpx.codes.TOO_MANY_REQUESTS:
                return self._record(pair, response)
            if time.monotonic() >= give_up_at:
                return error_record(pair, "the node stayed busy (429): too many questions queued")
            time.sleep(_retry_after_s(response))

    def _wait_for_answer(self, accepted: httpx.Response, give_up_at: float) -> httpx.Response:
        """202: the answer was not ready in time; ask for it at its Location until it is."""
        location = accepted.headers.get("location", "")
        response = accepted
        while response.status_code == httpx.codes.ACCEPTED and location:
            if time.monotonic() >= give_up_at:
                break
            response = self.client.get(location, params={"wait": 60})
        return response

    def _record(self, pair: Pair, response: httpx.Response) -> Record:
        status = response.status_code
        if status == httpx.codes.OK:
            return answer_record(pair, response.json())
        if status == httpx.codes.ACCEPTED:
            return error_record(pair, "no answer in time (202); the node may still answer it")
        detail = _detail(response)
        if status in (httpx.codes.UNAUTHORIZED, httpx.codes.FORBIDDEN):
            raise PredictRunError(f"the node refused the token ({status}): {detail}")
        if status in (httpx.codes.NOT_FOUND, httpx.codes.METHOD_NOT_ALLOWED):
            raise PredictRunError(
                f"{self.client.base_url} does not answer POST /api/predict ({status}): is it a "
                "medgemma-node API?"
            )
        return error_record(pair, f"the node answered {status}: {detail}")


def _detail(response: httpx.Response) -> str:
    try:
        body: Any = response.json()
    except ValueError:
        return response.text[:500]
    detail = body.get("detail", body) if isinstance(body, dict) else body
    return detail if isinstance(detail, str) else str(detail)[:500]


def _retry_after_s(response: httpx.Response, default_s: float = 2.0) -> float:
    """The node's Retry-After in seconds (RFC 9110 10.2.3; the node sends delay-seconds)."""
    try:
        return min(max(float(response.headers.get("retry-after", default_s)), 0.1), 60.0)
    except ValueError:
        return default_s
