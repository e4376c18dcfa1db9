"""The DICOM destination's sender: a report's objects to a PACS by C-STORE.

    sender = DicomSender(destination, calling_aet="MEDGEMMA")
    outcomes = sender.send(parcels)                    # storage.delivery_types

The rows of one destination that are due together go over one association
(dicom_node.scu.store_batch, PS3.4 B.2.3 / PS3.7 §9.1.1), each file as it is on disk; every
C-STORE response status becomes that row's outcome (scu.judge_store_status).
"""

from __future__ import annotations

from collections.abc import Sequence

from config.settings import DicomDestination
from dicom_node.scu import store_batch
from storage.delivery_types import DeliveryOutcome, Parcel


class DicomSender:
    """The delivery Sender of one DICOM destination (C-STORE SCU)."""

    def __init__(
        self, destination: DicomDestination, calling_aet: str, timeout_s: float = 30.0
    ) -> None:
        self.destination = destination
        self.calling_aet = calling_aet
        self.timeout_s = timeout_s

    def send(self, parcels: Sequence[Parcel]) -> list[DeliveryOutcome]:
        return store_batch(
            [parcel.path for parcel in parcels],
            self.destination,
            self.calling_aet,
            timeout_s=self.timeout_s,
        )
