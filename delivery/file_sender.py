"""The file destination's sender: a report's files placed in a directory, durably.

    sender = FileSender(destination, db, data_dir)
    outcomes = sender.send(parcels)                    # storage.delivery_types

A row with object_id set (or an .hl7 payload) is that one file. A JSON report row is the
report's whole set, written in this order so that the JSON, last, marks it complete: the DICOM
objects (copy_dicom), the ORU ``oru-<destination name>.hl7`` beside the JSON (write_hl7), then
the JSON. Each file is written with fsync, rename and fsync of the directory
(storage.files.write_durably). Names are fixed by the report (``delivered_file_name``), so a
re-send rewrites the same files; an identical file already there is left untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from config.settings import FileDestination
from storage.db import Database
from storage.delivery_types import DeliveryOutcome, Parcel, send_each
from storage.files import uid_component, write_durably
from storage.outbox import ClaimedItem, report_object_files

_LABEL_BY_SUFFIX = {".json": "report", ".hl7": "oru"}


class FileSender:
    """The delivery Sender of one file destination."""

    def __init__(self, destination: FileDestination, db: Database, data_dir: Path) -> None:
        self.destination = destination
        self.db = db
        self.data_dir = data_dir

    def send(self, parcels: Sequence[Parcel]) -> list[DeliveryOutcome]:
        return send_each(parcels, self._write)

    def _write(self, parcel: Parcel) -> DeliveryOutcome:
        files = self.files_for(parcel)
        missing = [source for source, _ in files if not source.is_file()]
        if missing:
            reason = f"payload file missing: {missing[0]}"
            return DeliveryOutcome.rejected(reason, "payload-missing")
        written = 0
        for source, name in files:
            target = self.destination.directory / name
            try:
                written += _place(source.read_bytes(), target)
            except OSError as exc:
                reason = f"cannot write {target}: {exc}"
                return DeliveryOutcome.retry(reason, type(exc).__name__, destination_down=True)
        return DeliveryOutcome.delivered("", f"{written} of {len(files)} written")

    def files_for(self, parcel: Parcel) -> list[tuple[Path, str]]:
        """(source file, name in the destination directory) pairs, the row's payload last."""
        item = parcel.item
        own = (parcel.path, delivered_file_name(item))
        if item.object_kind is not None or parcel.path.suffix.lower() == ".hl7":
            return [own]
        stem = report_file_stem(item)
        files: list[tuple[Path, str]] = []
        if self.destination.copy_dicom:
            for obj in report_object_files(self.db, item.report_id):
                name = object_file_name(stem, obj.kind, obj.sop_instance_uid, Path(obj.path))
                files.append((self.data_dir / obj.path, name))
        if self.destination.write_hl7:
            oru = parcel.path.parent / f"oru-{self.destination.name}.hl7"
            files.append((oru, f"{stem}_oru.hl7"))
        return [*files, own]


def _place(data: bytes, target: Path) -> int:
    """Write ``data`` at ``target`` unless it is there already; 1 when written."""
    if target.is_file() and target.read_bytes() == data:
        return 0
    write_durably(target, data)
    return 1


def report_file_stem(item: ClaimedItem) -> str:
    return f"{uid_component(item.study_instance_uid)}_{item.report_id}"


def object_file_name(stem: str, kind: str, sop_instance_uid: str, payload: Path) -> str:
    return f"{stem}_{kind}_{uid_component(sop_instance_uid)}{payload.suffix or '.dcm'}"


def delivered_file_name(item: ClaimedItem) -> str:
    """``<study uid>_<report id>_report.json``, ``..._oru.hl7``, or for a DICOM object
    ``..._<object kind>_<SOP instance uid>.dcm``; any other payload keeps its own name."""
    stem = report_file_stem(item)
    payload = Path(item.payload_path)
    if item.object_kind is not None and item.sop_instance_uid is not None:
        return object_file_name(stem, item.object_kind, item.sop_instance_uid, payload)
    label = _LABEL_BY_SUFFIX.get(payload.suffix.lower())
    return f"{stem}_{label}{payload.suffix}" if label else f"{stem}_{payload.name}"
