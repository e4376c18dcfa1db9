"""The HL7 destination's sender: each outbox row's ORU^R01 file over MLLP.

    sender = HL7OruSender(destination)                 # MLLPClient(destination) by default
    outcomes = sender.send(parcels)                    # storage.delivery_types

The payload is the ER7 text written with the report (UTF-8, segments ended by CR, HL7 v2.5
§2.5.1), sent as it is. Before sending, its MSH-10 (§2.15.9.10) must be the row's message_id:
a payload that is not the message the row was written for is REJECTED, never sent. The ACK is
judged by hl7_out.mllp (original acknowledgment mode, §2.9.2); once the receiver cannot be
reached, the rest of the batch waits for the next attempt.
"""

from __future__ import annotations

from collections.abc import Sequence

from config.settings import HL7Destination
from hl7_out.mllp import MLLPClient, MLLPTransport, message_control_id
from storage.delivery_types import DeliveryOutcome, Parcel, send_each


class HL7OruSender:
    """The delivery Sender of one HL7 destination (Appendix C.4 MLLP)."""

    def __init__(self, destination: HL7Destination, transport: MLLPTransport | None = None):
        self.destination = destination
        self.transport: MLLPTransport = transport or MLLPClient(destination)

    def send(self, parcels: Sequence[Parcel]) -> list[DeliveryOutcome]:
        return send_each(parcels, self._send_one)

    def _send_one(self, parcel: Parcel) -> DeliveryOutcome:
        with parcel.path.open(encoding="utf-8", newline="") as handle:  # keep the CRs
            message = handle.read()
        try:
            control_id = message_control_id(message)
        except ValueError as exc:
            return DeliveryOutcome.rejected(f"payload is not an HL7 message: {exc}", "no-MSH-10")
        if control_id != parcel.item.message_id:
            reason = f"payload MSH-10 {control_id!r} is not the row's message_id"
            return DeliveryOutcome.rejected(reason, "MSH-10-mismatch")
        return self.transport.send(message)
