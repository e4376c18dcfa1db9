"""Finding labels and locations to codes: standard where known, private otherwise."""

from __future__ import annotations

import unicodedata
import zipfile
from functools import cache
from xml.etree import ElementTree

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom.sr.coding import Code

from dicom_node import finding_codes as fc
from tests.dicom_output_support import PIXELMED_JAR

NODULE = Code("27925004", "SCT", "Nodule")
PLEURAL_EFFUSION = Code("60046008", "SCT", "Pleural effusion")


@pytest.mark.parametrize(
    ("label", "expected"),
    [
        ("nodule", NODULE),
        ("Nodules", NODULE),
        ("结节", NODULE),
        ("右肺结节", NODULE),
        ("small left pleural effusion", PLEURAL_EFFUSION),
        ("Pleural-Effusion", PLEURAL_EFFUSION),
        ("胸腔积液", PLEURAL_EFFUSION),
        ("pericardial effusion", Code("373945007", "SCT", "Pericardial effusion")),
        ("Pneumothorax", Code("36118008", "SCT", "Pneumothorax")),
        ("气胸", Code("36118008", "SCT", "Pneumothorax")),
        ("enlarged cardiac silhouette", Code("8186001", "SCT", "Cardiomegaly")),
        ("心影增大", Code("8186001", "SCT", "Cardiomegaly")),
        ("consolidation", Code("95436008", "SCT", "Lung consolidation")),
        ("实变", Code("95436008", "SCT", "Lung consolidation")),
        ("atelectasis", Code("46621007", "SCT", "Atelectasis")),
        ("ground-glass opacity", Code("112120", "DCM", "Ground glass opacity")),
        ("patchy opacity", Code("112001", "DCM", "Opacity")),
        ("infiltration", Code("112121", "DCM", "Infiltrate")),
        ("rib fracture", Code("125605004", "SCT", "Fracture of bone")),
        ("肺水肿", Code("19242006", "SCT", "Pulmonary edema")),
        ("edema", Code("79654002", "SCT", "Edema")),
        ("肺气肿", Code("87433001", "SCT", "Pulmonary emphysema")),
        ("mass", Code("4147007", "SCT", "Mass")),
    ],
)
def test_common_chest_findings_get_standard_codes(label: str, expected: Code) -> None:
    assert fc.finding_type_code(label) == expected
    assert fc.finding_type_code(label).meaning == expected.meaning


def test_words_are_matched_whole() -> None:
    assert fc.standard_finding_code("massive hiatal hernia") is None
    assert fc.standard_finding_code("tortuous aorta") is None


def test_other_labels_get_a_stable_private_code_with_the_label_as_meaning() -> None:
    code = fc.finding_type_code("Tortuous aorta")
    assert code.scheme_designator == "99MEDGEMMA"
    assert code.meaning == "Tortuous aorta"
    assert code == fc.finding_type_code("tortuous  AORTA")
    assert code != fc.finding_type_code("tortuous artery")


@given(st.text(min_size=0, max_size=300))
def test_any_label_gives_a_valid_code(label: str) -> None:
    code = fc.finding_type_code(label)
    assert 1 <= len(code.value) <= 16
    assert 1 <= len(code.meaning) <= 64
    assert "\\" not in code.meaning
    assert all(unicodedata.category(ch)[0] != "C" for ch in code.meaning)


@pytest.mark.parametrize(
    ("location", "structure", "laterality"),
    [
        ("right upper lobe", "Upper lobe of lung", "Right"),
        ("RUL", None, None),
        ("left lower lobe", "Lower lobe of lung", "Left"),
        ("right middle lobe", "Middle lobe of right lung", "Right"),
        ("middle lobe", "Middle lobe of right lung", "Right"),
        ("left lung base", "Lower zone of lung", "Left"),
        ("bilateral lower zones", "Lower zone of lung", "Bilateral"),
        ("右肺上叶", "Upper lobe of lung", "Right"),
        ("左下肺野", "Lower zone of lung", "Left"),
        ("双肺", "Lung", "Bilateral"),
        ("left hilum", "Hilum of lung", "Left"),
        ("mediastinum", "Mediastinum", None),
        ("right heart border", "Heart", None),
        ("left 5th rib", "Rib", "Left"),
        ("somewhere", None, None),
        ("", None, None),
        (None, None, None),
    ],
)
def test_locations_map_to_sites_with_laterality(
    location: str | None, structure: str | None, laterality: str | None
) -> None:
    site = fc.finding_site(location)
    if structure is None:
        assert site is None
        return
    assert site is not None
    assert site.structure.meaning == structure
    assert (site.laterality.meaning if site.laterality else None) == laterality


def test_language_codes() -> None:
    assert fc.language_code("zh") == Code("zh-CN", "RFC5646", "Chinese (S)")
    assert fc.language_code("zh-CN").meaning == "Chinese (S)"
    assert fc.language_code("en") == Code("en-US", "RFC5646", "English (United States)")


# --- codes in context-group-constrained rows: what PixelMed's validator accepts -------------


@cache
def pixelmed_context_group(cid: str) -> set[tuple[str, str]]:
    """(code value, scheme) of a context group as PixelMed's SR validator knows it."""
    with zipfile.ZipFile(PIXELMED_JAR) as jar:
        source = jar.read("com/pixelmed/validate/DicomContextGroupsSource.xml")
    root = ElementTree.fromstring(source)
    (group,) = [g for g in root.iter("definecontextgroup") if g.get("cid") == cid]
    return {(code.get("cv", ""), code.get("csd", "")) for code in group.iter("contextgroupcode")}


def in_group(code: Code, cid: str) -> bool:
    return (code.value, code.scheme_designator) in pixelmed_context_group(cid)


@pytest.mark.skipif(not PIXELMED_JAR.exists(), reason="PixelMed (libpixelmed-java) not installed")
def test_coded_descriptors_are_in_the_context_groups_pixelmed_checks() -> None:
    for modality in ("CR", "DX", "CT", "MR", "NM", "PT", "US", "XA", "OT", ""):
        assert in_group(fc.procedure_reported(modality), "100"), modality  # TID 1500 row 4
    for modality in ("CR", "DX", "CT", "MR", "MG", "US", "XA", "RF", "IO", "PX"):
        code = fc.modality_code(modality)
        assert code is not None and in_group(code, "29"), modality  # TID 1602 row 1
    for view in ("PA", "AP", "LL", "RL"):
        code = fc.image_view_code(view)
        assert code is not None and in_group(code, "4010"), view  # TID 1603 row 1
    for laterality in ("R", "L", "B"):
        code = fc.laterality_code(laterality)
        assert code is not None and in_group(code, "244"), laterality  # TID 1602 row 3


def test_descriptor_codes_for_values_without_one() -> None:
    assert fc.procedure_reported("CR") == Code("363679005", "SCT", "Imaging procedure")
    assert fc.procedure_reported(" ct ") == Code("25045-6", "LN", "CT unspecified body region")
    assert fc.modality_code("OT") is None and fc.modality_code("") is None
    assert fc.image_view_code("LATERAL") is None
    assert fc.laterality_code("U") is None
