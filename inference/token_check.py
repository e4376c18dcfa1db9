"""The processor's image-token check, run on the ids as Python lists.

After tokenising, transformers' processors check that each row has as many image tokens as
its text has image markers (a prompt cut short would misplace the images in the model).
Gemma 3's processor counts them by iterating each row's token tensor element by element, a
Python object per token: about 8 ms for 8 prompts of ~430 tokens on the development VM, and
about a quarter of the busy samples of the inference worker's build thread on an H200 host
during a burst (py-spy; benchmarks/RESULTS.md, eighth session), where that thread shares the
interpreter with the one launching the GPU's work. The processor's own check runs here on the
ids as lists, which it counts in microseconds.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any

import torch


def check_tokens_on_lists(processor: Any) -> None:
    """Make ``processor`` run its own special-token check on lists of ids (a processor
    without that check is left as it is)."""
    check = getattr(type(processor), "_check_special_mm_tokens", None)
    if check is None:
        return

    def on_lists(
        self: Any, text: Any, text_inputs: Mapping[str, Any], *args: Any, **kwargs: Any
    ) -> Any:
        ids = text_inputs.get("input_ids")
        if isinstance(ids, torch.Tensor):
            text_inputs = {**text_inputs, "input_ids": ids.tolist()}
        return check(self, text, text_inputs, *args, **kwargs)

    processor._check_special_mm_tokens = types.MethodType(on_lists, processor)
