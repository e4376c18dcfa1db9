"""C-STORE SCU (PS3.4 Annex B, PS3.7 §9.1.1) and C-ECHO SCU (PS3.7 §9.1.5).

Used by ``medgemma-node send``/``echo`` and by the delivery worker. Files are sent as they are
on disk (no re-encoding): each (SOP class, transfer syntax) pair gets its own presentation
context so the peer can accept each one separately.

``store_batch`` is the delivery worker's entry (through dicom_node.sender): one association per
batch, optional TLS (PS3.15 Annex B.9), an Explicit VR Little Endian fallback context per SOP
class, and one ``DeliveryOutcome`` (storage.delivery_types) per file judged by its C-STORE
status (PS3.4 B.2.3, PS3.7 Annex C); the outcome's code is the status as ``0xNNNN``, or
``no-status`` when none came.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, Association, build_context, evt
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from config.settings import DicomDestination
from config.tls import client_ssl_context
from core.errors import DicomError
from dicom_node.statuses import describe_rejection, describe_status
from storage.delivery_types import DeliveryOutcome, Verdict

MAX_CONTEXTS = 128  # PS3.8 §9.3.2.2: presentation context IDs are odd numbers 1..255


class AssociationFailed(DicomError):
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
    *,
    ext_neg: list[object] | None = None,
    evt_handlers: list[evt.EventHandlerType] | None = None,
) -> Association:
    """Request an association; raise AssociationFailed when it is not established.

    With TLS the peer's certificate must name ``host`` (when the context checks host names).
    ``ext_neg``: extended negotiation items (e.g. SCP/SCU role selection for C-GET);
    ``evt_handlers``: more handlers bound to the association (e.g. C-STORE for C-GET).
    """
    server_hostname = host if ssl_context is not None and ssl_context.check_hostname else ""
    tls_args = (ssl_context, server_hostname) if ssl_context is not None else None
    # pynetdicom reports a refused TCP connection as an abort; tell the two apart.
    connected: list[bool] = []
    handlers: list[evt.EventHandlerType] = [
        (evt.EVT_CONN_OPEN, lambda _event: connected.append(True)),
        *(evt_handlers or []),
    ]
    assoc = ae.associate(
        host,
        port,
        ae_title=called_aet,
        tls_args=tls_args,
        evt_handlers=handlers,
        ext_neg=ext_neg,  # type: ignore[arg-type]
    )
    if not assoc.is_established:
        if not connected:
            raise AssociationFailed(
                f"cannot connect to {host}:{port} (nothing listening, unreachable, "
                "or the TLS handshake failed)"
            )
        raise AssociationFailed(
            f"association to {called_aet}@{host}:{port} {_why_not_established(assoc)}"
        )
    return assoc


def _why_not_established(assoc: Association) -> str:
    """'rejected: <result, source and reason in words>' (PS3.8 §9.3.4), or aborted/failed."""
    if assoc.is_rejected:
        rejection = assoc.acceptor.primitive
        if rejection is None:
            return "rejected"
        reason = describe_rejection(rejection.result, rejection.result_source, rejection.diagnostic)
        return f"rejected: {reason}"
    return "aborted" if assoc.is_aborted else "failed"


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
    comment = str(response.get("ErrorComment", "") or "") if response else ""
    _record_status(item, status, summary, comment)
    if progress:
        progress(item, status)


def _record_status(
    item: FileToSend, status: int | None, summary: SendSummary, error_comment: str = ""
) -> None:
    # PS3.4 B.2.3: 0x0000 success; 0xB000/0xB007/0xB006 warnings are stored too.
    if status == 0x0000:
        summary.sent.append(item.path)
    elif status is not None and (status & 0xF000) == 0xB000:
        summary.warnings.append((item.path, status))
    else:
        summary.failed.append((item.path, describe_status(status, error_comment)))


# ---------------------------------------------------------------------------------------------
# Batch delivery of report objects (the delivery worker's C-STORE)

UNCOMPRESSED_FALLBACK: list[str | UID] = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
_RETRYABLE_FAILURES = {0x0210, 0x0213}  # PS3.7 C.5: duplicate invocation, resource limitation
NO_STATUS = "no-status"  # the outcome code when no C-STORE response status came


def status_code(status: int | None) -> str:
    return NO_STATUS if status is None else f"0x{status:04X}"


def judge_store_status(status: int | None) -> Verdict:
    """Classify a C-STORE response status (PS3.4 B.2.3, PS3.7 Annex C).

    Success 0x0000 and the Warning statuses 0xB000/0xB006/0xB007 (the object was stored) are
    delivered. Out of resources 0xA7xx, resource limitation 0x0213, duplicate invocation 0x0210
    and no response at all are worth retrying. The refusals — 0xA9xx data set does not match
    SOP class, 0xCxxx cannot understand, 0x01xx (SOP class not supported, not authorized,
    invalid SOP instance), 0x0211/0x0212 — are rejections. Unknown codes are retried.
    """
    if status is None:
        return Verdict.RETRY
    if status == 0x0000 or (status & 0xF000) == 0xB000:
        return Verdict.DELIVERED
    if (status & 0xFF00) == 0xA700 or status in _RETRYABLE_FAILURES:
        return Verdict.RETRY
    if (status & 0xFF00) in (0xA900, 0x0100) or (status & 0xF000) == 0xC000:
        return Verdict.REJECTED
    if status in (0x0211, 0x0212):
        return Verdict.REJECTED
    return Verdict.RETRY


def store_batch(
    paths: Sequence[Path],
    destination: DicomDestination,
    calling_aet: str,
    *,
    timeout_s: float = 30.0,
) -> list[DeliveryOutcome]:
    """C-STORE ``paths`` to ``destination`` over one association; one outcome per path, in order.

    Each file is offered in its own transfer syntax plus an Explicit/Implicit VR Little Endian
    context per SOP class; a compressed file whose own syntax is not accepted is decompressed
    and sent in the uncompressed context. If the association cannot be established every file
    is RETRY; files left when it drops are RETRY too. A file that cannot be read, or whose SOP
    class the peer accepted no context for, is REJECTED.
    """
    outcomes: dict[int, DeliveryOutcome] = {}
    files: dict[int, FileToSend] = {}
    for index, path in enumerate(paths):
        try:
            files[index] = inspect_file(path)
        except InvalidDicomError as exc:
            outcomes[index] = DeliveryOutcome.rejected(str(exc), NO_STATUS)
    if files:
        outcomes.update(_store_over_one_association(files, destination, calling_aet, timeout_s))
    return [outcomes[index] for index in range(len(paths))]


def batch_contexts(files: Iterable[FileToSend]) -> list[PresentationContext]:
    """Presentation contexts for a batch (PS3.8 §9.3.2.2): each file's own syntax, and one
    uncompressed fallback context per SOP class. Raises ValueError above 128 contexts."""
    pairs = {(f.sop_class_uid, f.transfer_syntax_uid) for f in files}
    contexts = [
        build_context(sop_class, syntax)
        for sop_class, syntax in sorted(pairs)
        if syntax not in UNCOMPRESSED_FALLBACK
    ]
    for sop_class in sorted({sop_class for sop_class, _ in pairs}):
        contexts.append(build_context(sop_class, UNCOMPRESSED_FALLBACK))
    if len(contexts) > MAX_CONTEXTS:
        raise ValueError(f"a batch needs {len(contexts)} presentation contexts; at most 128")
    return contexts


def _store_over_one_association(
    files: dict[int, FileToSend],
    destination: DicomDestination,
    calling_aet: str,
    timeout_s: float,
) -> dict[int, DeliveryOutcome]:
    ae = make_ae(calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.requested_contexts = batch_contexts(files.values())
    try:
        assoc = associate(
            ae,
            destination.host,
            destination.port,
            destination.ae_title,
            client_ssl_context(destination.tls),
        )
    except (AssociationFailed, OSError, RuntimeError, ValueError) as exc:
        failed = DeliveryOutcome.retry(
            f"association failed: {exc}", NO_STATUS, destination_down=True
        )
        return dict.fromkeys(files, failed)
    try:
        return _store_files(assoc, files)
    finally:
        if assoc.is_established:
            assoc.release()


def _store_files(assoc: Association, files: dict[int, FileToSend]) -> dict[int, DeliveryOutcome]:
    """Send in order; once a C-STORE got no response the association is not trusted any more
    (pynetdicom aborts it on a DIMSE timeout), so the remaining files wait for a retry."""
    outcomes: dict[int, DeliveryOutcome] = {}
    usable = True
    for index, item in files.items():
        if not (usable and assoc.is_established):
            outcomes[index] = DeliveryOutcome.retry(
                "association lost", NO_STATUS, destination_down=True
            )
            continue
        outcome = _store_file(assoc, item)
        outcomes[index] = outcome
        usable = not (outcome.code == NO_STATUS and outcome.verdict is Verdict.RETRY)
    return outcomes


def _store_file(assoc: Association, item: FileToSend) -> DeliveryOutcome:
    try:
        dataset_or_path = _encodable_for_peer(assoc, item)
    except (ValueError, RuntimeError, NotImplementedError, OSError, AttributeError) as exc:
        reason = f"cannot decompress for the peer's Explicit VR Little Endian context: {exc}"
        return DeliveryOutcome.rejected(reason, NO_STATUS)
    if dataset_or_path is None:
        reason = f"the peer accepted no presentation context for SOP class {item.sop_class_uid}"
        return DeliveryOutcome.rejected(reason, NO_STATUS)
    try:
        response = assoc.send_c_store(dataset_or_path)
    except (ValueError, AttributeError, OSError, RuntimeError) as exc:
        return DeliveryOutcome.retry(f"C-STORE not sent: {exc}", NO_STATUS)
    status = int(response.Status) if response is not None and "Status" in response else None
    reason = "" if status == 0 else _status_reason(status)
    return DeliveryOutcome(judge_store_status(status), reason, status_code(status))


def _encodable_for_peer(assoc: Association, item: FileToSend) -> Path | Dataset | None:
    """The path when an accepted context carries the file as it is (pynetdicom converts
    between uncompressed syntaxes); a decompressed data set for the fallback context; None
    when the peer accepted nothing for the SOP class."""
    accepted = [
        context
        for context in assoc.accepted_contexts
        if context.abstract_syntax == item.sop_class_uid and context.as_scu
    ]
    syntaxes = {UID(context.transfer_syntax[0]) for context in accepted}
    file_syntax = UID(item.transfer_syntax_uid)
    if file_syntax in syntaxes:
        return item.path
    if not syntaxes & set(UNCOMPRESSED_FALLBACK):
        return None
    if not file_syntax.is_compressed:
        return item.path
    dataset = dcmread(item.path)
    dataset.decompress()  # PS3.5 A.2: now Explicit VR Little Endian
    return dataset


def _status_reason(status: int | None) -> str:
    if status is None:
        return "no C-STORE response (timeout or abort)"
    kind = "warning" if (status & 0xF000) == 0xB000 else "failure"
    return f"C-STORE {kind} status 0x{status:04X}"
