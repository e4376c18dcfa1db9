"""The AI report as a Comprehensive SR / TID 1500, checked with dciodvfy, PixelMed, dsrdump and
highdicom."""

from __future__ import annotations

import warnings
from datetime import date, time
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_node import finding_codes as fc
from dicom_node.output_common import pixel_spacing_mm, write_datasets
from dicom_node.sr import SrReference, build_sr
from storage.report_schema import (
    AI_DISCLAIMER,
    TEST_MODEL_BANNER,
    Finding,
    ParseStatus,
    ReportContent,
    ReportDocument,
    Urgency,
)
from tests.dicom_output_support import (
    BROKEN_SOURCE_WARNINGS,
    CHINESE,
    ENGLISH,
    HUGE_NAME,
    LONG_NAME,
    NO_PATIENT_ID_WARNINGS,
    SPACING_MM,
    assert_empty_type_2,
    assert_fitted_to_vr_limits,
    assert_valid,
    boxed_findings,
    dsrdump,
    make_report,
    measurement_report,
    needs_dcmtk,
    needs_dicom3tools,
    needs_validators,
    region,
    rg1,
    rg1_breaking_vr_limits,
    rg1_with_spacing,
    rg1_without_patient_id,
    rg1_without_spacing,
    validators_installed,
)

TEXT = hd.sr.ValueTypeValues.TEXT
CODE = hd.sr.ValueTypeValues.CODE
PATIENT_AND_STUDY = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
)


def write_sr(
    report: ReportDocument,
    image: Dataset,
    directory: Path,
    allowed: tuple[str, ...] = (),
    **kwargs: object,
) -> Path:
    """Build, write and validate (dciodvfy and PixelMed, where installed) the SR of report.

    ``allowed``: dciodvfy warnings the source itself causes."""
    sr = build_sr(report, [image], **kwargs)  # type: ignore[arg-type]
    (record,) = write_datasets([sr], directory)
    if validators_installed():
        assert_valid(record.path, also_allowed=allowed)
    return record.path


def texts_named(item: Dataset, name: Code) -> list[str]:
    return [i.value for i in hd.sr.utils.find_content_items(item, name=name, value_type=TEXT)]


def code_named(item: Dataset, name: Code) -> hd.sr.CodedConcept:
    (found,) = hd.sr.utils.find_content_items(item, name=name, value_type=CODE)
    return found.value


def report_evaluations(sr: hd.sr.ComprehensiveSR) -> Dataset:
    (container,) = hd.sr.utils.find_content_items(sr.content[0], name=fc.QUALITATIVE_EVALUATIONS)
    return container


def processing_details(sr: hd.sr.ComprehensiveSR) -> Dataset:
    (container,) = hd.sr.utils.find_content_items(sr.content[0], name=fc.PROCESSING_DETAILS)
    return container


def names(container: Dataset) -> list[Code]:
    return [item.name for item in container.ContentSequence]


def image_region(
    group: hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations,
) -> hd.sr.ImageRegion:
    roi = group.roi
    assert isinstance(roi, hd.sr.ImageRegion)
    return roi


def read_back(path: Path) -> hd.sr.ComprehensiveSR:
    sr = hd.sr.srread(path)
    assert isinstance(sr, hd.sr.ComprehensiveSR)
    return sr


def measurements_mm(group: hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations) -> dict:
    return {
        m.name.meaning: (float(m.value), m.unit.value, m.method.value if m.method else None)
        for m in group.get_measurements()
    }


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


# --- document level ------------------------------------------------------------------------


def test_document_belongs_to_the_source_study_and_says_it_is_preliminary(tmp_path: Path) -> None:
    image = rg1_with_spacing()
    image.IssuerOfPatientID = "HOSPITAL-MRN"
    report = make_report(image, boxed_findings(image))
    sr = pydicom.dcmread(write_sr(report, image, tmp_path))
    for keyword in PATIENT_AND_STUDY:
        assert sr[keyword].value == image[keyword].value, keyword
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"
    assert sr.Modality == "SR"
    assert sr.SeriesInstanceUID != image.SeriesInstanceUID
    assert sr.SpecificCharacterSet == "ISO_IR 192"
    assert (sr.PreliminaryFlag, sr.VerificationFlag, sr.CompletionFlag) == (
        "PRELIMINARY",
        "UNVERIFIED",
        "COMPLETE",
    )
    assert sr.InstanceNumber == report.version_number
    (evidence,) = sr.CurrentRequestedProcedureEvidenceSequence
    (series,) = evidence.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == image.SeriesInstanceUID
    assert [i.ReferencedSOPInstanceUID for i in series.ReferencedSOPSequence] == [
        image.SOPInstanceUID
    ]
    # 10:00 UTC in the source's time zone (-0400), with the offset recorded.
    assert (sr.ContentDate, sr.ContentTime, sr.TimezoneOffsetFromUTC) == (
        "20240501",
        "060000",
        "-0400",
    )
    assert any(
        item.CodingSchemeDesignator == fc.PRIVATE_SCHEME
        for item in sr.CodingSchemeIdentificationSequence
    )


