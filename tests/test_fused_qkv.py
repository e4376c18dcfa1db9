"""q, k and v projections fused into one weight whose rows the modules keep as views."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from inference.fused_qkv import fuse_qkv, project_qkv


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
