"""The Modality Performed Procedure Step SCP (PS3.4 F.7): N-CREATE and N-SET on the node's AE.

Modalities announce the end of an acquisition with an N-SET to COMPLETED (or DISCONTINUED)
listing the instances they made (Performed Series Sequence > Referenced Image Sequence). The
node keeps each step (storage/mpps.py); the completion scheduler then treats a study whose
steps are COMPLETED and whose listed instances have all arrived as complete at once, and does
not process a study whose steps were all DISCONTINUED. Without MPPS the quiet period applies.

Statuses (PS3.4 F.7.2.1.2, F.7.2.2.2; PS3.7 C.4): 0x0111 duplicate step, 0x0112 no such step,
0x0110 a step that is already COMPLETED or DISCONTINUED, 0x0106 a status value not allowed,
0x0120 the step's UID missing, 0x0110 also for an attribute list that does not parse.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from pydicom import Dataset
from pynetdicom import evt

from dicom_node.association_audit import AssociationAudit
from storage.db import Database, DatabaseUnavailable
from storage.mpps import (
    COMPLETED,
    PROCESSING_FAILURE,
    StepConflict,
    StepData,
    create_step,
    set_step,
    studies_awaiting_images,
)

log = logging.getLogger(__name__)

MPPS_SOP_CLASS = "1.2.840.10008.3.1.2.3.3"  # Modality Performed Procedure Step SOP Class
MISSING_ATTRIBUTE = 0x0120
OUT_OF_RESOURCES = 0xA700  # PS3.7 C.4: failures of the node's own resources


def step_data(dataset: Dataset) -> StepData:
    """The status, study and listed instances of an attribute or modification list."""
    status = dataset.get("PerformedProcedureStepStatus")
    study = None
    for item in dataset.get("ScheduledStepAttributesSequence") or []:
        study = str(item.get("StudyInstanceUID", "") or "").strip() or study
        if study:
            break
    listed = None
    if "PerformedSeriesSequence" in dataset:
        listed = []
        for series in dataset.PerformedSeriesSequence or []:
            for keyword in ("ReferencedImageSequence",
                            "ReferencedNonImageCompositeSOPInstanceSequence"):  # fmt: skip
                for item in series.get(keyword) or []:
                    uid = str(item.get("ReferencedSOPInstanceUID", "") or "").strip()
                    if uid:
                        listed.append(uid)
    return StepData(
        status=str(status).strip().upper() if status is not None else None,
        study_instance_uid=study,
        sop_instance_uids=listed,
    )


class MppsService:
    """pynetdicom handlers for N-CREATE / N-SET; ``on_completed`` wakes the scheduler."""

    def __init__(
        self,
        db: Database,
        association_audit: AssociationAudit | None = None,
        on_completed: Callable[[], None] | None = None,
    ) -> None:
        self.db = db
        self.association_audit = association_audit
        self.on_completed = on_completed
        self._lock = threading.Lock()
        # Studies with a COMPLETED step whose instances may still be arriving: each of their
        # instances wakes the scheduler (``instance_stored``) instead of waiting a poll.
        self.awaiting: set[str] = set()

    def load(self) -> None:
        with self._lock:
            self.awaiting = studies_awaiting_images(self.db)

    def handlers(self) -> list[tuple[Any, Any]]:
        return [(evt.EVT_N_CREATE, self._n_create), (evt.EVT_N_SET, self._n_set)]

    def instance_stored(self, study_uid: str) -> None:
        if study_uid in self.awaiting and self.on_completed is not None:
            self.on_completed()

    def _n_create(self, event: evt.Event) -> tuple[int | Dataset, Dataset | None]:
        request: Any = event.request
        uid = str(request.AffectedSOPInstanceUID or "").strip()
        return self._apply(event, uid, event.attribute_list, create_step, "N-CREATE")

    def _n_set(self, event: evt.Event) -> tuple[int | Dataset, Dataset | None]:
        request: Any = event.request
        uid = str(request.RequestedSOPInstanceUID or "").strip()
        return self._apply(event, uid, event.modification_list, set_step, "N-SET")

    def _apply(
        self, event: evt.Event, uid: str, read: Any, action: Any, name: str
    ) -> tuple[int | Dataset, Dataset | None]:
        calling = str(event.assoc.requestor.ae_title).strip()
        if self.association_audit is not None:
            self.association_audit.count(event.assoc, "mpps")
        if not uid:
            return _failure(MISSING_ATTRIBUTE, "no SOP Instance UID"), None
        try:
            dataset = read if isinstance(read, Dataset) else Dataset()
            data = step_data(dataset)
        except Exception as exc:
            log.warning("MPPS %s from %s does not parse (%s)", name, calling, type(exc).__name__)
            return _failure(PROCESSING_FAILURE, "attribute list does not parse"), None
        try:
            status = action(self.db, uid, data, calling)
        except StepConflict as conflict:
            log.warning("MPPS %s %s from %s refused: %s", name, uid, calling, conflict)
            return _failure(conflict.status, str(conflict)), None
        except (OSError, DatabaseUnavailable) as exc:
            log.error("MPPS %s failed, database unavailable: %s", name, type(exc).__name__)
            return _failure(OUT_OF_RESOURCES, "database unavailable"), None
        log.info("MPPS %s %s from %s: %s", name, uid, calling, status or data.status)
        if status == COMPLETED and data.study_instance_uid is not None:
            self.awaiting.add(data.study_instance_uid)
        elif status == COMPLETED:
            self.load()  # the N-SET did not repeat the study: read it back
        if status == COMPLETED and self.on_completed is not None:
            self.on_completed()
        return 0x0000, dataset


def _failure(status: int, reason: str) -> Dataset:
    response = Dataset()
    response.Status = status
    response.ErrorComment = reason[:64]
    return response
