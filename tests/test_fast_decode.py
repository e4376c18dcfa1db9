"""The static-buffer greedy decoder gives the tokens ``model.generate(do_sample=False)`` gives.

On CPU (CI) the decode step runs eagerly on the same static buffers the CUDA graphs replay,
so the bookkeeping — left padding, batch buckets, sliding-window columns, EOS and padding,
forced length, batches over max_batch, the fallback — is checked against ``generate`` on the
tiny demo model in float32, where both must agree token for token. The graph and Triton
variants run only where CUDA is present; the long-arena test's Triton variant and the Triton
GEMV test also run on the CPU under Triton's interpreter:

    TRITON_INTERPRET=1 PYTHONPATH=$PWD:/path/to/triton python -m pytest tests/test_fast_decode.py \
        -k "long_prompts_decode_in_the_long_arena or triton_gemv"
"""

from __future__ import annotations

import copy
import os
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from inference import fast_buffers
from inference.fast_decode import HAS_TRITON, FastGreedyGenerator

# Triton's CPU interpreter runs the Triton step on the CPU model (slow: about a minute a test).
INTERPRETED_TRITON = pytest.mark.skipif(
    not (HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"), reason="TRITON_INTERPRET=1"
)
QUESTIONS = ["Describe the chest X-ray.", "Any fracture?", "List the findings, then an impression."]


def study_inputs(processor: Any, questions: list[str]) -> dict[str, torch.Tensor]:
    """Left-padded processor output: one random image and one question per row."""
    rng = np.random.default_rng(7)
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for q in questions
    ]
    images = [[Image.fromarray(rng.integers(0, 255, (80, 72, 3), dtype=np.uint8))] for _ in texts]
    return dict(processor(text=texts, images=images, return_tensors="pt", padding=True))


def plain(model: Any, inputs: dict[str, torch.Tensor], new: int, **kwargs: Any) -> torch.Tensor:
    out = model.generate(**inputs, max_new_tokens=new, do_sample=False, **kwargs)
    return out[:, inputs["input_ids"].shape[1] :].cpu()


def text_inputs(rows: int, length: int, pads: list[int]) -> dict[str, torch.Tensor]:
    """Random text-only prompts, row i left-padded by pads[i]."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(12, 300, (rows, length), generator=generator)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def test_left_padded_batch_matches_generate(model: Any, processor: Any) -> None:
    inputs = study_inputs(processor, QUESTIONS)
    assert inputs["attention_mask"].sum(-1).unique().numel() == 3  # three prompt lengths
    gen = FastGreedyGenerator(model, max_batch=4, max_total_len=256)

    fast = gen.generate(inputs, max_new_tokens=24)

    assert torch.equal(fast, plain(model, inputs, 24))
    assert list(gen._states) == [(4, 256)]  # three rows ran in the bucket of four


def test_forced_length_matches_min_new_tokens(model: Any, processor: Any) -> None:
    inputs = study_inputs(processor, QUESTIONS[:2])
    gen = FastGreedyGenerator(model, max_batch=2, max_total_len=256)

    fast = gen.generate(inputs, max_new_tokens=20, force_new_tokens=True)

    assert fast.shape == (2, 20)
    assert torch.equal(fast, plain(model, inputs, 20, min_new_tokens=20))


def test_rows_stop_at_eos_and_pad_after(model: Any, processor: Any) -> None:
    inputs = study_inputs(processor, QUESTIONS)
    free = plain(model, inputs, 24)
    stop = int(free[0, 5])  # a token row 0 emits early: make it the end of sequence
    gen = FastGreedyGenerator(model, max_batch=4, max_total_len=256, check_every=3)

    fast = gen.generate(inputs, max_new_tokens=24, eos_token_ids=[stop], pad_token_id=0)

    expected = plain(model, inputs, 24, eos_token_id=[stop], pad_token_id=0)
    assert torch.equal(fast, expected)
    first_stop = int((fast[0] == stop).nonzero()[0])
    assert (fast[0, first_stop + 1 :] == 0).all()


def test_sliding_window_chunks_and_buckets(model: Any) -> None:
    # A window of 6 columns, prompts of 20: the local layers drop prompt columns at prefill
    # and keep dropping them while decoding; five rows over max_batch 2 run as 2 + 2 + 1.
    small = copy.deepcopy(model)
    small.config.text_config.sliding_window = 6
    inputs = text_inputs(5, 20, pads=[0, 5, 11, 3, 0])
    gen = FastGreedyGenerator(small, max_batch=2, max_total_len=64, len_step=16)

    fast = gen.generate(inputs, max_new_tokens=30, force_new_tokens=True)

    assert torch.equal(fast, plain(small, inputs, 30, min_new_tokens=30))
    assert sorted(gen._states) == [(1, 64), (2, 64)]


def test_too_long_falls_back_to_generate(model: Any) -> None:
    inputs = text_inputs(2, 20, pads=[0, 4])
    gen = FastGreedyGenerator(model, max_batch=2, max_total_len=32)

    fast = gen.generate(inputs, max_new_tokens=40)

    assert torch.equal(fast, plain(model, inputs, 40))
    assert not gen._states  # no static buffers were used


def multi_image_inputs(processor: Any, images_per_row: list[int]) -> dict[str, torch.Tensor]:
    """Left-padded rows of several random images each (a CT study's slices), one question."""
    rng = np.random.default_rng(3)
    texts, images = [], []
    for count in images_per_row:
        content = [{"type": "image"}] * count + [{"type": "text", "text": "Compare."}]
        texts.append(
            processor.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
            )
        )
        images.append(
            [
                Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
                for _ in range(count)
            ]
        )
    return dict(processor(text=texts, images=images, return_tensors="pt", padding=True))


