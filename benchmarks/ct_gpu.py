"""CT/MR studies (one user turn with up to 85 images) through the node's engine path on one GPU.

The set-up of benchmarks/engine_gpu.py: the MedGemma-4B architecture with random weights is
written with its processor to a local directory, loaded by ``TransformersEngine``, and the fast
path attached and warmed up by ``inference.loader.attach_fast_path`` exactly as at node start
(``--max-batch`` 8, the node's default). Every request is what the inference worker builds for a
CT job: the slices as images, then the CT question the node's prompt library selects for
modality CT (config/prompts/ct.toml), ``GenerationSettings(max_new_tokens=model.max_new_tokens)``.
The slices are synthetic 896 px axial CT slices shown through the node's three windows as
colour channels (inference/preprocess.py), sampled evenly from an 85-slice volume as the node
samples a series. 256 image tokens a slice: 85 slices make a ~22,600-token prompt.

Sections, one table each (``--json-out`` writes them all, after each section):

1. Single study latency per slice count: ``engine.generate([study])``, median of ``--runs``,
   with the fast path as attached; beside it the same request once through plain
   ``model.generate`` (``engine.attach_fast_generator(None)``, then the node's generator again).
2. Token identity (``--check-slices``): the new token ids of the fast path's last run against
   plain generate's (greedy, from section 1's runs), up to each path's own stop token.
3. CT throughput: N studies of ``--ct-slices`` slices as one ``engine.generate`` call, median
   of ``--ct-runs`` (one run includes any one-off work for a new batch shape, e.g. a graph
   capture).
4. Mixed stream: ``--mix-studies`` requests in arrival order, ``--ct-share`` of them CT, the
   rest single-image chest radiographs (engine_gpu's requests), sent through ``engine.generate``
   in batches of ``--max-batch``: in arrival order whatever their kind, then one kind a batch
   as the job queue claims them (storage/jobs.py); beside a radiograph-only stream of the same
   count in the same run. Each row also gives when the median radiograph was done.

Long prompts decode in the fast path's long-prompt buffers, within ``model.long_prompt_kv_tokens``
KV columns (default: a quarter of the GPU's memory); ``--long-kv-tokens 0`` sends them to
``model.generate`` inside the fast path, as before those buffers existed. Only the engine's
public API is used. New tokens are not forced (the engine has no such option): the tables show
the counts generated (``new tok``).

    python -m benchmarks.ct_gpu --json-out ct.json                     # everything, defaults
    python -m benchmarks.ct_gpu --skip-reference --runs 3 --json-out ct.json
    python -m benchmarks.ct_gpu --tiny --slices 1,3 --check-slices 3 --ct-batches 1,2 \\
        --ct-slices 3 --mix-studies 10 --runs 1                        # CPU smoke test
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from PIL import Image

from benchmarks.engine_gpu import (
    IMAGE_4B,
    IMAGE_TINY,
    node_settings,
    requests_for,
    time_generate,
    write_weights,
)
from benchmarks.medgemma_4b import CHEST_PROMPT_TOKENS, chest_question
from config.settings import NodeSettings
from inference.decode_joins import RowSource
from inference.engine import GenerationRequest, GenerationSettings, OutOfMemory
from inference.loader import attach_fast_path, long_prompt_kv_tokens
from inference.preprocess import CT_WINDOWS_HU, MAX_CT_SLICES, sample_evenly
from inference.prompts import PromptLibrary
from inference.transformers_engine import FastGenerator, TransformersEngine

Row = dict[str, Any]


# --------------------------------------------------------------------------- studies


@cache
def ct_slice(side: int, position: int) -> Image.Image:
    """Axial slice ``position`` of an 85-slice synthetic CT volume (body, lungs, spine and
    noise in HU), each of the node's three windows one colour channel."""
    rng = np.random.default_rng(position)
    z = position / (MAX_CT_SLICES - 1)
    yy, xx = np.mgrid[-1 : 1 : side * 1j, -1 : 1 : side * 1j]
    hounsfield = np.full((side, side), -1000.0)
    hounsfield[(xx / 0.85) ** 2 + (yy / 0.6) ** 2 < 1] = 40.0  # soft tissue
    lung = 0.25 + 0.1 * np.sin(np.pi * z)
    for centre in (-0.4, 0.4):
        hounsfield[((xx - centre) / lung) ** 2 + (yy / (1.6 * lung)) ** 2 < 1] = -850.0
    hounsfield[(xx / 0.08) ** 2 + ((yy - 0.4) / 0.08) ** 2 < 1] = 700.0  # vertebra
    hounsfield += 25.0 * rng.standard_normal((side, side))
    channels = [
        np.clip((hounsfield - low) * (255.0 / (high - low)), 0, 255) for low, high in CT_WINDOWS_HU
    ]
    return Image.fromarray(np.rint(np.stack(channels, axis=-1)).astype(np.uint8))


