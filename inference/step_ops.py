"""The small operations of one decode step, behind one protocol with two implementations.

``inference.fast_decode.FastGreedyGenerator`` runs every decoder layer of Gemma 3 as: the
model's own q/k/v projections, then ``qk_rope_store`` (qk-norm, RoPE, K and V into the static
cache), ``attention`` over the cached columns, the model's ``o_proj``, ``add_norm`` (residual
add and the next RMSNorm), ``mlp``, ``add_norm`` again; ``norm`` opens the first layer and
``prompt_pass`` wraps the prompt's forward. Those operations are a ``StepOps``:

* ``TorchStepOps`` (here): the model's own modules and ``scaled_dot_product_attention``,
  exact eager numerics; what runs without CUDA (CI) and the reference for the other;
* ``TritonStepOps`` (inference/triton_ops.py): the same operations as fused Triton kernels
  (inference/triton_kernels.py) that round to the model dtype wherever eager PyTorch does.

The matrix products are not ``StepOps``: the model's own modules (so bitsandbytes NF4 layers
work unchanged), or on CUDA plain projections fused by rows (inference/fused_qkv.py) and each
run by the kernel timed fastest for its shape (inference/gemv.py); ``geglu`` is the MLP's
activation for the fused gate/up product.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

# transformers' modules are reached by attribute (q_proj, input_layernorm, ...); torch's stubs
# type such access as ``Tensor | Module``, so they are handled as Any here.
HFModule = Any


@dataclass(frozen=True)
class TextShape:
    """What a decode step needs to know of the text model's configuration."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    sliding_window: int
    layer_types: tuple[str, ...]
    scaling: float
    vocab_size: int


def text_shape(model: HFModule) -> TextShape:
    config = model.config.get_text_config()
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise TypeError("attention logit softcapping is not supported by the fast path")
    layer_types = tuple(config.layer_types)
    return TextShape(
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        sliding_window=int(config.sliding_window or 0),
        layer_types=layer_types,
        scaling=float(config.query_pre_attn_scalar) ** -0.5,
        vocab_size=config.vocab_size,
    )


