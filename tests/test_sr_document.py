"""The AI report as a Comprehensive SR / TID 1500, checked with dciodvfy, PixelMed, dsrdump and
highdicom: the document (study, series, UIDs, predecessors), Chinese text, findings without
boxes, the inputs, and sources that break their VRs or lack type 2 attributes."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from benchmarks.report_outputs import highdicom_around_the_whole_tree
from dicom_node import finding_codes as fc
from dicom_node import sr as sr_module
from dicom_node.output_common import pixel_spacing_mm, write_datasets
from dicom_node.sr import SrReference, build_sr
from storage.report_schema import (
    Finding,
    ParseStatus,
    ReportContent,
    Urgency,
)
from tests.dicom_output_support import (
    BROKEN_SOURCE_WARNINGS,
    CHINESE,
    ENGLISH,
    HUGE_NAME,
    LONG_NAME,
    NO_PATIENT_ID_WARNINGS,
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
)
from tests.sr_support import (
    PATIENT_AND_STUDY,
    code_named,
    image_region,
    processing_details,
    read_back,
    report_evaluations,
    texts_named,
    write_sr,
)

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


def test_an_sr_built_without_the_re_read_is_the_same_file(tmp_path: Path) -> None:
    """The outputs build the SR without re-reading it for its query methods: same bytes."""
    image = rg1_with_spacing()
    report = make_report(image, boxed_findings(image))
    (queryable,) = write_datasets([build_sr(report, [image])], tmp_path / "queryable")
    plain = build_sr(report, [image], queryable=False)
    (written,) = write_datasets([plain], tmp_path / "plain")
    assert written.path.name == queryable.path.name
    assert written.path.read_bytes() == queryable.path.read_bytes()


@pytest.mark.parametrize("kind", ["boxed, prior, predecessor", "no findings, Chinese"])
def test_the_sr_built_around_its_root_is_highdicoms_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """The SR is built around the tree's root with the items attached after: the same bytes
    as highdicom's constructor given the whole tree."""
    image, prior = rg1_with_spacing(), rg1_with_spacing()
    prior.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    prior.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.3"
    prior.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    if kind.startswith("boxed"):
        report, priors = make_report(image, boxed_findings(image)), [prior]
        predecessor = SrReference.of(build_sr(make_report(image, [], version_number=1), [image]))
    else:
        report, priors, predecessor = make_report(image, [], chinese=True), [], None
    built = build_sr(report, [image], predecessor, priors=priors, queryable=False)
    (around_root,) = write_datasets([built], tmp_path / "around-root")
    monkeypatch.setattr(sr_module, "_comprehensive_sr", highdicom_around_the_whole_tree)
    reference = build_sr(report, [image], predecessor, priors=priors, queryable=False)
    (whole_tree,) = write_datasets([reference], tmp_path / "whole-tree")
    assert len(built.ContentSequence) >= 4  # the tree's items, not the root alone
    assert around_root.path.read_bytes() == whole_tree.path.read_bytes()


def content_item(value_type: str, referenced_uid: str | None = None) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.ValueType = value_type
    if referenced_uid is not None:
        reference = pydicom.Dataset()
        reference.ReferencedSOPInstanceUID = referenced_uid
        item.ReferencedSOPSequence = [reference]
    return item


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (content_item("SCOORD3D"), "cannot hold SCOORD3D"),
        (content_item("IMAGE", "1.2.3.9"), "refers to 1.2.3.9, which is not among the evidence"),
        (content_item("COMPOSITE", "1.2.3.8"), "refers to 1.2.3.8"),
    ],
)
def test_content_highdicom_would_refuse_is_refused(item: pydicom.Dataset, message: str) -> None:
    """The checks of the constructor's tree searches, made in the node's one walk."""
    group = content_item("CONTAINER")
    group.ContentSequence = [content_item("IMAGE", "1.2.3.4")]
    root = content_item("CONTAINER")
    root.ContentSequence = [group]
    sr_module._check_content(root, {"1.2.3.4"})  # the evidence alone: accepted
    root.ContentSequence[0].ContentSequence.append(item)
    with pytest.raises(ValueError, match=message):
        sr_module._check_content(root, {"1.2.3.4"})


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


def test_a_store_process_reads_the_standard_tables_before_its_first_report(tmp_path: Path) -> None:
    """highdicom reads its PS3.3 module tables on first use and keeps them per process: a
    fresh interpreter has none, and has them once a store process's start has run."""
    check = (
        "from pathlib import Path\n"
        "from highdicom._standard_utils import get_module_attribute_map as tables\n"
        "from medgemma_node.outputs import start_store_process\n"
        "assert tables.cache_info().currsize == 0\n"
        f"start_store_process('INFO', Path({str(tmp_path / 'node.log')!r}))\n"
        "assert tables.cache_info().currsize == 1\n"
    )
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", check], check=True, cwd=root, timeout=120)
