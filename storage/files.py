"""Files on disk: durable writes and the data directory layout.

Layout under the data directory:
    instances/<study uid>/<series uid>/<sop uid>.dcm   received objects, bytes as received
    ignored/<sop uid>.dcm                               SR/GSPS echoed back to us (not processed)
    reports/<report id>/...                             objects the node built
    reports/<report id>/report.pdf                      the PDF report, built on first delivery
    logs/, run/                                         log files, the serving process' status
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

TEMP_MARK = ".part-"
_SAFE_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def uid_component(uid: str) -> str:
    """A path component for a UID; anything that is not a plain DICOM UID is hashed.

    PS3.5 §9.1 allows only digits and dots, but senders do send other text; hashing keeps such
    values from escaping the data directory ("../") or clashing on case-insensitive disks.
    """
    if len(uid) <= 64 and _SAFE_UID.match(uid):
        return uid
    return "x" + hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()[:40]


def instance_relpath(study_uid: str, series_uid: str, sop_uid: str) -> Path:
    return (
        Path("instances")
        / uid_component(study_uid)
        / uid_component(series_uid)
        / f"{uid_component(sop_uid)}.dcm"
    )


REPORT_PDF = "report.pdf"


def report_pdf_relpath(report_id: int) -> Path:
    """Where a report's PDF is kept (relative to the data directory); it is built by the
    delivery side the first time a destination needs it."""
    return Path("reports") / str(report_id) / REPORT_PDF


def write_durably(path: Path, data: bytes | memoryview | Sequence[bytes | memoryview]) -> None:
    """Write so that after return the file survives a crash or power loss.

    Temp name in the same directory → write → fsync file → rename → fsync directory. A crash
    before the rename leaves only a temp file, removed by remove_temp_files() at start.
    ``data`` may be chunks, written one after the other (a received image is not joined into
    one more copy first).
    """
    chunks = [data] if isinstance(data, bytes | memoryview) else data
    created = _make_dirs(path.parent)
    temp = path.with_name(f"{TEMP_MARK}{uuid.uuid4().hex}-{path.name}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        for chunk in chunks:
            _write_all(fd, chunk)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        temp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(temp, path)
    for directory in [path.parent, *created]:
        fsync_dir(directory)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    with memoryview(data) as view:
        while view:
            written = os.write(fd, view)
            view = view[written:]


def _make_dirs(directory: Path) -> list[Path]:
    """mkdir -p, returning the parents of every created directory (their entries changed)."""
    missing: list[Path] = []
    current = directory
    while not current.exists():
        missing.append(current)
        current = current.parent
    directory.mkdir(parents=True, exist_ok=True)
    return [created.parent for created in missing]


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_temp_files(root: Path) -> int:
    """Delete temp files a crash left behind; return how many."""
    removed = 0
    if not root.exists():
        return 0
    for temp in root.rglob(f"{TEMP_MARK}*"):
        temp.unlink(missing_ok=True)
        removed += 1
    return removed


def free_disk_mb(path: Path) -> float:
    probe = path if path.exists() else path.parent
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free / (1024 * 1024)
