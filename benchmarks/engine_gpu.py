"""MedGemma-4B through the node's own engine path on one GPU, beside the same engine without
the fast path, in one run.

Where benchmarks/inference_gpu.py times the decode loops on prepared tensors, this times what
the inference worker calls: the MedGemma-4B architecture with random weights is written to a
local directory with its processor, loaded by ``TransformersEngine`` (AutoProcessor +
AutoModelForImageTextToText, bf16, sdpa — the production loading code), the fast path attached
and warmed up by ``inference.loader.attach_fast_path`` exactly as at node start, and
``engine.generate(requests)`` timed from PIL images + question to decoded text.

    python -m benchmarks.engine_gpu --batches 1,8,64 --new-tokens 256
    python -m benchmarks.engine_gpu --tiny --batches 1,2 --new-tokens 8     # CPU smoke test
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.inference_gpu import (
    build_model,
    build_processor,
    chest_image,
    chest_question,
    model_config,
)
from config.settings import load_settings
from inference.engine import GenerationRequest, GenerationSettings
from inference.loader import attach_fast_path
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
    seconds, results = [], []
    for _ in range(runs):
        started = time.perf_counter()
        results = engine.generate(requests)
        seconds.append(time.perf_counter() - started)
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
        "peak_gb": peak,
        "texts": [result.text for result in results],
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
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    image_side = IMAGE_TINY if args.tiny else IMAGE_4B
    with tempfile.TemporaryDirectory(prefix="mg4b-") as directory:
        weights = Path(directory)
        write_s = write_weights(weights, args.tiny)
        settings = load_settings()
        settings.model = settings.model.model_copy(
            update={
                "model_path": weights,
                "max_batch": max(batches),
                "max_new_tokens": args.new_tokens,
            }
        )
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


if __name__ == "__main__":
    main()
