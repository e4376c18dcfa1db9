"""MedGemma-4B greedy generation on one GPU: the fast path beside plain ``generate``.

The real MedGemma-4B architecture (Gemma 3 4B text + SigLIP-400M vision, 896x896 input, 256
image tokens, 262,208-token vocabulary) is built with random weights directly on the GPU in
bf16 (benchmarks/medgemma_4b.py); real weights cannot be downloaded here, and speed and memory
do not depend on their values. The processor is the demo model's offline Gemma tokenizer with
the Gemma 3 image processor at 896 px. Each study is one 896x896 image plus the default chest
question, and every row generates exactly ``--new-tokens`` tokens (EOS suppressed, as
``min_new_tokens`` does).

All figures come from one run: the fast path (``inference.fast_decode``) for each batch size,
plain ``model.generate`` with its defaults for the same inputs, plain ``generate`` with
``cache_implementation="static"`` at the largest batch, token-for-token comparisons, a
float32 exactness check, and NF4 (bitsandbytes) at batch 1 when bitsandbytes imports.

    python -m benchmarks.inference_gpu --batches 1,8,32,64 --new-tokens 256 --json-out r.json
    python -m benchmarks.inference_gpu --tiny --batches 1,2 --new-tokens 8   # CPU smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import Gemma3Processor

from benchmarks.medgemma_4b import (
    CHEST_PROMPT_TOKENS,
    build_model,
    build_processor,
    chest_image,
    chest_question,
    model_config,
    quantize_nf4,
)
from inference.fast_decode import FastGreedyGenerator


@dataclass
class Case:
    """One measured configuration. Latency is inputs-on-device to tokens-on-host."""

    label: str
    batch: int
    new_tokens: int
    prompt_len: int
    latency_s: float
    prep_s: float = 0.0  # processor (CPU) + copy to the GPU, per batch
    prefill_s: float = 0.0  # vision + prompt pass + first token
    peak_gb: float = 0.0
    runs: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def e2e_s(self) -> float:
        return self.prep_s + self.latency_s

    @property
    def studies_per_hour(self) -> float:
        return self.batch * 3600.0 / self.latency_s

    @property
    def tok_s(self) -> float:
        """All new tokens over the whole latency (prefill included)."""
        return self.batch * self.new_tokens / self.latency_s

    @property
    def decode_tok_s(self) -> float:
        """Tokens after the first over the time after prefill; 0 where prefill was not timed."""
        if not self.prefill_s:
            return 0.0
        return self.batch * (self.new_tokens - 1) / (self.latency_s - self.prefill_s)

    def row(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            e2e_s=self.e2e_s,
            studies_per_hour=self.studies_per_hour,
            tok_s=self.tok_s,
            decode_tok_s=self.decode_tok_s,
        )
        return data


# --------------------------------------------------------------------------- inputs


class Inputs:
    """Processor output for a batch of studies, moved to the device."""

    def __init__(
        self,
        processor: Any,
        questions: list[str],
        image: Image.Image,
        model: Any,
        image_device: str | None = None,
    ) -> None:
        start = time.perf_counter()
        texts = [
            processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                add_generation_prompt=True,
                tokenize=False,
            )
            for q in questions
        ]
        extra = {"device": image_device} if image_device else {}
        batch = processor(
            text=texts,
            images=[[image] for _ in questions],
            return_tensors="pt",
            padding=True,
            **extra,
        )
        device, dtype = model.device, model.dtype
        self.tensors = {
            k: v.to(device, dtype) if v.is_floating_point() else v.to(device)
            for k, v in batch.items()
        }
        _sync()
        self.prep_s = time.perf_counter() - start
        self.batch, self.prompt_len = self.tensors["input_ids"].shape


# --------------------------------------------------------------------------- measurement


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


@contextmanager
def fresh_peak() -> Iterator[None]:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    yield


def timed(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    _sync()
    start = time.perf_counter()
    out = fn()
    _sync()
    return out, time.perf_counter() - start


def fast_case(
    label: str, gen: FastGreedyGenerator, inputs: Inputs, new_tokens: int, repeats: int
) -> tuple[Case, torch.Tensor]:
    """Median of ``repeats`` forced-length runs after one untimed run; prefill timed alone."""

    def run(n: int) -> torch.Tensor:
        return gen.generate(inputs.tensors, max_new_tokens=n, force_new_tokens=True)

    with fresh_peak():
        tokens = run(new_tokens)  # new batch shapes: cuDNN/cuBLAS choices, lazy graphs
        times = [timed(lambda: run(new_tokens))[1] for _ in range(repeats)]
        prefill = statistics.median(timed(lambda: run(1))[1] for _ in range(repeats))
        peak = _peak_gb()
    case = Case(
        label, inputs.batch, new_tokens, inputs.prompt_len, statistics.median(times),
        prep_s=inputs.prep_s, prefill_s=prefill, peak_gb=peak, runs=repeats,
        extra={"all_latencies_s": times},
    )  # fmt: skip
    return case, tokens


def plain_case(
    label: str, model: Any, inputs: Inputs, new_tokens: int, **generate_kwargs: Any
) -> tuple[Case, torch.Tensor]:
    """One plain ``generate`` run with forced length (its first call is the timed one)."""
    with fresh_peak():
        out, seconds = timed(
            lambda: model.generate(
                **inputs.tensors, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, **generate_kwargs,
            )
        )  # fmt: skip
        peak = _peak_gb()
    tokens = out[:, inputs.prompt_len :].cpu()
    case = Case(label, inputs.batch, new_tokens, inputs.prompt_len, seconds, peak_gb=peak)
    case.extra["prep_s"] = inputs.prep_s
    return case, tokens


def compare(fast: torch.Tensor, plain: torch.Tensor) -> dict[str, Any]:
    """Rows equal token for token; where not, the first differing position of each row."""
    width = min(fast.shape[1], plain.shape[1])
    same = fast[:, :width] == plain[:, :width]
    first = [int((~r).nonzero()[0]) if not bool(r.all()) else None for r in same]
    mismatched = [f for f in first if f is not None]
    return {
        "rows": len(first),
        "rows_identical": sum(f is None for f in first) if fast.shape == plain.shape else 0,
        "shapes": [list(fast.shape), list(plain.shape)],
        "first_mismatch_min": min(mismatched) if mismatched else None,
        "first_mismatch_median": statistics.median(mismatched) if mismatched else None,
        "first_mismatch": first,
    }


def profile(gen: FastGreedyGenerator, inputs: Inputs, new_tokens: int = 32) -> list[dict[str, Any]]:
    """Device time by kernel for one forced generation (prefill + decode replays)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with torch_profile(activities=activities) as prof:
        gen.generate(inputs.tensors, max_new_tokens=new_tokens, force_new_tokens=True)
        _sync()
    rows = []
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", 0) or 0
        if device_us > 0:
            rows.append(
                {"name": event.key[:90], "count": event.count, "device_ms": device_us / 1e3}
            )
    rows.sort(key=lambda r: -r["device_ms"])
    return rows[:25]


