"""The model seam: one method, a real implementation and a scripted one.

    Engine.generate(requests) -> results, one per request, same order.

A request is one user turn (images, then the question; the question first when its prompt
template says ``question_first``), or a whole conversation: the earlier turns in ``history``
(user and model alternating, MedGemma's chat template has no system role), then the new user
turn. Images may sit in any user turn; the engine feeds them in order.

An engine may also offer the same work in two steps (``PreparingEngine``), so a caller can
build the next batch's inputs on the CPU while the device generates the current one:

    PreparingEngine.prepare(requests) -> PreparedBatch
    PreparingEngine.generate_prepared(batch) -> results  (== generate(requests))

An engine that decodes step by step in this process may call back between decode steps
(``SteppingEngine``), so the worker can answer a waiting question inside a running batch:

    SteppingEngine.set_step_hook(hook | None)   hook() may call generate (re-entrant)

Such an engine may also let a running batch take in prepared pieces of the next one, between
decode steps (``RowJoiningEngine``, inference/decode_joins.py):

    RowJoiningEngine.generate_joining(batch, feed) -> results of batch, then of each piece taken
    JoinFeed.take(rows, accept) -> a piece | None;  JoinFeed.closing(seconds)  (no more taken)

Implementations:
    inference.transformers_engine.TransformersEngine  real MedGemma / tiny demo model
    inference.openai_engine.OpenAIEngine               an OpenAI-compatible inference server
    inference.scripted_engine.ScriptedEngine           returns given texts (tests only)

Failures an engine reports (besides OutOfMemory), and what the worker does with them:
    EngineUnavailable        its backend cannot be reached: nothing ran; the jobs go back to
                             the queue with the attempt not counted, and the engine provider
                             says why in status until the backend answers again
    EngineRequestFailed      one request failed (server error, busy, timeout, bad answer): the
                             job is retried with backoff, at least the server's Retry-After
    EngineRequestRejected    the server refused the request itself: retrying cannot help
    BatchPartlyFailed        some requests of a batch failed: ``outcomes`` holds, per request,
                             its result or its error; the others' results are good
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from PIL import Image

from core.errors import InferenceError
from storage.report_schema import ModelIdentity


@dataclass(frozen=True)
class GenerationSettings:
    """Greedy decoding is the only mode the node uses (model card: deterministic answers)."""

    max_new_tokens: int = 1024


CHAT_ROLES = ("user", "model")


@dataclass(frozen=True)
class ChatTurn:
    """One earlier turn of a conversation: the user's images and text, or the model's text.

    ``question_first``: a user turn whose text came before its images (a report made with a
    ``question_first`` template, replayed as the model read it)."""

    role: str  # "user" | "model" (Gemma's name for the assistant)
    text: str
    images: list[Image.Image] = field(default_factory=list)
    question_first: bool = False


@dataclass
class GenerationRequest:
    """The new user turn (images first, then the question) after the turns in ``history``.

    ``question_first``: the new turn's question comes before its images (the template's
    ``question_first``, inference/prompts.py): a batch's rows then begin with the same tokens,
    which the CUDA fast path runs once (inference/shared_prefix.py). Earlier turns keep their
    own order (``ChatTurn.question_first``).
    """

    images: list[Image.Image]
    prompt: str
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    history: list[ChatTurn] = field(default_factory=list)
    question_first: bool = False

    def __post_init__(self) -> None:
        for position, turn in enumerate(self.history):
            expected = CHAT_ROLES[position % 2]
            if turn.role != expected:
                raise ValueError(
                    f"history turn {position} is {turn.role!r}; turns alternate user/model "
                    "starting with user (no system role)"
                )
            if turn.role == "model" and turn.images:
                raise ValueError("a model turn carries no images")
        if len(self.history) % 2:
            raise ValueError("history must end with a model turn before the new user turn")

    @property
    def turns(self) -> list[ChatTurn]:
        """Every turn in order, the new user turn last."""
        new = ChatTurn("user", self.prompt, list(self.images), self.question_first)
        return [*self.history, new]

    @property
    def all_images(self) -> list[Image.Image]:
        """The images of every turn, in the order the model reads them."""
        return [image for turn in self.turns for image in turn.images]


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float  # wall time of the whole batch this request was part of
    batch_size: int = 1
    # Who produced this answer, when the answer itself says more than ``Engine.identity`` (an
    # inference server names its model and fingerprint in each response); None: the engine's.
    identity: ModelIdentity | None = None
    prepare_seconds: float = 0.0  # the part of ``seconds`` its inputs took to build (prepare)


class OutOfMemory(InferenceError, RuntimeError):
    """The device ran out of memory for this batch; the worker halves the batch and retries."""


class EngineUnavailable(InferenceError):
    """The engine's backend (an inference server) cannot be reached or used as configured.

    Nothing ran: the work goes back to the queue untouched. ``str()`` says what was tried and
    what an operator can do; it is what status shows.
    """


class EngineRequestFailed(InferenceError):
    """One request failed where a later attempt may succeed (server error, server busy,
    timeout, an answer that is not a chat completion). ``retry_after_s``: the server's
    Retry-After, the least wait before the next attempt."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineRequestRejected(EngineRequestFailed):
    """The server refused the request itself (HTTP 4xx): sending it again cannot help."""