def language_model(model: HFModule) -> HFModule:
    """Gemma3ForConditionalGeneration keeps the text stack at ``model.model.language_model``."""
    inner = getattr(model, "model", None)
    language_model = getattr(inner, "language_model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if language_model is None or not all(hasattr(language_model, n) for n in needed):
        raise TypeError(f"{type(model).__name__} is not a Gemma 3 image-text model")
    return language_model


class StepOps(Protocol):
    """The operations between the matrix products of one decode step (and the prompt pass).

    Shapes: ``q``/``k``/``v`` as the projections give them for one token a row; the cache is
    ``(keys, values)``, each [rows, kv_heads, columns, head_dim]; ``column`` [1] is the KV column
    the token is written to and ``starts`` [rows] each row's first valid column.

    KV column c lives at slot c % columns. A full-length cache has more columns than any
    column written to it, so that is slot c. A local layer of the long arena keeps a ring of
    its ``window`` columns (inference/fast_buffers.py): slot s then holds the last column
    written there, c' = column - ((column - s) mod columns), valid where c' >= starts[row] and
    c' > column - window. The same formula reads a full-length cache (a slot past ``column``
    maps below 0), so neither operation needs to be told which kind a layer has; keys are
    stored after RoPE, so slot order changes only the order of the softmax's sums.
    """

    def norm(self, module: HFModule, x: torch.Tensor) -> torch.Tensor:
        """``module(x)`` for a Gemma RMSNorm ``module``."""
        ...

    def add_norm(
        self, y: torch.Tensor, residual: torch.Tensor, post: HFModule, following: HFModule
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``h = residual + post(y)``; returns ``(h, following(h))`` as the decoder layer does."""
        ...

    def qk_rope_store(
        self,
        qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        attn: HFModule,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: tuple[torch.Tensor, torch.Tensor],
        column: torch.Tensor,
    ) -> torch.Tensor:
        """qk-norm and RoPE; K and V go into the cache at slot ``column`` % its columns;
        returns q [rows, H, D]."""
        ...

    def attention(
        self,
        q: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor],
        starts: torch.Tensor,
        column: torch.Tensor,
        window: int,
    ) -> torch.Tensor:
        """One query per row over KV columns ``starts..column``, and only the last ``window``
        of them when ``window`` > 0 (Gemma's local layers), wherever the cache's slots hold
        them; returns [rows, 1, H*D]."""
        ...

    def mlp(self, module: HFModule, x: torch.Tensor) -> torch.Tensor:
        """``module(x)`` for a Gemma GeGLU MLP ``module``."""
        ...

    def geglu(self, module: HFModule, gate_up: torch.Tensor) -> torch.Tensor:
        """``act_fn(gate) * up`` of GeGLU ``module``, gate and up being the first and second
        half of each row of ``gate_up`` (one product by the fused weight)."""
        ...

    def prompt_pass(self, language_model: HFModule) -> contextlib.AbstractContextManager[None]:
        """A context in which the model's own forward runs the prompt."""
        ...


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class TorchStepOps(StepOps):
    """The small operations of a decode step with the model's own modules: exact eager numerics."""

    def __init__(self, shape: TextShape) -> None:
        self.shape = shape

    def norm(self, module: HFModule, x: torch.Tensor) -> torch.Tensor:
        return module(x)

    def add_norm(
        self, y: torch.Tensor, residual: torch.Tensor, post: HFModule, following: HFModule
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = residual + post(y)
        return hidden, following(hidden)

    def qk_rope_store(
        self,
        qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        attn: HFModule,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: tuple[torch.Tensor, torch.Tensor],
        column: torch.Tensor,
    ) -> torch.Tensor:
        s = self.shape
        q, k, v = qkv
        rows = q.shape[0]
        cos, sin = rope  # [rows, 1, D]
        q = attn.q_norm(q.view(rows, s.num_heads, s.head_dim))
        k = attn.k_norm(k.view(rows, s.num_kv_heads, s.head_dim))
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        slot = column % cache[0].shape[2]  # on the device: the graph replays it
        cache[0].index_copy_(2, slot, k.unsqueeze(2))
        cache[1].index_copy_(2, slot, v.view(rows, s.num_kv_heads, 1, s.head_dim))
        return q

    def attention(
        self,
        q: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor],
        starts: torch.Tensor,
        column: torch.Tensor,
        window: int,
    ) -> torch.Tensor:
        s = self.shape
        keys, values = cache
        rows, columns = keys.shape[0], keys.shape[2]
        slots = torch.arange(columns, device=keys.device)
        # The KV column each slot holds (the protocol's formula; floor modulo, never negative).
        held = column - (column - slots) % columns
        valid = held[None, :] >= starts[:, None]
        if window > 0:
            valid &= held[None, :] > column - window
        # Query heads grouped under their KV head (GQA without repeating K and V).
        grouped = q.view(rows, s.num_kv_heads, s.num_heads // s.num_kv_heads, s.head_dim)
        out = F.scaled_dot_product_attention(
            grouped, keys, values, attn_mask=valid[:, None, None, :], scale=s.scaling
        )
        return out.reshape(rows, 1, s.num_heads * s.head_dim)

    def mlp(self, module: HFModule, x: torch.Tensor) -> torch.Tensor:
        return module(x)

    def geglu(self, module: HFModule, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return module.act_fn(gate) * up

    @contextlib.contextmanager
    def prompt_pass(self, language_model: HFModule) -> Iterator[None]:
        """The model's own modules as they are."""
        yield


def chosen(shape: TextShape, *, use_triton: bool, gelu_tanh: bool) -> StepOps:
    """The eager step, or the Triton one: imported only when chosen (CI has neither CUDA nor
    Triton)."""
    if not use_triton:
        return TorchStepOps(shape)
    from inference.triton_ops import TritonStepOps

    return TritonStepOps(shape, gelu_tanh)
