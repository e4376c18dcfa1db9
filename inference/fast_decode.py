"""Greedy decoding for Gemma 3 (MedGemma) on static KV buffers, one CUDA graph replay a token.

Plain ``model.generate`` is CPU-bound at batch 1 on the H100: the Python and launch cost of
some 1,500 small kernels a token (README, "GPU sizing"; benchmarks/RESULTS.md). Here:

* the prompt (vision tower + text, batched, left-padded) runs through the model's own forward,
  with the same arguments ``generate`` gives its first step (on CUDA the text model's RMSNorms
  and GeGLU MLPs run meanwhile as the fused kernels of the Triton step);
* its KV cache is copied into static per-layer buffers of ``rows x length`` columns, where rows
  is the batch rounded up to a bucket (1, 2, 4, ... max_batch) and length the prompt plus the
  new tokens rounded up to ``len_step``;
* one decode step — embedding, every layer, lm_head, argmax, EOS bookkeeping — runs on those
  buffers with fixed shapes and is captured once per (rows, length) in a ``torch.cuda.CUDAGraph``
  that is replayed for each token;
* long prompts (CT and MR studies: up to 85 images, ~22,300 tokens) decode in a second arena
  (inference/fast_buffers.py) sized on demand within the memory of ``long_kv_tokens`` KV
  columns, their lengths rounded to ``long_len_step``; its local layers keep only a ring of
  ``sliding_window`` columns a row (0.62 GB an 85-slice study for the 4B model in bf16, where
  full-length layers took 3.4 GB); a batch runs in as many rows at a time as that holds,
  and its prompt is prefilled in passes of at most ``prefill_tokens`` tokens (whole rows, each
  with its own images), so activations and the vision tower's batch stay bounded;
* when every row starts with the same ``shared_prefix_min`` tokens or more before its first
  image (the question asked first), they run once for the batch (inference/shared_prefix.py);
* rows may join a running batch between two steps, in the rows its bucket leaves free
  (``generate(joins=)``, inference/decode_joins.py);
* the small operations between the matrix products (RMSNorm, residual add, qk-norm + RoPE +
  KV write, decode attention, GeGLU) are a ``StepOps`` (inference/step_ops.py): on CUDA with
  Triton, ``TritonStepOps`` (inference/triton_ops.py) runs them as fused kernels
  (inference/triton_kernels.py) that round to the model dtype wherever eager PyTorch does;
  without CUDA (CI), ``TorchStepOps`` runs the same step eagerly with the model's own modules
  and ``scaled_dot_product_attention``. The matrix products stay the model's own modules
  (so bitsandbytes NF4 layers work unchanged), except that on CUDA a layer's plain q, k, v and
  gate, up projections run as two products (inference/fused_qkv.py), each product by the
  kernel timed fastest for its shape before capture, Triton's or cuBLAS's (inference/gemv.py).

The tokens equal ``model.generate(do_sample=False)`` for the same inputs: the same function,
rounded to the model dtype at the same points; only the order of float32 reductions (norms,
attention) differs, so bf16 results could part where two logits tie within rounding. On the
H100 with the random-weight MedGemma-4B in bf16, all 105 rows of the benchmark (batches 1, 8,
32, 64) gave the same 256 tokens as ``generate`` (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from inference import fast_buffers, gemv, step_ops
from inference.decode_joins import RowJoins, RowSource
from inference.fast_buffers import DecodeState, KVArena, batch_rows, image_offsets, pass_bounds
from inference.fused_qkv import apply_linear, fuse_gate_up, fuse_qkv, project_mlp, project_qkv
from inference.rope_tables import RopeTables
from inference.shared_prefix import DEFAULT_SHARED_PREFIX_MIN, PrefixKV, SharedPrefix
from inference.step_ops import HFModule

log = logging.getLogger(__name__)

HAS_TRITON = importlib.util.find_spec("triton") is not None
DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
_MAX_EOS_IDS = 8  # EOS ids live in a fixed-size device tensor so the graph never changes


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
        long_kv_tokens: int = 0,
        long_len_step: int = 4096,
        prefill_tokens: int = 65536,
        shared_prefix_min: int = DEFAULT_SHARED_PREFIX_MIN,
        use_cuda_graphs: bool | None = None,
        use_triton: bool | None = None,
        fuse_projections: bool | None = None,
        use_gemv: bool | None = None,
        check_every: int = 8,
    ) -> None:
        self.model = model
        self.lm: HFModule = step_ops.language_model(model)
        self.lm_head: HFModule = model.lm_head
        self.shape = step_ops.text_shape(model)
        first = next(model.parameters())
        self.device, self.dtype = first.device, self._compute_dtype(first)
        on_cuda = self.device.type == "cuda"
        self.use_graphs = on_cuda if use_cuda_graphs is None else use_cuda_graphs and on_cuda
        use_triton = (on_cuda and HAS_TRITON) if use_triton is None else use_triton
        text_config = model.config.get_text_config()
        gelu_tanh = getattr(text_config, "hidden_activation", "") == "gelu_pytorch_tanh"
        self.ops = step_ops.chosen(self.shape, use_triton=use_triton, gelu_tanh=gelu_tanh)
        # By default on CUDA: one product for q, k, v and one for gate, up a layer, each by the
        # fastest kernel (fused_qkv.py, gemv.py); the CPU keeps the modules (eager reference).
        fuse = on_cuda if fuse_projections is None else fuse_projections
        self._qkv = [fuse_qkv(layer.self_attn) if fuse else None for layer in self.lm.layers]
        self._gate_up = [fuse_gate_up(layer.mlp) if fuse else None for layer in self.lm.layers]
        self._gemv = gemv.GemvPicker(on_cuda if use_gemv is None else use_gemv)
        self.max_batch = max_batch
        self.max_total_len = max_total_len
        # Rows that join a running batch (inference/decode_joins.py) move it to this length.
        self.join_length = max_total_len
        self.len_step = len_step
        # Long prompts (CT/MR): the memory a long batch may take at a time, counted in KV
        # columns (rows x tokens) of every layer, 0 for none (they then go to model.generate);
        # their lengths round up to long_len_step so a few graphs serve every slice count.
        self.long_kv_tokens = long_kv_tokens
        self.long_len_step = long_len_step
        self._long_rings = fast_buffers.long_rings(
            self.shape.layer_types, self.shape.sliding_window
        )
        # Prompt tokens one prefill pass may hold: bounds the activations (and the vision
        # tower's batch) of long prompts; a batch of radiographs stays one pass.
        self.prefill_tokens = prefill_tokens
        self.shared_prefix = SharedPrefix(model, shared_prefix_min, self._prompt_pass)
        self._rope = RopeTables(self.lm.rotary_emb, self.shape.layer_types)
        config = model.config
        self._image_token_id = getattr(config, "image_token_id", None)
        self._tokens_per_image = int(getattr(config, "mm_tokens_per_image", 0) or 0)
        self.buckets = sorted({b for b in buckets if b < max_batch} | {max_batch})
        self.check_every = max(1, check_every if on_cuda else 1)
        self._short = self._arena([max_batch * max_total_len] * self.shape.num_layers)
        self._long: KVArena | None = None  # allocated by the first long prompt
        self._min_length = 0  # set by warm_up: shorter requests reuse the warm graphs
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._bias = torch.zeros(self.shape.vocab_size, dtype=torch.float32, device=self.device)
        self._eos = torch.full((_MAX_EOS_IDS,), -1, dtype=torch.long, device=self.device)
        self._pad = torch.zeros((), dtype=torch.long, device=self.device)
        self._between_steps: Callable[[], None] | None = None  # set for one generate call
        self._busy = False

    def _compute_dtype(self, first: torch.Tensor) -> torch.dtype:
        # bitsandbytes stores packed uint8 weights; the embedding keeps the compute dtype.
        embed = self.lm.embed_tokens.weight
        return embed.dtype if embed.dtype.is_floating_point else first.dtype

    def _arena(self, sizes: list[int], rings: Sequence[int] = ()) -> KVArena:
        s = self.shape
        return KVArena.allocate(
            sizes,
            rings=rings or (0,) * s.num_layers,
            column_elements=s.num_kv_heads * s.head_dim,
            dtype=self.dtype,
            device=self.device,
        )

    @property
    def _states(self) -> dict[tuple[int, int], DecodeState]:
        """Every decode state built so far, short and long."""
        long_states = self._long.states if self._long is not None else {}
        return {**self._short.states, **long_states}

    @property
    def long_kv_bytes(self) -> int:
        """Bytes the long-prompt KV buffers take now (0 before the first long prompt)."""
        return self._long.bytes() if self._long is not None else 0

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
        # Rows join within a batch's first max_new_tokens steps (inference/decode_joins.py).
        joined = _round_up(needed + max_new_tokens, self.len_step)
        self.join_length = max(self._min_length, min(joined, self.max_total_len))
        for rows in self.buckets:
            self._state(rows, self._min_length)
            self._state(rows, self.join_length)
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
        between_steps: Callable[[], None] | None = None,
        joins: RowSource | None = None,
    ) -> torch.Tensor:
        """New tokens [batch, n] (CPU). ``force_new_tokens`` never lets EOS win, as
        ``min_new_tokens=max_new_tokens`` does in ``generate``: exactly max_new_tokens each.

        ``between_steps`` runs in this thread every ``check_every`` decode steps, after the stop
        test (where the loop syncs with the device). It may generate on another generator (its
        own buffers), never on this one: the running batch's KV is in this one's buffers.

        ``joins``: asked at the same points for rows to join the batch (inference/
        decode_joins.py); their tokens follow the batch's rows, in the order they joined."""
        if self._busy:
            raise RuntimeError("generate called again while this generator's batch runs")
        self._busy, self._between_steps = True, between_steps
        try:
            return self._generate(
                inputs, max_new_tokens, eos_token_ids, pad_token_id, force_new_tokens, joins
            )
        finally:
            self._busy, self._between_steps = False, None

    def _generate(
        self,
        inputs: Mapping[str, torch.Tensor],
        max_new_tokens: int,
        eos_token_ids: int | Sequence[int] | None,
        pad_token_id: int | None,
        force_new_tokens: bool,
        joins: RowSource | None = None,
    ) -> torch.Tensor:
        eos = _as_id_list(eos_token_ids if eos_token_ids is not None else self._default_eos())
        pad = pad_token_id if pad_token_id is not None else self._default_pad(eos)
        batch = {k: self._to_device(v) for k, v in inputs.items() if torch.is_tensor(v)}
        input_ids = batch["input_ids"]
        if "attention_mask" not in batch:
            batch["attention_mask"] = torch.ones_like(input_ids)
        if max_new_tokens < 1:
            return torch.empty(input_ids.shape[0], 0, dtype=torch.long)
        # Rows are cut into passes with their own images (None: the rows cannot be told apart).
        offsets = image_offsets(batch, self._image_token_id, self._tokens_per_image)
        if offsets is None or not self._fits(batch, max_new_tokens):
            return self._fallback(batch, max_new_tokens, eos, pad, force_new_tokens)
        self._set_stopping(eos, pad, force_new_tokens)
        rows, prompt_len = input_ids.shape
        per_pass = self._rows_per_pass(prompt_len + max_new_tokens - 1)
        if joins is not None and self._joinable(rows, prompt_len, max_new_tokens):
            joining = RowJoins(self, joins, max_new_tokens, eos, pad)
            return self._generate_rows(
                batch, offsets, max_new_tokens, eos, force_new_tokens, joining
            )
        parts = []
        for start in range(0, rows, per_pass):
            stop = min(start + per_pass, rows)
            chunk, chunk_offsets = batch_rows(batch, offsets, start, stop)
            parts.append(
                self._generate_rows(chunk, chunk_offsets, max_new_tokens, eos, force_new_tokens)
            )
        return fast_buffers.concat_padded(parts, pad)

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

    def _rows_per_pass(self, needed: int) -> int:
        """Rows decoded together for prompts needing ``needed`` KV columns: max_batch in the
        short arena; for long prompts the largest bucket the long-prompt budget holds (0: none)."""
        if needed <= self.max_total_len:
            return self.max_batch
        length = _round_up(needed, self.long_len_step)
        row = sum(fast_buffers.row_columns(self._long_rings, length))
        fit = min(self.max_batch, self._long_budget() // row)
        return max((b for b in self.buckets if b <= fit), default=0)

    def _joinable(self, rows: int, prompt_len: int, max_new_tokens: int) -> bool:
        """Rows may join this batch: it has free rows (one pass: fewer than max_batch; how
        long it takes rows depends on how full it is, inference/decode_joins.py) and its
        prompts fit the short buffers with room to spare."""
        room = prompt_len + max_new_tokens <= self.join_length
        return rows < self.max_batch and max_new_tokens > 1 and room

    def _long_budget(self) -> int:
        """The long-prompt budget in layer columns (one layer's K and V of one token)."""
        return self.long_kv_tokens * self.shape.num_layers

    def _length(self, needed: int) -> int:
        """KV columns of the state for ``needed`` columns: warm lengths for short prompts."""
        if needed <= self.max_total_len:
            length = max(_round_up(needed, self.len_step), self._min_length)
            return min(length, self.max_total_len)
        return _round_up(needed, self.long_len_step)

    def _fits(self, batch: dict[str, torch.Tensor], max_new_tokens: int) -> bool:
        """Static buffers cover the request and padding is on the left (as ``generate`` needs)."""
        mask = batch["attention_mask"]
        prompt_len = mask.shape[1]
        counts = mask.sum(-1, keepdim=True)
        cols = torch.arange(prompt_len, device=mask.device)
        left_padded = bool(torch.equal(mask.bool(), cols[None, :] >= prompt_len - counts))
        rows = self._rows_per_pass(prompt_len + max_new_tokens - 1)
        return left_padded and rows > 0

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

    def _prompt_pass(self) -> contextlib.AbstractContextManager[None]:
        """Where the model's own forward runs a prompt (on CUDA: with the fused kernels)."""
        return self.ops.prompt_pass(self.lm)

    def _prefill(
        self, batch: dict[str, torch.Tensor], prefix: PrefixKV | None = None
    ) -> tuple[torch.Tensor, Any]:
        """The first forward exactly as ``generate`` makes it (after ``prefix``, the rows'
        shared first tokens, when given); returns (first tokens, cache)."""
        mask = batch["attention_mask"]
        position_ids = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        cache = fast_buffers.prompt_cache(self.model, self.device)
        kwargs = {k: v for k, v in batch.items() if k != "attention_mask"}
        if prefix is not None:
            kwargs, position_ids, cache = prefix.suffix(kwargs, position_ids)
        with self._prompt_pass():
            output = self.model(
                **kwargs, attention_mask=mask, position_ids=position_ids,
                past_key_values=cache, use_cache=True, logits_to_keep=1, return_dict=True,
            )  # fmt: skip
        scores = output.logits[:, -1, :].float() + self._bias
        return torch.argmax(scores, dim=-1), output.past_key_values

    def _generate_rows(
        self,
        batch: dict[str, torch.Tensor],
        offsets: list[int],
        max_new_tokens: int,
        eos: list[int],
        force: bool,
        joining: RowJoins | None = None,
    ) -> torch.Tensor:
        """One pass of rows; ``offsets``: each row's first image in its ``pixel_values``."""
        mask = batch["attention_mask"]
        rows, prompt_len = mask.shape
        if max_new_tokens == 1:
            first = self._prefill_passes(batch, offsets, None)
            return fast_buffers.trim_after_eos(first[:, None].cpu(), eos)
        bucket = next(b for b in self.buckets if b >= rows)
        state = self._state(bucket, self._length(prompt_len + max_new_tokens - 1))
        if joining is not None:
            joining.reserve(bucket)
        first = self._prefill_passes(batch, offsets, state)
        self._load_inputs(state, mask, first)
        if joining is not None:
            return joining.run(state, rows, prompt_len)
        produced = self._decode(state, rows, max_new_tokens, check=not force)
        # A copy: the buffer is reused by the next chunk (and .cpu() is a no-op on CPU).
        return fast_buffers.trim_after_eos(state.out[:rows, :produced].to("cpu", copy=True), eos)

    def _prefill_passes(
        self,
        batch: dict[str, torch.Tensor],
        offsets: list[int],
        state: DecodeState | None,
        first_row: int = 0,
        end: int | None = None,
        passes: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """The prompt in passes of at most ``prefill_tokens`` tokens (whole rows; ``passes``:
        the rows of each, in order, each split further where it is over that); each pass's KV
        goes into the state's rows from ``first_row`` at once, so only one pass's cache is
        alive at a time, its last column at ``end`` - 1 (default: the prompt's length).
        Returns every row's first new token."""
        rows, prompt_len = batch["input_ids"].shape
        bounds = pass_bounds(rows, passes, max(1, self.prefill_tokens // prompt_len))
        prefix = self.shared_prefix.compute(batch)  # None: each pass runs its whole rows
        firsts = []
        for start, stop in bounds:
            first, cache = self._prefill(batch_rows(batch, offsets, start, stop)[0], prefix)
            if state is not None:
                self._load_kv(state, cache, first_row + start, end or prompt_len)
            del cache  # the prompt's KV now lives in the static buffers
            firsts.append(first)
        return torch.cat(firsts)

    def _load_kv(self, state: DecodeState, cache: Any, row: int, end: int) -> None:
        """A pass's prompt KV into the columns before ``end`` of the state's rows from ``row``:
        what the cache kept of them (its local layers: the last window - 1, all a decode step
        reads), a ring's at slot column % ring."""
        for i, layer in enumerate(cache.layers):
            fast_buffers.store_columns(state.keys[i], row, layer.keys, end)
            fast_buffers.store_columns(state.values[i], row, layer.values, end)

    def _load_inputs(self, state: DecodeState, mask: torch.Tensor, first: torch.Tensor) -> None:
        """The first new token, positions and stop flags into the step inputs."""
        rows, prompt_len = mask.shape
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

    def _decode(self, state: DecodeState, rows: int, max_new_tokens: int, check: bool) -> int:
        """Replay the step until max_new_tokens, or until every real row has stopped. The stop
        test syncs with the GPU, so it runs every ``check_every`` tokens; the extra tokens a
        finished batch makes meanwhile are pad and get trimmed. ``between_steps`` (generate)
        runs at the same points, after the stop test."""
        produced = 1
        while produced < max_new_tokens:
            due = (produced - 1) % self.check_every == 0
            if check and due and bool(state.done[:rows].all()):
                break
            if due and self._between_steps is not None:
                self._between_steps()
            self._run_step(state)
            produced += 1
        return produced

    def _run_step(self, state: DecodeState) -> None:
        if state.graph is not None:
            state.graph.replay()
        else:
            self._step(state)

    # ----------------------------------------------------------------- the decode step

    def _state(self, rows: int, length: int) -> DecodeState:
        key = (rows, length)
        # Normal tensors even when called under the engine's inference_mode: the buffers are
        # updated in place by every later call, whatever mode it runs in.
        with torch.inference_mode(False), torch.no_grad():
            arena = self._arena_for(rows, length)
            if key not in arena.states:
                state = self._new_state(arena, rows, length)
                if self.use_graphs:
                    state.graph = self._capture(state)
                arena.states[key] = state
        return arena.states[key]

    def _arena_for(self, rows: int, length: int) -> KVArena:
        """The short arena, or the long one grown to hold ``rows x length`` columns (its
        old states and graphs go: they point into the memory being replaced). Grown, each layer
        keeps the larger of its old and new sizes while their sum stays within the budget."""
        if length <= self.max_total_len:
            return self._short
        if self._long is None or not self._long.holds(rows, length):
            old, self._long = self._long, None
            sizes = fast_buffers.grown_sizes(
                old, self._long_rings, rows, length, self._long_budget()
            )
            del old
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self._long = self._arena(sizes, self._long_rings)
            log.info(
                "long-prompt KV buffers: %d rows x %d columns (%.2f GiB)",
                rows, length, self._long.bytes() / 2**30,
            )  # fmt: skip
        return self._long

    def _new_state(self, arena: KVArena, rows: int, length: int) -> DecodeState:
        keys, values = arena.views(rows, length, self.shape.num_kv_heads)

        def longs(*size: int) -> torch.Tensor:
            return torch.zeros(*size, dtype=torch.long, device=self.device)

        return DecodeState(
            rows=rows,
            length=length,
            keys=keys,
            values=values,
            tokens=longs(rows),
            positions=longs(rows),
            starts=longs(rows),
            column=longs(1),
            step=longs(1),
            done=torch.zeros(rows, dtype=torch.bool, device=self.device),
            out=longs(rows, length),
            rope=self._rope.for_length(length, self.dtype, self.device),
        )

    def _capture(self, state: DecodeState) -> torch.cuda.CUDAGraph | None:
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

    def _step(self, state: DecodeState) -> None:
        """One token for every row, reading and writing only the state's buffers."""
        hidden = self.lm.embed_tokens(state.tokens[:, None])
        rope = state.rope.lookup(state.positions[:, None])
        layers = self.lm.layers
        x = self.ops.norm(layers[0].input_layernorm, hidden)
        for i, layer in enumerate(layers):
            following = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.lm.norm
            hidden, x = self._layer(state, i, layer, hidden, x, rope, following)
        self._advance(state, apply_linear(self.lm_head, x, self._gemv.linear)[:, -1, :])

    def _layer(
        self,
        state: DecodeState,
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
        qkv = project_qkv(attn, x, self._qkv[index], self._gemv.linear)
        q = self.ops.qk_rope_store(qkv, attn, rope[layer_type], cache, state.column)
        window = self.shape.sliding_window if layer_type == "sliding_attention" else 0
        a = self.ops.attention(q, cache, state.starts, state.column, window)
        o = apply_linear(attn.o_proj, a, self._gemv.linear)
        hidden, x = self.ops.add_norm(
            o, hidden, layer.post_attention_layernorm, layer.pre_feedforward_layernorm
        )
        m = project_mlp(layer.mlp, x, self._gate_up[index], self.ops, self._gemv.linear)
        return self.ops.add_norm(m, hidden, layer.post_feedforward_layernorm, following)

    def _advance(self, state: DecodeState, logits: torch.Tensor) -> None:
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
