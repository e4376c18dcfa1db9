"""q, k and v projections (and gate and up) fused into one weight whose rows the modules keep
as views."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import Gemma3TextConfig
from transformers.models.gemma3.modeling_gemma3 import Gemma3MLP

from inference.fused_qkv import (
    GATE_UP,
    QKV,
    apply_linear,
    fuse_gate_up,
    fuse_qkv,
    fuse_rows,
    project_mlp,
    project_qkv,
)
from inference.step_ops import TextShape, TorchStepOps


def attention(bias: bool = False) -> SimpleNamespace:
    torch.manual_seed(0)
    return SimpleNamespace(
        q_proj=torch.nn.Linear(16, 8, bias=bias),
        k_proj=torch.nn.Linear(16, 4, bias=bias),
        v_proj=torch.nn.Linear(16, 4, bias=bias),
    )


def test_the_modules_weights_become_views_of_one_fused_weight() -> None:
    attn = attention()
    before = [p.weight.detach().clone() for p in (attn.q_proj, attn.k_proj, attn.v_proj)]

    weight = fuse_qkv(attn)

    assert weight is not None and weight.shape == (16, 16)
    assert torch.equal(weight, torch.cat(before))
    assert attn.q_proj.weight.data_ptr() == weight.data_ptr()
    assert attn.v_proj.weight.data_ptr() == weight[12:].data_ptr()
    assert fuse_qkv(attn) is weight  # a second generator reuses it


def test_fused_projection_gives_the_modules_results() -> None:
    attn = attention()
    x = torch.randn(3, 1, 16)
    separate = (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x))

    fused = project_qkv(attn, x, fuse_qkv(attn))

    assert [t.shape for t in fused] == [(3, 1, 8), (3, 1, 4), (3, 1, 4)]
    for got, want in zip(fused, separate, strict=True):
        torch.testing.assert_close(got, want)


def test_projections_with_bias_are_left_to_their_modules() -> None:
    attn = attention(bias=True)
    x = torch.randn(2, 1, 16)

    assert fuse_qkv(attn) is None
    separate = (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x))
    for got, want in zip(project_qkv(attn, x, None), separate, strict=True):
        assert torch.equal(got, want)


def gemma_mlp() -> Gemma3MLP:
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        hidden_size=16, intermediate_size=24, hidden_activation="gelu_pytorch_tanh"
    )
    return Gemma3MLP(config).eval()


def eager_ops() -> TorchStepOps:
    return TorchStepOps(
        TextShape(
            num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, sliding_window=0,
            layer_types=("full_attention",), scaling=1.0, vocab_size=16,
        )
    )  # fmt: skip


def test_gate_and_up_become_views_of_one_fused_weight() -> None:
    mlp = gemma_mlp()
    x = torch.randn(3, 1, 16)
    before = [mlp.gate_proj.weight.detach().clone(), mlp.up_proj.weight.detach().clone()]
    outputs = (mlp.gate_proj(x), mlp.up_proj(x), mlp(x))

    weight = fuse_gate_up(mlp)

    assert weight is not None and weight.shape == (48, 16)
    assert torch.equal(weight, torch.cat(before))
    # No memory added: the modules' weights are the fused tensor's rows.
    assert mlp.gate_proj.weight.data_ptr() == weight.data_ptr()
    assert mlp.up_proj.weight.data_ptr() == weight[24:].data_ptr()
    assert mlp.up_proj.weight.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
    # The prompt pass calls the modules: their outputs are bit for bit the same.
    with torch.no_grad():
        for got, want in zip((mlp.gate_proj(x), mlp.up_proj(x), mlp(x)), outputs, strict=True):
            assert torch.equal(got, want)
    assert fuse_gate_up(mlp) is weight  # a second generator reuses it


def test_fused_mlp_gives_the_modules_result() -> None:
    mlp = gemma_mlp()
    x = torch.randn(4, 1, 16)
    with torch.no_grad():
        want = mlp(x)
        got = project_mlp(mlp, x, fuse_gate_up(mlp), eager_ops())
        unfused = project_mlp(mlp, x, None, eager_ops())

    torch.testing.assert_close(got, want)
    assert torch.equal(unfused, want)


def test_fused_mlp_runs_both_products_by_the_given_linear() -> None:
    mlp = gemma_mlp()
    calls: list[tuple[int, int]] = []

    def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(weight.shape))
        return torch.nn.functional.linear(x, weight)

    with torch.no_grad():
        project_mlp(mlp, torch.randn(1, 1, 16), fuse_gate_up(mlp), eager_ops(), linear)

    assert calls == [(48, 16), (16, 24)]  # gate+up at once, then down


@pytest.mark.parametrize(
    "change", ["bias", "dtype", "subclass"], ids=["bias", "mixed-dtypes", "linear-subclass"]
)
def test_rows_are_fused_only_for_plain_linears_of_one_dtype(change: str) -> None:
    class Quantised(torch.nn.Linear):
        pass

    mlp = gemma_mlp()
    if change == "bias":
        mlp.up_proj = torch.nn.Linear(16, 24, bias=True)
    elif change == "dtype":
        mlp.up_proj = mlp.up_proj.double()
    else:
        mlp.up_proj = Quantised(16, 24, bias=False)
    weight_before = mlp.gate_proj.weight

    assert fuse_rows(mlp, GATE_UP, "_fused") is None
    assert mlp.gate_proj.weight is weight_before and not hasattr(mlp, "_fused")


def test_fuse_qkv_is_fuse_rows_of_q_k_and_v() -> None:
    attn = attention()
    weight = fuse_rows(attn, QKV, "_decode_qkv_weight")

    assert weight is not None and fuse_qkv(attn) is weight


def test_apply_linear_uses_the_given_linear_only_for_plain_linears() -> None:
    x = torch.randn(2, 1, 16)
    seen: list[torch.Tensor] = []

    def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        seen.append(weight)
        return torch.nn.functional.linear(x, weight)

    plain, biased = torch.nn.Linear(16, 8, bias=False), torch.nn.Linear(16, 8)

    assert torch.equal(apply_linear(plain, x, linear), plain(x))
    assert torch.equal(apply_linear(biased, x, linear), biased(x))
    assert len(seen) == 1 and seen[0] is plain.weight
