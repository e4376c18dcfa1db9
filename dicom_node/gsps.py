"""Grayscale Softcopy Presentation States (PS3.3 A.33.1) that draw the AI boxes on the images.

One presentation state per image of the reported study that has findings with regions:

    Graphic Layer "AI" (C.10.7, recommended display colour yellow) holding, per finding,
      a Graphic Group (C.10.8) with
      a closed POLYLINE of the box in PIXEL units (C.10.5, Graphic Annotation) and
      a text object "n. label" in a bounding box just above (or below) the box;
    one text object in DISPLAY units across the top of the view with the test model banner
      (test models only) and the AI disclaimer;
    Softcopy VOI LUT (C.11.8): the image's first Window Center/Width, else its VOI LUT
      Sequence, else a window computed from the pixel data (0.5–99.5 percentiles of the
      modality values) or, without pixel data, from Bits Stored;
    Modality LUT (C.11.1): the image's own, copied by highdicom when present;
    Softcopy Presentation LUT (C.11.6): INVERSE for MONOCHROME1 images, IDENTITY otherwise;
    Presentation State Identification (C.11.10): Content Label AI_FINDINGS (AI_TEST_MODEL
      for test models), Content Description with the warning.

Findings are numbered as in the SR, and each box carries the SR measurement group's
Tracking Identifier and Tracking UID, so a viewer can link the two. Images of other studies
(priors) get no presentation state: their findings are in the SR only.

Patient and study attributes are copied from the image after vr_limits.fitted_copy (values
cut to their VR, missing type 2 attributes empty), as in the SR; texts are cut to their VR
(LO 64, ST 1024).
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut

from dicom_node.output_common import (
    GSPS_SERIES_DESCRIPTION,
    GSPS_SERIES_NUMBER,
    UTF8,
    NodeIdentity,
    PixelBox,
    SourceImages,
    content_datetime,
    free_text,
    gsps_instance_uid,
    gsps_series_uid,
    long_string,
    pin_creation_times,
    pixel_box,
    series_description,
    tracking_uid,
    warning_texts,
)
from storage.report_schema import (
    TEST_MODEL_BANNER,
    Finding,
    ModelIdentity,
    PixelRegion,
    ReportDocument,
)

AI_LAYER = "AI"
CONTENT_LABEL = "AI_FINDINGS"
TEST_CONTENT_LABEL = "AI_TEST_MODEL"
_PIXEL = hd.pr.AnnotationUnitsValues.PIXEL
_DISPLAY = hd.pr.AnnotationUnitsValues.DISPLAY
_MAX_TEXT = 1024  # Unformatted Text Value is ST
_LABEL_HEIGHT_FRACTION = 0.03  # of the image height
_CHARACTER_WIDTH = 0.6  # of the label height, per character
_INSTANCES_PER_VERSION = 1000
_NOTICE_BOX = (0.01, 0.01, 0.99, 0.07)  # DISPLAY units: left, top, right, bottom
LAYER_COLOR = hd.color.CIELabColor(97.1, -21.6, 94.5)  # yellow, C.10.7.1.1

NumberedFinding = tuple[int, Finding, PixelRegion]

DEFAULT_NODE = NodeIdentity()


def build_gsps(
    report: ReportDocument,
    sources: Sequence[Dataset],
    *,
    node: NodeIdentity = DEFAULT_NODE,
) -> list[hd.pr.GrayscaleSoftcopyPresentationState]:
    """One GSPS per image of the report's study that has boxed findings; [] when none.

    ``sources`` as for build_sr; every finding region must refer to one of them.
    """
    images = SourceImages(sources, report.study_instance_uid)
    node = node.fitted()
    by_image = _findings_by_image(report)
    states = []
    for index, (image_uid, findings) in enumerate(by_image.items(), start=1):
        image = images.image(image_uid)
        if image.StudyInstanceUID != report.study_instance_uid:
            continue
        instance_number = report.version_number * _INSTANCES_PER_VERSION + index
        pixels = images.source_of(image)
        state = _presentation_state(report, image, pixels, findings, node, instance_number)
        images.set_patient_name(state, image)
        states.append(state)
    return states


def _findings_by_image(report: ReportDocument) -> dict[str, list[NumberedFinding]]:
    by_image: dict[str, list[NumberedFinding]] = {}
    for number, finding in enumerate(report.content.findings, start=1):
        if finding.region is not None:
            by_image.setdefault(finding.region.sop_instance_uid, []).append(
                (number, finding, finding.region)
            )
    return by_image


def _presentation_state(
    report: ReportDocument,
    image: Dataset,
    pixels: Dataset,
    findings: list[NumberedFinding],
    node: NodeIdentity,
    instance_number: int,
) -> hd.pr.GrayscaleSoftcopyPresentationState:
    when, utc_offset = content_datetime(report.created_at, image)
    layer = hd.pr.GraphicLayer(
        layer_name=AI_LAYER,
        order=1,
        description="AI findings, not verified",
        display_color=LAYER_COLOR,
    )
    groups = [_graphic_group(number, finding) for number, finding, _ in findings]
    annotations = [
        _finding_annotation(report, image, layer, group, numbered, node)
        for group, numbered in zip(groups, findings, strict=True)
    ]
    annotations.append(_notice_annotation(report, image, layer))
    state = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[image],
        series_instance_uid=gsps_series_uid(node, report),
        series_number=GSPS_SERIES_NUMBER,
        sop_instance_uid=gsps_instance_uid(node, report, str(image.SOPInstanceUID)),
        instance_number=instance_number,
        manufacturer=node.manufacturer,
        manufacturer_model_name=node.model_name,
        software_versions=node.software_version,
        device_serial_number=node.serial_number,  # type: ignore[arg-type]
        content_label=TEST_CONTENT_LABEL if report.model.is_test_model else CONTENT_LABEL,
        content_description=_content_description(report.model),
        graphic_annotations=annotations,
        graphic_layers=[layer],
        graphic_groups=groups,
        institution_name=node.institution_name,
        voi_lut_transformations=voi_transformation(image, pixels),
        presentation_lut_transformation=_presentation_lut(image),
        specific_character_set=UTF8,
        series_description=series_description(GSPS_SERIES_DESCRIPTION, report.model),
    )
    _copy_series_anatomy(image, state)
    pin_creation_times(state, when)
    if utc_offset is not None:
        state.TimezoneOffsetFromUTC = utc_offset
    return state


def _content_description(model: ModelIdentity) -> str:
    if model.is_test_model:
        return long_string(f"{TEST_MODEL_BANNER}: AI-generated, not verified")
    return "AI-generated, preliminary, not verified"


def _graphic_group(number: int, finding: Finding) -> hd.pr.GraphicGroup:
    return hd.pr.GraphicGroup(
        graphic_group_id=number,
        label=long_string(f"Finding {number}: {finding.label}"),
        description=free_text(finding.label)[:_MAX_TEXT] or None,
    )


def finding_label_text(number: int, finding: Finding) -> str:
    """What the overlay prints next to a box: "n. label" (and the size, when reported)."""
    size = f" ({finding.size_mm:g} mm)" if finding.size_mm is not None else ""
    return free_text(f"{number}. {finding.label}{size}")[:_MAX_TEXT]


def _finding_annotation(
    report: ReportDocument,
    image: Dataset,
    layer: hd.pr.GraphicLayer,
    group: hd.pr.GraphicGroup,
    numbered: NumberedFinding,
    node: NodeIdentity,
) -> hd.pr.GraphicAnnotation:
    number, finding, region = numbered
    box = pixel_box(region, image)
    tracking_id, tracking = f"Finding {number}", tracking_uid(node, report, number)
    outline = hd.pr.GraphicObject(
        graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
        graphic_data=box.closed_polyline(),
        units=_PIXEL,
        tracking_id=tracking_id,
        tracking_uid=tracking,
        graphic_group=group,
    )
    text = finding_label_text(number, finding)
    label = hd.pr.TextObject(
        text_value=text,
        units=_PIXEL,
        bounding_box=label_box(box, image, len(text)),
        text_justification=hd.pr.TextJustificationValues.LEFT,
        tracking_id=tracking_id,
        tracking_uid=tracking,
        graphic_group=group,
    )
    return hd.pr.GraphicAnnotation(
        referenced_images=[image],
        graphic_layer=layer,
        referenced_frame_number=_frame_numbers(image, region.frame_number),
        graphic_objects=[outline],
        text_objects=[label],
    )


def _frame_numbers(image: Dataset, frame_number: int | None) -> int | None:
    if frame_number and int(image.get("NumberOfFrames", 1)) > 1:
        return frame_number
    return None


def label_box(box: PixelBox, image: Dataset, characters: int) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) for a label: above the box, else below, else inside it."""
    columns, rows = float(image.Columns), float(image.Rows)
    height = max(1.0, round(rows * _LABEL_HEIGHT_FRACTION))
    width = min(columns, max(box.width, height * _CHARACTER_WIDTH * max(characters, 1)))
    if box.y0 - height >= 0:
        top = box.y0 - height
    elif box.y1 + height <= rows:
        top = box.y1
    else:
        top = max(0.0, min(box.y0, rows - height))
    left = min(box.x0, max(0.0, columns - width))
    return (left, top, left + width, min(rows, top + height))


