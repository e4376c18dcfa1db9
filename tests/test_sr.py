"""The AI report as a Comprehensive SR / TID 1500, checked with dciodvfy, PixelMed, dsrdump and
highdicom: findings, boxes and measurements, the model and device, the layout and the Image
Library. Document level, Chinese, reports without boxes and difficult sources are in
tests/test_sr_document.py."""

from __future__ import annotations

from datetime import date, time
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_node import finding_codes as fc
from dicom_node.output_common import write_datasets
from dicom_node.sr import build_sr
from storage.report_schema import (
    AI_DISCLAIMER,
    TEST_MODEL_BANNER,
    Urgency,
)
from tests.dicom_output_support import (
    ENGLISH,
    SPACING_MM,
    assert_valid,
    boxed_findings,
    dsrdump,
    make_report,
    measurement_report,
    needs_dcmtk,
    needs_dicom3tools,
    needs_validators,
    rg1,
    rg1_with_spacing,
)
from tests.sr_support import (
    code_named,
    image_region,
    measurements_mm,
    names,
    processing_details,
    read_back,
    report_evaluations,
    texts_named,
    write_sr,
)

# --- English, boxes, pixel spacing, test model ---------------------------------------------


@needs_validators
@needs_dcmtk
def test_boxed_findings_validate_dump_and_read_back(tmp_path: Path) -> None:
    image = rg1_with_spacing()
    findings = boxed_findings(image)
    report = make_report(image, findings, is_test_model=True)
    path = write_sr(report, image, tmp_path)

    assert_valid(path)
    dump = dsrdump(path)
    for text in ("nodule", "Pleural effusions", "tortuous aorta", ENGLISH.impression):
        assert text in dump
    assert '(27925004,SCT,"Nodule")' in dump

    sr = read_back(path)
    planar = measurement_report(sr).get_planar_roi_measurement_groups()
    assert [g.tracking_identifier for g in planar] == ["Finding 1", "Finding 2"]
    for group, finding in zip(planar, findings[:2], strict=True):
        assert finding.region is not None
        x0, y0, x1, y1 = finding.region.x0, finding.region.y0, finding.region.x1, finding.region.y1
        roi = image_region(group)
        assert roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        np.testing.assert_array_equal(roi.value, [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]])
        (source,) = roi.ContentSequence[0].ReferencedSOPSequence
        assert source.ReferencedSOPInstanceUID == image.SOPInstanceUID
        assert texts_named(group[0], fc.REPORTED_LABEL) == [finding.label]
        assert texts_named(group[0], fc.REPORTED_LOCATION) == [finding.location]
    assert planar[0].finding_type == fc.finding_type_code("nodule")
    assert planar[1].finding_type == Code("60046008", "SCT", "Pleural effusion")


@needs_dicom3tools
def test_box_sizes_in_mm_use_the_imager_pixel_spacing(tmp_path: Path) -> None:
    image = rg1_with_spacing()
    report = make_report(image, boxed_findings(image))
    sr = read_back(write_sr(report, image, tmp_path))
    nodule, effusion = measurement_report(sr).get_planar_roi_measurement_groups()
    row_mm, column_mm = SPACING_MM
    assert measurements_mm(nodule) == {
        "Width": (round(299.5 * column_mm, 2), "mm", "BOXEXTENT"),
        "Height": (round(350.5 * row_mm, 2), "mm", "BOXEXTENT"),
        "Diameter": (12.5, "mm", "MODELSIZE"),
    }
    assert set(measurements_mm(effusion)) == {"Width", "Height"}
    assert texts_named(nodule[0], fc.REPORTED_SIZE_TEXT) == []


def test_finding_sites_and_descriptors_are_coded_and_kept(tmp_path: Path) -> None:
    image = rg1_with_spacing()
    sr = read_back(write_sr(make_report(image, boxed_findings(image)), image, tmp_path))
    nodule, effusion = measurement_report(sr).get_planar_roi_measurement_groups()
    (site,) = nodule.finding_sites
    assert site.value == Code("45653009", "SCT", "Upper lobe of lung")
    assert site.laterality == Code("24028007", "SCT", "Right")
    (effusion_site,) = effusion.finding_sites
    assert effusion_site.value == Code("3120008", "SCT", "Pleura")
    assert effusion_site.laterality == Code("7771000", "SCT", "Left")
    assert texts_named(nodule[0], fc.REPORTED_DENSITY) == ["solid"]
    assert texts_named(nodule[0], fc.REPORTED_BOUNDARY) == ["well defined"]


