"""The structured result of one model run, shared by every part of the node.

It lives in storage/ because the inference worker writes it (Report.content_json), and the
DICOM SR/GSPS builders (dicom_node/) and the HL7 ORU builder (hl7_out/) read it; none of those
may import each other (docs/architecture.md, "Folders and what each may import").

Box conventions:
- ``box_2d`` is what MedGemma 1.5 emits: ``[y0, x0, y1, x1]`` normalised to 0..1000 of the
  square (padded) model input.
- ``region`` is the same box mapped back to pixel coordinates of the source image
  (column/row, 0-based, as DICOM PS3.3 C.18.6.1.1 SCOORD uses them), ready for SR and GSPS.

Text: every text the model wrote (and the question asked) is cleaned when a Finding,
ReportContent or ReportDocument is made, whether from the parser or from the database, so the
SR, GSPS, HL7 and JSON outputs all start from the same clean text (``clean_model_text``):
- the replacement character U+FFFD (what an invalid UTF-8 byte decodes to), control characters
  other than the line break, format characters, surrogates, private-use code points and
  non-characters are removed; TAB becomes a space;
- every line break (CR LF, CR, VT, FF, FS, GS, RS, NEL, U+2028, U+2029) becomes LF; blanks at
  the end of a line go;
- a finding's label, location, density and boundary are one line of at most
  ``MAX_PHRASE_CHARS`` (the DICOM ST limit, PS3.5 Table 6.2-1); other texts are at most
  ``MAX_TEXT_CHARS`` (the LT limit), which even fully HL7-escaped (3 characters for 1) stays
  inside the 65,536 characters of an HL7 v2.5 OBX-5.
Shorter per-field limits (LO 64 for a code meaning, SH 16, ...) are applied by each builder.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, Field, field_validator

MAX_TEXT_CHARS = 10_240  # LT, PS3.5 Table 6.2-1
MAX_PHRASE_CHARS = 1_024  # ST, PS3.5 Table 6.2-1

# Line breaks of every kind (str.splitlines() splits on all of them): they become LF.
_LINE_BREAKS = frozenset("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")
# Cc controls, Cf format, Cs surrogates, Co private use, Cn unassigned and non-characters.
_DROPPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn"})
_REPLACEMENT_CHARACTER = "\ufffd"


def _kept_character(character: str) -> str:
    if character in _LINE_BREAKS:
        return "\n"
    if character == "\t":
        return " "
    if character == _REPLACEMENT_CHARACTER:
        return ""
    return "" if unicodedata.category(character) in _DROPPED_CATEGORIES else character


def clean_model_text(text: str, limit: int = MAX_TEXT_CHARS) -> str:
    """``text`` without characters no output can carry, LF line breaks, ≤ ``limit`` characters.

    CR LF counts as one line break. Leading and trailing blank space is removed, and so is the
    blank space at the end of each line. Idempotent.
    """
    kept = "".join(_kept_character(c) for c in text.replace("\r\n", "\n"))
    lines = "\n".join(line.rstrip() for line in kept.split("\n"))
    return lines.strip()[:limit].rstrip()


def clean_model_phrase(text: str) -> str:
    """``clean_model_text`` on one line: line breaks and runs of blanks become one space."""
    return " ".join(clean_model_text(text).split())[:MAX_PHRASE_CHARS]


def _clean_phrase_or_none(value: str | None) -> str | None:
    return None if value is None else clean_model_phrase(value) or None


class Urgency(StrEnum):
    """How soon a physician should look. Triage may raise a priority, never lower it."""

    ROUTINE = "routine"
    URGENT = "urgent"
    CRITICAL = "critical"


class ParseStatus(StrEnum):
    """How the model text turned into a result."""

    OK = "ok"  # valid JSON object matching the schema
    NARRATIVE_ONLY = "narrative_only"  # no valid JSON: the text is kept as narrative
    EMPTY = "empty"  # the model produced no text


class Change(StrEnum):
    """How a finding changed since the prior study (comparison reports only)."""

    NEW = "new"
    STABLE = "stable"
    LARGER = "larger"
    SMALLER = "smaller"
    RESOLVED = "resolved"


class PixelRegion(BaseModel):
    """A box on one source image, in pixel coordinates (column = x, row = y), 0-based."""

    sop_instance_uid: str
    frame_number: int | None = None
    x0: float
    y0: float
    x1: float
    y1: float


class Finding(BaseModel):
    """One finding as the chest template asks for it (config/prompts)."""

    label: str = Field(description="The finding itself, e.g. 'nodule', 'pleural effusion'.")
    location: str | None = None
    size_mm: float | None = None
    density: str | None = None
    boundary: str | None = None
    box_2d: list[float] | None = Field(
        default=None, description="[y0, x0, y1, x1], 0..1000 of the padded model input"
    )
    image_index: int = Field(default=0, description="Which image of the report's study it is on")
    region: PixelRegion | None = None
    change: Change | None = Field(
        default=None, description="Change since the prior study, when one was compared"
    )

    @field_validator("label")
    @classmethod
    def _clean_label(cls, value: str) -> str:
        return clean_model_phrase(value)

    @field_validator("location", "density", "boundary")
    @classmethod
    def _clean_phrases(cls, value: str | None) -> str | None:
        return _clean_phrase_or_none(value)


class FollowUp(BaseModel):
    """One follow-up question and its answer, carried by a report appended to from a
    conversation (inference/conversation.py)."""

    question: str
    answer: str
    anchor_id: str | None = None  # the region (A1, A2, ...) the question was about
    answered_by: str = "model"  # "model", or "node" for a measurement from the pixel spacing


class ScopeVerdict(BaseModel):
    """Whether the study is within the model's validated scope, decided from its header
    (issue 12; the JSON report's ``"scope": {"in_scope": false, "reason": "..."}``)."""

    in_scope: bool = True
    reason: str = ""

    @field_validator("reason")
    @classmethod
    def _clean_reason(cls, value: str) -> str:
        return clean_model_text(value)


class ReportContent(BaseModel):
    """The parsed answer. ``findings`` empty and ``narrative`` set is a valid, normal result.
    ``scope``: set by the node, not the model; carried by a report appended to from a
    conversation, as it is about the same study."""

    parse_status: ParseStatus
    language: str = "en"
    findings: list[Finding] = Field(default_factory=list)
    impression: str = ""
    recommendation: str = ""
    urgency: Urgency | None = None
    narrative: str = ""
    follow_up: list[FollowUp] = Field(default_factory=list)
    # The model's own sentence on the comparison with the prior (comparison reports only).
    comparison: str = ""
    scope: ScopeVerdict | None = None

    @property
    def out_of_scope_reason(self) -> str | None:
        """What every output says when the study is outside the validated scope, else None."""
        if self.scope is None or self.scope.in_scope:
            return None
        return self.scope.reason or "outside the validated scope"

    @field_validator("impression", "recommendation", "narrative", "comparison")
    @classmethod
    def _clean_texts(cls, value: str) -> str:
        return clean_model_text(value)


class ModelIdentity(BaseModel):
    """Which model produced a result, recorded with every report (README, "What it does")."""

    model_id: str
    revision: str = "unknown"
    dtype: str = "unknown"
    quantization: str = "none"
    device: str = "cpu"
    library_versions: dict[str, str] = Field(default_factory=dict)
    is_test_model: bool = False
    # engine = "openai": what the inference server said about the model it served (base URL,
    # its /models entry: owned_by, root, created; the answer's system_fingerprint). Empty for a
    # model run in the node itself.
    server: dict[str, str] = Field(default_factory=dict)

    @property
    def display_name(self) -> str:
        prefix = "TEST MODEL – NOT FOR CLINICAL USE: " if self.is_test_model else ""
        return f"{prefix}{self.model_id} ({self.revision})"


# Why a report has no prior, in each report language ({...}: PriorComparison.reason_args).
# Technical details (a PACS's error text, a status code) stay as the node logged them.
PRIOR_REASONS: dict[str, dict[str, str]] = {
    "timeout": {
        "en": "the PACS did not answer within priors.total_timeout_s ({seconds} s)",
        "zh": "PACS 未在 priors.total_timeout_s（{seconds} 秒）内应答",
    },
    "query_failed": {
        "en": "{detail}",
        "zh": "既往检查查询失败：{detail}",
    },
    "search_error": {
        "en": "prior search failed ({error})",
        "zh": "既往检查查询出错（{error}）",
    },
    "no_patient_id": {
        "en": "the study has no Patient ID",
        "zh": "本检查没有患者 ID（Patient ID）",
    },
    "wildcard_patient_id": {
        "en": "the Patient ID contains a wildcard character (* or ?)",
        "zh": "患者 ID 含通配符（* 或 ?）",
    },
    "none_found": {
        "en": "no earlier {what} study of this patient within {days} days",
        "zh": "{days} 天内未找到该患者更早的 {what} 检查",
    },
    "no_image_arrived": {
        "en": "no image of the prior study of {date} arrived (C-{mode})",
        "zh": "{date} 的既往检查没有图像到达（C-{mode}）",
    },
    "not_rendered": {
        "en": "the prior study's images cannot be rendered",
        "zh": "既往检查的图像无法渲染",
    },
    "no_template": {
        "en": "no comparison question template matches the study",
        "zh": "没有与本检查匹配的对比问题模板",
    },
}


def _reason_text(code: str, language: str, values: dict[str, str]) -> str:
    """A PRIOR_REASONS message with its values, on one line."""
    return " ".join(PRIOR_REASONS[code][language].format(**values).split())


class PriorComparison(BaseModel):
    """What a report was compared with, or why it was made without a prior ([priors]).

    ``study_date`` is the prior's Study Date as DICOM writes it (YYYYMMDD); ``source`` how its
    images came: "get" or "move" from PACS, "stored" when the node already had them.
    """

    compared: bool
    study_instance_uid: str | None = None
    study_date: str | None = None
    modality: str = ""
    body_part: str = ""
    sop_instance_uids: list[str] = Field(default_factory=list)
    source: str = ""
    reason: str = ""  # in English: logs, status, the JSON report
    # The reason as a key of PRIOR_REASONS and its values, so each report says it in its own
    # language (empty in reports stored before: ``reason`` is then shown as it is).
    reason_code: str = ""
    reason_args: dict[str, str] = Field(default_factory=dict)
    seconds: float = 0.0

    @classmethod
    def without(cls, code: str, **args: object) -> PriorComparison:
        """No prior, for the reason ``code`` (PRIOR_REASONS) with its values."""
        values = {name: str(value) for name, value in args.items()}
        reason = _reason_text(code, "en", values)
        return cls(compared=False, reason=reason, reason_code=code, reason_args=values)

    def reason_in(self, language: str) -> str:
        """Why there is no prior, in ``language`` when the reason is a known one."""
        if language not in PRIOR_REASONS.get(self.reason_code, {}):
            return self.reason
        try:
            return _reason_text(self.reason_code, language, self.reason_args)
        except (KeyError, IndexError):  # values of another version of the catalogue
            return self.reason

    @property
    def display_date(self) -> str:
        date = self.study_date or ""
        return f"{date[:4]}-{date[4:6]}-{date[6:8]}" if len(date) == 8 else date or "unknown"

    def statement(self, language: str = "en") -> str:
        """One line for every output: what was compared, or that no prior was."""
        if self.compared:
            what = ", ".join(
                p
                for p in (
                    " ".join(filter(None, (self.modality, self.body_part))),
                    f"Study Instance UID {self.study_instance_uid}",
                )
                if p
            )
            if language == "zh":
                return f"与 {self.display_date} 的既往检查（{what}）对比。"
            return f"Compared with the prior study of {self.display_date} ({what})."
        if language == "zh":
            return f"未与既往检查对比：{self.reason_in(language)}"
        return f"No prior study compared: {self.reason_in(language)}"


class ReportDocument(BaseModel):
    """Everything the output builders need besides the source DICOM files."""

    report_id: int
    study_instance_uid: str
    version_number: int
    created_at: datetime
    content: ReportContent
    model: ModelIdentity
    question: str = ""
    source_sop_instance_uids: list[str] = Field(default_factory=list)
    # The report this version replaces (a report appended to from a conversation): its SR
    # lists the previous SR as Predecessor Document, its ORU is a correction.
    supersedes_report_id: int | None = None
    # Set when [priors] is enabled: the prior compared with, or why there was none.
    prior: PriorComparison | None = None

    @property
    def scope_notice(self) -> str | None:
        """``Outside the validated scope: <reason>`` when the study is outside it, else None."""
        reason = self.content.out_of_scope_reason
        return f"{OUT_OF_SCOPE_NOTICE}: {reason}" if reason else None

    @field_validator("question")
    @classmethod
    def _clean_question(cls, value: str) -> str:
        return clean_model_text(value)


TEST_MODEL_BANNER = "TEST MODEL – NOT FOR CLINICAL USE"
OUT_OF_SCOPE_NOTICE = "Outside the validated scope"
AI_DISCLAIMER = "AI-generated, preliminary, not verified — must be reviewed by a physician."
# The model card: MedGemma was not evaluated for multi-turn use (docs/architecture.md,
# "Model facts").
FOLLOW_UP_DISCLAIMER = (
    "Follow-up answers are preliminary AI output; the model was not evaluated for multi-turn "
    "conversations."
)


def follow_up_text(turns: Sequence[FollowUp]) -> str:
    """Follow-up questions and answers as plain text, one "Q:"/"A:" pair per turn."""
    if not turns:
        return ""
    lines = [f"Follow-up questions ({FOLLOW_UP_DISCLAIMER})"]
    for number, turn in enumerate(turns, start=1):
        about = f" [{turn.anchor_id}]" if turn.anchor_id else ""
        source = " (measured by the node)" if turn.answered_by == "node" else ""
        lines.append(f"Q{number}{about}: {turn.question}")
        lines.append(f"A{number}{source}: {turn.answer}")
    return "\n".join(lines)