def test_multi_image_rows_over_max_batch_run_in_passes(model: Any, processor: Any) -> None:
    inputs = multi_image_inputs(processor, [2, 3, 1])
    gen = FastGreedyGenerator(model, max_batch=2, max_total_len=256)

    fast = gen.generate(inputs, max_new_tokens=12)

    assert torch.equal(fast, plain(model, inputs, 12))
    assert sorted(gen._states) == [(1, 256), (2, 256)]


@pytest.mark.parametrize("use_triton", [False, pytest.param(True, marks=INTERPRETED_TRITON)])
def test_long_prompts_decode_in_the_long_arena(
    model: Any, processor: Any, use_triton: bool
) -> None:
    # Ten images a row: a prompt longer than the short arena's 64 columns. The local layer
    # keeps a ring of its 16-column window, which the prompt and the 40 new tokens wrap
    # several times; the shorter row is left-padded by more than a window.
    small = copy.deepcopy(model)
    small.config.text_config.sliding_window = 16
    inputs = multi_image_inputs(processor, [10, 7])
    prompt_len = inputs["input_ids"].shape[1]
    assert prompt_len > 64
    assert int(inputs["attention_mask"][1].eq(0).sum()) > 16
    gen = FastGreedyGenerator(
        small, max_batch=2, max_total_len=64, long_kv_tokens=4096, long_len_step=32,
        use_triton=use_triton,
    )  # fmt: skip

    fast = gen.generate(inputs, max_new_tokens=40, force_new_tokens=True)

    assert torch.equal(fast, plain(small, inputs, 40, min_new_tokens=40))
    length = -(-(prompt_len + 39) // 32) * 32
    assert list(gen._states) == [(2, length)]
    state = gen._states[(2, length)]
    assert [k.shape[2] for k in state.keys] == [16, length]  # sliding, full
    assert gen._long is not None and gen._long.sizes == [2 * 16, 2 * length]
    assert gen._short.sizes == [2 * 64, 2 * 64]  # the short arena keeps full-length layers


def test_the_long_budget_counts_the_rings(model: Any, processor: Any) -> None:
    # A budget of length + 16 columns of both layers: one full-length row and a bit, or two
    # rows whose local layer keeps a 16-column ring.
    small = copy.deepcopy(model)
    small.config.text_config.sliding_window = 16
    inputs = multi_image_inputs(processor, [9, 8])
    prompt_len = inputs["input_ids"].shape[1]
    length = -(-(prompt_len + 11) // 32) * 32
    gen = FastGreedyGenerator(
        small, max_batch=2, max_total_len=64, long_kv_tokens=length + 16, long_len_step=32
    )

    fast = gen.generate(inputs, max_new_tokens=12, force_new_tokens=True)

    assert torch.equal(fast, plain(small, inputs, 12, min_new_tokens=12))
    assert list(gen._states) == [(2, length)]
    assert gen._long is not None and gen._long.sizes == [2 * 16, 2 * length]


def test_long_prompt_budget_bounds_rows_and_prefill_passes(model: Any, processor: Any) -> None:
    # The budget holds one long row at a time; each prefill pass holds one row.
    inputs = multi_image_inputs(processor, [9, 9, 8])
    prompt_len = inputs["input_ids"].shape[1]
    length = -(-(prompt_len + 15) // 32) * 32
    gen = FastGreedyGenerator(
        model, max_batch=4, max_total_len=64, long_kv_tokens=length + 31, long_len_step=32,
        prefill_tokens=prompt_len,
    )  # fmt: skip

    fast = gen.generate(inputs, max_new_tokens=16)

    assert torch.equal(fast, plain(model, inputs, 16))
    assert list(gen._states) == [(1, length)]


def test_long_arena_grows_and_drops_the_states_it_replaces(model: Any, processor: Any) -> None:
    gen = FastGreedyGenerator(
        model, max_batch=2, max_total_len=64, long_kv_tokens=8192, long_len_step=32
    )
    one = multi_image_inputs(processor, [10])
    two = multi_image_inputs(processor, [10, 10])

    gen.generate(one, max_new_tokens=8)
    first_sizes = gen._long.sizes if gen._long is not None else []
    fast = gen.generate(two, max_new_tokens=8)

    assert torch.equal(fast, plain(model, two, 8))
    assert gen._long is not None and gen._long.sizes == [2 * size for size in first_sizes]
    assert [rows for rows, _ in gen._states] == [2]  # the one-row state pointed at old memory


def test_long_prompts_without_a_budget_fall_back(model: Any, processor: Any) -> None:
    inputs = multi_image_inputs(processor, [10])
    gen = FastGreedyGenerator(model, max_batch=2, max_total_len=64)

    fast = gen.generate(inputs, max_new_tokens=8)

    assert torch.equal(fast, plain(model, inputs, 8))
    assert not gen._states and gen._long is None


def test_warm_up_captures_every_bucket_once(model: Any, processor: Any) -> None:
    gen = FastGreedyGenerator(model, max_batch=8, max_total_len=512)
    sample = study_inputs(processor, QUESTIONS[:1])

    gen.warm_up(prompt_len=60, max_new_tokens=100, sample_inputs=sample)
    warm = set(gen._states)
    gen.generate(study_inputs(processor, QUESTIONS), max_new_tokens=8)

    # Each bucket at the warm length, and at the join length (rows joining a running batch).
    assert warm == {(b, length) for b in (1, 2, 4, 8) for length in (256, 512)}
    assert set(gen._states) == warm  # shorter requests reuse the warm graphs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("use_triton", [False, pytest.param(True, marks=pytest.mark.skipif(
    not HAS_TRITON, reason="needs Triton"))])  # fmt: skip