def ct_question(settings: NodeSettings) -> str:
    """The question the worker asks of a CT study (the template the prompt library selects),
    cut to the length Gemma's tokenizer gives it: the demo tokenizer has one token per
    character, so the text keeps the share of characters ``chest_question`` keeps."""
    model = settings.model
    text = PromptLibrary.load(model.prompts_dir).select("CT", language=model.language).text
    chest_chars = len(chest_question(tokens=sys.maxsize))
    return text[: round(len(text) * CHEST_PROMPT_TOKENS / chest_chars)]


@dataclass(frozen=True)
class StudyMaker:
    """Requests as the inference worker builds them (inference/worker.py ``_request``)."""

    side: int
    question: str
    new_tokens: int

    def ct(self, slices: int, study: int = 0) -> GenerationRequest:
        """``slices`` slices spread evenly over the volume; study k starts k slices further
        round it, so the studies of a batch differ."""
        positions = sample_evenly(MAX_CT_SLICES, slices)
        return GenerationRequest(
            images=[ct_slice(self.side, (p + study) % MAX_CT_SLICES) for p in positions],
            prompt=self.question,
            settings=GenerationSettings(max_new_tokens=self.new_tokens),
        )

    def radiographs(self, count: int) -> list[GenerationRequest]:
        return requests_for(count, self.new_tokens, self.side)

    def mixed(self, count: int, ct_share: float, slices: int) -> list[GenerationRequest]:
        """``count`` requests in arrival order; the CT studies spread evenly among them."""
        requests = self.radiographs(count)
        ct_count = round(count * ct_share)
        for k in range(ct_count):
            requests[int((k + 0.5) * count / ct_count)] = self.ct(slices, study=k)
        return requests


# --------------------------------------------------------------------------- recording


@dataclass
class LastDecode:
    """The new ids of the last decode the engine ran, [batch, <= max_new_tokens] (CPU)."""

    ids: torch.Tensor | None = None


class RecordingGenerator:
    """The generator attach_fast_path attached, keeping the ids it hands the engine."""

    def __init__(self, inner: FastGenerator, last: LastDecode) -> None:
        self.inner = inner
        self.last = last

    def generate(
        self,
        inputs: Mapping[str, torch.Tensor],
        max_new_tokens: int,
        *,
        between_steps: Callable[[], None] | None = None,
        joins: RowSource | None = None,
    ) -> torch.Tensor:
        ids = self.inner.generate(inputs, max_new_tokens, between_steps=between_steps, joins=joins)
        self.last.ids = ids.cpu()
        return ids


def attach_as_at_start(engine: TransformersEngine, settings: NodeSettings) -> FastGenerator | None:
    """``attach_fast_path`` as at node start; returns the generator it attached (None: none)."""
    attached: list[FastGenerator | None] = []
    attach = engine.attach_fast_generator

    def keep(generator: FastGenerator | None, priority: FastGenerator | None = None) -> None:
        attached.append(generator)
        attach(generator, priority)

    engine.attach_fast_generator = keep  # type: ignore[method-assign]
    try:
        attach_fast_path(engine, settings)
    finally:
        del engine.attach_fast_generator  # the class's method again
    return attached[-1] if attached else None


@contextmanager
def plain_generate(
    engine: TransformersEngine, fast: FastGenerator | None, last: LastDecode
) -> Iterator[None]:
    """The engine without its fast path (plain ``model.generate``, as engine_gpu's reference),
    model.generate's new ids recorded; the node's generator attached again afterwards."""
    model = engine.model
    original = model.generate

    def recorded(*args: Any, **kwargs: Any) -> Any:
        sequences = original(*args, **kwargs)
        last.ids = sequences[:, kwargs["input_ids"].shape[1] :].cpu()
        return sequences

    engine.attach_fast_generator(None)
    model.generate = recorded
    try:
        yield
    finally:
        del model.generate  # the class's method again
        if fast is not None:
            engine.attach_fast_generator(RecordingGenerator(fast, last))


# --------------------------------------------------------------------------- sections


