"""Coded concepts for AI chest X-ray results: standard codes where they exist, private otherwise.

Standard vocabularies used (PS3.16 Section 8, Coding Schemes):
    SCT   SNOMED CT, for finding types (CID 6102/6104/6105 "Chest Finding or Feature ...",
          CID 7151 "Segmentation Property Types"), anatomic sites (CID 6124 "Location in Chest",
          CID 6129 "Chest Site Involvement", CID 6114 "Osseous Anatomy") and laterality
          (CID 244 "Laterality");
    DCM   DICOM codes, for chest opacity patterns (CID 6104) and report sections (CID 7002);
    UCUM  units.

Private coding scheme, declared in every object through the Coding Scheme Identification
Sequence (PS3.3 C.12.1.1.2, SOP Common Module):
    designator  ``99MEDGEMMA`` (the "99" prefix marks a private scheme, PS3.16 Section 8.2)
    name        "medgemma-node private codes"

    Concept names (constant codes below): URGENCY, DISCLAIMER, TESTMODEL, SCOPE, MODELID, DEVICE,
    GENERATED, QUESTION, PARSESTAT, LABEL, LOCATION, DENSITY, BOUNDARY, SIZETEXT, BOXEXTENT,
    MODELSIZE, PROCESSING, COMPARISON, CHANGE.
    Urgency values: ROUTINE, URGENT, CRITICAL (the node's triage scale, storage.Urgency).
    Finding types without a standard code: code value ``F`` + the first 12 hex digits of the
    SHA-256 of the normalised label, code meaning = the label itself (at most 64 characters).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_node.output_common import long_string
from storage.report_schema import Urgency

PRIVATE_SCHEME = "99MEDGEMMA"
PRIVATE_SCHEME_NAME = "medgemma-node private codes"
PRIVATE_SCHEME_ORGANIZATION = "medgemma-node project"


def _private(value: str, meaning: str) -> Code:
    return Code(value=value, scheme_designator=PRIVATE_SCHEME, meaning=meaning)


# Concept names of the private scheme.
URGENCY = _private("URGENCY", "AI triage urgency")
DISCLAIMER = _private("DISCLAIMER", "AI output disclaimer")
TEST_MODEL_NOTICE = _private("TESTMODEL", "Test model notice")
OUT_OF_SCOPE = _private("SCOPE", "Outside the validated scope")
MODEL_IDENTITY = _private("MODELID", "AI model identity")
PROCESSING_DEVICE = _private("DEVICE", "AI processing device")
GENERATED_AT = _private("GENERATED", "AI result generation time")
QUESTION = _private("QUESTION", "Question asked of the AI model")
PARSE_STATUS = _private("PARSESTAT", "AI answer parse status")
REPORTED_LABEL = _private("LABEL", "Finding label as reported by the AI model")
REPORTED_LOCATION = _private("LOCATION", "Finding location as reported by the AI model")
REPORTED_DENSITY = _private("DENSITY", "Finding density as reported by the AI model")
REPORTED_BOUNDARY = _private("BOUNDARY", "Finding boundary as reported by the AI model")
REPORTED_SIZE_TEXT = _private("SIZETEXT", "Finding size as reported by the AI model")
PROCESSING_DETAILS = _private("PROCESSING", "AI processing details")
COMPARISON = _private("COMPARISON", "Comparison with prior study")
REPORTED_CHANGE = _private("CHANGE", "Change since prior as reported by the AI model")
# Measurement methods (TID 300 row "Measurement Method").
BOX_EXTENT_METHOD = _private("BOXEXTENT", "Extent of the AI bounding box")
MODEL_SIZE_METHOD = _private("MODELSIZE", "Size estimated by the AI model")

URGENCY_VALUES: dict[Urgency, Code] = {
    Urgency.ROUTINE: _private("ROUTINE", "Routine"),
    Urgency.URGENT: _private("URGENT", "Urgent"),
    Urgency.CRITICAL: _private("CRITICAL", "Critical"),
}

# Standard concept names (TID 1500 row 12 qualitative evaluations, CID 7002 report sections).
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
IMPRESSION = Code("121073", "DCM", "Impression")
FINDING = Code("121071", "DCM", "Finding")
RECOMMENDATION = Code("121075", "DCM", "Recommendation")
NARRATIVE = Code("111412", "DCM", "Narrative Summary")

# Image Library entries (TID 1601): the images the report was made from.
SOURCE_IMAGE = Code("260753009", "SCT", "Source")

# Procedure reported (TID 1500 row 4, CID 100 "Quantitative Diagnostic Imaging Procedures").
# CID 100 has no radiograph procedure, so radiographs (and anything else without an entry)
# report the generic "Imaging procedure"; Modality and Image View in the Image Library say
# what kind of image it was. PixelMed's validator treats a code outside CID 100 as an error.
IMAGING_PROCEDURE = Code("363679005", "SCT", "Imaging procedure")
_PROCEDURE_BY_MODALITY = {
    "CT": Code("25045-6", "LN", "CT unspecified body region"),
    "MR": Code("25056-3", "LN", "MRI unspecified body region"),
    "NM": Code("49118-3", "LN", "NM unspecified body region"),
    "PT": Code("44136-0", "LN", "PET unspecified body region"),
}

# Languages (TID 1204, CID 5000 "Languages").
ENGLISH_US = Code("en-US", "RFC5646", "English (United States)")
CHINESE_SIMPLIFIED = Code("zh-CN", "RFC5646", "Chinese (S)")


def procedure_reported(modality: str) -> Code:
    """The CID 100 procedure for images of ``modality``."""
    return _PROCEDURE_BY_MODALITY.get(modality.strip().upper(), IMAGING_PROCEDURE)


# --- image descriptors (TID 1602/1603) -----------------------------------------------------

_MODALITIES: dict[str, Code] = {code.value: code for code in codes.cid29.concepts.values()}
# View Position (0018,5101) defined terms (PS3.3 C.8.11.5.1.1) -> CID 4010 "DX View".
_VIEWS = {
    "PA": Code("272479007", "SCT", "postero-anterior"),
    "AP": Code("399348003", "SCT", "antero-posterior"),
    "LL": Code("399173006", "SCT", "left lateral"),
    "RL": Code("399198007", "SCT", "right lateral"),
}


def modality_code(modality: str) -> Code | None:
    """CID 29 "Acquisition Modality" code of a Modality (0008,0060) value, or None."""
    return _MODALITIES.get(modality.strip().upper())


def image_view_code(view_position: str) -> Code | None:
    """CID 4010 "DX View" code of a View Position (0018,5101) value, or None."""
    return _VIEWS.get(view_position.strip().upper())


def laterality_code(laterality: str) -> Code | None:
    """CID 244 "Laterality" code of an (Image) Laterality value R, L or B; None otherwise."""
    return {"R": RIGHT, "L": LEFT, "B": BILATERAL}.get(laterality.strip().upper())


def coding_scheme_identification() -> CodingSchemeIdentificationItem:
    """The Coding Scheme Identification Sequence item for ``99MEDGEMMA`` (PS3.3 C.12.1.1.2)."""
    return CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME,
        name=PRIVATE_SCHEME_NAME,
        responsible_organization=PRIVATE_SCHEME_ORGANIZATION,
    )


def language_code(language: str) -> Code:
    """RFC 5646 code of the report language: ``zh*`` → zh-CN, anything else → en-US."""
    return CHINESE_SIMPLIFIED if language.lower().startswith("zh") else ENGLISH_US


def is_private(code: Code) -> bool:
    return code.scheme_designator == PRIVATE_SCHEME


def code_meaning(text: str) -> str:
    """``text`` made a valid Code Meaning (LO: no backslash, no control characters, ≤ 64)."""
    return long_string(text) or "(empty)"


# --- finding types -------------------------------------------------------------------------

_NODULE = Code("27925004", "SCT", "Nodule")
_MASS = Code("4147007", "SCT", "Mass")
_CONSOLIDATION = Code("95436008", "SCT", "Lung consolidation")
_PLEURAL_EFFUSION = Code("60046008", "SCT", "Pleural effusion")
_PERICARDIAL_EFFUSION = Code("373945007", "SCT", "Pericardial effusion")
_PNEUMOTHORAX = Code("36118008", "SCT", "Pneumothorax")
_PNEUMOMEDIASTINUM = Code("16838000", "SCT", "Pneumomediastinum")
_CARDIOMEGALY = Code("8186001", "SCT", "Cardiomegaly")
_ATELECTASIS = Code("46621007", "SCT", "Atelectasis")
_PLATE_ATELECTASIS = Code("40779009", "SCT", "Plate-like atelectasis")
_OPACITY = Code("112001", "DCM", "Opacity")
_GROUND_GLASS = Code("112120", "DCM", "Ground glass opacity")
_INFILTRATE = Code("112121", "DCM", "Infiltrate")
_FRACTURE = Code("125605004", "SCT", "Fracture of bone")
_EDEMA = Code("79654002", "SCT", "Edema")
_PULMONARY_EDEMA = Code("19242006", "SCT", "Pulmonary edema")
_EMPHYSEMA = Code("87433001", "SCT", "Pulmonary emphysema")
_PNEUMONIA = Code("233604007", "SCT", "Pneumonia")
_CALCIFICATION = Code("18115005", "SCT", "Pathologic calcification")
_FIBROSIS = Code("112674009", "SCT", "Fibrosis")
_BRONCHIECTASIS = Code("12295008", "SCT", "Bronchiectasis")
_LYMPHADENOPATHY = Code("30746006", "SCT", "Lymphadenopathy")
_LESION = Code("52988006", "SCT", "Lesion")
_PULMONARY_EMBOLISM = Code("59282003", "SCT", "Pulmonary embolism")
_ENDOTRACHEAL_TUBE = Code("26412008", "SCT", "Endotracheal tube")
_CATHETER = Code("19923001", "SCT", "Catheter")
_CHEST_TUBE = Code("112173", "DCM", "Chest tube")
_CENTRAL_LINE = Code("112174", "DCM", "Central line")
_PACEMAKER = Code("118378005", "SCT", "Cardiac Pacemaker")

# Synonyms (English and Simplified Chinese), already in normalised form.
_FINDING_SYNONYMS: dict[Code, tuple[str, ...]] = {
    _NODULE: ("nodule", "pulmonary nodule", "lung nodule", "nodular opacity", "结节", "肺结节"),
    _MASS: ("mass", "lung mass", "pulmonary mass", "肿块", "肿物", "占位"),
    _CONSOLIDATION: ("consolidation", "lung consolidation", "airspace consolidation", "实变"),
    _PLEURAL_EFFUSION: (
        "pleural effusion",
        "effusion",
        "hydrothorax",
        "胸腔积液",
        "胸水",
        "积液",
    ),
    _PERICARDIAL_EFFUSION: ("pericardial effusion", "心包积液"),
    _PNEUMOTHORAX: ("pneumothorax", "气胸"),
    _PNEUMOMEDIASTINUM: ("pneumomediastinum", "mediastinal emphysema", "纵隔气肿"),
    _CARDIOMEGALY: (
        "cardiomegaly",
        "enlarged heart",
        "cardiac enlargement",
        "enlarged cardiac silhouette",
        "心脏增大",
        "心影增大",
        "心脏扩大",
        "心影扩大",
    ),
    _ATELECTASIS: ("atelectasis", "collapse", "lung collapse", "肺不张"),
    _PLATE_ATELECTASIS: ("plate like atelectasis", "discoid atelectasis", "盘状肺不张"),
    _OPACITY: ("opacity", "opacities", "opacification", "shadow", "阴影", "密度增高影", "致密影"),
    _GROUND_GLASS: ("ground glass opacity", "ground glass", "磨玻璃影", "磨玻璃密度影"),
    _INFILTRATE: ("infiltrate", "infiltration", "infiltrates", "浸润", "浸润影"),
    _FRACTURE: ("fracture", "rib fracture", "骨折", "肋骨骨折"),
    _EDEMA: ("edema", "oedema", "水肿"),
    _PULMONARY_EDEMA: ("pulmonary edema", "pulmonary oedema", "lung edema", "肺水肿"),
    _EMPHYSEMA: ("emphysema", "pulmonary emphysema", "肺气肿"),
    _PNEUMONIA: ("pneumonia", "肺炎"),
    _CALCIFICATION: ("calcification", "calcified", "钙化", "钙化灶"),
    _FIBROSIS: ("fibrosis", "pulmonary fibrosis", "fibrotic change", "纤维化", "纤维灶"),
    _BRONCHIECTASIS: ("bronchiectasis", "支气管扩张"),
    _LYMPHADENOPATHY: (
        "lymphadenopathy",
        "enlarged lymph node",
        "hilar lymphadenopathy",
        "淋巴结肿大",
    ),
    _LESION: ("lesion", "病变", "病灶"),
    _PULMONARY_EMBOLISM: ("pulmonary embolism", "肺栓塞"),
    _ENDOTRACHEAL_TUBE: ("endotracheal tube", "ett", "气管插管"),
    _CATHETER: ("catheter", "导管"),
    _CHEST_TUBE: ("chest tube", "chest drain", "胸腔引流管"),
    _CENTRAL_LINE: ("central line", "central venous catheter", "中心静脉导管"),
    _PACEMAKER: ("pacemaker", "cardiac pacemaker", "起搏器"),
}

_FINDING_BY_SYNONYM: dict[str, Code] = {
    synonym: code for code, synonyms in _FINDING_SYNONYMS.items() for synonym in synonyms
}
_SYNONYMS_LONGEST_FIRST = sorted(_FINDING_BY_SYNONYM, key=len, reverse=True)


def normalise(text: str) -> str:
    """Case-folded, NFKC, punctuation and hyphens as spaces, single spaces."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    spaced = re.sub(r"[^\w\u4e00-\u9fff]+", " ", folded)
    return " ".join(spaced.split())


