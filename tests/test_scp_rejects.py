"""Bad input gets a DICOM status, not a crash; the node keeps serving (README).

Each test sends something bad, checks the exact outcome (association rejected, no presentation
context, or the C-STORE status of PS3.4 B.2.3), that nothing was stored, and then that the same
node still stores a good instance.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import _config as pynetdicom_config
from sqlalchemy import create_engine, text

from peers.dcmtk import dcmtk_storescu
from peers.dicom_files import copy_with_new_uids, make_ct_study
from peers.dicom_files import testdata as bundled_file
from peers.net import echo_ok, wait_for
from peers.node_process import NodeProcess
from storage.db import Database
from storage.files import uid_component
from tests.conftest import PG_ADMIN_URL
from tests.nodecheck import dataset_bytes, instance_row, store_with_pynetdicom

pytestmark = pytest.mark.slow

MODALITY = "MODALITY1"
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
US_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One node for the module: only MODALITY1 may store."""
    workdir = tmp_path_factory.mktemp("rejects")
    sections = {
        "dicom": {"allowed_calling_aets": [MODALITY]},
        "storage": {"min_free_disk_mb": 0},
        "completion": {"default_seconds": 600, "rules": []},
    }
    process = NodeProcess(workdir, sections).start()
    try:
        yield process
    finally:
        process.terminate()


@pytest.fixture(scope="module")
def node_db(node: NodeProcess) -> Iterator[Database]:
    database = Database(node.database_url)
    yield database
    database.dispose()


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def assert_still_stores(node: NodeProcess, db: Database, workdir: Path) -> None:
    """After bad input the node answers and a good instance gets Success and a row."""
    (good,) = make_ct_study(workdir / f"good-{generate_uid()[-8:]}", slices=1)
    assert store_with_pynetdicom(node.port, [good], aet=MODALITY) == [0x0000]
    row = instance_row(db, sop_uid(good))
    assert row is not None
    assert (node.data_dir / row.path).is_file()
    assert node.proc is not None and node.proc.poll() is None


def assert_not_stored(node: NodeProcess, db: Database, uid: str) -> None:
    assert instance_row(db, uid) is None
    stored = list((node.data_dir / "instances").rglob(f"{uid}.dcm"))
    assert stored == []


def test_disallowed_calling_ae_is_rejected(
    node: NodeProcess, node_db: Database, tmp_path: Path
) -> None:
    (path,) = make_ct_study(tmp_path / "ct", slices=1)
    result = dcmtk_storescu(node.port, [path], aet="INTRUDER")
    assert result.returncode != 0
    assert "Association Rejected" in result.stderr
    assert "Calling AE Title Not Recognized" in result.stderr
    assert_not_stored(node, node_db, sop_uid(path))
    assert "association rejected from INTRUDER" in node.log_text()
    assert_still_stores(node, node_db, tmp_path)


def test_unaccepted_sop_class_is_not_stored(
    node: NodeProcess, node_db: Database, tmp_path: Path
) -> None:
    ultrasound = copy_with_new_uids(bundled_file("US1_UNCI.dcm"), tmp_path / "us.dcm")
    assert str(pydicom.dcmread(ultrasound, stop_before_pixels=True).SOPClassUID) == US_STORAGE
    result = dcmtk_storescu(node.port, [ultrasound], aet=MODALITY)
    assert result.returncode != 0
    assert "No presentation context" in result.stderr
    assert_not_stored(node, node_db, sop_uid(ultrasound))
    assert_still_stores(node, node_db, tmp_path)


def ct_dataset(**changes: object) -> Dataset:
    dataset = pydicom.dcmread(bundled_file("CT_small.dcm"))
    dataset.StudyInstanceUID = generate_uid()
    dataset.SeriesInstanceUID = generate_uid()
    dataset.SOPInstanceUID = generate_uid()
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    for keyword, value in changes.items():
        setattr(dataset, keyword, value)
    return dataset


@pytest.mark.parametrize("missing", ["StudyInstanceUID", "SeriesInstanceUID"])
def test_missing_uid_is_a900(
    node: NodeProcess, node_db: Database, tmp_path: Path, missing: str
) -> None:
    dataset = ct_dataset()
    delattr(dataset, missing)
    assert store_with_pynetdicom(node.port, [dataset], aet=MODALITY) == [0xA900]
    assert_not_stored(node, node_db, str(dataset.SOPInstanceUID))
    assert "C-STORE refused with 0xA900" in node.log_text()
    assert_still_stores(node, node_db, tmp_path)


def test_blank_uid_is_a900(node: NodeProcess, node_db: Database, tmp_path: Path) -> None:
    dataset = ct_dataset(StudyInstanceUID="")
    assert store_with_pynetdicom(node.port, [dataset], aet=MODALITY) == [0xA900]
    assert_not_stored(node, node_db, str(dataset.SOPInstanceUID))
    assert_still_stores(node, node_db, tmp_path)


