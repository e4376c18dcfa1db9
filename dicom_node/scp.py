"""The Storage SCP: C-ECHO and C-STORE (DICOM PS3.4 Annex A and B, PS3.7 §9.1.1).

The C-STORE handler does four things — check, write, record, return a status — and turns every
failure into a DIMSE status (PS3.4 B.2.3):
    0x0000 Success            file fsynced + renamed + row committed (or a known duplicate)
    0xA700 Out of resources   disk below the watermark, or the disk/database failed
    0xA900 Data set does not match SOP class   UIDs missing or not those of the request, or
                              native pixel data shorter than its Image Pixel module says
    0xC000 Cannot understand  the data set does not parse
A failure status carries an Error Comment (0000,0902) saying why (a related field of each failure
in PS3.4 Table B.2-1). The handler runs in the association's thread: it never touches the model.

Around the associations (PS3.8):
- the called AE title must be ours when dicom.require_called_aet is set (A-ASSOCIATE-RJ
  rejected-permanent, service-user, reason 7 "called-AE-title-not-recognized", §9.3.4);
- ARTIM (dicom.acse_timeout_s) closes connections that send no A-ASSOCIATE-RQ, the network
  timeout aborts idle associations, the DIMSE timeout bounds a C-STORE under way;
- the TLS handshake (PS3.15 B.9) runs in the connection's own thread with the ACSE timeout, so a
  silent client cannot hold up the listener, and every refused handshake is logged with the peer
  address and the reason;
- a peer that breaks the upper layer protocol gets an A-ABORT and one log line.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, Association, evt
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import A_ABORT, A_P_ABORT
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from config.settings import NodeSettings
from config.tls import server_ssl_context
from core.errors import DicomError
from dicom_node.association_audit import AssociationAudit
from dicom_node.listener import (
    NodeAssociationServer,
    associations_per_process,
    listener_class,
    read_exactly,
)
from dicom_node.priors import PriorIntake
from dicom_node.received import ParsedDataSet, chunks_size, parse_received, received_file
from dicom_node.scp_counters import ScpCounters
from dicom_node.statuses import describe_rejection
from storage.db import Database, DatabaseUnavailable
from storage.files import free_disk_mb, instance_relpath, uid_component, write_durably
from storage.ingest import ReceivedInstance, instance_exists, record_instance
from storage.phi import phi_hash

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000

DUL_LOOP_DELAY_S = 0.0002  # see _shorten_dul_polling
ERROR_COMMENT_MAX = 64  # (0000,0902) Error Comment is LO: 64 characters (PS3.7 Annex E)
# Threads of incoming connections are named after the peer (no PHI): log lines and uncaught
# exceptions then say whom they concern.
CONNECTION_THREAD_PREFIX = "dicom-in"

UNCOMPRESSED_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
]

# PS3.5 Annex A.4: the compressed syntaxes we accept when a decoder for them is installed.
COMPRESSED_CANDIDATES = [
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless, Non-Hierarchical (Process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, First-Order Prediction (Process 14 SV1)
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless Only
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # High-Throughput JPEG 2000 Lossless Only
    "1.2.840.10008.1.2.4.202",  # High-Throughput JPEG 2000 with RPCL Lossless Only
    "1.2.840.10008.1.2.4.203",  # High-Throughput JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
]


def decodable_compressed_syntaxes() -> list[str]:
    """Compressed transfer syntaxes whose pixel data the installed plugins can decode."""
    usable = []
    for uid in COMPRESSED_CANDIDATES:
        try:
            if get_decoder(UID(uid)).is_available:
                usable.append(uid)
        except NotImplementedError:
            continue
    return usable


def accepted_transfer_syntaxes() -> list[str]:
    return [*UNCOMPRESSED_SYNTAXES, *decodable_compressed_syntaxes()]


class StoreRejected(DicomError):
    """A C-STORE that must fail with ``status``; the message is safe to log (no PHI)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class StorageSCP:
    """The node's DICOM listener. ``start()`` returns once it listens; ``stop()`` shuts it."""

    def __init__(self, settings: NodeSettings, db: Database, salt: bytes) -> None:
        self.settings = settings
        self.db = db
        self.salt = salt
        self.data_dir = settings.storage.data_dir
        self.counters = ScpCounters()
        self.accepted_sop_classes = set(settings.dicom.accepted_sop_classes)
        self.ignored_sop_classes = set(settings.dicom.ignored_sop_classes)
        self.server: NodeAssociationServer | None = None
        self.on_instance_stored: list[Any] = []  # callables(ReceivedInstance) for metrics
        self.association_audit = AssociationAudit(db)
        # Frees disk below the watermark before refusing (retention; returns studies pruned).
        self.make_room: Callable[[], int] | None = None
        self._room_lock = threading.Lock()
        # More services on the same listener (dicom_node/mpps.py): (SOP class, handlers).
        self.extra_services: list[tuple[str, list[tuple[Any, Any]]]] = []
        # [priors] mode "move": the images the node asked PACS for go to the prior store.
        self.prior_intake = PriorIntake(settings, db) if settings.priors.enabled else None

    def build_ae(self) -> AE:
        dicom = self.settings.dicom
        ae = AE(ae_title=dicom.ae_title)
        ae.maximum_associations = associations_per_process(dicom)
        ae.maximum_pdu_size = dicom.max_pdu
        ae.acse_timeout = dicom.acse_timeout_s
        ae.dimse_timeout = dicom.dimse_timeout_s
        ae.network_timeout = dicom.network_timeout_s
        ae.require_called_aet = dicom.require_called_aet
        if dicom.allowed_calling_aets:
            ae.require_calling_aet = list(dicom.allowed_calling_aets)
        ae.add_supported_context(Verification)
        for sop_class, _handlers in self.extra_services:
            ae.add_supported_context(sop_class)
        syntaxes = accepted_transfer_syntaxes()
        for sop_class in sorted(self.accepted_sop_classes | self.ignored_sop_classes):
            ae.add_supported_context(sop_class, syntaxes)
        return ae

    def start(self) -> None:
        dicom = self.settings.dicom
        if not dicom.allowed_calling_aets:
            log.warning(
                "dicom.allowed_calling_aets is empty: any calling AE title may store studies"
            )
        handlers = [
            (evt.EVT_CONN_OPEN, _prepare_connection),
            (evt.EVT_CONN_CLOSE, _log_connection_closed),
            (evt.EVT_C_STORE, self._handle_store),
            (evt.EVT_C_ECHO, _handle_echo),
            (evt.EVT_REQUESTED, _shorten_dul_polling),
            (evt.EVT_ACCEPTED, _log_accepted),
            (evt.EVT_REJECTED, _log_rejected),
            (evt.EVT_ACSE_RECV, _note_abort_source),
            (evt.EVT_ABORTED, _log_aborted),
            *self.association_audit.handlers(),
            *(handler for _sop_class, extra in self.extra_services for handler in extra),
        ]
        _quieten_pdu_errors()
        ae = self.build_ae()
        server = ae.make_server(
            (dicom.bind_address, dicom.port),
            evt_handlers=handlers,  # type: ignore[arg-type]
            ssl_context=server_ssl_context(dicom.tls),
            server_class=listener_class(dicom),
        )
        assert isinstance(server, NodeAssociationServer)
        server.handshake_timeout_s = dicom.acse_timeout_s
        server.read_timeout_s = dicom.network_timeout_s
        # What AE.start_server(block=False) does, with our server class: AE.shutdown() and
        # the server's own shutdown() find it in the AE's list.
        ae._servers.append(server)
        threading.Thread(
            target=server.serve_forever, name=f"dicom-listener {dicom.port}", daemon=True
        ).start()
        self.server = server
        log.info(
            "DICOM SCP %s listening on %s:%d (%d transfer syntaxes%s)",
            dicom.ae_title,
            dicom.bind_address,
            self.port,
            len(accepted_transfer_syntaxes()),
            ", TLS" if dicom.tls.enabled else "",
        )

    @property
    def port(self) -> int:
        if self.server is None:
            return self.settings.dicom.port
        return int(self.server.server_address[1])

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    # -- C-STORE ---------------------------------------------------------------------------

    def _handle_store(self, event: evt.Event) -> int | Dataset:
        response = self._store_response(event)
        ok = isinstance(response, int) and response == STATUS_SUCCESS
        self.association_audit.count(event.assoc, "stored" if ok else "failed")
        return response

    def _store_response(self, event: evt.Event) -> int | Dataset:
        try:
            status = self._store(event)
        except StoreRejected as rejected:
            self.counters.add("failed")
            log.warning("C-STORE refused with 0x%04X: %s", rejected.status, rejected)
            return failure_response(rejected.status, str(rejected))
        except (OSError, DatabaseUnavailable) as exc:
            self.counters.add("failed")
            log.error("C-STORE failed, disk or database unavailable: %s", type(exc).__name__)
            log.debug("C-STORE failure detail", exc_info=True)
            return failure_response(STATUS_OUT_OF_RESOURCES, "disk or database unavailable")
        except Exception:
            self.counters.add("failed")
            log.exception("C-STORE failed unexpectedly")
            return failure_response(STATUS_CANNOT_UNDERSTAND, "internal error")
        return status

    def _store(self, event: evt.Event) -> int:
        self._check_disk()
        parsed = _decode_fully(event)
        dataset = parsed.dataset
        request = event.request
        uids = _required_uids(dataset, request)
        check_native_pixel_data(dataset, str(event.context.transfer_syntax), parsed.pixel_bytes)
        calling_ae = _calling_ae(event.assoc)
        if uids.sop_class in self.ignored_sop_classes:
            return self._store_ignored(event, uids, calling_ae)
        if self.prior_intake is not None and self.prior_intake.wants(event, uids.study, calling_ae):
            return self.prior_intake.store(event, dataset)
        if instance_exists(self.db, uids.sop_instance):
            self.counters.add("duplicates")
            log.info("duplicate SOP %s from %s acknowledged", uids.sop_instance, calling_ae)
            return STATUS_SUCCESS
        relpath = instance_relpath(uids.study, uids.series, uids.sop_instance)
        with received_file(event) as chunks:
            write_durably(self.data_dir / relpath, chunks)
            size = chunks_size(chunks)
        item = self._received(dataset, uids, event, relpath, size, calling_ae)
        if record_instance(self.db, item):
            self.counters.add("stored")
            for callback in self.on_instance_stored:
                callback(item)
        log.debug("stored SOP %s of study %s from %s", uids.sop_instance, uids.study, calling_ae)
        return STATUS_SUCCESS

    def _check_disk(self) -> None:
        free = free_disk_mb(self.data_dir)
        if free < self.settings.storage.min_free_disk_mb and self.make_room is not None:
            # 0xA700 only when nothing can be pruned: settled studies go first (one
            # association at a time prunes; the others wait for it, then measure again).
            with self._room_lock:
                if free_disk_mb(self.data_dir) < self.settings.storage.min_free_disk_mb:
                    self.make_room()
            free = free_disk_mb(self.data_dir)
        if free < self.settings.storage.min_free_disk_mb:
            raise StoreRejected(
                STATUS_OUT_OF_RESOURCES,
                f"free disk {free:.0f} MB below watermark "
                f"{self.settings.storage.min_free_disk_mb} MB",
            )

    def _store_ignored(self, event: evt.Event, uids: RequiredUIDs, calling_ae: str) -> int:
        """SR/GSPS echoed back by PACS: kept aside so nothing acknowledged is lost."""
        path = self.data_dir / "ignored" / f"{uid_component(uids.sop_instance)}.dcm"
        if not path.exists():
            with received_file(event) as chunks:
                write_durably(path, chunks)
        self.counters.add("ignored")
        log.info("SOP class %s from %s stored aside, not processed", uids.sop_class, calling_ae)
        return STATUS_SUCCESS

    def _received(
        self,
        dataset: Dataset,
        uids: RequiredUIDs,
        event: evt.Event,
        relpath: Path,
        size: int,
        calling_ae: str,
    ) -> ReceivedInstance:
        patient_key = f"{dataset.get('PatientID', '')}|{dataset.get('PatientName', '')}"
        return ReceivedInstance(
            study_uid=uids.study,
            series_uid=uids.series,
            sop_uid=uids.sop_instance,
            sop_class_uid=uids.sop_class,
            transfer_syntax_uid=str(event.context.transfer_syntax),
            relpath=relpath.as_posix(),
            size_bytes=size,
            calling_ae=calling_ae,
            modality=str(dataset.get("Modality", "") or "")[:16],
            body_part=str(dataset.get("BodyPartExamined", "") or "")[:64],
            instance_number=_int_or_none(dataset.get("InstanceNumber")),
            patient_hash=phi_hash(patient_key, self.salt),
        )