def _has_cjk(text: str) -> bool:
    return any("\u4e00" <= char <= "\u9fff" for char in text)


def _contains(text: str, synonym: str) -> bool:
    if _has_cjk(synonym):
        return synonym in text
    return re.search(rf"(?<!\w){re.escape(synonym)}(?:e?s)?(?!\w)", text) is not None


def _singular(text: str) -> str:
    return re.sub(r"(?<=\w)e?s$", "", text) if not _has_cjk(text) else text


def standard_finding_code(label: str) -> Code | None:
    """The standard code for a finding label, or None.

    Exact synonym first (also after dropping an English plural), then the longest synonym
    found inside the label ("small left pleural effusion" → pleural effusion, "右肺结节" → nodule).
    """
    text = normalise(label)
    exact = _FINDING_BY_SYNONYM.get(text) or _FINDING_BY_SYNONYM.get(_singular(text))
    if exact is not None:
        return exact
    for synonym in _SYNONYMS_LONGEST_FIRST:
        if _contains(text, synonym):
            return _FINDING_BY_SYNONYM[synonym]
    return None


def private_finding_code(label: str) -> Code:
    """A ``99MEDGEMMA`` code for a finding without a standard code; the label is the meaning."""
    digest = hashlib.sha256(normalise(label).encode("utf-8")).hexdigest()[:12].upper()
    return _private(f"F{digest}", code_meaning(label))


