"""Shared by the SR and GSPS tests: the real CR chest image, reports, and the validators.

The image is pydicom-data's RG1_UNCI.dcm (Philips CR chest PA, MONOCHROME1, 1841 columns x
1955 rows, Pixel Spacing 0\\0 and no Imager Pixel Spacing). Only get_testdata_file is used:
it reads the installed pydicom-data package and never downloads.

Validators (``assert_valid``): dicom3tools' dciodvfy for every object, and for SRs also
PixelMed's DicomSRValidator (IHE AI Results asks for it), both with 0 errors. PixelMed has no
description of the GSPS IOD (its DicomInstanceValidator answers "IOD (SOP Class)
unrecognized"), so a GSPS is checked by dciodvfy alone.
"""

from __future__ import annotations

import copy
import hashlib
import shutil
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from pathlib import Path

import highdicom as hd
import pydicom
import pydicom.data
import pytest
from pydicom import Dataset

from storage.report_schema import (
    Finding,
    ModelIdentity,
    ParseStatus,
    PixelRegion,
    ReportContent,
    ReportDocument,
    Urgency,
)

RG1 = "RG1_UNCI.dcm"
SPACING_MM = (0.15, 0.175)  # (row, column) set on copies that need a spacing
CREATED_AT = datetime(2024, 5, 1, 10, 0, 0, tzinfo=UTC)

# dciodvfy warnings every object of ours draws, and why they stay:
ALLOWED_WARNINGS = (
    # Private coding scheme: declared in the Coding Scheme Identification Sequence, which
    # dciodvfy does not consult; CodingSchemeDesignator is a defined-terms attribute.
    "Unrecognized defined term <99MEDGEMMA> for value 1 of attribute <Coding Scheme Designator>",
    # RG1's own Referring Physician's Name "ward", copied unchanged from the source study.
    "(0x0008,0x0090) PN Referring Physician's Name  PN [1] = <ward> - Retired Person Name form",
)

needs_dicom3tools = pytest.mark.skipif(
    shutil.which("dciodvfy") is None, reason="dicom3tools (dciodvfy) is not installed"
)
needs_dcmtk = pytest.mark.skipif(
    not Path("/usr/bin/dsrdump").exists(), reason="DCMTK (dsrdump) is not installed"
)
PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")
needs_validators = pytest.mark.skipif(
    shutil.which("dciodvfy") is None or not PIXELMED_JAR.exists() or shutil.which("java") is None,
    reason="dciodvfy (dicom3tools) or PixelMed (libpixelmed-java, openjdk-17-jre-headless)"
    " is not installed",
)


@cache
def _rg1(with_pixels: bool) -> Dataset:
    path = pydicom.data.get_testdata_file(RG1)
    assert path is not None, "pydicom-data is not installed"
    return pydicom.dcmread(path, stop_before_pixels=not with_pixels)


def rg1(*, with_pixels: bool = False) -> Dataset:
    """A fresh copy of the CR chest image (headers only unless asked)."""
    return copy.deepcopy(_rg1(with_pixels))


def rg1_with_spacing() -> Dataset:
    image = rg1()
    image.ImagerPixelSpacing = list(SPACING_MM)
    return image


def rg1_without_spacing() -> Dataset:
    image = rg1()
    for keyword in ("ImagerPixelSpacing", "PixelSpacing"):
        if keyword in image:
            delattr(image, keyword)
    return image


# A realistic long name (220 characters, several components) and one far past any limit.
LONG_NAME = "^".join(
    [
        "Wolfeschlegelsteinhausenbergerdorff-Sanchez-Oyelaran",
        "Hubert Blaine Adolph Charles Maria Alexandros Rajendra Tobiah Ulysses",
        "Zacharias Quentin Montgomery-Featherstonehaugh Abernathy-Odegaard-Lindqvist",
        "Dr",
        "III-XYZ-Long-Suffi",
    ]
)
assert len(LONG_NAME) == 220
HUGE_NAME = "A" * 65_009
PN_GROUP_MAX = 64  # PS3.5 Table 6.2-1: PN, 64 characters per component group


ACCESSION_NUMBER = "ACC-2024-000012345"
STUDY_ID = "STUDY-ID-LONGER-THAN-16"
STUDY_DESCRIPTION = "Chest PA and lateral, follow-up " * 4
ISSUER = "Hospital\r\nof the long name " * 4
# dciodvfy warnings such a source draws: its Study Date and Time are not in DA/TM form, so the
# outputs carry them empty; a name without "^" is in the retired form.
BROKEN_SOURCE_WARNINGS = (
    "Missing attribute or value that would be needed to build DICOMDIR - Study Date",
    "Missing attribute or value that would be needed to build DICOMDIR - Study Time",
    "(0x0010,0x0010) PN Patient's Name  PN [1] = <AAAA",
)


