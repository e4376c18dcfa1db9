"""One source image of a report as the PDF shows it: 8-bit display pixels, shrunk for print.

The pixels follow the PS3.4 Annex N grayscale pipeline: Modality LUT or Rescale Slope/Intercept
(PS3.3 C.11.1), the first window (C.11.2.1.2, linear) or VOI LUT (C.11.2.1.1) of the header, or
the 0.5–99.5 percentile range of the modality values when it has neither, and MONOCHROME1 shown
inverted (C.7.6.3.1.2). Colour images stay colour (YBR_* arrives as RGB from pydicom; PALETTE
COLOR goes through its tables, C.7.6.3.1.5).

The image is shrunk by a whole factor to at most ``max_side`` pixels (about 200 dpi on the
printed page) first, in the stored-value domain when the Modality transform is a linear
rescale and the VOI a linear window (both commute with area averaging), so a 2k radiograph
costs a 1k one's work. Grayscale stays one channel.
The boxes are not burnt in: the template draws them over the image (vector lines and
selectable labels, the same markup the web console shows).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pydicom import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array

from core.errors import DeliveryError

MAX_SIDE = 1024
JPEG_QUALITY = 90
PERCENTILES = (0.5, 99.5)
_PERCENTILE_SAMPLES = 250_000  # enough pixels for stable percentiles, fast on 2k images
# What pydicom's pixel handlers raise for data they cannot decode.
_DECODE_ERRORS = (
    AttributeError,
    KeyError,
    TypeError,
    ValueError,
    NotImplementedError,
    RuntimeError,
)


class ReportImageError(DeliveryError):
    """The image cannot be shown (no pixel data, undecodable); the PDF says so instead."""


@dataclass(frozen=True)
class RenderedImage:
    data: bytes
    media_type: str  # image/jpeg or image/png
    width: int  # pixels
    height: int


def render_report_image(
    image: Dataset, frame: int = 0, *, max_side: int = MAX_SIDE, lossless: bool = False
) -> RenderedImage:
    """Frame ``frame`` (0-based) of ``image``, at most ``max_side`` pixels long, as JPEG
    (quality 90, no chroma subsampling) or, ``lossless``, as PNG.

    JPEG by default: the PDF writer embeds JPEG as it is but decodes and re-compresses a PNG
    (zlib level 6), which costs more than everything else in a report put together; the PDF
    is a report with a picture of where the findings are, the images themselves stay in PACS.
    """
    try:
        picture = display_picture(image, frame, max_side)
    except _DECODE_ERRORS as exc:
        raise ReportImageError(f"image {image.get('SOPInstanceUID', '?')}: {exc}") from exc
    buffer = io.BytesIO()
    if lossless:
        # Level 1: the PDF writer compresses the pixels again; spend the time once.
        picture.save(buffer, format="PNG", compress_level=1)
        media_type = "image/png"
    else:
        picture.save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
        media_type = "image/jpeg"
    return RenderedImage(buffer.getvalue(), media_type, picture.width, picture.height)


def display_picture(image: Dataset, frame: int = 0, max_side: int = MAX_SIDE) -> Image.Image:
    """The frame as an 8-bit "L" or "RGB" picture, shrunk by a whole factor to fit max_side."""
    if "PixelData" not in image:
        raise ValueError("no pixel data")
    frames = int(image.get("NumberOfFrames", 1) or 1)
    decoded = pixel_array(image, index=min(frame, frames - 1)) if frames > 1 else image.pixel_array
    factor = math.ceil(max(decoded.shape[:2]) / max_side)
    photometric = str(image.get("PhotometricInterpretation", "MONOCHROME2"))
    if not photometric.startswith("MONOCHROME"):
        return _reduced(Image.fromarray(_colour(image, decoded, photometric)), factor)
    display = _grayscale(image, decoded, factor)
    if photometric == "MONOCHROME1":
        display = 255 - display
    return Image.fromarray(display, mode="L")


def _reduced(picture: Image.Image, factor: int) -> Image.Image:
    """Each ``factor`` x ``factor`` block averaged into one pixel (PIL Image.reduce)."""
    return picture.reduce(factor) if factor > 1 else picture


def _grayscale(image: Dataset, stored: np.ndarray, factor: int) -> np.ndarray:
    window = _first_window(image)
    if "ModalityLUTSequence" in image or (window is None and image.get("VOILUTSequence")):
        values = apply_modality_lut(stored, image)  # table look-ups: at full resolution
        if window is None:
            mapped = apply_voi_lut(values, image, index=0)
            low, high = float(np.min(mapped)), float(np.max(mapped))
            return _to_uint8(_shrunk(mapped, factor), low, high)
        return _to_uint8(_shrunk(values, factor), *window)
    values = apply_modality_lut(_shrunk(stored, factor), image)  # a linear rescale at most
    if window is None:
        sample = values.ravel()[:: max(1, values.size // _PERCENTILE_SAMPLES)]
        low, high = np.percentile(sample, PERCENTILES)
        window = float(low), float(high)
    return _to_uint8(values, *window)


def _shrunk(values: np.ndarray, factor: int) -> np.ndarray:
    """Area-averaged by ``factor``, as float32."""
    floats = np.ascontiguousarray(values, dtype=np.float32)
    if factor <= 1:
        return floats
    return np.asarray(_reduced(Image.fromarray(floats, mode="F"), factor))


def _first_window(image: Dataset) -> tuple[float, float] | None:
    """(low, high) of the first linear window (PS3.3 C.11.2.1.2.1), or None."""
    centre = _first_number(image.get("WindowCenter"))
    width = _first_number(image.get("WindowWidth"))
    if centre is None or width is None or width < 1:
        return None
    return centre - 0.5 - (width - 1) / 2, centre - 0.5 + (width - 1) / 2


def _first_number(value: object) -> float | None:
    if value is None:
        return None
    first = value[0] if isinstance(value, Sequence) and not isinstance(value, str) else value
    try:
        number = float(first)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """[low, high] onto 0..255, clipped; float32, in place where it can be."""
    scaled = np.array(values, dtype=np.float32)
    scaled -= np.float32(low)
    scaled *= np.float32(255.0 / (high - low if high > low else 1.0))
    np.clip(scaled, 0.0, 255.0, out=scaled)
    return np.rint(scaled).astype(np.uint8)


def _colour(image: Dataset, decoded: np.ndarray, photometric: str) -> np.ndarray:
    rgb = apply_color_lut(decoded, image) if photometric == "PALETTE COLOR" else decoded
    if rgb.dtype != np.uint8:
        top = (
            float(2 ** (8 * rgb.dtype.itemsize) - 1) if rgb.dtype.kind == "u" else float(rgb.max())
        )
        rgb = _to_uint8(rgb, 0.0, top)
    return np.ascontiguousarray(rgb)
