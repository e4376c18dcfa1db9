"""DICOM instances of one study version -> the images MedGemma sees, and the way back.

Three renderings, one per kind of study (docs/architecture.md, "Model facts"):

* Projection radiographs (CR, DX and any other 2D image): the PS3.4 Annex N grayscale
  pipeline — Modality LUT (PS3.3 C.11.1), VOI LUT or window (PS3.3 C.11.2; the 0.5-99.5
  percentile range when the instance has neither), MONOCHROME1 shown inverted (PS3.3
  C.7.6.3.1.2), scaled to 8 bits. Colour images (RGB, YBR_*, PALETTE COLOR) stay colour.
* CT: the series with the most axial slices, ordered by Instance Number, at most 85 slices
  sampled evenly, Hounsfield units through Rescale Slope/Intercept (PS3.3 C.8.2.1.1.4) and three
  windows as the red, green and blue channels (-1024..1024, -135..215, 0..80 HU).
* MR: the same series choice and sampling; each slice scaled by its own min/max.

Every image is padded to a square keeping its aspect ratio. The padding is centred (the
source image sits in the middle of the square, the shorter dimension padded equally before and
after, the odd pixel after) and black. MedGemma 1.5 reports boxes as ``[y0, x0, y1, x1]``
normalised to 0..1000 of the square it was given; ``SquareGeometry`` remembers where the source
pixels lie in that square so ``box_2d_to_region`` maps a box back to source pixel coordinates
and ``region_to_box_2d`` maps a region forward. The model processor resizes the square to its
input size (896 x 896 for MedGemma); normalised coordinates do not change with that resize.
Given that ``side``, ``prepare_study`` makes the same resize itself (PIL, bilinear, as
Gemma 3's image processor does), so a 2k radiograph travels and is converted as 896 x 896 RGB
(2.4 MB) rather than at full size (11.5 MB): the inference worker's render processes do it.

Decoding goes through pydicom's pixel handlers, so every transfer syntax the node accepts
(uncompressed, deflate, RLE, JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000) works when
pylibjpeg and its plugins are installed. YBR_* colour is converted to RGB by pydicom.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array

from core.errors import InferenceError
from core.modalities import CROSS_SECTIONAL_MODALITIES
from core.redaction import error_text
from storage.report_schema import PixelRegion, ReportContent

log = logging.getLogger(__name__)

BOX_SCALE = 1000.0  # MedGemma 1.5 normalises box coordinates to 0..1000
MAX_CT_SLICES = 85
MAX_PROJECTION_IMAGES = 4
# (low, high) HU of the red, green and blue channels: wide, soft tissue, brain.
CT_WINDOWS_HU: tuple[tuple[float, float], ...] = ((-1024.0, 1024.0), (-135.0, 215.0), (0.0, 80.0))
PERCENTILE_WINDOW = (0.5, 99.5)
# A slice counts as axial when its normal is within ~37 degrees of the patient's z axis, which
# keeps gantry-tilted head CT (up to ~30 degrees) and rejects coronal/sagittal reformats.
AXIAL_MIN_NORMAL_Z = 0.8
CHEST_BODY_PARTS = frozenset({"CHEST", "THORAX", "LUNG", "HEART"})
CHEST_DESCRIPTION_WORDS = ("CHEST", "THORAX", "CXR", "LUNG", "胸")
# View Position (0018,5101), PS3.3 C.8.11.5: frontal projections first (PA before AP).
FRONTAL_VIEW_RANK = {"PA": 0, "AP": 1}
LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL"})
UNKNOWN_VIEW_RANK = 2
DEFER_SIZE = "256 KB"  # header reads leave Pixel Data on disk until it is decoded


class PreprocessError(InferenceError, ValueError):
    """No image of the study could be turned into model input; ``str()`` says why."""


@dataclass(frozen=True)
class SquareGeometry:
    """Where one source image lies inside the padded square the model saw.

    ``frame_number`` is the 1-based Referenced Frame Number (PS3.3 C.10.4) for multi-frame
    instances, None for single-frame ones.
    """

    sop_instance_uid: str
    rows: int
    columns: int
    side: int
    row_offset: int
    column_offset: int
    frame_number: int | None = None

    @classmethod
    def for_image(
        cls, sop_instance_uid: str, rows: int, columns: int, frame_number: int | None = None
    ) -> SquareGeometry:
        side = max(rows, columns)
        return cls(
            sop_instance_uid=sop_instance_uid,
            rows=rows,
            columns=columns,
            side=side,
            row_offset=(side - rows) // 2,
            column_offset=(side - columns) // 2,
            frame_number=frame_number,
        )


@dataclass
class PreparedStudy:
    """Model input for one study version; the lists are parallel, one entry per image."""

    images: list[Image.Image]
    sop_instance_uids: list[str]
    geometries: list[SquareGeometry]
    modality: str
    body_part: str
    skipped: list[str] = field(default_factory=list)  # "SOP UID: reason", no patient data


# --------------------------------------------------------------------------- box mapping


def box_2d_to_region(box_2d: Sequence[float], geometry: SquareGeometry) -> PixelRegion | None:
    """``[y0, x0, y1, x1]`` in 0..1000 of the padded square -> source pixel coordinates.

    Coordinates follow PS3.3 C.18.6.1.1 (SCOORD image-relative): (0, 0) is the top-left corner
    of the top-left pixel and (Columns, Rows) the bottom-right corner of the last one. The box
    is clipped to the image. A box lying entirely in the padding, farther than one unit of
    1000 from the image, gives None.
    """
    unit = geometry.side / BOX_SCALE
    y0, x0, y1, x1 = (float(v) * unit for v in box_2d)
    top, bottom = y0 - geometry.row_offset, y1 - geometry.row_offset
    left, right = x0 - geometry.column_offset, x1 - geometry.column_offset
    rows, columns = float(geometry.rows), float(geometry.columns)
    if bottom < -unit or top > rows + unit or right < -unit or left > columns + unit:
        return None
    return PixelRegion(
        sop_instance_uid=geometry.sop_instance_uid,
        frame_number=geometry.frame_number,
        x0=min(max(left, 0.0), columns),
        y0=min(max(top, 0.0), rows),
        x1=min(max(right, 0.0), columns),
        y1=min(max(bottom, 0.0), rows),
    )


def region_to_box_2d(region: PixelRegion, geometry: SquareGeometry) -> list[float]:
    """Source pixel coordinates -> ``[y0, x0, y1, x1]`` in 0..1000 of the padded square.

    Not rounded: MedGemma emits integers, and one unit of 1000 is ``side / 1000`` pixels.
    """
    scale = BOX_SCALE / geometry.side
    corners = (
        region.y0 + geometry.row_offset,
        region.x0 + geometry.column_offset,
        region.y1 + geometry.row_offset,
        region.x1 + geometry.column_offset,
    )
    return [min(max(v * scale, 0.0), BOX_SCALE) for v in corners]


def attach_regions(content: ReportContent, geometries: Sequence[SquareGeometry]) -> ReportContent:
    """Fill ``Finding.region`` from ``box_2d`` and ``image_index`` for every boxed finding.

    A finding whose image index is out of range or whose box lies in the padding keeps its box
    but gets no region (the SR/GSPS builders draw regions only).
    """
    findings = []
    for finding in content.findings:
        region = None
        if finding.box_2d is not None and 0 <= finding.image_index < len(geometries):
            region = box_2d_to_region(finding.box_2d, geometries[finding.image_index])
        findings.append(finding.model_copy(update={"region": region}))
    return content.model_copy(update={"findings": findings})


# --------------------------------------------------------------------------- rendering


def pad_to_square(
    pixels: np.ndarray, geometry: SquareGeometry, side: int | None = None
) -> Image.Image:
    """Place an 8-bit (rows, columns[, 3]) array in the middle of a black RGB square; with
    ``side``, a larger square is shrunk to ``side`` x ``side`` (bilinear) before it becomes RGB:
    the values the model's image processor would make of the full square, in a third of the
    work (PIL resamples each channel alike)."""
    mode = "RGB" if pixels.ndim == 3 else "L"
    square = Image.new(mode, (geometry.side, geometry.side))
    square.paste(
        Image.fromarray(np.ascontiguousarray(pixels), mode=mode),
        (geometry.column_offset, geometry.row_offset),
    )
    if side is not None and 0 < side < geometry.side:
        square = square.resize((side, side), Image.Resampling.BILINEAR)
    return square if mode == "RGB" else square.convert("RGB")


def _to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Linear map of [low, high] onto 0..255, clipped.

    float32 and in place: a 2k x 2k radiograph is 4 M pixels, and float64 temporaries made
    this the slowest step of preprocessing.
    """
    span = high - low if high > low else 1.0
    scaled = values.astype(np.float32)
    scaled -= np.float32(low)
    scaled *= np.float32(255.0 / span)
    np.clip(scaled, 0.0, 255.0, out=scaled)
    np.rint(scaled, out=scaled)
    return scaled.astype(np.uint8)


