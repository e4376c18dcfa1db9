"""The decode step's matrix products alone, on one GPU: each projection of a MedGemma-4B decoder
layer (hidden 2,560; q 8 x 256, k and v 4 x 256; MLP 10,240) and the lm_head (262,144 x 2,560)
at a few batch sizes, as cuBLAS runs them inside a CUDA graph, with the bytes of weight read per
microsecond; beside them the q, k and v projections as one product and gate and up as another
(inference/fused_qkv.py).

Each shape's product is captured ``--repeat`` times in one CUDA graph, replayed ``--runs``
times; the median replay over ``--repeat`` is the figure (``us``, ``GB/s``: one weight read
again and again, so a matrix smaller than L2 is read from it).

To the right, what the decode step's kernel choice measures (inference/gemv.py, ``measure``):
copies of the weight taking turns so that each product reads device memory, as in a decode
step — cuBLAS (``cold us``) and the fastest Triton GEMV config (``triton us``, its ``GB/s`` and
its name), and which of the two the step would run (``pick``: Triton must be 2% faster). Up to
8 rows; the ``step`` lines add a step's products up (34 layers with q/k/v and gate/up fused,
and the lm_head; cold µs) for cuBLAS alone and for the picks.

    python -m benchmarks.decode_gemv                 # GPU
    python -m benchmarks.decode_gemv --sweep         # every config of a wider grid, one row

``--sweep`` times, for one row and each product of the step, every config of a grid wider
than ``gemv.CONFIGS`` (tile, K slices, warps, pipeline stages) and prints the fastest ones
beside cuBLAS: how ``CONFIGS`` is chosen.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from inference import gemv

HIDDEN, Q, KV, MLP, VOCAB, LAYERS = 2560, 2048, 1024, 10240, 262144, 34
SHAPES = {  # name: (out features, in features)
    "q": (Q, HIDDEN),
    "k": (KV, HIDDEN),
    "v": (KV, HIDDEN),
    "q+k+v fused": (Q + 2 * KV, HIDDEN),
    "o": (HIDDEN, Q),
    "gate": (MLP, HIDDEN),
    "up": (MLP, HIDDEN),
    "down": (HIDDEN, MLP),
    "gate+up fused": (2 * MLP, HIDDEN),
    "lm_head": (VOCAB, HIDDEN),
}
STEP = ("q+k+v fused", "o", "gate+up fused", "down")  # a layer's products in the fast step


def product_us(rows: int, out_features: int, in_features: int, repeat: int, runs: int) -> float:
    """cuBLAS on one weight, re-read from L2 between products ("warm"), as gemv times it."""
    weight = torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(rows, 1, in_features, device="cuda", dtype=torch.bfloat16)
    return gemv.product_us(F.linear, x, [weight], repeat, runs)


def choice_columns(
    rows: int, out_features: int, in_features: int, runs: int
) -> tuple[str, float, float] | None:
    """The kernel choice's columns for one shape, with the cold µs of cuBLAS and of the pick;
    None where the choice does not apply (no Triton, or more than 8 rows)."""
    if not gemv.HAS_TRITON or rows > gemv.MAX_ROWS:
        return None
    weight = torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16)
    times = gemv.measure(rows, weight, runs=runs)
    del weight
    configs = {c: t for c, t in times.items() if c is not None}
    picked = gemv.fastest(times)
    cells = f" | {times[None]:>7.2f}"
    if configs:
        best = min(configs, key=configs.__getitem__)
        megabytes = out_features * in_features * 2 / 1e6
        us = configs[best]
        cells += f" {us:>9.2f} {megabytes * 1e3 / us:>7.0f}  {best.name:<24}"
    else:
        cells += f" {'none ran':>9} {'':>7}  {'':<24}"
    cells += " triton" if picked is not None else " cuBLAS"
    return cells, times[None], times[picked]


def sweep_configs() -> list[gemv.GemvConfig]:
    """The grid ``--sweep`` times: CUDA-core configs for one row, and tensor-core ones."""
    fma = [
        gemv.GemvConfig(block_n=n, block_k=k, split_k=s, num_warps=w, num_stages=p)
        for n, k, s, w, p in itertools.product(
            (2, 4, 8, 16), (256, 512, 1024, 2048), (1, 2, 4, 8), (4, 8), (1, 3)
        )
        if n * k <= 16384
    ]
    dot = [
        gemv.GemvConfig(block_n=n, block_k=k, split_k=s, num_warps=w, num_stages=p, dot=True)
        for n, k, s, w, p in itertools.product((16, 32, 64), (128, 256), (1, 2, 4), (4,), (3, 4))
    ]
    return fma + dot


def sweep(runs: int, best: int) -> None:
    """Every config of ``sweep_configs`` on each product of the step, one row; the fastest."""
    configs = sweep_configs()
    print(f"sweep: {len(configs)} configs, 1 row, cold (copies of the weight in turn)")
    total_cublas = total_best = 0.0
    for name in (*STEP, "lm_head"):
        out_features, in_features = SHAPES[name]
        weight = torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16)
        times = gemv.measure(1, weight, configs, runs=runs, every_split=True)
        del weight
        cublas = times.pop(None)
        ranked = sorted(times.items(), key=lambda item: item[1])[:best]
        count = LAYERS if name in STEP else 1
        total_cublas += count * cublas
        total_best += count * min(cublas, ranked[0][1] if ranked else cublas)
        print(f"{name:<14} cuBLAS {cublas:8.2f} us")
        for config, us in ranked:
            print(f"{'':<14} {config.name:<28} {us:8.2f} us")
    print(f"step, cuBLAS {total_cublas:8.1f} us; step, best of the sweep {total_best:8.1f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,8,64")
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sweep", action="store_true", help="time a wider grid of configs")
    parser.add_argument("--best", type=int, default=6, help="configs --sweep prints a product")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__)
    if args.sweep:
        sweep(args.runs, args.best)
        return
    header = f"{'product':<14} {'rows':>4} {'MB':>6} {'us':>8} {'GB/s':>7}"
    if gemv.HAS_TRITON:
        header += f" | {'cold us':>7} {'triton us':>9} {'GB/s':>7}  {'config':<24} pick"
    print(header)
    for rows in (int(r) for r in args.rows.split(",")):
        separate = 0.0
        cold: dict[str, tuple[float, float]] = {}  # name: (cuBLAS, pick)
        for name, (out_features, in_features) in SHAPES.items():
            us = product_us(rows, out_features, in_features, args.repeat, args.runs)
            megabytes = out_features * in_features * 2 / 1e6
            choice = choice_columns(rows, out_features, in_features, args.runs)
            cells = ""
            if choice is not None:
                cells, cold[name] = choice[0], choice[1:]
            print(
                f"{name:<14} {rows:>4} {megabytes:>6.1f} {us:>8.2f} "
                f"{megabytes * 1e3 / us:>7.0f}{cells}"
            )
            if name in ("q", "k", "v"):
                separate += us
        print(f"{'q, k, v apart':<14} {rows:>4} {'':>6} {separate:>8.2f}")
        if cold:
            for column, label in ((0, "step, cuBLAS"), (1, "step, picks")):
                step = LAYERS * sum(cold[n][column] for n in STEP) + cold["lm_head"][column]
                print(
                    f"{label:<14} {rows:>4} {'':>6} {step:>8.1f}  (cold: {LAYERS} layers + lm_head)"
                )


if __name__ == "__main__":
    main()
