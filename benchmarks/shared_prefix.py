"""The question before the image, with the rows' shared prefix run once, against today's order:
the prompt passes and the whole generate on one GPU, in one run.

The random-weight MedGemma-4B architecture (benchmarks/medgemma_4b.py: built on the device in
bf16 with the node's attention implementation), its processor (the demo tokenizer, one token a
character, with the chest question cut to 400 characters: the real tokenizer's count) and one
``FastGreedyGenerator`` as the node attaches it (CUDA graphs, Triton where present, every
bucket warmed up). For each batch size of ``--batches``, the same question about the same
synthetic radiographs (a different image a row) is asked three ways:

* images first: today's order; the rows share only ``<bos><start_of_turn>user`` before the
  image, under the minimum, so nothing is shared;
* question first, sharing off (``shared_prefix.minimum = 0``);
* question first, sharing on (the generator's default minimum): the question's tokens run
  once for the batch (inference/shared_prefix.py).

Each way is timed twice, synchronised, the median of ``--runs`` after one untimed run: the
prompt passes alone (``FastGreedyGenerator._prefill_passes`` without decode buffers: vision
tower and text model, every pass of the batch) and the whole ``generate`` of ``--new-tokens``
tokens a row (forced to that length, so every way decodes the same work). The table gives
seconds, studies/h of the whole generate, prompt tokens and P (the tokens run once; 0: none);
then whether question first decodes the same tokens with and without sharing.

    python -m benchmarks.shared_prefix --batches 64,256 --runs 3                   # GPU
    python -m benchmarks.shared_prefix --tiny --batches 2,4 --new-tokens 8 --runs 1  # CPU
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import transformers

from benchmarks.medgemma_4b import (
    build_model,
    build_processor,
    chest_image,
    chest_question,
    model_config,
)
from inference.fast_buffers import image_offsets
from inference.fast_decode import FastGreedyGenerator
from inference.shared_prefix import DEFAULT_SHARED_PREFIX_MIN

SIZES = {False: (896, 256), True: (64, 16)}  # (image side, image tokens): 4B, tiny
IMAGES_FIRST = "images first (today)"
QUESTION_FIRST = "question first, not shared"
SHARED = "question first, shared"


@dataclass
class Way:
    """One way of asking, at one batch size, and what it measured."""

    label: str
    batch: int
    prompt_tokens: int = 0
    shared_tokens: int = 0  # P: the prefix run once (0: none)
    prompt_s: float = 0.0
    generate_s: float = 0.0
    peak_gb: float = 0.0
    tokens: torch.Tensor | None = None


def versions(device: torch.device) -> list[str]:
    """What the figures were measured on."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    lines = [
        f"device: {device} ({name or 'cpu'})",
        f"python {platform.python_version()}, torch {torch.__version__} "
        f"(CUDA {torch.version.cuda}), transformers {transformers.__version__}",
    ]
    try:
        lines.append(f"triton {importlib.metadata.version('triton')}")
    except importlib.metadata.PackageNotFoundError:
        lines.append("triton: not installed")
    return lines


def chat_text(processor: Any, question_first: bool) -> str:
    """One study's prompt, as TransformersEngine._chat_text renders it."""
    content = [{"type": "image"}, {"type": "text", "text": chest_question()}]
    if question_first:
        content.reverse()
    message = [{"role": "user", "content": content}]
    text: str = processor.apply_chat_template(message, add_generation_prompt=True, tokenize=False)
    return text


def prompt_length(processor: Any, side: int) -> int:
    """Tokens of one study's prompt (the same in either order)."""
    single = processor(text=[chat_text(processor, False)], images=[[chest_image(side)]])
    return len(single["input_ids"][0])


def batch_inputs(
    processor: Any, rows: int, side: int, question_first: bool, gen: FastGreedyGenerator
) -> dict[str, torch.Tensor]:
    """The processor's tensors for ``rows`` studies on the generator's device and dtype."""
    text = chat_text(processor, question_first)
    images = [[chest_image(side, seed=index)] for index in range(rows)]
    cpu = processor(text=[text] * rows, images=images, return_tensors="pt", padding=True)
    return {key: gen._to_device(value) for key, value in cpu.items()}


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(step: Callable[[], Any], runs: int, device: torch.device) -> tuple[float, Any]:
    """One untimed run (one-off work: kernel choice, graph capture), then the median of
    ``runs`` synchronised runs; returns it with the last run's result."""
    result = step()
    seconds = []
    for _ in range(runs):
        synchronise(device)
        started = time.perf_counter()
        result = step()
        synchronise(device)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), result