def test_algorithm_identification_names_the_model(tmp_path: Path) -> None:
    image = rg1_with_spacing()
    report = make_report(image, boxed_findings(image))
    sr = read_back(write_sr(report, image, tmp_path))
    for group in measurement_report(sr).get_planar_roi_measurement_groups():
        assert texts_named(group[0], codes.DCM.AlgorithmName) == [report.model.model_id]
        assert texts_named(group[0], codes.DCM.AlgorithmVersion) == [report.model.revision]
        assert texts_named(group[0], codes.DCM.AlgorithmParameters) == [
            "dtype=bfloat16",
            "quantization=none",
            "device=cuda:0",
            "torch=2.8.0",
            "transformers=4.57.1",
        ]


def test_device_observer_and_procedure(tmp_path: Path) -> None:
    image = rg1_with_spacing()
    report = make_report(image, boxed_findings(image))
    sr = read_back(write_sr(report, image, tmp_path))
    (observer,) = measurement_report(sr).get_observer_contexts(observer_type=codes.DCM.Device)
    attributes = observer.observer_identifying_attributes
    assert isinstance(attributes, hd.sr.DeviceObserverIdentifyingAttributes)
    assert attributes.name == "medgemma-node"
    assert attributes.manufacturer_name == "medgemma-node"
    assert attributes.model_name == report.model.model_id
    # CID 100 has no radiograph procedure: the generic one, the Image Library says CR PA.
    procedure = code_named(sr.content[0], codes.DCM.ProcedureReported)
    assert procedure == Code("363679005", "SCT", "Imaging procedure")
    language = code_named(sr.content[0], codes.DCM.LanguageOfContentItemAndDescendants)
    assert (language.value, language.meaning) == ("en-US", "English (United States)")


def test_report_texts_urgency_and_warnings(tmp_path: Path) -> None:
    image = rg1_with_spacing()
    report = make_report(image, boxed_findings(image), is_test_model=True)
    sr = read_back(write_sr(report, image, tmp_path))
    evaluations = report_evaluations(sr)
    assert texts_named(evaluations, fc.IMPRESSION) == [ENGLISH.impression]
    assert texts_named(evaluations, fc.RECOMMENDATION) == [ENGLISH.recommendation]
    assert texts_named(evaluations, fc.NARRATIVE) == [ENGLISH.narrative]
    assert texts_named(evaluations, fc.FINDING) == [
        "1. nodule (right upper lobe, 12.5 mm, solid, well defined)",
        "2. Pleural effusions (left costophrenic angle)",
        "3. tortuous aorta (40 mm)",
    ]
    assert texts_named(evaluations, fc.DISCLAIMER) == [AI_DISCLAIMER]
    assert texts_named(evaluations, fc.TEST_MODEL_NOTICE) == [TEST_MODEL_BANNER]
    details = processing_details(sr)
    assert texts_named(details, fc.QUESTION) == [ENGLISH.question]
    assert texts_named(details, fc.PARSE_STATUS) == ["ok"]
    assert texts_named(details, fc.PROCESSING_DEVICE) == ["cuda:0"]
    assert texts_named(details, fc.GENERATED_AT) == ["2024-05-01T10:00:00+00:00"]
    (identity,) = texts_named(details, fc.MODEL_IDENTITY)
    assert identity.startswith(report.model.display_name)
    assert code_named(evaluations, fc.URGENCY) == fc.URGENCY_VALUES[Urgency.URGENT]
    assert sr.SeriesDescription == f"{TEST_MODEL_BANNER}: AI report — not verified"


def test_a_clinical_model_carries_no_test_banner(tmp_path: Path) -> None:
    image = rg1_with_spacing()
    path = write_sr(make_report(image, boxed_findings(image)), image, tmp_path)
    sr = read_back(path)
    evaluations = report_evaluations(sr)
    assert texts_named(evaluations, fc.TEST_MODEL_NOTICE) == []
    assert texts_named(evaluations, fc.DISCLAIMER) == [AI_DISCLAIMER]
    assert sr.SeriesDescription == "AI report — not verified"
    assert TEST_MODEL_BANNER.encode("utf-8") not in path.read_bytes()


# --- layout: reading order, SEPARATE containers, Image Library ------------------------------


def containers(item: Dataset) -> list[Dataset]:
    """``item`` and every container below it, depth first."""
    found = [item] if item.get("ValueType") == "CONTAINER" else []
    for child in item.get("ContentSequence", []):
        found += containers(child)
    return found