@pytest.mark.parametrize("status", [ParseStatus.NARRATIVE_ONLY, ParseStatus.EMPTY])
def test_an_unparsed_answer_is_a_partial_document(tmp_path: Path, status: ParseStatus) -> None:
    """What the test model gives: text without JSON (or nothing), no findings."""
    image = rg1()
    report = make_report(image, [], parse_status=status, urgency=None, is_test_model=True)
    sr = pydicom.dcmread(write_sr(report, image, tmp_path))
    assert sr.CompletionFlag == "PARTIAL"


@needs_dicom3tools
def test_uids_are_derived_so_a_rebuild_is_the_same_object(tmp_path: Path) -> None:
    image = rg1_with_spacing()
    report = make_report(image, boxed_findings(image))
    first = write_sr(report, image, tmp_path / "first")
    second = write_sr(report, image, tmp_path / "second")
    assert first.name == second.name
    assert first.read_bytes() == second.read_bytes()

    other = build_sr(report.model_copy(update={"report_id": 42}), [image])
    rebuilt = pydicom.dcmread(first)
    assert other.SOPInstanceUID != rebuilt.SOPInstanceUID
    assert other.SeriesInstanceUID == rebuilt.SeriesInstanceUID
    groups = measurement_report(read_back(first)).get_planar_roi_measurement_groups()
    assert len({group.tracking_uid for group in groups}) == 2


def test_test_model_output_has_its_own_series() -> None:
    image = rg1_with_spacing()
    clinical = build_sr(make_report(image, []), [image])
    test = build_sr(make_report(image, [], is_test_model=True), [image])
    assert clinical.SeriesInstanceUID != test.SeriesInstanceUID
    assert clinical.SOPInstanceUID == test.SOPInstanceUID  # one report, one SR, whatever made it


def test_written_files_are_listed_with_their_uids(tmp_path: Path) -> None:
    image = rg1_with_spacing()
    sr = build_sr(make_report(image, boxed_findings(image)), [image])
    (record,) = write_datasets([sr], tmp_path / "out")
    assert record.kind == "SR"
    assert record.sop_class_uid == "1.2.840.10008.5.1.4.1.1.88.33"
    assert record.sop_instance_uid == sr.SOPInstanceUID
    assert record.path == tmp_path / "out" / f"sr-{sr.SOPInstanceUID}.dcm"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [record.path.name]
    assert pydicom.dcmread(record.path).file_meta.MediaStorageSOPInstanceUID == sr.SOPInstanceUID


def test_a_prior_study_image_is_other_evidence(tmp_path: Path) -> None:
    current, prior = rg1_with_spacing(), rg1_with_spacing()
    prior.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    prior.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.3"
    prior.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    report = make_report(current, boxed_findings(current))
    sr = build_sr(report, [prior, current])
    assert sr.StudyInstanceUID == current.StudyInstanceUID
    assert sr.get_evidence(current_procedure_only=True) == [
        (
            current.StudyInstanceUID,
            current.SeriesInstanceUID,
            current.SOPInstanceUID,
            current.SOPClassUID,
        )
    ]
    (other,) = sr.PertinentOtherEvidenceSequence
    assert other.StudyInstanceUID == prior.StudyInstanceUID


def test_a_newer_version_references_its_predecessor(tmp_path: Path) -> None:
    image = rg1_with_spacing()
    first = build_sr(make_report(image, boxed_findings(image), version_number=1), [image])
    assert "PredecessorDocumentsSequence" not in first
    previous = SrReference.of(first)
    second_report = make_report(image, boxed_findings(image), report_id=77, version_number=2)
    second = pydicom.dcmread(write_sr(second_report, image, tmp_path, predecessor=previous))
    (study,) = second.PredecessorDocumentsSequence
    assert study.StudyInstanceUID == first.StudyInstanceUID
    (series,) = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    (instance,) = series.ReferencedSOPSequence
    assert instance.ReferencedSOPClassUID == first.SOPClassUID
    assert instance.ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert second.SOPInstanceUID != first.SOPInstanceUID
    assert second.SeriesInstanceUID == first.SeriesInstanceUID


# --- Chinese -------------------------------------------------------------------------------


