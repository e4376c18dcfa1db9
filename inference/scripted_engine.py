"""ScriptedEngine: a test double of the Engine seam. It runs no model.

It answers each request with the next scripted text, or with whatever a callable returns for
the request, so content tests (parsing, SR/GSPS/HL7 building, the worker) get the answers they
need without weights or a GPU. Its identity says it is a test model unless told otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from inference.engine import GenerationRequest, GenerationResult, OutOfMemory
from storage.report_schema import ModelIdentity

SCRIPTED_IDENTITY = ModelIdentity(
    model_id="medgemma-node/scripted-engine",
    revision="scripted",
    dtype="none",
    device="cpu",
    is_test_model=True,
)

Responder = Callable[[GenerationRequest], str]


@dataclass
class ScriptedEngine:
    """Test double: returns scripted texts in order, or ``responder(request)``.

    ``oom_above``: batches larger than this raise OutOfMemory, to exercise the caller's
    batch-splitting. ``calls`` records every batch it was given.
    """

    texts: Iterable[str] = ()
    responder: Responder | None = None
    identity: ModelIdentity = field(default_factory=lambda: SCRIPTED_IDENTITY.model_copy())
    oom_above: int | None = None
    seconds_per_batch: float = 0.0
    calls: list[list[GenerationRequest]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._queue = list(self.texts)

    def _answer(self, request: GenerationRequest) -> str:
        if self.responder is not None:
            return self.responder(request)
        if not self._queue:
            raise RuntimeError("ScriptedEngine: no scripted text left for this request")
        return self._queue.pop(0)

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        self.calls.append(list(requests))
        if self.oom_above is not None and len(requests) > self.oom_above:
            raise OutOfMemory(f"scripted: batch of {len(requests)} > {self.oom_above}")
        results = []
        for request in requests:
            text = self._answer(request)
            results.append(
                GenerationResult(
                    text=text,
                    prompt_tokens=sum(len(turn.text.split()) for turn in request.turns)
                    + 256 * len(request.all_images),
                    new_tokens=min(len(text.split()), request.settings.max_new_tokens),
                    seconds=self.seconds_per_batch,
                    batch_size=len(requests),
                )
            )
        return results
