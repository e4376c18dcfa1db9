"""ORU^R01 builder: every message parses with hl7apy (strict) and the hl7 package, the text
round-trips, and the header, patient and order fields come from the inputs."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import hl7
import pydicom
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom import Dataset
from pydicom.data import get_testdata_file

from config.settings import HL7Destination
from hl7_out.encoding import escape_text, unescape_text
from hl7_out.oru import (
    FINDINGS,
    IMPRESSION,
    MAX_OBX_TEXT_LENGTH,
    RECOMMENDATION,
    OruBuildError,
    OruHeader,
    build_oru,
    hl7_control_id,
    observation_lines,
    wrap_line,
)
from storage.report_schema import (
    AI_DISCLAIMER,
    TEST_MODEL_BANNER,
    Finding,
    ModelIdentity,
    ParseStatus,
    ReportContent,
    ReportDocument,
    Urgency,
)

MESSAGE_TIME = datetime(2024, 5, 1, 10, 0, 1, tzinfo=UTC)
CREATED_AT = datetime(2024, 5, 1, 18, 0, 0, tzinfo=timezone(timedelta(hours=8)))
SPECIAL = "Pipe | caret ^ amp & tilde ~ backslash \\ and a literal \\F\\ and \\E\\ and C:\\T\\x"
CHINESE_FINDINGS = "右肺上叶结节，直径约8毫米，边界清楚。"
CHINESE_IMPRESSION = "右肺上叶结节"


@pytest.fixture
def source() -> Dataset:
    path = get_testdata_file("RG1_UNCI.dcm", download=False)
    if path is None:
        pytest.fail("RG1_UNCI.dcm is not bundled; install pydicom-data")
    return pydicom.dcmread(str(path), stop_before_pixels=True)


@pytest.fixture
def destination() -> HL7Destination:
    return HL7Destination(
        kind="hl7",
        name="his",
        host="127.0.0.1",
        port=2575,
        sending_application="MEDGEMMA",
        sending_facility="XRAY1",
        receiving_application="HIS",
        receiving_facility="GENERAL",
        processing_id="T",
    )


def make_report(content: ReportContent, *, is_test_model: bool = False) -> ReportDocument:
    return ReportDocument(
        report_id=7,
        study_instance_uid="1.3.6.1.4.1.5962.1.2.9.20040826185059.5457",
        version_number=1,
        created_at=CREATED_AT,
        content=content,
        model=ModelIdentity(
            model_id="google/medgemma-1.5-4b-it",
            revision="0123abcd",
            dtype="bfloat16",
            device="cuda:0",
            is_test_model=is_test_model,
        ),
    )


def findings_content(urgency: Urgency | None = Urgency.ROUTINE) -> ReportContent:
    return ReportContent(
        parse_status=ParseStatus.OK,
        findings=[
            Finding(label="nodule", location="right upper lobe", size_mm=8.0, density="solid"),
            Finding(label="pleural effusion", location="left"),
        ],
        impression="Solitary pulmonary nodule.\nSmall left effusion.",
        recommendation="CT chest in 3 months.",
        urgency=urgency,
    )


def chinese_content() -> ReportContent:
    return ReportContent(
        parse_status=ParseStatus.OK,
        language="zh",
        findings=[Finding(label="结节", location="右肺上叶", size_mm=8, boundary="边界清楚")],
        impression=CHINESE_IMPRESSION,
        recommendation="建议3个月后复查胸部CT。",
        urgency=Urgency.URGENT,
    )


def narrative_content(narrative: str) -> ReportContent:
    return ReportContent(parse_status=ParseStatus.NARRATIVE_ONLY, narrative=narrative)


def segments(message: str) -> list[str]:
    assert message.endswith("\r")
    return message[:-1].split("\r")


def segment_ids(message: str) -> list[str]:
    return [segment[:3] for segment in segments(message)]


def fields(message: str, segment_id: str) -> list[list[str]]:
    """Raw ER7 fields of each segment ``segment_id``; index n is field n (MSH: n-1)."""
    return [s.split("|") for s in segments(message) if s.startswith(segment_id + "|")]


def component(segment_fields: list[str], field: int, index: int) -> str:
    """Component ``index`` (1-based) of a raw field; "" when absent."""
    value = segment_fields[field] if field < len(segment_fields) else ""
    parts = value.split("^")
    return parts[index - 1] if index <= len(parts) else ""


def obx_texts(message: str) -> list[str]:
    """OBX-5 values unescaped by the hl7 package (an implementation independent of ours)."""
    parsed = hl7.parse(message)
    return [parsed.unescape(str(obx(5))) for obx in parsed.segments("OBX")]


def parse_strict(message: str) -> Any:
    parsed = parse_message(message, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    parsed.validate()
    return parsed


def build(report: ReportDocument, source: Dataset, destination: HL7Destination, **kw: Any) -> str:
    header = OruHeader.of(destination)
    return build_oru(
        report, source, header, kw.get("control_id", "MG000042"), kw.get("time", MESSAGE_TIME)
    )


CASES = {
    "findings": findings_content(),
    "narrative": narrative_content("Heart size normal.\n\n  Lungs clear.\nNo effusion."),
    "chinese": chinese_content(),
    "chinese_narrative": narrative_content(CHINESE_FINDINGS + "\n" + CHINESE_IMPRESSION),
    "special": ReportContent(
        parse_status=ParseStatus.OK,
        findings=[Finding(label=SPECIAL)],
        impression=SPECIAL,
        recommendation="a^b&c|d~e\\f",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_message_parses_strictly_and_round_trips(
    case: str, source: Dataset, destination: HL7Destination
) -> None:
    content = CASES[case]
    message = build(make_report(content), source, destination)

    parsed = parse_strict(message)
    order = parsed.oru_r01_patient_result.oru_r01_order_observation
    expected = [line.text for line in observation_lines(content)]
    assert len(order.oru_r01_observation) == len(expected)  # one OBSERVATION group per OBX
    assert all(len(group.children) == 1 for group in order.oru_r01_observation)
    assert obx_texts(message) == expected
    assert [unescape_text(obx[5]) for obx in fields(message, "OBX")] == expected


def test_header_fields(source: Dataset, destination: HL7Destination) -> None:
    message = build(make_report(findings_content()), source, destination, control_id="MG7")

    msh = fields(message, "MSH")[0]
    assert msh[1] == "^~\\&"
    assert msh[2:6] == ["MEDGEMMA", "XRAY1", "HIS", "GENERAL"]
    assert msh[6] == "20240501100001+0000"
    assert msh[8] == "ORU^R01^ORU_R01"
    assert msh[9] == "MG7"
    assert msh[10:12] == ["T", "2.5"]
    assert msh[17] == "UNICODE UTF-8"
    assert str(hl7.parse(message).segment("MSH")(10)) == "MG7"
    assert "\n" not in message


def test_segment_order(source: Dataset, destination: HL7Destination) -> None:
    message = build(make_report(findings_content(Urgency.CRITICAL)), source, destination)

    assert segment_ids(message) == [
        "MSH", "PID", "PV1", "ORC", "OBR", "NTE", "NTE", "TQ1",
        "OBX", "OBX", "OBX", "OBX", "OBX",
    ]  # fmt: skip


def test_observations_carry_sections_codes_and_status(
    source: Dataset, destination: HL7Destination
) -> None:
    message = build(make_report(findings_content()), source, destination)

    obx = fields(message, "OBX")
    assert [o[3].split("^")[0] for o in obx] == ["18782-3"] * 2 + ["19005-8"] * 2 + ["18783-1"]
    assert {o[3].split("^", 1)[1] for o in obx} == {
        f"{code.text}^LN" for code in (FINDINGS, IMPRESSION, RECOMMENDATION)
    }
    assert [o[1] for o in obx] == ["1", "2", "3", "4", "5"]
    assert len({o[4] for o in obx}) == len(obx)  # every OBX its own sub-id
    assert all(o[2] == "TX" and o[11] == "P" for o in obx)
    assert obx_texts(message)[0] == "nodule (right upper lobe, 8 mm, solid)"


def test_chinese_text_arrives_intact(source: Dataset, destination: HL7Destination) -> None:
    message = build(make_report(chinese_content()), source, destination)

    decoded = message.encode("utf-8").decode("utf-8")
    assert obx_texts(decoded) == [
        "结节 (右肺上叶, 8 mm, 边界清楚)",
        CHINESE_IMPRESSION,
        "建议3个月后复查胸部CT。",
    ]
    assert CHINESE_IMPRESSION.encode("utf-8") in message.encode("utf-8")


def test_special_characters_are_escaped_once(source: Dataset, destination: HL7Destination) -> None:
    content = narrative_content("a|b^c&d~e\\f \\S\\")
    message = build(make_report(content), source, destination)

    assert fields(message, "OBX")[0][5] == "a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f \\E\\S\\E\\"
    assert obx_texts(message) == ["a|b^c&d~e\\f \\S\\"]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs"))))
def test_escape_round_trips_through_the_hl7_package(text: str) -> None:
    message = hl7.parse("MSH|^~\\&|A\rNTE|1||" + escape_text(text) + "|RE")

    assert message.unescape(str(message.segment("NTE")(3))) == text
    assert unescape_text(escape_text(text)) == text


def test_escape_turns_control_characters_into_spaces() -> None:
    assert escape_text("a\rb\nc\x0bd\x1ce\tf") == "a b c d e\tf"


def test_patient_fields_match_the_dicom_patient_module(
    source: Dataset, destination: HL7Destination
) -> None:
    message = build(make_report(findings_content()), source, destination)

    pid = hl7.parse(message).segment("PID")
    assert str(pid(3)) == source.PatientID == "9RG1"
    assert str(pid(5)(1)(1)) == source.PatientName.family_name == "CompressedSamples"
    assert str(pid(5)(1)(2)) == source.PatientName.given_name == "RG1"
    assert str(pid(7)) == source.PatientBirthDate == "19400305"
    assert str(pid(8)) == source.PatientSex == "F"
    pid_strict = parse_strict(message).oru_r01_patient_result.oru_r01_patient.pid
    assert pid_strict.pid_3.cx_1.to_er7() == "9RG1"
    assert pid_strict.pid_5.xpn_1.to_er7() == "CompressedSamples"


def test_patient_id_issuer_and_name_order(source: Dataset, destination: HL7Destination) -> None:
    source.IssuerOfPatientID = "HOSP&MRN"
    source.PatientName = "Doe^John^Quincy^Dr^Jr"
    source.PatientSex = ""
    message = build(make_report(findings_content()), source, destination)

    pid = fields(message, "PID")[0]
    assert pid[3] == "9RG1^^^HOSP\\T\\MRN"
    assert pid[5] == "Doe^John^Quincy^Jr^Dr"  # XPN: suffix before prefix
    assert pid[8] == "U"
    parse_strict(message)


def test_ideographic_name_becomes_a_second_repetition(
    source: Dataset, destination: HL7Destination
) -> None:
    source.SpecificCharacterSet = "ISO_IR 192"
    source.PatientName = "Wang^Xiaoming=王^小明"
    message = build(make_report(chinese_content()), source, destination)

    assert fields(message, "PID")[0][5] == "Wang^Xiaoming^^^^^^A~王^小明^^^^^^I"
    parse_strict(message)


def test_no_birth_date_and_long_issuer(source: Dataset, destination: HL7Destination) -> None:
    del source.PatientBirthDate
    source.IssuerOfPatientID = "Regional Hospital Patient Index"
    message = build(make_report(findings_content()), source, destination)

    pid = fields(message, "PID")[0]
    assert pid[7] == ""
    assert pid[3] == "9RG1^^^&Regional Hospital Patient Index&L"
    parse_strict(message)


def test_patient_class_is_unknown(source: Dataset, destination: HL7Destination) -> None:
    message = build(make_report(findings_content()), source, destination)

    assert fields(message, "PV1")[0][2] == "U"


@pytest.mark.parametrize(
    ("placer_from", "accession", "expected"),
    [
        ("accession", "ACC123", "ACC123"),
        ("accession", "", "1.3.6.1.4.1.5962.1.2.9.20040826185059.5457"),
        ("study_uid", "ACC123", "1.3.6.1.4.1.5962.1.2.9.20040826185059.5457"),
    ],
)
def test_order_numbers(
    placer_from: str, accession: str, expected: str, source: Dataset, destination: HL7Destination
) -> None:
    source.AccessionNumber = accession
    configured = destination.model_copy(update={"placer_from": placer_from})
    message = build(make_report(findings_content()), source, configured)

    orc, obr = fields(message, "ORC")[0], fields(message, "OBR")[0]
    assert orc[1] == "RE"
    assert orc[2] == orc[3] == obr[2] == obr[3] == expected


def test_universal_service_id_prefers_the_procedure_code(
    source: Dataset, destination: HL7Destination
) -> None:
    assert fields(build(make_report(findings_content()), source, destination), "OBR")[0][4] == (
        "^THORAX"
    )
    code = Dataset()
    code.CodeValue = "36643-5"
    code.CodingSchemeDesignator = "LN"
    code.CodeMeaning = "XR Chest 2 Views"
    source.RequestedProcedureCodeSequence = [code]
    message = build(make_report(findings_content()), source, destination)

    assert fields(message, "OBR")[0][4] == "36643-5^XR Chest 2 Views^LN"


def test_observation_and_result_times(source: Dataset, destination: HL7Destination) -> None:
    message = build(make_report(findings_content()), source, destination)

    obr = fields(message, "OBR")[0]
    tz = source.TimezoneOffsetFromUTC
    assert obr[7] == source.StudyDate + source.StudyTime + tz == "20040826185059-0400"
    assert obr[22] == "20240501180000+0800"
    assert obr[25] == "P"


@pytest.mark.parametrize(
    ("dicom_priority", "urgency", "expected"),
    [
        (None, None, ""),
        (None, Urgency.ROUTINE, ""),
        (None, Urgency.URGENT, "A"),
        (None, Urgency.CRITICAL, "S"),
        ("ROUTINE", Urgency.ROUTINE, "R"),
        ("ROUTINE", Urgency.URGENT, "A"),
        ("HIGH", Urgency.CRITICAL, "S"),
        ("STAT", Urgency.URGENT, "S"),  # never lowered
        ("STAT", Urgency.ROUTINE, "S"),
        ("STAT", None, "S"),
    ],
)
def test_urgency_raises_priority_never_lowers(
    dicom_priority: str | None,
    urgency: Urgency | None,
    expected: str,
    source: Dataset,
    destination: HL7Destination,
) -> None:
    if dicom_priority:
        source.RequestedProcedurePriority = dicom_priority
    message = build(make_report(findings_content(urgency)), source, destination)

    orc, obr = fields(message, "ORC")[0], fields(message, "OBR")[0]
    assert component(orc, 7, 6) == component(obr, 27, 6) == component(obr, 5, 1) == expected
    tq1 = fields(message, "TQ1")
    assert (component(tq1[0], 9, 1) if tq1 else "") == expected
    parse_strict(message)


@pytest.mark.parametrize(
    ("urgency", "flag"),
    [(None, ""), (Urgency.ROUTINE, ""), (Urgency.URGENT, "A"), (Urgency.CRITICAL, "AA")],
)
def test_abnormal_flags(
    urgency: Urgency | None, flag: str, source: Dataset, destination: HL7Destination
) -> None:
    message = build(make_report(findings_content(urgency)), source, destination)

    assert {obx[8] for obx in fields(message, "OBX")} == {flag}


def test_notes_say_what_the_result_is(source: Dataset, destination: HL7Destination) -> None:
    real = build(make_report(findings_content()), source, destination)
    test = build(make_report(findings_content(), is_test_model=True), source, destination)

    real_notes = [hl7.parse(real).unescape(nte[3]) for nte in fields(real, "NTE")]
    test_notes = [hl7.parse(test).unescape(nte[3]) for nte in fields(test, "NTE")]
    assert real_notes[0] == AI_DISCLAIMER
    assert TEST_MODEL_BANNER not in real
    assert test_notes[0] == TEST_MODEL_BANNER
    assert test_notes[1] == AI_DISCLAIMER
    identity = real_notes[1]
    for expected in (
        "google/medgemma-1.5-4b-it",
        "0123abcd",
        "cuda:0",
        "2024-05-01T18:00:00+08:00",
    ):
        assert expected in identity


def test_same_inputs_give_identical_bytes(source: Dataset, destination: HL7Destination) -> None:
    report = make_report(chinese_content())
    first = build(report, source, destination)
    again = build(report.model_copy(deep=True), pydicom.Dataset(source), destination)
    other_id = build(report, source, destination, control_id="MG000043")

    assert first.encode("utf-8") == again.encode("utf-8")
    assert other_id != first
    assert other_id.replace("MG000043", "MG000042") == first


def test_narrative_only_result_gives_obx_lines(
    source: Dataset, destination: HL7Destination
) -> None:
    content = ReportContent(
        parse_status=ParseStatus.NARRATIVE_ONLY,
        narrative="Heart size normal.   \n\n   Lungs clear.\n",
        impression="ignored when the parse failed",
    )
    message = build(make_report(content), source, destination)

    assert obx_texts(message) == ["Heart size normal.", "   Lungs clear."]
    assert {obx[3].split("^")[0] for obx in fields(message, "OBX")} == {FINDINGS.code}


def test_empty_result_still_says_so(source: Dataset, destination: HL7Destination) -> None:
    content = ReportContent(parse_status=ParseStatus.EMPTY, language="zh")
    message = build(make_report(content), source, destination)

    assert obx_texts(message) == ["模型未生成报告文本。"]


def test_long_lines_are_carried_over_several_obx(
    source: Dataset, destination: HL7Destination
) -> None:
    english = " ".join(f"word{i}&" for i in range(120))
    chinese = "右肺上叶结节" * 60
    content = narrative_content(english + "\n" + chinese)
    message = build(make_report(content), source, destination)

    parse_strict(message)
    texts = obx_texts(message)
    assert len(texts) > 2
    assert all(len(obx[5]) <= MAX_OBX_TEXT_LENGTH for obx in fields(message, "OBX"))
    english_pieces = wrap_line(english)
    assert texts[: len(english_pieces)] == english_pieces
    assert "".join(english_pieces) == english
    assert all(piece.startswith(" ") for piece in english_pieces[1:])  # cut before a space
    assert "".join(texts[len(english_pieces) :]) == chinese


def test_invalid_inputs_raise(source: Dataset, destination: HL7Destination) -> None:
    report = make_report(findings_content())
    for control_id in ("", "has space", "A|B", "X" * 21):
        with pytest.raises(OruBuildError):
            build(report, source, destination, control_id=control_id)
    too_long = destination.model_copy(update={"sending_application": "A" * 21})
    with pytest.raises(OruBuildError, match="sending_application"):
        build(report, source, too_long)
    del source.PatientID
    del source.AccessionNumber, source.OtherPatientIDs  # no PID-3 at all (test_oru_field.py)
    with pytest.raises(OruBuildError, match="Patient ID"):
        build(report, source, destination)


def test_naive_times_are_sent_without_offset(source: Dataset, destination: HL7Destination) -> None:
    message = build(
        make_report(findings_content()), source, destination, time=datetime(2024, 5, 1, 9)
    )

    assert fields(message, "MSH")[0][6] == "20240501090000"


def test_default_header_is_that_of_an_unconfigured_hl7_destination(source: Dataset) -> None:
    unconfigured = HL7Destination(kind="hl7", name="his", host="127.0.0.1", port=2575)
    assert OruHeader() == OruHeader.of(unconfigured)
    msh = fields(build(make_report(findings_content()), source, unconfigured), "MSH")[0]
    assert msh[2:6] == ["MEDGEMMA", "MEDGEMMA", "HIS", "HOSPITAL"]
    assert msh[10] == "P"


def test_control_ids_are_fixed_per_report_and_destination() -> None:
    study_uid = "1.3.6.1.4.1.5962.1.2.9.20040826185059.5457"
    control_id = hl7_control_id(study_uid, 7, "his")
    assert control_id == hl7_control_id(study_uid, 7, "his")
    assert re.fullmatch(r"MG[0-9A-F]{18}", control_id)  # MSH-10 is at most 20 characters
    others = {
        hl7_control_id(study_uid, 8, "his"),
        hl7_control_id(study_uid, 7, "ris"),
        hl7_control_id(study_uid + ".1", 7, "his"),
    }
    assert control_id not in others and len(others) == 3


@pytest.mark.parametrize("created", ["2024-05-01", "yesterday"])
def test_a_value_that_breaks_a_strict_check_is_refused(
    created: str, source: Dataset, destination: HL7Destination, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A value hl7apy cannot read (OBR-22 is a DTM, HL7 v2.5 §2.A.22) raises its own
    ValueError: the caller gets the OruBuildError its failures are, never that."""
    monkeypatch.setattr("hl7_out.oru.format_dtm", lambda _when: created)
    with pytest.raises(OruBuildError, match="strict validation"):
        build(make_report(findings_content()), source, destination)