def finding_type_code(label: str) -> Code:
    """Finding type for TID 1410/1501 row "Finding": standard if known, else private."""
    return standard_finding_code(label) or private_finding_code(label)


# --- finding sites -------------------------------------------------------------------------

RIGHT = Code("24028007", "SCT", "Right")
LEFT = Code("7771000", "SCT", "Left")
BILATERAL = Code("51440002", "SCT", "Bilateral")

_LUNG = Code("39607008", "SCT", "Lung")
_UPPER_LOBE = Code("45653009", "SCT", "Upper lobe of lung")
_MIDDLE_LOBE = Code("72481006", "SCT", "Middle lobe of right lung")
_LOWER_LOBE = Code("90572001", "SCT", "Lower lobe of lung")
_UPPER_ZONE = Code("281392002", "SCT", "Upper zone of lung")
_MIDDLE_ZONE = Code("281393007", "SCT", "Middle zone of lung")
_LOWER_ZONE = Code("281394001", "SCT", "Lower zone of lung")
_APEX = Code("86598002", "SCT", "Apex of Lung")
_HILUM = Code("46750007", "SCT", "Hilum of lung")
_PLEURA = Code("3120008", "SCT", "Pleura")
_MEDIASTINUM = Code("72410000", "SCT", "Mediastinum")
_HEART = Code("80891009", "SCT", "Heart")
_RIB = Code("113197003", "SCT", "Rib")
_CLAVICLE = Code("51299004", "SCT", "Clavicle")
_DIAPHRAGM = Code("5798000", "SCT", "Diaphragm")
_TRACHEA = Code("44567001", "SCT", "Trachea")
_AORTA = Code("15825003", "SCT", "Aorta")
_SPINE = Code("421060004", "SCT", "Spine")

