"""Greedy decoding for Gemma 3 (MedGemma) on static KV buffers, one CUDA graph replay a token.

Plain ``model.generate`` is CPU-bound at batch 1 on the H100: the Python and launch cost of
some 1,500 small kernels a token (design.md, "GPU fast path"). Here:

* the prompt (vision tower + text, batched, left-padded) runs through the model's own forward,
  with the same arguments ``generate`` gives its first step (on CUDA the text model's RMSNorms
  and GeGLU MLPs run meanwhile as the fused kernels below);
* its KV cache is copied into static per-layer buffers of ``rows x length`` columns, where rows
  is the batch rounded up to a bucket (1, 2, 4, ... max_batch) and length the prompt plus the
  new tokens rounded up to ``len_step``;
* one decode step — embedding, every layer, lm_head, argmax, EOS bookkeeping — runs on those
  buffers with fixed shapes and is captured once per (rows, length) in a ``torch.cuda.CUDAGraph``
  that is replayed for each token;
* on CUDA with Triton, the small operations between the matrix products (RMSNorm, residual add,
  qk-norm + RoPE + KV write, decode attention, GeGLU) run as fused kernels that round to the
  model dtype wherever eager PyTorch does; the matrix products stay the model's own modules
  (so bitsandbytes NF4 layers work unchanged). Without CUDA (CI) the same step runs eagerly
  with the model's own modules and ``scaled_dot_product_attention``.

The tokens equal ``model.generate(do_sample=False)`` for the same inputs: the same function,
rounded to the model dtype at the same points; only the order of float32 reductions (norms,
attention) differs, so bf16 results could part where two logits tie within rounding. On the
H100 with the random-weight MedGemma-4B in bf16, all 105 rows of the benchmark (batches 1, 8,
32, 64) gave the same 256 tokens as ``generate`` (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

HAS_TRITON = importlib.util.find_spec("triton") is not None
DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
_MAX_EOS_IDS = 8  # EOS ids live in a fixed-size device tensor so the graph never changes
_ATTN_BLOCK = 64  # KV columns per decode-attention program

# transformers' modules are reached by attribute (q_proj, input_layernorm, ...); torch's stubs
# type such access as ``Tensor | Module``, so they are handled as Any here.
HFModule = Any


@dataclass(frozen=True)
class _TextShape:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    sliding_window: int
    layer_types: tuple[str, ...]
    scaling: float
    vocab_size: int


def _text_shape(model: HFModule) -> _TextShape:
    config = model.config.get_text_config()
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise TypeError("attention logit softcapping is not supported by the fast path")
    layer_types = tuple(config.layer_types)
    return _TextShape(
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        sliding_window=int(config.sliding_window or 0),
        layer_types=layer_types,
        scaling=float(config.query_pre_attn_scalar) ** -0.5,
        vocab_size=config.vocab_size,
    )


def _language_model(model: HFModule) -> HFModule:
    """Gemma3ForConditionalGeneration keeps the text stack at ``model.model.language_model``."""
    inner = getattr(model, "model", None)
    language_model = getattr(inner, "language_model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if language_model is None or not all(hasattr(language_model, n) for n in needed):
        raise TypeError(f"{type(model).__name__} is not a Gemma 3 image-text model")
    return language_model


@dataclass
class _DecodeState:
    """Static buffers of one (rows, length) shape; the graph reads and writes only these."""

    rows: int
    length: int
    keys: list[torch.Tensor]  # per layer [rows, kv_heads, length, head_dim], views of the arena
    values: list[torch.Tensor]
    tokens: torch.Tensor  # [rows] the token each row feeds in next
    positions: torch.Tensor  # [rows] its RoPE position (left padding not counted)
    starts: torch.Tensor  # [rows] first KV column the row may attend to (its left padding)
    column: torch.Tensor  # [1] KV column the next token is written to
    step: torch.Tensor  # [1] index of the next output token
    done: torch.Tensor  # [rows] the row has emitted an EOS
    out: torch.Tensor  # [rows, length] generated tokens, pad after EOS
    graph: torch.cuda.CUDAGraph | None = None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _TorchOps:
    """The small operations of a decode step with the model's own modules: exact eager numerics."""

    def __init__(self, shape: _TextShape) -> None:
        self.shape = shape

    def norm(self, module: HFModule, x: torch.Tensor) -> torch.Tensor:
        return module(x)

    def add_norm(
        self, y: torch.Tensor, residual: torch.Tensor, post: HFModule, following: HFModule
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``h = residual + post(y)``; returns ``(h, following(h))`` as the decoder layer does."""
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
        """qk-norm and RoPE; K and V go into the cache at ``column``; returns q [rows, H, D]."""
        s = self.shape
        q, k, v = qkv
        rows = q.shape[0]
        cos, sin = rope  # [rows, 1, D]
        q = attn.q_norm(q.view(rows, s.num_heads, s.head_dim))
        k = attn.k_norm(k.view(rows, s.num_kv_heads, s.head_dim))
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        cache[0].index_copy_(2, column, k.unsqueeze(2))
        cache[1].index_copy_(2, column, v.view(rows, s.num_kv_heads, 1, s.head_dim))
        return q

    def attention(
        self,
        q: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor],
        starts: torch.Tensor,
        column: torch.Tensor,
        window: int,
    ) -> torch.Tensor:
        """One query per row over KV columns ``starts..column``, and only the last ``window``
        of them when ``window`` > 0 (Gemma's local layers); returns [rows, 1, H*D]."""
        s = self.shape
        keys, values = cache
        rows, length = keys.shape[0], keys.shape[2]
        cols = torch.arange(length, device=keys.device)
        valid = (cols[None, :] >= starts[:, None]) & (cols[None, :] <= column)
        if window > 0:
            valid &= cols[None, :] > column - window
        # Query heads grouped under their KV head (GQA without repeating K and V).
        grouped = q.view(rows, s.num_kv_heads, s.num_heads // s.num_kv_heads, s.head_dim)
        out = F.scaled_dot_product_attention(
            grouped, keys, values, attn_mask=valid[:, None, None, :], scale=s.scaling
        )
        return out.reshape(rows, 1, s.num_heads * s.head_dim)

    def mlp(self, module: HFModule, x: torch.Tensor) -> torch.Tensor:
        return module(x)

    @contextlib.contextmanager
    def prompt_pass(self, language_model: HFModule) -> Iterator[None]:
        """The model's own modules as they are."""
        yield


class _TritonOps(_TorchOps):
    """Fused kernels for the same operations (CUDA; Triton's interpreter on CPU in tests)."""

    def __init__(self, shape: _TextShape, gelu_tanh: bool) -> None:
        super().__init__(shape)
        self._gelu_tanh = gelu_tanh
        self._weights: dict[int, torch.Tensor] = {}

    def _w1(self, module: HFModule) -> torch.Tensor:
        # Gemma's RMSNorm multiplies by (1 + w) in float32; computed once, bit-identical.
        key = id(module)
        if key not in self._weights:
            self._weights[key] = (1.0 + module.weight.float()).contiguous()
        return self._weights[key]

    def norm(self, module: HFModule, x: torch.Tensor) -> torch.Tensor:
        # The prompt pass normalises q and k as transposed views [B, H, S, D]: walk the
        # storage in memory order instead of copying it.
        strides = x.stride()
        order = sorted(range(x.dim()), key=lambda d: -strides[d])
        dense = x.permute(order)
        if not dense.is_contiguous() or order[-1] != x.dim() - 1:
            dense, order = x.contiguous(), list(range(x.dim()))
        n = x.shape[-1]
        out = torch.empty_like(dense)
        _rms_norm_kernel[(dense.numel() // n,)](
            dense, self._w1(module), out, n, module.eps, BLOCK=triton.next_power_of_2(n)
        )
        return out.permute([order.index(d) for d in range(x.dim())])

    def add_norm(
        self, y: torch.Tensor, residual: torch.Tensor, post: HFModule, following: HFModule
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = y.shape[-1]
        y2, r2 = y.reshape(-1, n), residual.reshape(-1, n)
        hidden, normed = torch.empty_like(r2), torch.empty_like(r2)
        _add_rms_norm_kernel[(y2.shape[0],)](
            y2, r2, self._w1(post), self._w1(following), hidden, normed,
            n, post.eps, following.eps, BLOCK=triton.next_power_of_2(n),
        )  # fmt: skip
        return hidden.view_as(residual), normed.view_as(residual)

    def qk_rope_store(
        self,
        qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        attn: HFModule,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: tuple[torch.Tensor, torch.Tensor],
        column: torch.Tensor,
    ) -> torch.Tensor:
        s = self.shape
        q, k, v = (t.contiguous() for t in qkv)
        rows = q.shape[0]
        keys, values = cache
        q_out = torch.empty(rows, s.num_heads, s.head_dim, dtype=q.dtype, device=q.device)
        grid = (rows, s.num_heads + 2 * s.num_kv_heads)
        _qk_rope_store_kernel[grid](
            q, k, v, self._w1(attn.q_norm), self._w1(attn.k_norm),
            rope[0].contiguous(), rope[1].contiguous(), q_out, keys, values, column,
            keys.stride(0), keys.stride(1), attn.q_norm.eps, attn.k_norm.eps,
            H=s.num_heads, KVH=s.num_kv_heads, D=s.head_dim, num_warps=2,
        )  # fmt: skip
        return q_out

    def attention(
        self,
        q: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor],
        starts: torch.Tensor,
        column: torch.Tensor,
        window: int,
    ) -> torch.Tensor:
        """Split-KV decode attention (flash-decoding): one program per row, KV head and block
        of 64 columns reads only the block's valid columns; a second kernel merges the blocks.
        Measured on the H100 against longer shares per program (a loop over blocks) and a
        program per query head on the CUDA cores: this shape was the fastest from 1 to 64
        rows (2.2 TB/s of valid KV at 64 rows)."""
        s = self.shape
        keys, values = cache
        rows, length = keys.shape[0], keys.shape[2]
        splits = triton.cdiv(length, _ATTN_BLOCK)
        part_max = torch.empty(rows, s.num_heads, splits, dtype=torch.float32, device=q.device)
        part_sum = torch.empty_like(part_max)
        part_acc = torch.empty(
            rows, s.num_heads, splits, s.head_dim, dtype=torch.float32, device=q.device
        )
        group = s.num_heads // s.num_kv_heads
        _attn_partial_kernel[(rows, s.num_kv_heads, splits)](
            q, keys, values, starts, column, part_max, part_sum, part_acc,
            keys.stride(0), keys.stride(1), s.scaling, window, splits,
            H=s.num_heads, G=group, GP=max(16, triton.next_power_of_2(group)), D=s.head_dim,
            BLOCK_N=_ATTN_BLOCK, PREC="ieee" if q.dtype == torch.float32 else None, num_warps=4,
        )  # fmt: skip
        out = torch.empty(rows, s.num_heads, s.head_dim, dtype=q.dtype, device=q.device)
        _attn_combine_kernel[(rows, s.num_heads)](
            part_max, part_sum, part_acc, out, splits,
            D=s.head_dim, SPLITS=triton.next_power_of_2(splits), num_warps=4,
        )  # fmt: skip
        return out.view(rows, 1, s.num_heads * s.head_dim)

    def mlp(self, module: HFModule, x: torch.Tensor) -> torch.Tensor:
        if not self._gelu_tanh:
            return module(x)
        gate, up = module.gate_proj(x), module.up_proj(x)
        act = torch.empty_like(gate)
        n = gate.shape[-1]
        rows = gate.numel() // n
        _gelu_mul_kernel[(rows, triton.cdiv(n, 1024))](gate, up, act, n, BLOCK=1024)
        return module.down_proj(act)

    @contextlib.contextmanager
    def prompt_pass(self, language_model: HFModule) -> Iterator[None]:
        """For the prompt pass, the text model's RMSNorms and GeGLU MLPs run as the fused
        kernels (same roundings); at batch 64 on the H100 this took the prompt pass from 1.94 s
        to 1.69 s. Modules whose forward is already wrapped (accelerate hooks) stay as they are.
        """
        patched: list[HFModule] = []
        for module in language_model.modules():
            if "forward" in vars(module):
                continue
            if type(module).__name__.endswith("RMSNorm"):
                module.forward = functools.partial(self.norm, module)
            elif self._gelu_tanh and hasattr(module, "gate_proj"):
                module.forward = functools.partial(self.mlp, module)
            else:
                continue
            patched.append(module)
        try:
            yield
        finally:
            for module in patched:
                del module.forward


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def _as_id_list(value: int | Sequence[int] | None) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


class FastGreedyGenerator:
    """Greedy generation for a Gemma3ForConditionalGeneration with static buffers + CUDA graphs.

    ``generate`` takes the processor's tensors (left-padded) and returns the new tokens only,
    [batch, new_tokens] on the CPU, pad after each row's EOS — what
    ``model.generate(**inputs, do_sample=False)[:, prompt_len:]`` returns.
    """

    def __init__(
        self,
        model: HFModule,
        *,
        max_batch: int = 8,
        max_total_len: int = 2048,
        buckets: Sequence[int] = DEFAULT_BUCKETS,
        len_step: int = 256,
        use_cuda_graphs: bool | None = None,
        use_triton: bool | None = None,
        check_every: int = 8,
    ) -> None:
        self.model = model
        self.lm: HFModule = _language_model(model)
        self.lm_head: HFModule = model.lm_head
        self.shape = _text_shape(model)
        first = next(model.parameters())
        self.device, self.dtype = first.device, self._compute_dtype(first)
        on_cuda = self.device.type == "cuda"
        self.use_graphs = on_cuda if use_cuda_graphs is None else use_cuda_graphs and on_cuda
        use_triton = (on_cuda and HAS_TRITON) if use_triton is None else use_triton
        text_config = model.config.get_text_config()
        gelu_tanh = getattr(text_config, "hidden_activation", "") == "gelu_pytorch_tanh"
        self.ops = _TritonOps(self.shape, gelu_tanh) if use_triton else _TorchOps(self.shape)
        self.max_batch = max_batch
        self.max_total_len = max_total_len
        self.len_step = len_step
        self.buckets = sorted({b for b in buckets if b < max_batch} | {max_batch})
        self.check_every = max(1, check_every if on_cuda else 1)
        self._arena_k, self._arena_v = self._allocate_arena()
        self._states: dict[tuple[int, int], _DecodeState] = {}
        self._min_length = 0  # set by warm_up: shorter requests reuse the warm graphs
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._bias = torch.zeros(self.shape.vocab_size, dtype=torch.float32, device=self.device)
        self._eos = torch.full((_MAX_EOS_IDS,), -1, dtype=torch.long, device=self.device)
        self._pad = torch.zeros((), dtype=torch.long, device=self.device)

    def _compute_dtype(self, first: torch.Tensor) -> torch.dtype:
        # bitsandbytes stores packed uint8 weights; the embedding keeps the compute dtype.
        embed = self.lm.embed_tokens.weight
        return embed.dtype if embed.dtype.is_floating_point else first.dtype

    def _allocate_arena(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """One flat K and V buffer per layer; every (rows, length) shape is a view of it."""
        s = self.shape
        size = self.max_batch * s.num_kv_heads * self.max_total_len * s.head_dim
        keys = [self._zeros(size) for _ in range(s.num_layers)]
        values = [self._zeros(size) for _ in range(s.num_layers)]
        return keys, values

    def _zeros(self, size: int) -> torch.Tensor:
        return torch.zeros(size, dtype=self.dtype, device=self.device)

    # ----------------------------------------------------------------- public API

    @torch.no_grad()
    def warm_up(
        self,
        prompt_len: int = 320,
        max_new_tokens: int = 1024,
        sample_inputs: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Capture the graphs of every batch bucket for this prompt length and token budget;
        with ``sample_inputs`` also run one short generation so the prompt path is warm too."""
        needed = prompt_len + max_new_tokens - 1
        self._min_length = min(_round_up(needed, self.len_step), self.max_total_len)
        for rows in self.buckets:
            self._state(rows, self._min_length)
        if sample_inputs is not None:
            self.generate(sample_inputs, max_new_tokens=2, force_new_tokens=True)

    @torch.no_grad()
    def generate(
        self,
        inputs: Mapping[str, torch.Tensor],
        max_new_tokens: int,
        eos_token_ids: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        force_new_tokens: bool = False,
    ) -> torch.Tensor:
        """New tokens [batch, n] (CPU). ``force_new_tokens`` never lets EOS win, as
        ``min_new_tokens=max_new_tokens`` does in ``generate``: exactly max_new_tokens each."""
        eos = _as_id_list(eos_token_ids if eos_token_ids is not None else self._default_eos())
        pad = pad_token_id if pad_token_id is not None else self._default_pad(eos)
        batch = {k: self._to_device(v) for k, v in inputs.items() if torch.is_tensor(v)}
        input_ids = batch["input_ids"]
        if "attention_mask" not in batch:
            batch["attention_mask"] = torch.ones_like(input_ids)
        if max_new_tokens < 1:
            return torch.empty(input_ids.shape[0], 0, dtype=torch.long)
        if not self._fits(batch, max_new_tokens):
            return self._fallback(batch, max_new_tokens, eos, pad, force_new_tokens)
        self._set_stopping(eos, pad, force_new_tokens)
        parts = [
            self._generate_rows(self._slice(batch, start), max_new_tokens, eos, force_new_tokens)
            for start in range(0, input_ids.shape[0], self.max_batch)
        ]
        return _concat_padded(parts, pad)

    # ----------------------------------------------------------------- generation

    def _default_eos(self) -> list[int]:
        config = getattr(self.model, "generation_config", None)
        return _as_id_list(getattr(config, "eos_token_id", None))

    def _default_pad(self, eos: list[int]) -> int:
        config = getattr(self.model, "generation_config", None)
        pad = getattr(config, "pad_token_id", None)
        if pad is None:
            pad = self.model.config.get_text_config().pad_token_id
        return int(pad) if pad is not None else (eos[0] if eos else 0)

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.is_floating_point():
            return tensor.to(self.device, self.dtype)
        return tensor.to(self.device)

    def _slice(self, batch: dict[str, torch.Tensor], start: int) -> dict[str, torch.Tensor]:
        """Rows ``start..start+max_batch`` (``_fits`` made sure image rows follow text rows)."""
        if batch["input_ids"].shape[0] <= self.max_batch:
            return batch
        return {k: v[start : start + self.max_batch] for k, v in batch.items()}

    def _fits(self, batch: dict[str, torch.Tensor], max_new_tokens: int) -> bool:
        """Static buffers cover the request, padding is on the left (as ``generate`` needs),
        and a batch over max_batch can be cut into chunks (one image per row)."""
        mask = batch["attention_mask"]
        rows, prompt_len = mask.shape
        counts = mask.sum(-1, keepdim=True)
        cols = torch.arange(prompt_len, device=mask.device)
        left_padded = bool(torch.equal(mask.bool(), cols[None, :] >= prompt_len - counts))
        pixels = batch.get("pixel_values")
        splittable = rows <= self.max_batch or pixels is None or pixels.shape[0] == rows
        return prompt_len + max_new_tokens - 1 <= self.max_total_len and left_padded and splittable

    def _fallback(
        self,
        batch: dict[str, torch.Tensor],
        max_new_tokens: int,
        eos: list[int],
        pad: int,
        force: bool,
    ) -> torch.Tensor:
        log.info("request outside the static buffers; using model.generate")
        extra = {"min_new_tokens": max_new_tokens} if force else {}
        sequences = self.model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=eos, pad_token_id=pad, **extra,
        )  # fmt: skip
        return sequences[:, batch["input_ids"].shape[1] :].cpu()

    def _set_stopping(self, eos: list[int], pad: int, force: bool) -> None:
        if len(eos) > _MAX_EOS_IDS:
            raise ValueError(f"at most {_MAX_EOS_IDS} EOS ids are supported")
        ids = eos + [-1] * (_MAX_EOS_IDS - len(eos))
        self._eos.copy_(torch.tensor(ids, dtype=torch.long))
        self._pad.fill_(pad)
        self._bias.zero_()
        if force and eos:
            # generate's MinNewTokensLengthLogitsProcessor: EOS logits become -inf.
            self._bias[torch.tensor(eos, device=self.device)] = float("-inf")

    def _prefill(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        """The first forward exactly as ``generate`` makes it; returns (first tokens, cache)."""
        from transformers import DynamicCache

        mask = batch["attention_mask"]
        position_ids = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        cache = DynamicCache(config=self.model.config.get_text_config(decoder=True))
        kwargs = {k: v for k, v in batch.items() if k != "attention_mask"}
        with self.ops.prompt_pass(self.lm):
            output = self.model(
                **kwargs, attention_mask=mask, position_ids=position_ids,
                past_key_values=cache, use_cache=True, logits_to_keep=1, return_dict=True,
            )  # fmt: skip
        scores = output.logits[:, -1, :].float() + self._bias
        return torch.argmax(scores, dim=-1), output.past_key_values

    def _generate_rows(
        self, batch: dict[str, torch.Tensor], max_new_tokens: int, eos: list[int], force: bool
    ) -> torch.Tensor:
        first, cache = self._prefill(batch)
        mask = batch["attention_mask"]
        rows, prompt_len = mask.shape
        if max_new_tokens == 1:
            return _trim(first[:, None].cpu(), eos)
        bucket = next(b for b in self.buckets if b >= rows)
        needed = _round_up(prompt_len + max_new_tokens - 1, self.len_step)
        length = min(max(needed, self._min_length), self.max_total_len)
        state = self._state(bucket, length)
        self._load(state, cache, mask, first)
        del cache  # the prompt's KV now lives in the static buffers
        produced = self._decode(state, rows, max_new_tokens, check=not force)
        # A copy: the buffer is reused by the next chunk (and .cpu() is a no-op on CPU).
        return _trim(state.out[:rows, :produced].to("cpu", copy=True), eos)

    def _load(
        self, state: _DecodeState, cache: Any, mask: torch.Tensor, first: torch.Tensor
    ) -> None:
        """Prompt KV into columns [0, prompt_len); the first new token into the step inputs."""
        rows, prompt_len = mask.shape
        for i, layer in enumerate(cache.layers):
            keys, values = layer.keys, layer.values
            kept = keys.shape[2]  # sliding layers keep only the last window-1 columns
            state.keys[i][:rows, :, prompt_len - kept : prompt_len].copy_(keys)
            state.values[i][:rows, :, prompt_len - kept : prompt_len].copy_(values)
        counts = mask.long().sum(-1)
        state.tokens.fill_(int(self._pad))
        state.tokens[:rows] = first
        state.positions.zero_()
        state.positions[:rows] = counts
        # Bucket padding rows attend only to the columns they write themselves.
        state.starts.fill_(prompt_len)
        state.starts[:rows] = prompt_len - counts
        state.column.fill_(prompt_len)
        state.step.fill_(1)
        state.done.fill_(True)
        state.done[:rows] = (first[:, None] == self._eos[None, :]).any(-1)
        state.out[:rows, 0] = first

    def _decode(self, state: _DecodeState, rows: int, max_new_tokens: int, check: bool) -> int:
        """Replay the step until max_new_tokens, or until every real row has stopped. The stop
        test syncs with the GPU, so it runs every ``check_every`` tokens; the extra tokens a
        finished batch makes meanwhile are pad and get trimmed."""
        produced = 1
        while produced < max_new_tokens:
            due = (produced - 1) % self.check_every == 0
            if check and due and bool(state.done[:rows].all()):
                break
            self._run_step(state)
            produced += 1
        return produced

    def _run_step(self, state: _DecodeState) -> None:
        if state.graph is not None:
            state.graph.replay()
        else:
            self._step(state)

    # ----------------------------------------------------------------- the decode step

    def _state(self, rows: int, length: int) -> _DecodeState:
        key = (rows, length)
        if key not in self._states:
            # Normal tensors even when called under the engine's inference_mode: the buffers
            # are updated in place by every later call, whatever mode it runs in.
            with torch.inference_mode(False), torch.no_grad():
                state = self._new_state(rows, length)
                if self.use_graphs:
                    state.graph = self._capture(state)
            self._states[key] = state
        return self._states[key]

    def _new_state(self, rows: int, length: int) -> _DecodeState:
        s = self.shape
        view = (rows, s.num_kv_heads, length, s.head_dim)
        used = rows * s.num_kv_heads * length * s.head_dim

        def longs(*size: int) -> torch.Tensor:
            return torch.zeros(*size, dtype=torch.long, device=self.device)

        return _DecodeState(
            rows=rows,
            length=length,
            keys=[arena[:used].view(view) for arena in self._arena_k],
            values=[arena[:used].view(view) for arena in self._arena_v],
            tokens=longs(rows),
            positions=longs(rows),
            starts=longs(rows),
            column=longs(1),
            step=longs(1),
            done=torch.zeros(rows, dtype=torch.bool, device=self.device),
            out=longs(rows, length),
        )

    def _capture(self, state: _DecodeState) -> torch.cuda.CUDAGraph | None:
        """Warm the step up on a side stream (Triton JIT, cuBLAS handles), then capture it."""
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._step(state)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                self._step(state)
            return graph
        except RuntimeError as exc:  # e.g. a layer type that cannot be captured
            log.warning("CUDA graph capture failed (%s); decoding without graphs", exc)
            return None

    def _step(self, state: _DecodeState) -> None:
        """One token for every row, reading and writing only the state's buffers."""
        hidden = self.lm.embed_tokens(state.tokens[:, None])
        positions = state.positions[:, None]
        rope = {t: self.lm.rotary_emb(hidden, positions, t) for t in set(self.shape.layer_types)}
        layers = self.lm.layers
        x = self.ops.norm(layers[0].input_layernorm, hidden)
        for i, layer in enumerate(layers):
            following = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.lm.norm
            hidden, x = self._layer(state, i, layer, hidden, x, rope, following)
        logits = self.lm_head(x)
        self._advance(state, logits[:, -1, :])

    def _layer(
        self,
        state: _DecodeState,
        index: int,
        layer: HFModule,
        hidden: torch.Tensor,
        x: torch.Tensor,
        rope: dict[str, tuple[torch.Tensor, torch.Tensor]],
        following: HFModule,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoder layer; returns the residual stream and ``following`` applied to it."""
        attn = layer.self_attn
        layer_type = self.shape.layer_types[index]
        cache = (state.keys[index], state.values[index])
        qkv = (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x))
        q = self.ops.qk_rope_store(qkv, attn, rope[layer_type], cache, state.column)
        window = self.shape.sliding_window if layer_type == "sliding_attention" else 0
        a = self.ops.attention(q, cache, state.starts, state.column, window)
        o = attn.o_proj(a)
        hidden, x = self.ops.add_norm(
            o, hidden, layer.post_attention_layernorm, layer.pre_feedforward_layernorm
        )
        m = self.ops.mlp(layer.mlp, x)
        return self.ops.add_norm(m, hidden, layer.post_feedforward_layernorm, following)

    def _advance(self, state: _DecodeState, logits: torch.Tensor) -> None:
        """generate's greedy step: float32 scores, argmax, pad once a row has stopped."""
        scores = logits.float() + self._bias
        nxt = torch.argmax(scores, dim=-1)
        nxt = torch.where(state.done, self._pad, nxt)
        state.out.index_copy_(1, state.step, nxt[:, None])
        state.done |= (nxt[:, None] == self._eos[None, :]).any(-1)
        state.tokens.copy_(nxt)
        state.positions += 1
        state.column += 1
        state.step += 1


def _trim(tokens: torch.Tensor, eos: list[int]) -> torch.Tensor:
    """Cut the columns after the last row's EOS (generate stops once every row has one)."""
    if tokens.shape[1] == 0 or not eos:
        return tokens
    is_eos = torch.isin(tokens, torch.tensor(eos))
    if not bool(is_eos.any(-1).all()):
        return tokens
    first = is_eos.int().argmax(-1)
    return tokens[:, : int(first.max()) + 1]


def _concat_padded(parts: list[torch.Tensor], pad: int) -> torch.Tensor:
    if len(parts) == 1:
        return parts[0]
    width = max(p.shape[1] for p in parts)
    return torch.cat([F.pad(p, (0, width - p.shape[1]), value=pad) for p in parts])


# --------------------------------------------------------------------- Triton kernels
# Each kernel rounds to the tensor dtype wherever the eager module it replaces produces a
# tensor, so results match PyTorch up to the order of float32 reductions.

if HAS_TRITON:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    if os.environ.get("TRITON_INTERPRET") == "1":  # the CPU interpreter has no libdevice

        @triton.jit
        def _tanh(x):  # type: ignore[no-untyped-def]
            return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0

    else:

        @triton.jit
        def _tanh(x):  # type: ignore[no-untyped-def]
            return libdevice.tanh(x)  # tanhf, as ATen's gelu uses

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, n, eps, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        inside = offs < n
        x = tl.load(x_ptr + row * n + offs, mask=inside, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=inside, other=0.0)
        r = tl.math.rsqrt(tl.sum(x * x, 0) / n + eps)
        tl.store(out_ptr + row * n + offs, ((x * r) * w).to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _add_rms_norm_kernel(  # type: ignore[no-untyped-def]
        y_ptr, res_ptr, wa_ptr, wb_ptr, h_ptr, x_ptr, n, eps_a, eps_b, BLOCK: tl.constexpr
    ):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        inside = offs < n
        dt = h_ptr.dtype.element_ty
        y = tl.load(y_ptr + row * n + offs, mask=inside, other=0.0).to(tl.float32)
        wa = tl.load(wa_ptr + offs, mask=inside, other=0.0)
        ra = tl.math.rsqrt(tl.sum(y * y, 0) / n + eps_a)
        t = ((y * ra) * wa).to(dt).to(tl.float32)
        res = tl.load(res_ptr + row * n + offs, mask=inside, other=0.0).to(tl.float32)
        h = (res + t).to(dt)
        tl.store(h_ptr + row * n + offs, h, mask=inside)
        hf = h.to(tl.float32)
        wb = tl.load(wb_ptr + offs, mask=inside, other=0.0)
        rb = tl.math.rsqrt(tl.sum(hf * hf, 0) / n + eps_b)
        tl.store(x_ptr + row * n + offs, ((hf * rb) * wb).to(dt), mask=inside)

    @triton.jit
    def _norm_rope(src, w_ptr, cos_ptr, sin_ptr, eps, D: tl.constexpr):  # type: ignore[no-untyped-def]
        """qk RMSNorm then RoPE (x*cos + rotate_half(x)*sin), each product rounded as eager."""
        offs = tl.arange(0, D)
        perm = (offs + D // 2) % D
        dt = src.dtype.element_ty
        x = tl.load(src + offs).to(tl.float32)
        xp = tl.load(src + perm).to(tl.float32)
        r = tl.math.rsqrt(tl.sum(x * x, 0) / D + eps)
        n = ((x * r) * tl.load(w_ptr + offs)).to(dt).to(tl.float32)
        n_perm = ((xp * r) * tl.load(w_ptr + perm)).to(dt).to(tl.float32)
        sign = tl.where(offs < D // 2, -1.0, 1.0)
        c = tl.load(cos_ptr + offs).to(tl.float32)
        s = tl.load(sin_ptr + offs).to(tl.float32)
        t1 = (n * c).to(dt).to(tl.float32)
        t2 = ((sign * n_perm) * s).to(dt).to(tl.float32)
        return (t1 + t2).to(dt)

    @triton.jit
    def _qk_rope_store_kernel(  # type: ignore[no-untyped-def]
        q_ptr, k_ptr, v_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, qo_ptr, kc_ptr, vc_ptr, col_ptr,
        stride_cb, stride_ch, eps_q, eps_k,
        H: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0)
        j = tl.program_id(1)
        offs = tl.arange(0, D)
        col = tl.load(col_ptr)
        cos_row = cos_ptr + b * D
        sin_row = sin_ptr + b * D
        if j < H:
            out = _norm_rope(q_ptr + (b * H + j) * D, qw_ptr, cos_row, sin_row, eps_q, D)
            tl.store(qo_ptr + (b * H + j) * D + offs, out)
        elif j < H + KVH:
            h = j - H
            out = _norm_rope(k_ptr + (b * KVH + h) * D, kw_ptr, cos_row, sin_row, eps_k, D)
            tl.store(kc_ptr + b * stride_cb + h * stride_ch + col * D + offs, out)
        else:
            h = j - H - KVH
            v = tl.load(v_ptr + (b * KVH + h) * D + offs)
            tl.store(vc_ptr + b * stride_cb + h * stride_ch + col * D + offs, v)

    @triton.jit
    def _attn_partial_kernel(  # type: ignore[no-untyped-def]
        q_ptr, k_ptr, v_ptr, start_ptr, col_ptr, m_ptr, l_ptr, acc_ptr,
        stride_cb, stride_ch, scale, window, splits,
        H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
        BLOCK_N: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0)
        kh = tl.program_id(1)
        split = tl.program_id(2)
        col = tl.load(col_ptr)
        start = tl.load(start_ptr + b)
        start = tl.maximum(start, tl.where(window > 0, col - window + 1, 0))
        g = tl.arange(0, GP)  # the G query heads of this KV head, padded for tl.dot
        d = tl.arange(0, D)
        n = split * BLOCK_N + tl.arange(0, BLOCK_N)
        heads = kh * G + g
        q_rows = q_ptr + (b * H + heads)[:, None] * D + d[None, :]
        q = tl.load(q_rows, mask=(g < G)[:, None], other=0.0)
        valid = (n >= start) & (n <= col)  # masked-off columns are never read
        offs = b * stride_cb + kh * stride_ch + n[:, None] * D + d[None, :]
        k = tl.load(k_ptr + offs, mask=valid[:, None], other=0.0)
        v = tl.load(v_ptr + offs, mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m = tl.max(s, 1)
        p = tl.exp(s - tl.where(m == float("-inf"), 0.0, m)[:, None])
        # As flash attention does, P is rounded to the value dtype for the second product.
        acc = tl.dot(p.to(v.dtype), v, input_precision=PREC)
        part = (b * H + heads) * splits + split
        keep = g < G
        tl.store(m_ptr + part, m, mask=keep)
        tl.store(l_ptr + part, tl.sum(p, 1), mask=keep)
        tl.store(acc_ptr + part[:, None] * D + d[None, :], acc, mask=keep[:, None])

    @triton.jit
    def _attn_combine_kernel(  # type: ignore[no-untyped-def]
        m_ptr, l_ptr, acc_ptr, out_ptr, splits, D: tl.constexpr, SPLITS: tl.constexpr
    ):
        row = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        s = tl.arange(0, SPLITS)
        d = tl.arange(0, D)
        inside = s < splits
        m = tl.load(m_ptr + row * splits + s, mask=inside, other=float("-inf"))
        total_max = tl.max(m, 0)
        w = tl.where(inside, tl.exp(m - total_max), 0.0)
        denom = tl.sum(tl.load(l_ptr + row * splits + s, mask=inside, other=0.0) * w, 0)
        acc = tl.load(
            acc_ptr + (row * splits + s)[:, None] * D + d[None, :], mask=inside[:, None], other=0.0
        )
        out = tl.sum(acc * w[:, None], 0) / denom
        tl.store(out_ptr + row * D + d, out.to(out_ptr.dtype.element_ty))

    @triton.jit
    def _gelu_mul_kernel(g_ptr, u_ptr, out_ptr, n, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
        """gelu_pytorch_tanh(gate) * up, with ATen's formula and its two roundings."""
        row = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        dt = out_ptr.dtype.element_ty
        x = tl.load(g_ptr + row * n + offs, mask=inside, other=0.0).to(tl.float32)
        inner = 0.7978845608028654 * (x + 0.044715 * (x * x * x))
        act = (0.5 * x * (1.0 + _tanh(inner))).to(dt).to(tl.float32)
        up = tl.load(u_ptr + row * n + offs, mask=inside, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * n + offs, (act * up).to(dt), mask=inside)
