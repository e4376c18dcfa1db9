"""DCMTK's own tools as peers: storescu as a modality, storescp as the reference receiver.

Always by full path: pynetdicom's apps of the same names shadow DCMTK's in a virtualenv.
DCMTK reads TCP_NODELAY from the environment; Nagle stays off for every run.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from peers.net import echo_ok, free_port, wait_for


def dcmtk_storescu(
    port: int,
    files: Iterable[Path],
    *extra: str,
    aet: str = "STORESCU",
    aec: str = "MEDGEMMA",
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """DCMTK's storescu (not pynetdicom's script of the same name), Nagle off."""
    env = {**os.environ, "TCP_NODELAY": "1"}
    return subprocess.run(
        [
            "/usr/bin/storescu",
            "-aet",
            aet,
            "-aec",
            aec,
            *extra,
            "127.0.0.1",
            str(port),
            *map(str, files),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@contextmanager
def dcmtk_storescp(output_dir: Path, aet: str = "MEDGEMMA") -> Iterator[int]:
    """DCMTK's storescp writing every data set exactly as received (+B); yields its port.

    The reference for "what was sent": DCMTK's storescu re-encodes on the wire (e.g. sequences
    get explicit lengths), so the bytes a receiver must keep are those storescp writes.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = ["/usr/bin/storescp", "+B", "+xa", "-aet", aet, "-od", str(output_dir), str(port)]
    proc = subprocess.Popen(
        command,
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _answers(port), 10, message="DCMTK storescp did not start")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def _answers(port: int) -> bool:
    try:
        return echo_ok(port)
    except OSError:
        return False