def _has_voi(ds: Dataset) -> bool:
    has_window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
    return bool(ds.get("VOILUTSequence")) or has_window


def _voi_output_range(ds: Dataset) -> tuple[float, float]:
    """The output range of the first VOI transform (PS3.3 C.11.2.1).

    Found by passing the input extremes (and, for a VOI LUT, every LUT input value) through
    the same pydicom function. For a LUT this is the range of its data rather than the nominal
    2**bits: many LUTs declare 16 bits but hold 12-bit values.
    """
    probe = [-(2**40), 2**40]
    if ds.get("VOILUTSequence"):
        entries, first_mapped, _ = (int(v) for v in ds.VOILUTSequence[0].LUTDescriptor)
        probe += list(range(first_mapped, first_mapped + (entries or 2**16)))
    output = apply_voi_lut(np.asarray(probe, dtype=np.int64), ds, index=0)
    return float(np.min(output)), float(np.max(output))


def _first_value(value: Any) -> float:
    """The first of a multi-valued window attribute (PS3.3 C.11.2.1.2: one window per value)."""
    return float(value[0] if isinstance(value, MultiValue | list | tuple) else value)


def _linear_window(ds: Dataset) -> tuple[float, float] | None:
    """The input range (low, high) the first window maps onto its whole output range, when it
    is the LINEAR function (PS3.3 C.11.2.1.2.1, also when VOI LUT Function is absent) and
    there is no VOI LUT Sequence, which takes precedence; None for any other VOI transform
    (pydicom applies those). LINEAR is y = ((x - (c - 0.5)) / (w - 1) + 0.5) over
    [c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2], so ``_to_uint8`` over that range gives
    pydicom's window followed by ``_to_uint8`` over its output range (within rounding),
    without its float64 pass over the whole frame, which took most of a radiograph's
    rendering time."""
    if ds.get("VOILUTSequence"):
        return None
    function = str(ds.get("VOILUTFunction", "") or "LINEAR").strip().upper()
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if function != "LINEAR" or center is None or width is None:
        return None
    middle, span = _first_value(center) - 0.5, _first_value(width) - 1
    if span <= 0:  # width 1 and invalid widths: pydicom decides
        return None
    return middle - span / 2, middle + span / 2


