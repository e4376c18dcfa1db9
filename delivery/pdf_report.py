"""The PDF of one AI report, in Chinese or English: HTML from a Jinja2 template, set by WeasyPrint.

    renderer = PdfReportRenderer()                      # once per process: fonts, template
    pdf = renderer.render(PdfReportRequest(report, sources, institution="..."))

What a page carries (issue 14; design.md, "Every output says what it is"):

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
console can show the same report.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup
from pydicom import Dataset
from pydicom.valuerep import PersonName
from weasyprint import CSS, HTML
from weasyprint.text.fonts import FontConfiguration
from weasyprint.urls import URLFetcher, URLFetcherResponse

from core.errors import DeliveryError
from delivery.pdf_fonts import ReportFonts, check_pdf_fonts, missing_cjk_font
from delivery.report_image import RenderedImage, ReportImageError, render_report_image
from storage.report_schema import (
    AI_DISCLAIMER,
    FOLLOW_UP_DISCLAIMER,
    TEST_MODEL_BANNER,
    Finding,
    ModelIdentity,
    PixelRegion,
    ReportContent,
    ReportDocument,
    Urgency,
    follow_up_text,
)

Language = Literal["en", "zh"]

TEMPLATES = Path(__file__).parent / "templates"
TEMPLATE_NAME = "report.html.j2"
STYLESHEET_NAME = "report.css"
IMAGE_SCHEME = "report-image"
MAX_FIGURES = 4
MAX_HEADER_CHARS = 128
WATERMARK_ZH = "AI辅助分析 结论仅供参考，须由执业医师复核确认"
WATERMARK_EN = "AI-assisted analysis: preliminary, must be reviewed by a licensed physician"
_CJK = re.compile(r"[\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]")
_HEX_REVISION = re.compile(r"^[0-9a-f]{40}$")


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


def _text(dataset: Dataset, keyword: str) -> str:
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
    age = _text(dataset, "PatientAge")
    match = re.fullmatch(r"(\d{3})([DWMY])", age)
    if match:
        return _age(int(match.group(1)), match.group(2), language)
    born, studied = _date(_text(dataset, "PatientBirthDate")), _date(_text(dataset, "StudyDate"))
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
    sex = _text(source, "PatientSex").upper()
    return [
        (words["patient_name"], person_name(source.get("PatientName"), language)),
        (words["patient_id"], _text(source, "PatientID")),
        (words["sex"], SEX_WORDS[language].get(sex, sex)),
        (words["age"], age_text(source, language)),
        (words["study_date"], date_text(_text(source, "StudyDate"))),
        (words["accession"], _text(source, "AccessionNumber")),
        (words["modality"], _text(source, "Modality")),
        (words["body_part"], _text(source, "BodyPartExamined")),
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
        _text(image, "Modality"),
        _text(image, "BodyPartExamined"),
        _text(image, "ViewPosition"),
    ]
    described = " ".join(part for part in parts if part)
    return described or _text(image, "SOPInstanceUID")


def _local_time(created_at: datetime, source: Dataset | None) -> datetime:
    """The report time in the source's Timezone Offset From UTC (PS3.3 C.12.1.1.8) when it
    has one, else in the node's local time; naive times are shown as they are."""
    if created_at.tzinfo is None:
        return created_at
    offset = _text(source, "TimezoneOffsetFromUTC") if source is not None else ""
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
            f"{words['generated']} {time_text(_local_time(report.created_at, source))}",
            f"{words['model_version']} {model_version(report.model)}",
            f"{words['hardware']} {hardware_text(report.model)}",
        ]
    )


def pdf_identifier(report: ReportDocument) -> bytes:
    """The PDF file identifier (ISO 32000-1 14.4), fixed per report: rebuilds are equal."""
    key = f"medgemma-node:{report.study_instance_uid}:{report.report_id}:pdf"
    return hashlib.md5(key.encode(), usedforsecurity=False).hexdigest().encode()


def lang_attribute(text: object) -> Markup:
    """``lang="zh-CN"`` for text with CJK characters: the Noto CJK collection's face is
    chosen by language, and Chinese text must get the Simplified Chinese glyphs."""
    return Markup(' lang="zh-CN"') if _CJK.search(str(text)) else Markup("")


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
        created = _local_time(report.created_at, primary)
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
            "model": _model_line(report.model),
            "report_line": words["report_value"].format(
                id=report.report_id, version=report.version_number
            ),
            "footer": footer_text(report, primary, language),
            "conversation": _conversation(content, language),
        }


def _supersedes_text(request: PdfReportRequest, source: Dataset | None, language: Language) -> str:
    old = request.replaced
    if old is None:
        return ""
    words = WORDS[language]
    when = ""
    if old.created_at is not None:
        when = words["supersedes_time"].format(time=time_text(_local_time(old.created_at, source)))
    return words["supersedes"].format(id=old.report_id, time=when)


def _model_line(model: ModelIdentity) -> str:
    return f"{model.display_name}; {hardware_text(model)}"


def _conversation(content: ReportContent, language: Language) -> list[dict[str, str]]:
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