# Most specific first: the first structure found in the location text wins.
_SITE_SYNONYMS: tuple[tuple[Code, tuple[str, ...]], ...] = (
    (_UPPER_LOBE, ("upper lobe", "上叶")),
    (_MIDDLE_LOBE, ("middle lobe", "中叶")),
    (_LOWER_LOBE, ("lower lobe", "下叶")),
    (_UPPER_ZONE, ("upper zone", "upper lung zone", "上野", "上肺野")),
    (_MIDDLE_ZONE, ("middle zone", "mid zone", "mid lung zone", "中野", "中肺野")),
    (
        _LOWER_ZONE,
        ("lower zone", "lower lung zone", "lung base", "base", "bases", "下野", "下肺野", "肺底"),
    ),
    (_APEX, ("apex", "apical", "apices", "肺尖")),
    (_HILUM, ("hilum", "hilar", "hila", "肺门")),
    (_PLEURA, ("pleura", "pleural", "costophrenic angle", "胸膜", "肋膈角")),
    (_MEDIASTINUM, ("mediastinum", "mediastinal", "纵隔")),
    (_HEART, ("heart", "cardiac", "心脏", "心影")),
    (_RIB, ("rib", "ribs", "肋骨")),
    (_CLAVICLE, ("clavicle", "锁骨")),
    (_DIAPHRAGM, ("diaphragm", "hemidiaphragm", "膈", "膈肌")),
    (_TRACHEA, ("trachea", "气管")),
    (_AORTA, ("aorta", "aortic", "主动脉")),
    (_SPINE, ("spine", "vertebra", "vertebral", "脊柱", "椎体")),
    (_LUNG, ("lung", "lungs", "pulmonary", "hemithorax", "肺")),
)

