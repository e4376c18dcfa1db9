"""The DICOM Structured Report of one AI report: a Comprehensive SR (PS3.3 A.35.3) holding a
TID 1500 Measurement Report (PS3.16), laid out to be read top to bottom.

Content tree (every CONTAINER is SEPARATE: its items are read one by one, not as one text)::

    CONTAINER Imaging Measurement Report (TID 1500)
      HAS CONCEPT MOD  Language of Content Item and Descendants (TID 1204): en-US or zh-CN
      HAS OBS CONTEXT  Observer Type = Device, Device Observer UID/Name/Manufacturer/Model
                       Name (= model id)/Serial Number (TID 1002, TID 1004)
      HAS CONCEPT MOD  Procedure reported (CID 100, finding_codes.procedure_reported)
      CONTAINS CONTAINER Image Library (TID 1600, image_library): the source images, then
                       the prior study's images when the report compares with a prior
      CONTAINS CONTAINER Imaging Measurements (omitted when there are no findings)
        CONTAINER Measurement Group, one per finding:
          TID 1410 Planar ROI Measurements when the finding has a region, else TID 1501:
          Tracking Identifier "Finding n" + Tracking Unique Identifier (TID 4108)
          Finding = coded finding type (finding_codes: SCT/DCM, else 99MEDGEMMA)
          Finding Site (+ Laterality) when the location maps to a code
          Algorithm Name = model id, Version = revision, Parameters (TID 4019)
          Image Region: closed POLYLINE, 5 points, selected from a source image listed in
            the Image Library (SCOORD, TID 1410)
          Width, Height of the box in mm, Diameter = model's size_mm (TID 300), only when
            the image has a pixel spacing
          TEXT reported label, location, density, boundary (and size when not measured),
            change since the prior (comparison reports)
      CONTAINS CONTAINER Qualitative Evaluations (TID 1500 row 12), in reading order:
        TEXT Impression; TEXT Comparison (what was compared, or why no prior was);
        TEXT Finding "n. label (location, size, density, boundary)" per
        finding; TEXT Narrative Summary; TEXT Recommendation; CODE urgency;
        TEXT test model notice (test models only); TEXT "Outside the validated scope:
        <reason>" (out-of-scope studies only); TEXT AI disclaimer
      CONTAINS CONTAINER AI processing details (99MEDGEMMA, extension of TID 1500):
        TEXT question, parse status, model identity, processing device, generation time

Document level: same study as the sources, own series (derived UIDs, output_common),
Preliminary Flag PRELIMINARY, Verification Flag UNVERIFIED, Completion Flag COMPLETE only
when the model answer parsed, Specific Character Set ISO_IR 192, evidence in the Current
Requested Procedure Evidence Sequence (the prior study's images in the Pertinent Other Evidence
Sequence, PS3.3 C.17.2.3), previous version in the Predecessor Documents Sequence
(PS3.3 C.17.2). Patient and study attributes are copied from the first source image after
vr_limits.fitted_copy: values that break their VR are cut to fit, missing type 2 attributes
are written empty, so a source without Patient ID still gets its SR.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.tag import Tag
from pydicom.uid import ComprehensiveSRStorage

from dicom_node import finding_codes as fc
from dicom_node.image_library import image_library
from dicom_node.output_common import (
    SR_SERIES_DESCRIPTION,
    SR_SERIES_NUMBER,
    UTF8,
    NodeIdentity,
    PixelBox,
    SourceImages,
    content_datetime,
    free_text,
    model_description,
    model_parameters,
    pin_creation_times,
    pixel_box,
    pixel_spacing_mm,
    series_description,
    sr_instance_uid,
    sr_series_uid,
    tracking_uid,
)
from storage.report_schema import (
    AI_DISCLAIMER,
    TEST_MODEL_BANNER,
    Finding,
    ModelIdentity,
    ParseStatus,
    PixelRegion,
    ReportDocument,
)

DEFAULT_NODE = NodeIdentity()
_CONTAINS = hd.sr.RelationshipTypeValues.CONTAINS
_CONTAINER = hd.sr.ValueTypeValues.CONTAINER.value
_SEPARATE = "SEPARATE"
_SCOORD3D = hd.sr.ValueTypeValues.SCOORD3D.value
_REFERENCES = {hd.sr.ValueTypeValues.IMAGE.value, hd.sr.ValueTypeValues.COMPOSITE.value}
_CONTENT_SEQUENCE = Tag("ContentSequence")

MeasurementGroup = (
    hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    | hd.sr.MeasurementsAndQualitativeEvaluations
)


@dataclass(frozen=True)
class SrReference:
    """The identity of a stored SR, as the Predecessor Documents Sequence needs it."""

    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    sop_instance_uid: str

    @classmethod
    def of(cls, dataset: Dataset) -> SrReference:
        return cls(
            str(dataset.StudyInstanceUID),
            str(dataset.SeriesInstanceUID),
            str(dataset.SOPClassUID),
            str(dataset.SOPInstanceUID),
        )

    def as_dataset(self) -> Dataset:
        reference = Dataset()
        reference.StudyInstanceUID = self.study_instance_uid
        reference.SeriesInstanceUID = self.series_instance_uid
        reference.SOPClassUID = self.sop_class_uid
        reference.SOPInstanceUID = self.sop_instance_uid
        return reference


def load_standard_tables() -> None:
    """Read highdicom's tables of the standard's modules (PS3.3 IODs) now.

    highdicom checks each object it builds against them, reading them from JSON on first use
    (0.3-0.4 s) and keeping them: the first report a process builds paid for it, and for a
    lone study that is its report's latency. A store process calls this as it starts. A
    throwaway object of the SR's class is the public way there."""
    hd.SOPClass(
        study_instance_uid=hd.UID(),
        series_instance_uid=hd.UID(),
        series_number=1,
        sop_instance_uid=hd.UID(),
        sop_class_uid=ComprehensiveSRStorage,
        instance_number=1,
        modality="SR",
    )


