"""Logging for the node: one file under the data directory plus stderr.

Patient name, ID and birth date never reach a log record in clear: the code logs studies by UID
and patients only as storage.phi.phi_hash(). pynetdicom's own debug output dumps whole data sets,
so its loggers are held at WARNING whatever the node's level.

Library records (pydicom, hl7apy, ... and Python warnings, which ``logging.captureWarnings``
routes here instead of bare stderr) can quote the values they complain about: pydicom's
``Invalid value for VR DA: '1931-02-17'``. Every handler scrubs their text, and the exception
lines of any traceback, with core.redaction before it is written.

One process rotates the file: `serve` (or a command run on its own). The processes `serve`
starts (receivers, the worker) find the owner's pid in ``LOG_OWNER_ENV``, and the worker's
render and store processes are set up not to rotate (``rotate=False``). They all append to
the same file without rotating it, reopening it when the owner has rotated it
(``WatchedFileHandler``): several processes rotating one file each on their own lose lines.
The owner checks the size when it logs itself, so the file can pass its limit by what the
others wrote meanwhile.

An exception that ends a thread (the node's or a library's) goes to this log too, not as a bare
traceback on stderr (``threading.excepthook``); its message is left out because library messages
can quote data set values.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import threading
import traceback
from pathlib import Path
from types import TracebackType

from pynetdicom.fsm import InvalidEventError

from core.redaction import scrub_traceback, scrub_values

# The pid tells the serving process from its inference worker child (both write this file).
FORMAT = "%(asctime)s [%(process)d] %(levelname)-7s %(name)s: %(message)s"
NOISY_LIBRARIES = ("pynetdicom", "pydicom", "highdicom", "hl7apy", "transformers", "httpx")
# Loggers whose messages may quote data set or message values: the DICOM and HL7 libraries and
# captured Python warnings (pydicom warns and logs each invalid value).
LIBRARY_LOGGERS = ("pydicom", "pynetdicom", "highdicom", "hl7apy", "py.warnings")

# Set by `serve` for the processes it starts: the pid of the process that rotates the log file.
LOG_OWNER_ENV = "MEDGEMMA_NODE_LOG_OWNER"
LOG_MAX_BYTES = 20 * 1024 * 1024
LOG_BACKUPS = 5

log = logging.getLogger("medgemma_node.threads")
ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]


def setup_logging(level: str, log_file: Path | None, *, rotate: bool | None = None) -> None:
    """Log to stderr and ``log_file``. ``rotate``: whether this process rotates the file;
    None decides by ``LOG_OWNER_ENV`` (set by `serve` for the processes it starts); False for
    processes a command starts itself (the worker's render and store processes)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(level)
    stderr = logging.StreamHandler()
    stderr.setFormatter(ScrubbingFormatter(FORMAT))
    stderr.addFilter(LibraryTextFilter())
    root.addHandler(stderr)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        to_file = _file_handler(log_file, rotate)
        to_file.setFormatter(ScrubbingFormatter(FORMAT))
        to_file.addFilter(LibraryTextFilter())
        root.addHandler(to_file)
    logging.captureWarnings(True)
    for name in NOISY_LIBRARIES:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    fsm_logger = logging.getLogger("pynetdicom.fsm")
    if not any(isinstance(f, _InvalidEventRecord) for f in fsm_logger.filters):
        fsm_logger.addFilter(_InvalidEventRecord())
    threading.excepthook = log_uncaught_thread_exception


def _file_handler(log_file: Path, rotate: bool | None) -> logging.Handler:
    """Rotating in the process that owns the file; appending (and following the owner's
    rotations) in the processes it started."""
    if rotate is None:
        owner = os.environ.get(LOG_OWNER_ENV)
        rotate = not owner or owner == str(os.getpid())
    if not rotate:
        return logging.handlers.WatchedFileHandler(log_file, encoding="utf-8")
    return logging.handlers.RotatingFileHandler(
        log_file, maxBytes=LOG_MAX_BYTES, backupCount=LOG_BACKUPS, encoding="utf-8"
    )


def child_log_env() -> dict[str, str]:
    """The environment of a process this one starts: it logs to this process's file without
    rotating it (this process, or the owner above it, rotates)."""
    return {**os.environ, LOG_OWNER_ENV: os.environ.get(LOG_OWNER_ENV) or str(os.getpid())}


def log_uncaught_thread_exception(args: threading.ExceptHookArgs) -> None:
    """``threading.excepthook``: one record in the node's log for an exception that ended a
    thread. pynetdicom's state machine error (a peer broke the DICOM upper layer protocol in a
    way pynetdicom does not handle) is one line; anything else is a bug and keeps its frames."""
    if args.exc_type is SystemExit:
        return
    thread = args.thread.name if args.thread is not None else "(unknown thread)"
    if issubclass(args.exc_type, InvalidEventError):
        # The message names only the PS3.8 event and state, e.g. 'Evt7' in 'Sta13'.
        log.warning("DICOM connection %s dropped: %s", thread, args.exc_value)
        return
    frames = "".join(traceback.format_tb(args.exc_traceback)).rstrip()
    log.error("uncaught %s ended thread %s:\n%s", args.exc_type.__name__, thread, frames)


class LibraryTextFilter(logging.Filter):
    """On a handler: a library record's message with its quoted values withheld. (A filter on
    a library's logger would miss records of its child loggers; a handler sees them all.)"""

    def filter(self, record: logging.LogRecord) -> bool:
        if any(
            record.name == name or record.name.startswith(f"{name}.") for name in LIBRARY_LOGGERS
        ):
            record.msg = scrub_values(record.getMessage())
            record.args = None
        return True


class ScrubbingFormatter(logging.Formatter):
    """Tracebacks with their exception lines scrubbed; the frames stay."""

    def formatException(self, ei: ExcInfo) -> str:
        return scrub_traceback(super().formatException(ei))


class _InvalidEventRecord(logging.Filter):
    """pynetdicom logs its state machine error and then raises it; the exception hook above
    logs it once, with the connection's name."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Invalid event")
