"""Where one CT study's end-to-end engine time goes, on one GPU: the profile behind
benchmarks/RESULTS.md's "CT and MR studies" latency figures.

The set-up of benchmarks/ct_gpu.py (random-weight MedGemma-4B written and loaded by
``TransformersEngine``, the fast path attached as at node start, one request as the worker
builds it for a CT study of ``--slices`` slices). After one warm-up request, ``--runs`` times:

* ``engine.prepare`` (processor and copy) and ``engine.generate_prepared``, each synchronised;
* inside the fast path, the prompt passes (vision tower + text) and the decode loop, each
  synchronised;

then a cProfile of one ``prepare`` (the top functions by cumulative time) and a
``torch.profiler`` table of one ``generate_prepared`` (the kernels by device time), for the CT
study and for one chest radiograph (``--compare-radiograph``).

    python -m benchmarks.ct_profile --slices 85                  # GPU
    python -m benchmarks.ct_profile --tiny --slices 3 --runs 1   # CPU smoke test
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from benchmarks.ct_gpu import StudyMaker, attach_as_at_start, ct_question
from benchmarks.engine_gpu import IMAGE_4B, IMAGE_TINY, load_engine
from inference.engine import GenerationRequest
from inference.transformers_engine import TransformersEngine

Timings = dict[str, list[float]]


def synchronise() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextmanager
def timed_methods(target: Any, names: list[str], timings: Timings) -> Iterator[None]:
    """Each of ``target``'s methods ``names`` synchronised and timed into ``timings``."""
    originals = {name: getattr(target, name) for name in names}

    def wrap(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            synchronise()
            started = time.perf_counter()
            result = method(*args, **kwargs)
            synchronise()
            timings.setdefault(name, []).append(time.perf_counter() - started)
            return result

        return timed

    for name, method in originals.items():
        setattr(target, name, wrap(name, method))
    try:
        yield
    finally:
        for name in names:
            delattr(target, name)  # the class's method again


def time_phases(
    engine: TransformersEngine, fast: Any, request: GenerationRequest, runs: int
) -> Timings:
    timings: Timings = {}
    inner = getattr(fast, "_prefill_passes", None) and fast
    names = ["_prefill_passes", "_decode"] if inner is not None else []
    with timed_methods(fast, names, timings) if names else _nothing():
        for _ in range(runs):
            synchronise()
            started = time.perf_counter()
            batch = engine.prepare([request])
            synchronise()
            timings.setdefault("prepare", []).append(time.perf_counter() - started)
            started = time.perf_counter()
            engine.generate_prepared(batch)
            synchronise()
            timings.setdefault("generate_prepared", []).append(time.perf_counter() - started)
    return timings


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def print_timings(title: str, timings: Timings) -> None:
    print(f"\n{title}")
    for name, values in timings.items():
        shown = ", ".join(f"{value:.3f}" for value in values)
        print(f"  {name:<20} median {statistics.median(values):7.3f} s   ({shown})")


def profile_prepare(engine: TransformersEngine, request: GenerationRequest) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    engine.prepare([request])
    synchronise()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(25)
    print("\nprepare, cProfile (cumulative):")
    print(out.getvalue())


def profile_kernels(engine: TransformersEngine, request: GenerationRequest, title: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    batch = engine.prepare([request])
    synchronise()
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, record_shapes=True) as prof:
        engine.generate_prepared(batch)
        synchronise()
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(f"\n{title}, torch.profiler (by {key}):")
    print(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=70))
    print(f"\n{title}, operators by input shape:")
    by_shape = prof.key_averages(group_by_input_shape=True)
    print(by_shape.table(sort_by=key, row_limit=25, max_name_column_width=40))


def time_attention_backends(slices: int, runs: int) -> None:
    """The vision tower's attention call (SigLIP at 896 px: 16 heads of 72 over 4,096 patches,
    no mask) for ``slices`` images, with each SDPA backend this torch has on this device."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (
        torch.randn(slices, 16, 4096, 72, device="cuda", dtype=torch.bfloat16) for _ in range(3)
    )
    print(f"\nvision attention, [{slices}, 16, 4096, 72] bf16, median of {runs}:")
    for backend in (
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
    ):
        seconds = []
        try:
            with sdpa_kernel([backend]):
                for _ in range(runs + 1):  # the first selects kernels
                    synchronise()
                    started = time.perf_counter()
                    torch.nn.functional.scaled_dot_product_attention(q, k, v)
                    synchronise()
                    seconds.append(time.perf_counter() - started)
        except RuntimeError as exc:
            print(f"  {backend.name:<22} unavailable: {str(exc).splitlines()[0]}")
            continue
        print(f"  {backend.name:<22} {statistics.median(seconds[1:]) * 1000:8.1f} ms")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=85)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--compare-radiograph", action="store_true")
    parser.add_argument("--attention-backends", action="store_true", help="GPU only")
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU")
    return parser.parse_args()


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    args = parse_args()
    side = IMAGE_TINY if args.tiny else IMAGE_4B
    if args.attention_backends:
        time_attention_backends(args.slices, args.runs)
    with tempfile.TemporaryDirectory(prefix="mg4b-ctp-") as directory:
        weights = Path(directory)
        engine, settings = load_engine(weights, args.tiny, args.max_batch, args.new_tokens)
        fast = attach_as_at_start(engine, settings)
        studies = StudyMaker(side, ct_question(settings), args.new_tokens)
        study = studies.ct(args.slices)
        radiograph = studies.radiographs(1)[0]
        print(f"{engine.identity.device}; torch {torch.__version__}; {args.slices} slices")
        engine.generate([study])  # one-off work: arena, graph capture, kernel selection
        timings = time_phases(engine, fast, study, args.runs)
        print_timings(f"CT study, {args.slices} slices", timings)
        if args.compare_radiograph:
            engine.generate([radiograph])
            timings = time_phases(engine, fast, radiograph, args.runs)
            print_timings("chest radiograph", timings)
        profile_prepare(engine, study)
        profile_kernels(engine, study, f"CT study, {args.slices} slices")
        if args.compare_radiograph:
            profile_kernels(engine, radiograph, "chest radiograph")


if __name__ == "__main__":
    main()
