"""Finding and fetching a study's prior from PACS ([priors]), and the prior store's intake.

``PacsPriorFinder.find`` (storage.priors.PriorFinder, called by the inference worker):

1. the current study's Patient ID (and Issuer of Patient ID) must be present and free of the
   wildcard characters ``*`` and ``?`` (PS3.4 C.2.2.2.4): otherwise a query could match other
   patients, so there is no prior;
2. C-FIND Study Root, STUDY level: Patient ID, Issuer of Patient ID, Modalities in Study and
   Study Date from ``max_age_days`` before the current study to the day before it;
3. the answers are checked again here (exact Patient ID, the issuer when both have one, date
   range, modality, not the current study), newest first; with ``match_body_part`` each
   candidate's series are asked for Body Part Examined (C-FIND SERIES level) and a candidate
   whose series name another body part is skipped;
4. a prior the node already holds (prior store, or a study it received itself) is used as it
   is; otherwise C-GET, or C-MOVE to ``move_destination_aet`` (the node's own AE title by
   default), whose images the SCP puts in the prior store (``PriorIntake``);
5. every image used is read back and must carry the same Patient ID (and issuer) and the
   chosen Study Instance UID: two patients with the same name never mix.

The whole search runs in a thread of its own and the caller waits at most
``total_timeout_s``; past that the open association is aborted and the study goes on
without a prior, its report saying why. The last failure is kept for ``status``.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pynetdicom import evt

from config.settings import NodeSettings
from dicom_node.prior_query import (
    AssociationTracker,
    PriorQueryFailed,
    StudyCandidate,
    find_prior_candidates,
    retrieve_by_get,
    retrieve_by_move,
    series_body_parts,
    study_query,
)
from dicom_node.received import chunks_size, received_file
from storage.db import Database
from storage.files import write_durably
from storage.priors import (
    PriorFound,
    PriorInstanceRecord,
    PriorQuery,
    is_requested_prior,
    mark_prior_requested,
    prior_relpath,
    record_prior_instance,
    stored_study_paths,
)
from storage.report_schema import PriorComparison

log = logging.getLogger(__name__)

WILDCARDS = ("*", "?")
MAX_BODY_PART_CHECKS = 5  # candidates whose series are asked for their body part
STATUS_STORED = 0x0000
STATUS_NOT_THIS_PATIENT = 0xA900  # PS3.4 B.2.3: data set does not match what was asked
STATUS_CANNOT_UNDERSTAND = 0xC000


def _none(code: str, *, failed: bool = False, **args: object) -> PriorFound:
    """No prior, for a reason of storage.report_schema.PRIOR_REASONS."""
    return PriorFound(PriorComparison.without(code, **args), failed=failed)


def _dicom_date(value: str) -> date | None:
    try:
        return datetime.strptime(value.strip(), "%Y%m%d").date()
    except ValueError:
        return None


def same_patient(dataset: Dataset, patient_id: str, issuer: str) -> bool:
    """Exactly the same Patient ID; the same issuer when both name one (PS3.3 C.7.1.1)."""
    if str(dataset.get("PatientID", "") or "") != patient_id:
        return False
    theirs = str(dataset.get("IssuerOfPatientID", "") or "").strip()
    return not (issuer and theirs and theirs != issuer)


class PacsPriorFinder:
    """The real PriorFinder: the PACS of ``[priors]``."""

    def __init__(self, settings: NodeSettings, db: Database) -> None:
        self.settings = settings.priors
        self.calling_aet = settings.dicom.ae_title
        self.move_destination = self.settings.move_destination_aet or settings.dicom.ae_title
        self.storage_classes = list(settings.dicom.accepted_sop_classes)
        self.db = db
        self.data_dir = settings.storage.data_dir
        self._lock = threading.Lock()
        self.state: dict[str, Any] = {
            "enabled": True,
            "pacs": f"{self.settings.ae_title}@{self.settings.host}:{self.settings.port}",
            "mode": self.settings.mode,
            "searches": 0,
            "compared": 0,
            "last_error": None,
            "last_error_at": None,
        }

    # -- the bounded search ----------------------------------------------------------------

    def find(self, query: PriorQuery) -> PriorFound:
        started = time.monotonic()
        tracker = AssociationTracker()
        outcome: list[PriorFound] = []
        thread = threading.Thread(
            target=lambda: outcome.append(self._search_safely(query, tracker)),
            name="prior-search",
            daemon=True,
        )
        thread.start()
        thread.join(self.settings.total_timeout_s)
        if thread.is_alive() or not outcome:
            tracker.abort_all()
            found = _none("timeout", failed=True, seconds=f"{self.settings.total_timeout_s:g}")
        else:
            found = outcome[0]
        found.comparison.seconds = round(time.monotonic() - started, 3)
        self._note(found)
        return found

    def _note(self, found: PriorFound) -> None:
        with self._lock:
            self.state["searches"] += 1
            self.state["compared"] += found.comparison.compared
            if found.failed:
                self.state["last_error"] = found.comparison.reason
                self.state["last_error_at"] = datetime.now(UTC).isoformat()
        if found.failed:
            log.warning("prior search failed: %s", found.comparison.reason)

    def _search_safely(self, query: PriorQuery, tracker: AssociationTracker) -> PriorFound:
        try:
            return self._search(query, tracker)
        except PriorQueryFailed as exc:
            return _none("query_failed", failed=True, detail=exc)
        except Exception as exc:  # any fault of the search: the study goes on without a prior
            log.exception("prior search failed unexpectedly")
            return _none("search_error", failed=True, error=type(exc).__name__)

    def _search(self, query: PriorQuery, tracker: AssociationTracker) -> PriorFound:
        patient_id = query.patient_id
        if not patient_id.strip():
            return _none("no_patient_id")
        if any(c in patient_id + query.issuer_of_patient_id for c in WILDCARDS):
            return _none("wildcard_patient_id")
        current = _dicom_date(query.study_date) or datetime.now(UTC).date()
        earliest = current - timedelta(days=self.settings.max_age_days)
        latest = current - timedelta(days=1)
        date_range = f"{earliest:%Y%m%d}-{latest:%Y%m%d}"
        identifier = study_query(patient_id, query.issuer_of_patient_id, query.modality, date_range)
        answers = find_prior_candidates(self.settings, self.calling_aet, identifier, tracker)
        candidates = self._plausible(answers, query, f"{earliest:%Y%m%d}", f"{latest:%Y%m%d}")
        chosen = self._with_body_part(candidates, query, tracker)
        if chosen is None:
            what = " ".join(filter(None, (query.modality, query.body_part)))
            return _none("none_found", what=what, days=self.settings.max_age_days)
        return self._fetch(chosen, query, tracker)

    def _plausible(
        self, answers: list[StudyCandidate], query: PriorQuery, earliest: str, latest: str
    ) -> list[StudyCandidate]:
        """The PACS's answers that really match, newest first."""
        kept = [
            c
            for c in answers
            if c.patient_id == query.patient_id
            and not (
                query.issuer_of_patient_id
                and c.issuer_of_patient_id
                and c.issuer_of_patient_id != query.issuer_of_patient_id
            )
            and c.study_instance_uid
            and c.study_instance_uid != query.study_instance_uid
            and earliest <= c.study_date <= latest
            and (not c.modalities or query.modality.upper() in c.modalities)
        ]
        return sorted(kept, key=lambda c: c.study_date, reverse=True)

    def _with_body_part(
        self, candidates: list[StudyCandidate], query: PriorQuery, tracker: AssociationTracker
    ) -> StudyCandidate | None:
        wanted = query.body_part.strip().upper()
        if not candidates or not self.settings.match_body_part or not wanted:
            return candidates[0] if candidates else None
        for candidate in candidates[:MAX_BODY_PART_CHECKS]:
            series = series_body_parts(
                self.settings, self.calling_aet, candidate.study_instance_uid, tracker
            )
            parts = {part for modality, part in series if modality == query.modality.upper()}
            if not parts or wanted in parts or parts == {""}:
                return candidate
        return None

    # -- fetching --------------------------------------------------------------------------

    def _fetch(
        self, chosen: StudyCandidate, query: PriorQuery, tracker: AssociationTracker
    ) -> PriorFound:
        uid = chosen.study_instance_uid
        source = "stored"
        if not self._usable_paths(uid, query):
            source = self.settings.mode
            if self.settings.mode == "move":
                mark_prior_requested(self.db, uid, query, chosen.study_date)
                retrieve_by_move(
                    self.settings, self.calling_aet, uid, self.move_destination, tracker
                )
            else:
                retrieve_by_get(
                    self.settings,
                    self.calling_aet,
                    uid,
                    self.storage_classes,
                    _transfer_syntaxes(),
                    lambda event: self._store_got(event, query, uid),
                    tracker,
                )
        usable = self._usable_paths(uid, query)
        if not usable:
            mode = self.settings.mode.upper()
            return _none("no_image_arrived", failed=True, date=chosen.study_date, mode=mode)
        paths, sop_uids, header = usable
        comparison = PriorComparison(
            compared=True,
            study_instance_uid=uid,
            study_date=chosen.study_date,
            modality=str(header.get("Modality", "") or query.modality),
            body_part=str(header.get("BodyPartExamined", "") or query.body_part),
            sop_instance_uids=sop_uids,
            source=source,
        )
        return PriorFound(comparison, paths)

    def _usable_paths(
        self, study_uid: str, query: PriorQuery
    ) -> tuple[list[str], list[str], Dataset] | None:
        """The held images of ``study_uid`` that belong to this patient, or None."""
        paths, sop_uids, first = [], [], None
        for path in stored_study_paths(self.db, study_uid):
            try:
                header = dcmread(self.data_dir / path, stop_before_pixels=True)
            except Exception:  # an unreadable file is not used
                continue
            same_study = str(header.get("StudyInstanceUID", "")) == study_uid
            if same_study and same_patient(header, query.patient_id, query.issuer_of_patient_id):
                paths.append(path)
                sop_uids.append(str(header.SOPInstanceUID))
                first = first or header
        return (paths, sop_uids, first) if first is not None else None

    def _store_got(self, event: evt.Event, query: PriorQuery, study_uid: str) -> int:
        """C-STORE sub-operation of our C-GET: only this patient's images of the study."""
        try:
            dataset = event.dataset
        except Exception:  # does not parse: PS3.4 B.2.3 cannot understand
            return STATUS_CANNOT_UNDERSTAND
        asked = str(dataset.get("StudyInstanceUID", "")) == study_uid
        if not asked or not same_patient(dataset, query.patient_id, query.issuer_of_patient_id):
            log.warning("C-GET sent an image of another study or patient: refused")
            return STATUS_NOT_THIS_PATIENT
        store_prior(self.db, self.data_dir, dataset, event)
        return STATUS_STORED


