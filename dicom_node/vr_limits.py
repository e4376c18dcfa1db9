"""Source attributes made to fit their Value Representation before the SR and GSPS copy them.

The SR and GSPS take their Patient and Study modules from a source image (highdicom's
``copy_patient_and_study_information`` copies every root attribute of those modules). Sources
arrive from modalities and PACS of every age, so a value may break its VR (a 65,009-character
Patient's Name, a 220-character name, a 20-character Accession Number, a lowercase Patient's
Sex) or a type 2 attribute may be missing (the Patient ID of an emergency patient). A job must
not fail for that: ``fitted_copy`` returns a copy of the source header in which

- text values are cut to their VR's maximum length (PS3.5 Table 6.2-1): AE, CS, SH 16;
  LO 64; ST 1024; LT 10240; PN 64 characters per component group; UC and UT unlimited;
- characters a VR excludes are removed (PS3.5 6.2): control characters from one-line VRs
  (AE, CS, SH, LO, PN, UC), control characters other than CR, LF and FF from ST, LT, UT;
  CS keeps only upper-case letters, digits, space and underscore (letters are upper-cased);
- DA, TM, DT, AS, DS and IS values that are not in their VR's form are dropped, and a DS
  longer than 16 characters is written again in at most 16 (PS3.5 6.2, Table 6.2-1);
- a value that pydicom cannot decode at all is left out of the copy;
- the type 2 attributes of the Patient (C.7.1.1) and General Study (C.7.2.1) modules are
  present, empty when the source lacks them; Patient's Sex is M, F, O or empty.

Sequences are fitted item by item, except the functional group sequences of enhanced images
(image-level data the outputs never copy). UIDs are left as they are: the SCP refuses a source
without valid UIDs (0xA900). The copy is the header only: pixel data (and other bulk data) is
left out, so a source read with deferred pixel data is never read in full for it.
"""

from __future__ import annotations

import copy
import re
import unicodedata
from collections.abc import Callable

from pydicom import DataElement, Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.valuerep import format_number_as_ds

# PS3.5 Table 6.2-1, in characters (the node writes UTF-8, ISO_IR 192).
MAX_CHARACTERS = {"AE": 16, "CS": 16, "SH": 16, "LO": 64, "ST": 1024, "LT": 10240}
MAX_PN_GROUP = 64
MAX_DS = 16
MAX_IS = 12