def render_grayscale(ds: Dataset, stored: np.ndarray) -> np.ndarray:
    """PS3.4 N.2 grayscale pipeline for one frame of stored values -> 8-bit display values.

    Modality LUT or rescale (PS3.3 C.11.1), then the first VOI LUT or window (C.11.2), or the
    0.5-99.5 percentile range when there is none (or it cannot be used), then the MONOCHROME1
    inversion (C.7.6.3.1.2: minimum value is white).
    """
    values = apply_modality_lut(stored, ds)
    display: np.ndarray | None = None
    if _has_voi(ds):
        try:
            window = _linear_window(ds)
            if window is not None:
                display = _to_uint8(values, *window)
            else:
                low, high = _voi_output_range(ds)
                display = _to_uint8(apply_voi_lut(values, ds, index=0), low, high)
        except (ValueError, TypeError, IndexError, AttributeError) as exc:
            log.warning("VOI LUT/window unusable (%s); using the percentile window", exc)
    if display is None:
        low, high = np.percentile(values, PERCENTILE_WINDOW)
        display = _to_uint8(values, float(low), float(high))
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        display = 255 - display
    return display


def render_colour(ds: Dataset, decoded: np.ndarray) -> np.ndarray:
    """Colour frame -> 8-bit RGB (PS3.3 C.7.6.3.1.2).

    pydicom returns YBR_FULL/YBR_FULL_422/YBR_ICT/YBR_RCT as RGB already; PALETTE COLOR goes
    through its lookup tables (C.7.6.3.1.5); deeper than 8 bits is scaled down.
    """
    rgb = decoded
    if ds.get("PhotometricInterpretation") == "PALETTE COLOR":
        rgb = apply_color_lut(decoded, ds)
    if rgb.dtype != np.uint8:
        top = float(2 ** (8 * rgb.dtype.itemsize) - 1) if rgb.dtype.kind == "u" else rgb.max()
        rgb = _to_uint8(rgb, 0.0, top)
    return np.ascontiguousarray(rgb)


