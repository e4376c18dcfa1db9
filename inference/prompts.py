"""The question the model is asked for a study: templates chosen by modality, body part, sender.

Templates are TOML files. The node ships ``config/prompts/*.toml``; a site adds or overrides
templates in ``ModelSettings.prompts_dir`` without code changes. One file is one template::

    description = "Chest radiograph: structured findings with boxes"
    en = "..."            # the question in English
    zh = "..."            # the question in Chinese (at least one of en/zh)
    question_first = false         # optional: ask the question before the images

    [match]               # every key optional; a missing key matches anything
    modality = ["CR", "DX"]        # (0008,0060) Modality, a string or a list
    body_part = ["CHEST"]          # (0018,0015) Body Part Examined
    calling_ae = ["ER_CR01"]       # the sending AE title
    comparison = true              # a comparison template: used only with a prior ([priors])

    [scope]               # optional: the studies this question was validated for
    name = "chest radiograph"
    modality = ["CR", "DX"]
    body_part = ["CHEST"]
    keywords = ["chest", "胸"]     # a description naming the region, English or Chinese
    view_position = ["PA", "AP"]

Comparison templates are asked when the node found the patient's prior study: the model gets
the prior image first, then the current images, and ``{prior_date}`` in the text becomes the
prior's date (YYYY-MM-DD). Other templates are asked when there is no prior.

Selection: among the templates whose keys all match, the most specific wins — a calling AE
counts 4, a body part 2, a modality 1. At equal rank a site template beats a shipped one, and
a site file with the same name as a shipped file replaces it. Remaining ties go to the file
name that sorts first. ``default.toml`` (no keys) matches every study.

``question_first`` (a boolean, default false): the model reads the question, then the images
(the order of Google's model card examples) instead of the images, then the question. Every
study of a batch then starts with the same tokens, which the CUDA fast path runs once for the
batch (inference/shared_prefix.py). The shipped templates keep the images first: answers in
the other order have not been validated with the real weights; benchmarks/shared_prefix.py
measures the gain.

``[scope]`` and the rule that reads it: inference/scope.py. A study outside every declared
scope gets the most specific template that declares none (the generic question).
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator

import config
from config.settings import ModelSettings
from core.errors import InferenceError
from core.validation import format_validation_error
from inference.scope import ScopeRule

SHIPPED_PROMPTS_DIR = Path(config.__file__).resolve().parent / "prompts"  # package data
LANGUAGES = ("en", "zh")
RANK_CALLING_AE = 4
RANK_BODY_PART = 2
RANK_MODALITY = 1


class PromptTemplateError(InferenceError, ValueError):
    """A template file cannot be used; ``str()`` names the file and the problem."""


def _as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


class _MatchKeys(BaseModel):
    model_config = ConfigDict(extra="forbid")

    modality: list[str] = Field(default_factory=list)
    body_part: list[str] = Field(default_factory=list)
    calling_ae: list[str] = Field(default_factory=list)
    comparison: bool = False

    @field_validator("modality", "body_part", "calling_ae", mode="before")
    @classmethod
    def _listify(cls, value: str | list[str]) -> list[str]:
        return _as_list(value)

    @field_validator("modality", "body_part", "calling_ae")
    @classmethod
    def _no_blank(cls, values: list[str]) -> list[str]:
        if any(not v.strip() for v in values):
            raise ValueError("values must not be blank")
        return [v.strip() for v in values]


class _ScopeKeys(_MatchKeys):
    name: str = Field(default="validated study", min_length=1)
    keywords: list[str] = Field(default_factory=list)
    view_position: list[str] = Field(default_factory=list)

    @field_validator("keywords", "view_position", mode="before")
    @classmethod
    def _listify_more(cls, value: str | list[str]) -> list[str]:
        return _as_list(value)

    def rule(self) -> ScopeRule:
        return ScopeRule(
            name=self.name.strip(),
            modalities=frozenset(m.upper() for m in self.modality),
            body_parts=frozenset(b.upper() for b in self.body_part),
            keywords=tuple(k.strip().lower() for k in self.keywords if k.strip()),
            view_positions=frozenset(v.strip().upper() for v in self.view_position),
        )


class _TemplateFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: str = ""
    en: str | None = None
    zh: str | None = None
    # Strict: a TOML boolean, not a string or number pydantic would read as one.
    question_first: StrictBool = False
    match: _MatchKeys = Field(default_factory=_MatchKeys)
    scope: _ScopeKeys | None = None

    @field_validator("en", "zh")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("the question text is empty")
        return value


@dataclass(frozen=True)
class PromptTemplate:
    """One template file, validated. Match keys are upper-cased except the AE title."""

    name: str  # file name without .toml
    source: Path
    description: str
    texts: dict[str, str]  # language -> question
    modalities: frozenset[str]
    body_parts: frozenset[str]
    calling_aes: frozenset[str]
    from_site: bool = False
    comparison: bool = False
    scope: ScopeRule | None = None  # the studies its question was validated for
    question_first: bool = False  # the question before the images in the user turn

    @property
    def rank(self) -> int:
        return (
            RANK_CALLING_AE * bool(self.calling_aes)
            + RANK_BODY_PART * bool(self.body_parts)
            + RANK_MODALITY * bool(self.modalities)
        )

    def matches(self, modality: str, body_part: str, calling_ae: str) -> bool:
        return (
            (not self.modalities or modality.strip().upper() in self.modalities)
            and (not self.body_parts or body_part.strip().upper() in self.body_parts)
            and (not self.calling_aes or calling_ae.strip() in self.calling_aes)
        )

    def text(self, language: str) -> tuple[str, str]:
        """(question, language used): the requested language, else the other one."""
        if language in self.texts:
            return self.texts[language], language
        fallback = next(lang for lang in LANGUAGES if lang in self.texts)
        return self.texts[fallback], fallback


@dataclass(frozen=True)
class Prompt:
    """The question chosen for a study, with where it came from (for logs and audit)."""

    text: str
    language: str
    template_name: str
    source: Path
    question_first: bool = False  # the template's order: the question before the images


def load_template(path: Path, from_site: bool = False) -> PromptTemplate:
    """Read and validate one template file; every error names the file."""
    try:
        with path.open("rb") as handle:
            raw = tomllib.load(handle)
    except OSError as exc:
        raise PromptTemplateError(f"{path}: cannot read ({exc})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise PromptTemplateError(f"{path}: not valid TOML: {exc}") from exc
    try:
        parsed = _TemplateFile.model_validate(raw)
    except ValidationError as exc:
        details = format_validation_error(exc, separator="; ", root="(file)")
        raise PromptTemplateError(f"{path}: {details}") from exc
    texts = {lang: text.strip() for lang in LANGUAGES if (text := getattr(parsed, lang))}
    if not texts:
        raise PromptTemplateError(f"{path}: needs a question in 'en' or 'zh'")
    return PromptTemplate(
        name=path.stem,
        source=path,
        description=parsed.description,
        texts=texts,
        modalities=frozenset(m.upper() for m in parsed.match.modality),
        body_parts=frozenset(b.upper() for b in parsed.match.body_part),
        calling_aes=frozenset(parsed.match.calling_ae),
        from_site=from_site,
        comparison=parsed.match.comparison,
        scope=parsed.scope.rule() if parsed.scope is not None else None,
        question_first=parsed.question_first,
    )


def load_templates(directory: Path, from_site: bool = False) -> list[PromptTemplate]:
    """All ``*.toml`` templates of a directory, in file-name order."""
    if not directory.is_dir():
        raise PromptTemplateError(f"{directory}: prompt template directory not found")
    return [load_template(p, from_site) for p in sorted(directory.glob("*.toml"))]


class PromptLibrary:
    """The shipped templates with a site's templates layered on top."""

    def __init__(self, site_dir: Path | None = None, shipped_dir: Path = SHIPPED_PROMPTS_DIR):
        by_name = {t.name: t for t in load_templates(shipped_dir)}
        if site_dir is not None:
            by_name.update({t.name: t for t in load_templates(site_dir, from_site=True)})
        self.templates: list[PromptTemplate] = sorted(by_name.values(), key=lambda t: t.name)

    @classmethod
    def load(cls, site_dir: Path | None = None) -> PromptLibrary:
        """The shipped templates plus those of ``site_dir`` (ModelSettings.prompts_dir)."""
        return cls(site_dir=site_dir)

    @classmethod
    def from_settings(cls, settings: ModelSettings) -> PromptLibrary:
        return cls(site_dir=settings.prompts_dir)

    @property
    def scope_rules(self) -> list[ScopeRule]:
        """The declared validated scopes, in template-name order (inference/scope.py)."""
        return [t.scope for t in self.templates if t.scope is not None]

    def candidates(
        self,
        modality: str,
        body_part: str,
        calling_ae: str,
        comparison: bool = False,
        in_scope: bool = True,
    ) -> list[PromptTemplate]:
        """Matching templates (comparison templates only when ``comparison``), best first;
        out of scope, only those that declare no scope."""
        matching: Iterable[PromptTemplate] = (
            t
            for t in self.templates
            if t.comparison == comparison
            and t.matches(modality, body_part, calling_ae)
            and (in_scope or t.scope is None)
        )
        return sorted(matching, key=lambda t: (-t.rank, not t.from_site, t.name))

    def select(
        self,
        modality: str,
        body_part: str = "",
        calling_ae: str = "",
        language: str = "en",
        comparison: bool = False,
        in_scope: bool = True,
    ) -> Prompt:
        """The most specific template for the study; raise when none matches (no default).
        ``in_scope`` False: a study outside the validated scope gets the generic question."""
        found = self.candidates(modality, body_part, calling_ae, comparison, in_scope)
        if not found:
            kind = "comparison " if comparison else ""
            raise PromptTemplateError(
                f"no {kind}prompt template matches modality={modality!r} "
                f"body_part={body_part!r} calling_ae={calling_ae!r}; add a default.toml without "
                "[match] keys" + (" but comparison = true" if comparison else "")
            )
        best = found[0]
        text, used_language = best.text(language)
        return Prompt(
            text=text,
            language=used_language,
            template_name=best.name,
            source=best.source,
            question_first=best.question_first,
        )

    def question(
        self, modality: str, body_part: str = "", calling_ae: str = "", language: str = "en"
    ) -> str:
        """The question text alone (see ``select`` for the template it came from)."""
        return self.select(modality, body_part, calling_ae, language).text


def check_templates(settings: ModelSettings) -> PromptLibrary:
    """Load every template the worker will use, at start-up; raise PromptTemplateError naming
    the setting, the file and the key in it (e.g. ``model.prompts_dir = /etc/prompts:
    /etc/prompts/chest.toml: match.modalty: Extra inputs are not permitted``)."""
    try:
        return PromptLibrary.from_settings(settings)
    except PromptTemplateError as exc:
        site = settings.prompts_dir
        if site is not None and str(exc).startswith(str(site)):
            raise PromptTemplateError(f"model.prompts_dir = {site}: {exc}") from exc
        raise
