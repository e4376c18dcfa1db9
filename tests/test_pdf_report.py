"""The PDF report (delivery/pdf_report.py) read back with poppler, and its Encapsulated PDF
(dicom_node/encapsulated_pdf.py) checked with dciodvfy and DCMTK's dcm2pdf. Through the node
to a real Orthanc: tests/test_pdf_delivery.py.

The source is pydicom-data's RG1_UNCI.dcm (CR chest PA, MONOCHROME1) with pixel data.
"""

from __future__ import annotations

import io
import re
import shutil
import statistics
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom import Dataset

from core.errors import ConfigError
from delivery import pdf_fonts
from delivery.pdf_report import PdfReportRenderer, PdfReportRequest, SupersededReport
from delivery.pdf_text import WATERMARK_EN, WATERMARK_ZH, age_text, person_name, size_text
from delivery.report_image import ReportImageError, display_picture, render_report_image
from dicom_node.encapsulated_pdf import build_encapsulated_pdf, fitted_value
from dicom_node.output_common import NodeIdentity, write_datasets
from storage.conversations import appended_content
from storage.models import ConversationTurn
from storage.report_schema import TEST_MODEL_BANNER, FollowUp, PriorComparison, ReportDocument
from tests.dicom_output_support import (
    boxed_findings,
    dciodvfy,
    make_report,
    needs_dicom3tools,
    rg1,
)

needs_poppler = pytest.mark.skipif(
    shutil.which("pdftotext") is None, reason="poppler-utils is not installed"
)
pytestmark = needs_poppler

INSTITUTION_ZH = "第一人民医院"
NODE = NodeIdentity(institution_name="General Hospital", serial_number="SN-1")


@pytest.fixture(scope="module")
def renderer() -> PdfReportRenderer:
    return PdfReportRenderer()


@pytest.fixture(scope="module")
def image() -> Dataset:
    return rg1(with_pixels=True)


def chinese_report(image: Dataset, **kwargs: object) -> ReportDocument:
    return make_report(image, boxed_findings(image, chinese=True), chinese=True, **kwargs)  # type: ignore[arg-type]


def appended(report: ReportDocument, turn: FollowUp) -> ReportDocument:
    """``report`` appended to from a conversation of one turn, as storage.conversations
    makes it (the Q&A in follow_up and at the end of the narrative)."""
    row = ConversationTurn(
        question=turn.question,
        answer=turn.answer,
        referenced_anchor_id=turn.anchor_id,
        answered_by=turn.answered_by,
        findings=[],
    )
    content = appended_content(report.content, [row])
    return report.model_copy(update={"content": content, "supersedes_report_id": 40})


def english_report(image: Dataset, **kwargs: object) -> ReportDocument:
    return make_report(image, boxed_findings(image), **kwargs)  # type: ignore[arg-type]


def write_pdf(renderer: PdfReportRenderer, request: PdfReportRequest, path: Path) -> Path:
    path.write_bytes(renderer.render(request))
    return path


def pdftotext(path: Path, *extra: str) -> str:
    result = subprocess.run(
        ["pdftotext", "-raw", *extra, str(path), "-"], capture_output=True, timeout=60, check=True
    )
    return result.stdout.decode("utf-8")


def pages(path: Path) -> list[str]:
    """The text of each page (pdftotext ends pages with a form feed)."""
    return pdftotext(path).split("\f")[:-1]


def pdffonts(path: Path) -> list[dict[str, str]]:
    """pdffonts rows: name, type, emb, sub (the columns are fixed-width after the header)."""
    lines = subprocess.run(
        ["pdffonts", str(path)], capture_output=True, text=True, timeout=60, check=True
    ).stdout.splitlines()
    rows = []
    for line in lines[2:]:
        fields = line.split()
        # name, type words..., encoding, emb, sub, uni, object id, generation
        rows.append({"name": fields[0], "emb": fields[-5], "sub": fields[-4], "line": line})
    return rows