# --------------------------------------------------------------------------- checks


def mixed_prompt_check(
    model: Any, processor: Gemma3Processor, image: Image.Image, new_tokens: int, max_batch: int
) -> dict[str, Any]:
    """Different prompt lengths (left padding), EOS allowed: fast path against generate."""
    question = chest_question()
    questions = [question, "Any pneumothorax?", question[:100], question[:250]]
    inputs = Inputs(processor, questions, image, model)
    gen = FastGreedyGenerator(
        model, max_batch=max_batch, max_total_len=inputs.prompt_len + new_tokens + 64
    )
    fast = gen.generate(inputs.tensors, max_new_tokens=new_tokens)
    plain = model.generate(**inputs.tensors, max_new_tokens=new_tokens, do_sample=False)
    result = compare(fast, plain[:, inputs.prompt_len :].cpu())
    result["dtype"] = str(model.dtype)
    return result


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8,32,64", help="comma-separated batch sizes")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument(
        "--prompt-tokens", type=int, default=CHEST_PROMPT_TOKENS,
        help="question length in tokens (characters of the chest question)",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3, help="timed fast-path runs per case")
    parser.add_argument("--skip-reference", action="store_true", help="no plain generate runs")
    parser.add_argument("--reference-batches", default="", help="plain generate only for these")
    parser.add_argument("--skip-checks", action="store_true", help="no fp32 / mixed-prompt checks")
    parser.add_argument("--skip-nf4", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="small random model (CPU smoke test)")
    parser.add_argument("--profile", action="store_true", help="kernel time table per generator")
    parser.add_argument("--json-out", type=Path)
    return parser.parse_args(argv)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.image_size, mm_tokens = (64, 16) if args.tiny else (896, 256)
        self.batches = [int(b) for b in args.batches.split(",")]
        self.new_tokens = args.new_tokens
        self.processor = build_processor(self.image_size, mm_tokens)
        start = time.perf_counter()
        self.model: Any = build_model(
            model_config(args.tiny, self.image_size, mm_tokens), self.device
        )
        _sync()
        self.image = chest_image(self.image_size)
        self.results: dict[str, Any] = {
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "build_s": time.perf_counter() - start,
            "params": sum(p.numel() for p in self.model.parameters()),
            "cases": [],
            "comparisons": {},
            "profile": {},
            "errors": {},
        }

    def log(self, text: str) -> None:
        print(text, flush=True)

    def inputs(self, batch: int) -> Inputs:
        question = chest_question(self.args.prompt_tokens)
        return Inputs(self.processor, [question] * batch, self.image, self.model)

    def save(self) -> None:
        if self.args.json_out:
            text = json.dumps(self.results, indent=2, default=str) + "\n"
            self.args.json_out.write_text(text, encoding="utf-8")

    def add(self, case: Case) -> None:
        self.results["cases"].append(case.row())
        self.save()
        self.log(
            f"  {case.label:<22} b={case.batch:<3} {case.latency_s:8.3f} s  "
            f"prefill {case.prefill_s:6.3f} s  {case.studies_per_hour:10.0f} studies/h  "
            f"{case.tok_s:8.0f} tok/s  decode {case.decode_tok_s:8.0f} tok/s  "
            f"peak {case.peak_gb:6.2f} GB"
        )

    def generator(
        self, max_batch: int, prompt_len: int, total: int | None = None
    ) -> FastGreedyGenerator:
        """Sized for this request shape (or ``total`` columns) and warmed up (graphs captured)
        before timing."""
        start = time.perf_counter()
        total = total or prompt_len + self.new_tokens + 64
        gen = FastGreedyGenerator(self.model, max_batch=max_batch, max_total_len=total)
        gen.warm_up(prompt_len, self.new_tokens, sample_inputs=self.inputs(1).tensors)
        _sync()
        self.log(f"  warm-up (max_batch={max_batch}): {time.perf_counter() - start:.1f} s")
        return gen

    def run_fast(self) -> dict[int, torch.Tensor]:
        """Batch 1 on a generator sized for one study (a single-study node's memory);
        the other batches on one generator sized for the largest."""
        tokens: dict[int, torch.Tensor] = {}
        prompt_len = self.inputs(1).prompt_len
        if 1 in self.batches and not self.args.tiny:
            # The node's default sizing (ModelSettings.max_batch 8, room for 2,048 columns).
            gen = self.generator(8, prompt_len, total=2048)
            case, _ = fast_case("fast mb8/2048", gen, self.inputs(1), self.new_tokens, 2)
            self.add(case)
            del gen
        for max_batch, batches in self._generator_groups():
            gen = self.generator(max_batch, prompt_len)
            for batch in batches:
                case, tokens[batch] = fast_case(
                    "fast", gen, self.inputs(batch), self.new_tokens, self.args.repeats
                )
                self.add(case)
            if self.args.profile:
                self.results["profile"][f"b{max_batch}"] = profile(gen, self.inputs(max_batch))
            del gen
        return tokens

    def _generator_groups(self) -> list[tuple[int, list[int]]]:
        rest = [b for b in self.batches if b != 1]
        groups = [(1, [1])] if 1 in self.batches else []
        return groups + ([(max(rest), rest)] if rest else [])

    def run_reference(self, fast_tokens: dict[int, torch.Tensor]) -> None:
        wanted = self.args.reference_batches
        batches = [int(b) for b in wanted.split(",")] if wanted else self.batches
        for batch in batches:
            inputs = self.inputs(batch)
            case, tokens = plain_case("generate", self.model, inputs, self.new_tokens)
            self.add(case)
            if batch in fast_tokens:
                self.results["comparisons"][f"bf16_b{batch}"] = compare(fast_tokens[batch], tokens)
        # generate compiles the forward for a static cache on its first call; that call is
        # reported apart and the second one is the reference.
        largest, static = max(self.batches), {"cache_implementation": "static"}
        inputs = self.inputs(largest)
        first, _ = plain_case("generate static 1st", self.model, inputs, self.new_tokens, **static)
        self.add(first)
        case, _ = plain_case("generate static", self.model, inputs, self.new_tokens, **static)
        self.add(case)

    def run_preprocessing(self) -> None:
        """Processor time per batch with the image transforms on the CPU and on the GPU."""
        question = chest_question(self.args.prompt_tokens)
        timings: dict[str, float] = {}
        for batch in sorted({1, max(self.batches)}):
            for where in ("cpu", "cuda"):
                runs = [
                    Inputs(self.processor, [question] * batch, self.image, self.model, where)
                    for _ in range(4)
                ]
                timings[f"b{batch}_{where}_s"] = statistics.median(r.prep_s for r in runs[1:])
        self.results["preprocessing"] = timings
        self.log(f"  {json.dumps(timings)}")

    def run_checks(self) -> None:
        comparisons = self.results["comparisons"]
        comparisons["bf16_mixed_prompts"] = mixed_prompt_check(
            self.model, self.processor, self.image, 64, max_batch=4
        )
        self.model.float()
        comparisons["fp32_mixed_prompts"] = mixed_prompt_check(
            self.model, self.processor, self.image, 64, max_batch=4
        )
        self.model.to(torch.bfloat16)
        for key in ("bf16_mixed_prompts", "fp32_mixed_prompts"):
            self.log(f"  {key}: {json.dumps(comparisons[key])}")

    def run_nf4(self) -> None:
        try:
            quantize_nf4(self.model)
        except ImportError as exc:
            self.log(f"  NF4 skipped: {exc}")
            return
        prompt_len = self.inputs(1).prompt_len
        gen = self.generator(1, prompt_len)
        graphs = all(s.graph is not None for s in gen._states.values())
        case, _ = fast_case("fast NF4", gen, self.inputs(1), self.new_tokens, repeats=2)
        case.extra["cuda_graphs"] = graphs
        self.add(case)
        del gen
        short = min(32, self.new_tokens)
        case, _ = plain_case("generate NF4 (short)", self.model, self.inputs(1), short)
        case.extra["note"] = f"{short} tokens only"
        self.add(case)

    def section(self, name: str, fn: Callable[[], object]) -> None:
        """Run one part; a failure is recorded and the remaining parts still run."""
        self.log(f"{name}:")
        try:
            fn()
        except Exception as exc:  # each section is independent; report and go on
            self.results["errors"][name] = traceback.format_exc()
            self.log(f"  FAILED: {exc!r}\n{traceback.format_exc()}")
        self.save()

    def run(self) -> dict[str, Any]:
        self.log(f"device {self.results['device']}; build {self.results['build_s']:.1f} s")
        self.log("fast path:")
        fast_tokens = self.run_fast()  # without a working fast path nothing else is worth it
        if not self.args.skip_reference:
            self.section("plain generate (same run)", lambda: self.run_reference(fast_tokens))
            for key, value in self.results["comparisons"].items():
                self.log(f"  {key}: {json.dumps(value)}")
        if not self.args.skip_checks:
            self.section("exactness checks", self.run_checks)
        if self.device.type == "cuda":
            self.section("preprocessing", self.run_preprocessing)
        if not self.args.skip_nf4 and self.device.type == "cuda":
            self.section("NF4", self.run_nf4)
        return self.results


def print_table(results: dict[str, Any]) -> None:
    header = (
        f"{'case':<22}{'batch':>6}{'latency s':>11}{'e2e s':>8}{'prefill s':>10}"
        f"{'studies/h':>11}{'tok/s':>9}{'decode tok/s':>13}{'peak GB':>9}"
    )
    print("\n" + header)
    for c in results["cases"]:
        print(
            f"{c['label']:<22}{c['batch']:>6}{c['latency_s']:>11.3f}{c['e2e_s']:>8.3f}"
            f"{c['prefill_s']:>10.3f}{c['studies_per_hour']:>11.0f}{c['tok_s']:>9.0f}"
            f"{c['decode_tok_s']:>13.0f}"
            f"{c['peak_gb']:>9.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bench = Bench(args)
    try:
        results = bench.run()
    finally:
        bench.save()
    print_table(results)
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
