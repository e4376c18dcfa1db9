"""The decode step's matrix products, ``x @ W.T`` for 1 to 8 rows, by a Triton kernel or by
cuBLAS (``F.linear``), whichever was measured faster for the shape on this GPU.

Why: at batch 1 a decode step reads every weight once and the time goes to reading them
(~7.75 GB a step for MedGemma-4B in bf16, ~1.6 ms at an H200's 4.8 TB/s). Inside a CUDA graph
cuBLAS reads the 52 MB MLP matrices at ~3.5 TB/s and the 5-20 MB attention ones at 2-3 TB/s
(benchmarks/decode_gemv.py).

What: ``gemv`` streams ``W`` [N, K] (row-major) in blocks of ``block_n`` rows, one program a
block, so that every SM streams a share of the weight; with ``split_k`` > 1 each block's K is
cut into slices too (for matrices with few rows, such as o and down: 2,560), and a second
kernel sums the slices' float32 partials in a fixed order. Two inner loops: for one row, the
weight tile times x on the CUDA cores, summed over K once at the end (``dot=False``); for up to
8 rows, x padded to 16 rows and ``tl.dot`` on the tensor cores (``dot=True``).

Choice: ``GemvPicker`` times ``F.linear`` and each applicable ``GemvConfig`` per (rows, N, K,
dtype, device) — once a process; generators share the choices — in a CUDA graph, as
benchmarks/decode_gemv.py does, with copies of the weight taking turns so that every product
reads device memory as in the step (the step reads ~7.75 GB between two uses of a weight; one
matrix repeated would be served from L2). It does so the first time a shape is multiplied
outside a graph capture: ``FastGreedyGenerator`` runs its step twice before capturing it, so
the choice is made before the capture; a shape first met during a capture stays ``F.linear``.
Only bf16 and fp16 weights are timed; everything else, the CPU, or no Triton: ``F.linear``.

Numerics: both accumulate in float32 and round the output once to the weight dtype, but in
another order (by K block, then across programs or slices) than cuBLAS, so a bf16 output may
round the other way, as with the fused q/k/v product (inference/fused_qkv.py); greedy tokens
can then part from plain ``generate`` where two logits tie within rounding.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

HAS_TRITON = importlib.util.find_spec("triton") is not None
MAX_ROWS = 8  # more rows are a matrix product cuBLAS is made for
_DOT_ROWS = 16  # tl.dot's smallest tile: x is padded to it
_SUM_BLOCK = 1024
# Triton must beat cuBLAS by this much: timing noise should not trade cuBLAS's rounding away.
_MARGIN = 0.98

Product = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class GemvConfig:
    """One launch of ``gemv_kernel``: the weight tile, K slices, warps and pipeline stages."""

    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 1
    dot: bool = False  # tensor cores (rows padded to 16), else CUDA cores for one row

    @property
    def name(self) -> str:
        kind = "dot" if self.dot else "fma"
        return (
            f"{kind} n{self.block_n} k{self.block_k} s{self.split_k} "
            f"w{self.num_warps} p{self.num_stages}"
        )

    def applies(self, rows: int) -> bool:
        return rows <= MAX_ROWS and (self.dot or rows == 1)


# The fastest configs of benchmarks/decode_gemv.py --sweep (276 configs) for the step's products
# on an H200, one row: q+k+v n8 k512 w8; o and down n2 k1024 (1,280 programs for their 2,560
# rows: a block of 8 rows left SMs short of loads in flight); gate+up n8 k256; lm_head n8 k512
# p3 and n16 k256. The tensor-core ones serve 2 to 8 rows.
CONFIGS = (
    GemvConfig(block_n=2, block_k=1024),
    GemvConfig(block_n=4, block_k=2048, num_stages=3),
    GemvConfig(block_n=4, block_k=512),
    GemvConfig(block_n=8, block_k=256),
    GemvConfig(block_n=8, block_k=512),
    GemvConfig(block_n=8, block_k=512, num_stages=3),
    GemvConfig(block_n=8, block_k=512, num_warps=8),
    GemvConfig(block_n=16, block_k=256),
    GemvConfig(block_n=8, block_k=512, split_k=4),
    GemvConfig(block_n=16, block_k=256, num_stages=4, dot=True),
    GemvConfig(block_n=32, block_k=128, num_stages=4, dot=True),
    GemvConfig(block_n=32, block_k=128, num_stages=3, dot=True),
    GemvConfig(block_n=64, block_k=128, num_stages=3, dot=True),
    GemvConfig(block_n=16, block_k=256, split_k=4, num_stages=4, dot=True),
)

if HAS_TRITON:
    import triton
    import triton.language as tl

    if os.environ.get("TRITON_INTERPRET") == "1":
        # Triton's CPU interpreter multiplies bf16 tiles wrongly (3.8: as integers); float32
        # gives the tensor cores' result (bf16 products are exact in float32).
        @triton.jit
        def _dot_t(x, w, acc, PREC: tl.constexpr):  # type: ignore[no-untyped-def]
            return tl.dot(x.to(tl.float32), tl.trans(w).to(tl.float32), acc, input_precision="ieee")

    else:

        @triton.jit
        def _dot_t(x, w, acc, PREC: tl.constexpr):  # type: ignore[no-untyped-def]
            return tl.dot(x, tl.trans(w), acc, input_precision=PREC)

    @triton.jit
    def gemv_kernel(  # type: ignore[no-untyped-def]
        x_ptr, w_ptr, out_ptr, rows, N, K, k_span,
        ROWS_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr,
        PREC: tl.constexpr,
    ):  # fmt: skip
        """out[slice, r, n] = sum over this program's K slice of x[r, k] * w[n, k]."""
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k_start = tl.program_id(1) * k_span
        k_end = tl.minimum(K, k_start + k_span)
        kb = tl.arange(0, BLOCK_K)
        r = tl.arange(0, ROWS_P)
        n_in = n < N
        r_in = r < rows
        w_rows = w_ptr + n.to(tl.int64)[:, None] * K
        if DOT:
            acc = tl.zeros((ROWS_P, BLOCK_N), dtype=tl.float32)
            for k0 in range(k_start, k_end, BLOCK_K):
                k = k0 + kb
                w = tl.load(w_rows + k[None, :], mask=n_in[:, None] & (k < K)[None, :], other=0.0)
                x = tl.load(
                    x_ptr + r[:, None] * K + k[None, :],
                    mask=r_in[:, None] & (k < K)[None, :], other=0.0,
                )  # fmt: skip
                acc = _dot_t(x, w, acc, PREC)
            y = acc
        else:
            # One row: products kept per K lane, one reduction at the end (none in the loop).
            lanes = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            for k0 in range(k_start, k_end, BLOCK_K):
                k = k0 + kb
                w = tl.load(w_rows + k[None, :], mask=n_in[:, None] & (k < K)[None, :], other=0.0)
                x = tl.load(x_ptr + k, mask=k < K, other=0.0)
                lanes += w.to(tl.float32) * x.to(tl.float32)[None, :]
            y = tl.sum(lanes, 1)[None, :]
        out = out_ptr + tl.program_id(1) * rows * N + r[:, None] * N + n[None, :]
        tl.store(out, y.to(out_ptr.dtype.element_ty), mask=r_in[:, None] & n_in[None, :])

    @triton.jit
    def split_sum_kernel(part_ptr, out_ptr, count, SPLIT: tl.constexpr, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
        """out = the sum of the SPLIT partials, in slice order, rounded once."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < count
        acc = tl.load(part_ptr + offs, mask=inside, other=0.0)
        for s in tl.static_range(1, SPLIT):
            acc += tl.load(part_ptr + s * count + offs, mask=inside, other=0.0)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=inside)


def gemv(x: torch.Tensor, weight: torch.Tensor, config: GemvConfig) -> torch.Tensor:
    """``F.linear(x, weight)`` by ``gemv_kernel``: ``weight`` [N, K] row-major, ``x`` [..., K]
    of at most 8 rows (one for ``dot=False``) in the weight's dtype."""
    n, k = weight.shape
    x2 = x.reshape(-1, k).contiguous()
    rows = x2.shape[0]
    if not config.applies(rows) or not weight.is_contiguous() or x.dtype != weight.dtype:
        raise ValueError(f"{config.name} cannot multiply {tuple(x.shape)} by {tuple(weight.shape)}")
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    blocks_k = triton.cdiv(k, config.block_k)
    k_span = triton.cdiv(blocks_k, min(config.split_k, blocks_k)) * config.block_k
    split = triton.cdiv(k, k_span)  # no empty slice
    target = out
    if split > 1:
        target = torch.empty(split, rows, n, dtype=torch.float32, device=x.device)
    gemv_kernel[(triton.cdiv(n, config.block_n), split)](
        x2, weight, target, rows, n, k, k_span,
        ROWS_P=_DOT_ROWS if config.dot else 1, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        DOT=config.dot, PREC="ieee" if x.dtype == torch.float32 else None,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    if split > 1:
        count = rows * n
        split_sum_kernel[(triton.cdiv(count, _SUM_BLOCK),)](
            target, out, count, SPLIT=split, BLOCK=_SUM_BLOCK
        )
    return out


def _gemv_as(config: GemvConfig, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return gemv(x, weight, config)


def product_us(
    product: Product, x: torch.Tensor, weights: Sequence[torch.Tensor], repeat: int, runs: int
) -> float:
    """Microseconds a product: ``repeat`` products (``weights`` in turn) captured in one CUDA
    graph, the median of ``runs`` replays over ``repeat``."""
    current = torch.cuda.current_stream()
    stream = torch.cuda.Stream()
    stream.wait_stream(current)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        product(x, weights[0])  # compiles, and cuBLAS picks its kernel, outside the capture
        stream.synchronize()
        # Not ``torch.cuda.graph``: it empties the allocator's cache before every capture.
        graph.capture_begin(capture_error_mode="thread_local")
        try:
            for i in range(repeat):
                product(x, weights[i % len(weights)])
        finally:
            graph.capture_end()
    current.wait_stream(stream)
    seconds = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        seconds.append(start.elapsed_time(end) / 1000)
    return statistics.median(seconds) / repeat * 1e6


def cold_copies(weight: torch.Tensor) -> list[torch.Tensor]:
    """``weight`` and copies of it, together twice the L2 cache: read in turn, each product
    reads device memory, as in a decode step."""
    properties = torch.cuda.get_device_properties(weight.device)
    l2 = int(getattr(properties, "L2_cache_size", 0) or 50 * 2**20)
    bytes_ = weight.numel() * weight.element_size()
    return [weight] + [weight.clone() for _ in range(math.ceil(2 * l2 / bytes_) - 1)]


@torch.no_grad()
def measure(
    rows: int,
    weight: torch.Tensor,
    configs: Sequence[GemvConfig] = CONFIGS,
    *,
    runs: int = 5,
    every_split: bool = False,
) -> dict[GemvConfig | None, float]:
    """µs a product of ``rows`` rows by ``weight`` (cold L2): ``F.linear`` under None, then each
    config of ``configs`` that applies and runs here (one that fails to compile is left out);
    ``every_split``: K-split configs also where N's blocks alone fill the GPU."""
    n, k = weight.shape
    weights = cold_copies(weight)
    bytes_ = weight.numel() * weight.element_size()
    # Replays of at least ~1 GB read, so the replay's own start-up is a small share of it.
    repeat = max(4, len(weights), min(100, math.ceil(1e9 / bytes_)))
    x = torch.randn(rows, 1, k, device=weight.device).to(weight.dtype)
    sms = torch.cuda.get_device_properties(weight.device).multi_processor_count
    times: dict[GemvConfig | None, float] = {None: product_us(F.linear, x, weights, repeat, runs)}
    for config in configs:
        # Splitting K only pays where the blocks of N alone leave SMs idle.
        many_blocks = math.ceil(n / config.block_n) >= 2 * sms
        if not config.applies(rows) or (config.split_k > 1 and many_blocks and not every_split):
            continue
        try:
            times[config] = product_us(
                functools.partial(_gemv_as, config), x, weights, repeat, runs
            )
        except Exception as exc:  # a config this GPU cannot run (shared memory, registers)
            log.warning("GEMV %s skipped for %dx%d: %s", config.name, n, k, exc)
    return times


def fastest(times: dict[GemvConfig | None, float]) -> GemvConfig | None:
    """The fastest config of ``measure``'s times, or None (``F.linear``) unless one beats it
    by the margin."""
    triton_times = {c: t for c, t in times.items() if c is not None}
    if not triton_times:
        return None
    best = min(triton_times, key=triton_times.__getitem__)
    return best if triton_times[best] < _MARGIN * times[None] else None


_Key = tuple[int, int, int, torch.dtype, torch.device]
_SHARED_CHOICES: dict[_Key, GemvConfig | None] = {}


class GemvPicker:
    """The decode step's ``linear(x, weight)``: the kernel measured fastest for the shape.

    ``enabled`` False: always ``F.linear``. ``forced``: that config for every product it
    applies to, untimed and on any device (tests, Triton's CPU interpreter). ``choices``: where
    choices are kept (by default one table for the process)."""

    def __init__(
        self,
        enabled: bool,
        *,
        forced: GemvConfig | None = None,
        choices: dict[_Key, GemvConfig | None] | None = None,
    ) -> None:
        self.enabled = enabled and HAS_TRITON
        self.forced = forced
        self.choices = _SHARED_CHOICES if choices is None else choices

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        config = self.choice(x, weight)
        return F.linear(x, weight) if config is None else gemv(x, weight, config)

    def choice(self, x: torch.Tensor, weight: torch.Tensor) -> GemvConfig | None:
        """The config for ``x @ weight.T``, timing the shape first if it is new; None:
        ``F.linear``."""
        if not self.enabled or weight.dim() != 2 or x.dtype != weight.dtype:
            return None
        if x.shape[-1] != weight.shape[1]:
            return None  # F.linear says what is wrong
        n, k = weight.shape
        rows = x.numel() // k
        if not weight.is_contiguous() or not 1 <= rows <= MAX_ROWS:
            return None
        if self.forced is not None:
            return self.forced if self.forced.applies(rows) else None
        if not x.is_cuda or weight.dtype not in (torch.bfloat16, torch.float16):
            return None
        key = (rows, n, k, weight.dtype, weight.device)
        if key not in self.choices:
            if torch.cuda.is_current_stream_capturing():
                return None  # nothing can be timed inside a capture
            try:
                times = measure(rows, weight)
            except Exception as exc:  # timing is an optimisation: it must not stop decoding
                log.warning("decode product %d x [%d, %d] not timed: %s", rows, n, k, exc)
                times = {None: 0.0}
            self.choices[key] = fastest(times)
            chosen = self.choices[key]
            log.info(
                "decode product %d x [%d, %d]: %s (%.2f us; cuBLAS %.2f us)",
                rows, n, k, chosen.name if chosen else "cuBLAS",
                times[chosen], times[None],
            )  # fmt: skip
        return self.choices[key]
