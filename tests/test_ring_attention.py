"""A local layer's ring (the long arena keeps only the window: column c at slot c % ring,
inference/fast_buffers.py) gives the attention and the stored K and V of the full-length cache.

The eager ops (``TorchStepOps``) run everywhere. The Triton kernels run where CUDA is, and on
the CPU under Triton's interpreter when it is installed:

    TRITON_INTERPRET=1 PYTHONPATH=$PWD:/path/to/triton python -m pytest tests/test_ring_attention.py
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

from inference.fast_buffers import KVArena, grown_sizes, long_rings, row_columns, store_columns
from inference.fast_decode import HAS_TRITON
from inference.step_ops import StepOps, TextShape, TorchStepOps

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
TRITON_HERE = HAS_TRITON and (ON_CUDA or os.environ.get("TRITON_INTERPRET") == "1")
needs_triton = pytest.mark.skipif(
    not TRITON_HERE, reason="needs Triton with CUDA or TRITON_INTERPRET=1"
)
WINDOW = 16


def text_shape(heads: int = 4, kv_heads: int = 2, head_dim: int = 32) -> TextShape:
    return TextShape(
        num_layers=1, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        sliding_window=WINDOW, layer_types=("sliding_attention",), scaling=head_dim**-0.5,
        vocab_size=16,
    )  # fmt: skip


def triton_ops(shape: TextShape) -> StepOps:
    from inference.triton_ops import TritonStepOps

    return TritonStepOps(shape, gelu_tanh=True)


def ring_of(cache: torch.Tensor, column: int, ring: int) -> torch.Tensor:
    """The ring a local layer keeps of a full-length cache once ``column`` is written; the
    slots that hold no column yet keep noise, which attention must never read."""
    out = torch.randn(*cache.shape[:2], ring, cache.shape[3], device=cache.device) * 100
    out = out.to(cache.dtype)
    for c in range(max(0, column - ring + 1), column + 1):
        out[:, :, c % ring] = cache[:, :, c]
    return out


def random_case(
    shape: TextShape, length: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator(DEVICE).manual_seed(seed)

    def random(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=generator, device=DEVICE).to(dtype)

    size = (2, shape.num_kv_heads, length, shape.head_dim)
    return random(2, shape.num_heads, shape.head_dim), random(*size), random(*size)


# (column written last, starts of the two rows): before the ring wraps, at its edge, wrapped
# many times, and a row whose left padding ends inside the window.
CASES = [(5, (0, 3)), (15, (0, 2)), (16, (0, 9)), (40, (0, 30)), (63, (0, 50)), (100, (7, 97))]


@pytest.mark.parametrize(("column", "starts"), CASES)
def test_eager_attention_over_a_ring_matches_the_full_cache(
    column: int, starts: tuple[int, int]
) -> None:
    shape = text_shape()
    q, keys, values = random_case(shape, 128, torch.float32)
    ops = TorchStepOps(shape)
    ring = (ring_of(keys, column, WINDOW), ring_of(values, column, WINDOW))
    where = torch.tensor([column], device=DEVICE)
    first = torch.tensor(starts, device=DEVICE)

    full = ops.attention(q, (keys, values), first, where, WINDOW)
    wrapped = ops.attention(q, ring, first, where, WINDOW)

    torch.testing.assert_close(wrapped, full, atol=1e-6, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize(("column", "starts"), CASES)
@pytest.mark.parametrize("ring", [WINDOW, 64])
def test_triton_attention_over_a_ring_matches_the_full_cache(
    column: int, starts: tuple[int, int], ring: int
) -> None:
    # A 64-column window fills one block of the kernel exactly; 16 leaves most of it masked.
    shape = text_shape()
    shape = TextShape(**{**shape.__dict__, "sliding_window": ring})
    q, keys, values = random_case(shape, 256, torch.float32)
    where = torch.tensor([column], device=DEVICE)
    first = torch.tensor(starts, device=DEVICE)
    cache = (ring_of(keys, column, ring), ring_of(values, column, ring))

    fused = triton_ops(shape).attention(q, cache, first, where, ring)
    fused_full = triton_ops(shape).attention(q, (keys, values), first, where, ring)
    eager = TorchStepOps(shape).attention(q, (keys, values), first, where, ring)

    torch.testing.assert_close(fused, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused_full, eager, atol=1e-5, rtol=1e-5)


def store_inputs(shape: TextShape, rows: int) -> tuple[Any, ...]:
    generator = torch.Generator(DEVICE).manual_seed(1)

    def random(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=generator, device=DEVICE)

    attn = torch.nn.Module()
    attn.q_norm = Gemma3RMSNorm(shape.head_dim).to(DEVICE)
    attn.k_norm = Gemma3RMSNorm(shape.head_dim).to(DEVICE)
    with torch.no_grad():
        attn.q_norm.weight.normal_(generator=generator)
        attn.k_norm.weight.normal_(generator=generator)
    h, kvh, d = shape.num_heads, shape.num_kv_heads, shape.head_dim
    qkv = (random(rows, 1, h * d), random(rows, 1, kvh * d), random(rows, 1, kvh * d))
    rope = (random(rows, 1, d), random(rows, 1, d))
    return attn, qkv, rope


@pytest.mark.parametrize(
    "make_ops",
    [TorchStepOps, pytest.param(triton_ops, marks=needs_triton)],
    ids=["eager", "triton"],
)
@pytest.mark.parametrize("column", [3, 16, 37])
def test_store_writes_a_ring_at_column_modulo_its_length(make_ops: Any, column: int) -> None:
    shape = text_shape()
    ops = make_ops(shape)
    attn, qkv, rope = store_inputs(shape, rows=2)
    full = [torch.zeros(2, shape.num_kv_heads, 64, shape.head_dim, device=DEVICE) for _ in "kv"]
    ring = [torch.zeros(2, shape.num_kv_heads, WINDOW, shape.head_dim, device=DEVICE) for _ in "kv"]
    where = torch.tensor([column], device=DEVICE)

    with torch.no_grad():
        q_full = ops.qk_rope_store(qkv, attn, rope, (full[0], full[1]), where)
        q_ring = ops.qk_rope_store(qkv, attn, rope, (ring[0], ring[1]), where)

    assert torch.equal(q_ring, q_full)
    for kept, whole in zip(ring, full, strict=True):
        assert torch.equal(kept[:, :, column % WINDOW], whole[:, :, column])
        others = [s for s in range(WINDOW) if s != column % WINDOW]
        assert not kept[:, :, others].any()


def test_store_columns_keeps_the_last_columns_of_a_prompt_in_the_ring() -> None:
    prompt = torch.arange(2 * 1 * 23 * 2, dtype=torch.float32).view(2, 1, 23, 2)
    ring = torch.zeros(3, 1, 8, 2)
    full = torch.zeros(3, 1, 40, 2)

    store_columns(ring, 1, prompt[:, :, -7:], end=23)  # what a window of 8 kept: 16..22
    store_columns(full, 1, prompt, end=23)

    assert torch.equal(full[1:, :, :23], prompt) and not full[0].any()
    for c in range(16, 23):
        assert torch.equal(ring[1:, :, c % 8], prompt[:, :, c])
    assert not ring[0].any() and not ring[1:, :, 23 % 8].any()  # slot 7: column 23 comes next


def test_long_arena_sizes_follow_the_rings_and_the_budget() -> None:
    # 34 layers, every sixth global, a 1,024 window: MedGemma-4B's text stack.
    types = ["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(34)]
    rings = long_rings(types, 1024)
    assert rings.count(0) == 5 and set(rings) == {0, 1024}
    assert long_rings(types, 0) == (0,) * 34

    length = 24_576  # an 85-slice study: 22,300 prompt and 256 new tokens, rounded up
    per_row = sum(row_columns(rings, length))
    assert per_row == 5 * length + 29 * 1024
    assert per_row * 4 * 256 * 2 * 2 == 624_951_296  # bytes in bf16: 0.62 GB (3.4 GB before)
    assert row_columns(rings, 512) == [512] * 34  # a state shorter than the window

    arena = KVArena.allocate(
        grown_sizes(None, rings, 1, length, budget=10**9),
        rings=rings, column_elements=8, dtype=torch.bfloat16, device=torch.device("cpu"),
    )  # fmt: skip
    assert arena.holds(1, length) and not arena.holds(2, length) and arena.holds(1, 4096)
    keys, _ = arena.views(1, 4096, kv_heads=2)
    assert [k.shape[2] for k in keys] == [4096 if r == 0 else 1024 for r in rings]
    wider = grown_sizes(arena, rings, 8, 2048, budget=10**9)
    assert wider == [length if r == 0 else 8 * 1024 for r in rings]  # both shapes fit
    tight = grown_sizes(arena, rings, 8, 2048, budget=sum(wider) - 1)
    assert tight == [8 * 2048 if r == 0 else 8 * 1024 for r in rings]  # the new shape only


@pytest.mark.skipif(not (ON_CUDA and HAS_TRITON), reason="needs CUDA and Triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("column", [22_701, 1_023, 24_575])
def test_triton_ring_matches_the_full_cache_at_ct_lengths(column: int, dtype: torch.dtype) -> None:
    # An 85-slice CT study's row: the full-length local layer (24,576 columns, windowed
    # launch) against its 1,024-column ring, MedGemma-4B's heads.
    shape = TextShape(
        num_layers=1, num_heads=8, num_kv_heads=4, head_dim=256, sliding_window=1024,
        layer_types=("sliding_attention",), scaling=256**-0.5, vocab_size=16,
    )  # fmt: skip
    q, keys, values = random_case(shape, 24_576, dtype)
    ring = (ring_of(keys, column, 1024), ring_of(values, column, 1024))
    starts = torch.tensor([0, min(130, column)], device=DEVICE)
    where = torch.tensor([column], device=DEVICE)

    fused_ring = triton_ops(shape).attention(q, ring, starts, where, 1024)
    fused_full = triton_ops(shape).attention(q, (keys, values), starts, where, 1024)
    eager_ring = TorchStepOps(shape).attention(q, ring, starts, where, 1024)
    eager_full = TorchStepOps(shape).attention(q, (keys, values), starts, where, 1024)

    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(fused_ring, fused_full, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(fused_ring, eager_full, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(eager_ring, eager_full, atol=tolerance, rtol=tolerance)