@dataclass(frozen=True)
class RequiredUIDs:
    study: str
    series: str
    sop_instance: str
    sop_class: str


def _decode_fully(event: evt.Event) -> ParsedDataSet:
    """Parse every element (not the pixel data): garbage must fail now, not in the worker."""
    try:
        parsed = parse_received(event)
        _walk(parsed.dataset)
    except Exception as exc:
        raise StoreRejected(
            STATUS_CANNOT_UNDERSTAND, f"data set does not parse ({type(exc).__name__})"
        ) from exc
    return parsed


def _walk(dataset: Dataset) -> None:
    for element in dataset:
        if element.VR == "SQ":
            for item in element.value:
                _walk(item)


def _required_uids(dataset: Dataset, request: Any) -> RequiredUIDs:
    """PS3.4 B.2.3: the instance must carry its UIDs and match the request's."""
    values = {
        keyword: str(dataset.get(keyword, "") or "").strip()
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
    }
    missing = [keyword for keyword, value in values.items() if not value]
    if missing:
        raise StoreRejected(STATUS_DATASET_MISMATCH, f"data set lacks {', '.join(missing)}")
    if values["SOPClassUID"] != str(request.AffectedSOPClassUID):
        raise StoreRejected(STATUS_DATASET_MISMATCH, "SOPClassUID differs from the request")
    if values["SOPInstanceUID"] != str(request.AffectedSOPInstanceUID):
        raise StoreRejected(STATUS_DATASET_MISMATCH, "SOPInstanceUID differs from the request")
    return RequiredUIDs(
        study=values["StudyInstanceUID"],
        series=values["SeriesInstanceUID"],
        sop_instance=values["SOPInstanceUID"],
        sop_class=values["SOPClassUID"],
    )


