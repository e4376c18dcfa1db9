"""RoPE's cos and sin for every position a decode state can reach, computed once.

Gemma 3's rotary embedding turns positions into cos and sin in about nine kernels for each of
its two layer types (local and global bases): a cast, a batched product, a concatenation, cos,
sin, two scalings and two casts. A decode step replayed 255 times for one study ran them every
token, some 18 small kernels a step, for values that depend on the position alone.
``RopeTables`` runs the model's own ``rotary_emb`` once over positions 0..length, as a batch of
one-token rows shaped like the step's own call (``[rows, 1]`` position ids), so each table row
is the very tensor the step computed; the step then reads its rows' entries, four gathers.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from inference.step_ops import HFModule

Rope = dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer type: (cos, sin), [rows, 1, D]


@dataclass(eq=False)
class RopeTable:
    """cos and sin of positions 0..``positions`` - 1 for each layer type, [positions, 1, D]."""

    positions: int
    cos_sin: dict[str, tuple[torch.Tensor, torch.Tensor]]

    def lookup(self, positions: torch.Tensor) -> Rope:
        """The step's ``rope`` for ``positions`` [rows, 1], each below ``self.positions``."""
        index = positions[:, 0]
        return {
            layer_type: (cos.index_select(0, index), sin.index_select(0, index))
            for layer_type, (cos, sin) in self.cos_sin.items()
        }


class RopeTables:
    """One ``RopeTable`` per decode length, shared by that length's states while any lives
    (a state's CUDA graph reads its table's memory, so a table is never replaced in place)."""

    def __init__(self, rotary_emb: HFModule, layer_types: tuple[str, ...]) -> None:
        self._rotary_emb = rotary_emb
        self._layer_types = sorted(set(layer_types))
        self._tables: weakref.WeakValueDictionary[int, RopeTable] = weakref.WeakValueDictionary()

    def for_length(self, length: int, dtype: torch.dtype, device: torch.device) -> RopeTable:
        """The table for a state of ``length`` columns: a row's position never passes its
        column, and a state writes columns up to ``length`` (its last token's position)."""
        table = self._tables.get(length)
        if table is None:
            table = self._compute(length + 1, dtype, device)
            self._tables[length] = table
        return table

    @torch.no_grad()
    def _compute(self, positions: int, dtype: torch.dtype, device: torch.device) -> RopeTable:
        ids = torch.arange(positions, device=device)[:, None]
        probe = torch.zeros(positions, 1, 1, dtype=dtype, device=device)  # dtype and device only
        return RopeTable(positions, {t: self._rotary_emb(probe, ids, t) for t in self._layer_types})
