"""No PHI in logs: patient name, ID and birth date never reach what the node writes to its logs.

The node runs at DEBUG (the most it ever logs) and receives a study with distinctive
identifiers, a duplicate and a refused instance carrying the same identifiers. Its logs must
name the study (so the search below looks at real content) and never the patient.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from peers.dcmtk import dcmtk_storescu
from peers.dicom_files import make_ct_study
from peers.node_process import NodeProcess
from storage.db import Database
from storage.models import Study
from storage.phi import phi_hash
from tests.nodecheck import FAST_COMPLETION, store_with_pynetdicom, wait_for_versions

pytestmark = pytest.mark.slow

PATIENT_NAME = "Zyxwvut^Quimby"
PATIENT_ID = "QX-93847561"
BIRTH_DATE = "19310217"
FORBIDDEN = ["Zyxwvut", "Quimby", PATIENT_ID, "93847561", BIRTH_DATE, "1931-02-17"]


def identified_study(directory: Path, slices: int) -> list[Path]:
    paths = make_ct_study(directory, slices=slices, patient_name=PATIENT_NAME)
    for path in paths:
        dataset = pydicom.dcmread(path)
        dataset.PatientID = PATIENT_ID
        dataset.PatientBirthDate = BIRTH_DATE
        dataset.save_as(path, enforce_file_format=True)
    return paths


def refused_instance(study: Path) -> pydicom.Dataset:
    """Same patient, but no SeriesInstanceUID: refused with 0xA900 and logged as a reject."""
    dataset = pydicom.dcmread(study)
    dataset.SOPInstanceUID = pydicom.uid.generate_uid()
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    del dataset.SeriesInstanceUID
    return dataset


def test_logs_name_the_study_never_the_patient(tmp_path: Path) -> None:
    paths = identified_study(tmp_path / "study", slices=3)
    study_uid = str(pydicom.dcmread(paths[0]).StudyInstanceUID)
    (tmp_path / "node").mkdir()
    sections = {"completion": FAST_COMPLETION, "logging": {"level": "DEBUG"}}
    node = NodeProcess(tmp_path / "node", sections).start()
    db = Database(node.database_url)
    try:
        assert store_with_pynetdicom(node.port, paths[:2]) == [0x0000, 0x0000]
        result = dcmtk_storescu(node.port, paths[1:])  # one duplicate, one new
        assert result.returncode == 0, result.stderr
        assert store_with_pynetdicom(node.port, [refused_instance(paths[0])]) == [0xA900]
        (version,) = wait_for_versions(db, study_uid, 1)
        assert len(version.instances) == 3 and version.job_id is not None
        with db.session() as session:
            stored_hash = session.scalar(
                select(Study.patient_hash).where(Study.study_instance_uid == study_uid)
            )
    finally:
        db.dispose()
        assert node.terminate() == 0

    salt = (node.data_dir / ".phi_salt").read_bytes().strip()
    assert stored_hash == phi_hash(f"{PATIENT_ID}|{PATIENT_NAME}", salt)
    logs = node.log_text()
    assert study_uid in logs  # the logs do describe this study...
    assert "C-STORE refused with 0xA900" in logs
    assert "duplicate SOP" in logs
    leaked = [text for text in FORBIDDEN if text.lower() in logs.lower()]
    assert leaked == [], f"PHI in the node's logs: {leaked}"  # ...but never the patient
