"""dicom_node/vr_limits.py: source values made to fit their VR (PS3.5 Table 6.2-1)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom import DataElement, Dataset
from pydicom.dataelem import RawDataElement
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.valuerep import PersonName

from dicom_node.vr_limits import fit_element, fitted_copy, person_name
from tests.dicom_output_support import LONG_NAME, rg1

MAX_LENGTH = {"AE": 16, "CS": 16, "SH": 16, "LO": 64, "ST": 1024, "LT": 10240}


def fitted(vr: str, value: object) -> object:
    element = DataElement(0x00091010, vr, value)  # private, so any VR goes
    fit_element(element)
    return element.value


@pytest.mark.parametrize(
    ("vr", "value", "expected"),
    [
        ("LO", "x" * 100, "x" * 64),
        ("LO", "two\r\nlines\tand\x00nul", "two  lines andnul"),
        ("SH", "ACC-2024-000012345", "ACC-2024-0000123"),
        ("AE", "A" * 20, "A" * 16),
        ("CS", "female", "FEMALE"),
        ("CS", "chest-pa view", "CHESTPA VIEW"),
        ("ST", "a\r\nb\x07" + "c" * 2000, ("a\r\nb" + "c" * 2000)[:1024]),
        ("UT", "keeps\nbreaks\ufffd", "keeps\nbreaks"),
        ("DA", "20040826", "20040826"),
        ("DA", "2004-08-26", None),
        ("TM", "185059.123", "185059.123"),
        ("TM", "18:50:59", None),
        ("DT", "20040826185059+0100", "20040826185059+0100"),
        ("DT", "yesterday", None),
        ("AS", "084Y", "084Y"),
        ("AS", "84 years", None),
        ("IS", "12", 12),
        ("IS", "99999999999", None),
    ],
)
def test_values_are_fitted_to_their_vr(vr: str, value: str, expected: object) -> None:
    assert fitted(vr, value) == expected


def test_a_long_decimal_string_is_written_again_in_16_characters() -> None:
    value = fitted("DS", "0.1500000000000000000001")
    assert len(str(value)) <= 16
    assert float(value) == pytest.approx(0.15)  # type: ignore[arg-type]
    assert fitted("DS", "0.139") == pytest.approx(0.139)


def test_multiple_values_are_fitted_one_by_one() -> None:
    assert list(fitted("LO", ["X" * 80, "Y-2"])) == ["X" * 64, "Y-2"]  # type: ignore[call-overload]
    assert fitted("DA", ["20040826", "bad", "19991231"]) == ["20040826", "19991231"]
    assert fitted("DA", ["bad", "worse"]) is None


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("A" * 65_009, "A" * 64),
        (LONG_NAME, LONG_NAME[:64]),
        ("Yamada^Tarou=" + "山田" * 40 + "^太郎", "Yamada^Tarou=" + ("山田" * 40)[:64]),
        ("Doe^Jane", "Doe^Jane"),
        ("", ""),
    ],
)
def test_each_person_name_group_is_at_most_64_characters(name: str, expected: str) -> None:
    assert person_name(name) == expected
    assert all(len(group) <= 64 for group in person_name(name).split("="))


@settings(max_examples=200, deadline=None)
@given(
    vr=st.sampled_from(sorted(MAX_LENGTH)),
    # A backslash separates values: a single value never holds one.
    text=st.text(st.characters(blacklist_characters="\\"), max_size=12_000),
)
def test_any_text_fits_its_vr(vr: str, text: str) -> None:
    value = fitted(vr, text)
    assert isinstance(value, str)
    assert len(value) <= MAX_LENGTH[vr]
    assert "\ufffd" not in value
    allowed_controls = "\r\n\x0c" if vr in ("ST", "LT") else ""
    assert all(c >= " " or c in allowed_controls for c in value)
    assert fitted(vr, value) == value  # idempotent


def test_a_copy_is_fitted_and_the_source_is_left_alone() -> None:
    source = rg1(with_pixels=True)
    source.PatientName = "B" * 300
    source.AccessionNumber = "1234567890123456789"
    item = Dataset()
    item.CodeMeaning = "m" * 90
    source.ProcedureCodeSequence = Sequence([item])
    copy = fitted_copy(source)
    assert str(copy.PatientName) == "B" * 64
    assert copy.AccessionNumber == "1234567890123456"
    assert copy.ProcedureCodeSequence[0].CodeMeaning == "m" * 64
    assert str(source.PatientName) == "B" * 300  # untouched
    assert source.ProcedureCodeSequence[0].CodeMeaning == "m" * 90
    assert "PixelData" not in copy  # the header only
    assert source.pixel_array.shape == (1955, 1841)


def test_missing_type_2_attributes_are_present_and_empty() -> None:
    source = rg1()
    for keyword in ("PatientID", "PatientBirthDate", "StudyDate", "StudyTime", "StudyID"):
        delattr(source, keyword)
    source.PatientSex = "X"
    copy = fitted_copy(source)
    for keyword in ("PatientID", "PatientBirthDate", "StudyDate", "StudyTime", "StudyID"):
        assert keyword in copy and copy[keyword].value in ("", None), keyword
    assert copy.PatientSex in ("", None)
    assert isinstance(copy.PatientName, PersonName)


def raw(tag: int, vr: str, value: bytes) -> RawDataElement:
    """An element as pydicom reads it from a file, before it is decoded."""
    return RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)


def test_values_not_in_their_vr_form_are_dropped_and_undecodable_ones_left_out() -> None:
    source = rg1()
    source._dict[Tag(0x00101030)] = raw(0x00101030, "DS", b"not-a-number")  # Patient's Weight
    source._dict[Tag(0x00181170)] = raw(0x00181170, "US", b"\x01\x02\x03")  # odd length
    copy = fitted_copy(source)
    assert copy["PatientWeight"].value in (None, "")
    assert Tag(0x00181170) not in copy
    assert copy.PatientID == source.PatientID
