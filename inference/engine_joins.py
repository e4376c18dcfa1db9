"""The transformers engine's side of rows joining a running batch (inference/decode_joins.py).

The inference worker offers the pieces of the batch it builds ahead (inference/batch_pieces.py,
each prepared on the device as its studies render) through a ``JoinFeed``. ``PieceRows`` is
the decode loop's ``RowSource`` over it: it accepts a piece only when the running batch can
take all of it, namely one prompt group of the running batch's image class (a radiograph joins
radiographs; a CT study never lengthens their rows), prompts no longer than the column the
batch has reached, no request wanting more new tokens than the batch makes; and it keeps the
pieces it took, in order, for their results. The pieces ready at one check join together, in
one prompt pass, when their prompts are as long (a burst of one kind of study).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch

from inference.device_inputs import DeviceInputs, joined_tensors
from inference.engine import JoinFeed, PreparedBatch, image_class


class PieceRows:
    """The ``RowSource`` of one running batch (inference/decode_joins.py)."""

    def __init__(
        self,
        feed: JoinFeed,
        groups: Callable[[PreparedBatch], list[DeviceInputs]],
        tensors: Callable[[DeviceInputs], Any],
        running: PreparedBatch,
        pad_id: int,
    ) -> None:
        self._feed = feed
        self._pad_id = pad_id  # the tokenizer's, for pieces put together (joined_tensors)
        self._groups = groups  # a prepared batch's prompt groups (TypeError: not this engine's)
        self._tensors = tensors  # a group's tensors, once the generating stream may read them
        self._class = image_class(running.requests[0])
        self.max_new_tokens = max(r.settings.max_new_tokens for r in running.requests)
        self.taken: list[tuple[PreparedBatch, Any]] = []  # each piece and its tensors

    def take(self, rows: int, prompt_len: int) -> Mapping[str, torch.Tensor] | None:
        """Every ready piece that fits, as one set of rows when their prompts are as long as the
        first's: each join's prompt pass holds the running batch up for a fixed time beside its
        rows' work (benchmarks/join_gpu.py), so pieces ready together join in one pass."""
        taken: list[tuple[PreparedBatch, Any]] = []
        while rows > 0:
            length = taken[0][1]["input_ids"].shape[1] if taken else None
            fits = partial(self._fits, rows=rows, prompt_len=prompt_len, length=length)
            piece = self._feed.take(rows, fits)
            if piece is None:
                break
            taken.append((piece, self._tensors(self._groups(piece)[0])))
            rows -= len(piece.requests)
        self.taken += taken
        if len(taken) < 2:
            return dict(taken[0][1]) if taken else None
        return dict(joined_tensors([tensors for _, tensors in taken], self._pad_id))

    def closing(self, seconds: float) -> None:
        self._feed.closing(seconds)

    def coming(self) -> bool:
        return self._feed.coming()

    def _fits(
        self, piece: PreparedBatch, rows: int, prompt_len: int, length: int | None = None
    ) -> bool:
        """``piece`` can join now (``length``: its prompts must be that long, to go with a
        piece taken at the same time)."""
        try:
            groups = self._groups(piece)
        except TypeError:
            return False
        tokens = groups[0].tensors["input_ids"].shape[1] if len(groups) == 1 else None
        return (
            tokens is not None
            and 0 < len(piece.requests) <= rows
            and tokens <= prompt_len
            and (length is None or tokens == length)
            and all(image_class(r) == self._class for r in piece.requests)
            and all(r.settings.max_new_tokens <= self.max_new_tokens for r in piece.requests)
        )
