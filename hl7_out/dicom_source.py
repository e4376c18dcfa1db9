"""What the source DICOM study says about the patient, the order and the procedure.

Reads the attributes the ORU^R01 needs from one instance of the study, as plain Python values
(no HL7 encoding here): DICOM PS3.3 C.7.1.1 Patient Module, C.7.2.1 General Study Module,
C.4.10 Imaging Service Request Module / C.4.11 Request Attributes Macro, C.7.3.1 General Series
and C.12.1 SOP Common (timezone offset).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from pydicom import Dataset
from pydicom.valuerep import PersonName

_DA = re.compile(r"^\d{8}$")
_TM = re.compile(r"^(\d{2})(\d{2})?(\d{2})?(?:\.(\d{1,6}))?$")
_TIMEZONE_OFFSET = re.compile(r"^[+-]\d{4}$")

# Date/time pairs that can stand for "when the images were made", best first.
_OBSERVATION_DATE_TIMES = (
    ("StudyDate", "StudyTime"),
    ("SeriesDate", "SeriesTime"),
    ("AcquisitionDate", "AcquisitionTime"),
    ("ContentDate", "ContentTime"),
)


@dataclass(frozen=True)
class CodedConcept:
    """A DICOM code sequence item (PS3.3 Table 8.8-1 Code Sequence Macro)."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class PatientIssuer:
    """Issuer of Patient ID (0010,0021) and its qualifiers (0010,0024)."""

    local_id: str = ""
    universal_id: str = ""
    universal_id_type: str = ""


@dataclass(frozen=True)
class OtherPatientId:
    """One item of Other Patient IDs Sequence (0010,1002), or a value of the retired Other
    Patient IDs (0010,1000), which has no issuer."""

    value: str
    issuer: PatientIssuer


@dataclass(frozen=True)
class SourceStudy:
    """The source study's patient, order and procedure, cleaned of DICOM padding."""

    patient_id: str
    issuer: PatientIssuer
    other_patient_ids: tuple[OtherPatientId, ...]
    # Patient Name (0010,0010) component groups: alphabetic, ideographic, phonetic; each group
    # holds the five PN components family, given, middle, prefix, suffix (PS3.5 §6.2.1).
    name_groups: tuple[tuple[str, ...], ...]
    birth_date: str  # DA YYYYMMDD, or "" when absent or malformed
    sex: str  # "M", "F", "O" or ""
    admission_id: str
    accession_number: str
    accession_issuer: PatientIssuer  # Issuer of Accession Number Sequence (0008,0051)
    study_instance_uid: str
    procedure_code: CodedConcept | None
    procedure_text: str
    observation_time: str  # HL7 DTM built from DICOM DA/TM, or ""
    requested_priority: str  # (0040,1003) or retired (0032,000C), upper case, or ""


def read_source_study(dataset: Dataset) -> SourceStudy:
    """Read the patient, order and procedure attributes from ``dataset``."""
    return SourceStudy(
        patient_id=_text(dataset, "PatientID"),
        issuer=_patient_issuer(dataset),
        other_patient_ids=_other_patient_ids(dataset),
        name_groups=_name_groups(dataset.get("PatientName")),
        birth_date=_valid_date(_text(dataset, "PatientBirthDate")),
        sex=_text(dataset, "PatientSex").upper(),
        admission_id=_text(dataset, "AdmissionID"),
        accession_number=_text(dataset, "AccessionNumber"),
        accession_issuer=_accession_issuer(dataset),
        study_instance_uid=_text(dataset, "StudyInstanceUID"),
        procedure_code=_procedure_code(dataset),
        procedure_text=_procedure_text(dataset),
        observation_time=_observation_time(dataset),
        requested_priority=(
            _text(dataset, "RequestedProcedurePriority") or _text(dataset, "StudyPriorityID")
        ).upper(),
    )


def _text(dataset: Dataset, keyword: str) -> str:
    """A single-valued text attribute, stripped; "" when absent or empty."""
    value = dataset.get(keyword)
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        value = value[0] if value else ""
    return str(value).strip()


def _patient_issuer(dataset: Dataset) -> PatientIssuer:
    qualifiers = dataset.get("IssuerOfPatientIDQualifiersSequence")
    universal_id = universal_id_type = ""
    if qualifiers:
        universal_id = _text(qualifiers[0], "UniversalEntityID")
        universal_id_type = _text(qualifiers[0], "UniversalEntityIDType")
    return PatientIssuer(
        local_id=_text(dataset, "IssuerOfPatientID"),
        universal_id=universal_id,
        universal_id_type=universal_id_type if universal_id else "",
    )


