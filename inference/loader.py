"""Which engine the worker runs, and what status says about it.

engine = "transformers"  MedGemma from model_path or the local HF cache (never downloaded);
                         the demo model when none is found and demo_model_if_missing is on;
                         otherwise None: jobs wait, and status/log say how to add weights.
engine = "scripted"      answers from a JSON file (a test double, marked as a test model).
engine = "openai"        an OpenAI-compatible inference server (inference/openai_engine.py):
                         loaded once it answers GET /models; while it cannot be reached (or
                         refuses the key), None: jobs wait, status/log say why, and it is
                         asked again every model.openai.check_interval_s. A server lost while
                         running (a request found it unreachable) is handled the same way.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging as hf_logging

from config.settings import NodeSettings
from inference.demo_model import write_demo_model
from inference.engine import Engine, EngineUnavailable, GenerationRequest
from inference.openai_engine import OpenAIEngine
from inference.prompts import PromptLibrary
from inference.scripted_engine import SCRIPTED_IDENTITY, ScriptedEngine
from inference.transformers_engine import ModelLoadError, TransformersEngine
from inference.weights import locate_weights, missing_weights_message

log = logging.getLogger(__name__)

DEMO_MODEL_DIR = "demo-model"
FAST_PATH_MIN_LENGTH = 2048  # KV columns: prompt (~256 image + text tokens) + new tokens


class EngineProvider:
    """Loads the engine once; while weights are missing or the inference server is unreachable,
    looks again every check interval. ``state`` is what status shows about the model."""

    def __init__(self, settings: NodeSettings) -> None:
        self.settings = settings
        self.engine: Engine | None = None
        self.state: dict[str, Any] = {"status": "not loaded"}
        self._next_check = 0.0
        self._lock = threading.Lock()
        self._server: OpenAIEngine | None = None  # kept while unreachable, to connect again

    def __call__(self) -> Engine | None:
        with self._lock:
            if self._server_lost():
                self.engine = None
            if self.engine is None and time.monotonic() >= self._next_check:
                self._next_check = time.monotonic() + self._check_interval()
                self.engine = self._load()
            return self.engine

    def _check_interval(self) -> float:
        model = self.settings.model
        return (
            model.openai.check_interval_s
            if model.engine == "openai"
            else model.weights_check_interval_s
        )

    def _server_lost(self) -> bool:
        """A request found the inference server unreachable: say so, and try again later."""
        if self.engine is None or self.engine is not self._server:
            return False
        reason = self._server.unavailable_reason
        if reason is None:
            return False
        self.state = {"status": "server unavailable", "message": reason}
        self._next_check = time.monotonic() + self._check_interval()
        return True

    def _load(self) -> Engine | None:
        model = self.settings.model
        if model.engine == "openai":
            return self._openai()
        try:
            engine = (
                scripted_engine(model.scripted_responses_file)
                if model.engine == "scripted"
                else self._transformers()
            )
        except ModelLoadError as exc:
            self.state = {"status": "error", "message": str(exc)}
            log.error("model not loaded: %s", exc)
            return None
        if engine is None:
            message = missing_weights_message(model)
            self.state = {"status": "missing weights", "message": message}
            log.warning("%s", message)
            return None
        self._loaded(engine)
        return engine

    def _openai(self) -> Engine | None:
        if self._server is None:
            self._server = OpenAIEngine(self.settings.model)
        try:
            self._server.connect()
        except EngineUnavailable as exc:
            self.state = {"status": "server unavailable", "message": str(exc)}
            log.warning("model not available: %s", exc)
            return None
        self._loaded(self._server)
        return self._server

    def _loaded(self, engine: Engine) -> None:
        self.state = {"status": "loaded", "identity": engine.identity.model_dump(mode="json")}
        if engine.identity.is_test_model:
            log.warning(
                "TEST MODEL loaded (%s): its outputs are NOT FOR CLINICAL USE and say so",
                engine.identity.model_id,
            )
        else:
            log.info("model loaded: %s on %s", engine.identity.model_id, engine.identity.device)

    def _transformers(self) -> Engine | None:
        # Progress bars on stderr would interleave with the node's log lines.
        hf_logging.disable_progress_bar()
        model = self.settings.model
        weights = locate_weights(model)
        if weights is None and model.demo_model_if_missing:
            weights = self.settings.storage.data_dir / DEMO_MODEL_DIR
            if not (weights / "config.json").exists():
                write_demo_model(weights)
            log.warning("no MedGemma weights found: using the demo TEST model at %s", weights)
        if weights is None:
            return None
        engine = TransformersEngine(model, weights_dir=weights)
        attach_fast_path(engine, self.settings)
        return engine


def attach_fast_path(engine: TransformersEngine, settings: NodeSettings) -> None:
    """CUDA: static KV buffers + hand-captured CUDA graphs (inference/fast_decode.py).

    Warmed up at load with the default chest question on a blank 896 px image, so the first
    study is not slow: every batch bucket's graph is captured for that prompt length and the
    configured token budget, and a prompt pass runs for each row count a joining pass takes
    and for a full batch, so the attention's per-shape plans exist before the first burst
    (inference/decode_joins.py ``warm_pass_shapes``; about 4 s on an H200 at max_batch 64).

    A second, small generator (its own KV arena, up to [interactive] max_batch rows) answers
    the questions the worker serves between decode steps of a running batch. Its graphs are
    captured for the whole buffer length: a follow-up with the report, anchors and a crop has
    a far longer prompt than the study question, and a capture then would hold the batch up.
    Its long-prompt buffers take at most the memory of ``PRIORITY_LONG_KV_TOKENS`` columns of
    every layer (4.5 GB for the 4B model in bf16), allocated the first time a long question
    comes during a batch: a question about an 85-slice study with its report and a crop (about
    24,000 tokens) takes 0.7 GB of it, its local layers keeping only their window.
    """
    if not engine.wants_fast_path:
        return
    from inference.decode_joins import warm_pass_shapes
    from inference.fast_decode import FastGreedyGenerator

    model = settings.model
    sample = engine.sample_inputs(PromptLibrary.load(model.prompts_dir).question("CR", "CHEST"))
    prompt_len = int(sample["input_ids"].shape[1])
    total_len = max(FAST_PATH_MIN_LENGTH, prompt_len + model.max_new_tokens + 64)
    long_tokens = long_prompt_kv_tokens(engine, model.long_prompt_kv_tokens)
    generator = FastGreedyGenerator(
        engine.model, max_batch=model.max_batch, max_total_len=total_len, long_kv_tokens=long_tokens
    )
    started = time.monotonic()
    generator.warm_up(prompt_len, model.max_new_tokens, sample_inputs=sample)
    try:
        warm_pass_shapes(generator, sample, model.max_batch)
    except torch.OutOfMemoryError as exc:
        # The first full batch would have failed the same way; say so at start instead.
        raise ModelLoadError(
            f"a prompt pass of model.max_batch = {model.max_batch} studies does not fit in "
            "the GPU's memory; lower [model] max_batch (README, GPU sizing)"
        ) from exc
    priority = FastGreedyGenerator(
        engine.model,
        max_batch=settings.interactive.max_batch,
        max_total_len=total_len,
        long_kv_tokens=min(long_tokens, PRIORITY_LONG_KV_TOKENS),
    )
    priority.warm_up(prompt_len, total_len - prompt_len + 1, sample_inputs=sample)
    engine.attach_fast_generator(generator, priority=priority)
    log.info(
        "CUDA fast path ready (graphs captured, prompt passes warmed: %.1f s)",
        time.monotonic() - started,
    )


# One row of the longest conversation turn (85 slices, the report, anchors, a crop and the
# answer, rounded up to the fast path's long-length step) if every layer kept every column;
# with the local layers' rings, the memory of this many columns holds several such rows.
PRIORITY_LONG_KV_TOKENS = 32_768


def long_prompt_kv_tokens(engine: TransformersEngine, configured: int | None) -> int:
    """``model.long_prompt_kv_tokens``, or the KV columns a quarter of the GPU's memory holds
    (every layer's K and V for one token of one row, in the model's dtype): the budget's unit,
    though the long buffers' local layers keep only their window (inference/fast_buffers.py)."""
    if configured is not None:
        return configured
    if engine.device.type != "cuda":
        return 0
    text = engine.model.config.get_text_config()
    column_bytes = (
        2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim
        * torch.finfo(engine.dtype).bits // 8
    )  # fmt: skip
    total = torch.cuda.get_device_properties(engine.device).total_memory
    return int(total // 4 // column_bytes)


def scripted_engine(path: Path | None) -> ScriptedEngine:
    """Answers from a JSON file: a list of texts, used in turn and then cycled."""
    if path is None:
        raise ModelLoadError("model.engine = 'scripted' needs model.scripted_responses_file")
    try:
        texts = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read scripted responses {path}: {exc}") from exc
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise ModelLoadError(f"{path}: expected a non-empty JSON list of strings")
    counter = iter(range(10**12))

    def responder(_request: GenerationRequest) -> str:
        return str(texts[next(counter) % len(texts)])

    identity = SCRIPTED_IDENTITY.model_copy(update={"is_test_model": True})
    return ScriptedEngine(responder=responder, identity=identity)
