"""Report ids handed out before the report's row is written.

A report's id names its directory and goes into the UIDs, HL7 control ids and idempotency keys
derived from it (medgemma_node/outputs.py). The inference worker builds those files before the
transaction that stores the report (inference/report_store.py), so that transaction holds the
database's write lock (SQLite has one for the whole file) for a few inserts, not for the SR and
GSPS build and their fsyncs, which every C-STORE commit, job claim and completion would queue
behind.

    ids = reserve_report_ids(db, 64)         # a batch's ids, in a short transaction of their own
    report.id = ids[0]                       # ...and the row is written later with that id

Every report row takes its id from the one counter (``id_counters``): a Report added without an
id gets the next one in its own transaction (the before-insert hook in storage/models.py), so
an id is never handed out twice. An id whose report is never stored (its lease was lost, the
process died) is skipped. The counter never hands out an id at or below the newest report's.

A process that dies between writing a report's files and committing its row leaves a directory
no row names; ``remove_unstored_report_dirs`` (start-up recovery) removes those older than the
job lease, when no worker can commit them any more.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from sqlalchemy import Connection, case, func, insert, select, update

from storage.db import Database
from storage.models import IdCounter, Report

REPORTS = "reports"

log = logging.getLogger(__name__)


def take_report_ids(connection: Connection, count: int) -> range:
    """``count`` new report ids, in the caller's transaction."""
    after_newest = select(func.coalesce(func.max(Report.id), 0) + 1)
    newest = after_newest.scalar_subquery()
    floor = case((IdCounter.next_id >= newest, IdCounter.next_id), else_=newest)
    top = connection.execute(
        update(IdCounter)
        .where(IdCounter.name == REPORTS)
        .values(next_id=floor + count)
        .returning(IdCounter.next_id)
    ).scalar_one_or_none()
    if top is None:  # a schema made without the migration that seeds the counter
        first = int(connection.execute(after_newest).scalar_one())
        connection.execute(insert(IdCounter).values(name=REPORTS, next_id=first + count))
        return range(first, first + count)
    return range(top - count, top)


def reserve_report_ids(db: Database, count: int) -> range:
    """``count`` new report ids, committed at once (the write lock is held for one update)."""
    with db.begin() as connection:
        return take_report_ids(connection, count)


def remove_unstored_report_dirs(db: Database, data_dir: Path, older_than_s: float) -> int:
    """Remove directories under <data>/reports/ that no report row names and that were last
    written more than ``older_than_s`` ago (the job lease: a worker whose lease has expired
    cannot commit the report any more). Returns how many were removed."""
    reports_dir = data_dir / "reports"
    if not reports_dir.is_dir():
        return 0
    candidates = {
        int(path.name): path
        for path in reports_dir.iterdir()
        if path.is_dir() and path.name.isdigit()
    }
    if not candidates:
        return 0
    with db.connect() as connection:
        stored = set(connection.scalars(select(Report.id)))
    cutoff = time.time() - older_than_s
    removed = 0
    for report_id, path in sorted(candidates.items()):
        if report_id not in stored and path.stat().st_mtime < cutoff:
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    if removed:
        log.warning("removed %d report directories whose report was never stored", removed)
    return removed
