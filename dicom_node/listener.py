"""The SCP's listening socket: pynetdicom's threaded server with the TLS handshake (PS3.15
B.9) moved into each connection's thread, bounded, and every refusal logged."""

from __future__ import annotations

import logging
import math
import os
import socket
import ssl
from typing import Any

from pynetdicom.transport import AssociationSocket, ThreadedAssociationServer

from config.settings import DicomSettings

log = logging.getLogger("dicom_node.scp")  # the SCP's log lines, as before the split

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


class SharedPortAssociationServer(NodeAssociationServer):
    """The listener of one of several receiving processes on the same port: SO_REUSEPORT
    before bind, so the kernel hands each new connection to one of the processes. Only when
    [dicom] receive_processes > 1: otherwise a second node started on the same port by mistake
    must fail with "address in use", not share the connections."""

    def server_bind(self) -> None:
        assert self.socket is not None
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


MAX_AUTO_RECEIVE_PROCESSES = 4
CPUS_PER_AUTO_RECEIVE_PROCESS = 4


def receive_processes(dicom: DicomSettings) -> int:
    """How many processes receive on the port: the setting, or by the host's cores (0)."""
    if dicom.receive_processes > 0:
        return dicom.receive_processes
    cpus = os.cpu_count() or 1
    return max(1, min(MAX_AUTO_RECEIVE_PROCESSES, cpus // CPUS_PER_AUTO_RECEIVE_PROCESS))


def associations_per_process(dicom: DicomSettings) -> int:
    """Each receiving process's share of [dicom] max_associations, rounded up."""
    return math.ceil(dicom.max_associations / receive_processes(dicom))


def listener_class(dicom: DicomSettings) -> type[NodeAssociationServer]:
    if receive_processes(dicom) > 1:
        return SharedPortAssociationServer
    return NodeAssociationServer


# Largest read given its whole buffer before any byte arrives. pynetdicom reads a PDU's length
# from its 6-byte header (PS3.8 9.3) and asks for that many bytes without checking it against
# our maximum PDU length: a peer could announce 4 GiB and send nothing. Longer reads take
# pynetdicom's own path, whose buffer grows only with what arrives. The node's default maximum
# PDU (262,144 bytes) and the sizes senders use stay well below this.
WHOLE_READ_MAX_BYTES = 4 * 1024 * 1024


def read_exactly(self: AssociationSocket, nr_bytes: int) -> bytearray:
    """AssociationSocket.recv without its 4 KB reads: one buffer, filled in place (installed
    on each connection's socket by dicom_node/scp.py).

    pynetdicom reads a PDU 4,096 bytes at a time, each read a new bytes object appended to a
    growing bytearray: for a 7 MB image ~1,800 reads and as many copies, measured at ~4.7 ms
    of the upper layer thread's CPU per image against ~1.1 ms here. Same contract: exactly
    ``nr_bytes``, or fewer when the peer closed the connection; timeouts and errors raise.
    """
    if nr_bytes > WHOLE_READ_MAX_BYTES:
        return AssociationSocket.recv(self, nr_bytes)
    sock = self.socket
    assert sock is not None
    buffer = bytearray(nr_bytes)
    read = 0
    with memoryview(buffer) as view:
        while read < nr_bytes:
            count = sock.recv_into(view[read:], nr_bytes - read)
            if not count:
                break
            read += count
    del buffer[read:]  # only when the connection closed early (the view is released)
    return buffer
