"""Model text -> ``ReportContent``: strict about structure, tolerant about wrapping.

What is accepted around the answer:
* a thinking block: everything up to and including the last ``<unused95>`` is dropped
  (MedGemma 1.5 thinks as ``<unused94>thought ... <unused95>``); an unclosed thinking block is
  no answer at all, so it is kept as narrative and never searched for JSON;
* Markdown fences (```json ... ```), bare JSON, JSON with prose before or after it, and a
  ``Final Answer:`` / ``最终答案：`` line (JSON after the last such line is preferred);
* the report object the templates ask for (config/prompts), a single finding object, a
  top-level list of findings (MedGemma's localisation format ``[{"box_2d": [...], "label":
  ...}]``), and findings given as plain strings.

What is never done: repairing JSON (a truncated or otherwise invalid object makes the whole
answer narrative-only, and no object nested inside a broken one is ever used), inventing a
finding or a label. Field by field:
* ``box_2d`` must be 4 finite numbers within 0..1000 with y0 <= y1 and x0 <= x1; an invalid
  box is removed and the finding kept (the text of the finding is still the model's
  statement), with a note;
* ``image_index`` must be an integer within the images sent; otherwise the box is removed
  (it cannot be placed) and the index set to 0, with a note;
* ``urgency`` outside routine/urgent/critical (or their Chinese terms) becomes None;
* ``size_mm`` takes a number, or the largest number in a string with an mm/cm unit;
* ``change`` (comparison reports) outside new/stable/larger/smaller/resolved (or their Chinese
  terms) becomes None; ``comparison`` is the model's sentence on the prior.

Text is cleaned where it becomes report content (``storage.report_schema.clean_model_text``:
no replacement, control or format characters, LF line breaks, bounded lengths), before any
emptiness check, so a label made only of unusable characters counts as no label.

Notes are plain structural remarks without patient data, meant for the worker's log.
Parsing never raises.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from storage.report_schema import (
    Change,
    Finding,
    ParseStatus,
    ReportContent,
    Urgency,
    clean_model_phrase,
    clean_model_text,
)

log = logging.getLogger(__name__)

THINKING_START = "<unused94>"
THINKING_END = "<unused95>"
# Tokens that only appear when text was decoded with special tokens kept.
STRAY_TOKENS = ("<end_of_turn>", "<start_of_turn>", "<eos>", "<pad>", "<bos>")
FINAL_ANSWER = re.compile(r"(?:final\s+answer|最终答案|最终回答)\s*[:：]", re.IGNORECASE)
FENCE = re.compile(r"```[A-Za-z0-9_-]*[ \t]*\n?")
BOX_SCALE = 1000.0
REPORT_KEYS = frozenset({"findings", "impression", "recommendation", "urgency"})
FINDING_KEYS = frozenset({"label", "box_2d"})
URGENCY_WORDS = {
    "routine": Urgency.ROUTINE,
    "urgent": Urgency.URGENT,
    "critical": Urgency.CRITICAL,
    "常规": Urgency.ROUTINE,
    "紧急": Urgency.URGENT,
    "危急": Urgency.CRITICAL,
}
SIZE_NUMBER = re.compile(r"(\d+(?:\.\d+)?)")
SIZE_CM = re.compile(r"(?:\d\s*cm\b|厘米)", re.IGNORECASE)


@dataclass
class ParsedOutput:
    content: ReportContent
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Span:
    """A balanced bracket span of the text that decodes as JSON."""

    start: int
    end: int
    value: Any


# --------------------------------------------------------------------------- text cleaning


def strip_thinking(text: str) -> tuple[str, bool]:
    """(answer text, True when the thinking block was never closed)."""
    if THINKING_END in text:
        return text.rsplit(THINKING_END, 1)[1], False
    if THINKING_START in text:
        return text.split(THINKING_START, 1)[1].removeprefix("thought"), True
    return text, False


def _clean(text: str) -> str:
    for token in STRAY_TOKENS:
        text = text.replace(token, "")
    return clean_model_text(text)


# --------------------------------------------------------------------------- finding JSON


def _balanced_end(text: str, start: int) -> int | None:
    """Index just past the bracket closing ``text[start]``; None when the text ends first
    (truncated); the negated index of a mismatched closing bracket."""
    closing = {"{": "}", "[": "]"}
    stack: list[str] = []
    i = start
    while i < len(text):
        ch = text[i]
        if ch == '"':
            i = _string_end(text, i)
            if i < 0:
                return None
            continue
        if ch in closing:
            stack.append(closing[ch])
        elif ch in "}]":
            if ch != stack.pop():
                return -i - 1
            if not stack:
                return i + 1
        i += 1
    return None


def _string_end(text: str, quote: int) -> int:
    """Index past the closing quote of the JSON string opening at ``quote``; -1 if none."""
    i = quote + 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == '"':
            return i + 1
        i += 1
    return -1


def json_spans(text: str) -> tuple[list[_Span], bool]:
    """Top-level JSON values in ``text`` and whether a value was cut off at the end.

    A balanced span that is not valid JSON is skipped whole: objects nested inside a broken
    one are never used. Scanning stops at a span the text ends inside (truncation).
    """
    spans: list[_Span] = []
    i = 0
    while i < len(text):
        if text[i] not in "{[":
            i += 1
            continue
        end = _balanced_end(text, i)
        if end is None:
            return spans, True
        if end < 0:  # mismatched bracket: not JSON; resume after it
            i = -end
            continue
        with contextlib.suppress(ValueError):  # balanced but not JSON: skip it whole
            spans.append(_Span(i, end, json.loads(text[i:end])))
        i = end
    return spans, False


def _is_finding_dict(value: Any) -> bool:
    return isinstance(value, dict) and bool(FINDING_KEYS & value.keys())


def _report_shape(value: Any) -> dict[str, Any] | None:
    """The value as a report dict when it has a shape the node understands."""
    if isinstance(value, dict) and REPORT_KEYS & value.keys():
        return value
    if _is_finding_dict(value):
        return {"findings": [value]}
    if isinstance(value, list) and all(_is_finding_dict(v) for v in value):
        return {"findings": value}
    return None


def _choose_span(text: str, spans: list[_Span]) -> tuple[_Span, dict[str, Any]] | None:
    """The first usable span after the last "Final Answer:", else the first usable one."""
    usable = [(s, shape) for s in spans if (shape := _report_shape(s.value)) is not None]
    if not usable:
        return None
    markers = list(FINAL_ANSWER.finditer(text))
    if markers:
        after = [(s, shape) for s, shape in usable if s.start >= markers[-1].end()]
        if after:
            return after[0]
    return usable[0]


# --------------------------------------------------------------------------- field values


def _text(value: Any) -> str | None:
    if isinstance(value, str):
        return clean_model_text(value) or None
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return clean_model_text("\n".join(clean_model_text(v) for v in value)) or None
    return None


def _phrase(value: Any) -> str | None:
    """A one-line text (a finding's label, location, ...), or None."""
    text = _text(value)
    if text is None:
        return None
    return clean_model_phrase(text) or None


def _size_mm(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) and value >= 0 else None
    if isinstance(value, str):
        numbers = [float(n) for n in SIZE_NUMBER.findall(value)]
        if not numbers:
            return None
        factor = 10.0 if SIZE_CM.search(value) else 1.0
        return max(numbers) * factor
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def validate_box(value: Any) -> list[float] | None:
    """``[y0, x0, y1, x1]`` within 0..1000, y0 <= y1 and x0 <= x1; otherwise None."""
    if not isinstance(value, list) or len(value) != 4 or not all(_is_number(v) for v in value):
        return None
    y0, x0, y1, x1 = (float(v) for v in value)
    if not all(0.0 <= v <= BOX_SCALE for v in (y0, x0, y1, x1)) or y0 > y1 or x0 > x1:
        return None
    return [y0, x0, y1, x1]


def _urgency(value: Any, notes: list[str]) -> Urgency | None:
    if value is None:
        return None
    word = value.strip().lower() if isinstance(value, str) else ""
    if word in URGENCY_WORDS:
        return URGENCY_WORDS[word]
    if word or not isinstance(value, str):
        notes.append(f"urgency {value!r} is not routine/urgent/critical: left empty")
    return None


CHANGE_WORDS = {
    **{change.value: change for change in Change},
    "新发": Change.NEW,
    "新出现": Change.NEW,
    "稳定": Change.STABLE,
    "无变化": Change.STABLE,
    "增大": Change.LARGER,
    "缩小": Change.SMALLER,
    "消失": Change.RESOLVED,
    "吸收": Change.RESOLVED,
    "unchanged": Change.STABLE,
    "increased": Change.LARGER,
    "decreased": Change.SMALLER,
}


def _change(value: Any, position: int, notes: list[str]) -> Change | None:
    if value is None:
        return None
    word = value.strip().lower() if isinstance(value, str) else ""
    if word in CHANGE_WORDS:
        return CHANGE_WORDS[word]
    notes.append(f"finding {position}: change {value!r} is not new/stable/larger/smaller/resolved")
    return None


def _image_index(raw: Any, position: int, image_count: int | None, notes: list[str]) -> int | None:
    """The image index, or None when it is unusable (the caller then drops the box)."""
    if raw is None:
        return 0
    valid = isinstance(raw, int) and not isinstance(raw, bool) and raw >= 0
    if valid and (image_count is None or raw < image_count):
        return int(raw)
    notes.append(f"finding {position}: image_index {raw!r} is not an image sent: box removed")
    return None


def _finding(item: Any, position: int, image_count: int | None, notes: list[str]) -> Finding | None:
    if isinstance(item, str):
        phrase = clean_model_phrase(item)
        return Finding(label=phrase) if phrase else None
    if not isinstance(item, dict):
        notes.append(f"finding {position}: not an object: dropped")
        return None
    label = _phrase(item.get("label"))
    if label is None:
        notes.append(f"finding {position}: no label: dropped")
        return None
    box = validate_box(item.get("box_2d"))
    if item.get("box_2d") is not None and box is None:
        notes.append(f"finding {position}: box_2d {item.get('box_2d')!r} invalid: box removed")
    image_index = _image_index(item.get("image_index"), position, image_count, notes)
    if image_index is None:
        image_index, box = 0, None
    try:
        return Finding(
            label=label,
            size_mm=_size_mm(item.get("size_mm")),
            box_2d=box,
            image_index=image_index,
            location=_phrase(item.get("location")),
            density=_phrase(item.get("density")),
            boundary=_phrase(item.get("boundary")),
            change=_change(item.get("change"), position, notes),
        )
    except ValidationError as exc:
        notes.append(f"finding {position}: {exc.error_count()} invalid values: dropped")
        return None


def _findings(raw: Any, image_count: int | None, notes: list[str]) -> tuple[list[Finding], str]:
    """(findings, free text the model put under "findings" instead of a list)."""
    if raw is None:
        return [], ""
    if isinstance(raw, str):
        return [], raw.strip()
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list):
        notes.append(f"findings of type {type(raw).__name__} ignored")
        return [], ""
    found = [_finding(item, n, image_count, notes) for n, item in enumerate(raw)]
    return [f for f in found if f is not None], ""