def failure_response(status: int, reason: str) -> Dataset:
    """A C-STORE-RSP status with an Error Comment saying why (no PHI: reasons never quote
    data set values)."""
    response = Dataset()
    response.Status = status
    response.ErrorComment = reason[:ERROR_COMMENT_MAX]
    return response


def check_native_pixel_data(
    dataset: Dataset, transfer_syntax: str, pixel_bytes: int | None
) -> None:
    """PS3.5 §8.1.1 / PS3.3 C.7.6.3: native pixel data holds Rows × Columns × Samples per Pixel
    × Bits Allocated / 8 bytes per frame (1-bit data packed, YBR_FULL_422 two samples per pixel).
    Shorter data cannot be shown or analysed: refuse it now rather than fail in the worker.
    ``pixel_bytes``: the Pixel Data length when the value was skipped (dicom_node/received.py)."""
    if transfer_syntax not in UNCOMPRESSED_SYNTAXES:
        return
    if pixel_bytes is None and "PixelData" not in dataset:
        return
    needed = _native_pixel_bytes(dataset)
    have = pixel_bytes if pixel_bytes is not None else len(dataset["PixelData"].value or b"")
    if have < needed:
        raise StoreRejected(
            STATUS_DATASET_MISMATCH, f"pixel data {have} bytes, image needs {needed}"
        )


