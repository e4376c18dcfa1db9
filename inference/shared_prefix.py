"""The prompt tokens every row of a batch shares, run once (inference/fast_decode.py).

With the question before the image (a template with ``question_first = true``,
inference/prompts.py) every row of a batch of radiographs begins with the same tokens — BOS,
``<start_of_turn>user``, the question: about 400 of the chest question's ~670 — up to its
first image. Their KV does not depend on the row, so ``SharedPrefix.compute`` runs them once,
as a batch of one row without pixels, and each prefill pass then runs only the rest of its
rows (the image and the end of the turn) on that KV, broadcast to the pass's rows.

The prefix is shared only when (else ``compute`` returns None and every pass runs whole, as
before):

* the batch has two rows or more, none left-padded (a padded row's columns and positions
  differ from the others');
* every row starts with the same ``P`` tokens, ``P`` at least ``minimum`` (0 turns sharing
  off): shorter prefixes (the images-first order shares only ``<bos><start_of_turn>user``)
  save little against the extra pass;
* ``P`` ends before the first image token: image tokens attend both ways within their image
  (Gemma 3), so their KV depends on the row's pixels;
* the batch holds only the tensors whose cut is known here (ids, mask, pixels, token types).

How the suffix pass is made for transformers' Gemma 3 (read from its modeling and masking code,
5.x): ``input_ids`` are the suffix's; ``pixel_values`` all of the pass's images (their tokens
are all in the suffix); ``attention_mask`` and ``token_type_ids`` keep the whole length,
because the masks are built for key columns 0..L-1 and the image blocks are looked up by
absolute position (``blockwise_overlay`` offsets queries by the cache's length — generate's
own chunked prefill passes token types "from the start of the sequence" for the same reason);
``position_ids`` run from ``P``; the cache is a DynamicCache whose layers are copies of the
prefix's with the keys and values expanded to the pass's rows (a view: the pass's
concatenation makes the only copy). A copied local layer keeps the prefix's
``cumulative_length``, so the mask of a prefix longer than the window is offset as in one pass.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from inference.fast_buffers import prompt_cache

# The processor's tensors a pass is cut for; with any other, the rows run whole.
KNOWN_INPUTS = frozenset({"input_ids", "attention_mask", "pixel_values", "token_type_ids"})
DEFAULT_SHARED_PREFIX_MIN = 64  # tokens; the chest question asked first shares about 400


@dataclass
class PrefixKV:
    """The KV of the first ``length`` tokens of every row, computed for one row."""

    length: int
    cache: Any  # a DynamicCache of one row

    def suffix(
        self, inputs: dict[str, torch.Tensor], position_ids: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, Any]:
        """A pass's model arguments (whole rows, without the attention mask) and positions cut
        to the tokens after the prefix, and a cache holding the prefix for each of its rows."""
        rows = inputs["input_ids"].shape[0]
        cut = dict(inputs)
        cut["input_ids"] = inputs["input_ids"][:, self.length :]
        cache = copy.copy(self.cache)
        cache.layers = [self._layer_for(layer, rows) for layer in self.cache.layers]
        return cut, position_ids[:, self.length :], cache

    @staticmethod
    def _layer_for(layer: Any, rows: int) -> Any:
        """The prefix layer for ``rows`` rows; its update concatenates into new tensors, so the
        prefix's own tensors are never written."""
        shared = copy.copy(layer)
        shared.keys = layer.keys.expand(rows, -1, -1, -1)
        shared.values = layer.values.expand(rows, -1, -1, -1)
        return shared


class SharedPrefix:
    """Finds and runs a batch's shared prefix; counts the batches that shared one."""

    def __init__(
        self,
        model: Any,
        minimum: int,
        prompt_pass: Callable[[], contextlib.AbstractContextManager[None]],
    ) -> None:
        self.model = model
        self.minimum = minimum  # 0: never share
        self._prompt_pass = prompt_pass
        self._image_token_id: int | None = getattr(model.config, "image_token_id", None)
        self.batches = 0  # prefill calls that ran a shared prefix
        self.last_length = 0  # P of the last of them

    def length(self, batch: dict[str, torch.Tensor]) -> int:
        """P, the tokens every row starts with before any image (0: do not share)."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        rows, prompt_len = ids.shape
        if self.minimum <= 0 or rows < 2 or not set(batch) <= KNOWN_INPUTS:
            return 0
        same = (ids == ids[:1]).all(0) & mask.bool().all(0)
        if self._image_token_id is not None:
            same &= ~(ids == self._image_token_id).any(0)
        if "token_type_ids" in batch:
            same &= (batch["token_type_ids"] == 0).all(0)
        # Leading columns where every row agrees; the last token always runs in the passes
        # (its logits give the first new token).
        shared = min(int(same.long().cumprod(0).sum()), prompt_len - 1)
        return shared if shared >= self.minimum else 0

    def compute(self, batch: dict[str, torch.Tensor]) -> PrefixKV | None:
        """The shared prefix's KV, run once; None when the batch does not share one."""
        length = self.length(batch)
        if not length:
            return None
        ids = batch["input_ids"][:1, :length]
        extra = {}
        if "token_type_ids" in batch:  # all text here: the same mask as in the whole pass
            extra["token_type_ids"] = batch["token_type_ids"][:1, :length]
        cache = prompt_cache(self.model, ids.device)
        with self._prompt_pass():
            self.model(
                input_ids=ids, attention_mask=batch["attention_mask"][:1, :length],
                position_ids=torch.arange(length, device=ids.device)[None],
                past_key_values=cache, use_cache=True, logits_to_keep=1, return_dict=True,
                **extra,
            )  # fmt: skip
        self.batches += 1
        self.last_length = length
        return PrefixKV(length, cache)
