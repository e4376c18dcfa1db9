"""The fonts a PDF report is set in: Debian's font files, embedded (subset) in every PDF.

Each font is referenced from the report's stylesheet by its local file path through
``@font-face`` (CSS Fonts 3 §4.3), never by URL, so nothing is fetched at run time and the
PDF does not depend on what the reading machine has installed: WeasyPrint embeds a subset of
every font it uses (HarfBuzz subsetter).

    family "Report CJK"    WenQuanYi Micro Hei (fonts-wqy-microhei), else Noto Sans CJK
                           (fonts-noto-cjk). Both files are TrueType collections; the face
                           is chosen by fontconfig from the element's ``lang``: zh-CN gives
                           Noto's Simplified Chinese face (the template marks CJK text so).
    family "Report Latin"  DejaVu Sans (fonts-dejavu-core), English text.

A Chinese report needs a CJK font; an English one needs either (both carry Latin letters).
``check_pdf_fonts`` is called at start-up when a destination writes PDFs, so a missing
package is a clear configuration error rather than a PDF with empty boxes for characters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from core.errors import ConfigError, DeliveryError

CJK_FAMILY = "Report CJK"
LATIN_FAMILY = "Report Latin"


@dataclass(frozen=True)
class FontFile:
    """One Debian font file as a CSS ``@font-face`` rule."""

    family: str
    path: Path
    package: str  # the Debian package that installs ``path``
    weight: str = "normal"

    def face_rule(self) -> str:
        # A file: URI with the path percent-free: Debian font paths are plain ASCII.
        return (
            f'@font-face {{ font-family: "{self.family}"; font-weight: {self.weight}; '
            f'src: url("{self.path.as_uri()}"); }}'
        )


CJK_CANDIDATES: tuple[FontFile, ...] = (
    FontFile(
        CJK_FAMILY, Path("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc"), "fonts-wqy-microhei"
    ),
    FontFile(
        CJK_FAMILY,
        Path("/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc"),
        "fonts-noto-cjk",
    ),
)
LATIN_CANDIDATES: tuple[FontFile, ...] = (
    FontFile(
        LATIN_FAMILY, Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"), "fonts-dejavu-core"
    ),
)
LATIN_BOLD_CANDIDATES: tuple[FontFile, ...] = (
    FontFile(
        LATIN_FAMILY,
        Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"),
        "fonts-dejavu-core",
        weight="bold",
    ),
)


class PdfFontMissing(DeliveryError, ConfigError):
    """The language of the reports needs a font that is not installed; names the package."""


@dataclass(frozen=True)
class ReportFonts:
    """The font files a report is set in, in the order the stylesheet prefers them."""

    cjk: FontFile | None
    latin: FontFile | None
    latin_bold: FontFile | None

    @property
    def files(self) -> list[FontFile]:
        return [font for font in (self.latin, self.latin_bold, self.cjk) if font is not None]

    def face_rules(self) -> str:
        return "\n".join(font.face_rule() for font in self.files)

    def family_list(self, language: str) -> str:
        """The CSS ``font-family`` value: CJK first for Chinese (one look for digits and
        Latin letters), Latin first for English (CJK only for the characters it lacks)."""
        families = [CJK_FAMILY, LATIN_FAMILY] if language == "zh" else [LATIN_FAMILY, CJK_FAMILY]
        present = {font.family for font in self.files}
        return ", ".join(f'"{family}"' for family in families if family in present) + ", sans-serif"


def _first_present(candidates: Sequence[FontFile]) -> FontFile | None:
    return next((font for font in candidates if font.path.is_file()), None)


def find_report_fonts() -> ReportFonts:
    return ReportFonts(
        cjk=_first_present(CJK_CANDIDATES),
        latin=_first_present(LATIN_CANDIDATES),
        latin_bold=_first_present(LATIN_BOLD_CANDIDATES),
    )


def _packages(candidates: Sequence[FontFile]) -> str:
    return " or ".join(dict.fromkeys(font.package for font in candidates))


def missing_cjk_font() -> PdfFontMissing:
    return PdfFontMissing(
        "PDF reports in Chinese need a CJK font: install the Debian package "
        f"{_packages(CJK_CANDIDATES)} (looked for "
        + ", ".join(str(font.path) for font in CJK_CANDIDATES)
        + ")"
    )


def check_pdf_fonts(language: str) -> ReportFonts:
    """The fonts for reports in ``language`` ("en" or "zh"); PdfFontMissing when absent."""
    fonts = find_report_fonts()
    if language == "zh" and fonts.cjk is None:
        raise missing_cjk_font()
    if fonts.cjk is None and fonts.latin is None:
        raise PdfFontMissing(
            "PDF reports need a font: install the Debian package "
            f"{_packages(LATIN_CANDIDATES)} (or {_packages(CJK_CANDIDATES)})"
        )
    return fonts
