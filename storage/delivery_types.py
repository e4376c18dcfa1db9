"""The one vocabulary every sender speaks: a parcel in, a delivery outcome out.

    class MySender:                                   # bound to its destination's settings
        def send(self, parcels: Sequence[Parcel]) -> list[DeliveryOutcome]: ...

A sender gets the claimed outbox rows of one destination (``Parcel``: the row and its payload
file) and answers one ``DeliveryOutcome`` per parcel, in order. What the delivery worker then
does with the row:

    DELIVERED  the peer has it (DICOM Success/Warning, HL7 AA/CA, HTTP 2xx): row SENT
    RETRY      worth trying again later (no answer, busy, AE/CE, 5xx): backoff, or dead
               once the destination's retry policy gives up
    REJECTED   the peer will never take this object as it is: row DEAD at once

``reason`` goes to the row's last_error (it may quote the peer's own words); ``code`` is short
and PHI-free for logs ("0xA700", "AE", "HTTP 503", "ConnectionRefusedError").
``destination_down``: the peer could not be reached, so the rest of the batch is not tried and
shares this outcome. ``retry_after_s``: the peer asked for a pause (HTTP Retry-After).

This module sits on the ground floor (storage/ imports only core/) so that every stage that
sends — dicom_node/ (C-STORE), hl7_out/ (MLLP), delivery/ (file, HTTP) — uses the same types.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from storage.outbox import ClaimedItem

log = logging.getLogger(__name__)


class Verdict(StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"
    REJECTED = "rejected"


@dataclass(frozen=True)
class DeliveryOutcome:
    """One parcel's result (see the module docstring for each field)."""

    verdict: Verdict
    reason: str = ""
    code: str = ""
    destination_down: bool = False
    retry_after_s: float | None = None

    @classmethod
    def delivered(cls, reason: str = "", code: str = "") -> DeliveryOutcome:
        return cls(Verdict.DELIVERED, reason, code)

    @classmethod
    def rejected(cls, reason: str, code: str = "") -> DeliveryOutcome:
        return cls(Verdict.REJECTED, reason, code)

    @classmethod
    def retry(
        cls,
        reason: str,
        code: str = "",
        *,
        destination_down: bool = False,
        retry_after_s: float | None = None,
    ) -> DeliveryOutcome:
        return cls(Verdict.RETRY, reason, code, destination_down, retry_after_s)


@dataclass(frozen=True)
class Parcel:
    """A claimed outbox row and its payload file (absolute path)."""

    item: ClaimedItem
    path: Path


class Sender(Protocol):
    """Sends a batch of one destination's parcels; one outcome per parcel, in order.

    A sender is built bound to one destination's typed settings. It is called from that
    destination's lane thread only, but several senders of the same kind run at once.
    """

    def send(self, parcels: Sequence[Parcel]) -> list[DeliveryOutcome]: ...


def send_each(
    parcels: Sequence[Parcel], send_one: Callable[[Parcel], DeliveryOutcome]
) -> list[DeliveryOutcome]:
    """Send parcels one by one; once the destination is down, the rest share that outcome.

    A missing payload file is REJECTED (re-sending cannot make it appear); an exception from
    ``send_one`` — a sender bug — is RETRY, so the lane keeps serving.
    """
    outcomes: list[DeliveryOutcome] = []
    for parcel in parcels:
        if outcomes and outcomes[-1].destination_down:
            outcomes.append(outcomes[-1])
            continue
        outcomes.append(_guarded(send_one, parcel))
    return outcomes


def _guarded(send_one: Callable[[Parcel], DeliveryOutcome], parcel: Parcel) -> DeliveryOutcome:
    if not parcel.path.is_file():
        return DeliveryOutcome.rejected(
            f"payload file missing: {parcel.item.payload_path}", "payload-missing"
        )
    try:
        return send_one(parcel)
    except Exception as exc:  # a sender bug must not kill the lane; the row is retried
        log.exception("outbox row %d: sender failed unexpectedly", parcel.item.id)
        return DeliveryOutcome.retry(f"{type(exc).__name__}: {exc}", type(exc).__name__)
