"""HL7 v2.5 ORU^R01 (§7.3.1 "Unsolicited transmission of an observation message") for a report.

Message layout::

    MSH                         §2.15.9  header, MSH-18 UNICODE UTF-8
    PID                         §3.4.2   from the DICOM Patient Module (hl7_out.pid: PID-3
                                         falls back to Other Patient IDs, the accession number)
    PV1                         §3.4.3   patient class U (unknown)
    ORC                         §4.5.1   RE, order numbers, ORC-7.6 priority
    OBR                         §7.4.1   procedure, times, status P or C, priority
    NTE...                      §2.15.10 what the result is: test-model banner, scope notice
                                         (out of scope only), AI disclaimer, model identity,
                                         the comparison with the prior
    [TQ1]                       §4.5.4   TQ1-9 priority, when one is known
    OBX (one OBSERVATION group  §7.4.2   TX, one report line each, LOINC section code,
         per report line)...             OBX-11 P or C

The message is composed as ER7 text with every segment ended by CR (§2.5.1, hl7_out.er7),
then parsed back by hl7apy at STRICT validation and the parsed message validated: a message
that is returned is one a strict HL7 v2.5 parser reads as it was meant. Nothing in it depends
on the clock: the same report, source, header, control id and message time always give the
same characters, so a re-sent outbox row is byte-identical.

Result status (OBR-25, HL7 table 0123; OBX-11, table 0085): P (preliminary: an AI result waits
for a radiologist) for a study's first report, C (correction) for a report that supersedes an
earlier one of the same study: a new study version (late instances) or a conversation
appended to the report. Values from the source study are cut to their HL7 lengths; library
error text, which can quote those values, never reaches an OruBuildError.

``OruHeader`` carries what the receiving side configures (MSH-3..6, MSH-11, where the order
number comes from); an HL7 destination gives its own (``OruHeader.of(destination)``), the .hl7
file a file destination writes uses the defaults. ``hl7_control_id`` makes MSH-10.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.exceptions import HL7apyException
from hl7apy.parser import parse_message
from pydicom import Dataset

from config.settings import HL7Destination
from core.errors import HL7Error
from hl7_out.dicom_source import CodedConcept, SourceStudy, read_source_study
from hl7_out.encoding import (
    ENCODING_CHARACTERS,
    FIELD_SEPARATOR,
    escape_text,
    escaped_length,
    fit_escaped,
    format_dtm,
    join_components,
)
from hl7_out.er7 import Er7Message, Er7Segment
from hl7_out.pid import (
    MAX_NAMESPACE_ID_LENGTH,
    MAX_ST_LENGTH,
    PatientIdentifier,
    fill_pid,
    missing_identifier_reason,
    patient_identifier,
    usable_identifier,
)
from storage.report_schema import (
    AI_DISCLAIMER,
    TEST_MODEL_BANNER,
    Finding,
    ParseStatus,
    ReportContent,
    ReportDocument,
    Urgency,
    follow_up_text,
)

HL7_VERSION = "2.5"
MESSAGE_TYPE = "ORU^R01^ORU_R01"
CHARACTER_SET = "UNICODE UTF-8"  # HL7 table 0211
RESULT_STATUS_PRELIMINARY = "P"  # HL7 table 0123 (OBR-25), table 0085 (OBX-11)
RESULT_STATUS_CORRECTED = "C"  # same tables: a correction replacing an earlier result
ORDER_CONTROL_RESULTS = "RE"  # HL7 table 0119: observations/performed service to follow
PATIENT_CLASS_UNKNOWN = "U"  # HL7 table 0004

# MSH-10 is ST with a length of 20 in HL7 v2.5 §2.15.9.10.
MAX_CONTROL_ID_LENGTH = 20
# hl7apy types OBX-5 ("varies") as ST and limits it to 199 characters at STRICT level, in
# building and in parsing; longer report lines are carried over several OBX segments.
MAX_OBX_TEXT_LENGTH = 199

_CONTROL_ID = re.compile(r"^[\x21-\x7e]+$")


class OruBuildError(HL7Error, ValueError):
    """The inputs cannot make a valid ORU^R01; ``str()`` says which field and why."""


@dataclass(frozen=True)
class OruHeader:
    """The receiver-facing header values of an ORU^R01.

    MSH-3..6 sending/receiving application and facility (HD-1, at most 20 characters),
    MSH-11 processing id (HL7 table 0103: P production, T training, D debugging), and
    ``placer_from``: the order number (ORC-2/3, OBR-2/3) from the Accession Number or the
    Study Instance UID. The defaults are those of an HL7 destination left unconfigured.
    """

    sending_application: str = "MEDGEMMA"
    sending_facility: str = "MEDGEMMA"
    receiving_application: str = "HIS"
    receiving_facility: str = "HOSPITAL"
    processing_id: Literal["P", "T", "D"] = "P"
    placer_from: Literal["accession", "study_uid"] = "accession"
    # PID-3 only from Patient ID or Other Patient IDs, never the accession number (hl7_out.pid).
    require_patient_id: bool = False

    @classmethod
    def of(cls, destination: HL7Destination) -> OruHeader:
        return cls(
            sending_application=destination.sending_application,
            sending_facility=destination.sending_facility,
            receiving_application=destination.receiving_application,
            receiving_facility=destination.receiving_facility,
            processing_id=destination.processing_id,
            placer_from=destination.placer_from,
            require_patient_id=destination.require_patient_id,
        )


def hl7_control_id(
    study_uid: str, report_id: int, destination: str, installation_id: str | None = None
) -> str:
    """MSH-10, at most 20 characters (HL7 v2.5 §2.15.9.10), fixed per report and destination.

    Derived from the installation id (storage.installation), the Study Instance UID and the
    report id, so two nodes, or one node after a database reset, never reuse a control id at
    the same HIS, while a rebuild on the same installation keeps it.
    """
    key = f"{study_uid}|{report_id}|{destination}"
    if installation_id is not None:
        key = f"{installation_id}|{key}"
    digest = hashlib.sha256(key.encode()).hexdigest()
    return f"MG{digest[:18].upper()}"


@dataclass(frozen=True)
class ObservationCode:
    """An OBX-3 observation identifier (CE, HL7 v2.5 §2.A.8) in LOINC."""

    code: str
    text: str
    coding_system: str = "LN"

    def to_er7(self) -> str:
        return join_components(self.code, escape_text(self.text), self.coding_system)


# LOINC radiology report sections (DICOM PS3.16 CID 7001 Diagnostic Imaging Report Headings).
FINDINGS = ObservationCode("18782-3", "Radiology Study observation (narrative)")
IMPRESSION = ObservationCode("19005-8", "Radiology Imaging study [Impression] (narrative)")
RECOMMENDATION = ObservationCode("18783-1", "Radiology Study recommendation (narrative)")


@dataclass(frozen=True)
class ObservationLine:
    """One OBX-5 text value (unescaped) and the report section it belongs to."""

    section: ObservationCode
    text: str


# HL7 table 0027 priority, ordered by how soon: Stat before ASAP before Routine.
PRIORITY_STAT = "S"
PRIORITY_ASAP = "A"
PRIORITY_ROUTINE = "R"
_PRIORITY_RANK = {PRIORITY_ROUTINE: 0, PRIORITY_ASAP: 1, PRIORITY_STAT: 2}
_PRIORITY_NAMES = {PRIORITY_STAT: "Stat", PRIORITY_ASAP: "ASAP", PRIORITY_ROUTINE: "Routine"}
# DICOM (0040,1003) Requested Procedure Priority and retired (0032,000C) Study Priority ID.
_DICOM_PRIORITIES = {
    "STAT": PRIORITY_STAT,
    "HIGH": PRIORITY_ASAP,
    "ROUTINE": PRIORITY_ROUTINE,
    "MEDIUM": PRIORITY_ROUTINE,
    "MED": PRIORITY_ROUTINE,
    "LOW": PRIORITY_ROUTINE,
}
_URGENCY_PRIORITIES = {Urgency.CRITICAL: PRIORITY_STAT, Urgency.URGENT: PRIORITY_ASAP}
# HL7 table 0078 abnormal flags: A abnormal, AA very abnormal (critical).
_URGENCY_ABNORMAL_FLAGS = {Urgency.URGENT: "A", Urgency.CRITICAL: "AA"}
_EMPTY_RESULT_TEXT = {
    "en": "The model produced no report text.",
    "zh": "模型未生成报告文本。",
}


def build_oru(
    report: ReportDocument,
    source: Dataset,
    header: OruHeader,
    control_id: str,
    message_time: datetime,
) -> str:
    """Build and strictly validate the ORU^R01 for ``report`` (HL7 v2.5 §7.3.1).

    ``source`` is one instance of the study (its Patient and Study modules are read);
    ``control_id`` becomes MSH-10 and ``message_time`` MSH-7, both fixed per outbox row.
    Returns ER7 text, segments ended by CR; encode it as UTF-8 (MSH-18).

    Raises OruBuildError when the inputs cannot make a valid message (no identifier for PID-3,
    a control id that is not 1-20 printable ASCII characters, settings values too long for
    their field). Its text never quotes a value of the source study.
    """
    _check_control_id(control_id)
    study = read_source_study(source)
    identifier = patient_identifier(study, header.require_patient_id)
    if identifier is None:
        raise OruBuildError(missing_identifier_reason(header.require_patient_id))
    try:
        text = _assemble(report, study, identifier, header, control_id, message_time).to_er7()
        # The strict parse checks each field's datatype and length, validate() the message
        # structure and its required fields (hl7_out.er7).
        parse_message(text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True).validate()
    except OruBuildError:
        raise
    except (HL7apyException, ValueError) as exc:
        # hl7apy's text quotes the offending value (a patient's name, say): only its kind. A
        # date or number it cannot read is a ValueError of its own.
        raise OruBuildError(f"ORU^R01 failed strict validation ({type(exc).__name__})") from None
    return text


def result_status(report: ReportDocument) -> str:
    """OBR-25 and OBX-11: C for a report superseding an earlier one of the study, else P."""
    if report.supersedes_report_id is not None:
        return RESULT_STATUS_CORRECTED
    return RESULT_STATUS_PRELIMINARY


def observation_lines(content: ReportContent) -> list[ObservationLine]:
    """The report's lines in OBX order: findings, impression, recommendation.

    A result without structured sections (parse_status other than ok, or ok with all sections
    empty) is sent as its narrative under the findings code. Blank lines are dropped and
    trailing spaces removed (HL7 v2.5 §2.A.80 TX: leading spaces are significant, trailing
    ones are not).
    """
    lines = _structured_lines(content) if content.parse_status == ParseStatus.OK else []
    if lines and content.follow_up:
        # Follow-up questions appended from a conversation; a narrative-only result carries
        # them in its narrative already.
        qa_text = follow_up_text(content.follow_up)
        lines += [ObservationLine(FINDINGS, line) for line in _text_lines(qa_text)]
    if not lines:
        lines = [ObservationLine(FINDINGS, text) for text in _text_lines(content.narrative)]
    if not lines:
        language = content.language.split("-")[0].lower()
        empty_text = _EMPTY_RESULT_TEXT.get(language, _EMPTY_RESULT_TEXT["en"])
        lines = [ObservationLine(FINDINGS, empty_text)]
    return lines


def wrap_line(text: str, max_escaped_length: int = MAX_OBX_TEXT_LENGTH) -> list[str]:
    """Cut ``text`` into pieces whose escaped form fits one OBX-5; ``"".join`` restores it.

    Cuts go before a space where there is one (the space starts the next piece: leading
    spaces are kept by TX receivers, §2.A.80), else at the length limit.
    """
    pieces: list[str] = []
    start = 0
    while escaped_length(text[start:]) > max_escaped_length:
        end = _longest_fitting_end(text, start, max_escaped_length)
        cut = _cut_before_spaces(text, start, end)
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def result_priority(order_priority: str, urgency: Urgency | None) -> str:
    """The priority to send (HL7 table 0027): the order's, raised by the model's urgency.

    Critical raises to S (stat), urgent to A (ASAP). A routine or missing urgency never changes
    the order's priority, and an order priority outside S/A/R (P, C, T) is kept as it is, since
    it cannot be ranked against stat or ASAP. Nothing is sent when neither is known, so the HIS
    keeps the priority it has.
    """
    raised = _URGENCY_PRIORITIES.get(urgency) if urgency else None
    if raised is None:
        return order_priority
    if not order_priority:
        return raised
    if order_priority not in _PRIORITY_RANK:
        return order_priority
    return max(order_priority, raised, key=_PRIORITY_RANK.__getitem__)


def _check_control_id(control_id: str) -> None:
    if not _CONTROL_ID.match(control_id) or len(control_id) > MAX_CONTROL_ID_LENGTH:
        raise OruBuildError(
            f"control id {control_id!r} must be 1-{MAX_CONTROL_ID_LENGTH} printable ASCII "
            "characters without spaces"
        )
    if any(char in control_id for char in FIELD_SEPARATOR + ENCODING_CHARACTERS):
        raise OruBuildError(f"control id {control_id!r} contains an HL7 delimiter")


def _assemble(
    report: ReportDocument,
    study: SourceStudy,
    identifier: PatientIdentifier,
    header: OruHeader,
    control_id: str,
    message_time: datetime,
) -> Er7Message:
    """The segments in ORU_R01's structure order (§7.3.1): PATIENT_RESULT (PATIENT: PID,
    VISIT: PV1), ORDER_OBSERVATION (ORC, OBR, NTE..., TIMING_QTY: TQ1, OBSERVATION: OBX...)."""
    message = Er7Message()
    _fill_msh(message.add_segment("MSH"), header, control_id, message_time)
    fill_pid(message.add_segment("PID"), study, identifier)
    _fill_pv1(message.add_segment("PV1"), study)
    order_number = _order_number(report, study, header)
    priority = result_priority(
        _DICOM_PRIORITIES.get(study.requested_priority, ""), report.content.urgency
    )
    _fill_orc(message.add_segment("ORC"), order_number, priority)
    _fill_obr(message.add_segment("OBR"), report, study, order_number, priority)
    _add_notes(message, report)
    if priority:
        _add_timing(message, priority)
    _add_observations(message, report)
    return message


def _fill_msh(msh: Er7Segment, header: OruHeader, control_id: str, message_time: datetime) -> None:
    """HL7 v2.5 §2.15.9 MSH; MSH-15/16 empty: original acknowledgment mode (§2.9.2)."""
    msh[3] = _namespace_id(header.sending_application, "sending_application")
    msh[4] = _namespace_id(header.sending_facility, "sending_facility")
    msh[5] = _namespace_id(header.receiving_application, "receiving_application")
    msh[6] = _namespace_id(header.receiving_facility, "receiving_facility")
    msh[7] = format_dtm(message_time)
    msh[9] = MESSAGE_TYPE
    msh[10] = control_id
    msh[11] = header.processing_id
    msh[12] = HL7_VERSION
    msh[18] = CHARACTER_SET


def _namespace_id(value: str, setting: str) -> str:
    """HD-1 namespace id (IS, at most 20 characters, §2.A.36) from a header setting."""
    escaped = escape_text(value.strip())
    if not escaped or len(escaped) > MAX_NAMESPACE_ID_LENGTH:
        raise OruBuildError(
            f"{setting} {value!r} must be 1-{MAX_NAMESPACE_ID_LENGTH} characters (HL7 HD-1)"
        )
    return escaped


def _fill_pv1(pv1: Er7Segment, study: SourceStudy) -> None:
    """HL7 v2.5 §3.4.3 PV1. PV1-2 is U: an imaging study does not say whether the patient is
    an inpatient, outpatient or emergency case, and a guessed class could misroute the result
    in the HIS. PV1-19 visit number from DICOM Admission ID (0038,0010) when present."""
    pv1[1] = "1"
    pv1[2] = PATIENT_CLASS_UNKNOWN
    if usable_identifier(study.admission_id):
        pv1[19] = escape_text(study.admission_id)


def _order_number(report: ReportDocument, study: SourceStudy, header: OruHeader) -> str:
    """Placer and filler order number (EI-1, §2.A.24) per ``placer_from``.

    ``accession`` uses the Accession Number (0008,0050) and falls back to the Study Instance
    UID when the study has none (or one that broke its DICOM VR); ``study_uid`` always uses the
    Study Instance UID.
    """
    if header.placer_from == "accession" and usable_identifier(study.accession_number):
        return escape_text(study.accession_number)
    return escape_text(report.study_instance_uid or study.study_instance_uid)


def _fill_orc(orc: Er7Segment, order_number: str, priority: str) -> None:
    """HL7 v2.5 §4.5.1 ORC: ORC-1 RE, ORC-2/3 order numbers, ORC-7.6 priority (TQ)."""
    orc[1] = ORDER_CONTROL_RESULTS
    orc[2] = order_number
    orc[3] = order_number
    if priority:
        orc[7] = _timing_quantity(priority)


def _timing_quantity(priority: str) -> str:
    """TQ (§2.A.81) carrying only TQ-6 priority."""
    return join_components("", "", "", "", "", priority)


def _fill_obr(
    obr: Er7Segment, report: ReportDocument, study: SourceStudy, order_number: str, priority: str
) -> None:
    """HL7 v2.5 §7.4.1 OBR.

    OBR-4 procedure, OBR-5 and OBR-27.6 priority (both kept in v2.5 for backward
    compatibility, beside TQ1-9), OBR-7 when the images were made, OBR-22 when the result was
    made, OBR-25 P (preliminary) or C (correction, ``result_status``).
    """
    obr[1] = "1"
    obr[2] = order_number
    obr[3] = order_number
    obr[4] = _universal_service_id(study)
    if priority:
        obr[5] = priority
    if study.observation_time:
        obr[7] = study.observation_time
    obr[22] = format_dtm(report.created_at)
    obr[25] = result_status(report)
    if priority:
        obr[27] = _timing_quantity(priority)


def _universal_service_id(study: SourceStudy) -> str:
    """OBR-4 (CE, §2.A.8): the procedure code when the study has one, else its description.
    The text (CE-2) is cut to its length; a code value or scheme that broke its DICOM VR
    (SH 16, longer than LO 64 here) is not used."""
    code: CodedConcept | None = study.procedure_code
    if code is not None and usable_identifier(code.value) and usable_identifier(code.scheme):
        return join_components(
            escape_text(code.value),
            fit_escaped(code.meaning or study.procedure_text, MAX_ST_LENGTH),
            escape_text(code.scheme),
        )
    return join_components("", fit_escaped(study.procedure_text or "Imaging study", MAX_ST_LENGTH))


def _add_notes(message: Er7Message, report: ReportDocument) -> None:
    """NTE (§2.15.10) after OBR: what this result is, in the order a reader should see it."""
    for set_id, text in enumerate(_note_texts(report), start=1):
        nte = message.add_segment("NTE")
        nte[1] = str(set_id)
        nte[3] = escape_text(text)
        nte[4] = "RE^Remark^HL70364"


def _note_texts(report: ReportDocument) -> list[str]:
    model = report.model
    notes = [TEST_MODEL_BANNER] if model.is_test_model else []
    if report.scope_notice:
        notes.append(report.scope_notice)  # "Outside the validated scope: <reason>"
    notes.append(AI_DISCLAIMER)
    notes.append(
        f"Model: {model.model_id}; revision: {model.revision}; device: {model.device}; "
        f"dtype: {model.dtype}; quantization: {model.quantization}; "
        f"generated: {report.created_at.isoformat()}"
    )
    if report.prior is not None:  # [priors]: what was compared, or why no prior was
        comparison = report.prior.statement(report.content.language)
        if report.content.comparison:
            comparison += " " + " ".join(report.content.comparison.split())
        notes.append(comparison)
    return notes


def _add_timing(message: Er7Message, priority: str) -> None:
    """TQ1 (§4.5.4), the v2.5 home of the priority: TQ1-9 (CWE, HL7 table 0485)."""
    tq1 = message.add_segment("TQ1")
    tq1[1] = "1"
    tq1[9] = join_components(priority, _PRIORITY_NAMES.get(priority, ""), "HL70485")


def _add_observations(message: Er7Message, report: ReportDocument) -> None:
    """One OBX (§7.4.2) per report line, each in its own OBSERVATION group.

    OBX-2 TX, OBX-3 the LOINC section, OBX-4 a sub-id unique in the message, OBX-5 the escaped
    text, OBX-8 the abnormal flag for urgent (A) and critical (AA) results, OBX-11 P or C.
    """
    urgency = report.content.urgency
    status = result_status(report)
    abnormal_flag = _URGENCY_ABNORMAL_FLAGS.get(urgency) if urgency else None
    pieces = [
        (line.section, piece)
        for line in observation_lines(report.content)
        for piece in wrap_line(line.text)
    ]
    for set_id, (section, text) in enumerate(pieces, start=1):
        obx = message.add_segment("OBX")
        obx[1] = str(set_id)
        obx[2] = "TX"
        obx[3] = section.to_er7()
        obx[4] = str(set_id)
        obx[5] = escape_text(text)
        if abnormal_flag:
            obx[8] = abnormal_flag
        obx[11] = status


def _structured_lines(content: ReportContent) -> list[ObservationLine]:
    lines = [
        ObservationLine(FINDINGS, text)
        for finding in content.findings
        for text in _text_lines(finding_text(finding))
    ]
    lines += [ObservationLine(IMPRESSION, text) for text in _text_lines(content.impression)]
    lines += [ObservationLine(RECOMMENDATION, text) for text in _text_lines(content.recommendation)]
    return lines


def finding_text(finding: Finding) -> str:
    """One finding as a line: ``label (location, size mm, density, boundary)``."""
    size = f"{finding.size_mm:g} mm" if finding.size_mm is not None else None
    details = [
        part.strip()
        for part in (finding.location, size, finding.density, finding.boundary)
        if part and part.strip()
    ]
    label = finding.label.strip()
    text = f"{label} ({', '.join(details)})" if details else label
    return f"{text} [{finding.change.value} since prior]" if finding.change else text


def _text_lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.splitlines() if line.strip()]


def _cut_before_spaces(text: str, start: int, end: int) -> int:
    """Where to cut ``text[start:end]``: before the last run of spaces in it, else at end."""
    space = text.rfind(" ", start + 1, end + 1)
    if space <= start:
        return end
    while space - 1 > start and text[space - 1] == " ":
        space -= 1
    return space


def _longest_fitting_end(text: str, start: int, max_escaped_length: int) -> int:
    """The largest end such that ``text[start:end]`` escapes to at most the limit."""
    length = 0
    end = start
    while end < len(text):
        length += escaped_length(text[end])
        if length > max_escaped_length:
            break
        end += 1
    return end
