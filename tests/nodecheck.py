"""Helpers for integration tests: send with pynetdicom, look at what a node stored."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom import Dataset
from pynetdicom import AE, build_context
from pynetdicom.dsutils import split_dataset
from sqlalchemy import select

from peers.net import wait_for
from storage.db import Database
from storage.files import TEMP_MARK
from storage.models import Instance, Job, Study, StudyVersion

# Short quiet periods so studies complete within a test; CT waits a little longer so a test
# can see that nothing is queued before the quiet period has passed.
FAST_COMPLETION = {
    "default_seconds": 1.0,
    "poll_interval_s": 0.2,
    "rules": [{"modality": "CR", "seconds": 1.0}, {"modality": "CT", "seconds": 1.5}],
}


@dataclass(frozen=True)
class VersionRow:
    number: int
    instances: frozenset[str]
    job_id: int | None
    job_status: str | None


def store_with_pynetdicom(
    port: int, items: Sequence[Path | Dataset], aet: str = "PYSCU", aec: str = "MEDGEMMA"
) -> list[int | None]:
    """C-STORE each item in one association; the status of each (None: no response)."""
    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    pairs = set()
    for item in items:
        dataset = (
            item if isinstance(item, Dataset) else pydicom.dcmread(item, stop_before_pixels=True)
        )
        pairs.add((str(dataset.SOPClassUID), str(dataset.file_meta.TransferSyntaxUID)))
    ae.requested_contexts = [build_context(sop, syntax) for sop, syntax in sorted(pairs)]
    assoc = ae.associate("127.0.0.1", port, ae_title=aec)
    assert assoc.is_established, "association to the node failed"
    statuses: list[int | None] = []
    try:
        for item in items:
            response = assoc.send_c_store(item)
            statuses.append(int(response.Status) if response and "Status" in response else None)
    finally:
        assoc.release()
    return statuses


def dataset_bytes(path: Path) -> bytes:
    """The encoded data set of a DICOM file: everything after the File Meta Information."""
    _meta, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def transfer_syntax(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


def instances_of(db: Database, study_uid: str) -> list[Instance]:
    with db.session() as session:
        return list(
            session.scalars(
                select(Instance)
                .join(Study, Study.id == Instance.study_id)
                .where(Study.study_instance_uid == study_uid)
                .order_by(Instance.id)
            )
        )


def instance_row(db: Database, sop_uid: str) -> Instance | None:
    with db.session() as session:
        return session.scalar(select(Instance).where(Instance.sop_instance_uid == sop_uid))


def versions_of(db: Database, study_uid: str) -> list[VersionRow]:
    with db.session() as session:
        rows = session.scalars(
            select(StudyVersion)
            .join(Study, Study.id == StudyVersion.study_id)
            .where(Study.study_instance_uid == study_uid)
            .order_by(StudyVersion.version_number)
        )
        return [
            VersionRow(
                number=version.version_number,
                instances=frozenset(i.sop_instance_uid for i in version.instances),
                job_id=version.job.id if version.job else None,
                job_status=version.job.status if version.job else None,
            )
            for version in rows
        ]


def wait_for_versions(
    db: Database, study_uid: str, how_many: int, timeout: float = 20.0
) -> list[VersionRow]:
    def enough() -> list[VersionRow] | None:
        versions = versions_of(db, study_uid)
        return versions if len(versions) >= how_many else None

    result: list[VersionRow] = wait_for(
        enough, timeout, message=f"study {study_uid} did not reach {how_many} versions"
    )
    return result


def job_count(db: Database) -> int:
    with db.session() as session:
        return len(list(session.scalars(select(Job.id))))


def temp_files(data_dir: Path) -> list[Path]:
    return [path for path in data_dir.rglob(f"{TEMP_MARK}*")]


def received_by_sop_uid(directory: Path) -> dict[str, Path]:
    found = {}
    for path in directory.iterdir():
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
        found[str(dataset.SOPInstanceUID)] = path
    return found