def _is_grayscale(ds: Dataset) -> bool:
    return str(ds.get("PhotometricInterpretation", "MONOCHROME2")).startswith("MONOCHROME")


def _decode_frame(ds: Dataset, frame_index: int) -> np.ndarray:
    """One frame, decoded; YBR colour comes back as RGB."""
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        return pixel_array(ds, index=frame_index)
    return ds.pixel_array


def _frame_number(ds: Dataset, frame_index: int) -> int | None:
    return frame_index + 1 if int(ds.get("NumberOfFrames", 1) or 1) > 1 else None


def render_projection(ds: Dataset, frame_index: int = 0) -> np.ndarray:
    """A radiograph frame (the first of a multi-frame one) -> 8-bit grayscale or RGB pixels."""
    decoded = _decode_frame(ds, frame_index)
    return render_grayscale(ds, decoded) if _is_grayscale(ds) else render_colour(ds, decoded)


# --------------------------------------------------------------------------- CT and MR slices


def _functional_group_item(ds: Dataset, frame_index: int, sequence: str) -> Dataset | None:
    """The first item of a functional group macro for a frame (PS3.3 C.7.6.16): per-frame
    value when present, otherwise the shared one."""
    for groups, index in (
        ("PerFrameFunctionalGroupsSequence", frame_index),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        items = ds.get(groups)
        if items and index < len(items) and items[index].get(sequence):
            item: Dataset = items[index].get(sequence)[0]
            return item
    return None


def _rescale(ds: Dataset, frame_index: int) -> tuple[float, float]:
    """Rescale Slope/Intercept (PS3.3 C.11.1.1.2; C.7.6.16.2.9 in enhanced objects)."""
    item = _functional_group_item(ds, frame_index, "PixelValueTransformationSequence")
    source = item if item is not None else ds
    slope = source.get("RescaleSlope")
    intercept = source.get("RescaleIntercept")
    return (float(slope) if slope is not None else 1.0, float(intercept or 0.0))


def _orientation(ds: Dataset, frame_index: int) -> list[float] | None:
    """Image Orientation (Patient) (PS3.3 C.7.6.2.1.1; C.7.6.16.2.4 in enhanced objects)."""
    item = _functional_group_item(ds, frame_index, "PlaneOrientationSequence")
    source = item if item is not None else ds
    value = source.get("ImageOrientationPatient")
    if value is None or len(value) != 6:
        return None
    return [float(v) for v in value]


def is_axial(orientation: Sequence[float] | None) -> bool:
    """True when the slice normal (row x column direction cosines) is close to the z axis."""
    if orientation is None:
        return False
    normal = np.cross(np.asarray(orientation[:3]), np.asarray(orientation[3:]))
    length = float(np.linalg.norm(normal))
    return length > 0 and abs(float(normal[2])) / length >= AXIAL_MIN_NORMAL_Z


def render_ct_slice(ds: Dataset, frame_index: int) -> np.ndarray:
    """HU = stored * slope + intercept; each CT window becomes one colour channel."""
    slope, intercept = _rescale(ds, frame_index)
    hounsfield = _decode_frame(ds, frame_index).astype(np.float64) * slope + intercept
    channels = [_to_uint8(hounsfield, low, high) for low, high in CT_WINDOWS_HU]
    return np.stack(channels, axis=-1)


def render_mr_slice(ds: Dataset, frame_index: int) -> np.ndarray:
    """Plain min/max scaling of the slice's own values."""
    values = _decode_frame(ds, frame_index)
    if values.ndim == 3:  # colour MR is rare; keep it colour
        return render_colour(ds, values)
    return _to_uint8(values, float(values.min()), float(values.max()))


@dataclass(frozen=True)
class _Slice:
    ds: Dataset
    frame_index: int
    sort_key: tuple[float, float, int]


def _instance_slices(header: Dataset) -> list[_Slice]:
    frames = int(header.get("NumberOfFrames", 1) or 1)
    number = header.get("InstanceNumber")
    position = header.get("ImagePositionPatient")
    z = float(position[2]) if position is not None and len(position) == 3 else 0.0
    key_number = float(number) if number is not None else float("inf")
    return [_Slice(header, i, (key_number, z, i)) for i in range(frames)]


def _choose_series(instances: Sequence[Dataset]) -> list[_Slice]:
    """The series with the most axial slices (any orientation if none is axial), in order."""
    by_series: dict[str, list[_Slice]] = {}
    for ds in instances:
        uid = str(ds.get("SeriesInstanceUID", ""))
        by_series.setdefault(uid, []).extend(_instance_slices(ds))
    axial = {
        uid: [s for s in slices if is_axial(_orientation(s.ds, s.frame_index))]
        for uid, slices in by_series.items()
    }
    candidates = axial if any(axial.values()) else by_series
    best = max(sorted(candidates), key=lambda uid: len(candidates[uid]))
    return sorted(candidates[best], key=lambda s: s.sort_key)


def sample_evenly(count: int, limit: int) -> list[int]:
    """At most ``limit`` indices spread evenly over ``range(count)``, first and last included."""
    if count <= limit:
        return list(range(count))
    return sorted({int(v) for v in np.rint(np.linspace(0, count - 1, limit))})


def _prepare_cross_sectional(
    modality: str, instances: Sequence[Dataset], side: int | None
) -> PreparedStudy:
    slices = _choose_series(instances)
    chosen = [slices[i] for i in sample_evenly(len(slices), MAX_CT_SLICES)]
    render = render_ct_slice if modality == "CT" else render_mr_slice
    study = _empty_study(modality, chosen[0].ds)
    for item in chosen:
        _add_image(study, item.ds, item.frame_index, render, side)
    return study


# --------------------------------------------------------------------------- radiographs


def _view_rank(header: Dataset) -> tuple[bool, int]:
    """(is lateral, rank among frontal views): PA, then AP, then anything else."""
    view = str(header.get("ViewPosition", "") or "").strip().upper()
    return view in LATERAL_VIEWS, FRONTAL_VIEW_RANK.get(view, UNKNOWN_VIEW_RANK)


def is_chest(header: Dataset) -> bool:
    """Body Part Examined (PS3.3 C.7.3.1, CID 4031) or, when absent, the descriptions."""
    body_part = str(header.get("BodyPartExamined", "") or "").strip().upper()
    if body_part:
        return body_part in CHEST_BODY_PARTS
    text = " ".join(
        str(header.get(k, "") or "") for k in ("StudyDescription", "SeriesDescription")
    ).upper()
    return any(word in text for word in CHEST_DESCRIPTION_WORDS)


def _instance_order(header: Dataset) -> tuple[float, float]:
    series = header.get("SeriesNumber")
    number = header.get("InstanceNumber")
    return (
        float(series) if series is not None else float("inf"),
        float(number) if number is not None else float("inf"),
    )


def _choose_projections(instances: Sequence[Dataset]) -> list[Dataset]:
    """Chest: the best frontal view (PA, AP, unknown) then a lateral view if there is one.
    Other radiographs: up to MAX_PROJECTION_IMAGES in series/instance order."""
    ordered = sorted(instances, key=_instance_order)
    if not any(is_chest(ds) for ds in ordered):
        return ordered[:MAX_PROJECTION_IMAGES]
    frontal = [ds for ds in ordered if not _view_rank(ds)[0]]
    lateral = [ds for ds in ordered if _view_rank(ds)[0]]
    chosen = []
    if frontal:
        chosen.append(min(frontal, key=lambda ds: _view_rank(ds)[1]))
    if lateral:
        chosen.append(lateral[0])
    return chosen


def _prepare_projection(instances: Sequence[Dataset], side: int | None) -> PreparedStudy:
    chosen = _choose_projections(instances)
    study = _empty_study(str(chosen[0].get("Modality", "") or "OT"), chosen[0])
    if is_chest(chosen[0]):
        study.body_part = "CHEST"  # THORAX, LUNG or a chest description: one template key
    for ds in chosen:
        _add_image(study, ds, 0, render_projection, side)
    return study


# --------------------------------------------------------------------------- study entry point


def _read(source: Dataset | str | os.PathLike[str]) -> Dataset:
    """A dataset as given, or read from a file with Pixel Data left on disk until decoded."""
    if isinstance(source, Dataset):
        return source
    return dcmread(Path(source), defer_size=DEFER_SIZE, force=True)


def _empty_study(modality: str, header: Dataset) -> PreparedStudy:
    body_part = str(header.get("BodyPartExamined", "") or "").strip().upper()
    return PreparedStudy([], [], [], modality=modality, body_part=body_part)


def _add_image(
    study: PreparedStudy,
    ds: Dataset,
    frame_index: int,
    render: Callable[[Dataset, int], np.ndarray],
    side: int | None = None,
) -> None:
    """Render one frame into ``study``; a frame that cannot be decoded is skipped and noted."""
    uid = str(ds.get("SOPInstanceUID", ""))
    try:
        pixels = render(ds, frame_index)
    except Exception as exc:  # any decoder failure: skip this image, keep the study going
        study.skipped.append(f"{uid}: cannot render ({error_text(exc)})")
        log.warning("skipping image %s: %s", uid, exc)
        return
    geometry = SquareGeometry.for_image(
        uid, pixels.shape[0], pixels.shape[1], _frame_number(ds, frame_index)
    )
    study.images.append(pad_to_square(pixels, geometry, side))
    study.sop_instance_uids.append(uid)
    study.geometries.append(geometry)


def _load_all(
    sources: Iterable[Dataset | str | os.PathLike[str]],
) -> tuple[list[Dataset], list[str]]:
    """Readable instances with Pixel Data, and a note for each one left out."""
    instances, skipped = [], []
    for source in sources:
        try:
            ds = _read(source)
        except Exception as exc:  # unreadable file: note it and use the others
            skipped.append(f"{source}: unreadable ({type(exc).__name__})")
            continue
        if "PixelData" not in ds:
            skipped.append(f"{ds.get('SOPInstanceUID', '?')}: no Pixel Data")
            continue
        instances.append(ds)
    return instances, skipped


def _primary_modality(instances: Sequence[Dataset]) -> str:
    """CT, then MR, when the study has them; otherwise the projection modality."""
    modalities = {str(ds.get("Modality", "") or "").upper() for ds in instances}
    for modality in CROSS_SECTIONAL_MODALITIES:
        if modality in modalities:
            return modality
    return "PROJECTION"


def prepare_study(
    sources: Sequence[Dataset | str | os.PathLike[str]], side: int | None = None
) -> PreparedStudy:
    """Choose and render the images of one study version (datasets or file paths); with
    ``side`` (the model's input side), images larger than that are shrunk to it.

    Raises PreprocessError when no instance yields an image.
    """
    instances, skipped = _load_all(sources)
    if not instances:
        raise PreprocessError("no instance with Pixel Data: " + "; ".join(skipped or ["none"]))
    modality = _primary_modality(instances)
    if modality in CROSS_SECTIONAL_MODALITIES:
        selected = [ds for ds in instances if ds.get("Modality") == modality]
        study = _prepare_cross_sectional(modality, selected, side)
    else:
        study = _prepare_projection(instances, side)
    study = replace(study, skipped=skipped + study.skipped)
    if not study.images:
        raise PreprocessError("no image could be rendered: " + "; ".join(study.skipped))
    return study