def test_cuda_graph_replay_matches_generate(model: Any, processor: Any, use_triton: bool) -> None:
    cuda_model = copy.deepcopy(model).to("cuda")
    inputs = {k: v.to("cuda") for k, v in study_inputs(processor, QUESTIONS).items()}
    gen = FastGreedyGenerator(cuda_model, max_batch=4, max_total_len=256, use_triton=use_triton)

    fast = gen.generate(inputs, max_new_tokens=32, force_new_tokens=True)

    assert all(state.graph is not None for state in gen._states.values())
    assert torch.equal(fast, plain(cuda_model, inputs, 32, min_new_tokens=32))


def test_between_steps_hook_may_generate_on_a_second_generator(model: Any, processor: Any) -> None:
    # The worker's use: a long study batch calls back between decode steps, and a question is
    # answered there on a generator with its own buffers; the batch's tokens must not change.
    inputs = study_inputs(processor, QUESTIONS)
    question = text_inputs(1, 14, pads=[0])
    batch_gen = FastGreedyGenerator(model, max_batch=4, max_total_len=256)
    priority = FastGreedyGenerator(model, max_batch=2, max_total_len=256)
    alone = batch_gen.generate(inputs, max_new_tokens=30, force_new_tokens=True)
    answers: list[torch.Tensor] = []
    calls = 0

    def between_steps() -> None:
        nonlocal calls
        calls += 1
        if calls in (2, 17):
            answers.append(priority.generate(question, max_new_tokens=10))
        if calls == 3:  # its own buffers hold the running batch: refused, batch unharmed
            with pytest.raises(RuntimeError, match="while this generator's batch runs"):
                batch_gen.generate(question, max_new_tokens=4)

    interrupted = batch_gen.generate(
        inputs, max_new_tokens=30, force_new_tokens=True, between_steps=between_steps
    )

    assert calls == 29  # on CPU check_every is 1: before every step after the first token
    assert torch.equal(interrupted, alone)
    expected = plain(model, question, 10)
    assert len(answers) == 2 and all(torch.equal(a, expected) for a in answers)
    again = batch_gen.generate(inputs, max_new_tokens=30, force_new_tokens=True)
    assert torch.equal(again, alone) and calls == 29, "the hook is for one call only"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("use_triton", [False, pytest.param(True, marks=pytest.mark.skipif(
    not HAS_TRITON, reason="needs Triton"))])  # fmt: skip