def _native_pixel_bytes(dataset: Dataset) -> int:
    keywords = ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated")
    values = {keyword: _int_or_none(dataset.get(keyword)) for keyword in keywords}
    missing = [keyword for keyword, value in values.items() if not value]
    if missing:
        raise StoreRejected(STATUS_DATASET_MISMATCH, f"pixel data without {', '.join(missing)}")
    bits = values["BitsAllocated"] or 0
    if bits != 1 and bits % 8:
        raise StoreRejected(STATUS_DATASET_MISMATCH, f"Bits Allocated {bits} is not 1 or 8n")
    frames = _int_or_none(dataset.get("NumberOfFrames")) or 1
    if frames < 0:
        raise StoreRejected(STATUS_DATASET_MISMATCH, "negative Number of Frames")
    samples = values["SamplesPerPixel"] or 0
    if str(dataset.get("PhotometricInterpretation", "")).strip() == "YBR_FULL_422":
        samples = 2  # PS3.3 C.7.6.3.1.2: Cb and Cr shared by two pixels
    pixels = (values["Rows"] or 0) * (values["Columns"] or 0) * samples * frames
    return (pixels + 7) // 8 if bits == 1 else pixels * (bits // 8)


def _int_or_none(value: object) -> int | None:
    try:
        return int(str(value)) if value not in (None, "") else None
    except ValueError:
        return None