def test_content_is_in_reading_order_in_separate_containers(tmp_path: Path) -> None:
    image = rg1_with_spacing()
    report = make_report(image, boxed_findings(image), is_test_model=True)
    sr = read_back(write_sr(report, image, tmp_path))
    assert names(sr.content[0]) == [
        codes.DCM.LanguageOfContentItemAndDescendants,
        codes.DCM.ObserverType,
        codes.DCM.DeviceObserverUID,
        codes.DCM.DeviceObserverName,
        codes.DCM.DeviceObserverManufacturer,
        codes.DCM.DeviceObserverModelName,
        codes.DCM.ProcedureReported,
        codes.DCM.ImageLibrary,
        codes.DCM.ImagingMeasurements,
        fc.QUALITATIVE_EVALUATIONS,
        fc.PROCESSING_DETAILS,
    ]
    assert names(report_evaluations(sr)) == [
        fc.IMPRESSION,
        fc.FINDING,
        fc.FINDING,
        fc.FINDING,
        fc.NARRATIVE,
        fc.RECOMMENDATION,
        fc.URGENCY,
        fc.TEST_MODEL_NOTICE,
        fc.DISCLAIMER,
    ]
    assert names(processing_details(sr)) == [
        fc.QUESTION,
        fc.PARSE_STATUS,
        fc.MODEL_IDENTITY,
        fc.PROCESSING_DEVICE,
        fc.GENERATED_AT,
    ]
    found = containers(sr)
    assert len(found) == 1 + 1 + 1 + 1 + 3 + 1 + 1  # root, library, group, measurements, ...
    assert {c.ContinuityOfContent for c in found} == {"SEPARATE"}


def library_entries(sr: hd.sr.ComprehensiveSR) -> list[Dataset]:
    """The items of the first Image Library Group, as OHIF's cornerstone-dicom-sr reads them."""
    (library,) = [i for i in sr.content[0].ContentSequence if i.name == codes.DCM.ImageLibrary]
    group = library.ContentSequence[0]
    assert group.name == codes.DCM.ImageLibraryGroup
    return list(group.ContentSequence)


def descriptors(entry: Dataset) -> dict[str, object]:
    values: dict[str, object] = {}
    for item in entry.ContentSequence:
        assert item.RelationshipType == "HAS ACQ CONTEXT"
        values[item.name.meaning] = item.value
    return values


@needs_validators
def test_the_image_library_lists_every_source_image(tmp_path: Path) -> None:
    current, prior = rg1_with_spacing(), rg1()
    prior.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    prior.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.3"
    prior.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    prior.StudyDate, prior.StudyTime = "20030102", "0830"
    prior.ViewPosition = "AP"
    report = make_report(current, boxed_findings(current), is_test_model=True)
    sr = build_sr(report, [prior, current])
    (record,) = write_datasets([sr], tmp_path)
    assert_valid(record.path)

    entries = library_entries(read_back(record.path))
    assert [(e.ValueType, e.name) for e in entries] == [("IMAGE", fc.SOURCE_IMAGE)] * 2
    assert [
        (
            e.ReferencedSOPSequence[0].ReferencedSOPClassUID,
            e.ReferencedSOPSequence[0].ReferencedSOPInstanceUID,
        )
        for e in entries
    ] == [
        (current.SOPClassUID, current.SOPInstanceUID),
        (prior.SOPClassUID, prior.SOPInstanceUID),
    ]
    row_mm, column_mm = SPACING_MM
    cr = Code("CR", "DCM", "Computed Radiography")
    assert descriptors(entries[0]) == {
        "Modality": cr,
        "Study Date": date(2004, 8, 26),
        "Study Time": time(18, 50, 59),
        "Pixel Data Rows": 1955.0,
        "Pixel Data Columns": 1841.0,
        "Image View": Code("272479007", "SCT", "postero-anterior"),
        "Patient Orientation Row": "L",
        "Patient Orientation Column": "F",
        "Horizontal Pixel Spacing": column_mm,
        "Vertical Pixel Spacing": row_mm,
    }
    assert descriptors(entries[1]) == {
        "Modality": cr,
        "Study Date": date(2003, 1, 2),
        "Study Time": time(8, 30),
        "Pixel Data Rows": 1955.0,
        "Pixel Data Columns": 1841.0,
        "Image View": Code("399348003", "SCT", "antero-posterior"),
        "Patient Orientation Row": "L",
        "Patient Orientation Column": "F",
    }


def test_what_ohif_needs_to_show_the_sr(tmp_path: Path) -> None:
    """cornerstone-dicom-sr: root (126000, DCM), Image Library IMAGE items with
    ReferencedSOPSequence, groups with Tracking UID and Identifier, SCOORDs selected from an
    image of the library."""
    image = rg1_with_spacing()
    sr = read_back(write_sr(make_report(image, boxed_findings(image)), image, tmp_path))
    assert sr.ConceptNameCodeSequence[0].CodeValue == "126000"
    library_uids = {
        entry.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for entry in library_entries(sr)
    }
    groups = measurement_report(sr).get_planar_roi_measurement_groups()
    assert len(groups) == 2
    for group in groups:
        assert group.tracking_uid and group.tracking_identifier
        roi = image_region(group)
        assert roi.relationship_type == hd.sr.RelationshipTypeValues.CONTAINS
        (selected,) = roi.ContentSequence
        assert selected.RelationshipType == "SELECTED FROM"
        assert selected.ReferencedSOPSequence[0].ReferencedSOPInstanceUID in library_uids
    assert library_uids == {image.SOPInstanceUID}
