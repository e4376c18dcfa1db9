"""C-STORE SCU (PS3.4 Annex B, PS3.7 §9.1.1) and C-ECHO SCU (PS3.7 §9.1.5).

Used by ``medgemma-node send``/``echo`` and by the delivery worker. Files are sent as they are
on disk (no re-encoding): each (SOP class, transfer syntax) pair gets its own presentation
context so the peer can accept each one separately.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pynetdicom import AE, Association, build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

MAX_CONTEXTS = 128  # PS3.8 §9.3.2.2: presentation context IDs are odd numbers 1..255


class AssociationFailed(Exception):
    """The peer could not be reached or refused the association."""


@dataclass(frozen=True)
class FileToSend:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


@dataclass
class SendSummary:
    sent: list[Path] = field(default_factory=list)
    warnings: list[tuple[Path, int]] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


def iter_files(paths: Iterable[Path]) -> list[Path]:
    """Files given directly plus every file under given folders, in a stable order."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        else:
            found.append(path)
    return found


def inspect_file(path: Path) -> FileToSend:
    """Read the header only; raise InvalidDicomError for anything that is not a DICOM file."""
    try:
        dataset = dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise InvalidDicomError(f"{path}: not a readable DICOM file ({exc})") from exc
    meta = getattr(dataset, "file_meta", None)
    syntax = getattr(meta, "TransferSyntaxUID", None)
    if syntax is None or "SOPClassUID" not in dataset or "SOPInstanceUID" not in dataset:
        raise InvalidDicomError(f"{path}: no file meta transfer syntax or SOP UIDs")
    return FileToSend(path, str(dataset.SOPClassUID), str(dataset.SOPInstanceUID), str(syntax))


def make_ae(calling_aet: str) -> AE:
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = 30
    ae.dimse_timeout = 60
    ae.network_timeout = 60
    return ae


def associate(
    ae: AE,
    host: str,
    port: int,
    called_aet: str,
    ssl_context: ssl.SSLContext | None = None,
) -> Association:
    tls_args = (ssl_context, "") if ssl_context is not None else None
    assoc = ae.associate(host, port, ae_title=called_aet, tls_args=tls_args)
    if not assoc.is_established:
        reason = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "failed"
        raise AssociationFailed(f"association to {called_aet}@{host}:{port} {reason}")
    return assoc


def echo(host: str, port: int, calling_aet: str, called_aet: str) -> int:
    """C-ECHO; return the status (0x0000 is success)."""
    ae = make_ae(calling_aet)
    ae.add_requested_context(Verification)
    assoc = associate(ae, host, port, called_aet)
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if status else -1
    finally:
        assoc.release()


def send_files(
    files: Sequence[FileToSend],
    host: str,
    port: int,
    calling_aet: str,
    called_aet: str,
    progress: Callable[[FileToSend, int | None], None] | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> SendSummary:
    """Send files over as few associations as the 128-context limit allows."""
    summary = SendSummary()
    for chunk in _chunks_by_context_limit(files):
        ae = make_ae(calling_aet)
        for sop_class, syntax in sorted({(f.sop_class_uid, f.transfer_syntax_uid) for f in chunk}):
            ae.requested_contexts = [*ae.requested_contexts, build_context(sop_class, syntax)]
        assoc = associate(ae, host, port, called_aet, ssl_context)
        try:
            for item in chunk:
                _send_one(assoc, item, summary, progress)
        finally:
            if assoc.is_established:
                assoc.release()
    return summary


def _chunks_by_context_limit(files: Sequence[FileToSend]) -> list[list[FileToSend]]:
    chunks: list[list[FileToSend]] = []
    pairs: set[tuple[str, str]] = set()
    for item in files:
        pair = (item.sop_class_uid, item.transfer_syntax_uid)
        if not chunks or (pair not in pairs and len(pairs) >= MAX_CONTEXTS):
            chunks.append([])
            pairs = set()
        pairs.add(pair)
        chunks[-1].append(item)
    return chunks


def _send_one(
    assoc: Association,
    item: FileToSend,
    summary: SendSummary,
    progress: Callable[[FileToSend, int | None], None] | None,
) -> None:
    if not assoc.is_established:
        summary.failed.append((item.path, "association lost"))
        return
    try:
        response = assoc.send_c_store(item.path)
    except ValueError as exc:  # no accepted context for this SOP class / syntax
        summary.skipped.append((item.path, str(exc)))
        if progress:
            progress(item, None)
        return
    status = int(response.Status) if response and "Status" in response else None
    _record_status(item, status, summary)
    if progress:
        progress(item, status)


def _record_status(item: FileToSend, status: int | None, summary: SendSummary) -> None:
    # PS3.4 B.2.3: 0x0000 success; 0xB000/0xB007/0xB006 warnings are stored too.
    if status == 0x0000:
        summary.sent.append(item.path)
    elif status is not None and (status & 0xF000) == 0xB000:
        summary.warnings.append((item.path, status))
    else:
        text = "no response (timeout or abort)" if status is None else f"status 0x{status:04X}"
        summary.failed.append((item.path, text))
