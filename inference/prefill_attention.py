"""Prompt-pass attention in query chunks, each against only the key columns its mask lets it see.

Why: a CT study is a prompt of up to 85 images (~22,700 tokens). With a boolean 4D mask,
``scaled_dot_product_attention`` computes the whole query x key square for every layer, but
Gemma 3 interleaves five sliding-window layers (window 1,024 tokens; Gemma 3 technical report,
"local:global 5:1") with each full layer: a sliding layer's query row sees at most ~1,024
columns, and a full layer's row sees only the columns up to itself. Attention was ~0.72 s of
the ~1.05 s text prefill of such a study on an H200, almost all of it on masked-out columns.

What: ``chunked_sdpa_attention_forward`` splits the query rows into chunks of ``CHUNK_ROWS``
and runs SDPA for each chunk against the key columns ``[first, last]`` where any of that
chunk's mask rows is True. The range comes from the mask itself, never from an assumption of
causality: Gemma 3's image tokens attend bidirectionally inside their image, so a row may see
columns after it. Columns outside the range are all False for the chunk's rows, so each row's
softmax (and output) is the one the whole-square call gives, up to summation order.

Every other call — a query no longer than ``CHUNK_MIN_FACTOR * CHUNK_ROWS`` rows, decode
steps, no mask (full layers of text-only prompts run causal flash, the SigLIP vision tower),
non-boolean masks, position biases, compiled graphs — goes to transformers' stock
``sdpa_attention_forward`` unchanged.

The ranges need one GPU -> CPU copy per distinct mask. The model builds one mask per layer type
for a forward and hands the same tensor object to every layer of that type, so the ranges are
cached by identity (a weak reference: a freed mask's memory, reused by the next request's mask
at the same address, can never hit) and by the tensor's version counter (an in-place write
invalidates). A 22,700-token prefill with 2,048-row chunks makes 12 chunks per layer and two
syncs in all (one for the sliding mask, one for the full mask).

Importing this module registers the implementation as ``CHUNKED_SDPA`` with transformers'
``AttentionInterface`` and registers the stock ``sdpa_mask`` under the same name in
``AttentionMaskInterface``, so the model builds exactly the boolean masks it builds for "sdpa"
(an unregistered mask name would make transformers build no mask at all).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import (
    repeat_kv,
    sdpa_attention_forward,
    use_gqa_in_sdpa,
)
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

CHUNKED_SDPA = "medgemma_chunked_sdpa"
# Query rows per chunk, and the query length (in chunks) above which chunking starts: shorter
# prompts gain little and pay the range sync. Module-level so tests and benchmarks can set them.
CHUNK_ROWS = 2048
CHUNK_MIN_FACTOR = 2
# Range ends rounded out to this many columns (the extra columns are masked out): aligned key
# slices and mask widths keep SDPA's kernels off their unaligned-padding copies.
COLUMN_ALIGN = 16
# Distinct masks alive at once: a forward's sliding and full masks, plus a second generator's
# forward run from the step hook; more only costs a re-sync.
_CACHE_SIZE = 4

# (first query row, end query row, first key column, end key column) of one chunk.
Span = tuple[int, int, int, int]


@dataclass(frozen=True)
class _Entry:
    mask: weakref.ref[torch.Tensor]
    version: int
    shape: tuple[int, ...]
    chunk: int
    spans: tuple[Span, ...]


_cache: list[_Entry] = []
_cache_lock = threading.Lock()


def _column_spans(mask: torch.Tensor, chunk: int) -> tuple[Span, ...]:
    """Each chunk's rows and the key columns any of them sees, over every batch row and head.

    The reductions run on the mask's device; one ``tolist`` brings 2 x chunks integers back."""
    batch, heads, q_len, kv_len = mask.shape
    full = q_len // chunk
    seen = []  # (chunk, key column): any row of the chunk sees the column
    if full:
        body = mask[:, :, : full * chunk].reshape(batch, heads, full, chunk, kv_len)
        seen.append(body.any(dim=3).any(dim=1).any(dim=0))
    if q_len % chunk:
        seen.append(mask[:, :, full * chunk :].any(dim=2).any(dim=1).any(dim=0)[None])
    visible = torch.cat(seen)
    columns = torch.arange(kv_len, device=mask.device)
    first = torch.where(visible, columns, kv_len).amin(dim=1)
    last = torch.where(visible, columns, -1).amax(dim=1)
    bounds = torch.stack([first, last + 1], dim=1).tolist()  # the one GPU -> CPU sync
    spans = []
    for index, (start, end) in enumerate(bounds):
        if start >= end:  # no row of the chunk sees anything (padding): keep stock behaviour
            start, end = 0, kv_len
        start = start // COLUMN_ALIGN * COLUMN_ALIGN
        end = min(kv_len, -(-end // COLUMN_ALIGN) * COLUMN_ALIGN)
        spans.append((index * chunk, min(q_len, (index + 1) * chunk), start, end))
    return tuple(spans)


def _version(mask: torch.Tensor) -> int:
    """The mask's in-place write counter; inference tensors (the engine runs under
    ``torch.inference_mode``) keep none, and cannot be written outside it."""
    return 0 if mask.is_inference() else int(mask._version)


def column_spans(mask: torch.Tensor, chunk: int) -> tuple[Span, ...]:
    """``_column_spans`` cached per live mask tensor (identity, version, shape, chunk)."""
    shape = tuple(mask.shape)
    with _cache_lock:
        for entry in _cache:
            if (
                entry.mask() is mask
                and entry.version == _version(mask)
                and entry.shape == shape
                and entry.chunk == chunk
            ):
                return entry.spans
    spans = _column_spans(mask, chunk)
    with _cache_lock:
        # Entries whose mask is gone can never hit again; the oldest go first past the bound.
        _cache[:] = [entry for entry in _cache if entry.mask() is not None][-(_CACHE_SIZE - 1) :]
        _cache.append(_Entry(weakref.ref(mask), _version(mask), shape, chunk, spans))
    return spans


def _chunkable(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    mask: torch.Tensor | None,
    position_bias: torch.Tensor | None,
    kwargs: dict[str, Any],
) -> bool:
    """Whether the call is a long masked prompt pass whose stock path is one plain SDPA call."""
    q_len = query.shape[2]
    return (
        mask is not None
        and mask.dtype == torch.bool
        and mask.dim() == 4
        and q_len > CHUNK_MIN_FACTOR * CHUNK_ROWS
        and mask.shape[-2] == q_len
        and mask.shape[-1] == key.shape[2]
        and position_bias is None
        and kwargs.get("softcap") is None
        and not kwargs.get("output_attentions", False)
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
    )


def chunked_sdpa_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    position_bias: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``sdpa_attention_forward``'s result, computed chunk by chunk for long masked prompts.

    query (batch, heads, q_len, dim); key and value (batch, kv_heads, kv_len, dim); returns
    (batch, q_len, heads, dim) contiguous, as the stock function does."""
    if not _chunkable(module, query, key, attention_mask, position_bias, kwargs):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
            is_causal=is_causal, position_bias=position_bias, **kwargs,
        )  # fmt: skip
    assert attention_mask is not None  # _chunkable checked it
    # The stock path for a masked multi-row query: keys and values repeated to the query heads
    # (once here, not per chunk), is_causal off because the mask says it all.
    sdpa_kwargs: dict[str, Any] = {}
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        if use_gqa_in_sdpa(attention_mask, key, value):
            sdpa_kwargs["enable_gqa"] = True
        else:
            key = repeat_kv(key, groups)
            value = repeat_kv(value, groups)
    parts = []
    for q0, q1, k0, k1 in column_spans(attention_mask, CHUNK_ROWS):
        out = F.scaled_dot_product_attention(
            query[:, :, q0:q1],
            key[:, :, k0:k1],
            value[:, :, k0:k1],
            attn_mask=attention_mask[:, :, q0:q1, k0:k1],
            dropout_p=dropout,
            scale=scaling,
            is_causal=False,
            **sdpa_kwargs,
        )
        parts.append(out.transpose(1, 2))
    return torch.cat(parts, dim=1), None


AttentionInterface.register(CHUNKED_SDPA, chunked_sdpa_attention_forward)
AttentionMaskInterface.register(CHUNKED_SDPA, sdpa_mask)
