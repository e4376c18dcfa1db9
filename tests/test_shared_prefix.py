"""The rows' shared prefix, run once (inference/shared_prefix.py), changes nothing but the work.

On the tiny demo model in float32 (CPU, the eager decode step): a batch of question-first
prompts with different images decodes the tokens of the same generator with sharing off and of
``model.generate``; the KV each prompt pass leaves matches the whole pass's; batches that do
not qualify run as before and say so (``shared_prefix.batches`` stays 0).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from inference.fast_buffers import image_offsets
from inference.fast_decode import FastGreedyGenerator
from inference.shared_prefix import SharedPrefix

# The demo tokenizer has one token a character: about 100 shared tokens before the image.
QUESTION = "List every finding of this chest radiograph with its location, then the impression."


def windowed(model: Any, window: int) -> Any:
    """The model with a sliding window of ``window`` columns (512: wider than any prompt)."""
    small = copy.deepcopy(model)
    small.config.text_config.sliding_window = window
    return small


def prompts(
    processor: Any, questions: list[str], question_first: bool = True
) -> dict[str, torch.Tensor]:
    """Left-padded processor output: one random image a row (every row its own)."""
    rng = np.random.default_rng(11)
    texts = []
    for question in questions:
        content = [{"type": "text", "text": question}, {"type": "image"}]
        if not question_first:
            content.reverse()
        message = [{"role": "user", "content": content}]
        texts.append(
            processor.apply_chat_template(message, add_generation_prompt=True, tokenize=False)
        )
    images = [[Image.fromarray(rng.integers(0, 255, (80, 72, 3), dtype=np.uint8))] for _ in texts]
    return dict(processor(text=texts, images=images, return_tensors="pt", padding=True))


def plain(model: Any, inputs: dict[str, torch.Tensor], new: int) -> torch.Tensor:
    out = model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    return out[:, inputs["input_ids"].shape[1] :].cpu()


def first_image_column(model: Any, inputs: dict[str, torch.Tensor]) -> int:
    return int((inputs["input_ids"][0] == model.config.image_token_id).nonzero()[0])


@pytest.mark.parametrize("window", [512, 16])
def test_shared_prefix_decodes_the_tokens_of_the_whole_prompt(
    model: Any, processor: Any, window: int
) -> None:
    # Window 16: the prefix (~100 tokens) is longer than the local layers' window, whose cache
    # then keeps only its last 15 columns. Five rows over max_batch 4 decode as 4 + 1 (one row
    # alone shares nothing); passes of two rows reuse one prefix.
    small = windowed(model, window)
    inputs = prompts(processor, [QUESTION] * 5)
    prompt_len = inputs["input_ids"].shape[1]
    assert bool(inputs["attention_mask"].all())

    def fast(shared_prefix_min: int) -> tuple[torch.Tensor, FastGreedyGenerator]:
        gen = FastGreedyGenerator(
            small, max_batch=4, max_total_len=256, prefill_tokens=2 * prompt_len,
            shared_prefix_min=shared_prefix_min,
        )  # fmt: skip
        return gen.generate(inputs, max_new_tokens=24, force_new_tokens=True), gen

    shared, gen = fast(64)
    whole, off = fast(0)

    assert gen.shared_prefix.batches == 1 and off.shared_prefix.batches == 0
    assert gen.shared_prefix.last_length == first_image_column(small, inputs) > 64
    assert torch.equal(shared, whole)
    assert torch.equal(shared, plain(small, inputs, 24))
    assert len({tuple(row.tolist()) for row in shared}) > 1  # the images make the rows differ


@pytest.mark.parametrize("window", [512, 16])
def test_the_suffix_pass_leaves_the_kv_and_logits_of_the_whole_pass(
    model: Any, processor: Any, window: int
) -> None:
    # Stricter than the tokens: the image tokens' attention to each other (bidirectional in
    # Gemma 3) moves the cache by far more than the tolerance when the mask is built wrong.
    small = windowed(model, window)
    inputs = prompts(processor, [QUESTION] * 3)
    gen = FastGreedyGenerator(small, max_batch=4, max_total_len=256)
    prefix = gen.shared_prefix.compute(inputs)
    assert prefix is not None

    first_whole, whole = gen._prefill(inputs)
    first_shared, shared = gen._prefill(inputs, prefix)

    assert torch.equal(first_shared, first_whole)
    for a, b in zip(shared.layers, whole.layers, strict=True):
        assert a.get_seq_length() == b.get_seq_length() == inputs["input_ids"].shape[1]
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.values, b.values, rtol=1e-5, atol=1e-5)


def test_rows_that_part_after_the_minimum_share_up_to_there(model: Any, processor: Any) -> None:
    # Equal lengths, no padding; the rows differ from the 70th token on.
    other = QUESTION[:70] + QUESTION[70:].upper()
    inputs = prompts(processor, [QUESTION, other, QUESTION])
    assert bool(inputs["attention_mask"].all())
    gen = FastGreedyGenerator(model, max_batch=4, max_total_len=256)

    fast = gen.generate(inputs, max_new_tokens=16, force_new_tokens=True)

    column = 7 + 70  # <bos>, <start_of_turn>, "user\n" (one token a character), the question
    assert gen.shared_prefix.batches == 1 and gen.shared_prefix.last_length == column
    assert torch.equal(fast, plain(model, inputs, 16))


@pytest.mark.parametrize(
    "case", ["left padding", "different questions", "images first", "below the minimum", "off"]
)
def test_batches_that_do_not_qualify_run_whole(model: Any, processor: Any, case: str) -> None:
    minimum = {"below the minimum": 200, "off": 0}.get(case, 64)
    questions = {
        "left padding": [QUESTION, QUESTION + " Be brief.", QUESTION],
        "different questions": [QUESTION, "Compare" + QUESTION[7:], QUESTION],
    }.get(case, [QUESTION] * 3)
    inputs = prompts(processor, questions, question_first=case != "images first")
    gen = FastGreedyGenerator(model, max_batch=4, max_total_len=256, shared_prefix_min=minimum)

    fast = gen.generate(inputs, max_new_tokens=16, force_new_tokens=True)

    assert gen.shared_prefix.batches == 0
    assert torch.equal(fast, plain(model, inputs, 16))


def test_prefix_length_rules(model: Any, processor: Any) -> None:
    inputs = prompts(processor, [QUESTION] * 2)
    image = first_image_column(model, inputs)
    finder = SharedPrefix(model, 8, contextlib.nullcontext)

    assert finder.length(inputs) == image  # never into the image
    assert finder.length({k: v[:1] for k, v in inputs.items()}) == 0  # one row: nothing to share
    assert finder.length({**inputs, "extra": inputs["input_ids"]}) == 0  # an unknown tensor
    text = {"input_ids": torch.full((2, 30), 7), "attention_mask": torch.ones(2, 30)}
    assert finder.length(text) == 29  # text alike to the end: the last token runs in the pass
    assert image_offsets(inputs, model.config.image_token_id, 4) == [0, 1, 2]
