"""A decoder layer's q, k and v projections as one matrix product in the decode step.

Why: a decode step at batch 1 reads every weight once, and the time goes to reading them. The
k and v projections of MedGemma-4B are 5 MB each and q 10 MB: as three separate matrix-vector
products cuBLAS reads them at under 1 TB/s on an H200, against ~3.4 TB/s for the 52 MB MLP
matrices (benchmarks/decode_gemv.py measures both).

What: the three weights are copied once into one [q + k + v, hidden] tensor, and the modules'
own weights become views of its rows, so no memory is added and the prompt pass (which calls
the modules) reads the same storage. The decode step multiplies by the whole tensor and splits
the result. Only plain ``torch.nn.Linear`` projections without bias on one device and dtype are
fused (quantised layers keep their own modules). The tensor is kept on the attention module, so
a second generator on the same model reuses it rather than fusing again.

cuBLAS picks its kernel by shape, so the fused product may sum in another order than the three
apart and a bf16 output can round the other way, as with the step's fused kernels (see
inference/fast_decode.py on token identity). On the random-weight 4B in bf16, 256 tokens stayed
identical to plain ``generate`` at 1, 10 and 85 images (benchmarks/RESULTS.md).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

_FUSED_ATTRIBUTE = "_decode_qkv_weight"


def _fusable(projections: tuple[Any, ...]) -> bool:
    return all(type(p) is torch.nn.Linear and p.bias is None for p in projections) and (
        len({(p.weight.dtype, p.weight.device) for p in projections}) == 1
    )


def fuse_qkv(attn: Any) -> torch.Tensor | None:
    """The [q + k + v, hidden] weight of attention module ``attn`` (fused on first call), or
    None when its projections cannot be fused."""
    existing = getattr(attn, _FUSED_ATTRIBUTE, None)
    if isinstance(existing, torch.Tensor):
        return existing
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    if not _fusable(projections):
        return None
    with torch.no_grad():
        weight = torch.cat([p.weight for p in projections])
        first = 0
        for projection in projections:
            rows = projection.weight.shape[0]
            projection.weight.data = weight[first : first + rows]
            first += rows
    setattr(attn, _FUSED_ATTRIBUTE, weight)
    return weight


def project_qkv(
    attn: Any, x: torch.Tensor, weight: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, k, v) of ``x``: one product with the fused ``weight``, else the three modules."""
    if weight is None:
        return attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    sizes = [attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features]
    q, k, v = F.linear(x, weight).split(sizes, dim=-1)
    return q, k, v