def _notice_annotation(
    report: ReportDocument, image: Dataset, layer: hd.pr.GraphicLayer
) -> hd.pr.GraphicAnnotation:
    """Test banner, disclaimer and, for a study outside the validated scope, the scope notice."""
    texts = warning_texts(report.model)
    if report.scope_notice:
        texts.append(report.scope_notice)
    notice = hd.pr.TextObject(
        text_value=free_text(" | ".join(texts))[:_MAX_TEXT],
        units=_DISPLAY,
        bounding_box=_NOTICE_BOX,
        text_justification=hd.pr.TextJustificationValues.LEFT,
    )
    return hd.pr.GraphicAnnotation(
        referenced_images=[image], graphic_layer=layer, text_objects=[notice]
    )


# --- grayscale pipeline --------------------------------------------------------------------


def voi_transformation(
    image: Dataset, pixels: Dataset | None = None
) -> list[hd.pr.SoftcopyVOILUTTransformation] | None:
    """The VOI window to present (C.11.8); None lets highdicom copy the image's VOI LUT.

    ``pixels``: the dataset to compute a window from when ``image`` has none (default
    ``image``).

    Values go in as one-element lists: highdicom 0.28 splits a plain-string explanation into
    single characters.
    """
    window = _image_window(image)
    explanation = "image window"
    function = image.get("VOILUTFunction") or None
    if window is None:
        if "VOILUTSequence" in image:
            return None
        window = computed_window(image if pixels is None else pixels)
        explanation, function = "computed window", None
    center, width = window
    return [
        hd.pr.SoftcopyVOILUTTransformation(
            window_center=[center],
            window_width=[width],
            window_explanation=[explanation],
            voi_lut_function=function,
        )
    ]