# dciodvfy warnings of a source without Patient ID and Study ID (both type 2, written empty).
NO_PATIENT_ID_WARNINGS = (
    "Missing attribute or value that would be needed to build DICOMDIR - Patient ID",
    "Missing attribute or value that would be needed to build DICOMDIR - Study ID",
)


def rg1_without_patient_id(patient_id: str | None) -> Dataset:
    """RG1 as an unknown emergency patient: no Patient ID (or an empty one), birth date,
    accession number or study id."""
    image = rg1_with_spacing()
    for keyword in ("PatientID", "PatientBirthDate", "AccessionNumber", "StudyID"):
        delattr(image, keyword)
    if patient_id is not None:
        image.PatientID = patient_id
    return image


def assert_empty_type_2(output: Dataset) -> None:
    """What ``rg1_without_patient_id`` lacks is present and empty in every output."""
    for keyword in ("PatientID", "PatientBirthDate", "AccessionNumber", "StudyID"):
        assert keyword in output, keyword
        assert output[keyword].value in ("", None), keyword


def rg1_breaking_vr_limits(patient_name: str) -> Dataset:
    """RG1 with values that break their VR, as sources in the field carry them."""
    image = rg1_with_spacing()
    image.PatientName = patient_name
    image.AccessionNumber = ACCESSION_NUMBER  # SH: 16
    image.StudyID = STUDY_ID  # SH: 16
    image.StudyDescription = STUDY_DESCRIPTION  # LO: 64
    image.IssuerOfPatientID = ISSUER  # LO: 64, no line breaks
    image.PatientSex = "female"  # CS: M, F or O
    image.StudyDate = "2004-08-26"  # DA: YYYYMMDD
    image.StudyTime = "18:50:59"  # TM: HHMMSS
    return image


def assert_fitted_to_vr_limits(output: Dataset, patient_name: str) -> None:
    """The values of ``rg1_breaking_vr_limits`` as every output must carry them."""
    assert str(output.PatientName) == patient_name[:PN_GROUP_MAX]
    assert output.AccessionNumber == ACCESSION_NUMBER[:16]
    assert output.StudyID == STUDY_ID[:16]
    assert output.StudyDescription.rstrip() == STUDY_DESCRIPTION[:64].rstrip()
    assert output.IssuerOfPatientID.rstrip() == ISSUER.replace("\r\n", "  ")[:64].rstrip()
    assert (output.PatientSex, output.StudyDate, output.StudyTime) == ("", "", "")


def region(image: Dataset, x0: float, y0: float, x1: float, y1: float) -> PixelRegion:
    return PixelRegion(sop_instance_uid=str(image.SOPInstanceUID), x0=x0, y0=y0, x1=x1, y1=y1)


def boxed_findings(image: Dataset, *, chinese: bool = False) -> list[Finding]:
    """Two findings with regions and one without, coordinates exact in float32."""
    return [
        Finding(
            label="结节" if chinese else "nodule",
            location="右肺上叶" if chinese else "right upper lobe",
            size_mm=12.5,
            density="实性" if chinese else "solid",
            boundary="边界清楚" if chinese else "well defined",
            box_2d=[150.0, 210.0, 330.0, 380.0],
            region=region(image, 400.5, 300.25, 700.0, 650.75),
        ),
        Finding(
            label="胸腔积液" if chinese else "Pleural effusions",
            location="左侧肋膈角" if chinese else "left costophrenic angle",
            box_2d=[760.0, 650.0, 970.0, 920.0],
            region=region(image, 1200.0, 1500.0, 1700.0, 1900.0),
        ),
        Finding(label="主动脉迂曲" if chinese else "tortuous aorta", size_mm=40.0),
    ]


@dataclass(frozen=True)
class ReportTexts:
    impression: str
    recommendation: str
    narrative: str
    question: str


ENGLISH = ReportTexts(
    impression="Right upper lobe nodule; small left pleural effusion.",
    recommendation="CT chest in 3 months.",
    narrative="A 12 mm nodule projects over the right upper lobe.",
    question="What are the findings on this chest X-ray?",
)
CHINESE = ReportTexts(
    impression="右肺上叶结节，左侧少量胸腔积液。",
    recommendation="建议3个月后复查胸部CT。",
    narrative="右肺上叶见一约12毫米结节影。",
    question="这张胸片有什么发现？",
)


