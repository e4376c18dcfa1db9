"""The AI boxes as a Grayscale Softcopy Presentation State, checked with dciodvfy and pydicom."""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom import Dataset

from dicom_node.gsps import build_gsps, computed_window, label_box
from dicom_node.output_common import NodeIdentity, PixelBox, write_datasets
from dicom_node.sr import build_sr
from storage.report_schema import AI_DISCLAIMER, TEST_MODEL_BANNER, Finding, ReportDocument
from tests.dicom_output_support import (
    BROKEN_SOURCE_WARNINGS,
    HUGE_NAME,
    LONG_NAME,
    NO_PATIENT_ID_WARNINGS,
    assert_empty_type_2,
    assert_fitted_to_vr_limits,
    assert_valid,
    boxed_findings,
    make_report,
    measurement_report,
    needs_dicom3tools,
    rg1,
    rg1_breaking_vr_limits,
    rg1_with_spacing,
    rg1_without_patient_id,
)

GSPS_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"
CODE_STRING_16 = re.compile(r"[A-Z0-9_ ]{1,16}")


def write_gsps(
    report: ReportDocument, image: Dataset, directory: Path, allowed: tuple[str, ...] = ()
) -> list[Path]:
    """Build, write and validate (dciodvfy, where installed) the GSPS of ``report``.

    ``allowed``: dciodvfy warnings the source itself causes."""
    records = write_datasets(build_gsps(report, [image]), directory)
    assert all(r.kind == "GSPS" and r.sop_class_uid == GSPS_CLASS for r in records)
    if shutil.which("dciodvfy"):
        for record in records:
            assert_valid(record.path, also_allowed=allowed)
    return [r.path for r in records]


def finding_annotations(state: Dataset) -> list[Dataset]:
    return [a for a in state.GraphicAnnotationSequence if "GraphicObjectSequence" in a]


def notice_text(state: Dataset) -> str:
    (notice,) = [a for a in state.GraphicAnnotationSequence if "GraphicObjectSequence" not in a]
    (text,) = notice.TextObjectSequence
    assert text.BoundingBoxAnnotationUnits == "DISPLAY"
    return str(text.UnformattedTextValue)


@needs_dicom3tools
@pytest.mark.parametrize("chinese", [False, True], ids=["en", "zh"])
def test_boxes_and_labels_on_the_ai_layer(tmp_path: Path, chinese: bool) -> None:
    image = rg1_with_spacing()
    findings = boxed_findings(image, chinese=chinese)
    (path,) = write_gsps(make_report(image, findings, chinese=chinese), image, tmp_path)

    state = pydicom.dcmread(path)
    assert [layer.GraphicLayer for layer in state.GraphicLayerSequence] == ["AI"]
    annotations = finding_annotations(state)
    assert len(annotations) == 2
    for number, (annotation, finding) in enumerate(zip(annotations, findings, strict=False), 1):
        assert finding.region is not None
        x0, y0, x1, y1 = finding.region.x0, finding.region.y0, finding.region.x1, finding.region.y1
        assert annotation.GraphicLayer == "AI"
        (referenced,) = annotation.ReferencedImageSequence
        assert referenced.ReferencedSOPInstanceUID == image.SOPInstanceUID
        (outline,) = annotation.GraphicObjectSequence
        assert (outline.GraphicType, outline.GraphicAnnotationUnits) == ("POLYLINE", "PIXEL")
        np.testing.assert_array_equal(
            np.reshape(outline.GraphicData, (-1, 2)),
            [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]],
        )
        (label,) = annotation.TextObjectSequence
        assert label.UnformattedTextValue.startswith(f"{number}. {finding.label}")
        left, top = label.BoundingBoxTopLeftHandCorner
        right, bottom = label.BoundingBoxBottomRightHandCorner
        assert bottom <= y0 or top >= y1  # beside the box, not over the finding
        assert 0 <= left < right <= image.Columns and 0 <= top < bottom <= image.Rows
        assert outline.GraphicGroupID == label.GraphicGroupID == number
    assert annotations[0].TextObjectSequence[0].UnformattedTextValue == (
        f"1. {findings[0].label} (12.5 mm)"
    )


