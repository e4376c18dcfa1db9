"""The decode step's GEMV kernel, its selection against cuBLAS, and the GeGLU that reads the fused
gate/up product in place.

The kernels run where CUDA is, and on the CPU under Triton's interpreter when it is installed;
the selection's CPU behaviour (everything stays ``F.linear``) runs everywhere:

    TRITON_INTERPRET=1 PYTHONPATH=$PWD:/path/to/triton python -m pytest tests/test_gemv.py
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from inference import gemv
from inference.gemv import CONFIGS, GemvConfig, GemvPicker
from inference.step_ops import TextShape, TorchStepOps

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
TRITON_HERE = gemv.HAS_TRITON and (ON_CUDA or os.environ.get("TRITON_INTERPRET") == "1")
needs_triton = pytest.mark.skipif(
    not TRITON_HERE, reason="needs Triton with CUDA or TRITON_INTERPRET=1"
)
needs_cuda = pytest.mark.skipif(not (ON_CUDA and gemv.HAS_TRITON), reason="needs CUDA and Triton")

# (rows, N, K): N and K off the block sizes, K under one block, K whose last split is short,
# the bucket sizes the decode step uses.
SHAPES = [(1, 40, 300), (2, 130, 96), (3, 37, 520), (4, 17, 2048), (8, 64, 1100), (1, 9, 1300)]
TOLERANCE = {torch.bfloat16: (1e-2, 1e-2), torch.float32: (1e-5, 1e-4)}  # (rtol, atol)
DOT = next(c for c in CONFIGS if c.dot and c.split_k == 1)


def shape() -> TextShape:
    return TextShape(
        num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, sliding_window=0,
        layer_types=("full_attention",), scaling=0.25, vocab_size=16,
    )  # fmt: skip


def random(*size: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator(DEVICE).manual_seed(seed)
    return torch.randn(*size, generator=generator, device=DEVICE).to(dtype)


# --------------------------------------------------------------------------- the kernel


@needs_triton
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name.replace(" ", "-"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gemv_matches_torch(config: GemvConfig, dtype: torch.dtype) -> None:
    for rows, n, k in SHAPES:
        if not config.applies(rows):
            continue
        weight, x = random(n, k, dtype=dtype), random(rows, 1, k, dtype=dtype, seed=1)
        exact = F.linear(x.double(), weight.double())

        got = gemv.gemv(x, weight, config)

        assert got.shape == (rows, 1, n) and got.dtype == dtype
        # float32 sums: the bf16 output is within its rounding of the exact product.
        rtol, atol = TOLERANCE[dtype]
        torch.testing.assert_close(got.double(), exact, rtol=rtol, atol=atol)


@needs_triton
def test_gemv_refuses_what_a_config_cannot_multiply() -> None:
    one_row = next(c for c in CONFIGS if not c.dot)
    weight = random(32, 64)
    with pytest.raises(ValueError, match="cannot multiply"):
        gemv.gemv(random(2, 1, 64), weight, one_row)  # the CUDA-core loop takes one row
    with pytest.raises(ValueError, match="cannot multiply"):
        gemv.gemv(random(9, 1, 64), weight, DOT)
    with pytest.raises(ValueError, match="cannot multiply"):
        gemv.gemv(random(1, 1, 32), weight.t(), DOT)  # a transposed view: not row-major


# --------------------------------------------------------------------------- the GeGLU


def gelu_mlp() -> SimpleNamespace:
    return SimpleNamespace(act_fn=ACT2FN["gelu_pytorch_tanh"])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "n"), [(1, 1000), (3, 2500), (8, 64)])
def test_geglu_reads_gate_and_up_as_the_halves_of_each_row(
    dtype: torch.dtype, rows: int, n: int
) -> None:
    from inference.triton_ops import TritonStepOps

    # Rows 2n + 48 apart, as a fused product's rows would be with padding: the kernel must
    # follow the stride, not assume 2n.
    wide = random(rows, 1, 2 * n + 48, dtype=dtype)
    gate_up = wide[..., : 2 * n]
    expected = TorchStepOps(shape()).geglu(gelu_mlp(), gate_up)

    got = TritonStepOps(shape(), gelu_tanh=True).geglu(gelu_mlp(), gate_up)

    assert got.shape == (rows, 1, n) and got.is_contiguous()
    torch.testing.assert_close(got, expected)
    gate, up = gate_up[..., :n], gate_up[..., n:]
    torch.testing.assert_close(got, ACT2FN["gelu_pytorch_tanh"](gate) * up)


@needs_triton
def test_unfused_mlp_still_reads_contiguous_gate_and_up() -> None:
    from inference.triton_ops import TritonStepOps

    torch.manual_seed(0)
    mlp = SimpleNamespace(
        gate_proj=torch.nn.Linear(32, 1500, bias=False).to(DEVICE),
        up_proj=torch.nn.Linear(32, 1500, bias=False).to(DEVICE),
        down_proj=torch.nn.Linear(1500, 32, bias=False).to(DEVICE),
        act_fn=ACT2FN["gelu_pytorch_tanh"],
    )
    x = random(3, 1, 32)
    expected = mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))

    torch.testing.assert_close(TritonStepOps(shape(), gelu_tanh=True).mlp(mlp, x), expected)


# --------------------------------------------------------------------------- the choice


def test_the_fastest_triton_config_must_beat_cublas_by_the_margin() -> None:
    a, b = CONFIGS[0], CONFIGS[1]

    assert gemv.fastest({None: 10.0, a: 9.0, b: 8.0}) == b
    assert gemv.fastest({None: 10.0, a: 9.9}) is None  # within the timing noise
    assert gemv.fastest({None: 10.0, a: 12.0}) is None
    assert gemv.fastest({None: 10.0}) is None  # every config failed to compile


def test_products_stay_f_linear_when_off_on_the_cpu_or_without_triton(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_timing(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("nothing is timed here")

    monkeypatch.setattr(gemv, "measure", no_timing)
    weight = torch.randn(24, 40, dtype=torch.bfloat16)
    x = torch.randn(1, 1, 40, dtype=torch.bfloat16)
    choices: dict[Any, Any] = {}
    pickers = [GemvPicker(False, choices=choices), GemvPicker(True, choices=choices)]
    monkeypatch.setattr(gemv, "HAS_TRITON", False)
    pickers.append(GemvPicker(True, forced=DOT, choices=choices))

    for picker in pickers:
        assert picker.choice(x, weight) is None
        assert torch.equal(picker.linear(x, weight), F.linear(x, weight))
    assert choices == {}
    assert not pickers[0].enabled and not pickers[2].enabled


def test_a_forced_config_goes_only_where_it_applies(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gemv, "HAS_TRITON", True)  # the choice alone: nothing is launched
    one_row = next(c for c in CONFIGS if not c.dot)
    weight = torch.randn(24, 40)

    assert GemvPicker(True, forced=one_row).choice(torch.randn(1, 1, 40), weight) == one_row
    assert GemvPicker(True, forced=one_row).choice(torch.randn(2, 1, 40), weight) is None
    assert GemvPicker(True, forced=DOT).choice(torch.randn(8, 1, 40), weight) == DOT
    assert GemvPicker(True, forced=DOT).choice(torch.randn(16, 1, 40), weight) is None
    assert GemvPicker(True, forced=DOT).choice(torch.randn(1, 1, 24), weight.t()) is None
    assert GemvPicker(True, forced=DOT).choice(torch.randn(1, 1, 40).double(), weight) is None


@needs_cuda
def test_the_choice_is_timed_once_outside_a_capture_and_kept() -> None:
    choices: dict[Any, Any] = {}
    picker = GemvPicker(True, choices=choices)
    weight = random(4096, 2560, dtype=torch.bfloat16)
    x = random(1, 1, 2560, dtype=torch.bfloat16, seed=1)

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        F.linear(x, weight)  # cuBLAS's handle for this stream, before the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        picker.linear(x, weight)  # a shape first met inside a capture: cuBLAS, untimed
    assert choices == {}

    got = picker.linear(x, weight)

    key = (1, 4096, 2560, torch.bfloat16, weight.device)
    assert list(choices) == [key]
    torch.testing.assert_close(got, F.linear(x, weight), rtol=1e-2, atol=1e-2)
    before = dict(choices)
    picker.linear(x, weight)
    assert choices == before  # timed once


@needs_cuda
def test_measure_times_cublas_and_the_configs_that_apply() -> None:
    weight = random(1024, 2560, dtype=torch.bfloat16)

    one_row = gemv.measure(1, weight, runs=2)
    eight_rows = gemv.measure(8, weight, runs=2)

    assert None in one_row and all(t > 0 for t in one_row.values())
    assert any(c is not None and not c.dot for c in one_row)
    assert all(c is None or c.dot for c in eight_rows)
