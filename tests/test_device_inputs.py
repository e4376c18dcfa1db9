"""A batch prepared in pieces and joined (inference/device_inputs.py): the same inputs as one
``prepare`` of all its requests, hence the same answers; pieces that cannot be joined say so."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from config.settings import ModelSettings
from inference.device_inputs import DeviceInputs, join_pieces
from inference.engine import GenerationRequest, GenerationSettings, JoinError, JoiningEngine
from inference.transformers_engine import TransformersEngine


@pytest.fixture(scope="module")
def engine(demo_dir: Path) -> TransformersEngine:
    return TransformersEngine(ModelSettings(model_path=demo_dir, device="cpu"))


def picture(seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def request(seed: int, prompt: str, images: int = 1) -> GenerationRequest:
    return GenerationRequest(
        images=[picture(seed + i) for i in range(images)],
        prompt=prompt,
        settings=GenerationSettings(max_new_tokens=12),
    )


def batch() -> list[GenerationRequest]:
    """Prompts of other lengths (the pieces pad differently), and a study of three images
    (a prompt group of its own) inside the second piece."""
    return [
        request(1, "Findings?"),
        request(2, "Describe this chest radiograph in detail, please."),
        request(3, "Any fracture?", images=3),
        request(4, "Lungs?"),
        request(5, "Heart size and mediastinum, briefly."),
    ]


def by_indices(groups: list[DeviceInputs]) -> dict[tuple[int, ...], dict[str, torch.Tensor]]:
    return {tuple(g.indices): dict(g.tensors) for g in groups}


def test_joined_pieces_hold_the_tensors_of_one_prepare(engine: TransformersEngine) -> None:
    requests = batch()
    whole = engine.prepare(requests)
    joined = engine.join([engine.prepare(requests[:2]), engine.prepare(requests[2:])])
    assert isinstance(engine, JoiningEngine)
    assert joined.requests == requests
    expected, got = by_indices(whole.inputs), by_indices(joined.inputs)
    assert expected.keys() == got.keys() == {(0, 1, 3, 4), (2,)}
    for indices, tensors in expected.items():
        assert tensors.keys() == got[indices].keys()
        assert {"input_ids", "attention_mask", "pixel_values"} <= tensors.keys()
        for key, tensor in tensors.items():
            assert torch.equal(tensor, got[indices][key]), (indices, key)
    # The left padding really differed between the pieces: the join had to widen one.
    short = engine.prepare(requests[3:]).inputs[0].tensors["input_ids"]
    assert short.shape[1] < got[(0, 1, 3, 4)]["input_ids"].shape[1]


def test_a_joined_batch_answers_as_the_whole_batch(engine: TransformersEngine) -> None:
    requests = batch()
    whole = engine.generate_prepared(engine.prepare(requests))
    pieces = [engine.prepare(requests[i : i + 2]) for i in range(0, len(requests), 2)]
    joined = engine.generate_prepared(engine.join(pieces))
    assert [r.text for r in joined] == [r.text for r in whole]
    assert [r.prompt_tokens for r in joined] == [r.prompt_tokens for r in whole]
    assert [r.batch_size for r in joined] == [r.batch_size for r in whole] == [4, 4, 1, 4, 4]


def test_pieces_that_cannot_be_joined_are_refused(engine: TransformersEngine) -> None:
    one = engine.prepare([request(1, "Findings?")])
    group = one.inputs[0]
    right_padded = dict(group.tensors)
    mask = right_padded["attention_mask"].clone()
    mask[:, -1] = 0
    right_padded["attention_mask"] = mask
    with pytest.raises(JoinError, match="right"):
        join_pieces([(one.requests, [DeviceInputs(right_padded, [0])])], pad_id=0)
    extra = {**group.tensors, "pixel_attention_mask": torch.ones(1, 3)}
    with pytest.raises(JoinError, match="other tensors"):
        join_pieces([(one.requests, [group]), (one.requests, [DeviceInputs(extra, [0])])], pad_id=0)
    odd = {**group.tensors, "token_scores": torch.ones(1, 2, 3)}
    with pytest.raises(JoinError, match="token_scores"):
        join_pieces([(one.requests, [DeviceInputs(odd, [0])])], pad_id=0)
    with pytest.raises(TypeError):
        engine.join([one, type(one)(one.requests, "not prepared here")])