def _transfer_syntaxes() -> list[str]:
    from dicom_node.scp import accepted_transfer_syntaxes  # the SCP's list, one place

    return [str(uid) for uid in accepted_transfer_syntaxes()]


def store_prior(db: Database, data_dir: Path, dataset: Dataset, event: evt.Event) -> bool:
    """Write a received prior image durably into the prior store, as received, and record it."""
    study = str(dataset.StudyInstanceUID)
    relpath = prior_relpath(study, str(dataset.SeriesInstanceUID), str(dataset.SOPInstanceUID))
    with received_file(event) as chunks:
        if not (data_dir / relpath).exists():
            write_durably(data_dir / relpath, chunks)
        size = chunks_size(chunks)
    return record_prior_instance(
        db,
        PriorInstanceRecord(
            study_instance_uid=study,
            sop_instance_uid=str(dataset.SOPInstanceUID),
            sop_class_uid=str(dataset.SOPClassUID),
            relpath=relpath.as_posix(),
            size_bytes=size,
            patient_id=str(dataset.get("PatientID", "") or "")[:64],
            issuer_of_patient_id=str(dataset.get("IssuerOfPatientID", "") or "")[:64],
            study_date=str(dataset.get("StudyDate", "") or "")[:8],
            modality=str(dataset.get("Modality", "") or "")[:16],
            body_part=str(dataset.get("BodyPartExamined", "") or "")[:64],
        ),
    )


class PriorIntake:
    """The SCP's side of C-MOVE: images the node asked for go to the prior store.

    A C-STORE is a prior when its Move Originator AE Title (PS3.7 9.1.1.1, set by the PACS on
    the sub-operations of a C-MOVE) is this node's AE title, or when it comes from the priors
    PACS for a study the node asked it to move (for PACS that leave that attribute out).
    """

    def __init__(self, settings: NodeSettings, db: Database) -> None:
        self.own_aet = settings.dicom.ae_title.strip()
        self.pacs_aet = settings.priors.ae_title.strip()
        self.db = db
        self.data_dir = settings.storage.data_dir

    def wants(self, event: evt.Event, study_uid: str, calling_ae: str) -> bool:
        originator = getattr(event.request, "MoveOriginatorApplicationEntityTitle", None)
        if originator and str(originator).strip() == self.own_aet:
            return True
        return calling_ae == self.pacs_aet and is_requested_prior(self.db, study_uid)

    def store(self, event: evt.Event, dataset: Dataset) -> int:
        store_prior(self.db, self.data_dir, dataset, event)
        return STATUS_STORED
