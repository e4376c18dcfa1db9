"""Library error text never carries patient data into the node's log or database (issue 12):
pydicom's warnings quote invalid values, a library exception quotes what it choked on."""

from __future__ import annotations

import io
import logging
import traceback
from pathlib import Path

import pydicom
import pytest
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import select

from core.errors import HL7Error
from core.redaction import WITHHELD, error_text, scrub_traceback, scrub_values
from medgemma_node.logs import setup_logging
from storage.db import Database
from storage.ingest import close_quiet_studies
from storage.jobs import NO_RETRY, fail_job
from storage.models import Job
from tests.test_worker import ingest_copy

BIRTH_DATE = "1931-02-17"  # not DICOM DA (YYYYMMDD): pydicom warns and quotes it
NAME = "Zyxwvut^Quimby"


@pytest.fixture
def node_log(tmp_path: Path, restore_logging: None) -> Path:
    path = tmp_path / "logs" / "node.log"
    setup_logging("INFO", path)
    return path


def invalid_source() -> bytes:
    """A data set whose Patient's Birth Date breaks DA, as some modalities write it."""
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    mode = pydicom_config.settings.writing_validation_mode
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    try:
        dataset.PatientName = NAME
        dataset.PatientBirthDate = BIRTH_DATE
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=False)
    finally:
        pydicom_config.settings.writing_validation_mode = mode
    return buffer.getvalue()


def test_quoted_values_are_withheld_and_node_messages_kept() -> None:
    assert scrub_values(f"Invalid value for VR DA: '{BIRTH_DATE}'.") == (
        f"Invalid value for VR DA: {WITHHELD}."
    )
    assert scrub_values(f'Value "{NAME}" and b"\\x00"') == f"Value {WITHHELD} and {WITHHELD}"
    assert error_text(ValueError(f"bad name {NAME!r}")) == f"ValueError: bad name {WITHHELD}"
    assert scrub_values("can't use 'O'Brien^Pat' here") == f"can't use {WITHHELD} here"
    own = HL7Error("control id 'A|B' contains an HL7 delimiter")
    assert error_text(own) == "HL7Error: control id 'A|B' contains an HL7 delimiter"


def test_tracebacks_keep_their_frames_and_lose_the_values() -> None:
    try:
        raise ValueError(f"cannot encode {NAME!r}")
    except ValueError as exc:
        text = scrub_traceback("".join(traceback.format_exception(exc)))
    assert NAME not in text
    assert 'raise ValueError(f"cannot encode {NAME!r}")' in text  # the source line stays
    assert text.rstrip().endswith(f"ValueError: cannot encode {WITHHELD}")


def test_pydicom_warnings_reach_the_log_scrubbed_and_not_stderr(
    node_log: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    dataset = pydicom.dcmread(io.BytesIO(invalid_source()), force=True)
    assert str(dataset.PatientBirthDate) == BIRTH_DATE  # pydicom warned while decoding it
    for handler in logging.getLogger().handlers:
        handler.flush()

    logged = node_log.read_text(encoding="utf-8")
    captured = capfd.readouterr()
    assert f"Invalid value for VR DA: {WITHHELD}" in logged
    for output in (logged, captured.err, captured.out):
        assert BIRTH_DATE not in output


def test_a_failed_job_stores_no_quoted_value(tmp_path: Path, rg1_unci: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'node.db'}")
    db.upgrade()
    ingest_copy(db, tmp_path / "data", rg1_unci, tmp_path / "work")
    close_quiet_studies(db, lambda _modality, _ae: 0.0)  # the study's job
    with db.session() as session:
        job_id = session.scalars(select(Job.id)).one()
    try:
        raise UnicodeEncodeError("ascii", NAME, 0, 1, f"cannot encode {NAME!r}")
    except UnicodeEncodeError as exc:
        fail_job(db, job_id, exc, NO_RETRY)

    with db.session() as session:
        job = session.get_one(Job, job_id)
        stored = (job.last_error or "") + (job.last_traceback or "")
    assert "Zyxwvut" not in stored and "UnicodeEncodeError" in stored
    db.dispose()
