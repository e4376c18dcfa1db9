"""Test certificates made with the real openssl: self-signed EC keys for 127.0.0.1/localhost."""

from __future__ import annotations

import subprocess
from pathlib import Path


def self_signed_certificate(directory: Path, name: str) -> tuple[Path, Path]:
    """``<name>.pem`` and ``<name>.key`` in ``directory``, valid for a day."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return cert, key
