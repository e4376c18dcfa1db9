"""The processor's image-token check runs on lists of ids (inference/token_check.py): the same
check, the same processor output, and a deep copy (each thread's processor) checks on its own."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image

from config.settings import load_settings
from inference.demo_model import write_demo_model
from inference.engine import GenerationRequest
from inference.transformers_engine import TransformersEngine


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> TransformersEngine:
    directory = tmp_path_factory.mktemp("demo") / "model"
    write_demo_model(directory)
    return TransformersEngine(load_settings().model, weights_dir=directory)


def requests() -> list[GenerationRequest]:
    image = Image.new("RGB", (96, 96), 128)
    return [GenerationRequest(images=[image], prompt=f"Finding {n}?") for n in range(3)]


def test_the_check_runs_on_lists_and_the_output_is_the_same(engine: TransformersEngine) -> None:
    processor = engine.processor
    assert "_check_special_mm_tokens" in vars(processor)
    checked = engine._processor_inputs(requests())
    own = processor.__dict__.pop("_check_special_mm_tokens")
    try:
        library = engine._processor_inputs(requests())
    finally:
        processor._check_special_mm_tokens = own
    assert sorted(checked) == sorted(library)
    assert all(torch.equal(checked[key], library[key]) for key in checked)


def test_a_prompt_cut_short_is_still_refused(engine: TransformersEngine) -> None:
    """What the check is for: a prompt truncated before its image tokens would misplace the
    image in the model."""
    text = [engine._chat_text(request) for request in requests()]
    images = [request.all_images for request in requests()]
    with pytest.raises(ValueError, match="image"):
        engine.processor(text=text, images=images, truncation=True, max_length=8)


def test_each_threads_copy_checks_with_its_own_processor(engine: TransformersEngine) -> None:
    copied = copy.deepcopy(engine.processor)
    assert copied._check_special_mm_tokens.__self__ is copied
