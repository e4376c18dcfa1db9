"""Chunked prompt-pass attention gives what stock SDPA gives, and the model's tokens with it.

The chunk size is lowered (CHUNK_ROWS) so that short CPU prompts take the chunked path.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from config.settings import load_settings
from inference import prefill_attention
from inference.fast_decode import FastGreedyGenerator
from inference.prefill_attention import CHUNKED_SDPA, chunked_sdpa_attention_forward
from inference.transformers_engine import TransformersEngine
from tests.test_fast_decode import multi_image_inputs

Q_LEN = 100  # not a multiple of the chunk: the last chunk is partial


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(prefill_attention, "CHUNK_ROWS", 16)
    monkeypatch.setattr(prefill_attention, "_cache", [])
    return 16


def causal(q_len: int) -> torch.Tensor:
    rows = torch.arange(q_len)
    return rows[:, None] >= rows[None, :]


def band(q_len: int, window: int) -> torch.Tensor:
    """Gemma 3's sliding window: a key at most window - 1 tokens before the query (or after it)."""
    rows = torch.arange(q_len)
    return rows[:, None] - rows[None, :] < window


def sliding(q_len: int, window: int) -> torch.Tensor:
    return causal(q_len) & band(q_len, window)


def with_blocks(mask: torch.Tensor, blocks: list[tuple[int, int]]) -> torch.Tensor:
    """Gemma 3's image blocks: every token of a block sees the whole block, in both directions."""
    mask = mask.clone()
    for start, end in blocks:
        mask[start:end, start:end] = True
    return mask


def qkv(batch: int = 2, heads: int = 4, kv_heads: int = 2, dim: int = 8) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    heads_per_tensor = (heads, kv_heads, kv_heads)
    return [torch.randn(batch, n, Q_LEN, dim, generator=generator) for n in heads_per_tensor]


MODULE: Any = SimpleNamespace(num_key_value_groups=2, is_causal=True)
BLOCKS = [(5, 30), (40, 57), (70, 90)]
MASKS = {
    "causal": causal(Q_LEN),
    "sliding": sliding(Q_LEN, 20),
    "bidirectional blocks": with_blocks(causal(Q_LEN), BLOCKS),
    # A sliding layer's mask with images: AND(window, OR(causal, blocks)), as Gemma 3 builds it.
    "sliding with blocks": with_blocks(causal(Q_LEN), BLOCKS) & band(Q_LEN, 20),
}


@pytest.mark.parametrize("name", list(MASKS))
def test_chunks_equal_stock_sdpa(name: str, small_chunks: int) -> None:
    query, key, value = qkv()
    mask = MASKS[name][None, None].expand(2, 1, Q_LEN, Q_LEN).clone()

    stock, _ = sdpa_attention_forward(MODULE, query, key, value, mask, scaling=0.3)
    chunked, _ = chunked_sdpa_attention_forward(MODULE, query, key, value, mask, scaling=0.3)

    assert chunked.shape == stock.shape == (2, Q_LEN, 4, 8) and chunked.is_contiguous()
    assert torch.allclose(chunked, stock, atol=1e-6, rtol=1e-5)


def test_inference_mode_tensors_chunk_like_the_others(small_chunks: int) -> None:
    # The engine runs under torch.inference_mode: its masks keep no version counter.
    query, key, value = qkv()
    with torch.inference_mode():
        mask = MASKS["sliding with blocks"][None, None].expand(2, 1, Q_LEN, Q_LEN).clone()
        stock, _ = sdpa_attention_forward(MODULE, query, key, value, mask, scaling=0.3)
        first, _ = chunked_sdpa_attention_forward(MODULE, query, key, value, mask, scaling=0.3)
        again, _ = chunked_sdpa_attention_forward(MODULE, query, key, value, mask, scaling=0.3)

    assert torch.allclose(first, stock, atol=1e-6, rtol=1e-5)
    assert torch.equal(first, again)


def test_spans_come_from_the_mask_rows(small_chunks: int) -> None:
    window = sliding(Q_LEN, 20)
    spans = prefill_attention.column_spans(window[None, None], small_chunks)
    assert len(spans) == 7 and spans[-1][:2] == (96, 100)
    assert spans[2] == (32, 48, 0, 48)  # rows 32..47 see 13..47, rounded out to 16 columns
    blocks = with_blocks(causal(Q_LEN), BLOCKS)
    # Rows 5..15 sit in the block 5..29, whose tokens see up to column 29 ahead of them.
    assert prefill_attention.column_spans(blocks[None, None], small_chunks)[0] == (0, 16, 0, 32)


def test_rows_that_see_nothing_match_stock(small_chunks: int) -> None:
    # A left-padded single row: the first chunks' query rows see no column at all.
    query, key, value = qkv(batch=1)
    mask = causal(Q_LEN).clone()
    mask[:, :40] = False
    mask = mask[None, None]

    stock, _ = sdpa_attention_forward(MODULE, query, key, value, mask, scaling=0.3)
    chunked, _ = chunked_sdpa_attention_forward(MODULE, query, key, value, mask, scaling=0.3)

    assert torch.allclose(chunked, stock, atol=1e-6, rtol=1e-5, equal_nan=True)


