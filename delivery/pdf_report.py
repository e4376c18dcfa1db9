"""The PDF of one AI report, in Chinese or English: HTML from a Jinja2 template, set by WeasyPrint.

    renderer = PdfReportRenderer()                      # once per process: fonts, template
    pdf = renderer.render(PdfReportRequest(report, sources, institution="..."))

What a page carries (every output says it is an unverified AI result):

* every page: the watermark "AI辅助分析 结论仅供参考，须由执业医师复核确认" (English: "AI-assisted
  analysis: preliminary, must be reviewed by a licensed physician"), the footer
  "生成时间 | 模型版本 | 硬件环境" (generated at, model id and revision, device), page x / n,
  and the TEST MODEL banner for test-model reports;
* page 1: institution, title, status (preliminary, UNVERIFIED), the AI disclaimer, "outside the
  validated scope: <reason>" when given, the report it supersedes, the patient and study
  header from the source image (name, id, sex, age, study date, accession, modality, body part:
  a clinical document carries PHI, logs never do), the image(s) with the numbered boxes, the
  findings table (部位, 征象, 测量, 密度, 边界 with units in Chinese, e.g. "14 毫米"), impression,
  recommendation, urgency, narrative, the question asked and the model identity;
* an appendix with the follow-up questions and answers of a report appended to from a
  conversation (ReportContent.follow_up; labelled: the model was not evaluated for multi-turn
  use).

The output is a pure function of the request: the creation date is the report's, the PDF
identifier is derived from the study and report, and fonts are embedded as subsets, so a
rebuild yields the same bytes and the PDF reads the same on a machine without the fonts.
Nothing is fetched: the stylesheet refers only to the font files found by ``pdf_fonts`` and the
images are handed over in memory (``report-image:<n>`` URLs); any other URL is refused.

The template (``templates/report.html.j2`` + ``report.css``) is plain HTML and CSS so the web
console can show the same report; its words, the patient header, the footer and the appendix
rows are delivery.pdf_text.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup
from pydicom import Dataset
from weasyprint import CSS, HTML
from weasyprint.text.fonts import FontConfiguration
from weasyprint.urls import URLFetcher, URLFetcherResponse

from core.errors import DeliveryError
from delivery.pdf_fonts import ReportFonts, check_pdf_fonts, missing_cjk_font
from delivery.pdf_text import (
    URGENCY_WORDS,
    WORDS,
    Language,
    conversation_rows,
    finding_rows,
    footer_text,
    header_text,
    lang_attribute,
    local_time,
    model_line,
    narrative_text,
    patient_header,
    time_text,
)
from delivery.report_image import RenderedImage, ReportImageError, render_report_image
from storage.report_schema import (
    TEST_MODEL_BANNER,
    Finding,
    PixelRegion,
    ReportDocument,
)

TEMPLATES = Path(__file__).parent / "templates"
TEMPLATE_NAME = "report.html.j2"
STYLESHEET_NAME = "report.css"
IMAGE_SCHEME = "report-image"
MAX_FIGURES = 4


class PdfReportError(DeliveryError):
    """The PDF could not be made from this report."""


# --- what the PDF is made from -------------------------------------------------------------


@dataclass(frozen=True)
class SupersededReport:
    """The earlier report of the same study that this one replaces."""

    report_id: int
    created_at: datetime | None = None


@dataclass(frozen=True)
class PdfReportRequest:
    """Everything one PDF is made from.

    ``sources``: the images the report was made from (with pixel data), the reported study's
    first; ``language``: "en" or "zh", default the report's own; ``institution``: the
    ``[identity] institution_name`` setting; ``supersedes``: the replaced report with its time
    (default: the report's ``supersedes_report_id`` alone); the appendix shows the report's
    ``content.follow_up``.
    """

    report: ReportDocument
    sources: Sequence[Dataset]
    institution: str | None = None
    language: str | None = None
    supersedes: SupersededReport | None = None
    out_of_scope_reason: str | None = None

    @property
    def replaced(self) -> SupersededReport | None:
        if self.supersedes is not None:
            return self.supersedes
        old = self.report.supersedes_report_id
        return SupersededReport(old) if old is not None else None

    @property
    def resolved_language(self) -> Language:
        wanted = (self.language or self.report.content.language or "en").lower()
        return "zh" if wanted.startswith("zh") else "en"


FIGURE_MAX_WIDTH_MM = 180.0
FIGURE_MAX_HEIGHT_MM = (120.0, 95.0)  # one image; each of several


@dataclass(frozen=True)
class NumberedRegion:
    number: int
    label: str
    region: PixelRegion


@dataclass(frozen=True)
class BoxOverlay:
    """One box over a figure, in percent of the image (CSS left/top/width/height)."""

    number: int
    label: str
    left: float
    top: float
    width: float
    height: float

    @property
    def tag_below(self) -> bool:
        # No room above a box at the top edge: its tag goes under the top line instead.
        return self.top < 5.0


@dataclass(frozen=True)
class Figure:
    url: str | None  # report-image:<n>, None when the image could not be rendered
    caption: str
    width_mm: float = 0.0
    height_mm: float = 0.0
    boxes: tuple[BoxOverlay, ...] = ()


def _reported_first(request: PdfReportRequest) -> list[Dataset]:
    """The sources, the reported study's images first (priors after), order kept."""
    study = request.report.study_instance_uid
    in_study = [str(ds.get("StudyInstanceUID", "")) == study for ds in request.sources]
    current = [ds for ds, mine in zip(request.sources, in_study, strict=True) if mine]
    others = [ds for ds, mine in zip(request.sources, in_study, strict=True) if not mine]
    return current + others


def _regions_by_image(findings: Sequence[Finding]) -> dict[str, list[NumberedRegion]]:
    """The boxed findings per image, numbered as in the table (and the SR)."""
    by_image: dict[str, list[NumberedRegion]] = {}
    for number, finding in enumerate(findings, start=1):
        if finding.region is not None:
            by_image.setdefault(finding.region.sop_instance_uid, []).append(
                NumberedRegion(number, finding.label, finding.region)
            )
    return by_image


def _figure_sources(request: PdfReportRequest) -> list[tuple[Dataset, list[NumberedRegion]]]:
    """The images with boxes (at most MAX_FIGURES), or the reported study's first image."""
    ordered = _reported_first(request)
    regions = _regions_by_image(request.report.content.findings)
    boxed = [
        (ds, regions[str(ds.SOPInstanceUID)])
        for ds in ordered
        if str(ds.get("SOPInstanceUID", "")) in regions
    ]
    if boxed:
        return boxed[:MAX_FIGURES]
    return [(ordered[0], [])] if ordered else []


def _frame_index(image: Dataset, regions: Sequence[NumberedRegion]) -> int:
    """The frame the boxes are on (Referenced Frame Number is 1-based), else the first."""
    numbers = [r.region.frame_number for r in regions if r.region.frame_number]
    return max(numbers[0] - 1, 0) if numbers else 0


def box_overlay(numbered: NumberedRegion, columns: int, rows: int) -> BoxOverlay:
    """The region (source pixels, PS3.3 C.18.6.1.1) in percent of the image, clamped."""
    region = numbered.region
    xs = sorted(min(max(v / columns * 100.0, 0.0), 100.0) for v in (region.x0, region.x1))
    ys = sorted(min(max(v / rows * 100.0, 0.0), 100.0) for v in (region.y0, region.y1))
    label = " ".join(numbered.label.split())
    return BoxOverlay(numbered.number, label, xs[0], ys[0], xs[1] - xs[0], ys[1] - ys[0])


def figure_size_mm(width: int, height: int, figures: int) -> tuple[float, float]:
    """The printed size: as large as fits, keeping the aspect ratio."""
    max_height = FIGURE_MAX_HEIGHT_MM[0 if figures == 1 else 1]
    scale = min(FIGURE_MAX_WIDTH_MM / width, max_height / height)
    return round(width * scale, 2), round(height * scale, 2)


def _image_description(image: Dataset) -> str:
    parts = [
        header_text(image, "Modality"),
        header_text(image, "BodyPartExamined"),
        header_text(image, "ViewPosition"),
    ]
    described = " ".join(part for part in parts if part)
    return described or header_text(image, "SOPInstanceUID")


def pdf_identifier(report: ReportDocument) -> bytes:
    """The PDF file identifier (ISO 32000-1 14.4), fixed per report: rebuilds are equal."""
    key = f"medgemma-node:{report.study_instance_uid}:{report.report_id}:pdf"
    return hashlib.md5(key.encode(), usedforsecurity=False).hexdigest().encode()


# --- rendering -----------------------------------------------------------------------------


class _LocalFetcher(URLFetcher):
    """Serves the report's images from memory and the font files from disk; nothing else."""

    def __init__(self, images: dict[str, RenderedImage], font_files: set[str]) -> None:
        super().__init__(fail_on_errors=True)
        self._images = images
        self._font_files = font_files

    def fetch(self, url: str, headers: Any = None) -> URLFetcherResponse:
        if url in self._images:
            image = self._images[url]
            return URLFetcherResponse(url, image.data, {"Content-Type": image.media_type})
        if url in self._font_files:
            return URLFetcherResponse(url, Path(url.removeprefix("file://")).read_bytes())
        raise ValueError(f"refused to fetch {url!r}: PDF reports use local resources only")


class PdfReportRenderer:
    """Renders PDF reports; one per process (the font set-up is reused), thread-safe."""

    def __init__(self, fonts: ReportFonts | None = None, *, lossless_images: bool = False) -> None:
        """``lossless_images``: embed the images as PNG rather than JPEG (report_image)."""
        self.fonts = fonts if fonts is not None else check_pdf_fonts("en")
        self.lossless_images = lossless_images
        self._environment = Environment(
            loader=FileSystemLoader(TEMPLATES),
            autoescape=select_autoescape(["j2", "html"], default_for_string=True),
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self._environment.filters["lang"] = lang_attribute
        self._font_files = {font.path.as_uri() for font in self.fonts.files}
        # WeasyPrint's font configuration is shared state: one document at a time.
        self._lock = threading.Lock()
        self._font_config = FontConfiguration()
        # Parsed once: the font faces and report.css (selectors compiled, fonts registered).
        self._stylesheet = CSS(
            string=self.stylesheet_text(),
            font_config=self._font_config,
            url_fetcher=_LocalFetcher({}, self._font_files),
        )

    def stylesheet_text(self) -> str:
        """The ``@font-face`` rules of the installed fonts and report.css."""
        return self.fonts.face_rules() + "\n" + (TEMPLATES / STYLESHEET_NAME).read_text("utf-8")

    def html(
        self, request: PdfReportRequest, *, embed_css: bool = False
    ) -> tuple[str, dict[str, RenderedImage]]:
        """The HTML of the report and the images its ``report-image:`` URLs name.

        ``embed_css``: carry the stylesheet in the page (a stand-alone HTML report); the PDF
        renderer hands WeasyPrint its parsed copy instead.
        """
        language = request.resolved_language
        if language == "zh" and self.fonts.cjk is None:
            raise missing_cjk_font()
        figures, images = self._figures(request, language)
        context = self._context(request, language, figures)
        context["embedded_css"] = Markup(self.stylesheet_text()) if embed_css else ""
        return self._environment.get_template(TEMPLATE_NAME).render(context), images

    def render(self, request: PdfReportRequest) -> bytes:
        """The PDF bytes; the same request gives the same bytes."""
        markup, images = self.html(request)
        fetcher = _LocalFetcher(images, self._font_files)
        with self._lock:
            try:
                document = HTML(string=markup, url_fetcher=fetcher, base_url=None)
                pdf = document.write_pdf(
                    stylesheets=[self._stylesheet],
                    font_config=self._font_config,
                    pdf_identifier=pdf_identifier(request.report),
                )
            except Exception as exc:  # WeasyPrint raises many kinds; wrap for the caller
                raise PdfReportError(f"PDF of report {request.report.report_id}: {exc}") from exc
        if not isinstance(pdf, bytes):
            raise PdfReportError(f"PDF of report {request.report.report_id}: no output")
        return pdf

    def _figures(
        self, request: PdfReportRequest, language: Language
    ) -> tuple[list[Figure], dict[str, RenderedImage]]:
        words = WORDS[language]
        sources = _figure_sources(request)
        figures: list[Figure] = []
        images: dict[str, RenderedImage] = {}
        for n, (image, regions) in enumerate(sources, start=1):
            try:
                rendered = render_report_image(
                    image, _frame_index(image, regions), lossless=self.lossless_images
                )
            except ReportImageError as exc:
                figures.append(Figure(None, words["image_failed"].format(n=n, reason=exc)))
                continue
            url = f"{IMAGE_SCHEME}:{n}"
            images[url] = rendered
            what = _image_description(image)
            caption = words["figure" if regions else "figure_plain"].format(n=n, what=what)
            width_mm, height_mm = figure_size_mm(rendered.width, rendered.height, len(sources))
            columns, rows = int(image.Columns), int(image.Rows)
            boxes = tuple(box_overlay(region, columns, rows) for region in regions)
            figures.append(Figure(url, caption, width_mm, height_mm, boxes))
        return figures, images

    def _context(
        self, request: PdfReportRequest, language: Language, figures: list[Figure]
    ) -> dict[str, Any]:
        report = request.report
        content = report.content
        words = WORDS[language]
        primary = next(iter(_reported_first(request)), None)
        created = local_time(report.created_at, primary)
        return {
            "lang": "zh-CN" if language == "zh" else "en",
            "words": words,
            "font_family": Markup(self.fonts.family_list(language)),
            "created_iso": created.isoformat(timespec="seconds"),
            "institution": request.institution or "",
            "test_model": report.model.is_test_model,
            "test_banner": TEST_MODEL_BANNER,
            "out_of_scope": request.out_of_scope_reason,
            "supersedes": _supersedes_text(request, primary, language),
            "header": patient_header(primary, language) if primary is not None else [],
            "figures": figures,
            "findings": finding_rows(content.findings, language),
            "impression": content.impression,
            "recommendation": content.recommendation,
            "urgency": URGENCY_WORDS[language][content.urgency] if content.urgency else "",
            "narrative": narrative_text(content),
            "question": report.question,
            # [priors]: what the report was compared with, or why no prior was (as SR and ORU)
            "comparison": report.prior.statement(language) if report.prior is not None else "",
            "model": model_line(report.model),
            "report_line": words["report_value"].format(
                id=report.report_id, version=report.version_number
            ),
            "footer": footer_text(report, primary, language),
            "conversation": conversation_rows(content, language),
        }


def _supersedes_text(request: PdfReportRequest, source: Dataset | None, language: Language) -> str:
    old = request.replaced
    if old is None:
        return ""
    words = WORDS[language]
    when = ""
    if old.created_at is not None:
        when = words["supersedes_time"].format(time=time_text(local_time(old.created_at, source)))
    return words["supersedes"].format(id=old.report_id, time=when)


_DEFAULT_RENDERER: PdfReportRenderer | None = None
_DEFAULT_LOCK = threading.Lock()


def default_renderer() -> PdfReportRenderer:
    """The process' renderer, made on first use."""
    global _DEFAULT_RENDERER
    with _DEFAULT_LOCK:
        if _DEFAULT_RENDERER is None:
            _DEFAULT_RENDERER = PdfReportRenderer()
        return _DEFAULT_RENDERER


def render_pdf_report(request: PdfReportRequest) -> bytes:
    """The PDF of ``request`` with the process' renderer."""
    return default_renderer().render(request)