_TYPE_2_ATTRIBUTES = (
    # Patient module, PS3.3 C.7.1.1
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    # General Study module, PS3.3 C.7.2.1
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
_PATIENT_SEXES = frozenset({"M", "F", "O"})
_BULK_DATA = frozenset(
    Tag(keyword)
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData", "EncapsulatedDocument")
)
_NOT_FITTED = frozenset(
    Tag(keyword)
    for keyword in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence")
)

_LINE_BREAKS = frozenset("\r\n\f")
_DROPPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn"})


def free_text(text: str) -> str:
    """``text`` fit for ST/LT/UT values (PS3.5 6.2): of the control characters only CR, LF and
    FF stay (TAB becomes a space); format characters, surrogates, private-use and unassigned
    code points and the replacement character U+FFFD (left by undecodable bytes) are dropped."""
    kept = []
    for character in text:
        if character in _LINE_BREAKS:
            kept.append(character)
        elif character == "\t":
            kept.append(" ")
        elif character != "\ufffd" and unicodedata.category(character) not in _DROPPED_CATEGORIES:
            kept.append(character)
    return "".join(kept)


_FORMS = {
    "DA": re.compile(r"\d{8}"),
    "TM": re.compile(r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?"),
    "DT": re.compile(r"\d{4}(\d{2}(\d{2}(\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?)?)?)?([+-]\d{4})?"),
    "AS": re.compile(r"\d{3}[DWMY]"),
    "DS": re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?"),
    "IS": re.compile(r"[+-]?\d{1,11}"),
}
_CODE_STRING_EXCLUDED = re.compile(r"[^A-Z0-9 _]")
_LINE_BREAKS_TO_SPACES = str.maketrans("\r\n\f", "   ")


def fitted_copy(source: Dataset) -> Dataset:
    """A copy of ``source`` whose values fit their VRs (see the module docstring)."""
    fitted = Dataset()
    for tag in list(source.keys()):
        if tag in _BULK_DATA:
            continue
        element = _decoded(source, tag)
        if element is None:
            continue
        element = copy.deepcopy(element)
        if tag not in _NOT_FITTED:
            fit_element(element)
        fitted.add(element)
    _add_type_2_attributes(fitted)
    return fitted


def _decoded(source: Dataset, tag: BaseTag) -> DataElement | None:
    try:
        element = source[tag]
        _ = element.value  # raises for a value pydicom cannot convert to its VR
    except Exception:  # whatever a malformed value raises, the value is left out
        return None
    return element


def _add_type_2_attributes(dataset: Dataset) -> None:
    for keyword in _TYPE_2_ATTRIBUTES:
        if keyword not in dataset:
            setattr(dataset, keyword, None)
    sex = dataset.PatientSex
    if sex not in _PATIENT_SEXES:
        dataset.PatientSex = None


def fit_element(element: DataElement) -> None:
    """Fit ``element``'s value(s) to its VR in place; sequences item by item."""
    if element.VR == "SQ":
        for item in element.value or Sequence():
            for child in item:
                if child.tag not in _NOT_FITTED:
                    fit_element(child)
        return
    fit = _FITS.get(element.VR)
    if fit is None or element.value is None or element.value == "":
        return
    if isinstance(element.value, MultiValue):
        values = [fitted for value in element.value if (fitted := fit(str(value))) is not None]
        element.value = values if values else None
        return
    element.value = fit(str(element.value))


def _one_line(limit: int | None) -> Callable[[str], str]:
    """AE, SH, LO, UC, PN groups: no control characters at all; line breaks become spaces."""

    def fit(value: str) -> str:
        return free_text(value).translate(_LINE_BREAKS_TO_SPACES)[:limit]

    return fit


def _text(limit: int | None) -> Callable[[str], str]:
    """ST, LT, UT: of the control characters only CR, LF and FF stay."""

    def fit(value: str) -> str:
        return free_text(value)[:limit]

    return fit


def _code_string(value: str) -> str:
    # Leading and trailing spaces are padding in CS (PS3.5 Table 6.2-1); they are stripped after
    # the excluded characters go and again after the cut, so fitting a fitted value changes nothing.
    kept = _CODE_STRING_EXCLUDED.sub("", value.upper()).strip()
    return kept[: MAX_CHARACTERS["CS"]].rstrip()


def person_name(value: str) -> str:
    """A PN value with each component group (alphabetic=ideographic=phonetic) ≤ 64 characters
    and no control characters (PS3.5 6.2.1)."""
    groups = [_one_line(MAX_PN_GROUP)(group) for group in value.split("=")[:3]]
    return "=".join(groups).rstrip("=")


def _in_form(vr: str) -> Callable[[str], str | None]:
    form = _FORMS[vr]

    def fit(value: str) -> str | None:
        value = value.strip()
        return value if form.fullmatch(value) else None

    return fit


def _decimal_string(value: str) -> str | None:
    value = value.strip()
    if not _FORMS["DS"].fullmatch(value):
        return None
    if len(value) <= MAX_DS:
        return value
    return str(format_number_as_ds(float(value)))


def _integer_string(value: str) -> str | None:
    value = value.strip()
    if not _FORMS["IS"].fullmatch(value) or not -(2**31) <= int(value) < 2**31:
        return None
    return value


_FITS: dict[str, Callable[[str], str | None]] = {
    "AE": _one_line(MAX_CHARACTERS["AE"]),
    "SH": _one_line(MAX_CHARACTERS["SH"]),
    "LO": _one_line(MAX_CHARACTERS["LO"]),
    "UC": _one_line(None),
    "ST": _text(MAX_CHARACTERS["ST"]),
    "LT": _text(MAX_CHARACTERS["LT"]),
    "UT": _text(None),
    "CS": _code_string,
    "PN": person_name,
    "DA": _in_form("DA"),
    "TM": _in_form("TM"),
    "DT": _in_form("DT"),
    "AS": _in_form("AS"),
    "DS": _decimal_string,
    "IS": _integer_string,
}
