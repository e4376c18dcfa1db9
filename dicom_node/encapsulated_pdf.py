"""The PDF report as a DICOM Encapsulated PDF (PS3.3 A.45.1),
SOP Class 1.2.840.10008.5.1.4.1.1.104.1.

Modules, as the IOD lists them:

    Patient (C.7.1.1), General Study (C.7.2.1), Patient Study (C.7.2.2)
        copied from the report's first source image of the reported study as SourceImages
        fits it (vr_limits: values within their VR, type 2 attributes present), then each
        text value cut to its VR's length in UTF-8 bytes as well (dciodvfy and many archives
        count bytes: a Chinese name of 30 characters is 90), malformed values left empty
        (Type 2) or out (Type 3); sequences are not copied
    Encapsulated Document Series (C.24.1)
        Modality DOC, own series (UID derived per study, output_common), Series Number 9903,
        Series Description saying the content is not verified
    General Equipment (C.7.5.1), SC Equipment (C.8.6.1, Conversion Type WSD: made on a
        workstation) — the node, as the SR names it
    Encapsulated Document (C.24.2)
        Instance Number = report version, Content Date/Time and Acquisition DateTime = the
        report's time, Burned In Annotation YES (the document shows patient data), Document
        Title with "preliminary" and "UNVERIFIED", Concept Name (LOINC 18748-4 Diagnostic
        imaging study), Verification Flag UNVERIFIED, Source Instance Sequence (the images
        the PDF shows), MIME type application/pdf, the PDF bytes and their length
        (Encapsulated Document Length, without the pad byte an odd length gets, PS3.5 7.1)
    SOP Common (C.12.1)
        SOP Instance UID derived from the study and report (output_common), so a rebuild is
        the same object and a re-send is not a second document; Specific Character Set
        ISO_IR 192; creation time = the report's; Contributing Equipment Sequence: the source's
        acquisition equipment (DCM 109101) and the AI model that wrote the report (DCM 109102,
        processing equipment: model id as model name, revision as software version)
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from pydicom import Dataset, config
from pydicom.datadict import dictionary_VR
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import DA, DT, TM, validate_value

from dicom_node.output_common import (
    PDF_SERIES_DESCRIPTION,
    PDF_SERIES_NUMBER,
    UTF8,
    NodeIdentity,
    SourceImages,
    content_datetime,
    long_string,
    model_description,
    pdf_instance_uid,
    pdf_series_uid,
    series_description,
    single_line,
)
from dicom_node.vr_limits import free_text
from storage.report_schema import TEST_MODEL_BANNER, ModelIdentity, ReportDocument

ENCAPSULATED_PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"
PDF_MIME_TYPE = "application/pdf"
DOCUMENT_TITLES = {
    "en": "AI-assisted imaging report — preliminary, UNVERIFIED",
    "zh": "AI辅助影像分析报告 — 初步报告（preliminary），未经核实（UNVERIFIED）",
}
DEFAULT_NODE = NodeIdentity()

# (keyword, type) of the Patient, General Study and Patient Study modules that are copied.
COPIED_ATTRIBUTES: tuple[tuple[str, int], ...] = (
    ("PatientName", 2),
    ("PatientID", 2),
    ("IssuerOfPatientID", 3),
    ("PatientBirthDate", 2),
    ("PatientBirthTime", 3),
    ("PatientSex", 2),
    ("StudyInstanceUID", 1),
    ("StudyDate", 2),
    ("StudyTime", 2),
    ("ReferringPhysicianName", 2),
    ("StudyID", 2),
    ("AccessionNumber", 2),
    ("StudyDescription", 3),
    ("PatientAge", 3),
    ("PatientSize", 3),
    ("PatientWeight", 3),
)
# PS3.5 Table 6.2-1: maximum length of one value, in characters.
_MAX_LENGTH = {
    "AS": 4,
    "CS": 16,
    "DA": 8,
    "DS": 16,
    "DT": 26,
    "IS": 12,
    "LO": 64,
    "SH": 16,
    "ST": 1024,
    "LT": 10240,
    "TM": 14,
    "UI": 64,
}
_ONE_LINE_TEXT = frozenset({"LO", "SH"})
_MULTI_LINE_TEXT = frozenset({"ST", "LT"})
_PN_LENGTH = 64


def build_encapsulated_pdf(
    report: ReportDocument,
    pdf: bytes,
    sources: Sequence[Dataset],
    *,
    node: NodeIdentity = DEFAULT_NODE,
    language: str | None = None,
    sop_instance_uid: str | None = None,
) -> Dataset:
    """The Encapsulated PDF of ``report`` holding ``pdf`` (see the module docstring).

    ``sources``: the images the report (and the PDF) were made from, headers suffice, at least
    one of the reported study. ``sop_instance_uid``: the UID recorded when the object was
    planned (report_objects), if any; by default the derived one (pdf_instance_uid).
    """
    if not pdf.startswith(b"%PDF-"):
        raise ValueError("the document is not a PDF (it does not start with %PDF-)")
    images = SourceImages(sources, report.study_instance_uid)
    node = node.fitted()
    when, utc_offset = content_datetime(report.created_at, images.primary)
    dataset = Dataset()
    dataset.SpecificCharacterSet = UTF8
    _copy_patient_and_study(images, dataset)
    _series_and_equipment(dataset, report, node)
    _document(dataset, report, pdf, images, when, language)
    _sop_common(dataset, report, node, images.primary, when, utc_offset)
    if sop_instance_uid is not None:
        dataset.SOPInstanceUID = sop_instance_uid
    dataset.file_meta = _file_meta(dataset)
    return dataset


# --- Patient, General Study, Patient Study -------------------------------------------------


def _copy_patient_and_study(images: SourceImages, target: Dataset) -> None:
    source = images.primary
    images.set_patient_name(target, source)  # the fitted copy's name is blank (output_common)
    for keyword, attribute_type in COPIED_ATTRIBUTES:
        value = fitted_value(keyword, (target if keyword == "PatientName" else source).get(keyword))
        if value is not None:
            setattr(target, keyword, value)
        elif attribute_type == 2:
            setattr(target, keyword, "")
        elif attribute_type == 1:
            raise ValueError(f"the source image has no usable {keyword}")


def fitted_value(keyword: str, value: object) -> str | None:
    """``value`` as one valid value of ``keyword``'s VR, or None when nothing valid is left."""
    if value is None:
        return None
    vr = dictionary_VR(keyword)
    if not isinstance(value, str) and isinstance(value, Sequence):
        value = value[0] if len(value) else ""  # these attributes are single-valued
    text = str(value)
    if vr == "PN":
        fitted = _person_name(text)
    elif vr in _ONE_LINE_TEXT:
        fitted = cut_to_bytes(single_line(text, _MAX_LENGTH[vr]), _MAX_LENGTH[vr])
    elif vr in _MULTI_LINE_TEXT:
        fitted = cut_to_bytes(free_text(text), _MAX_LENGTH[vr]).rstrip()
    else:
        fitted = text.strip()
    if not fitted:
        return None
    try:
        validate_value(vr, fitted, config.RAISE)
    except (ValueError, TypeError):
        return None
    return fitted


