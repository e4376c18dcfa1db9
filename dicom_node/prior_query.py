"""Query/Retrieve SCU for priors (PS3.4 Annex C): Study Root C-FIND, C-GET and C-MOVE.

    find_prior_candidates   C-FIND STUDY level: Patient ID (+ Issuer of Patient ID), Modalities
                            in Study, Study Date range before the current study (C.6.2.1)
    series_body_parts       C-FIND SERIES level of one study: Body Part Examined per series
                            (a series attribute, so it cannot be matched at STUDY level)
    retrieve_by_get         C-GET: the images come back on the same association as C-STORE
                            sub-operations (SCP role negotiated, PS3.7 D.3.3.4)
    retrieve_by_move        C-MOVE to a destination AE the PACS knows (e.g. this node's SCP)

Every association runs under the timeouts of ``[priors]``; ``AssociationTracker`` keeps the
open association so a caller past its deadline can abort it from another thread. Identifiers
from the PACS are checked again by the caller: matching on the PACS may be lenient (case,
wildcards), a prior of another patient must never be used.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pydicom import Dataset
from pynetdicom import AE, Association, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from config.settings import PriorsSettings
from config.tls import client_ssl_context
from core.errors import DicomError
from dicom_node.scu import AssociationFailed, associate

# PS3.4 C.4.1.1.4 / C.4.2.1.5 / C.4.3.1.4: Pending statuses of C-FIND/C-GET/C-MOVE.
PENDING = frozenset({0xFF00, 0xFF01})
SUCCESS = 0x0000
WARNING_SUBOPERATIONS_FAILED = 0xB000
MAX_CANDIDATES = 200  # a patient with more studies than this: the newest returned suffice


class PriorQueryFailed(DicomError):
    """The PACS could not be asked, or answered with a failure status; says which."""


@dataclass(frozen=True)
class StudyCandidate:
    study_instance_uid: str
    study_date: str
    patient_id: str
    issuer_of_patient_id: str
    modalities: tuple[str, ...]


class AssociationTracker:
    """The association a prior search has open, for ``abort_all`` from another thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: list[Association] = []
        self.cancelled = False

    def add(self, assoc: Association) -> None:
        with self._lock:
            self._open.append(assoc)
            cancelled = self.cancelled
        if cancelled:
            assoc.abort()

    def remove(self, assoc: Association) -> None:
        with self._lock:
            if assoc in self._open:
                self._open.remove(assoc)

    def abort_all(self) -> None:
        with self._lock:
            self.cancelled = True
            open_now = list(self._open)
        for assoc in open_now:
            assoc.abort()


def _ae(settings: PriorsSettings, calling_aet: str) -> AE:
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = settings.connect_timeout_s
    ae.connection_timeout = settings.connect_timeout_s
    ae.dimse_timeout = settings.query_timeout_s
    ae.network_timeout = settings.query_timeout_s
    return ae


@contextmanager
def _association(
    ae: AE,
    settings: PriorsSettings,
    tracker: AssociationTracker,
    ext_neg: list[object] | None = None,
    handlers: list[evt.EventHandlerType] | None = None,
) -> Iterator[Association]:
    if tracker.cancelled:
        raise PriorQueryFailed("the prior search was given up (time limit)")
    try:
        assoc = associate(
            ae,
            settings.host,
            settings.port,
            settings.ae_title,
            client_ssl_context(settings.tls),
            ext_neg=ext_neg,
            evt_handlers=handlers,
        )
    except (AssociationFailed, OSError, RuntimeError, ValueError) as exc:
        raise PriorQueryFailed(f"PACS {settings.ae_title}: {exc}") from exc
    tracker.add(assoc)
    try:
        yield assoc
    finally:
        tracker.remove(assoc)
        if assoc.is_established:
            assoc.release()


def _status(response: Dataset | None, what: str) -> int:
    if response is None or "Status" not in response:
        raise PriorQueryFailed(f"{what}: no response from the PACS (timeout or abort)")
    return int(response.Status)


def study_query(patient_id: str, issuer: str, modality: str, date_range: str) -> Dataset:
    """The STUDY level identifier (PS3.4 C.6.2.1.2): keys to match and keys to return."""
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.PatientID = patient_id  # single value matching: no wildcards (checked by caller)
    if issuer:
        query.IssuerOfPatientID = issuer
    query.ModalitiesInStudy = modality
    query.StudyDate = date_range
    query.StudyInstanceUID = ""
    query.StudyTime = ""
    return query


