"""The decode step's matrix products alone, on one GPU: each projection of a MedGemma-4B decoder
layer (hidden 2,560; q 8 x 256, k and v 4 x 256; MLP 10,240) at a few batch sizes, as cuBLAS
runs them inside a CUDA graph, with the bytes of weight read per microsecond; beside them the q,
k and v projections as one product (inference/fused_qkv.py).

Each shape's product is captured ``--repeat`` times in one CUDA graph, replayed ``--runs``
times; the median replay over ``--repeat`` is the figure.

    python -m benchmarks.decode_gemv                 # GPU
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

HIDDEN, Q, KV, MLP = 2560, 2048, 1024, 10240
SHAPES = {  # name: (out features, in features)
    "q": (Q, HIDDEN),
    "k": (KV, HIDDEN),
    "v": (KV, HIDDEN),
    "q+k+v fused": (Q + 2 * KV, HIDDEN),
    "o": (HIDDEN, Q),
    "gate": (MLP, HIDDEN),
    "up": (MLP, HIDDEN),
    "down": (HIDDEN, MLP),
}


def product_us(rows: int, out_features: int, in_features: int, repeat: int, runs: int) -> float:
    weight = torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(rows, 1, in_features, device="cuda", dtype=torch.bfloat16)
    F.linear(x, weight)  # kernel selection outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeat):
            F.linear(x, weight)
    seconds = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        seconds.append(start.elapsed_time(end) / 1000)
    return statistics.median(seconds) / repeat * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,8,64")
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__)
    print(f"{'product':<14} {'rows':>4} {'MB':>6} {'us':>8} {'GB/s':>7}")
    for rows in (int(r) for r in args.rows.split(",")):
        separate = 0.0
        for name, (out_features, in_features) in SHAPES.items():
            us = product_us(rows, out_features, in_features, args.repeat, args.runs)
            megabytes = out_features * in_features * 2 / 1e6
            print(f"{name:<14} {rows:>4} {megabytes:>6.1f} {us:>8.2f} {megabytes * 1e3 / us:>7.0f}")
            if name in ("q", "k", "v"):
                separate += us
        print(f"{'q, k, v apart':<14} {rows:>4} {'':>6} {separate:>8.2f}")


if __name__ == "__main__":
    main()
