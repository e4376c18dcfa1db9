"""What the PDF report says, in Chinese or English: its words, the patient and study header
read from the source image, the findings rows, the footer and the follow-up appendix.

    words = WORDS["zh"]; rows = patient_header(source, "zh"); footer_text(report, source, "zh")

Plain text for delivery.pdf_report to put into the template; header values come from the
source's attributes (first value, single spaces, cut to MAX_HEADER_CHARS) and are escaped by
the template, never trusted as markup.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import date, datetime, timedelta, timezone
from typing import Literal

from markupsafe import Markup
from pydicom import Dataset
from pydicom.valuerep import PersonName

from storage.report_schema import (
    AI_DISCLAIMER,
    FOLLOW_UP_DISCLAIMER,
    Finding,
    ModelIdentity,
    ReportContent,
    ReportDocument,
    Urgency,
    follow_up_text,
)

Language = Literal["en", "zh"]

MAX_HEADER_CHARS = 128
WATERMARK_ZH = "AI辅助分析 结论仅供参考，须由执业医师复核确认"
WATERMARK_EN = "AI-assisted analysis: preliminary, must be reviewed by a licensed physician"
_CJK = re.compile(r"[\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]")
_HEX_REVISION = re.compile(r"^[0-9a-f]{40}$")


# --- words ---------------------------------------------------------------------------------

WORDS: dict[Language, dict[str, str]] = {
    "en": {
        "title": "AI-assisted imaging report",
        "status": "Preliminary · UNVERIFIED · to be reviewed by a physician",
        "disclaimer": AI_DISCLAIMER,
        "watermark": WATERMARK_EN,
        "out_of_scope": "Outside the validated scope",
        "supersedes": "This report replaces report {id}{time}.",
        "supersedes_time": " of {time}",
        "patient_name": "Patient name",
        "patient_id": "Patient ID",
        "sex": "Sex",
        "age": "Age",
        "study_date": "Study date",
        "accession": "Accession number",
        "modality": "Modality",
        "body_part": "Body part",
        "images": "Images",
        "figure": "Image {n}: {what}. Boxes: AI findings, numbered as in the table.",
        "figure_plain": "Image {n}: {what}.",
        "image_failed": "Image {n} could not be shown: {reason}",
        "findings": "Findings",
        "no_findings": "No structured findings.",
        "number": "No.",
        "location": "Location",
        "finding": "Finding",
        "size": "Size",
        "density": "Density",
        "boundary": "Boundary",
        "impression": "Impression",
        "recommendation": "Recommendation",
        "urgency": "Urgency",
        "narrative": "Model narrative",
        "question": "Question asked",
        "comparison": "Comparison",
        "model": "Model",
        "report": "Report",
        "report_value": "{id}, version {version}",
        "generated": "Generated",
        "model_version": "Model",
        "hardware": "Hardware",
        "page": "Page",
        "appendix": "Appendix: follow-up conversation",
        "appendix_note": FOLLOW_UP_DISCLAIMER,
        "asked": "Q",
        "answered": "A",
        "about": "about region {anchor}",
        "measured": "measured by the node from the pixel spacing",
        "not_stated": "—",
    },
    "zh": {
        "title": "AI辅助影像分析报告",
        "status": "初步报告 · 未经核实（UNVERIFIED）· 须由医师复核",
        "disclaimer": "AI生成的初步结果，未经核实，必须由医师复核。",
        "watermark": WATERMARK_ZH,
        "out_of_scope": "超出已验证的适用范围",
        "supersedes": "本报告取代报告 {id}{time}。",
        "supersedes_time": "（{time}）",
        "patient_name": "姓名",
        "patient_id": "患者编号",
        "sex": "性别",
        "age": "年龄",
        "study_date": "检查日期",
        "accession": "检查号",
        "modality": "检查类型",
        "body_part": "检查部位",
        "images": "图像",
        "figure": "图 {n}：{what}。方框为AI所见，编号与下表一致。",
        "figure_plain": "图 {n}：{what}。",
        "image_failed": "图 {n} 无法显示：{reason}",
        "findings": "所见",
        "no_findings": "无结构化所见。",
        "number": "序号",
        "location": "部位",
        "finding": "征象",
        "size": "测量",
        "density": "密度",
        "boundary": "边界",
        "impression": "印象",
        "recommendation": "建议",
        "urgency": "紧急程度",
        "narrative": "模型描述",
        "question": "提问",
        "comparison": "对比",
        "model": "模型",
        "report": "报告",
        "report_value": "{id}，第 {version} 版",
        "generated": "生成时间",
        "model_version": "模型版本",
        "hardware": "硬件环境",
        "page": "页",
        "appendix": "附录：追问记录",
        "appendix_note": "追问的回答为初步的AI结果；该模型未针对多轮对话进行评估。",
        "asked": "问",
        "answered": "答",
        "about": "关于区域 {anchor}",
        "measured": "由本节点按像素间距测量",
        "not_stated": "—",
    },
}
URGENCY_WORDS: dict[Language, dict[Urgency, str]] = {
    "en": {Urgency.ROUTINE: "Routine", Urgency.URGENT: "Urgent", Urgency.CRITICAL: "Critical"},
    "zh": {Urgency.ROUTINE: "常规", Urgency.URGENT: "紧急", Urgency.CRITICAL: "危急"},
}
SEX_WORDS: dict[Language, dict[str, str]] = {
    "en": {"M": "Male", "F": "Female", "O": "Other"},
    "zh": {"M": "男", "F": "女", "O": "其他"},
}
# Age String units (PS3.5 6.2, AS): days, weeks, months, years.
AGE_UNITS: dict[Language, dict[str, tuple[str, str]]] = {
    "en": {
        "D": (" day", " days"),
        "W": (" week", " weeks"),
        "M": (" month", " months"),
        "Y": (" year", " years"),
    },
    "zh": {"D": ("天", "天"), "W": ("周", "周"), "M": ("个月", "个月"), "Y": ("岁", "岁")},
}
MILLIMETRES: dict[Language, str] = {"en": "mm", "zh": "毫米"}


# --- the patient and study header ----------------------------------------------------------


def header_text(dataset: Dataset, keyword: str) -> str:
    """One header value for reading: first value, single spaces, at most MAX_HEADER_CHARS
    (a source may carry a name of thousands of characters; the page has room for a line)."""
    value = dataset.get(keyword)
    if value is None:
        return ""
    if not isinstance(value, str) and isinstance(value, Sequence):
        value = value[0] if len(value) else ""
    return " ".join(str(value).split())[:MAX_HEADER_CHARS]


def person_name(value: object, language: Language) -> str:
    """A DICOM PN for reading: ideographic form in Chinese reports when present, family
    name first (PS3.5 6.2.1: family^given^middle^prefix^suffix)."""
    if value is None or value == "":
        return ""
    name = value if isinstance(value, PersonName) else PersonName(str(value))
    groups = [name.ideographic, name.alphabetic] if language == "zh" else [name.alphabetic]
    for group in [*groups, name.ideographic]:
        parts = [part.strip() for part in str(group or "").split("^")]
        family_given = [part for part in parts[:3] if part]
        if family_given:
            separator = "" if _CJK.search("".join(family_given)) else " "
            return separator.join(family_given)[:MAX_HEADER_CHARS]
    return ""


def age_text(dataset: Dataset, language: Language) -> str:
    """Patient's Age (AS, e.g. "064Y"), else the years from Birth Date to Study Date."""
    age = header_text(dataset, "PatientAge")
    match = re.fullmatch(r"(\d{3})([DWMY])", age)
    if match:
        return _age(int(match.group(1)), match.group(2), language)
    born = _date(header_text(dataset, "PatientBirthDate"))
    studied = _date(header_text(dataset, "StudyDate"))
    if born is None or studied is None or studied < born:
        return age
    years = studied.year - born.year - ((studied.month, studied.day) < (born.month, born.day))
    if years >= 2:
        return _age(years, "Y", language)
    months = (studied.year - born.year) * 12 + studied.month - born.month
    months -= studied.day < born.day
    return (
        _age(months, "M", language) if months >= 1 else _age((studied - born).days, "D", language)
    )


