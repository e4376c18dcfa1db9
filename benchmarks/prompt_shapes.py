"""What a prompt pass costs the first time its number of rows is seen, against the same pass
again, through the node's fast path (``TransformersEngine`` with the fast path attached as at
node start): the passes a batch makes while it holds for the rows of a burst take whatever
rows are ready, so each burst brings row counts the process has not run yet.

Also times the vision tower's attention alone (``scaled_dot_product_attention`` at SigLIP's
shape: 16 heads of 72 over 4,096 patches an image) for new image counts, with and without
cuDNN's attention, and each backend's time at a full batch.

    python -m benchmarks.prompt_shapes                      # one GPU
    python -m benchmarks.prompt_shapes --tiny --rows 1,2,3  # CPU (development)
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention

from benchmarks.engine_gpu import IMAGE_4B, IMAGE_TINY, load_engine, requests_for
from benchmarks.join_gpu import synchronized
from inference.fast_buffers import batch_rows, image_offsets
from inference.loader import attach_fast_path

SIGLIP_HEADS, SIGLIP_HEAD_DIM, SIGLIP_PATCHES = 16, 72, 4096


def timed_ms(step: Callable[[], Any]) -> float:
    started = synchronized()
    step()
    return (synchronized() - started) * 1000


# SDPA's backends with and without cuDNN's attention (the others as PyTorch has them).
WITHOUT_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
WITH_CUDNN = [SDPBackend.CUDNN_ATTENTION, *WITHOUT_CUDNN]


def prompt_passes(generator: Any, batch: dict[str, torch.Tensor], rows: list[int]) -> None:
    """Each row count's pass twice (first time, again), as the hold runs them."""
    offsets = image_offsets(batch, generator._image_token_id, generator._tokens_per_image)
    assert offsets is not None
    for count in rows:
        part, part_offsets = batch_rows(batch, offsets, 0, count)
        pass_ms = [
            timed_ms(lambda: generator._prefill_passes(part, part_offsets, None))  # noqa: B023
            for _ in range(2)
        ]
        print(
            f"prompt pass of {count:2d} rows: first {pass_ms[0]:7.1f} ms, again "
            f"{pass_ms[1]:7.1f} ms ({pass_ms[1] / count:5.1f} ms a row)",
            flush=True,
        )


def vision_attention(images: list[int], device: torch.device) -> None:
    """SDPA at SigLIP's shape for new image counts, with and without cuDNN's attention."""
    for cudnn in (True, False):
        with sdpa_kernel(WITH_CUDNN if cudnn else WITHOUT_CUDNN):
            for count in images:
                shape = (count, SIGLIP_HEADS, SIGLIP_PATCHES, SIGLIP_HEAD_DIM)
                q, k, v = (torch.randn(shape, device=device, dtype=torch.bfloat16) for _ in "qkv")
                runs = [timed_ms(lambda: scaled_dot_product_attention(q, k, v)) for _ in range(3)]  # noqa: B023
                print(
                    f"vision attention, cuDNN {'on ' if cudnn else 'off'}, {count:2d} images: "
                    f"first {runs[0]:7.2f} ms, again {min(runs[1:]):6.2f} ms",
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", default="8,16,6,40,7,1,64", help="row counts, in order")
    parser.add_argument("--off-rows", default="9,17,5", help="then, cuDNN attention off")
    parser.add_argument("--images", default="3,11,64", help="vision attention image counts")
    parser.add_argument("--tiny", action="store_true", help="CPU-sized model (development)")
    args = parser.parse_args()
    rows = [int(n) for n in args.rows.split(",")]
    off_rows = [int(n) for n in args.off_rows.split(",") if n]
    most = max(rows + off_rows)
    with tempfile.TemporaryDirectory(prefix="shapes-") as directory:
        engine, settings = load_engine(Path(directory), args.tiny, most, 8)
        attach_fast_path(engine, settings)
        generator = engine._fast_generator
        assert generator is not None, "no fast path (CUDA, or --tiny)"
        requests = requests_for(most, 8, IMAGE_TINY if args.tiny else IMAGE_4B)
        batch = engine._inputs(requests)
        batch = {k: v for k, v in batch.items() if torch.is_tensor(v)}
        cudnn = torch.backends.cuda.cudnn_sdp_enabled()
        print(f"torch {torch.__version__}, cuDNN attention enabled: {cudnn}", flush=True)
        with torch.no_grad():
            prompt_passes(generator, batch, rows)
            with sdpa_kernel(WITHOUT_CUDNN):
                print("cuDNN attention off:", flush=True)
                prompt_passes(generator, batch, off_rows)
            if engine.device.type == "cuda":
                vision_attention([int(n) for n in args.images.split(",")], engine.device)


if __name__ == "__main__":
    main()
