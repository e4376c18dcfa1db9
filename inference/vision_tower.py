"""The vision tower's activations kept in row-major order, and images handed over without copies.

Why: SigLIP's embeddings (``SiglipVisionEmbeddings.forward``) are the patch convolution's output
``[images, width, grid, grid]`` flattened and transposed to ``[images, patches, width]``: a view
whose memory is still width-major. The position embeddings are added to it, and elementwise
results keep their operand's layout, so the whole residual stream of the tower stays
transposed: every LayerNorm first copies it to row-major order, and every residual add reads
it with strided loads. On an H200, for an 85-slice CT study (85 x 4,096 patches x 1,152), those
copies and adds took about 0.3 s of the 1.1 s tower (benchmarks/ct_profile.py).

What: a forward hook on each vision-embeddings module returns its output in row-major order,
one copy per forward. Values are unchanged (a copy; every later operation computes the same
numbers from either layout), so the tokens are those of the unhooked model.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

# Class names of the embedding modules whose output is a transposed view (transformers' SigLIP,
# the vision tower of Gemma 3 and MedGemma).
_TRANSPOSED_EMBEDDINGS = ("SiglipVisionEmbeddings",)


def _row_major(_module: torch.nn.Module, _inputs: Any, output: Any) -> Any:
    if isinstance(output, torch.Tensor) and not output.is_contiguous():
        return output.contiguous()
    return output


def keep_vision_embeddings_row_major(model: torch.nn.Module) -> int:
    """Hook every vision-embeddings module of ``model``; returns how many were hooked."""
    hooked = 0
    for module in model.modules():
        if type(module).__name__ in _TRANSPOSED_EMBEDDINGS:
            module.register_forward_hook(_row_major)
            hooked += 1
    return hooked


def as_rgb(image: Image.Image) -> Image.Image:
    """The image in RGB; an RGB image as it is (``convert`` copies even then: 0.6 ms for an
    896 px slice, 50 ms for an 85-slice study)."""
    return image if image.mode == "RGB" else image.convert("RGB")
