"""Studies stored straight into a node's data directory and database, the way the SCP stores
them, for tests and benchmarks that drive the worker or the outputs without a DICOM
association.

    study_uid, path = ingest_study(db, data_dir, source, work)   # a copy with new UIDs
    study_uid, path = store_received(db, data_dir, file)         # this file as it is
"""

from __future__ import annotations

from pathlib import Path

import pydicom

from peers.dicom_files import copy_with_new_uids
from storage.db import Database
from storage.files import instance_relpath, write_durably
from storage.ingest import ReceivedInstance, record_instance


def store_received(
    db: Database,
    data_dir: Path,
    file: Path,
    calling_ae: str = "BENCH",
    patient_hash: str = "bench",
) -> tuple[str, Path]:
    """``file`` written under the data directory and recorded as received; its Study
    Instance UID and where it now is."""
    dataset = pydicom.dcmread(file, stop_before_pixels=True)
    relpath = instance_relpath(
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID, dataset.SOPInstanceUID
    )
    write_durably(data_dir / relpath, file.read_bytes())
    record_instance(
        db,
        ReceivedInstance(
            study_uid=dataset.StudyInstanceUID,
            series_uid=dataset.SeriesInstanceUID,
            sop_uid=dataset.SOPInstanceUID,
            sop_class_uid=dataset.SOPClassUID,
            transfer_syntax_uid=dataset.file_meta.TransferSyntaxUID,
            relpath=relpath.as_posix(),
            size_bytes=(data_dir / relpath).stat().st_size,
            calling_ae=calling_ae,
            modality=str(dataset.Modality),
            body_part=str(dataset.get("BodyPartExamined", "")),
            instance_number=None,
            patient_hash=patient_hash,
        ),
    )
    return str(dataset.StudyInstanceUID), data_dir / relpath


def ingest_study(db: Database, data_dir: Path, source: Path, work: Path) -> tuple[str, Path]:
    """A copy of a real image as a new study (the copy in ``work`` removed once stored)."""
    copy = copy_with_new_uids(source, work / f"{pydicom.uid.generate_uid()}.dcm")
    stored = store_received(db, data_dir, copy)
    copy.unlink()
    return stored
