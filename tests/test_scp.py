"""The Storage SCP end to end: DCMTK and pynetdicom send real images to a `serve` subprocess.

Checks that what is stored is byte-for-byte what was sent, that each instance has its row with
the transfer syntax it arrived in, that a quiet study gets a version and a job, and that a late
instance makes a second version covering all instances. Runs once on SQLite, once on PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import JPEG2000, ExplicitVRLittleEndian, JPEG2000Lossless

from peers.dcmtk import dcmtk_storescp, dcmtk_storescu
from peers.dicom_files import copy_with_new_uids, make_ct_study
from peers.dicom_files import testdata as bundled_file
from peers.node_process import NodeProcess
from storage.db import Database
from tests.nodecheck import (
    FAST_COMPLETION,
    dataset_bytes,
    instance_row,
    received_by_sop_uid,
    store_with_pynetdicom,
    temp_files,
    transfer_syntax,
    versions_of,
    wait_for_versions,
)

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Radiograph:
    """One pydicom-data chest CR, copied as its own study, and how storescu must offer it."""

    source: str
    syntax: str
    storescu_option: str | None


RADIOGRAPHS = [
    Radiograph("RG1_UNCI.dcm", ExplicitVRLittleEndian, None),
    Radiograph("RG1_J2KI.dcm", JPEG2000, "-xw"),  # lossy JPEG 2000
    Radiograph("RG1_J2KR.dcm", JPEG2000Lossless, "-xv"),  # lossless JPEG 2000
]


@pytest.fixture(params=["sqlite", "postgresql"])
def node(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NodeProcess]:
    storage = {"min_free_disk_mb": 0}
    if request.param == "postgresql":
        storage["database_url"] = request.getfixturevalue("pg_url")
    (tmp_path / "node").mkdir()
    process = NodeProcess(tmp_path / "node", {"completion": FAST_COMPLETION, "storage": storage})
    process.start()
    try:
        yield process
    finally:
        process.terminate()


@pytest.fixture
def node_db(node: NodeProcess) -> Iterator[Database]:
    database = Database(node.database_url)
    yield database
    database.dispose()


def separate_studies(directory: Path) -> list[Path]:
    """Each radiograph as a new study; re-saving must keep its transfer syntax and pixels."""
    copies = []
    for radiograph in RADIOGRAPHS:
        source = bundled_file(radiograph.source)
        copy = copy_with_new_uids(source, directory / radiograph.source)
        assert transfer_syntax(copy) == radiograph.syntax
        original = pydicom.dcmread(source)
        assert pydicom.dcmread(copy).PixelData == original.PixelData
        copies.append(copy)
    return copies


def assert_stored_as_sent(
    db: Database, node: NodeProcess, sent: Path, syntax: str, on_the_wire: Path | None = None
) -> None:
    """Row and file match the sent file; the data set bytes are those that crossed the wire.

    ``on_the_wire``: a reference receiver's bit-preserving copy, where the sender re-encodes
    (DCMTK); pynetdicom sends the file's own encoding.
    """
    dataset = pydicom.dcmread(sent, stop_before_pixels=True)
    row = instance_row(db, str(dataset.SOPInstanceUID))
    assert row is not None, f"no row for {sent.name}"
    assert row.transfer_syntax_uid == syntax
    assert row.sop_class_uid == str(dataset.SOPClassUID)
    stored = node.data_dir / row.path
    assert stored.stat().st_size == row.size_bytes
    assert dataset_bytes(stored) == dataset_bytes(on_the_wire or sent)
    assert transfer_syntax(stored) == syntax
    stored_dataset = pydicom.dcmread(stored)
    assert stored_dataset.file_meta.MediaStorageSOPInstanceUID == dataset.SOPInstanceUID
    assert stored_dataset == pydicom.dcmread(sent)  # every element value as in the sent file


def send_radiographs(port: int, copies: list[Path]) -> None:
    for radiograph, copy in zip(RADIOGRAPHS, copies, strict=True):
        options = [radiograph.storescu_option] if radiograph.storescu_option else []
        result = dcmtk_storescu(port, [copy], *options)
        assert result.returncode == 0, result.stderr
        assert "Failed" not in result.stderr, result.stderr


def wire_copies(copies: list[Path], directory: Path) -> dict[str, Path]:
    """What DCMTK's storescu puts on the wire for each copy, captured by DCMTK's storescp."""
    with dcmtk_storescp(directory) as port:
        send_radiographs(port, copies)
    return received_by_sop_uid(directory)


def test_store_complete_and_late_instance(
    node: NodeProcess, node_db: Database, tmp_path: Path
) -> None:
    copies = separate_studies(tmp_path / "radiographs")
    ct = make_ct_study(tmp_path / "ct", slices=4)
    ct_uid = str(pydicom.dcmread(ct[0], stop_before_pixels=True).StudyInstanceUID)

    on_the_wire = wire_copies(copies, tmp_path / "reference")
    send_radiographs(node.port, copies)
    assert store_with_pynetdicom(node.port, ct[:3]) == [0x0000] * 3
    # CT's quiet period has not passed yet: nothing is queued for it.
    assert versions_of(node_db, ct_uid) == []

    for radiograph, copy in zip(RADIOGRAPHS, copies, strict=True):
        sop_uid = str(pydicom.dcmread(copy, stop_before_pixels=True).SOPInstanceUID)
        assert_stored_as_sent(node_db, node, copy, radiograph.syntax, on_the_wire[sop_uid])
    for path in ct[:3]:
        assert_stored_as_sent(node_db, node, path, ExplicitVRLittleEndian)

    for copy in copies:
        dataset = pydicom.dcmread(copy, stop_before_pixels=True)
        (version,) = wait_for_versions(node_db, str(dataset.StudyInstanceUID), 1)
        assert version.instances == {str(dataset.SOPInstanceUID)}
        assert version.job_id is not None

    ct_sops = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in ct]
    (first,) = wait_for_versions(node_db, ct_uid, 1)
    assert first.number == 1
    assert first.instances == set(ct_sops[:3])
    assert first.job_id is not None

    # A late slice: a second version covering all four, with its own job.
    assert store_with_pynetdicom(node.port, ct[3:]) == [0x0000]
    assert_stored_as_sent(node_db, node, ct[3], ExplicitVRLittleEndian)
    versions = wait_for_versions(node_db, ct_uid, 2)
    assert [v.number for v in versions] == [1, 2]
    assert versions[1].instances == set(ct_sops)
    assert versions[1].job_id is not None and versions[1].job_id != first.job_id

    assert temp_files(node.data_dir) == []
    assert node.proc is not None and node.proc.poll() is None


def test_resent_instance_is_acknowledged_once(
    node: NodeProcess, node_db: Database, tmp_path: Path
) -> None:
    ct = make_ct_study(tmp_path / "ct", slices=2)
    assert store_with_pynetdicom(node.port, ct) == [0x0000, 0x0000]
    assert store_with_pynetdicom(node.port, ct[:1]) == [0x0000]
    ct_uid = str(pydicom.dcmread(ct[0], stop_before_pixels=True).StudyInstanceUID)
    (version,) = wait_for_versions(node_db, ct_uid, 1)
    assert len(version.instances) == 2
    assert len(list((node.data_dir / "instances").rglob("*.dcm"))) == 2
