"""The vision tower's embeddings kept row-major: same numbers, contiguous activations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from inference.vision_tower import as_rgb, keep_vision_embeddings_row_major


def load(demo_dir: Path) -> Any:
    return AutoModelForImageTextToText.from_pretrained(demo_dir, dtype=torch.float32).eval()


def embeddings_of(model: Any) -> Any:
    return next(m for m in model.modules() if type(m).__name__ == "SiglipVisionEmbeddings")


def pixels(model: Any, images: int) -> torch.Tensor:
    side = model.config.vision_config.image_size
    generator = torch.Generator().manual_seed(3)
    return torch.randn(images, 3, side, side, generator=generator)


def test_hooked_embeddings_are_row_major_and_the_tower_gives_the_same_numbers(
    demo_dir: Path,
) -> None:
    plain, hooked = load(demo_dir), load(demo_dir)
    embeddings = embeddings_of(plain)
    batch = pixels(plain, images=3)
    with torch.no_grad():
        assert not embeddings(batch).is_contiguous()  # the layout the hook exists for

        assert keep_vision_embeddings_row_major(hooked) == 1
        hooked_embeddings = embeddings_of(hooked)(batch)
        assert hooked_embeddings.is_contiguous()
        assert torch.equal(hooked_embeddings, embeddings(batch))
        assert torch.equal(
            hooked.model.get_image_features(pixel_values=batch).pooler_output,
            plain.model.get_image_features(pixel_values=batch).pooler_output,
        )


def test_a_model_without_a_siglip_tower_is_left_alone() -> None:
    assert keep_vision_embeddings_row_major(torch.nn.Sequential(torch.nn.Linear(2, 2))) == 0


def test_rgb_images_are_handed_over_without_a_copy() -> None:
    rgb = Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8))
    grey = Image.fromarray(np.full((4, 4), 9, dtype=np.uint8))

    assert as_rgb(rgb) is rgb
    converted = as_rgb(grey)
    assert converted.mode == "RGB"
    assert np.asarray(converted)[0, 0].tolist() == [9, 9, 9]
