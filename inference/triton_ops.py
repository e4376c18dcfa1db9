"""The decode step's small operations as fused Triton kernels (CUDA; Triton's interpreter on
CPU), a ``StepOps`` (inference/step_ops.py) interchangeable with ``TorchStepOps``.

Imported only where Triton is installed and the Triton step is chosen
(``inference.fast_decode.FastGreedyGenerator``); the kernels are in inference/triton_kernels.py.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import triton

from inference.step_ops import HFModule, StepOps, TextShape
from inference.triton_kernels import (
    add_rms_norm_kernel,
    attn_combine_kernel,
    attn_partial_kernel,
    gelu_mul_kernel,
    qk_rope_store_kernel,
    rms_norm_kernel,
)

_ATTN_BLOCK = 64  # KV columns per decode-attention program
# Splits the merge kernel reads at a time: the short buffers' 2,048 columns make 32 splits.
_COMBINE_CHUNK = 32


class TritonStepOps(StepOps):
    """Fused kernels for the operations of ``TorchStepOps``, with the same roundings."""

    def __init__(self, shape: TextShape, gelu_tanh: bool) -> None:
        self.shape = shape
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
        rms_norm_kernel[(dense.numel() // n,)](
            dense, self._w1(module), out, n, module.eps, BLOCK=triton.next_power_of_2(n)
        )
        return out.permute([order.index(d) for d in range(x.dim())])

    def add_norm(
        self, y: torch.Tensor, residual: torch.Tensor, post: HFModule, following: HFModule
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = y.shape[-1]
        y2, r2 = y.reshape(-1, n), residual.reshape(-1, n)
        hidden, normed = torch.empty_like(r2), torch.empty_like(r2)
        add_rms_norm_kernel[(y2.shape[0],)](
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
        qk_rope_store_kernel[grid](
            q, k, v, self._w1(attn.q_norm), self._w1(attn.k_norm),
            rope[0].contiguous(), rope[1].contiguous(), q_out, keys, values, column,
            keys.stride(0), keys.stride(1), keys.shape[2], attn.q_norm.eps, attn.k_norm.eps,
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
        rows (2.2 TB/s of valid KV at 64 rows).

        A ring (a local layer of the long arena, ``window`` columns a row) is read whole, its
        validity per slot as the protocol says (inference/step_ops.py)."""
        s = self.shape
        keys, values = cache
        rows, columns = keys.shape[0], keys.shape[2]
        splits = triton.cdiv(columns, _ATTN_BLOCK)
        # Gemma's local layers see only the last ``window`` columns: on long full-length
        # buffers, launch programs for the window's blocks alone (one more for a window that
        # straddles them). A ring holds just its window, so it never takes this branch (whose
        # blocks count from the window's first column, which a ring keeps at no fixed slot).
        windowed = window > 0 and triton.cdiv(window, _ATTN_BLOCK) + 1 < splits
        if windowed:
            splits = triton.cdiv(window, _ATTN_BLOCK) + 1
        part_max = torch.empty(rows, s.num_heads, splits, dtype=torch.float32, device=q.device)
        part_sum = torch.empty_like(part_max)
        part_acc = torch.empty(
            rows, s.num_heads, splits, s.head_dim, dtype=torch.float32, device=q.device
        )
        group = s.num_heads // s.num_kv_heads
        attn_partial_kernel[(rows, s.num_kv_heads, splits)](
            q, keys, values, starts, column, part_max, part_sum, part_acc,
            keys.stride(0), keys.stride(1), columns, s.scaling, window, splits, int(windowed),
            H=s.num_heads, G=group, GP=max(16, triton.next_power_of_2(group)), D=s.head_dim,
            BLOCK_N=_ATTN_BLOCK, PREC="ieee" if q.dtype == torch.float32 else None, num_warps=4,
        )  # fmt: skip
        out = torch.empty(rows, s.num_heads, s.head_dim, dtype=q.dtype, device=q.device)
        attn_combine_kernel[(rows, s.num_heads)](
            part_max, part_sum, part_acc, out, splits,
            D=s.head_dim, CHUNK=min(triton.next_power_of_2(splits), _COMBINE_CHUNK),
            LOOP=splits > _COMBINE_CHUNK, num_warps=4,
        )  # fmt: skip
        return out.view(rows, 1, s.num_heads * s.head_dim)

    def mlp(self, module: HFModule, x: torch.Tensor) -> torch.Tensor:
        if not self._gelu_tanh:
            return module(x)
        gate, up = module.gate_proj(x), module.up_proj(x)
        act = torch.empty_like(gate)
        n = gate.shape[-1]
        rows = gate.numel() // n
        gelu_mul_kernel[(rows, triton.cdiv(n, 1024))](gate, up, act, n, n, BLOCK=1024)
        return module.down_proj(act)

    def geglu(self, module: HFModule, gate_up: torch.Tensor) -> torch.Tensor:
        n = gate_up.shape[-1] // 2
        if not self._gelu_tanh:
            gate, up = gate_up.chunk(2, dim=-1)
            return module.act_fn(gate) * up
        fused = gate_up.reshape(-1, 2 * n)
        if fused.stride(-1) != 1:
            fused = fused.contiguous()
        act = torch.empty(*gate_up.shape[:-1], n, dtype=gate_up.dtype, device=gate_up.device)
        # gate and up read in place, the two halves of each row of the product (no copy).
        gelu_mul_kernel[(fused.shape[0], triton.cdiv(n, 1024))](
            fused, fused[:, n:], act, n, fused.stride(0), BLOCK=1024
        )
        return act

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
