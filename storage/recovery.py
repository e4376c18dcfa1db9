"""Start-up reconciliation: after any crash, every acknowledged instance is on disk and in a row.

Order of the SCP's work is file durable → row committed → Success. So after a crash:
    temp files            never acknowledged: removed;
    file without a row    never acknowledged, but complete and fsynced: recorded now (the
                          sender will resend it; the duplicate is then acknowledged);
    row without a file    cannot happen unless someone deleted files: logged loudly, audited.
Jobs whose lease expired (their worker died) go back to the queue. Report directories written
by a worker that died before committing the report (storage/report_ids.py) are removed once
older than the job lease.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import select

from storage.db import Database
from storage.files import remove_temp_files
from storage.ingest import ReceivedInstance, record_instance
from storage.jobs import requeue_expired_leases
from storage.models import AuditEvent, Instance
from storage.phi import phi_hash
from storage.report_ids import remove_unstored_report_dirs

log = logging.getLogger(__name__)


@dataclass
class RecoveryReport:
    temp_files_removed: int = 0
    files_recorded: int = 0
    rows_without_file: int = 0
    jobs_requeued: int = 0
    report_dirs_removed: int = 0


def recover(
    db: Database, data_dir: Path, salt: bytes, job_lease_s: float = 600.0
) -> RecoveryReport:
    report = RecoveryReport(temp_files_removed=remove_temp_files(data_dir))
    instances_dir = data_dir / "instances"
    with db.session() as session:
        known = set(session.scalars(select(Instance.path)))
    on_disk = {path.relative_to(data_dir).as_posix(): path for path in instances_dir.rglob("*.dcm")}
    for relpath in sorted(on_disk.keys() - known):
        if _record_orphan_file(db, on_disk[relpath], relpath, salt):
            report.files_recorded += 1
    missing = sorted(known - on_disk.keys())
    report.rows_without_file = len(missing)
    if missing:
        _audit_missing(db, missing)
    report.jobs_requeued = requeue_expired_leases(db, all_running=db.is_sqlite)
    report.report_dirs_removed = remove_unstored_report_dirs(db, data_dir, job_lease_s)
    return report


def _record_orphan_file(db: Database, path: Path, relpath: str, salt: bytes) -> bool:
    try:
        dataset = dcmread(path, stop_before_pixels=True)
        item = ReceivedInstance(
            study_uid=str(dataset.StudyInstanceUID),
            series_uid=str(dataset.SeriesInstanceUID),
            sop_uid=str(dataset.SOPInstanceUID),
            sop_class_uid=str(dataset.SOPClassUID),
            transfer_syntax_uid=str(dataset.file_meta.TransferSyntaxUID),
            relpath=relpath,
            size_bytes=path.stat().st_size,
            calling_ae="",
            modality=str(dataset.get("Modality", "") or "")[:16],
            body_part=str(dataset.get("BodyPartExamined", "") or "")[:64],
            instance_number=None,
            patient_hash=phi_hash(
                f"{dataset.get('PatientID', '')}|{dataset.get('PatientName', '')}", salt
            ),
        )
    except Exception as exc:
        log.error("unreadable file %s left in the data directory: %s", relpath, exc)
        return False
    recorded = record_instance(db, item)
    if recorded:
        log.warning("recorded %s, written before a crash but not yet in the database", relpath)
    return recorded


def _audit_missing(db: Database, missing: list[str]) -> None:
    log.error(
        "%d instance rows have no file in the data directory (first: %s); "
        "files were removed outside the node",
        len(missing),
        missing[0],
    )
    with db.session() as session:
        session.add(AuditEvent(kind="recovery.rows_without_file", detail={"paths": missing[:100]}))
