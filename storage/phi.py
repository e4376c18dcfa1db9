"""Patient identifiers in logs: only as a short salted hash (README, "No PHI in logs")."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

SALT_FILE = ".phi_salt"


def load_or_create_salt(data_dir: Path, configured: str = "") -> bytes:
    """The configured salt, or a random one kept in the data directory across restarts."""
    if configured:
        return configured.encode()
    path = data_dir / SALT_FILE
    if path.exists():
        return path.read_bytes().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    salt = secrets.token_hex(16).encode()
    path.write_bytes(salt)
    path.chmod(0o600)
    return salt


def phi_hash(value: object, salt: bytes) -> str:
    """12 hex characters of HMAC-SHA256: stable per site, useless to look a patient up."""
    text = "" if value is None else str(value)
    return hmac.new(salt, text.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()[:12]