def test_short_unmasked_and_float_masks_take_the_stock_path(
    small_chunks: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_spans(*args: Any) -> None:
        raise AssertionError("the stock path computes no spans")

    monkeypatch.setattr(prefill_attention, "column_spans", no_spans)
    query, key, value = qkv()
    bool_mask = causal(Q_LEN)[None, None]
    float_mask = torch.zeros(Q_LEN, Q_LEN).masked_fill(~causal(Q_LEN), float("-inf"))[None, None]
    cases: list[tuple[slice, torch.Tensor | None]] = [
        (slice(0, 32), bool_mask[:, :, :32, :32]),  # 32 rows: not above 2 x 16
        (slice(None), None),
        (slice(None), float_mask),
    ]
    for rows, mask in cases:
        q, k, v = query[:, :, rows], key[:, :, rows], value[:, :, rows]
        stock, _ = sdpa_attention_forward(MODULE, q, k, v, mask)
        same, _ = chunked_sdpa_attention_forward(MODULE, q, k, v, mask)
        assert torch.equal(same, stock)


def spy_spans(monkeypatch: pytest.MonkeyPatch) -> list[tuple[prefill_attention.Span, ...]]:
    """Every range computation (one GPU -> CPU sync each) from now on, in order."""
    made: list[tuple[prefill_attention.Span, ...]] = []
    compute = prefill_attention._column_spans

    def recording(mask: torch.Tensor, chunk: int) -> tuple[prefill_attention.Span, ...]:
        made.append(compute(mask, chunk))
        return made[-1]

    monkeypatch.setattr(prefill_attention, "_column_spans", recording)
    return made


def test_spans_are_synced_once_per_live_mask(
    small_chunks: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = spy_spans(monkeypatch)
    query, key, value = qkv()
    mask = causal(Q_LEN)[None, None].clone()
    for _ in range(3):  # three layers sharing one mask
        chunked_sdpa_attention_forward(MODULE, query, key, value, mask)
    assert len(calls) == 1
    mask[..., 3, 0] = False  # written in place: a new version
    chunked_sdpa_attention_forward(MODULE, query, key, value, mask)
    assert len(calls) == 2
    other = mask.clone()  # equal content, another tensor: computed again, never assumed
    chunked_sdpa_attention_forward(MODULE, query, key, value, other)
    assert len(calls) == 3 and len(prefill_attention._cache) <= 4


# -- the demo model ---------------------------------------------------------------------


def load(demo_dir: Path, implementation: str) -> Any:
    model = AutoModelForImageTextToText.from_pretrained(
        demo_dir, dtype=torch.float32, attn_implementation=implementation
    )
    # A window shorter than the prompt: the sliding layers get their own, narrower mask.
    model.config.text_config.sliding_window = 16
    return model.eval()


def study(demo_dir: Path, images_per_row: list[int]) -> dict[str, torch.Tensor]:
    processor = AutoProcessor.from_pretrained(demo_dir)
    processor.tokenizer.padding_side = "left"
    return multi_image_inputs(processor, images_per_row)


def test_demo_model_tokens_match_stock_sdpa(
    demo_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prefill_attention, "CHUNK_ROWS", 8)
    monkeypatch.setattr(prefill_attention, "COLUMN_ALIGN", 1)  # ranges exactly as the mask says
    spans = spy_spans(monkeypatch)
    stock, chunked = load(demo_dir, "sdpa"), load(demo_dir, CHUNKED_SDPA)
    assert chunked.config.text_config._attn_implementation == CHUNKED_SDPA
    inputs = study(demo_dir, [10, 7])
    prompt_len = inputs["input_ids"].shape[1]
    assert prompt_len > 2 * 8

    def tokens(model: Any) -> torch.Tensor:
        out = model.generate(**inputs, max_new_tokens=16, min_new_tokens=16)
        return out[:, prompt_len:]

    with torch.no_grad():  # the prompt pass alone: tiny greedy models hide small errors
        logits = stock(**inputs).logits
        assert not spans
        assert torch.allclose(chunked(**inputs).logits, logits, atol=1e-5, rtol=1e-5)
    expected = tokens(stock)
    spans.clear()
    assert torch.equal(tokens(chunked), expected)
    # One prefill: the sliding and the full mask, each synced once for all layers.
    assert len(spans) == 2
    assert all(len(s) == -(-prompt_len // 8) for s in spans)
    assert any(k1 - k0 < prompt_len for _, _, k0, k1 in spans[0] + spans[1])

    gen = FastGreedyGenerator(
        chunked, max_batch=2, max_total_len=64, long_kv_tokens=4096, long_len_step=32
    )
    fast = gen.generate(inputs, max_new_tokens=16, force_new_tokens=True)
    assert torch.equal(fast, expected)


def test_the_engine_loads_the_chunked_implementation(demo_dir: Path) -> None:
    engine = TransformersEngine(load_settings().model, weights_dir=demo_dir)
    config = engine.model.config
    assert config.text_config._attn_implementation == CHUNKED_SDPA
    assert config.vision_config._attn_implementation == CHUNKED_SDPA  # unmasked: stock sdpa
