"""PDF report time per one-image report, beside the SR build for the same report (same run).

The report is a chest report with three findings (two boxed) on pydicom-data's RG1_UNCI.dcm
(CR chest PA, 1841 x 1955, MONOCHROME1), as the delivery side builds it from the stored report:

    pdf       read the source file (pixels), render the image, fill the template, WeasyPrint
              lays out and writes the PDF (fonts subset and embedded)
    pdf+dcm   the same, then the Encapsulated PDF data set encoded as a PS3.10 file
    sr        reference: build_sr (highdicom, TID 1500) from the source header + encode

Each case runs once untimed (the first PDF sets up fontconfig: reported as "cold") and then
``--rounds`` times; the median and best wall time and the median CPU time of this process
(time.process_time: what the work costs when other processes share the cores) are printed.

    .venv/bin/python -m benchmarks.pdf_report [--rounds 15] [--language zh|en|both]
                                              [--cjk-font wqy|noto] [--lossless]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pydicom
from pydicom import Dataset

from delivery import pdf_fonts
from delivery.pdf_report import PdfReportRenderer, PdfReportRequest
from dicom_node.encapsulated_pdf import build_encapsulated_pdf
from dicom_node.output_common import NodeIdentity, encode_file
from dicom_node.sr import build_sr
from peers.dicom_files import testdata
from storage.report_schema import (
    Finding,
    ModelIdentity,
    ParseStatus,
    PixelRegion,
    ReportContent,
    ReportDocument,
    Urgency,
)

NODE = NodeIdentity(institution_name="General Hospital")


def chest_report(image: Dataset, chinese: bool) -> ReportDocument:
    """Three findings, two with boxes, and the texts of a typical chest report."""

    def box(x0: float, y0: float, x1: float, y1: float) -> PixelRegion:
        return PixelRegion(sop_instance_uid=str(image.SOPInstanceUID), x0=x0, y0=y0, x1=x1, y1=y1)

    findings = [
        Finding(
            label="结节" if chinese else "nodule",
            location="右肺上叶" if chinese else "right upper lobe",
            size_mm=12.5,
            density="实性" if chinese else "solid",
            boundary="边界清楚" if chinese else "well defined",
            region=box(400.5, 300.25, 700.0, 650.75),
        ),
        Finding(
            label="胸腔积液" if chinese else "pleural effusion",
            location="左侧肋膈角" if chinese else "left costophrenic angle",
            region=box(1200.0, 1500.0, 1700.0, 1900.0),
        ),
        Finding(label="主动脉迂曲" if chinese else "tortuous aorta", size_mm=40.0),
    ]
    content = ReportContent(
        parse_status=ParseStatus.OK,
        language="zh" if chinese else "en",
        findings=findings,
        impression="右肺上叶结节，左侧少量胸腔积液。"
        if chinese
        else "Right upper lobe nodule; small left pleural effusion.",
        recommendation="建议3个月后复查胸部CT。" if chinese else "CT chest in 3 months.",
        urgency=Urgency.URGENT,
    )
    return ReportDocument(
        report_id=41,
        study_instance_uid=str(image.StudyInstanceUID),
        version_number=1,
        created_at=datetime(2026, 11, 28, 10, 0, tzinfo=UTC),
        content=content,
        model=ModelIdentity(
            model_id="google/medgemma-1.5-4b-it",
            revision="e9792da5fb8e",
            dtype="bfloat16",
            device="cuda:0",
        ),
        question="What are the findings on this chest X-ray?",
        source_sop_instance_uids=[str(image.SOPInstanceUID)],
    )


def fonts_for(choice: str) -> pdf_fonts.ReportFonts:
    found = pdf_fonts.check_pdf_fonts("zh")
    wanted = {"wqy": "fonts-wqy-microhei", "noto": "fonts-noto-cjk"}[choice]
    cjk = next(f for f in pdf_fonts.CJK_CANDIDATES if f.package == wanted)
    if not cjk.path.is_file():
        raise SystemExit(f"{wanted} is not installed")
    return pdf_fonts.ReportFonts(cjk=cjk, latin=found.latin, latin_bold=found.latin_bold)


def timed(work: Callable[[], object], rounds: int) -> tuple[list[float], list[float]]:
    walls, cpus = [], []
    for _ in range(rounds):
        wall, cpu = time.perf_counter(), time.process_time()
        work()
        cpus.append(time.process_time() - cpu)
        walls.append(time.perf_counter() - wall)
    return walls, cpus


def row(case: str, walls: list[float], cpus: list[float]) -> str:
    return (
        f"| {case} | {statistics.median(walls):.3f} | {min(walls):.3f} | "
        f"{statistics.median(cpus):.3f} |"
    )


def run(language: str, renderer: PdfReportRenderer, path: Path, rounds: int) -> list[str]:
    header = pydicom.dcmread(path, stop_before_pixels=True)
    report = chest_report(header, chinese=language == "zh")

    def pdf() -> bytes:
        source = pydicom.dcmread(path)
        request = PdfReportRequest(report, [source], institution=NODE.institution_name)
        return renderer.render(request)

    def pdf_and_dicom() -> bytes:
        return encode_file(build_encapsulated_pdf(report, pdf(), [header], node=NODE))

    def sr() -> bytes:
        return encode_file(build_sr(report, [pydicom.dcmread(path, stop_before_pixels=True)]))

    cold_wall, cold_cpu = timed(pdf, 1)
    size = len(pdf())
    sr()
    lines = [row(f"{language} pdf, cold (first in process)", cold_wall, cold_cpu)]
    for case, work in (("pdf", pdf), ("pdf + Encapsulated PDF", pdf_and_dicom), ("sr", sr)):
        lines.append(row(f"{language} {case}", *timed(work, rounds)))
    lines.append(f"| {language} pdf size | {size:,} bytes | | |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--language", choices=["zh", "en", "both"], default="both")
    parser.add_argument("--cjk-font", choices=["wqy", "noto"], default="wqy")
    parser.add_argument("--lossless", action="store_true", help="images as PNG, not JPEG")
    args = parser.parse_args()
    renderer = PdfReportRenderer(fonts_for(args.cjk_font), lossless_images=args.lossless)
    languages = ["zh", "en"] if args.language == "both" else [args.language]
    print(
        f"# {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start; "
        f"CJK font {args.cjk_font}; images {'PNG' if args.lossless else 'JPEG'}; "
        f"{args.rounds} rounds"
    )
    print("| case | median wall s | best wall s | median CPU s |")
    print("| --- | ---: | ---: | ---: |")
    for language in languages:
        for line in run(language, renderer, testdata("RG1_UNCI.dcm"), args.rounds):
            print(line)
    print(f"# load average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
