"""The PID segment of the node's ORU^R01 (HL7 v2.5 §3.4.2) from the source study.

PID-3 (patient identifier list, CX §2.A.14) is required by HL7. Emergency and unknown patients
often arrive without a Patient ID, so the identifier is the first usable of:

1. Patient ID (0010,0020) with Issuer of Patient ID (0010,0021) and its qualifiers in CX-4;
   sent as today, without CX-5, so a HIS keeps matching it as it always has;
2. an Other Patient ID (0010,1002 items in order, then the retired 0010,1000 values) with its
   issuer in CX-4 and CX-5 ``PI`` (patient internal identifier, HL7 table 0203): an id
   another domain (the issuer) gave the same patient;
3. the Accession Number (0008,0050) with Issuer of Accession Number (0008,0051) in CX-4 and
   CX-5 ``ACSN`` (accession id): HL7 table 0203 is user-defined in v2.5 and ACSN is the code
   the table gained in v2.7 for exactly this; a HIS that files results by order finds it.

An HL7 destination with ``require_patient_id = true`` accepts only 1 and 2: a study with
neither gets no ORU there (the delivery is dead-lettered with the reason). Without any
usable identifier the message cannot be valid and is never sent with an empty PID-3.

Identifiers are never cut: a shortened id could name another patient. One longer than DICOM's
LO (64 characters) broke its VR at the source and is not used. Names are cut to the HL7 v2.5
component lengths (§2.A.88 XPN, §2.A.30 FN), so a 65,009-character Patient's Name still gives a
valid message.
"""

from __future__ import annotations

from dataclasses import dataclass

from hl7_out.dicom_source import PatientIssuer, SourceStudy
from hl7_out.encoding import (
    REPETITION_SEPARATOR,
    SUBCOMPONENT_SEPARATOR,
    escape_text,
    fit_escaped,
    join_components,
)
from hl7_out.er7 import Er7Segment

# HL7 v2.5 §2.A.36 HD-1 (IS) is at most 20 characters.
MAX_NAMESPACE_ID_LENGTH = 20
# DICOM LO (PS3.5 Table 6.2-1): a longer identifier broke its VR at the source.
MAX_IDENTIFIER_LENGTH = 64
# hl7apy holds every ST component to 199 characters (HL7 v2.5 ST, §2.A.74).
MAX_ST_LENGTH = 199
# HL7 v2.5 XPN components in DICOM PN order (family, given, middle, prefix, suffix):
# FN-1 surname 50 (§2.A.30), XPN-2 and XPN-3 30, XPN-5 prefix and XPN-4 suffix 20.
_NAME_COMPONENT_LENGTHS = (50, 30, 30, 20, 20)
_NAME_REPRESENTATIONS = ("A", "I", "P")  # HL7 table 0465, in DICOM PN group order
_SEXES = {"M": "M", "F": "F", "O": "O"}  # HL7 table 0001; DICOM (0010,0040) uses M, F, O

IDENTIFIER_TYPE_OTHER_PATIENT_ID = "PI"  # HL7 table 0203: patient internal identifier
IDENTIFIER_TYPE_ACCESSION = "ACSN"  # HL7 table 0203 (v2.7): accession id


@dataclass(frozen=True)
class PatientIdentifier:
    """What PID-3 carries, unescaped, and which DICOM attribute it came from."""

    value: str
    issuer: PatientIssuer
    type_code: str  # CX-5, HL7 table 0203; "" for the Patient ID itself
    source: str  # e.g. "Patient ID (0010,0020)", for logs and reasons


def patient_identifier(study: SourceStudy, require_patient_id: bool) -> PatientIdentifier | None:
    """PID-3's identifier by the order above, or None when the study has no usable one."""
    candidates = [
        PatientIdentifier(study.patient_id, study.issuer, "", "Patient ID (0010,0020)"),
        *(
            PatientIdentifier(
                other.value, other.issuer, IDENTIFIER_TYPE_OTHER_PATIENT_ID, "Other Patient IDs"
            )
            for other in study.other_patient_ids
        ),
    ]
    if not require_patient_id:
        candidates.append(
            PatientIdentifier(
                study.accession_number,
                study.accession_issuer,
                IDENTIFIER_TYPE_ACCESSION,
                "Accession Number (0008,0050)",
            )
        )
    return next((c for c in candidates if usable_identifier(c.value)), None)


def missing_identifier_reason(require_patient_id: bool) -> str:
    """Why no ORU can be built, naming no patient (outbox ``last_error``)."""
    if require_patient_id:
        return (
            "the study has no Patient ID (0010,0020) or Other Patient IDs (0010,1002) and the "
            "destination requires a patient id (require_patient_id): PID-3 would be empty"
        )
    return (
        "the study has no Patient ID (0010,0020), Other Patient IDs (0010,1002) or Accession "
        "Number (0008,0050): PID-3 is required"
    )


def usable_identifier(value: str) -> bool:
    return bool(value) and len(value) <= MAX_IDENTIFIER_LENGTH


def fill_pid(pid: Er7Segment, study: SourceStudy, identifier: PatientIdentifier) -> None:
    """HL7 v2.5 §3.4.2 PID: PID-3 CX with assigning authority, PID-5 XPN, PID-7, PID-8."""
    pid[1] = "1"
    pid[3] = join_components(
        escape_text(identifier.value),
        "",
        "",
        assigning_authority(identifier.issuer),
        identifier.type_code,
    )
    pid[5] = REPETITION_SEPARATOR.join(patient_names(study))
    if study.birth_date:
        pid[7] = study.birth_date
    pid[8] = _SEXES.get(study.sex, "U")


def assigning_authority(issuer: PatientIssuer) -> str:
    """CX-4 (HD, §2.A.36) from an issuer and its qualifiers.

    A local issuer longer than HD-1 allows goes into HD-2 with type L (HL7 table 0301,
    locally defined) when the qualifiers give no universal id. An issuer that broke its DICOM
    VR (longer than LO) is left out rather than cut.
    """
    local_id = escape_text(issuer.local_id) if usable_identifier(issuer.local_id) else ""
    universal_id = issuer.universal_id if usable_identifier(issuer.universal_id) else ""
    universal_type = escape_text(issuer.universal_id_type) if universal_id else ""
    universal_id = escape_text(universal_id)
    if len(local_id) > MAX_NAMESPACE_ID_LENGTH:
        if not universal_id:
            universal_id, universal_type = local_id, "L"
        local_id = ""
    return join_components(local_id, universal_id, universal_type, separator=SUBCOMPONENT_SEPARATOR)


def patient_names(study: SourceStudy) -> list[str]:
    """PID-5 XPN repetitions (§2.A.88) from the DICOM PN component groups.

    DICOM orders family^given^middle^prefix^suffix; XPN orders family^given^middle^suffix^
    prefix. Ideographic and phonetic groups become further repetitions with XPN-8 I and P.
    Each component is cut to its HL7 length. No name at all is sent as XPN-7 name type U
    (unspecified, HL7 table 0200).
    """
    groups = [
        (code, group)
        for code, group in zip(_NAME_REPRESENTATIONS, study.name_groups, strict=False)
        if any(group)
    ]
    names = []
    for code, group in groups:
        family, given, middle, prefix, suffix = (
            fit_escaped(part, limit)
            for part, limit in zip(group, _NAME_COMPONENT_LENGTHS, strict=True)
        )
        representation = code if len(groups) > 1 else ""
        names.append(join_components(family, given, middle, suffix, prefix, "", "", representation))
    return names or ["^^^^^^U"]