def _other_patient_ids(dataset: Dataset) -> tuple[OtherPatientId, ...]:
    """PS3.3 C.7.1.1: the sequence's items with their issuers, then the retired values."""
    found = [
        OtherPatientId(_text(item, "PatientID"), _patient_issuer(item))
        for item in dataset.get("OtherPatientIDsSequence") or []
        if _text(item, "PatientID")
    ]
    retired = dataset.get("OtherPatientIDs")
    values = [] if retired is None else [retired] if isinstance(retired, str) else list(retired)
    found += [OtherPatientId(str(v).strip(), PatientIssuer()) for v in values if str(v).strip()]
    return tuple(found)


def _accession_issuer(dataset: Dataset) -> PatientIssuer:
    """Issuer of Accession Number Sequence (0008,0051): an HL7 v2 HD (PS3.3 Table 10-17)."""
    items = dataset.get("IssuerOfAccessionNumberSequence")
    if not items:
        return PatientIssuer()
    item = items[0]
    universal_id = _text(item, "UniversalEntityID")
    return PatientIssuer(
        local_id=_text(item, "LocalNamespaceEntityID"),
        universal_id=universal_id,
        universal_id_type=_text(item, "UniversalEntityIDType") if universal_id else "",
    )


def _name_groups(value: object) -> tuple[tuple[str, ...], ...]:
    """Split a PN value into its component groups and five components (PS3.5 §6.2.1.1)."""
    if value is None:
        return ()
    name = value if isinstance(value, PersonName) else PersonName(str(value))
    groups = []
    for group in name.components:
        components = [part.strip() for part in group.split("^")][:5]
        groups.append(tuple(components + [""] * (5 - len(components))))
    return tuple(groups)


def _valid_date(value: str) -> str:
    return value if _DA.match(value) else ""


def _code_items(dataset: Dataset) -> Iterator[Dataset]:
    """Procedure code items, most specific first: requested procedure, then performed."""
    yield from dataset.get("RequestedProcedureCodeSequence") or []
    for request in dataset.get("RequestAttributesSequence") or []:
        yield from request.get("RequestedProcedureCodeSequence") or []
    yield from dataset.get("ProcedureCodeSequence") or []


def _procedure_code(dataset: Dataset) -> CodedConcept | None:
    for item in _code_items(dataset):
        value = (
            _text(item, "CodeValue") or _text(item, "LongCodeValue") or _text(item, "URNCodeValue")
        )
        if value:
            return CodedConcept(
                value=value,
                scheme=_text(item, "CodingSchemeDesignator"),
                meaning=_text(item, "CodeMeaning"),
            )
    return None


def _procedure_text(dataset: Dataset) -> str:
    """Study Description, else the requested procedure's, else modality and body part."""
    for keyword in ("StudyDescription", "RequestedProcedureDescription"):
        if text := _text(dataset, keyword):
            return text
    for request in dataset.get("RequestAttributesSequence") or []:
        if text := _text(request, "RequestedProcedureDescription"):
            return text
    parts = (_text(dataset, "Modality"), _text(dataset, "BodyPartExamined"))
    return " ".join(part for part in parts if part)


def _observation_time(dataset: Dataset) -> str:
    """HL7 DTM (§2.A.22) for the first DICOM date/time pair present, with (0008,0201) offset."""
    offset = _text(dataset, "TimezoneOffsetFromUTC")
    offset = offset if _TIMEZONE_OFFSET.match(offset) else ""
    for date_keyword, time_keyword in _OBSERVATION_DATE_TIMES:
        date = _valid_date(_text(dataset, date_keyword))
        if date:
            return date + _dicom_time_to_dtm(_text(dataset, time_keyword)) + offset
    return ""


def _dicom_time_to_dtm(value: str) -> str:
    """DICOM TM ``HH[MM[SS[.FFFFFF]]]`` (or ACR-NEMA ``HH:MM:SS``) to the DTM time part.

    HL7 DTM carries at most four fractional digits; extra digits are cut, not rounded.
    """
    match = _TM.match(value.replace(":", ""))
    if not match:
        return ""
    hours, minutes, seconds, fraction = match.groups()
    text = hours + (minutes or "") + (seconds or "")
    if seconds and fraction:
        text += "." + fraction[:4]
    return text