def _first_number(value: object) -> float | None:
    """The first value of a possibly multi-valued numeric attribute."""
    if isinstance(value, MultiValue | list | tuple):
        value = value[0] if value else None
    if not isinstance(value, int | float | str):
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _image_window(image: Dataset) -> tuple[float, float] | None:
    center = _first_number(image.get("WindowCenter"))
    width = _first_number(image.get("WindowWidth"))
    if center is None or width is None or width < 1:
        return None
    return center, width


def computed_window(image: Dataset) -> tuple[float, float]:
    """A window over the 0.5–99.5 percentiles of the modality values, else over Bits Stored."""
    low_high = _pixel_percentiles(image) or _stored_range(image)
    low, high = low_high
    width = max(1.0, high - low)
    return (low + high) / 2.0, width


def _pixel_percentiles(image: Dataset) -> tuple[float, float] | None:
    if "PixelData" not in image:
        return None
    try:
        values = apply_modality_lut(image.pixel_array, image)
    except (AttributeError, NotImplementedError, RuntimeError, ValueError):
        return None
    low, high = np.percentile(values, [0.5, 99.5])
    return float(low), float(high)


def _stored_range(image: Dataset) -> tuple[float, float]:
    bits = int(image.get("BitsStored", 8))
    signed = int(image.get("PixelRepresentation", 0)) == 1
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    slope = float(image.get("RescaleSlope", 1) or 1)
    intercept = float(image.get("RescaleIntercept", 0) or 0)
    ends = sorted((low * slope + intercept, high * slope + intercept))
    return ends[0], ends[1]


def _presentation_lut(image: Dataset) -> hd.PresentationLUTTransformation:
    """C.11.6: MONOCHROME1 images are presented inverted, so white stays white."""
    inverted = str(image.get("PhotometricInterpretation", "")) == "MONOCHROME1"
    shape = (
        hd.PresentationLUTShapeValues.INVERSE
        if inverted
        else hd.PresentationLUTShapeValues.IDENTITY
    )
    return hd.PresentationLUTTransformation(presentation_lut_shape=shape)


def _copy_series_anatomy(image: Dataset, state: Dataset) -> None:
    """General Series Laterality and Body Part Examined, as on the image (C.7.3.1)."""
    laterality = image.get("Laterality") or image.get("ImageLaterality")
    if laterality in ("R", "L"):
        state.Laterality = laterality
    if image.get("BodyPartExamined"):
        state.BodyPartExamined = image.BodyPartExamined
