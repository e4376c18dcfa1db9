"""The sender registry: which Sender serves a destination of each kind.

    registry = SenderRegistry()
    registry.register(FileDestination, lambda destination: FileSender(destination, db, data))
    sender = registry.build(destination)        # bound to that destination's typed settings

The senders and what they answer share one vocabulary (storage.delivery_types: Parcel,
DeliveryOutcome, Sender). Each lives beside the protocol it speaks:

    dicom  dicom_node.sender.DicomSender   C-STORE over one association per batch
    hl7    hl7_out.sender.HL7OruSender     the ORU^R01 over MLLP, ACK judged
    file   delivery.file_sender.FileSender  the report's files into a directory
    http   delivery.http_sender.HttpSender  the JSON POSTed with an Idempotency-Key

A stage imports no other stage, so the process wiring fills the registry
(medgemma_node.service.sender_registry); a new destination kind is a settings class in
config/settings.py, a sender, and one line there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from config.settings import DestinationBase
from core.errors import DeliveryError
from storage.delivery_types import Sender

DestinationT = TypeVar("DestinationT", bound=DestinationBase)


class SenderRegistry:
    """Sender factories by destination settings class."""

    def __init__(self) -> None:
        self._factories: dict[type[DestinationBase], Callable[[Any], Sender]] = {}

    def register(
        self, destination_type: type[DestinationT], factory: Callable[[DestinationT], Sender]
    ) -> SenderRegistry:
        self._factories[destination_type] = factory
        return self

    def build(self, destination: DestinationBase) -> Sender:
        """The sender bound to ``destination``; DeliveryError when its kind has none."""
        factory = self._factories.get(type(destination))
        if factory is None:
            kind = getattr(destination, "kind", type(destination).__name__)
            raise DeliveryError(f"no sender is registered for destinations of kind {kind!r}")
        return factory(destination)
