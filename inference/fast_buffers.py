"""Static buffers of the fast decode path (inference/fast_decode.py) and the row slicing of a
processor batch.

Two KV arenas back the decode states:

* the short arena, ``max_batch x max_total_len`` columns, allocated at start: radiographs and
  questions (one or two images, a few hundred prompt tokens) decode in it with the graphs
  captured at warm-up;
* the long arena, allocated the first time a prompt needs more than ``max_total_len`` columns
  (CT and MR studies: up to 85 images of 256 tokens, about 22,300 prompt tokens) and grown
  when a longer or wider batch comes; its size is bounded by the long-prompt token budget, so
  a batch of long prompts decodes in as many rows as the budget holds at a time.

A decode state is a ``(rows, length)`` view of one arena; its CUDA graph reads and writes only
those addresses, so growing the long arena drops the states (and graphs) built on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class DecodeState:
    """Static buffers of one (rows, length) shape; the graph reads and writes only these."""

    rows: int
    length: int
    keys: list[torch.Tensor]  # per layer [rows, kv_heads, length, head_dim], views of the arena
    values: list[torch.Tensor]
    tokens: torch.Tensor  # [rows] the token each row feeds in next
    positions: torch.Tensor  # [rows] its RoPE position (left padding not counted)
    starts: torch.Tensor  # [rows] first KV column the row may attend to (its left padding)
    column: torch.Tensor  # [1] KV column the next token is written to
    step: torch.Tensor  # [1] index of the next output token
    done: torch.Tensor  # [rows] the row has emitted an EOS
    out: torch.Tensor  # [rows, length] generated tokens, pad after EOS
    graph: torch.cuda.CUDAGraph | None = None


@dataclass
class KVArena:
    """One flat K and one flat V buffer per layer, ``columns`` (rows x length) KV columns each."""

    columns: int
    column_elements: int  # kv_heads * head_dim
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    states: dict[tuple[int, int], DecodeState] = field(default_factory=dict)

    @classmethod
    def allocate(
        cls,
        columns: int,
        *,
        layers: int,
        column_elements: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> KVArena:
        def flat() -> torch.Tensor:
            return torch.zeros(columns * column_elements, dtype=dtype, device=device)

        keys = [flat() for _ in range(layers)]
        values = [flat() for _ in range(layers)]
        return cls(columns, column_elements, keys, values)

    def holds(self, rows: int, length: int) -> bool:
        return rows * length <= self.columns

    def views(
        self, rows: int, length: int, kv_heads: int
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-layer [rows, kv_heads, length, head_dim] views of the first rows x length columns."""
        used = rows * length * self.column_elements
        shape = (rows, kv_heads, length, self.column_elements // kv_heads)
        keys = [arena[:used].view(shape) for arena in self.keys]
        values = [arena[:used].view(shape) for arena in self.values]
        return keys, values

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


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