def compare_tokens(fast: Row, plain: Row) -> Row:
    """Each path's ids up to its own stop token (``new_tokens`` counts it), first difference."""
    a = fast["ids"][: fast["new_tokens_max"]]
    b = plain["ids"][: plain["new_tokens_max"]]
    first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
    if first is None and len(a) != len(b):
        first = min(len(a), len(b))
    return {
        "slices": fast["slices"],
        "identical": first is None,
        "first_difference": first,
        "fast_new_tokens": len(a),
        "plain_new_tokens": len(b),
        "same_text": fast["texts"] == plain["texts"],
    }


def run_single(
    engine: TransformersEngine,
    fast: FastGenerator | None,
    last: LastDecode,
    studies: StudyMaker,
    args: argparse.Namespace,
) -> tuple[list[Row], list[Row]]:
    """Section 1 (latency, fast and plain) and section 2 (token identity) per slice count."""
    check = set(args.check_slices)
    reference = check | (set() if args.skip_reference else set(args.slices))
    rows, identity = [], []
    for slices in sorted(set(args.slices) | check):
        request = studies.ct(slices)
        row: Row = {"slices": slices, "fast": time_generate(engine, [request], args.runs)}
        row["fast"]["ids"] = ids_of(last)
        if slices in reference:
            with plain_generate(engine, fast, last):
                row["plain"] = time_generate(engine, [request], runs=1)
            row["plain"]["ids"] = ids_of(last)
            if slices in check and fast is not None:
                identity.append(compare_tokens({**row["fast"], "slices": slices}, row["plain"]))
        rows.append(row)
    return rows, identity


def ids_of(last: LastDecode) -> list[int]:
    """Row 0 of the last decode (single-study runs)."""
    ids = last.ids
    last.ids = None
    return [] if ids is None else [int(i) for i in ids[0].tolist()]


def run_throughput(
    engine: TransformersEngine, studies: StudyMaker, args: argparse.Namespace
) -> list[Row]:
    """Section 3: N CT studies as one engine.generate call."""
    rows = []
    for batch in args.ct_batches:
        requests = [studies.ct(args.ct_slices, study=k) for k in range(batch)]
        try:
            row = time_generate(engine, requests, args.ct_runs)
        except OutOfMemory as exc:
            row = {"batch": batch, "error": str(exc)}
        rows.append({"slices": args.ct_slices, **row})
    return rows


def arrival_batches(
    requests: list[GenerationRequest], max_batch: int
) -> list[list[GenerationRequest]]:
    """``max_batch`` at a time in arrival order, whatever their kind."""
    return [requests[start : start + max_batch] for start in range(0, len(requests), max_batch)]


def batches_by_kind(
    requests: list[GenerationRequest], max_batch: int, ct_prompt: str
) -> list[list[GenerationRequest]]:
    """The batches the job queue claims (storage/jobs.py ``claim_jobs``): the oldest waiting
    study's kind, CT or not, and up to ``max_batch`` waiting studies of that kind in order."""
    waiting = list(requests)
    batches = []
    while waiting:
        is_ct = waiting[0].prompt == ct_prompt
        batch = [r for r in waiting if (r.prompt == ct_prompt) == is_ct][:max_batch]
        taken = {id(r) for r in batch}
        waiting = [r for r in waiting if id(r) not in taken]
        batches.append(batch)
    return batches