@needs_validators
@needs_dcmtk
def test_chinese_report_round_trips_exactly(tmp_path: Path) -> None:
    image = rg1_with_spacing()
    findings = boxed_findings(image, chinese=True)
    report = make_report(image, findings, chinese=True)
    path = write_sr(report, image, tmp_path)

    assert_valid(path)
    dump = dsrdump(path)
    for text in ("结节", "胸腔积液", "主动脉迂曲", CHINESE.impression):
        assert text in dump
    assert "右肺上叶结节".encode() in path.read_bytes()

    sr = read_back(path)
    language = code_named(sr.content[0], codes.DCM.LanguageOfContentItemAndDescendants)
    assert (language.value, language.scheme_designator, language.meaning) == (
        "zh-CN",
        "RFC5646",
        "Chinese (S)",
    )
    nodule, effusion = measurement_report(sr).get_planar_roi_measurement_groups()
    assert nodule.finding_type == Code("27925004", "SCT", "Nodule")
    assert effusion.finding_type == Code("60046008", "SCT", "Pleural effusion")
    assert texts_named(nodule[0], fc.REPORTED_LABEL) == ["结节"]
    assert texts_named(nodule[0], fc.REPORTED_LOCATION) == ["右肺上叶"]
    assert nodule.finding_sites[0].value == Code("45653009", "SCT", "Upper lobe of lung")
    evaluations = report_evaluations(sr)
    assert texts_named(evaluations, fc.IMPRESSION) == [CHINESE.impression]
    assert texts_named(evaluations, fc.RECOMMENDATION) == [CHINESE.recommendation]
    assert texts_named(evaluations, fc.FINDING)[0] == "1. 结节 (右肺上叶, 12.5 mm, 实性, 边界清楚)"
    assert texts_named(processing_details(sr), fc.QUESTION) == [CHINESE.question]
    (aorta,) = measurement_report(sr).get_image_measurement_groups()
    assert aorta.finding_type is not None
    assert aorta.finding_type.scheme_designator == fc.PRIVATE_SCHEME
    assert aorta.finding_type.meaning == "主动脉迂曲"


# --- findings without boxes, no findings, no pixel spacing ---------------------------------


@needs_validators
@needs_dcmtk
def test_findings_without_boxes_are_tid_1501_groups(tmp_path: Path) -> None:
    image = rg1()
    findings = [
        Finding(label="cardiomegaly", location="heart"),
        Finding(label="old granulomatous disease", location="both lungs", size_mm=3.0),
    ]
    path = write_sr(make_report(image, findings), image, tmp_path)
    assert "old granulomatous disease" in dsrdump(path)

    sr = read_back(path)
    assert measurement_report(sr).get_planar_roi_measurement_groups() == []
    heart, granuloma = measurement_report(sr).get_image_measurement_groups()
    assert heart.finding_type == Code("8186001", "SCT", "Cardiomegaly")
    assert heart.finding_sites[0].value == Code("80891009", "SCT", "Heart")
    assert granuloma.finding_type == fc.private_finding_code("old granulomatous disease")
    assert granuloma.finding_type.meaning == "old granulomatous disease"
    assert granuloma.finding_sites[0].laterality == Code("51440002", "SCT", "Bilateral")
    assert granuloma.get_measurements() == []
    assert texts_named(granuloma[0], fc.REPORTED_SIZE_TEXT) == ["3 mm"]


@needs_validators
@needs_dcmtk
def test_no_findings_gives_a_report_of_texts_only(tmp_path: Path) -> None:
    image = rg1()
    report = make_report(image, [], urgency=Urgency.ROUTINE)
    path = write_sr(report, image, tmp_path)
    assert ENGLISH.impression in dsrdump(path)

    sr = read_back(path)
    assert measurement_report(sr).get_planar_roi_measurement_groups() == []
    assert measurement_report(sr).get_image_measurement_groups() == []
    names = [item.name for item in sr.content[0].ContentSequence]
    assert codes.DCM.ImagingMeasurements not in names
    evaluations = report_evaluations(sr)
    assert texts_named(evaluations, fc.IMPRESSION) == [ENGLISH.impression]
    assert code_named(evaluations, fc.URGENCY) == fc.URGENCY_VALUES[Urgency.ROUTINE]


@needs_validators
@pytest.mark.parametrize(
    "image_factory", [rg1, rg1_without_spacing], ids=["zero-pixel-spacing", "no-pixel-spacing"]
)
def test_without_pixel_spacing_there_are_no_mm_measurements(
    tmp_path: Path, image_factory: object
) -> None:
    image = image_factory()  # type: ignore[operator]
    assert pixel_spacing_mm(image) is None
    path = write_sr(make_report(image, boxed_findings(image)), image, tmp_path)
    sr = read_back(path)
    nodule, effusion = measurement_report(sr).get_planar_roi_measurement_groups()
    assert nodule.get_measurements() == []
    assert effusion.get_measurements() == []
    assert texts_named(nodule[0], fc.REPORTED_SIZE_TEXT) == ["12.5 mm"]
    np.testing.assert_array_equal(image_region(nodule).value[0], [400.5, 300.25])