_LATERALITY_SYNONYMS: tuple[tuple[Code, tuple[str, ...]], ...] = (
    (BILATERAL, ("bilateral", "both", "双侧", "双肺", "两肺", "双")),
    (RIGHT, ("right", "r", "rt", "右")),
    (LEFT, ("left", "l", "lt", "左")),
)

_PAIRED_STRUCTURES = frozenset(
    {
        _LUNG,
        _UPPER_LOBE,
        _LOWER_LOBE,
        _UPPER_ZONE,
        _MIDDLE_ZONE,
        _LOWER_ZONE,
        _APEX,
        _HILUM,
        _PLEURA,
        _RIB,
        _CLAVICLE,
        _DIAPHRAGM,
    }
)


@dataclass(frozen=True)
class SiteCode:
    """A finding site (SCT "Finding Site") with its optional laterality (CID 244)."""

    structure: Code
    laterality: Code | None = None


def _first_match(text: str, table: tuple[tuple[Code, tuple[str, ...]], ...]) -> Code | None:
    for code, synonyms in table:
        if any(_contains(text, synonym) for synonym in synonyms):
            return code
    return None


def finding_site(location: str | None) -> SiteCode | None:
    """Map a free-text location ("right upper lobe", "左下肺野") to a coded site, or None.

    Laterality is kept only for paired structures; the middle lobe is always right.
    """
    if not location:
        return None
    text = normalise(location)
    structure = _first_match(text, _SITE_SYNONYMS)
    if structure is None:
        return None
    if structure == _MIDDLE_LOBE:
        return SiteCode(structure, RIGHT)
    laterality = _first_match(text, _LATERALITY_SYNONYMS)
    if structure not in _PAIRED_STRUCTURES:
        laterality = None
    return SiteCode(structure, laterality)
