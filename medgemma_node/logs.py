"""Logging for the node: one file under the data directory plus stderr.

Patient name, ID and birth date never reach a log record in clear: the code logs studies by UID
and patients only as storage.phi.phi_hash(). pynetdicom's own debug output dumps whole data sets,
so its loggers are held at WARNING whatever the node's level.
"""

from __future__ import annotations

import logging
import logging.handlers
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
NOISY_LIBRARIES = ("pynetdicom", "pydicom", "highdicom", "hl7apy", "transformers", "httpx")


def setup_logging(level: str, log_file: Path | None) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(level)
    stderr = logging.StreamHandler()
    stderr.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(stderr)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        rotating = logging.handlers.RotatingFileHandler(
            log_file, maxBytes=20 * 1024 * 1024, backupCount=5, encoding="utf-8"
        )
        rotating.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(rotating)
    for name in NOISY_LIBRARIES:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
