"""This installation's random id: kept in the database and in ``<data>/installation-id``.

Two installations (or one whose database was reset) that report the same study must never give
their reports the same SR SOP Instance UID, HL7 MSH-10 or idempotency key: every identity the
node mints derives from this id plus what it derived from before (dicom_node.output_common,
hl7_out.oru.hl7_control_id, storage.outbox.idempotency_key). A rebuild of a report on the same
installation keeps its identities.

The id is created once, with the data directory. The database is the authority (the outbox and
reports live there): when the file disagrees, the database wins, it is logged, and the file is
rewritten.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.files import write_durably
from storage.models import Installation

log = logging.getLogger(__name__)

INSTALLATION_FILE = "installation-id"


def _read_file(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    try:
        return str(uuid.UUID(text))
    except ValueError:
        log.warning("ignoring malformed installation id file %s", path)
        return None


def ensure_installation_id(session: Session, data_dir: Path) -> str:
    """The installation id, created (database row + file) on first use."""
    path = data_dir / INSTALLATION_FILE
    in_file = _read_file(path)
    row = session.scalar(select(Installation).order_by(Installation.id).limit(1))
    if row is None:
        # A database rebuilt over an existing data directory keeps the directory's id.
        row = Installation(id=1, installation_id=in_file or str(uuid.uuid4()))
        session.add(row)
        session.flush()
        log.info("installation id %s created", row.installation_id)
    elif in_file is not None and in_file != row.installation_id:
        log.warning(
            "installation id in %s (%s) differs from the database's (%s): using the database's",
            path,
            in_file,
            row.installation_id,
        )
    if in_file != row.installation_id:
        data_dir.mkdir(parents=True, exist_ok=True)
        write_durably(path, f"{row.installation_id}\n".encode("ascii"))
    return row.installation_id