def cut_to_bytes(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` bytes of UTF-8 (ISO_IR 192), whole characters only.

    PS3.5 counts characters, but validators and many archives count bytes; a value within
    both limits is read the same everywhere.
    """
    encoded = text.encode("utf-8")
    if len(encoded) <= limit:
        return text
    return encoded[:limit].decode("utf-8", "ignore")


def _person_name(text: str) -> str:
    """PS3.5 6.2: up to three component groups (alphabetic=ideographic=phonetic), no
    backslash or control characters, 64 characters per group; the whole value is cut to 64
    bytes, as dciodvfy and many archives read the limit."""
    groups = free_text(text).replace("\\", "/").split("=")[:3]
    joined = "=".join(" ".join(group.split()) for group in groups)
    return cut_to_bytes(joined, _PN_LENGTH).rstrip("=^ ")


def _lo(text: str) -> str:
    """A settings or model text as an LO value (≤ 64 bytes)."""
    return cut_to_bytes(long_string(text), _MAX_LENGTH["LO"])


# --- series, equipment, document -----------------------------------------------------------


def _series_and_equipment(dataset: Dataset, report: ReportDocument, node: NodeIdentity) -> None:
    dataset.Modality = "DOC"
    dataset.SeriesInstanceUID = pdf_series_uid(node, report)
    dataset.SeriesNumber = PDF_SERIES_NUMBER
    dataset.SeriesDescription = series_description(PDF_SERIES_DESCRIPTION, report.model)
    dataset.Manufacturer = _lo(node.manufacturer)
    dataset.ManufacturerModelName = _lo(node.model_name)
    dataset.SoftwareVersions = _lo(node.software_version)
    if node.institution_name:
        dataset.InstitutionName = _lo(node.institution_name)
    if node.serial_number:
        dataset.DeviceSerialNumber = _lo(node.serial_number)
    dataset.ConversionType = "WSD"  # SC Equipment: made on a workstation


def document_title(model: ModelIdentity, language: str) -> str:
    base = DOCUMENT_TITLES["zh" if language.lower().startswith("zh") else "en"]
    return f"{TEST_MODEL_BANNER}: {base}" if model.is_test_model else base


def _document(
    dataset: Dataset,
    report: ReportDocument,
    pdf: bytes,
    images: SourceImages,
    when: datetime,
    language: str | None,
) -> None:
    dataset.InstanceNumber = report.version_number
    dataset.ContentDate = DA(when.date())
    dataset.ContentTime = TM(when.time())
    dataset.AcquisitionDateTime = DT(when)
    dataset.BurnedInAnnotation = "YES"  # the document shows the patient's name and id
    dataset.DocumentTitle = document_title(report.model, language or report.content.language)
    dataset.ConceptNameCodeSequence = [_code("18748-4", "LN", "Diagnostic imaging study")]
    dataset.VerificationFlag = "UNVERIFIED"
    dataset.SourceInstanceSequence = [_reference(image) for image in images.ordered]
    dataset.MIMETypeOfEncapsulatedDocument = PDF_MIME_TYPE
    dataset.EncapsulatedDocument = pdf
    dataset.EncapsulatedDocumentLength = len(pdf)


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    code = Dataset()
    code.CodeValue = value
    code.CodingSchemeDesignator = scheme
    code.CodeMeaning = meaning
    return code


def _reference(image: Dataset) -> Dataset:
    reference = Dataset()
    reference.ReferencedSOPClassUID = image.SOPClassUID
    reference.ReferencedSOPInstanceUID = image.SOPInstanceUID
    return reference


# --- SOP Common ----------------------------------------------------------------------------


def _sop_common(
    dataset: Dataset,
    report: ReportDocument,
    node: NodeIdentity,
    source: Dataset,
    when: datetime,
    utc_offset: str | None,
) -> None:
    dataset.SOPClassUID = ENCAPSULATED_PDF_STORAGE
    dataset.SOPInstanceUID = pdf_instance_uid(node, report)
    dataset.InstanceCreationDate = DA(when.date())
    dataset.InstanceCreationTime = TM(when.time())
    if utc_offset is not None:
        dataset.TimezoneOffsetFromUTC = utc_offset
    equipment = [_model_equipment(report.model, node, when)]
    acquisition = _acquisition_equipment(source)
    dataset.ContributingEquipmentSequence = ([acquisition] if acquisition else []) + equipment


def _acquisition_equipment(source: Dataset) -> Dataset | None:
    """The modality that made the source image (DCM 109101), when the image names it."""
    manufacturer = fitted_value("Manufacturer", source.get("Manufacturer"))
    if manufacturer is None:
        return None
    item = Dataset()
    item.Manufacturer = manufacturer
    for keyword in (
        "InstitutionName",
        "StationName",
        "ManufacturerModelName",
        "DeviceSerialNumber",
        "SoftwareVersions",
    ):
        value = fitted_value(keyword, source.get(keyword))
        if value is not None:
            setattr(item, keyword, value)
    item.PurposeOfReferenceCodeSequence = [_code("109101", "DCM", "Acquisition Equipment")]
    item.ContributionDescription = "Acquisition equipment of the source image(s)"
    return item


def _model_equipment(model: ModelIdentity, node: NodeIdentity, when: datetime) -> Dataset:
    """The AI model that wrote the report, run by this node (DCM 109102; IHE AIR)."""
    item = Dataset()
    item.Manufacturer = _lo(node.manufacturer)
    if node.institution_name:
        item.InstitutionName = _lo(node.institution_name)
    item.ManufacturerModelName = _lo(model.model_id)
    if node.serial_number:
        item.DeviceSerialNumber = _lo(node.serial_number)
    item.SoftwareVersions = [_lo(model.revision), _lo(node.software_version)]
    item.ContributionDateTime = DT(when)
    item.ContributionDescription = free_text(model_description(model))[:1024]
    item.PurposeOfReferenceCodeSequence = [_code("109102", "DCM", "Processing Equipment")]
    return item


def _file_meta(dataset: Dataset) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta
