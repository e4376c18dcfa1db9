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

    .venv/bin/python benchmarks/pdf_report.py [--rounds 15] [--language zh|en|both]
                                              [--cjk-font wqy|noto] [--lossless]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pydicom.data

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from delivery import pdf_fonts  # noqa: E402
from delivery.pdf_report import PdfReportRenderer, PdfReportRequest  # noqa: E402
from dicom_node.encapsulated_pdf import build_encapsulated_pdf  # noqa: E402
from dicom_node.output_common import NodeIdentity, encode_file  # noqa: E402
from dicom_node.sr import build_sr  # noqa: E402
from storage.report_schema import ReportDocument  # noqa: E402
from tests.dicom_output_support import boxed_findings, make_report  # noqa: E402

NODE = NodeIdentity(institution_name="General Hospital")


def source_path() -> Path:
    path = pydicom.data.get_testdata_file("RG1_UNCI.dcm", download=False)
    if path is None:
        raise SystemExit("pydicom-data is not installed (pip install pydicom-data)")
    return Path(str(path))


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
    chinese = language == "zh"
    report: ReportDocument = make_report(
        header, boxed_findings(header, chinese=chinese), chinese=chinese
    )

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
        for line in run(language, renderer, source_path(), args.rounds):
            print(line)
    print(f"# load average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
