"""An instance as a PNG: as the model saw it, or at a chosen size, optionally with boxes.

The model view is inference/preprocess.py's rendering (PS3.4 Annex N grayscale pipeline for
radiographs, three HU windows for CT, min/max for MR), padded to a centred square and
resized to MedGemma's 896 px input, as the processor does. ``size`` gives the rendering
without padding, its longer side ``size`` pixels (never enlarged; 0 = the stored size).
The overlay draws a report's regions (source pixel coordinates, PS3.3 C.18.6.1.1) mapped
into whichever view is returned.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom import dcmread
from pydicom.dataset import Dataset

from core.errors import ApiError
from inference.preprocess import (
    SquareGeometry,
    pad_to_square,
    render_ct_slice,
    render_mr_slice,
    render_projection,
)
from storage.report_schema import PixelRegion

MODEL_INPUT_SIDE = 896  # MedGemma's SigLIP input, 896 x 896 (model card)
BOX_COLOUR = (255, 200, 0)
# A font with CJK glyphs when one is installed (fonts-noto-cjk / fonts-wqy-microhei), so
# Chinese labels are drawn; Pillow's own font otherwise.
CJK_FONTS = (
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
)


class RenderError(ApiError, ValueError):
    """The stored instance cannot be shown as an image; ``str()`` says why."""


@dataclass(frozen=True)
class Box:
    region: PixelRegion
    label: str


def read_instance(path: Path) -> Dataset:
    try:
        return dcmread(path, force=True)
    except FileNotFoundError as exc:
        raise FileNotFoundError("the instance's file is no longer stored") from exc
    except Exception as exc:  # damaged file: say so, keep serving
        raise RenderError(f"the stored file cannot be read ({type(exc).__name__})") from exc


def render_frame(ds: Dataset, frame_index: int) -> np.ndarray:
    """8-bit pixels of one frame, rendered as the worker renders that modality."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if "PixelData" not in ds:
        raise RenderError("the instance has no Pixel Data")
    if frame_index >= frames:
        raise RenderError(f"frame {frame_index + 1} requested; the instance has {frames}")
    modality = str(ds.get("Modality", "") or "").upper()
    try:
        if modality == "CT":
            return render_ct_slice(ds, frame_index)
        if modality == "MR":
            return render_mr_slice(ds, frame_index)
        return render_projection(ds, frame_index)
    except Exception as exc:  # any decoder failure becomes a clear answer
        raise RenderError(f"the pixel data cannot be decoded ({type(exc).__name__})") from exc


def _to_image(pixels: np.ndarray) -> Image.Image:
    mode = "RGB" if pixels.ndim == 3 else "L"
    return Image.fromarray(np.ascontiguousarray(pixels), mode=mode).convert("RGB")


def model_view(pixels: np.ndarray, sop_uid: str, boxes: Sequence[Box]) -> Image.Image:
    """The padded square at the model's input size, boxes mapped through the padding."""
    geometry = SquareGeometry.for_image(sop_uid, pixels.shape[0], pixels.shape[1])
    square = pad_to_square(pixels, geometry)
    scale = MODEL_INPUT_SIDE / geometry.side
    image = square.resize((MODEL_INPUT_SIDE, MODEL_INPUT_SIDE), Image.Resampling.BILINEAR)
    offsets = (geometry.column_offset, geometry.row_offset)
    draw_boxes(image, boxes, scale, offsets)
    return image


def sized_view(pixels: np.ndarray, size: int, boxes: Sequence[Box]) -> Image.Image:
    """The rendering without padding, longer side ``size`` (0: as stored; never enlarged)."""
    image = _to_image(pixels)
    longer = max(image.size)
    target = longer if size == 0 else min(size, longer)
    scale = target / longer
    if target != longer:
        width, height = image.size
        new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = image.resize(new_size, Image.Resampling.LANCZOS)
    draw_boxes(image, boxes, scale, (0, 0))
    return image


@cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    for path in CJK_FONTS:
        if Path(path).is_file():
            return ImageFont.truetype(path, size)
    return ImageFont.load_default(size)


def draw_boxes(
    image: Image.Image, boxes: Sequence[Box], scale: float, offsets: tuple[int, int]
) -> None:
    if not boxes:
        return
    draw = ImageDraw.Draw(image)
    width = max(2, round(max(image.size) / 300))
    font = _font(max(12, round(max(image.size) / 45)))
    for box in boxes:
        region = box.region
        corners = (
            (region.x0 + offsets[0]) * scale,
            (region.y0 + offsets[1]) * scale,
            (region.x1 + offsets[0]) * scale,
            (region.y1 + offsets[1]) * scale,
        )
        draw.rectangle(corners, outline=BOX_COLOUR, width=width)
        text_height = draw.textbbox((0, 0), box.label, font=font)[3]
        text_y = max(corners[1] - text_height - 2 * width, 0)
        draw.text((corners[0], text_y), box.label, fill=BOX_COLOUR, font=font)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    # zlib level 3: measured on RG1_UNCI at full size, 2.6x faster than the default 6 for a
    # file 4 % larger.
    image.save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()