def test_presentation_copies_window_anatomy_and_inverts_monochrome1(tmp_path: Path) -> None:
    image = rg1_with_spacing()
    (state,) = build_gsps(make_report(image, boxed_findings(image)), [image])
    (voi,) = state.SoftcopyVOILUTSequence
    assert (float(voi.WindowCenter), float(voi.WindowWidth)) == (15000.0, 30000.0)
    assert voi.WindowCenterWidthExplanation == "image window"
    assert image.PhotometricInterpretation == "MONOCHROME1"
    assert state.PresentationLUTShape == "INVERSE"
    assert state.BodyPartExamined == "CHEST"
    assert state.StudyInstanceUID == image.StudyInstanceUID
    assert state.PatientID == image.PatientID
    assert state.SeriesInstanceUID != image.SeriesInstanceUID
    assert state.SpecificCharacterSet == "ISO_IR 192"


@needs_dicom3tools
def test_the_image_modality_lut_is_carried(tmp_path: Path) -> None:
    image = rg1_with_spacing()
    image.RescaleSlope, image.RescaleIntercept, image.RescaleType = 2, -1024, "US"
    (path,) = write_gsps(make_report(image, boxed_findings(image)), image, tmp_path)
    state = pydicom.dcmread(path)
    assert (float(state.RescaleSlope), float(state.RescaleIntercept), state.RescaleType) == (
        2.0,
        -1024.0,
        "US",
    )


def test_laterality_is_copied_from_the_image() -> None:
    image = rg1_with_spacing()
    image.ImageLaterality = "L"
    (state,) = build_gsps(make_report(image, boxed_findings(image)), [image])
    assert state.Laterality == "L"


@needs_dicom3tools
def test_without_a_window_one_is_computed_from_the_pixels(tmp_path: Path) -> None:
    image = rg1(with_pixels=True)
    del image.WindowCenter
    del image.WindowWidth
    (path,) = write_gsps(make_report(image, boxed_findings(image)), image, tmp_path)
    (voi,) = pydicom.dcmread(path).SoftcopyVOILUTSequence
    low, high = np.percentile(image.pixel_array, [0.5, 99.5])
    assert float(voi.WindowCenter) == pytest.approx((low + high) / 2, abs=0.01)
    assert float(voi.WindowWidth) == pytest.approx(high - low, abs=0.01)
    assert voi.WindowCenterWidthExplanation == "computed window"


def test_without_pixels_or_window_the_window_spans_bits_stored() -> None:
    image = rg1()
    del image.WindowCenter
    del image.WindowWidth
    assert computed_window(image) == ((2**15 - 1) / 2, 2**15 - 1)


@pytest.mark.parametrize("is_test_model", [True, False], ids=["test-model", "clinical-model"])
def test_every_overlay_carries_the_warning(tmp_path: Path, is_test_model: bool) -> None:
    image = rg1_with_spacing()
    report = make_report(image, boxed_findings(image), is_test_model=is_test_model)
    (path,) = write_gsps(report, image, tmp_path)
    state = pydicom.dcmread(path)
    notice = notice_text(state)
    assert AI_DISCLAIMER in notice
    assert (TEST_MODEL_BANNER in notice) is is_test_model
    assert (TEST_MODEL_BANNER in state.ContentDescription) is is_test_model
    assert (TEST_MODEL_BANNER in state.SeriesDescription) is is_test_model
    assert CODE_STRING_16.fullmatch(state.ContentLabel)
    assert state.ContentLabel == ("AI_TEST_MODEL" if is_test_model else "AI_FINDINGS")
    assert len(state.ContentDescription) <= 64


def test_boxes_carry_the_tracking_uids_of_the_sr_groups() -> None:
    image = rg1_with_spacing()
    report = make_report(image, boxed_findings(image))
    (state,) = build_gsps(report, [image])
    sr = build_sr(report, [image])
    sr_uids = [g.tracking_uid for g in measurement_report(sr).get_planar_roi_measurement_groups()]
    gsps_uids = [a.GraphicObjectSequence[0].TrackingUID for a in finding_annotations(state)]
    assert gsps_uids == sr_uids


