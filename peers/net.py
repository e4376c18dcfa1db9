"""Loopback plumbing shared by the peers: free ports, bounded polling, a C-ECHO probe."""

from __future__ import annotations

import socket
import time
from typing import Any

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
