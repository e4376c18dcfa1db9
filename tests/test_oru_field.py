"""ORU^R01 from studies as they arrive in the field (issue 12): PID-3 without a Patient ID,
names far beyond their limits, and corrections. Every message parses strictly (hl7apy) and
with the hl7 package."""

from __future__ import annotations

import hl7
import pytest
from pydicom import Dataset
from pydicom.dataset import Dataset as Item
from pydicom.sequence import Sequence

from config.settings import HL7Destination
from hl7_out.oru import OruBuildError, OruHeader, build_oru
from tests.test_oru import (
    MESSAGE_TIME,
    build,
    fields,
    findings_content,
    make_report,
    parse_strict,
)
from tests.test_oru import destination as destination_fixture
from tests.test_oru import source as source_fixture

source = source_fixture
destination = destination_fixture

LONG_NAME = "Zyxwvutsrq" * 6500 + "^Given"  # 65,005 characters of family name


def without_patient_id(dataset: Dataset) -> Dataset:
    for keyword in ("PatientID", "OtherPatientIDs", "OtherPatientIDsSequence"):
        if keyword in dataset:
            delattr(dataset, keyword)
    return dataset


def pid_3(message: str) -> list[str]:
    parsed = hl7.parse(message)
    return [str(parsed.segment("PID")[3][0][i]) for i in range(5)]


def test_other_patient_ids_item_with_its_issuer(
    source: Dataset, destination: HL7Destination
) -> None:
    item = Item()
    item.PatientID = "EMRG-4411"
    item.IssuerOfPatientID = "ER"
    item.TypeOfPatientID = "TEXT"
    without_patient_id(source).OtherPatientIDsSequence = Sequence([item])

    message = build(make_report(findings_content()), source, destination)

    parse_strict(message)
    assert pid_3(message) == ["EMRG-4411", "", "", "ER", "PI"]


def test_retired_other_patient_ids_come_after_the_sequence(
    source: Dataset, destination: HL7Destination
) -> None:
    without_patient_id(source).OtherPatientIDs = ["OLD-1", "OLD-2"]
    message = build(make_report(findings_content()), source, destination)
    assert pid_3(message) == ["OLD-1", "", "", "", "PI"]


def test_accession_number_with_its_issuer_when_no_patient_id_at_all(
    source: Dataset, destination: HL7Destination
) -> None:
    issuer = Item()
    issuer.LocalNamespaceEntityID = "RIS"
    without_patient_id(source).AccessionNumber = "A2024-0815"
    source.IssuerOfAccessionNumberSequence = Sequence([issuer])

    message = build(make_report(findings_content()), source, destination)

    parse_strict(message)
    assert pid_3(message) == ["A2024-0815", "", "", "RIS", "ACSN"]


def test_a_patient_id_that_broke_its_vr_is_not_cut_but_passed_over(
    source: Dataset, destination: HL7Destination
) -> None:
    source.PatientID = "9" * 65  # LO is at most 64: cutting it could name another patient
    source.OtherPatientIDs = "ALT-7"
    assert pid_3(build(make_report(findings_content()), source, destination))[0] == "ALT-7"


def test_require_patient_id_refuses_the_accession_number(
    source: Dataset, destination: HL7Destination
) -> None:
    without_patient_id(source).AccessionNumber = "A2024-0815"
    strict = destination.model_copy(update={"require_patient_id": True})
    assert OruHeader.of(strict).require_patient_id

    with pytest.raises(OruBuildError, match="require_patient_id") as raised:
        build(make_report(findings_content()), source, strict)
    assert "A2024-0815" not in str(raised.value)
    # Without the setting the same study is sent with its accession number.
    assert pid_3(build(make_report(findings_content()), source, destination))[4] == "ACSN"


def test_no_identifier_at_all_is_never_sent_with_an_empty_pid_3(
    source: Dataset, destination: HL7Destination
) -> None:
    without_patient_id(source).AccessionNumber = ""
    with pytest.raises(OruBuildError, match="PID-3 is required"):
        build(make_report(findings_content()), source, destination)


@pytest.mark.parametrize(
    ("name", "family", "given"),
    [
        (LONG_NAME, "Zyxwvutsrq" * 5, "Given"),
        ("Abcdefghij" * 22 + "^Klmnopqrstuvwxyz" * 3, "Abcdefghij" * 5, "Klmnopqrstuvwxyz"),
        ("Pipe|" * 20 + "^Given", "Pipe\\F\\" * 7 + "P", "Given"),
    ],
)
def test_names_beyond_their_limits_are_cut_to_hl7_lengths(
    source: Dataset, destination: HL7Destination, name: str, family: str, given: str
) -> None:
    source.PatientName = name
    message = build(make_report(findings_content()), source, destination)

    parse_strict(message)
    pid = fields(message, "PID")[0]
    assert pid[5].split("^")[:2] == [family, given]
    assert len(pid[5].split("^")[0]) <= 50  # FN-1 surname, escape sequences included


def test_a_second_report_of_the_study_is_a_correction(
    source: Dataset, destination: HL7Destination
) -> None:
    first = make_report(findings_content())
    second = first.model_copy(update={"report_id": 8, "supersedes_report_id": 7})

    for report, status in ((first, "P"), (second, "C")):
        message = build(report, source, destination)
        parse_strict(message)
        assert fields(message, "OBR")[0][25] == status
        assert {obx[11] for obx in fields(message, "OBX")} == {status}


def test_header_defaults_do_not_require_a_patient_id(source: Dataset) -> None:
    without_patient_id(source).AccessionNumber = "A1"
    message = build_oru(make_report(findings_content()), source, OruHeader(), "MG1", MESSAGE_TIME)
    assert pid_3(message)[4] == "ACSN"
