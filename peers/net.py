"""Loopback plumbing shared by the peers: free ports, bounded polling, a C-ECHO probe."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

_handed_out: set[int] = set()
_handed_out_lock = threading.Lock()


def free_port() -> int:
    """A free loopback port that this process was never handed before: the kernel may give
    the same port to two binds made one after the other once the first socket is closed, and
    a peer given two "free" ports (Orthanc's DICOM and HTTP ports) then cannot start."""
    for _ in range(1000):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        with _handed_out_lock:
            if port not in _handed_out:
                _handed_out.add(port)
                return port
    raise RuntimeError("no free loopback port left that was not handed out before")


def wait_for(predicate: Any, timeout: float, interval: float = 0.2, message: str = "") -> Any:
    """Poll until predicate() is truthy; bounded, raises with a message otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(message or f"condition not met in {timeout} s")


def echo_ok(port: int, called_aet: str = "MEDGEMMA", calling_aet: str = "PROBE") -> bool:
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(Verification)
    ae.acse_timeout = 2
    ae.network_timeout = 2
    assoc = ae.associate("127.0.0.1", port, ae_title=called_aet)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0
