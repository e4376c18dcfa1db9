"""MedGemma-4B through the node's own engine path on one GPU, beside the same engine without
the fast path, in one run.

Where benchmarks/inference_gpu.py times the decode loops on prepared tensors, this times what
the inference worker calls: the MedGemma-4B architecture with random weights is written to a
local directory with its processor, loaded by ``TransformersEngine`` (AutoProcessor +
AutoModelForImageTextToText, bf16, chunked sdpa — the production loading code), the fast path
attached and warmed up by ``inference.loader.attach_fast_path`` exactly as at node start, and
``engine.generate(requests)`` timed from PIL images + question to decoded text.

``--sustained N`` then runs N batches of the largest size back to back twice: in series through
``engine.generate``, and pipelined the way the inference worker runs them (the next batch's
``engine.prepare`` in an ``inference.prefetch.Prefetcher`` thread while the current one runs
``engine.generate_prepared``).

    python -m benchmarks.engine_gpu --batches 1,8,64 --new-tokens 256 --sustained 8
    python -m benchmarks.engine_gpu --tiny --batches 1,2 --new-tokens 8 --sustained 3  # CPU
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from benchmarks.medgemma_4b import (
    build_model,
    build_processor,
    chest_image,
    chest_question,
    model_config,
)
from config.settings import NodeSettings, load_settings
from inference.engine import GenerationRequest, GenerationResult, GenerationSettings, PreparedBatch
from inference.loader import attach_fast_path
from inference.prefetch import Prefetcher
from inference.transformers_engine import TransformersEngine

IMAGE_4B, TOKENS_4B = 896, 256
IMAGE_TINY, TOKENS_TINY = 64, 16


def write_weights(directory: Path, tiny: bool) -> float:
    """Random-weight model + processor saved as a model directory; return seconds taken."""
    started = time.perf_counter()
    size, tokens = (IMAGE_TINY, TOKENS_TINY) if tiny else (IMAGE_4B, TOKENS_4B)
    device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    model = build_model(model_config(tiny, size, tokens), device)
    model.save_pretrained(directory)
    build_processor(size, tokens).save_pretrained(directory)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return time.perf_counter() - started


def load_engine(
    weights: Path, tiny: bool, max_batch: int, new_tokens: int
) -> tuple[TransformersEngine, NodeSettings]:
    """The random-weight model written to ``weights`` and loaded as the node loads it, with the
    node's settings for this batch and token budget (the fast path not attached yet; wanted
    on the CPU too when ``tiny``)."""
    write_weights(weights, tiny)
    settings = node_settings(weights, max_batch, new_tokens)
    engine = TransformersEngine(settings.model)
    engine.wants_fast_path = engine.wants_fast_path or tiny
    return engine, settings


def node_settings(weights: Path, max_batch: int, new_tokens: int) -> NodeSettings:
    """The node's default settings with the model in ``weights``, this batch and token budget."""
    settings = load_settings()
    settings.model = settings.model.model_copy(
        update={"model_path": weights, "max_batch": max_batch, "max_new_tokens": new_tokens}
    )
    return settings


def requests_for(batch: int, new_tokens: int, image_side: int) -> list[GenerationRequest]:
    question = chest_question()
    return [
        GenerationRequest(
            images=[chest_image(image_side, seed=index)],
            prompt=question,
            settings=GenerationSettings(max_new_tokens=new_tokens),
        )
        for index in range(batch)
    ]


def time_generate(
    engine: TransformersEngine, requests: list[GenerationRequest], runs: int
) -> dict[str, Any]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    seconds, prepare, results = [], [], []
    for _ in range(runs):
        started = time.perf_counter()
        results = engine.generate(requests)
        seconds.append(time.perf_counter() - started)
        prepare.append(results[0].prepare_seconds)
    latency = statistics.median(seconds)
    new_tokens = [result.new_tokens for result in results]
    peak = torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else 0.0
    return {
        "batch": len(requests),
        "latency_s": latency,
        "studies_per_hour": len(requests) * 3600 / latency,
        "tokens_per_s": sum(new_tokens) / latency,
        "new_tokens_min": min(new_tokens),
        "new_tokens_max": max(new_tokens),
        "prompt_tokens": max(result.prompt_tokens for result in results),
        "prepare_s": statistics.median(prepare),  # processor + copy to the device, in series
        "peak_gb": peak,
        "texts": [result.text for result in results],
    }


def sustained_requests(
    count: int, batch: int, new_tokens: int, image_side: int
) -> list[list[GenerationRequest]]:
    """``count`` batches of ``batch`` studies: the same images, each batch in another order."""
    base = requests_for(batch, new_tokens, image_side)
    return [base[k % batch :] + base[: k % batch] for k in range(count)]


Timeline = dict[str, list[float]]  # per batch: prepare_s, generate_s, end (perf_counter)


def generate_timed(
    engine: TransformersEngine, batch: PreparedBatch, timeline: Timeline
) -> list[GenerationResult]:
    started = time.perf_counter()
    results = engine.generate_prepared(batch)
    ended = time.perf_counter()
    timeline["prepare_s"].append(batch.seconds)
    timeline["generate_s"].append(ended - started)
    timeline["end"].append(ended)
    return results


def run_serial(
    engine: TransformersEngine, batches: list[list[GenerationRequest]], timeline: Timeline
) -> list[list[GenerationResult]]:
    """What engine.generate does, batch after batch, with its two steps timed apart."""
    return [generate_timed(engine, engine.prepare(requests), timeline) for requests in batches]