def explicit_element(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    """One Explicit VR Little Endian element with a 2-byte length (PS3.5 §7.1.2)."""
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def uid_value(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


GARBAGE = {
    # (0028,0010) Rows is US (2 bytes each) but says it is 3 bytes long.
    "bogus length": struct.pack("<HH2sH", 0x0028, 0x0010, b"US", 3) + b"\x01\x00\x00",
    # A VR that does not exist.
    "unknown VR": struct.pack("<HH2sH", 0x0028, 0x0011, b"Q!", 2) + b"\x00\x02",
}


def garbage_file(path: Path, garbage: bytes) -> tuple[Path, str]:
    """Valid File Meta Information and UIDs, then an element that cannot be decoded."""
    sop_instance = generate_uid()
    meta = Dataset()
    meta.MediaStorageSOPClassUID = CR_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = generate_uid()
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_file_meta_info(buffer, meta)  # type: ignore[arg-type]
    body = b"".join(
        [
            explicit_element(0x0008, 0x0016, b"UI", uid_value(CR_STORAGE)),
            explicit_element(0x0008, 0x0018, b"UI", uid_value(sop_instance)),
            explicit_element(0x0008, 0x0060, b"CS", b"CR"),
            explicit_element(0x0020, 0x000D, b"UI", uid_value(generate_uid())),
            explicit_element(0x0020, 0x000E, b"UI", uid_value(generate_uid())),
            garbage,
        ]
    )
    path.write_bytes(b"\0" * 128 + b"DICM" + buffer.getvalue() + body)
    return path, sop_instance


@pytest.mark.parametrize("kind", sorted(GARBAGE))
def test_undecodable_data_set_is_c000(
    node: NodeProcess,
    node_db: Database,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
) -> None:
    path, uid = garbage_file(tmp_path / "garbage.dcm", GARBAGE[kind])
    # Send the file's bytes as they are: pynetdicom would otherwise decode and re-encode it.
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)
    assert store_with_pynetdicom(node.port, [path], aet=MODALITY) == [0xC000]
    monkeypatch.undo()
    assert_not_stored(node, node_db, uid)
    assert "C-STORE refused with 0xC000" in node.log_text()
    assert_still_stores(node, node_db, tmp_path)


def test_low_disk_is_a700(tmp_path: Path) -> None:
    sections = {"storage": {"min_free_disk_mb": 2**40}}  # more than any disk has free
    node = NodeProcess(tmp_path, sections).start()
    db = Database(node.database_url)
    try:
        (path,) = make_ct_study(tmp_path / "ct", slices=1)
        assert store_with_pynetdicom(node.port, [path]) == [0xA700]
        assert instance_row(db, sop_uid(path)) is None
        assert list((node.data_dir / "instances").rglob("*.dcm")) == []
        assert "C-STORE refused with 0xA700" in node.log_text()
        assert "below watermark" in node.log_text()
        # Still serving: it answers C-ECHO and keeps refusing with the same status.
        assert echo_ok(node.port)
        assert store_with_pynetdicom(node.port, [path]) == [0xA700]
    finally:
        db.dispose()
        node.terminate()


@pytest.mark.postgres
def test_database_unavailable_is_a700(tmp_path: Path, pg_url: str) -> None:
    """PostgreSQL goes away under a running node: C-STORE answers 0xA700 (out of resources),
    nothing is written, and the node keeps answering."""
    sections = {"storage": {"min_free_disk_mb": 0, "database_url": pg_url}}
    node = NodeProcess(tmp_path, sections).start()
    try:
        # Every part started (some read the database as they start): only the SCP's path is
        # under test here.
        wait_for(lambda: "delivery-doorbell started" in node.log_text(), 60)
        admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            name = pg_url.rsplit("/", 1)[1]
            connection.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()
        (path,) = make_ct_study(tmp_path / "ct", slices=1)
        assert store_with_pynetdicom(node.port, [path]) == [0xA700]
        assert list((node.data_dir / "instances").rglob("*.dcm")) == []
        assert "database unavailable: DatabaseUnavailable" in node.log_text()
        assert echo_ok(node.port)
        assert node.proc is not None and node.proc.poll() is None
    finally:
        node.terminate()


def test_an_echoed_report_is_stored_aside_as_received(
    node: NodeProcess, node_db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A Comprehensive SR sent back by PACS ([dicom] ignored_sop_classes): Success, no job,
    # and the file under ignored/ holds the data set byte for byte as it crossed the wire.
    report = Dataset()
    report.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
    report.SOPInstanceUID = generate_uid()
    report.StudyInstanceUID, report.SeriesInstanceUID = generate_uid(), generate_uid()
    report.Modality = "SR"
    report.PatientName = "Echo^Report"
    report.file_meta = pydicom.dataset.FileMetaDataset()
    report.file_meta.MediaStorageSOPClassUID = report.SOPClassUID
    report.file_meta.MediaStorageSOPInstanceUID = report.SOPInstanceUID
    report.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sent = tmp_path / "echoed-sr.dcm"
    report.save_as(sent, enforce_file_format=True)
    # Send the file's bytes as they are: pynetdicom would otherwise decode and re-encode it.
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)

    assert store_with_pynetdicom(node.port, [sent], aet=MODALITY) == [0x0000]

    aside = node.data_dir / "ignored" / f"{uid_component(report.SOPInstanceUID)}.dcm"
    assert dataset_bytes(aside) == dataset_bytes(sent)
    assert pydicom.dcmread(aside).file_meta.MediaStorageSOPInstanceUID == report.SOPInstanceUID
    assert instance_row(node_db, report.SOPInstanceUID) is None