def test_uids_are_derived_so_a_rebuild_is_the_same_object(tmp_path: Path) -> None:
    image = rg1_with_spacing()
    report = make_report(image, boxed_findings(image))
    (first,) = write_gsps(report, image, tmp_path / "first")
    (second,) = write_gsps(report, image, tmp_path / "second")
    assert first.name == second.name
    assert first.read_bytes() == second.read_bytes()
    (other,) = build_gsps(report.model_copy(update={"report_id": 99}), [image])
    state = pydicom.dcmread(first)
    assert other.SOPInstanceUID != state.SOPInstanceUID
    assert other.SeriesInstanceUID == state.SeriesInstanceUID
    assert state.SeriesInstanceUID != build_sr(report, [image]).SeriesInstanceUID


def test_no_boxes_no_presentation_state() -> None:
    image = rg1()
    report = make_report(image, [Finding(label="cardiomegaly")])
    assert build_gsps(report, [image]) == []
    assert build_gsps(make_report(image, []), [image]) == []


def test_a_prior_study_image_gets_no_presentation_state() -> None:
    current, prior = rg1_with_spacing(), rg1_with_spacing()
    prior.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    prior.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    findings = boxed_findings(current) + boxed_findings(prior)[:1]
    states = build_gsps(make_report(current, findings), [current, prior])
    assert [
        s.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID
        for s in states
    ] == [current.SOPInstanceUID]


@settings(max_examples=200, deadline=None)
@given(
    x=st.floats(0, 1841),
    y=st.floats(0, 1955),
    width=st.floats(0, 1841),
    height=st.floats(0, 1955),
    characters=st.integers(1, 200),
)
def test_a_label_box_is_always_a_proper_box_inside_the_image(
    x: float, y: float, width: float, height: float, characters: int
) -> None:
    image = Dataset()
    image.Rows, image.Columns = 1955, 1841
    box = PixelBox(x, y, min(1841.0, x + width), min(1955.0, y + height))
    left, top, right, bottom = label_box(box, image, characters)
    assert 0 <= left < right <= 1841
    assert 0 <= top < bottom <= 1955


# --- sources that break their VRs or lack type 2 attributes --------------------------------


@needs_dicom3tools
@pytest.mark.parametrize("name", [HUGE_NAME, LONG_NAME], ids=["65009-characters", "220-characters"])
def test_values_past_their_vr_limits_are_cut_to_fit(tmp_path: Path, name: str) -> None:
    image = rg1_breaking_vr_limits(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = make_report(image, boxed_findings(image))
        (path,) = write_gsps(report, image, tmp_path, BROKEN_SOURCE_WARNINGS)
    state = pydicom.dcmread(path)
    assert_fitted_to_vr_limits(state, name)
    assert len(finding_annotations(state)) == 2
    assert not [w for w in caught if name[:20] in str(w.message)]


@needs_dicom3tools
@pytest.mark.parametrize("patient_id", [None, ""], ids=["missing", "empty"])
def test_a_source_without_patient_id_still_gets_its_gsps(
    tmp_path: Path, patient_id: str | None
) -> None:
    image = rg1_without_patient_id(patient_id)
    report = make_report(image, boxed_findings(image))
    (path,) = write_gsps(report, image, tmp_path, NO_PATIENT_ID_WARNINGS)
    state = pydicom.dcmread(path)
    assert_empty_type_2(state)
    assert state.PatientName == image.PatientName
    assert len(finding_annotations(state)) == 2


def test_long_labels_and_settings_are_cut_to_their_vr() -> None:
    image = rg1_with_spacing()
    label = "opacity " * 200  # the report keeps 1,024 characters of it (ST)
    report = make_report(image, [Finding(label=label, region=boxed_findings(image)[0].region)])
    node = NodeIdentity(manufacturer="M" * 100, institution_name="I" * 100, serial_number="S" * 70)
    (state,) = build_gsps(report, [image], node=node)
    (annotation,) = finding_annotations(state)
    assert len(annotation.TextObjectSequence[0].UnformattedTextValue) == 1024  # ST
    (group,) = state.GraphicGroupSequence
    assert len(group.GraphicGroupLabel) == 64  # LO
    assert len(group.GraphicGroupDescription) <= 1024  # ST
    assert (state.Manufacturer, state.InstitutionName) == ("M" * 64, "I" * 64)
    assert state.DeviceSerialNumber == "S" * 64
