"""Images shrunk to the model's input side ahead (inference/preprocess.py ``side``) give the
image processor exactly what it makes of the full-size square, so the render processes can
send 896 x 896 instead of a 2k square. The real Gemma 3 image processor of the installed
transformers (its PIL backend: the torchvision one resamples on its own, within a grey level),
MedGemma's 896 x 896 setting."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

from inference.preprocess import SquareGeometry, pad_to_square, prepare_study
from inference.render_pool import render_timed, take_study
from inference.transformers_engine import bilinear_square_side

SIDE = 896


@pytest.fixture(scope="module")
def processor() -> Any:
    return Gemma3ImageProcessorPil(
        size={"height": SIDE, "width": SIDE}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )


def pixels(processor: Any, images: list[Any]) -> torch.Tensor:
    return processor(images=images, return_tensors="pt")["pixel_values"]


def test_a_radiograph_shrunk_ahead_gives_the_processor_the_same_pixels(
    processor: Any, rg1_unci: Path
) -> None:
    full, shrunk = prepare_study([rg1_unci]), prepare_study([rg1_unci], SIDE)
    assert full.images[0].size == (1955, 1955) and shrunk.images[0].size == (SIDE, SIDE)
    assert shrunk.geometries == full.geometries  # boxes map back to the source alike
    assert torch.equal(pixels(processor, full.images), pixels(processor, shrunk.images))


@pytest.mark.parametrize("channels", [1, 3])
def test_grey_and_colour_squares_shrunk_ahead_match(processor: Any, channels: int) -> None:
    rng = np.random.default_rng(7)
    shape = (1203, 1001) if channels == 1 else (1203, 1001, 3)
    source = rng.integers(0, 256, shape, dtype=np.uint8)
    geometry = SquareGeometry.for_image("1.2.3", 1203, 1001, None)
    full, shrunk = pad_to_square(source, geometry), pad_to_square(source, geometry, SIDE)
    assert shrunk.size == (SIDE, SIDE) and shrunk.mode == full.mode == "RGB"
    assert torch.equal(pixels(processor, [full]), pixels(processor, [shrunk]))


def test_smaller_images_are_never_enlarged(rg1_unci: Path) -> None:
    geometry = SquareGeometry.for_image("1.2.3", 512, 400, None)
    square = pad_to_square(np.zeros((512, 400), dtype=np.uint8), geometry, SIDE)
    assert square.size == (512, 512)
    rendered = take_study(render_timed([rg1_unci], SIDE))
    assert [image.size for image in rendered.images] == [(SIDE, SIDE)]


def test_only_a_bilinear_square_resize_is_made_ahead(processor: Any) -> None:
    assert bilinear_square_side(processor) == SIDE
    size = {"height": SIDE, "width": SIDE}
    same = {"size": size, "do_resize": True, "resample": 2}
    assert bilinear_square_side(SimpleNamespace(**same)) == SIDE
    assert bilinear_square_side(SimpleNamespace(**{**same, "resample": 3})) is None  # bicubic
    assert bilinear_square_side(SimpleNamespace(**{**same, "do_pan_and_scan": True})) is None
    assert bilinear_square_side(SimpleNamespace(**{**same, "do_resize": False})) is None
    oblong = {**same, "size": {"height": SIDE, "width": 448}}
    assert bilinear_square_side(SimpleNamespace(**oblong)) is None
    assert bilinear_square_side(None) is None