def time_stream(
    engine: TransformersEngine,
    batches: list[list[GenerationRequest]],
    label: str,
    ct_prompt: str,
) -> Row:
    """Each batch one engine.generate, in order; a request asking ``ct_prompt`` is a CT study.
    A radiograph is done when its batch is: the median of those times is its wait."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    ct_batch_s: list[float] = []
    other_batch_s: list[float] = []
    radiograph_done_s: list[float] = []
    started = time.perf_counter()
    for batch in batches:
        batch_started = time.perf_counter()
        engine.generate(batch)
        now = time.perf_counter()
        has_ct = any(r.prompt == ct_prompt for r in batch)
        (ct_batch_s if has_ct else other_batch_s).append(now - batch_started)
        radiograph_done_s += [now - started] * sum(r.prompt != ct_prompt for r in batch)
    seconds = time.perf_counter() - started
    requests = [r for batch in batches for r in batch]
    ct_count = sum(r.prompt == ct_prompt for r in requests)
    radiographs = len(requests) - ct_count
    return {
        "stream": label,
        "studies": len(requests),
        "ct": ct_count,
        "radiographs": radiographs,
        "seconds": seconds,
        "radiographs_per_hour": radiographs * 3600 / seconds,
        "studies_per_hour": len(requests) * 3600 / seconds,
        "radiograph_done_median_s": statistics.median(radiograph_done_s),
        "batches_with_ct": len(ct_batch_s),
        "batch_s_with_ct": statistics.median(ct_batch_s) if ct_batch_s else None,
        "batch_s_without_ct": statistics.median(other_batch_s) if other_batch_s else None,
    }


def run_mixed(
    engine: TransformersEngine, studies: StudyMaker, args: argparse.Namespace
) -> list[Row]:
    """Section 4: the mixed stream in arrival-order batches, then as the job queue batches it
    (one kind a batch), then the radiograph-only stream of the same count."""
    count, size, question = args.mix_studies, args.max_batch, studies.question
    mixed = studies.mixed(count, args.ct_share, args.ct_slices)
    label = f"{args.ct_share:.0%} CT, {args.ct_slices} slices"
    streams = (
        (arrival_batches(mixed, size), f"mixed ({label}), arrival order"),
        (batches_by_kind(mixed, size, question), f"mixed ({label}), one kind a batch"),
        (arrival_batches(studies.radiographs(count), size), "radiographs only"),
    )
    rows = []
    for batches, name in streams:
        try:
            rows.append(time_stream(engine, batches, name, question))
        except OutOfMemory as exc:
            rows.append({"stream": name, "error": str(exc)})
    return rows


# --------------------------------------------------------------------------- output


def cell(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.{digits}f}" if value < 100 else f"{value:,.0f}"
    return str(value)


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    print(f"\n{title}")
    texts = [[cell(v) for v in row] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in texts)]) for i, c in enumerate(columns)]
    print("  ".join(f"{c:>{w}s}" for c, w in zip(columns, widths, strict=True)))
    for row in texts:
        print("  ".join(f"{v:>{w}s}" for v, w in zip(row, widths, strict=True)))


def tokens(row: Row) -> str:
    return f"{row['new_tokens_min']}-{row['new_tokens_max']}"


def print_single(rows: list[Row], identity: list[Row]) -> None:
    table = []
    for row in rows:
        fast, plain = row["fast"], row.get("plain")
        speedup = plain["latency_s"] / fast["latency_s"] if plain else None
        table.append(
            [row["slices"], fast["prompt_tokens"], tokens(fast), fast["latency_s"],
             fast["prepare_s"], fast["peak_gb"], plain and plain["latency_s"],
             plain and tokens(plain), plain and plain["peak_gb"], speedup]
        )  # fmt: skip
    columns = ["slices", "prompt tok", "new tok", "fast s", "prepare s", "fast GB",
               "plain s", "plain tok", "plain GB", "plain/fast"]  # fmt: skip
    print_table("1. single CT study, engine.generate (fast: median; plain: once)", columns, table)
    print_table(
        "2. token identity, fast path vs plain generate (greedy)",
        ["slices", "identical", "first diff", "fast tok", "plain tok", "same text"],
        [[r["slices"], r["identical"], r["first_difference"], r["fast_new_tokens"],
          r["plain_new_tokens"], r["same_text"]] for r in identity],
    )  # fmt: skip


def print_throughput(rows: list[Row]) -> None:
    table = [
        [r["batch"], r["slices"], "out of memory", "-", "-", "-", "-", "-"]
        if "error" in r
        else [r["batch"], r["slices"], r["latency_s"], r["prepare_s"], r["studies_per_hour"],
              r["tokens_per_s"], tokens(r), r["peak_gb"]]
        for r in rows
    ]  # fmt: skip
    columns = ["studies", "slices", "latency s", "prepare s", "studies/h", "tok/s", "new tok",
               "peak GB"]  # fmt: skip
    print_table("3. CT throughput, N studies as one engine.generate call", columns, table)


def print_mixed(rows: list[Row], max_batch: int) -> None:
    columns = ["stream", "studies", "CT", "radiographs", "seconds", "radiographs/h",
               "studies/h", "radiograph done s", "CT batches", "s/batch CT",
               "s/batch no CT"]  # fmt: skip
    table = [
        [r["stream"], "out of memory", *["-"] * 9]
        if "error" in r
        else [r["stream"], r["studies"], r["ct"], r["radiographs"], r["seconds"],
              r["radiographs_per_hour"], r["studies_per_hour"], r["radiograph_done_median_s"],
              r["batches_with_ct"], r["batch_s_with_ct"], r["batch_s_without_ct"]]
        for r in rows
    ]  # fmt: skip
    print_table(f"4. a stream of studies, batches of {max_batch} (radiograph done: median s from "
                "the stream's start)", columns, table)  # fmt: skip


def without_texts(value: Any) -> Any:
    """The results for JSON: no decoded texts nor token ids (long, and random here)."""
    if isinstance(value, dict):
        return {k: without_texts(v) for k, v in value.items() if k not in ("texts", "ids")}
    if isinstance(value, list):
        return [without_texts(v) for v in value]
    return value


def write_json(path: Path | None, results: Row) -> None:
    if path is not None:
        path.write_text(json.dumps(without_texts(results), indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- main


def counts(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slices", type=counts, default=[1, 10, 40, 85])
    parser.add_argument("--runs", type=int, default=3, help="section 1: median of this many")
    parser.add_argument("--skip-reference", action="store_true", help="plain only for checks")
    parser.add_argument("--check-slices", type=counts, default=[10, 85])
    parser.add_argument("--ct-batches", type=counts, default=[1, 2, 4, 8])
    parser.add_argument("--ct-slices", type=int, default=MAX_CT_SLICES)
    parser.add_argument("--ct-runs", type=int, default=1, help="section 3: median of this many")
    parser.add_argument("--mix-studies", type=int, default=64)
    parser.add_argument("--ct-share", type=float, default=0.1)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--long-kv-tokens", type=int, help="model.long_prompt_kv_tokens")
    parser.add_argument("--new-tokens", type=int, help="default 256 (--tiny: 32)")
    parser.add_argument("--tiny", action="store_true", help="CPU-sized model (smoke test)")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    if args.new_tokens is None:
        args.new_tokens = 32 if args.tiny else 256
    every = [*args.slices, *args.check_slices, args.ct_slices]
    if not all(1 <= s <= MAX_CT_SLICES for s in every):
        parser.error(f"slice counts are 1 to {MAX_CT_SLICES} (the node sends at most that)")
    if max(args.ct_batches, default=0) > args.max_batch:
        parser.error("--ct-batches above --max-batch: the worker never sends such a batch")
    return args


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    args = parse_args()
    side = IMAGE_TINY if args.tiny else IMAGE_4B
    with tempfile.TemporaryDirectory(prefix="mg4b-ct-") as directory:
        weights = Path(directory)
        write_s = write_weights(weights, args.tiny)
        settings = node_settings(weights, args.max_batch, args.new_tokens)
        settings.model = settings.model.model_copy(
            update={"long_prompt_kv_tokens": args.long_kv_tokens}
        )
        engine = TransformersEngine(settings.model)
        engine.wants_fast_path = engine.wants_fast_path or args.tiny
        started = time.perf_counter()
        fast = attach_as_at_start(engine, settings)
        last = LastDecode()
        if fast is not None:
            engine.attach_fast_generator(RecordingGenerator(fast, last))
        results: Row = {
            "device": engine.identity.device,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "fast_path_attached": fast is not None,
            "long_prompt_kv_tokens": long_prompt_kv_tokens(engine, args.long_kv_tokens),
        }
        print(
            f"{results['device']}; torch {results['torch']}, transformers "
            f"{results['transformers']}; {results['date']}\nweights written in {write_s:.1f} s; "
            f"fast path {'attached' if fast else 'NOT attached'} in "
            f"{time.perf_counter() - started:.1f} s (max_batch {args.max_batch}, long-prompt KV "
            f"columns {results['long_prompt_kv_tokens']:,}); "
            f"{args.new_tokens} new tokens a study at most"
        )
        studies = StudyMaker(side, ct_question(settings), args.new_tokens)
        started = time.perf_counter()
        results["single"], results["identity"] = run_single(engine, fast, last, studies, args)
        print_single(results["single"], results["identity"])
        started = section_done(results, "single", started, args.json_out)
        results["throughput"] = run_throughput(engine, studies, args)
        print_throughput(results["throughput"])
        results["long_kv_mb"] = long_kv_mb(fast)
        started = section_done(results, "throughput", started, args.json_out)
        results["mixed"] = run_mixed(engine, studies, args)
        print_mixed(results["mixed"], args.max_batch)
        section_done(results, "mixed", started, args.json_out)


def long_kv_mb(fast: FastGenerator | None) -> float:
    """MB the fast path's long-prompt KV buffers take now (printed): the widest CT batch so
    far, its local layers keeping only their window (MedGemma-4B: 625 MB an 85-slice row)."""
    mb = getattr(fast, "long_kv_bytes", 0) / 1e6
    print(f"long-prompt KV buffers: {mb:,.1f} MB")
    return float(mb)


def section_done(results: Row, name: str, started: float, json_out: Path | None) -> float:
    """Say how long the section took and write what there is so far; the next one's start."""
    now = time.perf_counter()
    results[f"{name}_section_s"] = now - started
    print(f"(section took {now - started:.1f} s)")
    write_json(json_out, results)
    return now


if __name__ == "__main__":
    main()
