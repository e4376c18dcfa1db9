"""Real DICOM files for tests and benchmarks: bundled with pydicom or pydicom-data (never
downloaded: pydicom's download of other files hangs offline), and copies of them as new studies.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid


def testdata(name: str) -> Path:
    """A file bundled with pydicom or pydicom-data (never downloaded)."""
    path = get_testdata_file(name, download=False)
    if path is None:
        raise FileNotFoundError(f"{name} is not bundled; install pydicom-data")
    return Path(str(path))


testdata.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test, when imported


def make_ct_study(directory: Path, slices: int = 4, patient_name: str = "CT^TEST") -> list[Path]:
    """A multi-instance CT study from pydicom's CT_small.dcm, with new UIDs per instance."""
    source = pydicom.dcmread(testdata("CT_small.dcm"))
    study_uid, series_uid = generate_uid(), generate_uid()
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for number in range(1, slices + 1):
        dataset = source.copy()
        dataset.StudyInstanceUID = study_uid
        dataset.SeriesInstanceUID = series_uid
        dataset.SOPInstanceUID = generate_uid()
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        dataset.InstanceNumber = number
        dataset.PatientName = patient_name
        dataset.ImagePositionPatient = [-158.0, -179.0, -75.0 + 5.0 * number]
        path = directory / f"ct{number:03d}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def copy_with_new_uids(source: Path, target: Path, **attributes: object) -> Path:
    """A copy of a real file as a new study (new Study/Series/SOP UIDs), bytes otherwise equal."""
    dataset = pydicom.dcmread(source)
    dataset.StudyInstanceUID = generate_uid()
    dataset.SeriesInstanceUID = generate_uid()
    dataset.SOPInstanceUID = generate_uid()
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    for keyword, value in attributes.items():
        setattr(dataset, keyword, value)
    target.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(target, enforce_file_format=True)
    return target