def _age(number: int, unit: str, language: Language) -> str:
    one, many = AGE_UNITS[language][unit]
    return f"{number}{one if number == 1 else many}"


def _date(value: str) -> date | None:
    try:
        return datetime.strptime(value, "%Y%m%d").date()
    except ValueError:
        return None


def date_text(value: str) -> str:
    parsed = _date(value)
    return parsed.isoformat() if parsed else value


def patient_header(source: Dataset, language: Language) -> list[tuple[str, str]]:
    """(label, value) pairs of the page-1 header, in reading order."""
    words = WORDS[language]
    sex = header_text(source, "PatientSex").upper()
    return [
        (words["patient_name"], person_name(source.get("PatientName"), language)),
        (words["patient_id"], header_text(source, "PatientID")),
        (words["sex"], SEX_WORDS[language].get(sex, sex)),
        (words["age"], age_text(source, language)),
        (words["study_date"], date_text(header_text(source, "StudyDate"))),
        (words["accession"], header_text(source, "AccessionNumber")),
        (words["modality"], header_text(source, "Modality")),
        (words["body_part"], header_text(source, "BodyPartExamined")),
    ]


# --- findings, figures, footer -------------------------------------------------------------


def size_text(size_mm: float | None, language: Language) -> str:
    """The size as "14 毫米" / "14 mm"; one decimal when the model gave one."""
    if size_mm is None:
        return ""
    number = f"{size_mm:.1f}".rstrip("0").rstrip(".")
    return f"{number} {MILLIMETRES[language]}"