class BatchPartlyFailed(InferenceError):
    """Some requests of a batch failed; ``outcomes[i]`` is request i's result or its error."""

    def __init__(self, outcomes: list[GenerationResult | InferenceError]) -> None:
        failed = [o for o in outcomes if isinstance(o, InferenceError)]
        kinds = sorted({type(o).__name__ for o in failed})
        super().__init__(f"{len(failed)} of {len(outcomes)} requests failed ({', '.join(kinds)})")
        self.outcomes = outcomes


class Engine(Protocol):
    identity: ModelIdentity

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Run one batch. Raises OutOfMemory when the batch does not fit."""
        ...


@dataclass
class PreparedBatch:
    """A batch's model inputs, built ahead of generation by ``PreparingEngine.prepare``."""

    requests: list[GenerationRequest]
    inputs: Any  # what the engine built; only that engine's generate_prepared reads it
    seconds: float = 0.0  # time prepare took; part of every result's ``seconds``


@runtime_checkable
class SquareInputEngine(Engine, Protocol):
    """An engine whose processor resizes every image to one square side, bilinear: images
    may be shrunk to it ahead (inference/preprocess.py, ``side``), which gives the processor
    what it would have made of them itself."""

    def image_side(self) -> int | None:
        """That side; None when the processor does anything else (images then go as they are)."""
        ...


@runtime_checkable
class PreparingEngine(Engine, Protocol):
    """An engine whose input building can run apart from, and ahead of, generation.

    ``generate(requests)`` and ``generate_prepared(prepare(requests))`` give the same results.
    ``prepare`` may run in a second thread while ``generate`` or ``generate_prepared`` runs.
    """

    def prepare(self, requests: list[GenerationRequest]) -> PreparedBatch:
        """Build the inputs of one batch. Raises OutOfMemory when they do not fit."""
        ...

    def generate_prepared(self, batch: PreparedBatch) -> list[GenerationResult]:
        """Run a prepared batch. Raises OutOfMemory when the batch does not fit."""
        ...


class JoinError(InferenceError):
    """Prepared pieces that cannot be joined (the caller prepares the batch whole instead)."""


@runtime_checkable
class JoiningEngine(PreparingEngine, Protocol):
    """A ``PreparingEngine`` that can prepare a batch in pieces (inference/device_inputs.py).

    ``generate_prepared(join([prepare(a), prepare(b)]))`` gives what
    ``generate_prepared(prepare(a + b))`` gives: the same inputs, rows in that order.
    """

    def join(self, pieces: list[PreparedBatch]) -> PreparedBatch:
        """One batch of prepared pieces. Raises InferenceError when they cannot be joined."""
        ...


class JoinFeed(Protocol):
    """Prepared pieces of the batch being built, offered to the batch that runs (the inference
    worker's, inference/batch_pieces.py)."""

    def take(self, rows: int, accept: Callable[[PreparedBatch], bool]) -> PreparedBatch | None:
        """The next prepared piece, when it has at most ``rows`` requests and ``accept`` says
        the running batch can take it: from now on part of that batch. Otherwise None."""
        ...

    def closing(self, seconds: float) -> None:
        """The running batch takes no more pieces, and ends in about ``seconds``."""
        ...

    def coming(self) -> bool:
        """Studies are on their way to pieces (the running batch, not yet decoding, may
        wait for them: inference/decode_joins.py)."""
        ...


@runtime_checkable
class RowJoiningEngine(PreparingEngine, Protocol):
    """A ``PreparingEngine`` whose running batch takes in more rows between decode steps
    (inference/decode_joins.py)."""

    def generate_joining(self, batch: PreparedBatch, feed: JoinFeed) -> list[GenerationResult]:
        """``generate_prepared(batch)``, the pieces taken from ``feed`` meanwhile joining it:
        the results of ``batch.requests``, then of each piece's requests in the order taken."""
        ...


@runtime_checkable
class SteppingEngine(Engine, Protocol):
    """An engine that calls a hook between decode steps of a running batch.

    The hook runs in the generating thread every few steps; a ``generate`` it makes runs to
    the end before the batch goes on, without disturbing the batch's results, and does not
    call the hook itself. Engines without decode steps of their own (an inference server, the
    scripted double) are not SteppingEngines: their callers serve between batches.
    """

    def set_step_hook(self, hook: Callable[[], None] | None) -> None:
        """Call ``hook`` between decode steps from now on (None: stop calling)."""
        ...


def prompt_groups(requests: Sequence[GenerationRequest]) -> list[list[int]]:
    """The batch's requests grouped by image count (1-2, 3-4, 5-8, ... images), in order.

    One processor call pads every row to the longest prompt: a CT study of 85 slices
    (~22,300 tokens) among radiographs (~700) would make every radiograph as long as the CT.
    Each group runs as a batch of its own; one or two images (a radiograph, with its prior or
    a zoomed crop) stay together, as their padding costs less than a second decode loop.
    """
    groups: dict[int, list[int]] = {}
    for index, request in enumerate(requests):
        groups.setdefault(image_class(request), []).append(index)
    return list(groups.values())


def image_class(request: GenerationRequest) -> int:
    """The prompt group of ``request``: 0 for 1-2 images, 1 for 3-4, 2 for 5-8, ..."""
    images = max(1, len(request.all_images))
    return max(0, (images - 1).bit_length() - 1)
