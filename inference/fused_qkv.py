"""A decoder layer's q, k and v projections as one matrix product in the decode step, and its
MLP's gate and up projections as another.

Why: a decode step at batch 1 reads every weight once, and the time goes to reading them. The
k and v projections of MedGemma-4B are 5 MB each and q 10 MB: as three separate matrix-vector
products cuBLAS reads them at under 1 TB/s on an H200, against ~3.4 TB/s for the 52 MB MLP
matrices (benchmarks/decode_gemv.py measures both); gate and up (52 MB each) are two launches
where one will do, and one kernel streaming 105 MB keeps every SM busy longer.

What: the weights are copied once into one [rows of each, hidden] tensor (``fuse_rows``), and
the modules' own weights become views of its rows, so no memory is added and the prompt pass
(which calls the modules) reads the same storage. The decode step multiplies by the whole
tensor and splits the result (q, k, v), or passes it to the GeGLU, which reads gate and up as
the two halves of each row (``project_mlp``). Only plain ``torch.nn.Linear`` projections
without bias on one device and dtype are fused (quantised layers keep their own modules). The
tensor is kept on the attention or MLP module, so a second generator on the same model reuses
it rather than fusing again.

cuBLAS picks its kernel by shape, so the fused product may sum in another order than the
products apart and a bf16 output can round the other way, as with the step's fused kernels
(see inference/fast_decode.py on token identity). On the random-weight 4B in bf16, 256 tokens
with q, k and v fused stayed identical to plain ``generate`` at 1, 10 and 85 images
(benchmarks/RESULTS.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from inference.step_ops import StepOps

Linear = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")


def plain_linear(*modules: Any) -> bool:
    """Bias-free ``torch.nn.Linear`` modules (not a subclass: quantised layers are ones) with
    their weights on one device in one dtype."""
    return all(type(m) is torch.nn.Linear and m.bias is None for m in modules) and (
        len({(m.weight.dtype, m.weight.device) for m in modules}) == 1
    )


def fuse_rows(module: Any, names: Sequence[str], attribute: str) -> torch.Tensor | None:
    """One weight with the rows of ``module``'s projections ``names`` in that order, kept as
    ``module.<attribute>`` (made on the first call; each projection's weight becomes a view of
    its rows), or None when they cannot be fused."""
    existing = getattr(module, attribute, None)
    if isinstance(existing, torch.Tensor):
        return existing
    projections = tuple(getattr(module, name) for name in names)
    if not plain_linear(*projections):
        return None
    with torch.no_grad():
        weight = torch.cat([p.weight for p in projections])
        first = 0
        for projection in projections:
            rows = projection.weight.shape[0]
            projection.weight.data = weight[first : first + rows]
            first += rows
    setattr(module, attribute, weight)
    return weight


def fuse_qkv(attn: Any) -> torch.Tensor | None:
    """The [q + k + v, hidden] weight of attention module ``attn``, or None."""
    return fuse_rows(attn, QKV, "_decode_qkv_weight")


def fuse_gate_up(mlp: Any) -> torch.Tensor | None:
    """The [gate + up, hidden] weight of GeGLU module ``mlp``, or None."""
    return fuse_rows(mlp, GATE_UP, "_decode_gate_up_weight")


def apply_linear(module: Any, x: torch.Tensor, linear: Linear = F.linear) -> torch.Tensor:
    """``module(x)``, by ``linear`` on its weight when it is a plain bias-free Linear."""
    return linear(x, module.weight) if plain_linear(module) else module(x)


def project_qkv(
    attn: Any, x: torch.Tensor, weight: torch.Tensor | None, linear: Linear = F.linear
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, k, v) of ``x``: one product with the fused ``weight``, else the three modules."""
    if weight is None:
        return attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    sizes = [attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features]
    q, k, v = linear(x, weight).split(sizes, dim=-1)
    return q, k, v


def project_mlp(
    mlp: Any, x: torch.Tensor, weight: torch.Tensor | None, ops: StepOps, linear: Linear = F.linear
) -> torch.Tensor:
    """``mlp(x)``: one product with the fused gate/up ``weight``, the GeGLU on its halves and
    down_proj; without ``weight``, ``ops.mlp``."""
    if weight is None:
        return ops.mlp(mlp, x)
    return apply_linear(mlp.down_proj, ops.geglu(mlp, linear(x, weight)), linear)