def build_sr(
    report: ReportDocument,
    sources: Sequence[Dataset],
    predecessor: SrReference | None = None,
    *,
    node: NodeIdentity = DEFAULT_NODE,
    priors: Sequence[Dataset] = (),
    queryable: bool = True,
) -> hd.sr.ComprehensiveSR:
    """The Comprehensive SR of ``report`` (see the module docstring for its content).

    ``sources`` are the images the report was made from (headers suffice), at least one of the
    report's study; every finding region must refer to one of them. ``predecessor`` is the SR
    of the previous version of this study's report, if any. ``priors``: the images of the
    prior study the report was compared with (``report.prior``), cited as evidence.
    ``queryable``: ``.content`` is re-read as a MeasurementReport with its query methods;
    without it ``.content`` holds the tree's root alone (``_comprehensive_sr``; the dataset
    holds every item), for a caller that only writes the SR (the same file, less time).
    """
    images = SourceImages([*sources, *priors], report.study_instance_uid)
    node = node.fitted()
    when, utc_offset = content_datetime(report.created_at, images.primary)
    sr = _comprehensive_sr(
        _measurement_report(report, images, node),
        images.ordered,
        series_instance_uid=sr_series_uid(node, report),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sr_instance_uid(node, report),
        instance_number=report.version_number,
        manufacturer=node.manufacturer,
        is_complete=report.content.parse_status == ParseStatus.OK,
        is_final=False,
        is_verified=False,
        institution_name=node.institution_name,
        previous_versions=[predecessor.as_dataset()] if predecessor else None,
        series_description=series_description(SR_SERIES_DESCRIPTION, report.model),
        manufacturer_model_name=node.model_name,
        software_versions=node.software_version,
        device_serial_number=node.serial_number,
        content_date=when.date(),
        content_time=when.time(),
        specific_character_set=UTF8,
        coding_schemes=[fc.coding_scheme_identification()],
    )
    pin_creation_times(sr, when)
    images.set_patient_name(sr, images.primary)
    if utc_offset is not None:
        sr.TimezoneOffsetFromUTC = utc_offset
    _make_containers_separate(sr)
    if not queryable:
        return sr
    # Re-read in place so that .content is a MeasurementReport with its query methods.
    return cast(hd.sr.ComprehensiveSR, hd.sr.ComprehensiveSR.from_dataset(sr, copy=False))