# --------------------------------------------------------------------------- entry points


def _narrative_around(text: str, span: _Span) -> str:
    """The prose outside the chosen JSON, without fence markers or a Final Answer label."""
    outside = text[: span.start] + "\n" + text[span.end :]
    outside = FENCE.sub("", outside)
    outside = FINAL_ANSWER.sub("", outside)
    lines = "\n".join(line.rstrip() for line in outside.strip().splitlines())
    return re.sub(r"\n{3,}", "\n\n", lines).strip()


def _structured(
    text: str, span: _Span, shape: dict[str, Any], language: str, image_count: int | None
) -> ParsedOutput:
    notes: list[str] = []
    findings, findings_text = _findings(shape.get("findings"), image_count, notes)
    raw_findings = shape.get("findings")
    all_dropped = isinstance(raw_findings, list) and bool(raw_findings) and not findings
    if all_dropped and not (_text(shape.get("impression")) or findings_text):
        # Every finding was unusable and nothing else was said: not a normal study.
        return _narrative_only(text, language, [*notes, "no usable finding in the JSON"])
    narrative = "\n\n".join(p for p in (_narrative_around(text, span), findings_text) if p)
    content = ReportContent(
        parse_status=ParseStatus.OK,
        language=language,
        findings=findings,
        impression=_text(shape.get("impression")) or "",
        recommendation=_text(shape.get("recommendation")) or "",
        urgency=_urgency(shape.get("urgency"), notes),
        narrative=narrative,
        comparison=_text(shape.get("comparison")) or "",
    )
    return ParsedOutput(content, notes)