def word_boxes(path: Path, page: int = 1) -> tuple[float, float, list[tuple[str, float, float]]]:
    """Page width, height (points) and (word, yMin, yMax) of each word on ``page``."""
    html = subprocess.run(
        ["pdftotext", "-bbox", "-f", str(page), "-l", str(page), str(path), "-"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    size = re.search(r'<page width="([\d.]+)" height="([\d.]+)"', html)
    assert size is not None
    words = [
        (word, float(y0), float(y1))
        for y0, y1, word in re.findall(r'yMin="([\d.]+)"[^>]*yMax="([\d.]+)">([^<]*)</word>', html)
    ]
    return float(size.group(1)), float(size.group(2)), words


def page_one_pixels(path: Path, directory: Path, dpi: int = 50) -> Image.Image:
    prefix = directory / "page"
    subprocess.run(
        ["pdftoppm", "-r", str(dpi), "-f", "1", "-l", "1", "-gray", str(path), str(prefix)],
        check=True,
        timeout=60,
    )
    (rendered,) = directory.glob("page*.pgm")
    return Image.open(rendered)


def image_band(path: Path, directory: Path, above: str, below: str) -> list[int]:
    """Gray values of page 1 between the word ``above`` (its bottom) and ``below`` (its top):
    where the figure sits, between the patient header and the figure caption."""
    _, height_pt, words = word_boxes(path)
    top = min(y1 for word, _, y1 in words if word == above)
    bottom = min(y0 for word, y0, _ in words if word.startswith(below) and y0 > top)
    picture = page_one_pixels(path, directory)
    scale = picture.height / height_pt
    band = picture.crop(
        (
            int(picture.width * 0.3),
            int((top + 4) * scale),
            int(picture.width * 0.7),
            int((bottom - 4) * scale),
        )
    )
    return list(band.get_flattened_data())


# --- Chinese -------------------------------------------------------------------------------


def test_chinese_report_text_watermark_on_every_page_and_footer(
    renderer: PdfReportRenderer, image: Dataset, tmp_path: Path
) -> None:
    report = appended(
        chinese_report(image),
        FollowUp(question="结节有多大？", answer="约12毫米。", anchor_id="A1", answered_by="node"),
    )
    request = PdfReportRequest(report, [image], institution=INSTITUTION_ZH)
    path = write_pdf(renderer, request, tmp_path / "zh.pdf")
    texts = pages(path)
    assert len(texts) >= 2
    for text in texts:
        assert WATERMARK_ZH in text
        assert "生成时间" in text and "模型版本" in text and "硬件环境" in text
        assert "google/medgemma-1.5-4b-it" in text and "cuda:0" in text
    whole = "".join(texts)
    assert report.content.impression in whole
    assert report.content.recommendation in whole
    assert INSTITUTION_ZH in whole
    assert "部位 征象 测量 密度 边界" in whole
    assert "12.5 毫米" in whole and "40 毫米" in whole
    assert "紧急" in whole  # urgency, in Chinese
    assert "女" in whole and "64岁" in whole and "2004-08-26" in whole  # sex, age, study date
    assert "附录" in texts[-1] and "约12毫米。" in texts[-1] and "关于区域 A1" in texts[-1]
    assert "约12毫米。" not in "".join(texts[:-1])  # the narrative leaves the Q&A to the appendix
    assert "本报告取代报告 40" in whole
    assert TEST_MODEL_BANNER not in whole


def test_chinese_font_is_embedded_as_a_subset(
    renderer: PdfReportRenderer, image: Dataset, tmp_path: Path
) -> None:
    path = write_pdf(
        renderer, PdfReportRequest(chinese_report(image), [image]), tmp_path / "zh.pdf"
    )
    fonts = pdffonts(path)
    cjk = [font for font in fonts if "CJK" in font["name"]]
    assert cjk, fonts
    for font in fonts:
        assert font["emb"] == "yes" and font["sub"] == "yes", font["line"]
        assert re.match(r"^[A-Z]{6}\+", font["name"]), font["line"]  # subset tag (PDF 9.6.4)


def test_page_one_shows_the_image(
    renderer: PdfReportRenderer, image: Dataset, tmp_path: Path
) -> None:
    path = write_pdf(
        renderer, PdfReportRequest(chinese_report(image), [image]), tmp_path / "zh.pdf"
    )
    band = image_band(path, tmp_path, above="CHEST", below="图")
    assert len(band) > 1000
    # A radiograph: dark on average and far from uniform (white paper has mean 255, sd ~0).
    assert statistics.fmean(band) < 200
    assert statistics.pstdev(band) > 25


def test_an_image_without_pixels_leaves_a_note_and_the_rest(
    renderer: PdfReportRenderer, tmp_path: Path
) -> None:
    header_only = rg1()
    path = write_pdf(
        renderer, PdfReportRequest(chinese_report(header_only), [header_only]), tmp_path / "a.pdf"
    )
    text = pdftotext(path)
    assert "图 1 无法显示" in text
    assert chinese_report(header_only).content.impression in text


# --- English, banners, notes ---------------------------------------------------------------


def test_english_report(renderer: PdfReportRenderer, image: Dataset, tmp_path: Path) -> None:
    report = english_report(image)
    path = write_pdf(
        renderer,
        PdfReportRequest(report, [image], institution="General Hospital"),
        tmp_path / "en.pdf",
    )
    texts = pages(path)
    for text in texts:
        assert WATERMARK_EN in text
        assert "Generated 2024-05-01" in text and "Hardware cuda:0, bfloat16" in text
    whole = "".join(texts)
    assert report.content.impression in whole
    assert "Location Finding Size Density Boundary" in whole
    assert "12.5 mm" in whole
    assert "Female" in whole and "64 years" in whole and "Urgent" in whole
    assert "General Hospital" in whole
    assert all(font["emb"] == "yes" for font in pdffonts(path))


def test_test_model_banner_on_every_page(
    renderer: PdfReportRenderer, image: Dataset, tmp_path: Path
) -> None:
    report = chinese_report(image, is_test_model=True)
    path = write_pdf(renderer, PdfReportRequest(report, [image]), tmp_path / "test.pdf")
    texts = pages(path)
    assert texts
    assert all(TEST_MODEL_BANNER in text for text in texts)


def test_scope_supersedes_and_chinese_patient_name(
    renderer: PdfReportRenderer, image: Dataset, tmp_path: Path
) -> None:
    source = rg1(with_pixels=True)
    source.PatientName = "Wang^XiaoDong=王^小东"
    old = SupersededReport(40, datetime(2024, 4, 30, 9, tzinfo=UTC))
    request = PdfReportRequest(
        english_report(source),
        [source],
        supersedes=old,
        out_of_scope_reason="lateral view; the model was validated on frontal chest X-rays",
    )
    text = pdftotext(write_pdf(renderer, request, tmp_path / "scope.pdf"))
    assert "Outside the validated scope: lateral view; the model was validated" in text
    assert "This report replaces report 40 of 2024-04-30" in text
    assert "Wang XiaoDong" in text
    chinese = pdftotext(
        write_pdf(
            renderer,
            PdfReportRequest(chinese_report(source), [source], supersedes=old),
            tmp_path / "zh.pdf",
        )
    )
    assert "王小东" in chinese and "本报告取代报告 40" in chinese


def test_the_comparison_with_a_prior_or_why_there_was_none(
    renderer: PdfReportRenderer, image: Dataset, tmp_path: Path
) -> None:
    compared = PriorComparison(
        compared=True, study_instance_uid="1.2.3.4", study_date="20230101", modality="CR",
        body_part="CHEST",
    )  # fmt: skip

    def words(report: ReportDocument, separator: str) -> str:
        path = write_pdf(renderer, PdfReportRequest(report, [image]), tmp_path / "report.pdf")
        return separator.join(pdftotext(path).split())

    english = english_report(image).model_copy(update={"prior": compared})
    text = words(english, " ")
    assert "Comparison Compared with the prior study of 2023-01-01 (CR CHEST" in text
    none = PriorComparison.without("none_found", what="CR CHEST", days=730)
    chinese = chinese_report(image).model_copy(update={"prior": none})
    assert "未与既往检查对比：730天内未找到该患者更早的CRCHEST检查" in words(chinese, "")


def test_model_text_is_text_not_markup(
    renderer: PdfReportRenderer, image: Dataset, tmp_path: Path
) -> None:
    report = english_report(image)
    report.content.impression = "<b>nodule</b> & <img src='http://192.0.2.1/x.png'> end"
    path = write_pdf(renderer, PdfReportRequest(report, [image]), tmp_path / "markup.pdf")
    assert "<b>nodule</b> & <img src='http://192.0.2.1/x.png'> end" in pdftotext(path)


def test_a_rebuild_gives_the_same_bytes(renderer: PdfReportRenderer, image: Dataset) -> None:
    request = PdfReportRequest(chinese_report(image), [image], institution=INSTITUTION_ZH)
    assert renderer.render(request) == renderer.render(request)


# --- fonts ---------------------------------------------------------------------------------


def test_missing_cjk_font_is_a_configuration_error_naming_the_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    missing = tuple(
        pdf_fonts.FontFile(font.family, tmp_path / font.path.name, font.package)
        for font in pdf_fonts.CJK_CANDIDATES
    )
    monkeypatch.setattr(pdf_fonts, "CJK_CANDIDATES", missing)
    with pytest.raises(ConfigError) as raised:
        pdf_fonts.check_pdf_fonts("zh")
    assert "fonts-wqy-microhei" in str(raised.value) and "fonts-noto-cjk" in str(raised.value)
    assert pdf_fonts.check_pdf_fonts("en").latin is not None  # English needs no CJK font


def test_renderer_refuses_chinese_without_a_cjk_font(image: Dataset) -> None:
    latin_only = pdf_fonts.ReportFonts(
        cjk=None, latin=pdf_fonts.find_report_fonts().latin, latin_bold=None
    )
    with pytest.raises(pdf_fonts.PdfFontMissing):
        PdfReportRenderer(latin_only).render(PdfReportRequest(chinese_report(image), [image]))


# --- Encapsulated PDF ----------------------------------------------------------------------


def encapsulate(report: ReportDocument, pdf: bytes, source: Dataset, directory: Path) -> Path:
    dataset = build_encapsulated_pdf(report, pdf, [source], node=NODE)
    (record,) = write_datasets([dataset], directory)
    return record.path


def document_bytes(dataset: Dataset) -> bytes:
    """The Encapsulated Document without the pad byte of an odd-length PDF (PS3.5 7.1)."""
    value: bytes = dataset.EncapsulatedDocument
    length = int(dataset.EncapsulatedDocumentLength)
    assert len(value) - length in (0, 1) and value[length:] in (b"", b"\x00")
    return value[:length]


@needs_dicom3tools
@pytest.mark.parametrize("odd", [False, True])
def test_encapsulated_pdf_is_valid_and_holds_the_file(
    renderer: PdfReportRenderer, image: Dataset, tmp_path: Path, odd: bool
) -> None:
    report = chinese_report(image, is_test_model=True)
    pdf = renderer.render(PdfReportRequest(report, [image]))
    if (len(pdf) % 2 == 1) != odd:
        pdf += b"\n"  # a PDF may end with an end-of-line marker after %%EOF
    path = encapsulate(report, pdf, rg1(), tmp_path)
    validation = dciodvfy(path)
    assert validation.errors == []
    assert validation.unexpected_warnings == []
    stored = pydicom.dcmread(path)
    assert len(stored.EncapsulatedDocument) % 2 == 0
    assert document_bytes(stored) == pdf
    assert stored.SOPClassUID == "1.2.840.10008.5.1.4.1.1.104.1"
    assert stored.MIMETypeOfEncapsulatedDocument == "application/pdf"
    # DCMTK extracts the same document.
    extracted = tmp_path / "extracted.pdf"
    subprocess.run(["/usr/bin/dcm2pdf", str(path), str(extracted)], check=True, timeout=60)
    assert extracted.read_bytes().rstrip(b"\x00") == pdf.rstrip(b"\x00")


def test_encapsulated_pdf_identity_study_series_and_title(
    renderer: PdfReportRenderer, image: Dataset, tmp_path: Path
) -> None:
    report = english_report(image)
    pdf = renderer.render(PdfReportRequest(report, [image]))
    source = rg1()
    first = build_encapsulated_pdf(report, pdf, [source], node=NODE)
    again = build_encapsulated_pdf(report, pdf, [source], node=NODE)
    assert first.SOPInstanceUID == again.SOPInstanceUID  # a rebuild is the same object
    assert first.SeriesInstanceUID == again.SeriesInstanceUID
    assert first.StudyInstanceUID == source.StudyInstanceUID
    assert first.SeriesInstanceUID != source.SeriesInstanceUID
    assert first.PatientID == source.PatientID and first.AccessionNumber == source.AccessionNumber
    assert first.Modality == "DOC"
    assert "UNVERIFIED" in first.DocumentTitle and "preliminary" in first.DocumentTitle
    assert first.VerificationFlag == "UNVERIFIED"
    (model,) = [
        item
        for item in first.ContributingEquipmentSequence
        if item.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    ]
    assert model.ManufacturerModelName == "google/medgemma-1.5-4b-it"
    assert model.SoftwareVersions[0] == report.model.revision
    assert [item.ReferencedSOPInstanceUID for item in first.SourceInstanceSequence] == [
        source.SOPInstanceUID
    ]
    other = english_report(image, report_id=42)
    assert build_encapsulated_pdf(other, pdf, [source], node=NODE).SOPInstanceUID != (
        first.SOPInstanceUID
    )


@needs_dicom3tools
def test_patient_and_study_values_are_cut_to_their_vr(
    renderer: PdfReportRenderer, image: Dataset, tmp_path: Path
) -> None:
    source = rg1()
    with pytest.warns(UserWarning):  # pydicom warns about each invalid value as it is set
        source.PatientID = "9" * 80
        source.PatientBirthDate = "1940-03-05"  # not a DA
        source.AccessionNumber = "ACC-" + "1" * 30  # SH holds 16
    source.PatientName = "Wang^XiaoDong=" + "王" * 40
    source.StudyDescription = "chest\tPA\r\nlateral\\second value"
    source.ReferringPhysicianName = "Ward^Jane"
    report = chinese_report(image)
    pdf = renderer.render(PdfReportRequest(report, [image]))
    path = encapsulate(report, pdf, source, tmp_path)
    assert dciodvfy(path).errors == []
    stored = pydicom.dcmread(path)
    assert stored.PatientID == "9" * 64
    assert len(stored.AccessionNumber) == 16
    assert stored.PatientBirthDate == ""
    assert stored.StudyDescription == "chest PA lateral"  # one line, the first value
    assert len(str(stored.PatientName).split("=")[1].encode()) <= 64
    assert fitted_value("PatientSex", "male") is None  # CS: upper case, ≤ 16, else dropped


# --- pieces --------------------------------------------------------------------------------


def synthetic_image(photometric: str, pixels: np.ndarray, **attributes: object) -> Dataset:
    image = Dataset()
    image.SOPInstanceUID = "1.2.3.4"
    image.Rows, image.Columns = pixels.shape[:2]
    image.PhotometricInterpretation = photometric
    image.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    image.BitsAllocated = image.BitsStored = pixels.dtype.itemsize * 8
    image.HighBit = image.BitsStored - 1
    image.PixelRepresentation = 0
    if pixels.ndim == 3:
        image.PlanarConfiguration = 0
    for keyword, value in attributes.items():
        setattr(image, keyword, value)
    image.PixelData = pixels.tobytes()
    image.file_meta = pydicom.dataset.FileMetaDataset()
    image.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    return image


def test_image_without_window_uses_percentiles_and_fits_the_page() -> None:
    ramp = np.tile(np.arange(2100, dtype=np.uint16), (1000, 1))  # 2100 columns, 1000 rows
    picture = display_picture(
        synthetic_image("MONOCHROME2", ramp, RescaleSlope=2, RescaleIntercept=-100)
    )
    assert picture.mode == "L" and max(picture.size) <= 1024
    values = np.asarray(picture)
    assert values[:, 0].max() <= 2 and values[:, -1].min() >= 253  # dark left, bright right


def test_monochrome1_window_minimum_is_white() -> None:
    pixels = np.array([[0, 4095], [2048, 1024]], dtype=np.uint16)
    image = synthetic_image("MONOCHROME1", pixels, WindowCenter=2048, WindowWidth=4096)
    values = np.asarray(display_picture(image))
    assert values[0, 0] == 255 and values[0, 1] == 0


def test_colour_image_stays_colour_and_missing_pixels_are_an_error() -> None:
    rgb = np.zeros((40, 60, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    rendered = render_report_image(synthetic_image("RGB", rgb), lossless=True)
    assert rendered.media_type == "image/png" and (rendered.width, rendered.height) == (60, 40)
    assert Image.open(io.BytesIO(rendered.data)).getpixel((5, 5)) == (200, 0, 0)
    with pytest.raises(ReportImageError):
        render_report_image(rg1())  # header only


def test_header_texts() -> None:
    source = rg1()
    source.PatientAge = "003M"
    assert age_text(source, "zh") == "3个月" and age_text(source, "en") == "3 months"
    del source.PatientAge
    assert age_text(source, "en") == "64 years"  # from birth date 19400305 to study 20040826
    assert person_name("Wang^XiaoDong=王^小东", "zh") == "王小东"
    assert person_name("Wang^XiaoDong=王^小东", "en") == "Wang XiaoDong"
    assert size_text(14.0, "zh") == "14 毫米" and size_text(12.5, "en") == "12.5 mm"
