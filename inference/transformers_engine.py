"""The real engine: MedGemma (or the tiny demo model) through Hugging Face transformers.

Loading follows the model card (docs/architecture.md, "Model facts"): ``AutoProcessor`` +
``AutoModelForImageTextToText`` from a local directory, bf16 on CUDA (fp16 is broken for
Gemma 3), float32 on CPU, optional NF4/int8 through bitsandbytes on CUDA, SDPA attention,
greedy decoding. Nothing is ever downloaded: weights come from ``ModelSettings.model_path`` or
from a snapshot already in the local Hugging Face cache, read with ``local_files_only=True``
and ``HF_HUB_OFFLINE=1``. ``locate_weights`` finds them; ``missing_weights_message`` tells an
operator what was searched and how to provide them.

A batch is one ``processor(...)`` call with left padding, so every prompt ends at the same
column and the new tokens of every row start right after it. Rows finish at the first
end-of-sequence token; ``GenerationRequest.settings.max_new_tokens`` is honoured per request
by generating up to the batch maximum and cutting each row at its own limit (greedy decoding
makes the cut identical to stopping there).

``prepare`` (the processor on the CPU, then the copy to the device) and ``generate_prepared``
(the model, then text decoding) split ``generate`` in two, so the inference worker can build
batch N+1 in a second thread while batch N generates. On CUDA the copy runs on a stream of its
own and the generating stream waits for it on the device, not in Python.

Questions between decode steps (issue 13): ``set_step_hook(hook)`` makes a batch on the fast
path call ``hook`` every few decode steps (``FastGreedyGenerator.generate(between_steps=)``);
the inference worker answers waiting questions there. A ``generate`` made from inside the hook
(same thread) must not touch the running batch's static buffers, which hold its KV: it runs on
the second, small priority generator (``attach_fast_generator(..., priority=)``, sized by
[interactive]), or on plain ``model.generate`` when there is none, and never calls the hook.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
import transformers
from PIL import Image
from safetensors import SafetensorError
from transformers import AutoModelForImageTextToText, AutoProcessor

from config.settings import ModelSettings
from core.errors import InferenceError
from inference.decode_joins import RowSource
from inference.demo_model import DEMO_MODEL_MARKER
from inference.device_inputs import DeviceInputs, join_pieces
from inference.engine import (
    GenerationRequest,
    GenerationResult,
    JoinFeed,
    OutOfMemory,
    PreparedBatch,
    prompt_groups,
)
from inference.engine_joins import PieceRows
from inference.prefill_attention import CHUNKED_SDPA
from inference.token_check import check_tokens_on_lists
from inference.vision_tower import as_rgb, keep_vision_embeddings_row_major
from inference.weights import locate_weights, missing_weights_message, model_revision
from storage.report_schema import ModelIdentity

log = logging.getLogger(__name__)

MODEL_IMAGE_SIDE = 896  # MedGemma's SigLIP input (model card)

# Text markers of MedGemma's thinking block; kept in the decoded text for the parser.
THINKING_TOKENS = ("<unused94>", "<unused95>")


class ModelLoadError(InferenceError, RuntimeError):
    """The model cannot be loaded as configured; ``str()`` says why and what to do."""


class FastGenerator(Protocol):
    """A greedy decode loop that replaces ``model.generate`` on CUDA (inference/fast_decode.py,
    ``FastGreedyGenerator``).

    Same contract as ``model.generate(**inputs, max_new_tokens=n, do_sample=False)`` with the
    prompt columns cut off: the new ids only, [batch, <= n], rows that stop early padded after
    their end-of-sequence token.
    """

    def generate(
        self,
        inputs: Mapping[str, torch.Tensor],
        max_new_tokens: int,
        *,
        between_steps: Callable[[], None] | None = None,
        joins: RowSource | None = None,
    ) -> torch.Tensor:
        """``between_steps``: called every few decode steps (see the module docstring);
        ``joins``: rows that join the batch meanwhile (inference/decode_joins.py)."""
        ...


def resolve_device(setting: str) -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU."""
    if setting == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"model.device is {setting!r} but no CUDA device is available")
    return device


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _quantization_config(quantization: str, device: torch.device) -> Any:
    """BitsAndBytesConfig for nf4/int8 (bf16 compute), or None."""
    if quantization == "none":
        return None
    if device.type != "cuda":
        raise ModelLoadError(
            f"model.quantization={quantization!r} needs a CUDA device (bitsandbytes); "
            f"this node runs on {device}. Set model.quantization='none' for CPU."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(
            f"model.quantization={quantization!r} needs the bitsandbytes package: "
            "pip install 'medgemma-node[quantization]'"
        )
    if quantization == "nf4":
        return transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
    return transformers.BitsAndBytesConfig(load_in_8bit=True)


def _demo_marker(weights_dir: Path) -> dict[str, Any] | None:
    marker = weights_dir / DEMO_MODEL_MARKER
    if not marker.is_file():
        return None
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = {}
    return data if isinstance(data, dict) else {}


# --------------------------------------------------------------------------- engine


class TransformersEngine:
    """``Engine`` over a Gemma 3 image-text-to-text model."""

    def __init__(self, settings: ModelSettings, weights_dir: Path | None = None) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        located = weights_dir or locate_weights(settings)
        if located is None:
            raise ModelLoadError(missing_weights_message(settings))
        self.weights_dir = located
        self.device = resolve_device(settings.device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        quantization = _quantization_config(settings.quantization, self.device)
        self.processor = self._load_processor()
        self.model = self._load_model(quantization)
        self.identity = self._identity(settings)
        self._end_ids = self._stop_token_ids()
        self._thinking_ids = self._marker_ids()
        # CUDA fast path hook: when wants_fast_path (settings.fast_path and a CUDA device) the
        # process wiring attaches inference.fast_decode.FastGreedyGenerator(engine.model, ...)
        # with attach_fast_generator(); while it is None, _generate_ids uses model.generate.
        self.wants_fast_path = settings.fast_path and self.device.type == "cuda"
        self._fast_generator: FastGenerator | None = None
        # For a generate made inside the step hook, while the batch holds _fast_generator.
        self._priority_generator: FastGenerator | None = None
        self._step_hook: Callable[[], None] | None = None
        self._in_step_hook = False
        # A fast tokenizer is not safe to share between threads (each call reconfigures its
        # padding in place: "RuntimeError: Already borrowed"), and prepare runs in a second
        # thread while this one decodes text: every other thread gets a copy of the processor.
        self._owner_thread = threading.get_ident()
        self._thread_local = threading.local()
        self._copy_stream: torch.cuda.Stream | None = None

    # -- loading -----------------------------------------------------------------------

    def _load_processor(self) -> Any:
        try:
            processor = AutoProcessor.from_pretrained(self.weights_dir, local_files_only=True)
        except (OSError, ValueError) as exc:  # missing or malformed tokenizer/processor files
            raise ModelLoadError(
                f"cannot load the processor from {self.weights_dir}: {exc}"
            ) from exc
        processor.tokenizer.padding_side = "left"
        check_tokens_on_lists(processor)
        return processor

    def _load_model(self, quantization: Any) -> Any:
        kwargs: dict[str, Any] = {
            "dtype": self.dtype,
            # Stock sdpa, except long prompts: chunks against the key columns their mask allows.
            "attn_implementation": CHUNKED_SDPA,
            "local_files_only": True,
        }
        if quantization is not None:
            kwargs["quantization_config"] = quantization
            kwargs["device_map"] = {"": self.device.index or 0}
        try:
            model: Any = AutoModelForImageTextToText.from_pretrained(self.weights_dir, **kwargs)
        except (OSError, ValueError, SafetensorError) as exc:  # missing, truncated, mismatched
            raise ModelLoadError(f"cannot load the model from {self.weights_dir}: {exc}") from exc
        if quantization is None:
            try:
                model = model.to(self.device)
            except torch.cuda.OutOfMemoryError as exc:
                raise ModelLoadError(
                    f"the model does not fit on {self.device}: {exc}; "
                    "try model.quantization = 'nf4'"
                ) from exc
        keep_vision_embeddings_row_major(model)
        return model.eval()

    def _identity(self, settings: ModelSettings) -> ModelIdentity:
        marker = _demo_marker(self.weights_dir)
        model_id = str(marker.get("model_id", settings.model_id)) if marker else settings.model_id
        return ModelIdentity(
            model_id=model_id,
            revision=model_revision(self.weights_dir),
            dtype=str(self.dtype).removeprefix("torch."),
            quantization=settings.quantization,
            device=_device_name(self.device),
            library_versions={"torch": torch.__version__, "transformers": transformers.__version__},
            is_test_model=marker is not None,
        )

    def _stop_token_ids(self) -> set[int]:
        configured = self.model.generation_config.eos_token_id
        ids = configured if isinstance(configured, list) else [configured]
        ids = [*ids, self.processor.tokenizer.eos_token_id]
        return {int(i) for i in ids if i is not None}

    def _marker_ids(self) -> dict[int, str]:
        vocab = self.processor.tokenizer.get_vocab()
        return {vocab[token]: token for token in THINKING_TOKENS if token in vocab}

    def attach_fast_generator(
        self, generator: FastGenerator | None, priority: FastGenerator | None = None
    ) -> None:
        """Use ``generator`` instead of ``model.generate`` (None goes back to the plain path);
        ``priority`` (own buffers) runs what the step hook generates while a batch runs."""
        self._fast_generator = generator
        self._priority_generator = priority

    def set_step_hook(self, hook: Callable[[], None] | None) -> None:
        """Call ``hook`` every few decode steps of each batch on the fast path (None: stop).

        It runs in the generating thread and may call ``generate`` (served by the priority
        generator); an exception from it ends the batch, so it should catch its own."""
        self._step_hook = hook

    def _between_steps(self) -> None:
        if self._step_hook is None or self._in_step_hook:
            return
        self._in_step_hook = True
        try:
            self._step_hook()
        finally:
            self._in_step_hook = False

    def image_side(self) -> int | None:
        """The side the image processor resizes every image to, bilinear (Gemma 3's: 896);
        None when it does otherwise (another filter, pan and scan, no resize)."""
        return bilinear_square_side(getattr(self.processor, "image_processor", None))

    def _processor(self) -> Any:
        """This thread's processor: the loaded one in the thread that loaded it, else a copy."""
        if threading.get_ident() == self._owner_thread:
            return self.processor
        processor = getattr(self._thread_local, "processor", None)
        if processor is None:
            processor = copy.deepcopy(self.processor)
            self._thread_local.processor = processor
        return processor

    def close(self) -> None:
        """Free the model's memory (the worker reloads a fresh engine when needed)."""
        del self.model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- generation --------------------------------------------------------------------

    def _chat_text(self, request: GenerationRequest) -> str:
        """Gemma 3 chat turns, no system role: user turns their images then text (their text
        first with ``question_first``), model turns text (the template's "assistant")."""
        messages = []
        for turn in request.turns:
            content: list[dict[str, str]] = [{"type": "image"} for _ in turn.images]
            at = 0 if turn.question_first else len(content)
            content.insert(at, {"type": "text", "text": turn.text})
            role = "assistant" if turn.role == "model" else "user"
            messages.append({"role": role, "content": content})
        text: str = self._processor().apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        return text

    def sample_inputs(self, prompt: str) -> Any:
        """Processor output for one blank 896 px image and ``prompt`` (fast-path warm-up)."""
        blank = Image.new("RGB", (MODEL_IMAGE_SIDE, MODEL_IMAGE_SIDE))
        return self._inputs([GenerationRequest(images=[blank], prompt=prompt)])

    def _inputs(self, requests: Sequence[GenerationRequest]) -> Any:
        return self._to_device(self._processor_inputs(requests), non_blocking=False)

    def _processor_inputs(self, requests: Sequence[GenerationRequest], on_gpu: bool = False) -> Any:
        """The processor's tensors for one batch, left-padded; with ``on_gpu`` the images are
        rescaled and normalised on the engine's device (the torchvision backend's ``device``):
        an 85-slice CT study took 0.9 s of CPU for its pixels alone."""
        texts = [self._chat_text(r) for r in requests]
        images = [[as_rgb(image) for image in r.all_images] for r in requests]
        extra = {"device": self.device} if on_gpu and any(images) else {}
        return self._processor()(
            text=texts,
            images=images if any(images) else None,
            padding=True,
            return_tensors="pt",
            **extra,
        )

    def _images_on_gpu(self) -> bool:
        """CUDA with the torchvision image processor (the PIL one works on the CPU only)."""
        backend = getattr(self.processor.image_processor, "backend", None)
        return self.device.type == "cuda" and backend == "torchvision"

    def _to_device(self, inputs: Any, non_blocking: bool) -> Any:
        """Copy to the device, then cast the pixels there (the order generate always used)."""
        inputs = inputs.to(self.device, non_blocking=non_blocking)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return inputs

    def _device_inputs(
        self, requests: Sequence[GenerationRequest], indices: list[int]
    ) -> DeviceInputs:
        """The group of ``requests`` at ``indices`` of the batch, on the device."""
        group = [requests[index] for index in indices]
        if self.device.type != "cuda":
            cpu_inputs = self._processor_inputs(group)
            return DeviceInputs(self._to_device(cpu_inputs, non_blocking=False), indices)
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        # A stream of its own: on the default stream the copy (and the image processing on
        # the GPU) would queue behind, and hold up, the decode steps of the batch that is
        # generating meanwhile. non_blocking is safe for pageable memory: the copy has read it
        # when the call returns.
        with torch.cuda.stream(self._copy_stream):
            inputs = self._processor_inputs(group, on_gpu=self._images_on_gpu())
            tensors = self._to_device(inputs, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self._copy_stream)
        return DeviceInputs(tensors, indices, ready)

    def _take_inputs(self, prepared: DeviceInputs) -> Any:
        """The tensors, once the generating stream has waited for their copy."""
        if prepared.ready is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(prepared.ready)
            for value in prepared.tensors.values():
                if isinstance(value, torch.Tensor):
                    # Made on the copy stream: keep the allocator from reusing the memory
                    # before this stream's work on it is done.
                    value.record_stream(stream)
        return prepared.tensors

    def _generate_ids(
        self,
        inputs: Mapping[str, torch.Tensor],
        max_new_tokens: int,
        joins: RowSource | None = None,
    ) -> torch.Tensor:
        """The new ids of every row, [batch, <= max_new_tokens].

        CUDA fast path hook: with a FastGenerator attached (attach_fast_generator) the decode
        runs there, calling the step hook between steps; otherwise plain greedy
        ``model.generate``. Called from inside the step hook: the priority generator, else
        ``model.generate`` (the batch's generator is in use).
        """
        if self._in_step_hook:
            if self._priority_generator is not None:
                return self._priority_generator.generate(inputs, max_new_tokens)
        elif self._fast_generator is not None:
            hook = self._between_steps if self._step_hook is not None else None
            return self._fast_generator.generate(
                inputs, max_new_tokens, between_steps=hook, joins=joins
            )
        output: torch.Tensor = self.model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False
        )
        return output[:, inputs["input_ids"].shape[1] :]

    def _new_tokens(self, row: torch.Tensor, limit: int) -> tuple[list[int], int]:
        """(ids of the answer text, tokens generated): the row up to its own limit and its
        first stop token, which counts as generated but is not part of the text."""
        ids: list[int] = row[:limit].tolist()
        for position, token in enumerate(ids):
            if token in self._end_ids:
                return ids[:position], position + 1
        return ids, len(ids)

    def _decode(self, ids: list[int]) -> str:
        """Text without special tokens, except the thinking markers the parser needs."""
        tokenizer = self._processor().tokenizer
        pieces: list[str] = []
        segment: list[int] = []
        for token in ids:
            if token in self._thinking_ids:
                pieces.append(tokenizer.decode(segment, skip_special_tokens=True))
                pieces.append(self._thinking_ids[token])
                segment = []
            else:
                segment.append(token)
        pieces.append(tokenizer.decode(segment, skip_special_tokens=True))
        return "".join(pieces)

    def _out_of_memory(self, rows: int) -> OutOfMemory:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return OutOfMemory(f"batch of {rows} does not fit on {self.device}")

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Run one batch; raise OutOfMemory when it does not fit on the device."""
        if not requests:
            return []
        return self.generate_prepared(self.prepare(requests))

    def prepare(self, requests: list[GenerationRequest]) -> PreparedBatch:
        """The processor (CPU) and the copy to the device; safe in a second thread."""
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                groups = [self._device_inputs(requests, g) for g in prompt_groups(requests)]
        except torch.cuda.OutOfMemoryError as exc:
            raise self._out_of_memory(len(requests)) from exc
        return PreparedBatch(list(requests), groups, time.perf_counter() - started)

    def join(self, pieces: list[PreparedBatch]) -> PreparedBatch:
        """One batch of ``prepare``d pieces (inference/device_inputs.py), on the copy stream."""
        started = time.perf_counter()
        parts = [(piece.requests, self._device_groups(piece)) for piece in pieces]
        stream = self._copy_stream if self.device.type == "cuda" else None
        with torch.inference_mode(), torch.cuda.stream(stream):
            requests, groups = join_pieces(parts, int(self._processor().tokenizer.pad_token_id))
            ready = None if stream is None else stream.record_event()
        inputs = [DeviceInputs(tensors, indices, ready) for indices, tensors in groups]
        seconds = sum(piece.seconds for piece in pieces) + time.perf_counter() - started
        return PreparedBatch(requests, inputs, seconds)

    def _device_groups(self, batch: PreparedBatch) -> list[DeviceInputs]:
        groups = batch.inputs
        if not isinstance(groups, list) or not all(isinstance(g, DeviceInputs) for g in groups):
            raise TypeError("the batch was not made by TransformersEngine.prepare")
        return groups

    def generate_prepared(self, batch: PreparedBatch) -> list[GenerationResult]:
        """Generate and decode a batch from ``prepare``; raise OutOfMemory when it does not fit.

        Each result's ``seconds`` is the batch's prepare time plus this call's.
        """
        if not batch.requests:
            return []
        groups = self._device_groups(batch)
        started = time.perf_counter()
        results: dict[int, GenerationResult] = {}
        for group in groups:
            results.update(self._generate_group(batch.requests, group))
        return _timed([results[index] for index in range(len(batch.requests))], batch, started)

    def generate_joining(self, batch: PreparedBatch, feed: JoinFeed) -> list[GenerationResult]:
        """``generate_prepared``, pieces from ``feed`` joining the batch between its decode
        steps (inference/engine_joins.py): on the fast path, for a batch of one prompt group;
        otherwise just ``generate_prepared``. Results: the batch's, then each piece's."""
        groups = self._device_groups(batch)
        if self._fast_generator is None or len(groups) != 1 or not batch.requests:
            return self.generate_prepared(batch)
        pad_id = int(self._processor().tokenizer.pad_token_id)
        rows = PieceRows(feed, self._device_groups, self._take_inputs, batch, pad_id)
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                inputs = self._take_inputs(groups[0])
                output = self._generate_ids(inputs, rows.max_new_tokens, rows)
        except torch.cuda.OutOfMemoryError as exc:
            joined = sum(len(piece.requests) for piece, _ in rows.taken)
            raise self._out_of_memory(len(batch.requests) + joined) from exc
        results: list[GenerationResult] = []
        parts = [(batch.requests, inputs), *((p.requests, t) for p, t in rows.taken)]
        for requests, tensors in parts:
            rows_output = output[len(results) : len(results) + len(requests)]
            results += self._results(requests, tensors["attention_mask"], rows_output, 0.0)
        for result in results:
            result.batch_size = len(results)
        return _timed(results, batch, started)

    def _generate_group(
        self, requests: list[GenerationRequest], group: DeviceInputs
    ) -> dict[int, GenerationResult]:
        """One prompt group's results by position in the batch."""
        members = [requests[index] for index in group.indices]
        limit = max(r.settings.max_new_tokens for r in members)
        try:
            with torch.inference_mode():
                inputs = self._take_inputs(group)
                output = self._generate_ids(inputs, limit)
        except torch.cuda.OutOfMemoryError as exc:
            raise self._out_of_memory(len(requests)) from exc
        results = self._results(members, inputs["attention_mask"], output, 0.0)
        return dict(zip(group.indices, results, strict=True))

    def _results(
        self,
        requests: list[GenerationRequest],
        attention_mask: torch.Tensor,
        output: torch.Tensor,
        seconds: float,
    ) -> list[GenerationResult]:
        prompt_tokens = attention_mask.sum(dim=1).tolist()
        results = []
        for index, request in enumerate(requests):
            text_ids, generated = self._new_tokens(output[index], request.settings.max_new_tokens)
            results.append(
                GenerationResult(
                    text=self._decode(text_ids),
                    prompt_tokens=int(prompt_tokens[index]),
                    new_tokens=generated,
                    seconds=seconds,
                    batch_size=len(requests),
                )
            )
        return results


def bilinear_square_side(image_processor: Any) -> int | None:
    """``size`` of an image processor that resizes to a square with bilinear resampling."""
    size = getattr(image_processor, "size", None)
    if size is None or not getattr(image_processor, "do_resize", False):
        return None
    height, width = (size.get(key) for key in ("height", "width"))
    resample = getattr(image_processor, "resample", None)
    bilinear = str(getattr(resample, "value", resample)).lower() in ("2", "bilinear")
    panned = bool(getattr(image_processor, "do_pan_and_scan", False))
    return int(height) if bilinear and not panned and height and height == width else None


def _timed(
    results: list[GenerationResult], batch: PreparedBatch, started: float
) -> list[GenerationResult]:
    """Each result's ``seconds``: the batch's prepare time plus its generation since
    ``started``."""
    seconds = batch.seconds + time.perf_counter() - started
    for result in results:
        result.seconds, result.prepare_seconds = seconds, batch.seconds
    return results
