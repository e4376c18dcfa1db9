"""The file destination's sender: a report's files placed in a directory, durably.

    sender = FileSender(destination, db, data_dir)
    outcomes = sender.send(parcels)                    # storage.delivery_types

A row with object_id set (or an .hl7 payload) is that one file. A JSON report row is the
report's whole set, written in this order so that the JSON, last, marks it complete: the DICOM
objects (copy_dicom), the ORU ``oru-<destination name>.hl7`` beside the JSON (write_hl7), the
PDF report ``<study uid>_<report id>_report.pdf`` (write_pdf; built on the first send by the
process wiring's preparing sender), then the JSON. Each file is written with fsync, rename and
fsync of the directory (storage.files.write_durably). Names are fixed by the report
(``delivered_file_name``), so a re-send rewrites the same files; an identical file already
there is left untouched.

The parcels of one claim are written by up to ``WRITERS`` threads at once, one report per
thread (its files in the order above). Each file waits for its fsyncs, on a network share for
the server's: one report after another, a lane fell behind a batch's stores (at the end of a
640-CR burst on an H200 host the last JSON came 0.2 s after its report was stored,
benchmarks/RESULTS.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from config.settings import FileDestination
from storage.db import Database
from storage.delivery_types import DeliveryOutcome, Parcel, send_each
from storage.files import report_pdf_relpath, uid_component, write_durably
from storage.outbox import ClaimedItem, report_object_files

_LABEL_BY_SUFFIX = {".json": "report", ".hl7": "oru"}
WRITERS = 8  # reports written at once (module docstring)


class FileSender:
    """The delivery Sender of one file destination."""

    def __init__(self, destination: FileDestination, db: Database, data_dir: Path) -> None:
        self.destination = destination
        self.db = db
        self.data_dir = data_dir

    def send(self, parcels: Sequence[Parcel]) -> list[DeliveryOutcome]:
        if len(parcels) < 2:
            return send_each(parcels, self._write)
        writers = min(WRITERS, len(parcels))
        with ThreadPoolExecutor(writers, thread_name_prefix="file-writer") as pool:
            # Each through send_each alone: a missing payload is refused, a sender bug retried.
            return list(pool.map(lambda parcel: send_each([parcel], self._write)[0], parcels))

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
        if self.destination.write_pdf:
            pdf = self.data_dir / report_pdf_relpath(item.report_id)
            files.append((pdf, f"{stem}_report.pdf"))
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
