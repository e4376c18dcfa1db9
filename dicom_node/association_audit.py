"""The audit trail of DICOM associations: one ``dicom.association`` row per association.

An accepted association is recorded when its connection closes (released or aborted), with the
calling AE title, the peer's address and how many C-STOREs it made that were answered Success
or a failure status; a rejected one at once, with the reason (PS3.8 9.3.4). A failure to write
the row is logged and never disturbs the association.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import Counter
from typing import Any

from pynetdicom import Association, evt

from dicom_node.statuses import describe_rejection
from storage import audit
from storage.db import Database

log = logging.getLogger(__name__)

KIND = "dicom.association"


class AssociationAudit:
    """pynetdicom event handlers that count each association's C-STOREs and audit it."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._lock = threading.Lock()
        self._counts: weakref.WeakKeyDictionary[Association, Counter[str]] = (
            weakref.WeakKeyDictionary()
        )
        self._aborted: weakref.WeakSet[Association] = weakref.WeakSet()

    def handlers(self) -> list[tuple[Any, Any]]:
        return [
            (evt.EVT_ACCEPTED, self._accepted),
            (evt.EVT_REJECTED, self._rejected),
            (evt.EVT_ABORTED, self._note_aborted),
            (evt.EVT_CONN_CLOSE, self._closed),
        ]

    def count(self, assoc: Association, outcome: str) -> None:
        """Count one DIMSE request of an accepted association ("stored", "failed", ...)."""
        with self._lock:
            counts = self._counts.get(assoc)
            if counts is not None:
                counts[outcome] += 1

    def _accepted(self, event: evt.Event) -> None:
        with self._lock:
            self._counts[event.assoc] = Counter()

    def _note_aborted(self, event: evt.Event) -> None:
        self._aborted.add(event.assoc)

    def _rejected(self, event: evt.Event) -> None:
        rejection = event.assoc.acceptor.primitive
        reason = (
            describe_rejection(rejection.result, rejection.result_source, rejection.diagnostic)
            if rejection is not None
            else "no reason recorded"
        )
        called = str(getattr(event.assoc.requestor.primitive, "called_ae_title", "")).strip()
        self._write(event.assoc, audit.REJECTED, reason=reason, called_ae=called)

    def _closed(self, event: evt.Event) -> None:
        with self._lock:
            counts = self._counts.pop(event.assoc, None)
        if counts is None:
            return  # never accepted: rejected (recorded) or no association request at all
        aborted = event.assoc in self._aborted
        self._write(
            event.assoc,
            audit.FAILURE if aborted else audit.SUCCESS,
            ended="aborted" if aborted else "released",
            **{key: counts.get(key, 0) for key in ("stored", "failed", "mpps")},
        )

    def _write(self, assoc: Association, outcome: str, **detail: Any) -> None:
        requestor = assoc.requestor
        try:
            audit.record(
                self.db,
                KIND,
                actor=str(requestor.ae_title).strip(),
                address=f"{requestor.address}:{requestor.port}",
                outcome=outcome,
                **detail,
            )
        except Exception as exc:
            log.error("association audit row not written (%s)", type(exc).__name__)