def _calling_ae(assoc: Association) -> str:
    return str(assoc.requestor.ae_title).strip()


def _shorten_dul_polling(event: evt.Event) -> None:
    """Poll the socket more often than pynetdicom's 1 ms while this association lasts.

    pynetdicom's DUL thread sleeps ``_run_loop_delay`` whenever it finds nothing to do, which
    adds up to that much latency to every PDU received and every response sent; with one
    C-STORE at a time per association that latency, not the disk, bounded throughput.
    The price is CPU while an association sits idle (measured: ~3 % of a core at 1 ms, ~8 %
    at 0.2 ms), paid only while the association is open.
    """
    dul = getattr(event.assoc, "dul", None)
    if dul is not None and hasattr(dul, "_run_loop_delay"):
        dul._run_loop_delay = DUL_LOOP_DELAY_S


def _handle_echo(_event: evt.Event) -> int:
    return STATUS_SUCCESS


def _log_accepted(event: evt.Event) -> None:
    log.info("association accepted from %s (%s)", _calling_ae(event.assoc), _peer(event.assoc))


def _log_rejected(event: evt.Event) -> None:
    rejection = event.assoc.acceptor.primitive
    reason = (
        describe_rejection(rejection.result, rejection.result_source, rejection.diagnostic)
        if rejection is not None
        else "no reason recorded"
    )
    called = str(getattr(event.assoc.requestor.primitive, "called_ae_title", "")).strip()
    log.warning(
        "association rejected from %s (%s) called %r: %s",
        _calling_ae(event.assoc),
        _peer(event.assoc),
        called,
        reason,
    )


# Why an association ended in an abort, noted when the A-ABORT or A-P-ABORT indication reaches
# the ACSE (EVT_ACSE_RECV, once per association) and logged with EVT_ABORTED.
_abort_reasons: weakref.WeakKeyDictionary[Association, str] = weakref.WeakKeyDictionary()


def _note_abort_source(event: evt.Event) -> None:
    primitive = getattr(event, "primitive", None)  # set by pynetdicom for ACSE events
    if isinstance(primitive, A_P_ABORT):
        # PS3.8 §9.2 AA-8: the upper layer got a PDU it does not recognise or expect.
        _abort_reasons[event.assoc] = "the peer sent an invalid PDU (A-P-ABORT)"
    elif isinstance(primitive, A_ABORT):
        _abort_reasons[event.assoc] = "the peer sent A-ABORT"