def measure(
    way: Way, gen: FastGreedyGenerator, inputs: dict[str, torch.Tensor], new_tokens: int, runs: int
) -> Way:
    """The prompt passes and the whole generate of one way; fills in ``way``."""
    device = gen.device
    offsets = image_offsets(inputs, gen._image_token_id, gen._tokens_per_image)
    assert offsets is not None, "every row's images must be found"
    before = gen.shared_prefix.batches
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        way.prompt_s, _ = median_seconds(
            lambda: gen._prefill_passes(inputs, offsets, None), runs, device
        )
        way.shared_tokens = (
            gen.shared_prefix.last_length if gen.shared_prefix.batches > before else 0
        )
        way.generate_s, way.tokens = median_seconds(
            lambda: gen.generate(inputs, max_new_tokens=new_tokens, force_new_tokens=True),
            runs,
            device,
        )
    way.prompt_tokens = int(inputs["input_ids"].shape[1])
    way.peak_gb = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else 0.0
    return way


def run_batch(
    gen: FastGreedyGenerator, processor: Any, rows: int, side: int, new_tokens: int, runs: int
) -> list[Way]:
    """The three ways at one batch size, each from freshly built inputs."""
    ways = []
    for label, question_first, minimum in (
        (IMAGES_FIRST, False, DEFAULT_SHARED_PREFIX_MIN),
        (QUESTION_FIRST, True, 0),
        (SHARED, True, DEFAULT_SHARED_PREFIX_MIN),
    ):
        gen.shared_prefix.minimum = minimum
        inputs = batch_inputs(processor, rows, side, question_first, gen)
        ways.append(measure(Way(label, rows), gen, inputs, new_tokens, runs))
        print(f"  {label}: done", flush=True)
        del inputs
    gen.shared_prefix.minimum = DEFAULT_SHARED_PREFIX_MIN
    return ways


def print_table(ways: list[Way]) -> None:
    columns = ("batch", "prompt tok", "P", "prompt s", "generate s", "studies/h", "peak GB")
    print(f"{'way':28s} " + " ".join(f"{name:>10s}" for name in columns))
    for way in ways:
        values = (
            f"{way.batch:d}",
            f"{way.prompt_tokens:d}",
            f"{way.shared_tokens:d}",
            f"{way.prompt_s:.3f}",
            f"{way.generate_s:.3f}",
            f"{way.batch * 3600 / way.generate_s:.0f}",
            f"{way.peak_gb:.1f}",
        )
        print(f"{way.label:28s} " + " ".join(f"{value:>10s}" for value in values))


def identity_line(not_shared: Way, shared: Way) -> str:
    """Whether question first decodes the same tokens with and without the shared prefix."""
    a, b = not_shared.tokens, shared.tokens
    if a is None or b is None or a.shape != b.shape:
        return f"batch {shared.batch}: question first, shared vs not shared: differs (shapes)"
    rows = int((a != b).any(-1).sum())
    verdict = "identical" if rows == 0 else f"differs in {rows} of {a.shape[0]} rows"
    return f"batch {shared.batch}: question first, shared vs not shared: {verdict}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", default="64,256", help="batch sizes, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3, help="timed runs (median) after one")
    parser.add_argument("--tiny", action="store_true", help="small random model on the CPU")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    print("\n".join(versions(device)))
    side, image_tokens = SIZES[args.tiny]
    model = build_model(model_config(args.tiny, side, image_tokens), device)
    processor = build_processor(side, image_tokens)
    prompt_len = prompt_length(processor, side)
    # The decode buffers' length as the node's for this prompt and budget, without the node's
    # 2,048-column floor: at 256 rows that floor alone would take 73 GB of the 4B model's KV.
    total_len = prompt_len + args.new_tokens + 64
    gen = FastGreedyGenerator(model, max_batch=max(batches), max_total_len=total_len)
    started = time.perf_counter()
    gen.warm_up(prompt_len, args.new_tokens)
    print(
        f"{prompt_len} prompt tokens; buckets {gen.buckets} warmed up in "
        f"{time.perf_counter() - started:.1f} s (CUDA graphs: {gen.use_graphs}); attention "
        f"{model.config._attn_implementation}; shared-prefix minimum {DEFAULT_SHARED_PREFIX_MIN}",
        flush=True,
    )
    ways: list[Way] = []
    for rows in batches:
        print(f"batch {rows}:", flush=True)
        ways += run_batch(gen, processor, rows, side, args.new_tokens, args.runs)
    print_table(ways)
    for rows in batches:
        by_label = {way.label: way for way in ways if way.batch == rows}
        print(identity_line(by_label[QUESTION_FIRST], by_label[SHARED]))


if __name__ == "__main__":
    main()
