"""A sender that first makes sure each parcel's files exist, then hands the batch on.

    sender = PreparingSender(DicomSender(destination, "MEDGEMMA"), prepare)

Some outputs are built on the delivery side the first time a destination needs them (the PDF report
and its Encapsulated PDF, off the inference worker's critical path: docs/architecture.md, "PDF
reports"). The outbox row and its payload path were written with the report; ``prepare(parcel)``
builds the parcel's files when they are missing — durably, and the same bytes every time, so a retry
re-sends the same object — and returns nothing. A parcel whose preparation fails gets its own
outcome and is not handed on: REJECTED when an input is gone for good (``PayloadInputMissing``: the
report row or a source image no longer exists), RETRY otherwise. The others go to the wrapped sender
as one batch, and each outcome comes back in the parcel's place.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from core.errors import DeliveryError
from storage.delivery_types import DeliveryOutcome, Parcel, Sender

log = logging.getLogger(__name__)


class PayloadInputMissing(DeliveryError):
    """What a payload is built from is gone (report row, source image): retrying cannot help."""


class PreparingSender:
    """The wrapped Sender, with each parcel's files built first when they are missing."""

    def __init__(self, inner: Sender, prepare: Callable[[Parcel], None]) -> None:
        self.inner = inner
        self.prepare = prepare

    def send(self, parcels: Sequence[Parcel]) -> list[DeliveryOutcome]:
        outcomes: dict[int, DeliveryOutcome] = {}
        ready: list[tuple[int, Parcel]] = []
        for index, parcel in enumerate(parcels):
            failure = self._prepared(parcel)
            if failure is None:
                ready.append((index, parcel))
            else:
                outcomes[index] = failure
        if ready:
            sent = self.inner.send([parcel for _, parcel in ready])
            if len(sent) != len(ready):
                raise DeliveryError(
                    f"{type(self.inner).__name__} answered {len(sent)} outcomes "
                    f"for {len(ready)} parcels"
                )
            outcomes.update(
                (index, outcome) for (index, _), outcome in zip(ready, sent, strict=True)
            )
        return [outcomes[index] for index in range(len(parcels))]

    def _prepared(self, parcel: Parcel) -> DeliveryOutcome | None:
        try:
            self.prepare(parcel)
        except PayloadInputMissing as exc:
            return DeliveryOutcome.rejected(str(exc), "input-missing")
        except Exception as exc:  # a build that failed now may work later (memory, fonts)
            log.warning("outbox row %d: payload not built (%s)", parcel.item.id, type(exc).__name__)
            return DeliveryOutcome.retry(f"payload not built: {exc}"[:500], type(exc).__name__)
        return None