def _comprehensive_sr(
    content: hd.sr.MeasurementReport, evidence: Sequence[Dataset], **attributes: Any
) -> hd.sr.ComprehensiveSR:
    """highdicom's Comprehensive SR of ``content``, built around the tree's root alone and the
    root's items attached after: the same dataset.

    The constructor deep-copies the whole tree for the object's query methods and searches it
    three times (its image and composite references, for the evidence check; SCOORD3D items,
    which this IOD does not allow). For a report that was half of its build, and the query
    methods serve nobody here: ``build_sr`` re-reads the finished dataset when they are
    wanted. The two checks are made here in one walk of the tree (``_check_content``); the
    evidence sequences do not depend on the tree (highdicom lists every evidence instance).
    """
    root = content[0]
    _check_content(root, {str(image.SOPInstanceUID) for image in evidence})
    shell = Dataset()
    for element in root:
        if element.tag != _CONTENT_SEQUENCE:
            shell.add(element)
    shell.ContentSequence = []  # highdicom's searches need the attribute
    sr = hd.sr.ComprehensiveSR(evidence=evidence, content=shell, **attributes)
    sr.ContentSequence = root.ContentSequence
    return sr


def _check_content(item: Dataset, evidence_uids: set[str]) -> None:
    """No SCOORD3D item (PS3.3 A.35.3: not in a Comprehensive SR), and every image or
    composite item refers to an instance given as evidence (PS3.3 C.17.2.3)."""
    for child in item.get("ContentSequence", []):
        value_type = child.get("ValueType")
        if value_type == _SCOORD3D:
            raise ValueError("a Comprehensive SR cannot hold SCOORD3D content items")
        if value_type in _REFERENCES:
            uid = str(child.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            if uid not in evidence_uids:
                raise ValueError(f"the content refers to {uid}, which is not among the evidence")
        _check_content(child, evidence_uids)


# --- TID 1500 ------------------------------------------------------------------------------


def _measurement_report(
    report: ReportDocument, images: SourceImages, node: NodeIdentity
) -> hd.sr.MeasurementReport:
    groups = [
        _finding_group(number, finding, report, images, node)
        for number, finding in enumerate(report.content.findings, start=1)
    ]
    measurement_report = hd.sr.MeasurementReport(
        observation_context=_observation_context(report.model, node),
        procedure_reported=fc.procedure_reported(str(images.primary.get("Modality", ""))),
        imaging_measurements=groups or [_placeholder_group()],
        language_of_content_item_and_descendants=hd.sr.LanguageOfContentItemAndDescendants(
            hd.sr.CodedConcept.from_code(fc.language_code(report.content.language))
        ),
    )
    content = measurement_report[0].ContentSequence
    if not groups:
        _drop_imaging_measurements(content)
    content.insert(_measurements_position(content), image_library(images.ordered))
    content.append(_report_evaluations(report))
    content.append(_processing_details(report))
    return measurement_report


def _placeholder_group() -> hd.sr.MeasurementsAndQualitativeEvaluations:
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid="2.25.0", identifier="none")
    )


def _drop_imaging_measurements(content: hd.sr.ContentSequence) -> None:
    """TID 1500: "Imaging Measurements" (row 6) may be absent when row 12 is present.

    highdicom's MeasurementReport always writes row 6, so a report without findings is built
    with one placeholder group whose container is removed here.
    """
    for index, item in enumerate(content):
        if item.name == codes.DCM.ImagingMeasurements:
            del content[index]
            return


def _measurements_position(content: hd.sr.ContentSequence) -> int:
    """Where the Image Library goes: before Imaging Measurements (TID 1500 rows 5, 6)."""
    for index, item in enumerate(content):
        if item.name == codes.DCM.ImagingMeasurements:
            return index
    return len(content)


def _make_containers_separate(item: Dataset) -> None:
    """Continuity of Content SEPARATE (PS3.3 C.17.3.2.2) for ``item`` and every container
    below it: highdicom makes containers CONTINUOUS, which viewers render as one paragraph."""
    if item.get("ValueType") == _CONTAINER:
        item.ContinuityOfContent = _SEPARATE
    for child in item.get("ContentSequence", []):
        _make_containers_separate(child)