def find_prior_candidates(
    settings: PriorsSettings,
    calling_aet: str,
    query: Dataset,
    tracker: AssociationTracker,
) -> list[StudyCandidate]:
    """C-FIND the studies matching ``query``; every identifier the PACS returned."""
    ae = _ae(settings, calling_aet)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    found: list[StudyCandidate] = []
    with _association(ae, settings, tracker) as assoc:
        for response, identifier in assoc.send_c_find(
            query, StudyRootQueryRetrieveInformationModelFind
        ):
            status = _status(response, "C-FIND")
            if status in PENDING and identifier is not None:
                if len(found) < MAX_CANDIDATES:
                    found.append(_candidate(identifier))
            elif status != SUCCESS:
                raise PriorQueryFailed(f"C-FIND failed with status 0x{status:04X}")
    return found


def _text(identifier: Dataset, keyword: str) -> str:
    return str(identifier.get(keyword, "") or "").strip()


def _candidate(identifier: Dataset) -> StudyCandidate:
    modalities = identifier.get("ModalitiesInStudy", "") or ""
    if isinstance(modalities, str):
        modalities = [modalities]
    return StudyCandidate(
        study_instance_uid=_text(identifier, "StudyInstanceUID"),
        study_date=_text(identifier, "StudyDate"),
        patient_id=str(identifier.get("PatientID", "") or ""),
        issuer_of_patient_id=_text(identifier, "IssuerOfPatientID"),
        modalities=tuple(str(m).strip().upper() for m in modalities if str(m).strip()),
    )


def series_body_parts(
    settings: PriorsSettings,
    calling_aet: str,
    study_uid: str,
    tracker: AssociationTracker,
) -> list[tuple[str, str]]:
    """(Modality, Body Part Examined) of each series of ``study_uid`` (C-FIND SERIES level)."""
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = ""
    query.Modality = ""
    query.BodyPartExamined = ""
    ae = _ae(settings, calling_aet)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    series: list[tuple[str, str]] = []
    with _association(ae, settings, tracker) as assoc:
        for response, identifier in assoc.send_c_find(
            query, StudyRootQueryRetrieveInformationModelFind
        ):
            status = _status(response, "C-FIND (series)")
            if status in PENDING and identifier is not None:
                series.append(
                    (
                        _text(identifier, "Modality").upper(),
                        _text(identifier, "BodyPartExamined").upper(),
                    )
                )
            elif status != SUCCESS:
                raise PriorQueryFailed(f"C-FIND (series) failed with status 0x{status:04X}")
    return series


def _study_identifier(study_uid: str) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_uid
    return identifier


def _check_retrieve_status(status: int, what: str) -> None:
    """Success, or a warning with some sub-operations done (the caller checks what came)."""
    if status not in (SUCCESS, WARNING_SUBOPERATIONS_FAILED) and status not in PENDING:
        raise PriorQueryFailed(f"{what} failed with status 0x{status:04X}")


StoreHandler = Callable[[evt.Event], int | Dataset]


def retrieve_by_get(
    settings: PriorsSettings,
    calling_aet: str,
    study_uid: str,
    storage_classes: list[str],
    transfer_syntaxes: list[str],
    on_store: StoreHandler,
    tracker: AssociationTracker,
) -> None:
    """C-GET ``study_uid``; each image arrives through ``on_store`` (a C-STORE handler)."""
    ae = _ae(settings, calling_aet)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    # One context per storage class with every syntax we decode; SCP role for C-STORE.
    for sop_class in storage_classes:
        ae.add_requested_context(sop_class, transfer_syntaxes)
    roles: list[object] = [build_role(sop_class, scp_role=True) for sop_class in storage_classes]
    handlers: list[evt.EventHandlerType] = [(evt.EVT_C_STORE, on_store)]
    with _association(ae, settings, tracker, ext_neg=roles, handlers=handlers) as assoc:
        for response, _identifier in assoc.send_c_get(
            _study_identifier(study_uid), StudyRootQueryRetrieveInformationModelGet
        ):
            _check_retrieve_status(_status(response, "C-GET"), "C-GET")


def retrieve_by_move(
    settings: PriorsSettings,
    calling_aet: str,
    study_uid: str,
    destination_aet: str,
    tracker: AssociationTracker,
) -> None:
    """C-MOVE ``study_uid`` to ``destination_aet``; returns once the PACS reports it done."""
    ae = _ae(settings, calling_aet)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    with _association(ae, settings, tracker) as assoc:
        for response, _identifier in assoc.send_c_move(
            _study_identifier(study_uid),
            destination_aet,
            StudyRootQueryRetrieveInformationModelMove,
        ):
            _check_retrieve_status(_status(response, "C-MOVE"), "C-MOVE")
