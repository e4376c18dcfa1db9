"""Building, writing and reading back the SR in the SR tests (tests/test_sr*.py)."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.coding import Code

from dicom_node import finding_codes as fc
from dicom_node.output_common import write_datasets
from dicom_node.sr import build_sr
from storage.report_schema import ReportDocument
from tests.dicom_output_support import assert_valid, validators_installed

TEXT = hd.sr.ValueTypeValues.TEXT
CODE = hd.sr.ValueTypeValues.CODE
PATIENT_AND_STUDY = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
)


def write_sr(
    report: ReportDocument,
    image: Dataset,
    directory: Path,
    allowed: tuple[str, ...] = (),
    **kwargs: object,
) -> Path:
    """Build, write and validate (dciodvfy and PixelMed, where installed) the SR of report.

    ``allowed``: dciodvfy warnings the source itself causes."""
    sr = build_sr(report, [image], **kwargs)  # type: ignore[arg-type]
    (record,) = write_datasets([sr], directory)
    if validators_installed():
        assert_valid(record.path, also_allowed=allowed)
    return record.path


def texts_named(item: Dataset, name: Code) -> list[str]:
    return [i.value for i in hd.sr.utils.find_content_items(item, name=name, value_type=TEXT)]


def code_named(item: Dataset, name: Code) -> hd.sr.CodedConcept:
    (found,) = hd.sr.utils.find_content_items(item, name=name, value_type=CODE)
    return found.value


def report_evaluations(sr: hd.sr.ComprehensiveSR) -> Dataset:
    (container,) = hd.sr.utils.find_content_items(sr.content[0], name=fc.QUALITATIVE_EVALUATIONS)
    return container


def processing_details(sr: hd.sr.ComprehensiveSR) -> Dataset:
    (container,) = hd.sr.utils.find_content_items(sr.content[0], name=fc.PROCESSING_DETAILS)
    return container


def names(container: Dataset) -> list[Code]:
    return [item.name for item in container.ContentSequence]


def image_region(
    group: hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations,
) -> hd.sr.ImageRegion:
    roi = group.roi
    assert isinstance(roi, hd.sr.ImageRegion)
    return roi


def read_back(path: Path) -> hd.sr.ComprehensiveSR:
    sr = hd.sr.srread(path)
    assert isinstance(sr, hd.sr.ComprehensiveSR)
    return sr


def measurements_mm(group: hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations) -> dict:
    return {
        m.name.meaning: (float(m.value), m.unit.value, m.method.value if m.method else None)
        for m in group.get_measurements()
    }