# --- inputs --------------------------------------------------------------------------------


def test_pixel_spacing_prefers_the_imager_spacing_for_projection_images() -> None:
    image = rg1()
    image.PixelSpacing = [0.2, 0.2]
    assert pixel_spacing_mm(image) == (0.2, 0.2)
    image.ImagerPixelSpacing = [0.1, 0.125]
    assert pixel_spacing_mm(image) == (0.1, 0.125)
    image.Modality = "CT"
    assert pixel_spacing_mm(image) == (0.2, 0.2)


def test_a_box_past_the_image_edge_is_clamped_to_the_image(tmp_path: Path) -> None:
    image = rg1()
    finding = Finding(label="mass", region=region(image, 1900.0, 2000.0, 1500.0, -20.0))
    sr = read_back(write_sr(make_report(image, [finding]), image, tmp_path))
    (group,) = measurement_report(sr).get_planar_roi_measurement_groups()
    np.testing.assert_array_equal(
        image_region(group).value,
        [[1500, 0], [1841, 0], [1841, 1955], [1500, 1955], [1500, 0]],
    )


def test_a_region_on_an_image_not_given_is_refused() -> None:
    image = rg1()
    finding = Finding(label="nodule", region=region(image, 1, 1, 10, 10))
    finding.region.sop_instance_uid = "1.2.3.4"  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="not among the sources"):
        build_sr(make_report(image, [finding]), [image])


def test_sources_must_include_the_reported_study() -> None:
    image = rg1()
    report = make_report(image, []).model_copy(update={"study_instance_uid": "1.2.3"})
    with pytest.raises(ValueError, match="no source image belongs to study"):
        build_sr(report, [image])


# --- sources that break their VRs or lack type 2 attributes --------------------------------


@needs_validators
@pytest.mark.parametrize("name", [HUGE_NAME, LONG_NAME], ids=["65009-characters", "220-characters"])
def test_values_past_their_vr_limits_are_cut_to_fit(
    tmp_path: Path, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    image = rg1_breaking_vr_limits(name)
    report = make_report(image, boxed_findings(image))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = write_sr(report, image, tmp_path, allowed=BROKEN_SOURCE_WARNINGS)
    sr = read_back(path)
    assert_fitted_to_vr_limits(sr, name)
    assert sr.PatientID == image.PatientID
    assert len(measurement_report(sr).get_planar_roi_measurement_groups()) == 2
    # Libraries that quote values (highdicom's person name check) never see the name.
    quoted = name[:20]
    assert not [w for w in caught if quoted in str(w.message)]
    assert quoted not in caplog.text


@needs_validators
@pytest.mark.parametrize("patient_id", [None, ""], ids=["missing", "empty"])
def test_a_source_without_patient_id_still_gets_its_sr(
    tmp_path: Path, patient_id: str | None
) -> None:
    image = rg1_without_patient_id(patient_id)
    path = write_sr(
        make_report(image, boxed_findings(image)), image, tmp_path, NO_PATIENT_ID_WARNINGS
    )
    sr = read_back(path)
    assert_empty_type_2(sr)
    assert sr.PatientName == image.PatientName
    assert len(measurement_report(sr).get_planar_roi_measurement_groups()) == 2


@needs_validators
def test_model_text_reaches_the_sr_clean(tmp_path: Path) -> None:
    image = rg1()
    noisy = ReportContent(
        parse_status=ParseStatus.OK,
        findings=[Finding(label="nod\ufffdule\x00", location="right\r\nupper \x1blobe")],
        impression="Nodule.\x07\ufffd\r\nNo effusion.\u200b",
        recommendation="CT\tin 3 months.\x0c",
        narrative="Line one\rline two\x85line three\ud800",
    )
    report = make_report(image, []).model_copy(update={"content": noisy})
    path = write_sr(report, image, tmp_path)
    sr = read_back(path)
    (group,) = measurement_report(sr).get_image_measurement_groups()
    assert texts_named(group[0], fc.REPORTED_LABEL) == ["nodule"]
    assert texts_named(group[0], fc.REPORTED_LOCATION) == ["right upper lobe"]
    evaluations = report_evaluations(sr)
    assert texts_named(evaluations, fc.IMPRESSION) == ["Nodule.\nNo effusion."]
    assert texts_named(evaluations, fc.RECOMMENDATION) == ["CT in 3 months."]
    assert texts_named(evaluations, fc.NARRATIVE) == ["Line one\nline two\nline three"]