def run_pipelined(
    engine: TransformersEngine,
    batches: list[list[GenerationRequest]],
    timeline: Timeline,
    prefetcher: Prefetcher[PreparedBatch],
) -> list[list[GenerationResult]]:
    """As the worker does it: the first batch in series, then each next one prepared in the
    prefetch thread while the current one generates."""
    outputs = []
    pending: PreparedBatch | None = engine.prepare(batches[0])
    following = iter(batches[1:])
    while pending is not None:
        if (requests := next(following, None)) is not None:
            prefetcher.start(partial(engine.prepare, requests))
        outputs.append(generate_timed(engine, pending, timeline))
        pending = prefetcher.take()
    return outputs


def time_sustained(
    engine: TransformersEngine, batches: list[list[GenerationRequest]], pipelined: bool
) -> dict[str, Any]:
    prefetcher: Prefetcher[PreparedBatch] = Prefetcher("prepare-ahead")
    # The prefetch thread's first prepare copies the processor (one per thread): not timed.
    prefetcher.start(partial(engine.prepare, batches[0][:1]))
    prefetcher.take()
    timeline: Timeline = {"prepare_s": [], "generate_s": [], "end": []}
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    if pipelined:
        outputs = run_pipelined(engine, batches, timeline, prefetcher)
    else:
        outputs = run_serial(engine, batches, timeline)
    seconds = time.perf_counter() - started
    prefetcher.close()
    batch = len(batches[0])
    ends = timeline["end"]
    # After the first batch: what a worker with a deep queue keeps up.
    steady = (len(ends) - 1) * batch * 3600 / (ends[-1] - ends[0]) if len(ends) > 1 else 0.0
    return {
        "mode": "pipelined (prepare ahead)" if pipelined else "serial (engine.generate)",
        "batches": len(batches),
        "batch": batch,
        "seconds": seconds,
        "studies_per_hour": len(batches) * batch * 3600 / seconds,
        "steady_per_hour": steady,
        "prepare_s": statistics.mean(timeline["prepare_s"]),
        "generate_s": statistics.mean(timeline["generate_s"]),
        "texts": [result.text for results in outputs for result in results],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--reference-batch", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument(
        "--sustained", type=int, default=0, metavar="N", help="N back-to-back batches, twice"
    )
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    image_side = IMAGE_TINY if args.tiny else IMAGE_4B
    with tempfile.TemporaryDirectory(prefix="mg4b-") as directory:
        weights = Path(directory)
        write_s = write_weights(weights, args.tiny)
        settings = node_settings(weights, max(batches), args.new_tokens)
        started = time.perf_counter()
        engine = TransformersEngine(settings.model)
        load_s = time.perf_counter() - started
        print(f"weights written in {write_s:.1f} s, loaded by TransformersEngine in {load_s:.1f} s")
        print(f"identity: {engine.identity.model_dump()}")
        reference = time_generate(
            engine, requests_for(args.reference_batch, args.new_tokens, image_side), runs=1
        )
        engine.wants_fast_path = engine.wants_fast_path or args.tiny
        started = time.perf_counter()
        attach_fast_path(engine, settings)
        print(f"fast path attached and warmed up in {time.perf_counter() - started:.1f} s")
        rows = [
            time_generate(engine, requests_for(b, args.new_tokens, image_side), args.runs)
            for b in batches
        ]
        same = (
            next(r for r in rows if r["batch"] == args.reference_batch)
            if args.reference_batch in batches
            else None
        )
        print_table(reference, rows, same)
        if args.sustained > 0:
            work = sustained_requests(args.sustained, max(batches), args.new_tokens, image_side)
            print_sustained(*(time_sustained(engine, work, mode) for mode in (False, True)))


def print_table(
    reference: dict[str, Any], rows: list[dict[str, Any]], same: dict[str, Any] | None
) -> None:
    columns = ("batch", "latency s", "studies/h", "tok/s", "new tok", "peak GB")
    print(f"{'path':28s} " + " ".join(f"{name:>10s}" for name in columns))
    labelled = [("engine, plain generate", reference)] + [("engine, fast path", r) for r in rows]
    for label, row in labelled:
        values = (
            f"{row['batch']:d}",
            f"{row['latency_s']:.3f}",
            f"{row['studies_per_hour']:.0f}",
            f"{row['tokens_per_s']:.0f}",
            f"{row['new_tokens_min']}-{row['new_tokens_max']}",
            f"{row['peak_gb']:.2f}",
        )
        print(f"{label:28s} " + " ".join(f"{value:>10s}" for value in values))
    if same is not None:
        identical = same["texts"] == reference["texts"]
        print(f"same text as plain generate at batch {same['batch']}: {identical}")


def print_sustained(serial: dict[str, Any], pipelined: dict[str, Any]) -> None:
    print(f"sustained: {serial['batches']} batches of {serial['batch']} back to back")
    columns = ("seconds", "s/batch", "studies/h", "steady/h", "prepare s", "generate s")
    print(f"{'mode':28s} " + " ".join(f"{name:>10s}" for name in columns))
    for row in (serial, pipelined):
        values = (
            f"{row['seconds']:.2f}",
            f"{row['seconds'] / row['batches']:.3f}",
            f"{row['studies_per_hour']:.0f}",
            f"{row['steady_per_hour']:.0f}",
            f"{row['prepare_s']:.3f}",
            f"{row['generate_s']:.3f}",
        )
        print(f"{row['mode']:28s} " + " ".join(f"{value:>10s}" for value in values))
    gain = pipelined["studies_per_hour"] / serial["studies_per_hour"]
    print(f"pipelined / serial: {gain:.3f}; same text: {pipelined['texts'] == serial['texts']}")


if __name__ == "__main__":
    main()
