"""RoPE tables (inference/rope_tables.py): the decode step reads cos and sin from tables built
once by the model's own rotary embedding; each entry must be what the step computed itself."""

from __future__ import annotations

import gc
from typing import Any

import torch

from inference.fast_decode import FastGreedyGenerator
from inference.rope_tables import RopeTables


def _language_model(model: Any) -> Any:
    return model.model.language_model


def test_a_lookup_equals_the_rotary_embedding_of_those_positions(model: Any) -> None:
    lm = _language_model(model)
    layer_types = tuple(lm.config.layer_types)
    assert len(set(layer_types)) == 2  # local and global bases: both are looked up
    table = RopeTables(lm.rotary_emb, layer_types).for_length(
        300, torch.float32, torch.device("cpu")
    )
    positions = torch.tensor([[0], [7], [123], [300]])  # 300: a state's last column
    looked_up = table.lookup(positions)
    probe = torch.zeros(4, 1, 1)
    for layer_type in set(layer_types):
        cos, sin = lm.rotary_emb(probe, positions, layer_type)
        assert torch.equal(looked_up[layer_type][0], cos)
        assert torch.equal(looked_up[layer_type][1], sin)
        assert looked_up[layer_type][0].shape == (4, 1, lm.config.head_dim)
    # The two bases differ: a lookup that mixed them up would fail above.
    local, full = (looked_up[t][0] for t in sorted(set(layer_types)))
    assert not torch.equal(local, full)


def test_states_of_one_length_share_a_table_that_lives_while_they_do(model: Any) -> None:
    lm = _language_model(model)
    tables = RopeTables(lm.rotary_emb, tuple(lm.config.layer_types))
    cpu = torch.device("cpu")
    first = tables.for_length(64, torch.float32, cpu)
    assert tables.for_length(64, torch.float32, cpu) is first
    assert first.positions == 65
    other = tables.for_length(128, torch.float32, cpu)
    assert other is not first and other.positions == 129
    del first
    gc.collect()
    assert set(tables._tables) == {128}  # no state of length 64 is left: its table went
    assert tables.for_length(64, torch.float32, cpu).positions == 65  # built again on demand


def test_the_generator_gives_each_state_the_table_of_its_length(model: Any) -> None:
    generator = FastGreedyGenerator(model, max_batch=2, max_total_len=256, len_step=64)
    state = generator._state(2, 128)
    assert state.rope.positions == 129
    assert generator._state(1, 128).rope is state.rope