def _observation_context(model: ModelIdentity, node: NodeIdentity) -> hd.sr.ObservationContext:
    """TID 1001/1002/1004: the node running the model is the (device) observer."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=node.device_uid,
        name=node.name,
        manufacturer_name=node.manufacturer,
        model_name=_non_blank(model.model_id),
        serial_number=node.serial_number,
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )


# --- one finding: TID 1410 / TID 1501 ------------------------------------------------------


def _finding_group(
    number: int,
    finding: Finding,
    report: ReportDocument,
    images: SourceImages,
    node: NodeIdentity,
) -> MeasurementGroup:
    tracking = hd.sr.TrackingIdentifier(
        uid=tracking_uid(node, report, number), identifier=f"Finding {number}"
    )
    group: MeasurementGroup
    if finding.region is None:
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            finding_type=fc.finding_type_code(finding.label),
            algorithm_id=algorithm_identification(report.model),
            finding_sites=_finding_sites(finding.location),
        )
        measured_size = False
    else:
        image = images.image(finding.region.sop_instance_uid)
        group, measured_size = _planar_group(tracking, finding, finding.region, image, report)
    group[0].ContentSequence.extend(_finding_texts(finding, measured_size))
    return group


def _planar_group(
    tracking: hd.sr.TrackingIdentifier,
    finding: Finding,
    region: PixelRegion,
    image: Dataset,
    report: ReportDocument,
) -> tuple[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations, bool]:
    """TID 1410 for a boxed finding, and whether its size went in as a measurement."""
    box = pixel_box(region, image)
    measurements = _size_measurements(box, finding.size_mm, pixel_spacing_mm(image))
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        referenced_region=_image_region(box, image, region.frame_number),
        finding_type=fc.finding_type_code(finding.label),
        algorithm_id=algorithm_identification(report.model),
        finding_sites=_finding_sites(finding.location),
        measurements=measurements or None,
    )
    return group, bool(measurements)


def algorithm_identification(model: ModelIdentity) -> hd.sr.AlgorithmIdentification:
    """TID 4019: name = model id, version = revision, parameters = how it ran."""
    return hd.sr.AlgorithmIdentification(
        name=_non_blank(model.model_id),
        version=_non_blank(model.revision),
        parameters=[free_text(parameter) for parameter in model_parameters(model)],
    )


def _non_blank(text: str) -> str:
    return free_text(text).strip() or "unknown"


def _finding_sites(location: str | None) -> list[hd.sr.FindingSite] | None:
    site = fc.finding_site(location)
    if site is None:
        return None
    return [hd.sr.FindingSite(anatomic_location=site.structure, laterality=site.laterality)]


def _image_region(box: PixelBox, image: Dataset, frame_number: int | None) -> hd.sr.ImageRegion:
    """SCOORD POLYLINE (PS3.3 C.18.6): the box corners in the image's pixel space."""
    frames = [frame_number] if frame_number and int(image.get("NumberOfFrames", 1)) > 1 else None
    source = hd.sr.SourceImageForRegion.from_source_image(image, referenced_frame_numbers=frames)
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=box.closed_polyline(),
        source_image=source,
    )


def _size_measurements(
    box: PixelBox, size_mm: float | None, spacing: tuple[float, float] | None
) -> list[hd.sr.Measurement]:
    """TID 300 in mm: box width/height (CID 7469 Width, Height) and the model's size
    (Diameter), only when the image says how large a pixel is."""
    if spacing is None:
        return []
    row_mm, column_mm = spacing
    measurements = [
        _millimetres(codes.SCT.Width, box.width * column_mm, fc.BOX_EXTENT_METHOD),
        _millimetres(codes.DCM.Height, box.height * row_mm, fc.BOX_EXTENT_METHOD),
    ]
    if size_mm is not None:
        measurements.append(_millimetres(codes.SCT.Diameter, size_mm, fc.MODEL_SIZE_METHOD))
    return measurements


def _millimetres(name: Code, value: float, method: Code) -> hd.sr.Measurement:
    return hd.sr.Measurement(
        name=name, value=round(value, 2), unit=codes.UCUM.Millimeter, method=method
    )


