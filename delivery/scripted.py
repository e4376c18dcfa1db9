"""A scripted Sender for tests: the double of every real sender (storage.delivery_types).

    sender = ScriptedSender([DeliveryOutcome.retry("busy")])
    registry.register(HttpDestination, lambda destination: sender)

The lane records its answers as it would a real peer's (tests/test_delivery.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from storage.delivery_types import DeliveryOutcome, Parcel


@dataclass
class ScriptedSender:
    """Records each parcel's message_id and answers the next scripted outcome per parcel
    (DELIVERED once the script is used up); nothing leaves the process."""

    outcomes: list[DeliveryOutcome] = field(default_factory=list)
    sent: list[str] = field(default_factory=list)  # message_id of each parcel, in order

    def send(self, parcels: Sequence[Parcel]) -> list[DeliveryOutcome]:
        answers = []
        for parcel in parcels:
            self.sent.append(parcel.item.message_id)
            answers.append(self.outcomes.pop(0) if self.outcomes else DeliveryOutcome.delivered())
        return answers
