"""Shared fixtures: databases (SQLite file and a throwaway PostgreSQL database), real images."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from sqlalchemy import create_engine, text

from storage.db import Database

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def testdata(name: str) -> Path:
    """A file bundled with pydicom or pydicom-data (never downloaded)."""
    path = get_testdata_file(name, download=False)
    if path is None:
        raise FileNotFoundError(f"{name} is not bundled; install pydicom-data")
    return Path(str(path))


testdata.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test, when imported


def postgres_available() -> bool:
    try:
        engine = create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 3})
        with engine.connect():
            pass
        engine.dispose()
        return True
    except Exception:
        return False


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    if not postgres_available():
        pytest.fail("PostgreSQL is not running at 127.0.0.1:5432 (see README: tests need it)")
    name = f"mgn_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'node.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url)
    database.upgrade()
    yield database
    database.dispose()


@pytest.fixture
def rg1_unci() -> Path:
    return testdata("RG1_UNCI.dcm")


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
