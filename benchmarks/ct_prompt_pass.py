"""Where one CT study's prompt pass goes, on one GPU: the figures behind benchmarks/RESULTS.md's
"CT and MR studies" profile.

The random-weight MedGemma-4B architecture (benchmarks/medgemma_4b.py, built on the device in
bf16 with the node's attention implementation), one prompt of ``--slices`` synthetic CT slices
(benchmarks/ct_gpu.py ``ct_slice``) and the chest question, then, each step synchronised and
run ``--runs`` times (the first includes one-off work: kernel selection, compilation):

* the image processor on the CPU and with ``device`` = the GPU (the torchvision backend), and
  the largest difference between their pixels;
* the vision tower over every slice at once;
* the whole prompt pass as the fast path runs it (``logits_to_keep=1``, its DynamicCache) with
  the chunked attention (inference/prefill_attention.py) at 2,048 and 1,024 query rows a
  chunk, and with stock SDPA.

    python -m benchmarks.ct_prompt_pass --slices 85                 # GPU
    python -m benchmarks.ct_prompt_pass --tiny --slices 12 --runs 1  # CPU smoke test
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch

import inference.prefill_attention as prefill_attention
from benchmarks.ct_gpu import ct_slice
from benchmarks.medgemma_4b import build_model, build_processor, chest_question, model_config
from inference.fast_buffers import prompt_cache

SIZES = {False: (896, 256), True: (64, 16)}  # (image side, image tokens): 4B, tiny


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(name: str, step: Callable[[], Any], runs: int, device: torch.device) -> Any:
    """Run ``step`` ``runs`` times; print each run's seconds; return the last result."""
    result = None
    for run in range(runs):
        synchronise(device)
        started = time.perf_counter()
        result = step()
        synchronise(device)
        print(f"{name:<40} run {run + 1}: {time.perf_counter() - started:7.3f} s", flush=True)
    return result


def prompt_inputs(processor: Any, slices: int, side: int) -> tuple[str, list[Any]]:
    images = [ct_slice(side, position) for position in range(slices)]
    content = [{"type": "image"}] * slices + [{"type": "text", "text": chest_question()}]
    message = [{"role": "user", "content": content}]
    text = processor.apply_chat_template(message, add_generation_prompt=True, tokenize=False)
    return text, images


def time_processor(
    processor: Any, text: str, images: list[Any], runs: int, device: torch.device
) -> dict[str, torch.Tensor]:
    def process(**extra: Any) -> Any:
        return processor(text=[text], images=[images], return_tensors="pt", padding=True, **extra)

    on_cpu = timed("image processor, CPU", process, runs, device)
    if getattr(processor.image_processor, "backend", None) == "torchvision":
        on_device = timed("image processor, device", lambda: process(device=device), runs, device)
        difference = (on_device["pixel_values"].cpu() - on_cpu["pixel_values"]).abs().max()
        print(f"{'largest pixel difference':<40} {float(difference):.3g}")
    inputs = {key: value.to(device) for key, value in on_cpu.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    return inputs


def prompt_pass(model: Any, inputs: dict[str, torch.Tensor]) -> Any:
    """The fast path's first forward (inference/fast_decode.py ``_prefill``)."""
    mask = inputs["attention_mask"]
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    cache = prompt_cache(model, mask.device)
    rest = {key: value for key, value in inputs.items() if key != "attention_mask"}
    return model(
        **rest, attention_mask=mask, position_ids=positions, past_key_values=cache,
        use_cache=True, logits_to_keep=1,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=85)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="small random model on the CPU")
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    side, tokens = SIZES[args.tiny]
    model = build_model(model_config(args.tiny, side, tokens), device)
    processor = build_processor(side, tokens)
    text, images = prompt_inputs(processor, args.slices, side)
    print(f"{args.slices} slices on {device}; attention {model.config._attn_implementation}")
    inputs = time_processor(processor, text, images, args.runs, device)
    print(f"{'prompt tokens':<40} {inputs['input_ids'].shape[1]}")
    with torch.inference_mode():
        pixels = inputs["pixel_values"]
        timed(
            "vision tower, every slice", lambda: model.get_image_features(pixels), args.runs, device
        )
        for rows in (2048, 1024):
            prefill_attention.CHUNK_ROWS = rows
            timed(
                f"prompt pass, chunks of {rows}",
                lambda: prompt_pass(model, inputs),
                args.runs,
                device,
            )
        prefill_attention.CHUNK_ROWS = 2048
        model.set_attn_implementation("sdpa")
        timed("prompt pass, stock sdpa", lambda: prompt_pass(model, inputs), args.runs, device)


if __name__ == "__main__":
    main()