def _finding_texts(finding: Finding, measured_size: bool) -> list[hd.sr.TextContentItem]:
    """TID 1501 row 12 text answers: the model's own words for the finding."""
    size_text = None
    if finding.size_mm is not None and not measured_size:
        size_text = f"{finding.size_mm:g} mm"
    return _texts(
        [
            (fc.REPORTED_LABEL, finding.label),
            (fc.REPORTED_LOCATION, finding.location),
            (fc.REPORTED_DENSITY, finding.density),
            (fc.REPORTED_BOUNDARY, finding.boundary),
            (fc.REPORTED_SIZE_TEXT, size_text),
            (fc.REPORTED_CHANGE, finding.change.value if finding.change else None),
        ]
    )


# --- report-level evaluations: TID 1500 row 12, then the processing details ---------------


def _report_evaluations(report: ReportDocument) -> hd.sr.ContainerContentItem:
    """What a radiologist reads: impression, findings, recommendation, urgency, warnings."""
    content = report.content
    items: list[hd.sr.ContentItem] = [
        *_texts([(fc.IMPRESSION, content.impression)]),
        *_texts([(fc.COMPARISON, comparison_text(report))]),
        *_texts([(fc.FINDING, finding_line(n, f)) for n, f in enumerate(content.findings, 1)]),
        *_texts([(fc.NARRATIVE, content.narrative), (fc.RECOMMENDATION, content.recommendation)]),
    ]
    if content.urgency is not None:
        items.append(
            hd.sr.CodeContentItem(
                name=fc.URGENCY,
                value=fc.URGENCY_VALUES[content.urgency],
                relationship_type=_CONTAINS,
            )
        )
    items += _warning_items(report)
    return _container(fc.QUALITATIVE_EVALUATIONS, items)


def finding_line(number: int, finding: Finding) -> str:
    """One finding in words, as the model gave it: ``n. label (location, size, density, ...)``."""
    size = f"{finding.size_mm:g} mm" if finding.size_mm is not None else None
    details = [d for d in (finding.location, size, finding.density, finding.boundary) if d]
    suffix = f" ({', '.join(details)})" if details else ""
    change = f" [{finding.change.value} since prior]" if finding.change else ""
    return f"{number}. {finding.label}{suffix}{change}"


def comparison_text(report: ReportDocument) -> str | None:
    """What the report was compared with (and the model's sentence on it), or why no prior
    was; None when priors are not in use."""
    if report.prior is None:
        return None
    statement = report.prior.statement(report.content.language)
    return f"{statement}\n{report.content.comparison}" if report.content.comparison else statement


def _warning_items(report: ReportDocument) -> list[hd.sr.TextContentItem]:
    """Test model banner, scope notice (a study outside the validated scope), disclaimer."""
    banner = TEST_MODEL_BANNER if report.model.is_test_model else None
    return _texts(
        [
            (fc.TEST_MODEL_NOTICE, banner),
            (fc.OUT_OF_SCOPE, report.scope_notice),
            (fc.DISCLAIMER, AI_DISCLAIMER),
        ]
    )


def _processing_details(report: ReportDocument) -> hd.sr.ContainerContentItem:
    """The question asked and how the answer was made, apart from the clinical content."""
    items = _texts(
        [
            (fc.QUESTION, report.question),
            (fc.PARSE_STATUS, report.content.parse_status.value),
            (fc.MODEL_IDENTITY, model_description(report.model)),
            (fc.PROCESSING_DEVICE, report.model.device),
            (fc.GENERATED_AT, report.created_at.isoformat()),
        ]
    )
    return _container(fc.PROCESSING_DETAILS, items)


def _container(name: Code, items: Sequence[hd.sr.ContentItem]) -> hd.sr.ContainerContentItem:
    container = hd.sr.ContainerContentItem(
        name=name, relationship_type=_CONTAINS, is_content_continuous=False
    )
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def _texts(answers: Sequence[tuple[Code, str | None]]) -> list[hd.sr.TextContentItem]:
    """TEXT content items (UT) for the non-blank answers, cleaned of disallowed characters."""
    items = []
    for name, value in answers:
        text = free_text(value or "")
        if text.strip():
            items.append(hd.sr.TextContentItem(name=name, value=text, relationship_type=_CONTAINS))
    return items
