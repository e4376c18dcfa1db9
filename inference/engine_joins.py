"""The transformers engine's side of rows joining a running batch (inference/decode_joins.py).

The inference worker offers the pieces of the batch it builds ahead (inference/batch_pieces.py,
each prepared on the device as its studies render) through a ``JoinFeed``. ``PieceRows`` is
the decode loop's ``RowSource`` over it: it accepts a piece only when the running batch can
take all of it, namely one prompt group of the running batch's image class (a radiograph joins
radiographs; a CT study never lengthens their rows), prompts no longer than the column the
batch has reached, no request wanting more new tokens than the batch makes; and it keeps the
pieces it took, in order, for their results.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from inference.device_inputs import DeviceInputs
from inference.engine import JoinFeed, PreparedBatch, image_class


class PieceRows:
    """The ``RowSource`` of one running batch (inference/decode_joins.py)."""

    def __init__(
        self,
        feed: JoinFeed,
        groups: Callable[[PreparedBatch], list[DeviceInputs]],
        tensors: Callable[[DeviceInputs], Any],
        running: PreparedBatch,
    ) -> None:
        self._feed = feed
        self._groups = groups  # a prepared batch's prompt groups (TypeError: not this engine's)
        self._tensors = tensors  # a group's tensors, once the generating stream may read them
        self._class = image_class(running.requests[0])
        self.max_new_tokens = max(r.settings.max_new_tokens for r in running.requests)
        self.taken: list[tuple[PreparedBatch, Any]] = []  # each piece and its tensors

    def take(self, rows: int, prompt_len: int) -> Mapping[str, torch.Tensor] | None:
        def fits(piece: PreparedBatch) -> bool:
            return self._fits(piece, rows, prompt_len)

        piece = self._feed.take(rows, fits)
        if piece is None:
            return None
        tensors = self._tensors(self._groups(piece)[0])
        self.taken.append((piece, tensors))
        return dict(tensors)

    def closing(self, seconds: float) -> None:
        self._feed.closing(seconds)

    def _fits(self, piece: PreparedBatch, rows: int, prompt_len: int) -> bool:
        try:
            groups = self._groups(piece)
        except TypeError:
            return False
        return (
            len(groups) == 1
            and 0 < len(piece.requests) <= rows
            and groups[0].tensors["input_ids"].shape[1] <= prompt_len
            and all(image_class(r) == self._class for r in piece.requests)
            and all(r.settings.max_new_tokens <= self.max_new_tokens for r in piece.requests)
        )