def _log_aborted(event: evt.Event) -> None:
    assoc = event.assoc
    reason = _abort_reasons.pop(assoc, None)
    if reason is None and assoc.dul.idle_timer_expired():
        reason = f"idle for dicom.network_timeout_s ({assoc.network_timeout} s)"
    log.warning(
        "association from %s (%s) aborted: %s",
        _calling_ae(assoc),
        _peer(assoc),
        reason or "aborted by the node (timeout or error)",
    )


def _peer(assoc: Association) -> str:
    return f"{assoc.requestor.address}:{assoc.requestor.port}"


# -- connections -------------------------------------------------------------------------------

# PS3.8 Table 9-10 has no transition for a local primitive in Sta13 (awaiting the close of a
# connection whose association no longer exists) or, on an acceptor, in Sta1 (the connection is
# gone). pynetdicom's ACSE thread can still answer an A-ASSOCIATE-RQ (Evt7/Evt8) after its DUL
# thread aborted on an invalid PDU that followed the request; pynetdicom then raises
# InvalidEventError and the DUL thread dies. Such a primitive can only be dropped.
LOCAL_PRIMITIVE_EVENTS = frozenset({"Evt7", "Evt8", "Evt9", "Evt11", "Evt14", "Evt15"})
ABANDONED_STATES = frozenset({"Sta1", "Sta13"})


def _prepare_connection(event: evt.Event) -> None:
    """EVT_CONN_OPEN, before the association's threads start: name them after the peer, let
    the state machine drop primitives that come after the association is gone, and read PDUs
    whole (dicom_node/listener.py read_exactly: pynetdicom's 4 KB reads cost CPU per image)."""
    host, port = getattr(event, "address", ("?", 0))[:2]  # set by pynetdicom for CONN_OPEN
    assoc = event.assoc
    assoc.name = f"{CONNECTION_THREAD_PREFIX} {host}:{port}"
    assoc.dul.name = f"{CONNECTION_THREAD_PREFIX} {host}:{port} (upper layer)"
    _drop_primitives_after_abort(assoc.dul)
    if assoc.dul.socket is not None:
        assoc.dul.socket.recv = read_exactly.__get__(assoc.dul.socket)  # type: ignore[method-assign]


def _drop_primitives_after_abort(dul: DULServiceProvider) -> None:
    machine = dul.state_machine
    do_action = machine.do_action

    def guarded(event_name: str) -> None:
        if machine.current_state in ABANDONED_STATES and event_name in LOCAL_PRIMITIVE_EVENTS:
            # The primitive that raised the event is still queued: take it away.
            with contextlib.suppress(queue.Empty):
                dul.to_provider_queue.get(block=False)
            return
        do_action(event_name)

    machine.do_action = guarded  # type: ignore[method-assign,assignment]


def _log_connection_closed(event: evt.Event) -> None:
    """A connection that never sent an A-ASSOCIATE-RQ is closed by the ARTIM timer."""
    assoc = event.assoc
    if assoc.requestor.primitive is None and assoc.dul.artim_timer.expired:
        log.info(
            "connection from %s closed: no association request within dicom.acse_timeout_s (%s s)",
            _peer(assoc),
            assoc.acse_timeout,
        )


class _OurConnectionsPduErrors(logging.Filter):
    """Keeps pynetdicom's upper layer errors about our listener's connections to one line each.

    It logs one ERROR per unrecognised PDU (a peer sending a megabyte of garbage would write
    hundreds of thousands of lines: the abort line above says it once), and a read that fails
    in the middle of a PDU as a line plus the exception's traceback (the line is enough).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not (record.threadName or "").startswith(CONNECTION_THREAD_PREFIX):
            return True
        if isinstance(record.msg, BaseException):
            return False
        return not str(record.msg).startswith("Unknown PDU type received")


def _quieten_pdu_errors() -> None:
    dul_logger = logging.getLogger("pynetdicom.dul")
    if not any(isinstance(f, _OurConnectionsPduErrors) for f in dul_logger.filters):
        dul_logger.addFilter(_OurConnectionsPduErrors())