def _narrative_only(text: str, language: str, notes: list[str]) -> ParsedOutput:
    content = ReportContent(
        parse_status=ParseStatus.NARRATIVE_ONLY, language=language, narrative=text
    )
    return ParsedOutput(content, notes)


def _parse(text: str | None, language: str, image_count: int | None) -> ParsedOutput:
    answer, unclosed_thinking = strip_thinking(text or "")
    answer = _clean(answer)
    if not answer:
        return ParsedOutput(ReportContent(parse_status=ParseStatus.EMPTY, language=language))
    if unclosed_thinking:
        return _narrative_only(answer, language, ["thinking block not closed: no answer"])
    spans, truncated = json_spans(answer)
    chosen = _choose_span(answer, spans)
    if chosen is not None:
        parsed = _structured(answer, chosen[0], chosen[1], language, image_count)
        if truncated:
            parsed.notes.append("text after the JSON answer was cut off")
        return parsed
    note = "JSON cut off before its end" if truncated else "no JSON answer found"
    return _narrative_only(answer, language, [note])


def parse_report(
    text: str | None, language: str = "en", image_count: int | None = None
) -> ParsedOutput:
    """Parse model text into a validated ReportContent plus notes; never raises.

    ``image_count``: how many images the request carried, to check ``image_index``.
    """
    try:
        return _parse(text, language, image_count)
    except Exception as exc:  # a parser bug must not lose the model's answer
        log.exception("model output parser failed")
        cleaned = _clean(text or "")
        status = ParseStatus.NARRATIVE_ONLY if cleaned else ParseStatus.EMPTY
        content = ReportContent(parse_status=status, language=language, narrative=cleaned)
        return ParsedOutput(content, [f"parser error {type(exc).__name__}: text kept"])


def parse_model_output(
    text: str | None, language: str = "en", image_count: int | None = None
) -> ReportContent:
    """``parse_report`` without the notes."""
    return parse_report(text, language, image_count).content
