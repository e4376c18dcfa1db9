"""A scripted MLLP transport for tests: the double of hl7_out.mllp.MLLPClient.

    transport = ScriptedMLLP(destination, [DeliveryOutcome.retry("busy")])
    HL7OruSender(destination, transport)       # answers RETRY once, then DELIVERED

Used where a test needs the sender's own checks without a listener (tests/test_mllp.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from config.settings import HL7Destination
from storage.delivery_types import DeliveryOutcome


@dataclass
class ScriptedMLLP:
    """Records each message and answers with the next scripted outcome (DELIVERED, code AA,
    once the script is used up); nothing goes over the network."""

    destination: HL7Destination
    outcomes: list[DeliveryOutcome] = field(default_factory=list)
    sent: list[tuple[str, str]] = field(default_factory=list)  # (destination name, message)

    def send(self, message: str) -> DeliveryOutcome:
        self.sent.append((self.destination.name, message))
        if self.outcomes:
            return self.outcomes.pop(0)
        return DeliveryOutcome.delivered("scripted", "AA")