def finding_rows(findings: Sequence[Finding], language: Language) -> list[dict[str, str]]:
    return [
        {
            "number": str(number),
            "location": finding.location or "",
            "finding": finding.label,
            "size": size_text(finding.size_mm, language),
            "density": finding.density or "",
            "boundary": finding.boundary or "",
        }
        for number, finding in enumerate(findings, start=1)
    ]


# The printable area of an A4 page with the margins of report.css, and the room for images.


def local_time(created_at: datetime, source: Dataset | None) -> datetime:
    """The report time in the source's Timezone Offset From UTC (PS3.3 C.12.1.1.8) when it
    has one, else in the node's local time; naive times are shown as they are."""
    if created_at.tzinfo is None:
        return created_at
    offset = header_text(source, "TimezoneOffsetFromUTC") if source is not None else ""
    match = re.fullmatch(r"([+-])(\d{2})(\d{2})", offset)
    if match is None:
        return created_at.astimezone()
    sign = -1 if match.group(1) == "-" else 1
    delta = timedelta(hours=int(match.group(2)), minutes=int(match.group(3)))
    return created_at.astimezone(timezone(sign * delta))


def time_text(moment: datetime) -> str:
    shown = moment.strftime("%Y-%m-%d %H:%M:%S")
    if moment.tzinfo is None:
        return shown
    offset = moment.strftime("%z")
    return f"{shown} UTC{offset[:3]}:{offset[3:]}"


def model_version(model: ModelIdentity) -> str:
    revision = model.revision[:12] if _HEX_REVISION.match(model.revision) else model.revision
    return f"{model.model_id} ({revision})"


def hardware_text(model: ModelIdentity) -> str:
    parts = [model.device, model.dtype]
    if model.quantization not in ("", "none"):
        parts.append(model.quantization)
    return ", ".join(part for part in parts if part and part != "unknown")


def footer_text(report: ReportDocument, source: Dataset | None, language: Language) -> str:
    """The footer: "生成时间 … | 模型版本 … | 硬件环境 …" (Generated | Model | Hardware)."""
    words = WORDS[language]
    return " | ".join(
        [
            f"{words['generated']} {time_text(local_time(report.created_at, source))}",
            f"{words['model_version']} {model_version(report.model)}",
            f"{words['hardware']} {hardware_text(report.model)}",
        ]
    )


def lang_attribute(text: object) -> Markup:
    """``lang="zh-CN"`` for text with CJK characters: the Noto CJK collection's face is
    chosen by language, and Chinese text must get the Simplified Chinese glyphs."""
    return Markup(' lang="zh-CN"') if _CJK.search(str(text)) else Markup("")


def model_line(model: ModelIdentity) -> str:
    return f"{model.display_name}; {hardware_text(model)}"


def conversation_rows(content: ReportContent, language: Language) -> list[dict[str, str]]:
    """The follow-up turns of an appended report, as the appendix lists them."""
    words = WORDS[language]
    turns = []
    for number, turn in enumerate(content.follow_up, start=1):
        notes = [words["about"].format(anchor=turn.anchor_id)] if turn.anchor_id else []
        if turn.answered_by == "node":
            notes.append(words["measured"])
        turns.append(
            {
                "number": str(number),
                "question": turn.question,
                "answer": turn.answer,
                "note": "; ".join(notes),
            }
        )
    return turns


def narrative_text(content: ReportContent) -> str:
    """The narrative without the follow-up Q&A an appended report adds to it
    (storage.conversations.appended_content): the appendix shows those."""
    follow_up = follow_up_text(content.follow_up)
    narrative = content.narrative
    if follow_up and narrative.endswith(follow_up):
        narrative = narrative[: -len(follow_up)]
    return narrative.strip()