def test_long_prompt_graphs_match_generate(model: Any, processor: Any, use_triton: bool) -> None:
    # Forty images a row, a 64-column window: the local layers' decode attention reads only
    # the window's blocks of a long buffer (Triton), the long arena's graphs replay.
    cuda_model = copy.deepcopy(model).to("cuda")
    cuda_model.config.text_config.sliding_window = 64
    inputs = {k: v.to("cuda") for k, v in multi_image_inputs(processor, [40, 33]).items()}
    gen = FastGreedyGenerator(
        cuda_model, max_batch=2, max_total_len=64, long_kv_tokens=4096, long_len_step=64,
        use_triton=use_triton,
    )  # fmt: skip

    fast = gen.generate(inputs, max_new_tokens=40, force_new_tokens=True)

    assert gen._long is not None
    assert all(state.graph is not None for state in gen._states.values())
    assert torch.equal(fast, plain(cuda_model, inputs, 40, min_new_tokens=40))


@pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs CUDA and Triton")
@pytest.mark.parametrize("window", [0, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_decode_attention_matches_sdpa_on_a_long_buffer(
    window: int, dtype: torch.dtype
) -> None:
    # An 85-slice CT study's buffer: 24,576 columns make 384 splits of 64, which the merge
    # kernel reads 32 at a time (inference/triton_kernels.py attn_combine_kernel).
    from inference.step_ops import TextShape, TorchStepOps
    from inference.triton_ops import TritonStepOps

    shape = TextShape(
        num_layers=1, num_heads=8, num_kv_heads=4, head_dim=256, sliding_window=1024,
        layer_types=("full_attention",), scaling=256**-0.5, vocab_size=16,
    )  # fmt: skip
    generator = torch.Generator("cuda").manual_seed(0)

    def random(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=generator, device="cuda").to(dtype)

    rows, length = 2, 24_576
    q, cache = random(rows, 8, 256), (random(rows, 4, length, 256), random(rows, 4, length, 256))
    starts = torch.tensor([0, 130], device="cuda")
    column = torch.tensor(22_701, device="cuda")

    fused = TritonStepOps(shape, gelu_tanh=True).attention(q, cache, starts, column, window)
    eager = TorchStepOps(shape).attention(q, cache, starts, column, window)

    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(fused, eager, atol=tolerance, rtol=tolerance)


def test_fused_projections_decode_the_tokens_of_generate(model: Any, processor: Any) -> None:
    fused_model = copy.deepcopy(model)
    inputs = study_inputs(processor, QUESTIONS)
    gen = FastGreedyGenerator(fused_model, max_batch=4, max_total_len=256, fuse_projections=True)

    fast = gen.generate(inputs, max_new_tokens=24)

    assert all(weight is not None for weight in gen._qkv)
    assert all(weight is not None for weight in gen._gate_up)
    assert torch.equal(fast, plain(model, inputs, 24))
    assert torch.equal(plain(fused_model, inputs, 24), plain(model, inputs, 24))


GEMV_HERE = pytest.mark.skipif(
    not (HAS_TRITON and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")),
    reason="needs Triton with CUDA or TRITON_INTERPRET=1",
)


@GEMV_HERE
@pytest.mark.parametrize("rows", [1, 3])
def test_triton_gemv_and_fused_mlp_decode_the_tokens_of_generate(
    model: Any, processor: Any, rows: int
) -> None:
    # Every product of the step by the Triton GEMV (one row: the CUDA-core loop; a bucket of
    # four: the tensor-core one), the MLP's GeGLU reading the fused gate/up product in place.
    from inference.gemv import CONFIGS, GemvPicker

    device = "cuda" if torch.cuda.is_available() else "cpu"
    fused_model = copy.deepcopy(model).to(device)
    inputs = {k: v.to(device) for k, v in study_inputs(processor, QUESTIONS[:rows]).items()}
    gen = FastGreedyGenerator(
        fused_model, max_batch=4, max_total_len=256, use_triton=True, fuse_projections=True
    )
    config = next(c for c in CONFIGS if c.dot == (rows > 1))
    gen._gemv = GemvPicker(True, forced=config)

    fast = gen.generate(inputs, max_new_tokens=12, force_new_tokens=True)

    assert all(weight is not None for weight in gen._gate_up)
    assert torch.equal(fast, plain(fused_model, inputs, 12, min_new_tokens=12))


@pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs CUDA and Triton")
def test_products_are_chosen_before_the_graphs_are_captured(model: Any, processor: Any) -> None:
    # bf16: the products are timed (cuBLAS against the Triton configs) in the warm-up steps
    # before each capture; the graphs replay those choices, so they give the eager step's tokens.
    from inference.gemv import GemvPicker

    bf16 = copy.deepcopy(model).to("cuda", torch.bfloat16)
    inputs = {k: v.to("cuda") for k, v in study_inputs(processor, QUESTIONS).items()}
    graphs = FastGreedyGenerator(bf16, max_batch=4, max_total_len=256)
    choices = graphs._gemv.choices = {}
    eager = FastGreedyGenerator(bf16, max_batch=4, max_total_len=256, use_cuda_graphs=False)
    eager._gemv = GemvPicker(True, choices=choices)

    graphs.warm_up(prompt_len=60, max_new_tokens=100)
    chosen = dict(choices)
    fast = graphs.generate(inputs, max_new_tokens=24, force_new_tokens=True)

    assert all(state.graph is not None for state in graphs._states.values())
    text = bf16.config.text_config
    q_kv = (text.num_attention_heads + 2 * text.num_key_value_heads) * text.head_dim
    shapes = {(q_kv, text.hidden_size), (2 * text.intermediate_size, text.hidden_size)}
    shapes |= {(text.hidden_size, text.intermediate_size), (text.vocab_size, text.hidden_size)}
    assert {(rows, n, k) for rows, n, k, _, _ in chosen} == {
        (rows, n, k) for rows in (1, 2, 4) for n, k in shapes
    } | {(rows, text.hidden_size, text.num_attention_heads * text.head_dim) for rows in (1, 2, 4)}
    assert choices == chosen  # the generation timed nothing more
    assert torch.equal(fast, eager.generate(inputs, max_new_tokens=24, force_new_tokens=True))


def test_a_prompt_pass_cache_has_its_windows_on_the_device_already(model: Any) -> None:
    """The local layers' window sizes are made on the pass's device (inference/fast_buffers.py
    prompt_cache): no layer copies its own from the host, a copy that waits for the GPU. The
    ``meta`` device stands in for CUDA here; on the CPU nothing is replaced."""
    meta = fast_buffers.prompt_cache(model, torch.device("meta"))
    windows = [(layer.sliding_window, layer._sliding_window_tensor) for layer in meta.layers
               if hasattr(layer, "_sliding_window_tensor")]  # fmt: skip
    assert windows and all(t.device.type == "meta" and t.dtype == torch.long for _, t in windows)
    sliding = model.config.get_text_config().sliding_window
    assert {size for size, _ in windows} == {sliding}
    on_cpu = fast_buffers.prompt_cache(model, torch.device("cpu"))
    assert all(
        int(layer._sliding_window_tensor) == sliding
        for layer in on_cpu.layers
        if hasattr(layer, "_sliding_window_tensor")
    )
