"""DICOM associations of the Storage SCP (PS3.8): the connection threads named after the peer,
the events logged once each (accepted, rejected, aborted and why, closed by ARTIM), the upper
layer's state machine kept alive after an abort, and the TLS handshake (PS3.15 B.9) off the
accept loop (``NodeAssociationServer``).

    handlers = association_handlers()     # (event, handler) pairs for AE.make_server
    server_class = NodeAssociationServer

dicom_node/scp.py adds the C-STORE and C-ECHO handlers and starts the listener.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import ssl
import weakref
from typing import Any

from pynetdicom import Association, evt
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import A_ABORT, A_P_ABORT
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.statuses import describe_rejection

log = logging.getLogger(__name__)

DUL_LOOP_DELAY_S = 0.0002  # see shorten_dul_polling
# Threads of incoming connections are named after the peer (no PHI): log lines and uncaught
# exceptions then say whom they concern.
CONNECTION_THREAD_PREFIX = "dicom-in"


def association_handlers() -> list[tuple[evt.EventType, Any]]:
    """The handlers of connection and association events (everything but the DIMSE services)."""
    return [
        (evt.EVT_CONN_OPEN, prepare_connection),
        (evt.EVT_CONN_CLOSE, log_connection_closed),
        (evt.EVT_REQUESTED, shorten_dul_polling),
        (evt.EVT_ACCEPTED, log_accepted),
        (evt.EVT_REJECTED, log_rejected),
        (evt.EVT_ACSE_RECV, note_abort_source),
        (evt.EVT_ABORTED, log_aborted),
    ]


def calling_ae(assoc: Association) -> str:
    return str(assoc.requestor.ae_title).strip()


def shorten_dul_polling(event: evt.Event) -> None:
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


def log_accepted(event: evt.Event) -> None:
    log.info("association accepted from %s (%s)", calling_ae(event.assoc), peer(event.assoc))


def log_rejected(event: evt.Event) -> None:
    rejection = event.assoc.acceptor.primitive
    reason = (
        describe_rejection(rejection.result, rejection.result_source, rejection.diagnostic)
        if rejection is not None
        else "no reason recorded"
    )
    called = str(getattr(event.assoc.requestor.primitive, "called_ae_title", "")).strip()
    log.warning(
        "association rejected from %s (%s) called %r: %s",
        calling_ae(event.assoc),
        peer(event.assoc),
        called,
        reason,
    )


# Why an association ended in an abort, noted when the A-ABORT or A-P-ABORT indication reaches
# the ACSE (EVT_ACSE_RECV, once per association) and logged with EVT_ABORTED.
_abort_reasons: weakref.WeakKeyDictionary[Association, str] = weakref.WeakKeyDictionary()


def note_abort_source(event: evt.Event) -> None:
    primitive = getattr(event, "primitive", None)  # set by pynetdicom for ACSE events
    if isinstance(primitive, A_P_ABORT):
        # PS3.8 §9.2 AA-8: the upper layer got a PDU it does not recognise or expect.
        _abort_reasons[event.assoc] = "the peer sent an invalid PDU (A-P-ABORT)"
    elif isinstance(primitive, A_ABORT):
        _abort_reasons[event.assoc] = "the peer sent A-ABORT"


def log_aborted(event: evt.Event) -> None:
    assoc = event.assoc
    reason = _abort_reasons.pop(assoc, None)
    if reason is None and assoc.dul.idle_timer_expired():
        reason = f"idle for dicom.network_timeout_s ({assoc.network_timeout} s)"
    log.warning(
        "association from %s (%s) aborted: %s",
        calling_ae(assoc),
        peer(assoc),
        reason or "aborted by the node (timeout or error)",
    )


def peer(assoc: Association) -> str:
    return f"{assoc.requestor.address}:{assoc.requestor.port}"


# -- connections -------------------------------------------------------------------------------

# PS3.8 Table 9-10 has no transition for a local primitive in Sta13 (awaiting the close of a
# connection whose association no longer exists) or, on an acceptor, in Sta1 (the connection is
# gone). pynetdicom's ACSE thread can still answer an A-ASSOCIATE-RQ (Evt7/Evt8) after its DUL
# thread aborted on an invalid PDU that followed the request; pynetdicom then raises
# InvalidEventError and the DUL thread dies. Such a primitive can only be dropped.
LOCAL_PRIMITIVE_EVENTS = frozenset({"Evt7", "Evt8", "Evt9", "Evt11", "Evt14", "Evt15"})
ABANDONED_STATES = frozenset({"Sta1", "Sta13"})


def prepare_connection(event: evt.Event) -> None:
    """EVT_CONN_OPEN, before the association's threads start: name them after the peer and let
    the state machine drop primitives that come after the association is gone."""
    host, port = getattr(event, "address", ("?", 0))[:2]  # set by pynetdicom for CONN_OPEN
    assoc = event.assoc
    assoc.name = f"{CONNECTION_THREAD_PREFIX} {host}:{port}"
    assoc.dul.name = f"{CONNECTION_THREAD_PREFIX} {host}:{port} (upper layer)"
    _drop_primitives_after_abort(assoc.dul)


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


def log_connection_closed(event: evt.Event) -> None:
    """A connection that never sent an A-ASSOCIATE-RQ is closed by the ARTIM timer."""
    assoc = event.assoc
    if assoc.requestor.primitive is None and assoc.dul.artim_timer.expired:
        log.info(
            "connection from %s closed: no association request within dicom.acse_timeout_s (%s s)",
            peer(assoc),
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


def quieten_pdu_errors() -> None:
    dul_logger = logging.getLogger("pynetdicom.dul")
    if not any(isinstance(f, _OurConnectionsPduErrors) for f in dul_logger.filters):
        dul_logger.addFilter(_OurConnectionsPduErrors())


# -- TLS ---------------------------------------------------------------------------------------

# OpenSSL reason codes of refused handshakes, in words for the log.
TLS_REFUSALS = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the client sent no certificate",
    "CERTIFICATE_VERIFY_FAILED": "the client certificate is not from a trusted CA",
    "TLSV1_ALERT_UNKNOWN_CA": "the client does not trust our certificate",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the client rejected our certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the client rejected our certificate",
    "WRONG_VERSION_NUMBER": "not TLS (plain DICOM to the TLS port?)",
    "HTTP_REQUEST": "not TLS (an HTTP request)",
    "UNSUPPORTED_PROTOCOL": "the client offers only TLS versions below 1.2",
    "NO_SHARED_CIPHER": "no cipher suite in common",
    "UNEXPECTED_EOF_WHILE_READING": "the client closed the connection during the handshake",
}


class NodeAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded listener with the TLS handshake moved off the accept loop.

    pynetdicom shakes hands in ``get_request``, in the one thread that accepts connections and
    on a blocking socket: one client that connects and sends nothing stops every other
    association, and a refused handshake leaves no trace. Here the handshake runs in the
    connection's thread, bounded by the ACSE timeout, and a refusal is logged.
    """

    handshake_timeout_s: float = 30.0
    # pynetdicom leaves accepted sockets blocking: a peer that stops in the middle of a PDU
    # would hold its upper layer thread in recv() for ever, out of reach of every timer. With
    # this timeout such a read fails and the connection is closed (pynetdicom's Evt17).
    read_timeout_s: float | None = 60.0

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()
        return client, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if self.ssl_context is not None:
            request = self._handshake(self.ssl_context, request, client_address)
            if request is None:
                return
        request.settimeout(self.read_timeout_s)
        super().process_request_thread(request, client_address)

    def _handshake(
        self, context: ssl.SSLContext, client: socket.socket, address: tuple[str, int]
    ) -> ssl.SSLSocket | None:
        peer = f"{address[0]}:{address[1]}"
        client.settimeout(self.handshake_timeout_s)
        try:
            secured = context.wrap_socket(client, server_side=True)
        except TimeoutError:
            reason = f"no handshake within dicom.acse_timeout_s ({self.handshake_timeout_s} s)"
        except ssl.SSLError as exc:
            code = str(exc.reason or type(exc).__name__)
            reason = f"{TLS_REFUSALS.get(code, 'handshake failed')} ({code})"
        except OSError as exc:
            reason = f"connection lost during the handshake ({type(exc).__name__})"
        else:
            return secured
        log.warning("TLS handshake from %s refused: %s", peer, reason)
        client.close()
        return None
