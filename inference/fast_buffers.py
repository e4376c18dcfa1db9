"""Static buffers of the fast decode path (inference/fast_decode.py), the row slicing of a
processor batch and the joining of the decoded rows.

Two KV arenas back the decode states:

* the short arena, ``max_batch x max_total_len`` columns a layer, allocated at start:
  radiographs and questions (one or two images, a few hundred prompt tokens) decode in it with
  the graphs captured at warm-up;
* the long arena, allocated the first time a prompt needs more than ``max_total_len`` columns
  (CT and MR studies: up to 85 images of 256 tokens, about 22,300 prompt tokens) and grown
  when a longer or wider batch comes; its size is bounded by the long-prompt token budget, so
  a batch of long prompts decodes in as many rows as the budget holds at a time.

In the long arena, Gemma 3's local (sliding-window) layers keep a ring of ``sliding_window``
columns a row instead of the whole length: they attend to the last 1,024 columns only, and
column c goes to slot c % ring (inference/step_ops.py says how attention reads a ring). Only
the global layers (one in six) keep every column. For MedGemma-4B in bf16 (34 layers, 5 of
them global, 4 KV heads of 256: 4 KiB of K and V a column a layer), an 85-slice study's row of
24,576 columns (22,300 prompt + 256 new tokens, rounded up to 4,096) takes
5 x 24,576 + 29 x 1,024 layer columns, 0.62 GB, where every layer at full length took 3.4 GB.
The short arena keeps full-length local layers: its lengths (a few hundred columns) are within
the window anyway.

A decode state is a ``(rows, length)`` view of one arena; its CUDA graph reads and writes only
those addresses, so growing the long arena drops the states (and graphs) built on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from inference.rope_tables import RopeTable


@dataclass
class DecodeState:
    """Static buffers of one (rows, length) shape; the graph reads and writes only these."""

    rows: int
    length: int
    # Per layer [rows, kv_heads, columns, head_dim], views of the arena: ``length`` columns,
    # or a ring of fewer (a local layer of the long arena; column c at slot c % columns).
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    tokens: torch.Tensor  # [rows] the token each row feeds in next
    positions: torch.Tensor  # [rows] its RoPE position (left padding not counted)
    starts: torch.Tensor  # [rows] first KV column the row may attend to (its left padding)
    column: torch.Tensor  # [1] KV column the next token is written to
    step: torch.Tensor  # [1] index of the next output token
    done: torch.Tensor  # [rows] the row has emitted an EOS
    out: torch.Tensor  # [rows, length] generated tokens, pad after EOS
    rope: RopeTable  # cos and sin of every position the state reaches (inference/rope_tables.py)
    graph: torch.cuda.CUDAGraph | None = None


def long_rings(layer_types: Sequence[str], window: int) -> tuple[int, ...]:
    """Ring columns of each layer in the long arena: a local layer's window (all it reads), 0
    (full length) for a global one."""
    return tuple(window if t == "sliding_attention" and window > 0 else 0 for t in layer_types)


def row_columns(rings: Sequence[int], length: int) -> list[int]:
    """KV columns one row of ``length`` takes in each layer: ``length``, or at most the ring's
    columns where the layer keeps a ring (``rings[i]`` > 0)."""
    return [min(length, ring) if ring else length for ring in rings]


def layer_sizes(rings: Sequence[int], rows: int, length: int) -> list[int]:
    """KV columns a ``(rows, length)`` state takes in each layer."""
    return [rows * columns for columns in row_columns(rings, length)]


@dataclass
class KVArena:
    """One flat K and one flat V buffer per layer, ``sizes[i]`` KV columns in layer i; a layer
    with ``rings[i]`` > 0 keeps only each row's last ``rings[i]`` columns (a ring)."""

    sizes: list[int]
    rings: tuple[int, ...]
    column_elements: int  # kv_heads * head_dim
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    states: dict[tuple[int, int], DecodeState] = field(default_factory=dict)

    @classmethod
    def allocate(
        cls,
        sizes: Sequence[int],
        *,
        rings: Sequence[int],
        column_elements: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> KVArena:
        def flat(columns: int) -> torch.Tensor:
            return torch.zeros(columns * column_elements, dtype=dtype, device=device)

        keys = [flat(columns) for columns in sizes]
        values = [flat(columns) for columns in sizes]
        return cls(list(sizes), tuple(rings), column_elements, keys, values)

    def holds(self, rows: int, length: int) -> bool:
        needs = layer_sizes(self.rings, rows, length)
        return all(n <= size for n, size in zip(needs, self.sizes, strict=True))

    def views(
        self, rows: int, length: int, kv_heads: int
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-layer [rows, kv_heads, columns, head_dim] views of each layer's first columns."""
        head_dim = self.column_elements // kv_heads
        keys, values = [], []
        for i, columns in enumerate(row_columns(self.rings, length)):
            used = rows * columns * self.column_elements
            shape = (rows, kv_heads, columns, head_dim)
            keys.append(self.keys[i][:used].view(shape))
            values.append(self.values[i][:used].view(shape))
        return keys, values

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


def grown_sizes(
    old: KVArena | None, rings: Sequence[int], rows: int, length: int, budget: int
) -> list[int]:
    """Layer sizes of an arena replacing ``old`` that holds ``rows x length``: each layer the
    larger of its old and new sizes while their sum stays within ``budget`` layer columns (the
    old states' shapes then fit as well), else just the new ones."""
    sizes = layer_sizes(rings, rows, length)
    if old is None:
        return sizes
    wider = [max(new, size) for new, size in zip(sizes, old.sizes, strict=True)]
    return wider if sum(wider) <= budget else sizes


def store_columns(cache: torch.Tensor, row: int, kv: torch.Tensor, end: int) -> None:
    """Prompt KV ``kv`` [rows, kv_heads, n, head_dim], holding KV columns ``end - n`` to
    ``end - 1``, into the cache's rows from ``row``: column c at slot c % the cache's columns,
    so a ring keeps the last of them (a full-length cache: one copy to columns end-n..end-1)."""
    columns = cache.shape[2]
    kv = kv[:, :, -columns:]
    n = kv.shape[2]
    first = (end - n) % columns
    head = min(n, columns - first)
    target = cache[row : row + kv.shape[0]]
    target[:, :, first : first + head].copy_(kv[:, :, :head])
    if head < n:  # the ring wraps
        target[:, :, : n - head].copy_(kv[:, :, head:])


def prompt_cache(model: Any, device: torch.device) -> Any:
    """An empty ``DynamicCache`` for one prompt pass, its sliding-window sizes already on
    ``device``. transformers' ``DynamicSlidingWindowLayer`` keeps its window as a host tensor
    and copies it to the device when the pass first reaches the layer, a blocking copy that
    waits for every kernel queued before it: one host-device synchronisation per local layer
    (29 of MedGemma-4B's 34) per prompt pass, each leaving the GPU idle until the host has
    launched the next kernels. Made here by a fill on the device, which waits for nothing."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    for layer in getattr(cache, "layers", ()):
        window = getattr(layer, "_sliding_window_tensor", None)
        if isinstance(window, torch.Tensor) and window.device != device:
            size = int(window)  # a host tensor: no synchronisation
            layer._sliding_window_tensor = torch.full((), size, dtype=window.dtype, device=device)
    return cache


def image_offsets(
    batch: dict[str, torch.Tensor], image_token_id: int | None, tokens_per_image: int
) -> list[int] | None:
    """Index of each row's first image in ``pixel_values`` (plus the total at the end).

    Gemma 3's processor puts every image of every row into ``pixel_values`` in row order and
    ``tokens_per_image`` image tokens into the row's text for each; None when the rows cannot
    be told apart (no image token id known) while the batch has pixels.
    """
    rows = batch["input_ids"].shape[0]
    pixels = batch.get("pixel_values")
    if pixels is None:
        return [0] * (rows + 1)
    if image_token_id is None or tokens_per_image < 1:
        return None
    counts = (batch["input_ids"] == image_token_id).sum(-1) // tokens_per_image
    offsets = [0, *torch.cumsum(counts, 0).tolist()]
    return offsets if offsets[-1] == pixels.shape[0] else None


def pass_bounds(rows: int, passes: Sequence[int] | None, most_rows: int) -> list[tuple[int, int]]:
    """(start, stop) rows of each prompt pass over ``rows`` rows: ``passes`` rows each, in
    order (default: all in one), a pass of more than ``most_rows`` (the token budget's) split
    into passes of that many and the rest."""
    counts = list(passes or [rows])
    if sum(counts) != rows or rows < 1:
        raise ValueError(f"passes {counts} do not make the batch's {rows} rows")
    bounds: list[tuple[int, int]] = []
    start = 0
    for count in counts:
        for begin in range(0, count, most_rows):
            bounds.append((start + begin, start + min(begin + most_rows, count)))
        start += count
    return bounds


def batch_rows(
    batch: dict[str, torch.Tensor], offsets: list[int], start: int, stop: int
) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Rows ``start..stop`` of a processor batch, with exactly those rows' images, and the
    offsets of those images within them."""
    first_image = offsets[start]
    rows_offsets = [offset - first_image for offset in offsets[start : stop + 1]]
    if start == 0 and stop == batch["input_ids"].shape[0]:
        return batch, rows_offsets
    rows = {
        key: value[first_image : offsets[stop]] if key == "pixel_values" else value[start:stop]
        for key, value in batch.items()
    }
    return rows, rows_offsets


def trim_after_eos(tokens: torch.Tensor, eos: list[int]) -> torch.Tensor:
    """Cut the columns after the last row's EOS (generate stops once every row has one)."""
    if tokens.shape[1] == 0 or not eos:
        return tokens
    is_eos = torch.isin(tokens, torch.tensor(eos))
    if not bool(is_eos.any(-1).all()):
        return tokens
    first = is_eos.int().argmax(-1)
    return tokens[:, : int(first.max()) + 1]


def concat_padded(parts: list[torch.Tensor], pad: int) -> torch.Tensor:
    """Decode chunks' tokens one under the other, the shorter padded on the right."""
    if len(parts) == 1:
        return parts[0]
    width = max(p.shape[1] for p in parts)
    return torch.cat([F.pad(p, (0, width - p.shape[1]), value=pad) for p in parts])
