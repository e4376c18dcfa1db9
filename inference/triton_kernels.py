"""Triton kernels of the fast decode step (inference/triton_ops.py launches them).

Each kernel rounds to the tensor dtype wherever the eager module it replaces produces a
tensor, so results match PyTorch up to the order of float32 reductions. This module imports
Triton at the top: it is imported only when Triton is installed and the Triton step is chosen
(``inference.fast_decode.HAS_TRITON``); CI has neither a GPU nor Triton.
"""

from __future__ import annotations

import os

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
def rms_norm_kernel(x_ptr, w_ptr, out_ptr, n, eps, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    inside = offs < n
    x = tl.load(x_ptr + row * n + offs, mask=inside, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=inside, other=0.0)
    r = tl.math.rsqrt(tl.sum(x * x, 0) / n + eps)
    tl.store(out_ptr + row * n + offs, ((x * r) * w).to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def add_rms_norm_kernel(  # type: ignore[no-untyped-def]
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
def qk_rope_store_kernel(  # type: ignore[no-untyped-def]
    q_ptr, k_ptr, v_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, qo_ptr, kc_ptr, vc_ptr, col_ptr,
    stride_cb, stride_ch, columns, eps_q, eps_k,
    H: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    j = tl.program_id(1)
    offs = tl.arange(0, D)
    col = tl.load(col_ptr) % columns  # the slot: a ring's columns wrap (inference/step_ops.py)
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
def attn_partial_kernel(  # type: ignore[no-untyped-def]
    q_ptr, k_ptr, v_ptr, start_ptr, col_ptr, m_ptr, l_ptr, acc_ptr,
    stride_cb, stride_ch, columns, scale, window, splits, windowed,
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
    # ``windowed``: the programs cover only the blocks of the window, counted from the block
    # holding its first column (a local layer of a full-length cache reads 1,024 of ~23,000
    # columns); never a ring, whose columns are its window.
    first = tl.where(windowed != 0, tl.maximum(col - window + 1, 0) // BLOCK_N * BLOCK_N, 0)
    n = first + split * BLOCK_N + tl.arange(0, BLOCK_N)  # slots
    heads = kh * G + g
    q_rows = q_ptr + (b * H + heads)[:, None] * D + d[None, :]
    q = tl.load(q_rows, mask=(g < G)[:, None], other=0.0)
    # The column each slot holds (inference/step_ops.py): the slot itself up to ``col`` in a
    # full-length cache (below 0 past it); in a ring the last column written there. One
    # modulo a program: ``top`` is the slot ``col`` went to, a slot past it is a lap behind.
    top = col % columns
    held = col - top + n - tl.where(n > top, columns, 0)
    valid = (n < columns) & (held >= start)  # masked-off slots are never read
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
def attn_combine_kernel(  # type: ignore[no-untyped-def]
    m_ptr, l_ptr, acc_ptr, out_ptr, splits, D: tl.constexpr, CHUNK: tl.constexpr,
    LOOP: tl.constexpr,
):  # fmt: skip
    """Merge a (row, head)'s split partials. ``LOOP``: CHUNK splits at a time, for the hundreds
    of splits of a global layer of a long prompt (one [splits x D] tile spilled registers:
    ~90 us a call at 448 splits on the H200); otherwise (every prompt of the short buffers)
    one tile of CHUNK >= splits."""
    row = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    d = tl.arange(0, D)
    s = tl.arange(0, CHUNK)
    if LOOP:
        total_max = tl.max(tl.load(m_ptr + row * splits + s), 0)  # splits > CHUNK
        for start in range(CHUNK, splits, CHUNK):
            inside = start + s < splits
            m = tl.load(m_ptr + row * splits + start + s, mask=inside, other=float("-inf"))
            total_max = tl.maximum(total_max, tl.max(m, 0))
        denom = tl.zeros((1,), dtype=tl.float32)
        acc = tl.zeros((D,), dtype=tl.float32)
        for start in range(0, splits, CHUNK):
            part = row * splits + start + s
            inside = start + s < splits
            m = tl.load(m_ptr + part, mask=inside, other=float("-inf"))
            w = tl.where(inside, tl.exp(m - total_max), 0.0)
            denom += tl.sum(tl.load(l_ptr + part, mask=inside, other=0.0) * w, 0)
            tile = tl.load(
                acc_ptr + part[:, None] * D + d[None, :], mask=inside[:, None], other=0.0
            )
            acc += tl.sum(tile * w[:, None], 0)
        out = acc / denom
    else:
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
def gelu_mul_kernel(g_ptr, u_ptr, out_ptr, n, stride, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
    """gelu_pytorch_tanh(gate) * up, with ATen's formula and its two roundings. Rows of gate
    and up are ``stride`` apart (2n where they are the halves of one fused product), out's n."""
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    dt = out_ptr.dtype.element_ty
    x = tl.load(g_ptr + row * stride + offs, mask=inside, other=0.0).to(tl.float32)
    inner = 0.7978845608028654 * (x + 0.044715 * (x * x * x))
    act = (0.5 * x * (1.0 + _tanh(inner))).to(dt).to(tl.float32)
    up = tl.load(u_ptr + row * stride + offs, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n + offs, (act * up).to(dt), mask=inside)
