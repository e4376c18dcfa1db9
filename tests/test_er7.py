"""ER7 text composed segment by segment (hl7_out/er7.py, HL7 v2.5 §2.5-2.7): MSH's delimiters,
trailing empty fields left out, segment order kept; the ORU built this way parses back
strictly (tests/test_oru.py covers the message itself)."""

from __future__ import annotations

import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

from hl7_out.er7 import Er7Message, Er7Segment


def test_msh_starts_with_its_delimiters_and_counts_fields_from_them() -> None:
    msh = Er7Segment("MSH")
    msh[3] = "MEDGEMMA"
    msh[9] = "ORU^R01^ORU_R01"
    assert msh.to_er7() == "MSH|^~\\&|MEDGEMMA||||||ORU^R01^ORU_R01"
    with pytest.raises(ValueError, match="MSH-2"):
        msh[2] = "^~\\&"


def test_trailing_empty_fields_are_left_out_and_inner_ones_kept() -> None:
    pid = Er7Segment("PID")
    pid[1] = "1"
    pid[5] = "Doe^Jane~Smith^Jane"
    pid[8] = ""
    assert pid.to_er7() == "PID|1||||Doe^Jane~Smith^Jane"
    assert pid[5] == "Doe^Jane~Smith^Jane" and pid[2] == ""
    assert Er7Segment("PV1").to_er7() == "PV1"
    with pytest.raises(ValueError, match="PID-0"):
        pid[0] = "x"


@pytest.mark.parametrize("name", ["PI", "PIDX", "P|D", ""])
def test_a_segment_name_is_three_letters_or_digits(name: str) -> None:
    with pytest.raises(ValueError, match="segment name"):
        Er7Segment(name)


def test_segments_come_out_in_the_order_added_each_ended_by_cr() -> None:
    message = Er7Message()
    msh = message.add_segment("MSH")
    for number, value in {
        7: "20261130120000",
        9: "ACK^R01^ACK",
        10: "MG1",
        11: "P",
        12: "2.5",
    }.items():
        msh[number] = value
    msa = message.add_segment("MSA")
    msa[1], msa[2] = "AA", "MG1"
    text = message.to_er7()
    assert text == "MSH|^~\\&|||||20261130120000||ACK^R01^ACK|MG1|P|2.5\rMSA|AA|MG1\r"
    parsed = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    parsed.validate()
    assert parsed.msa.msa_2.to_er7() == "MG1"
