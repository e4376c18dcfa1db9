"""Whether a study is inside the scope its question was validated for, from its header.

A question template may declare the studies it was validated for in a ``[scope]`` table
(inference/prompts.py); the shipped chest radiograph template does::

    [scope]
    name = "chest radiograph"                   # used in the reason
    modality = ["CR", "DX"]                     # (0008,0060) Modality must be one of these
    body_part = ["CHEST", "THORAX", "LUNG"]     # (0018,0015) Body Part Examined ...
    keywords = ["chest", "thorax", "胸", "肺"]   # ... or a description naming the region
    view_position = ["PA", "AP", "LL", "RL"]    # (0018,5101) when present, one of these

The rule per template: the Modality is one of ``modality``; the Body Part Examined is one of
``body_part``, or, when it is not (absent, or something a modality wrote by habit), one of the
descriptions (Study Description, Series Description, Protocol Name, Requested Procedure
Description, Body Part Examined itself) contains a keyword, compared case-insensitively in
English and as written in Chinese; and a View Position, when the header has one, is one of
``view_position``. A key left out accepts anything.

A study is in scope when any template with a ``[scope]`` table accepts it; when no template
has one, every study is (nothing was declared validated). Otherwise the reason comes from the
first scoped template, e.g. ``not a chest radiograph: Body Part Examined EXTREMITY and no
description names the region``. What happens then is ``[scope] out_of_scope``: ``flag``
(the generic question, and every output says so) or ``skip`` (no report; the job is skipped).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pydicom import Dataset

from core.errors import InferenceError
from storage.report_schema import ScopeVerdict

_DESCRIPTIONS = (
    "StudyDescription",
    "SeriesDescription",
    "ProtocolName",
    "RequestedProcedureDescription",
    "BodyPartExamined",
)


class StudyOutOfScope(InferenceError):
    """The study is outside the validated scope and ``[scope] out_of_scope = "skip"``; ``str()``
    is the reason (it names header values such as the modality, never the patient)."""


@dataclass(frozen=True)
class ScopeRule:
    """One template's validated scope; empty sets accept anything."""

    name: str
    modalities: frozenset[str]
    body_parts: frozenset[str]
    keywords: tuple[str, ...]  # lower case
    view_positions: frozenset[str]


@dataclass(frozen=True)
class StudyHeader:
    """What the scope rule reads from a study's first instance."""

    modality: str
    body_part: str
    view_position: str
    descriptions: tuple[str, ...]

    @classmethod
    def of(cls, dataset: Dataset) -> StudyHeader:
        descriptions = [_text(dataset, keyword) for keyword in _DESCRIPTIONS]
        for request in dataset.get("RequestAttributesSequence") or []:
            descriptions.append(_text(request, "RequestedProcedureDescription"))
        return cls(
            modality=_text(dataset, "Modality").upper(),
            body_part=_text(dataset, "BodyPartExamined").upper(),
            view_position=_text(dataset, "ViewPosition").upper(),
            descriptions=tuple(d for d in descriptions if d),
        )


def decide_scope(header: StudyHeader, rules: Iterable[ScopeRule]) -> ScopeVerdict:
    """In scope when a rule accepts the header (or there is no rule); else the first rule's
    reason for refusing it."""
    reasons = [(rule, refusal(rule, header)) for rule in rules]
    if not reasons or any(reason is None for _, reason in reasons):
        return ScopeVerdict(in_scope=True)
    rule, reason = reasons[0]
    return ScopeVerdict(in_scope=False, reason=f"not a {rule.name}: {reason}")


def refusal(rule: ScopeRule, header: StudyHeader) -> str | None:
    """Why ``rule`` does not accept the study, or None when it does."""
    if rule.modalities and header.modality not in rule.modalities:
        return f"Modality {header.modality or '(none)'} is not {'/'.join(sorted(rule.modalities))}"
    if rule.body_parts or rule.keywords:
        named = header.body_part in rule.body_parts or _names_region(rule, header.descriptions)
        if not named:
            return (
                f"Body Part Examined {header.body_part or '(none)'} and no description names "
                "the region"
            )
    view = header.view_position
    if rule.view_positions and view and view not in rule.view_positions:
        return f"View Position {view} is not a validated view"
    return None


def _names_region(rule: ScopeRule, descriptions: Iterable[str]) -> bool:
    return any(keyword in text.lower() for text in descriptions for keyword in rule.keywords)


def _text(dataset: Dataset, keyword: str) -> str:
    try:
        value = dataset.get(keyword)
    except Exception:  # an undecodable value is no description
        return ""
    if value is None:
        return ""
    if not isinstance(value, str):
        value = value[0] if isinstance(value, list | tuple) and value else str(value)
    return str(value).strip()