def make_report(
    image: Dataset,
    findings: list[Finding],
    *,
    chinese: bool = False,
    is_test_model: bool = False,
    parse_status: ParseStatus = ParseStatus.OK,
    report_id: int = 41,
    version_number: int = 2,
    urgency: Urgency | None = Urgency.URGENT,
) -> ReportDocument:
    texts = CHINESE if chinese else ENGLISH
    return ReportDocument(
        report_id=report_id,
        study_instance_uid=str(image.StudyInstanceUID),
        version_number=version_number,
        created_at=CREATED_AT,
        content=ReportContent(
            parse_status=parse_status,
            language="zh" if chinese else "en",
            findings=findings,
            impression=texts.impression,
            recommendation=texts.recommendation,
            urgency=urgency,
            narrative=texts.narrative,
        ),
        model=ModelIdentity(
            model_id="google/medgemma-1.5-4b-it",
            revision="e9792da5fb8ee651083d345ec4bce07c3c9f1641",
            dtype="bfloat16",
            quantization="none",
            device="cuda:0",
            library_versions={"transformers": "4.57.1", "torch": "2.8.0"},
            is_test_model=is_test_model,
        ),
        question=texts.question,
        source_sop_instance_uids=[str(image.SOPInstanceUID)],
    )


@dataclass(frozen=True)
class Validation:
    errors: list[str]
    warnings: list[str]

    @property
    def unexpected_warnings(self) -> list[str]:
        return [w for w in self.warnings if not any(a in w for a in ALLOWED_WARNINGS)]


def dciodvfy(path: Path) -> Validation:
    """dicom3tools' IOD validator: its "Error" and "Warning" lines."""
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (result.stdout + result.stderr).splitlines()
    return Validation(
        errors=[line for line in lines if line.startswith("Error")],
        warnings=[line for line in lines if line.startswith("Warning")],
    )


# The documented command, with the JIT limited to its first tier and a serial collector: the
# run is short and single-threaded, and this halves its CPU time. On Java 17 the XPath limits
# must be lifted or the validator's large stylesheets fail to compile.
PIXELMED_COMMAND = (
    "java",
    "-XX:TieredStopAtLevel=1",
    "-XX:+UseSerialGC",
    "-Djdk.xml.xpathExprOpLimit=0",
    "-Djdk.xml.xpathExprGrpLimit=0",
    "-Djdk.xml.xpathTotalOpLimit=0",
    "-cp",
    f"{PIXELMED_JAR}:/usr/share/java/*",
    "com.pixelmed.validate.DicomSRValidator",
)
PIXELMED_DONE = "IOD validation complete"
_pixelmed_results: dict[str, Validation] = {}


def pixelmed_sr(path: Path) -> Validation:
    """PixelMed's SR validator: its "Error" and "Warning" lines (cached by file content).

    The validator prints a stack trace and still exits 0 when it fails, so the run counts only
    when it reports that it completed.
    """
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest not in _pixelmed_results:
        result = subprocess.run(
            [*PIXELMED_COMMAND, str(path)], capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0 and PIXELMED_DONE in result.stdout, result.stderr[-2000:]
        lines = result.stdout.splitlines()
        _pixelmed_results[digest] = Validation(
            errors=[line for line in lines if line.startswith("Error")],
            warnings=[line for line in lines if line.startswith("Warning")],
        )
    return _pixelmed_results[digest]


def validators_installed() -> bool:
    return (
        shutil.which("dciodvfy") is not None
        and PIXELMED_JAR.exists()
        and bool(shutil.which("java"))
    )


def assert_valid(path: Path, also_allowed: tuple[str, ...] = ()) -> None:
    """0 dciodvfy errors and no warnings but the known ones (``ALLOWED_WARNINGS`` and
    ``also_allowed``); for an SR also 0 PixelMed errors."""
    validation = dciodvfy(path)
    assert validation.errors == []
    unexpected = [
        w for w in validation.unexpected_warnings if not any(a in w for a in also_allowed)
    ]
    assert unexpected == []
    if pydicom.dcmread(path, stop_before_pixels=True).Modality == "SR":
        assert pixelmed_sr(path).errors == []


def dsrdump(path: Path) -> str:
    """DCMTK's SR dump with long values in full; fails the test unless it exits 0."""
    result = subprocess.run(["/usr/bin/dsrdump", "+Pl", str(path)], capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode("utf-8", "replace")
    return result.stdout.decode("utf-8")


def measurement_report(sr: hd.sr.ComprehensiveSR) -> hd.sr.MeasurementReport:
    """The SR's content as highdicom's TID 1500 reader, which it must be."""
    content = sr.content
    assert isinstance(content, hd.sr.MeasurementReport)
    return content
