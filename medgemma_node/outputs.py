"""Report → output objects + outbox rows, committed with the report.

For each stored report (``prepare`` before its transaction, ``commit`` inside it; an appended
conversation calls ReportOutputs(session, report), both at once):
    builds the SR (TID 1500) and one GSPS per image with boxes  → <data>/reports/<id>/
    writes the JSON report                                       → <data>/reports/<id>/report.json
    builds one ORU^R01 per HL7 destination (and for file ones)  → <data>/reports/<id>/*.hl7
    plans the Encapsulated PDF when a routed DICOM destination has send_pdf: its report_objects
      row (derived SOP Instance UID, path pdf-<uid>.dcm); the file, like the PDF of file
      destinations with write_pdf, is built by the delivery side on first send
      (medgemma_node.report_pdf), off this critical path
    adds one outbox row per object per routed destination (``commit``).
The files are written, durably, before the transaction that adds their rows; a report that is
then not stored (its job's lease was lost, its transaction rolled back) has its directory
removed (``discard``).
Everything a delivery will send is fixed here, so a retry re-sends the same bytes: the same SR
SOP Instance UID, the same HL7 control id (README, "Exactly one result per study version").

Composition only: the builders are the stages' (dicom_node.sr/gsps, hl7_out.oru), the reads are
storage.reports, identities come from hl7_out.oru.hl7_control_id and
storage.outbox.idempotency_key, routing from the destination settings (``routes``).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from sqlalchemy.orm import Session

from config.settings import (
    Destination,
    DicomDestination,
    FileDestination,
    HL7Destination,
    NodeSettings,
)
from dicom_node.encapsulated_pdf import ENCAPSULATED_PDF_STORAGE
from dicom_node.gsps import build_gsps
from dicom_node.output_common import (
    NodeIdentity,
    OutputRecord,
    pdf_instance_uid,
    write_datasets,
)
from dicom_node.sr import SrReference, build_sr, load_standard_tables
from hl7_out.oru import OruBuildError, OruHeader, build_oru, hl7_control_id
from medgemma_node.logs import setup_logging
from storage import audit
from storage.files import write_durably
from storage.installation import ensure_installation_id
from storage.models import OutboxItem, OutboxStatus, Report, ReportObject, Study
from storage.outbox import idempotency_key
from storage.priors import prior_image_paths
from storage.report_schema import (
    AI_DISCLAIMER,
    TEST_MODEL_BANNER,
    PriorComparison,
    ReportDocument,
)
from storage.reports import predecessor_sr_path, report_document, source_paths

log = logging.getLogger(__name__)

REPORT_JSON = "report.json"


def node_identity(settings: NodeSettings, installation_id: str | None = None) -> NodeIdentity:
    identity = settings.identity
    return NodeIdentity(
        name=identity.device_name,
        serial_number=identity.serial_number,
        institution_name=identity.institution_name,
        uid_prefix=identity.uid_root,
        installation_id=installation_id,
    )


@dataclass(frozen=True)
class BuiltReport:
    """What one report's deliveries are planned from."""

    document: ReportDocument
    source: Dataset  # the first image: patient and study modules for the ORU
    records: list[OutputRecord]
    json_path: Path


@dataclass(frozen=True)
class PlannedDelivery:
    """One outbox row to be: what goes to which destination (``record``: the index of the DICOM
    object sent, in ``StagedOutputs.records``), or why nothing can (``dead_reason``)."""

    destination: Destination
    message_id: str
    payload: Path  # relative to the data directory; empty for a dead row
    record: int | None = None
    dead_reason: str | None = None


@dataclass(frozen=True)
class StagedOutputs:
    """A report's files, written durably under its directory, and the rows still to add in
    the report's transaction (``ReportOutputs.commit``)."""

    directory: Path
    records: list[OutputRecord]
    deliveries: list[PlannedDelivery]
    study_uid: str  # for the audit row, so the transaction need not read the study again

    def discard(self) -> None:
        """The report was not stored (its job went back to the queue): remove its files."""
        shutil.rmtree(self.directory, ignore_errors=True)


class ReportOutputs:
    """The on_report hook of the inference worker and of appended conversations.

    Called as ``hook(session, report)`` it does everything inside the report's transaction.
    The worker calls it in two steps instead: ``prepare`` (reads only: builds and writes the
    files, the report's id already known) before the transaction, ``commit`` (rows only)
    inside it, so the transaction is short (inference/report_store.py).
    """

    def __init__(self, settings: NodeSettings) -> None:
        self.settings = settings
        self.data_dir = settings.storage.data_dir
        self.node = node_identity(settings)
        self.installation_id: str | None = None

    def __call__(self, session: Session, report: Report) -> None:
        self.commit(session, report, self.prepare(session, report))

    def prepare(
        self, session: Session, report: Report, own_prior: PriorComparison | None = None
    ) -> StagedOutputs:
        """Build and durably write the report's SR, GSPS, JSON and ORU files; plan its outbox
        rows. ``report`` needs its id, study, version and supersedes set, not its row."""
        if self.installation_id is None:
            # Every identity minted below derives from it (storage/installation.py).
            self.installation_id = ensure_installation_id(session, self.data_dir)
            self.node = node_identity(self.settings, self.installation_id)
        directory = self.data_dir / "reports" / str(report.id)
        try:
            return self._build(session, report, own_prior, directory)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)  # no half-built report is left
            raise

    def _build(
        self,
        session: Session,
        report: Report,
        own_prior: PriorComparison | None,
        directory: Path,
    ) -> StagedOutputs:
        document = report_document(session, report, own_prior)
        study = session.get_one(Study, report.study_id)
        sources = self._sources(session, report, document)
        predecessor = previous_sr(session, document, self.data_dir)
        records = self._build_dicom(session, document, sources, predecessor, directory)
        records += self._planned_pdf(document, study, directory)
        json_path = self._write_json(document, study, records, predecessor, directory)
        built = BuiltReport(document, sources[0], records, json_path)
        deliveries = [
            delivery
            for destination in self.settings.destinations
            if destination.enabled and destination.routes(study.modality, study.calling_ae)
            for delivery in self._plan_or_dead_letter(built, destination)
        ]
        return StagedOutputs(directory, records, deliveries, study.study_instance_uid)

    def commit(self, session: Session, report: Report, staged: StagedOutputs) -> None:
        """Add the report's object rows, outbox rows and audit event (its row is flushed)."""
        objects = [self._object_row(report, record) for record in staged.records]
        session.add_all(objects)
        session.flush()  # the objects' ids, which their outbox rows name
        for delivery in staged.deliveries:
            session.add(self._outbox_row(report, delivery, objects))
        session.add(
            audit.event(
                "report.created",
                study_uid=staged.study_uid,
                report_id=report.id,
                job_id=report.job_id,
                supersedes_report_id=report.supersedes_report_id,
                objects=[record.kind for record in staged.records],
                test_model=report.is_test_model,
            )
        )

    # -- building -------------------------------------------------------------------------

    def _sources(self, session: Session, report: Report, document: ReportDocument) -> list[Dataset]:
        """The images the model saw (headers + pixels: a GSPS may need a computed window);
        only those files are read (a CT version holds hundreds)."""
        wanted = document.source_sop_instance_uids
        paths = source_paths(session, report.study_version_id, wanted)
        return [dcmread(self.data_dir / path, defer_size="1 MB") for path in paths]

    def _build_dicom(
        self,
        session: Session,
        document: ReportDocument,
        sources: list[Dataset],
        predecessor: SrReference | None,
        directory: Path,
    ) -> list[OutputRecord]:
        priors = self._prior_images(session, document)
        sr = build_sr(
            document, sources, predecessor, node=self.node, priors=priors, queryable=False
        )
        has_regions = any(f.region is not None for f in document.content.findings)
        gsps = build_gsps(document, sources, node=self.node) if has_regions else []
        return write_datasets([sr, *gsps], directory)

    def _prior_images(self, session: Session, document: ReportDocument) -> list[Dataset]:
        """Headers of the prior images the report was compared with: the SR's evidence."""
        prior = document.prior
        if prior is None or not prior.compared:
            return []
        paths = prior_image_paths(session, prior.sop_instance_uids)
        return [dcmread(self.data_dir / path, stop_before_pixels=True) for path in paths]

    def _planned_pdf(
        self, document: ReportDocument, study: Study, directory: Path
    ) -> list[OutputRecord]:
        """The Encapsulated PDF's identity when a DICOM destination will send it; the file is
        built on the first send (its UID is derived, so it is known now)."""
        wanted = any(
            isinstance(d, DicomDestination)
            and d.enabled
            and d.send_pdf
            and d.routes(study.modality, study.calling_ae)
            for d in self.settings.destinations
        )
        if not wanted:
            return []
        uid = pdf_instance_uid(self.node, document)
        path = directory / f"pdf-{uid}.dcm"
        return [OutputRecord("PDF", ENCAPSULATED_PDF_STORAGE, uid, path)]

    def _object_row(self, report: Report, record: OutputRecord) -> ReportObject:
        return ReportObject(
            report_id=report.id,
            kind=record.kind.lower(),
            sop_class_uid=record.sop_class_uid,
            sop_instance_uid=record.sop_instance_uid,
            path=self._rel(record.path).as_posix(),
        )

    def _write_json(
        self,
        document: ReportDocument,
        study: Study,
        records: Sequence[OutputRecord],
        predecessor: SrReference | None,
        directory: Path,
    ) -> Path:
        payload: dict[str, Any] = {
            "notice": document_notice(document),
            "supersedes": superseded_json(document, predecessor),
            # Absent for reports made before the scope check.
            "scope": scope.model_dump() if (scope := document.content.scope) is not None else None,
            "report": document.model_dump(mode="json"),
            "study": {"modality": study.modality, "calling_ae": study.calling_ae},
            "objects": [
                {
                    "kind": r.kind,
                    "sop_class_uid": r.sop_class_uid,
                    "sop_instance_uid": r.sop_instance_uid,
                }
                for r in records
            ],
        }
        path = directory / REPORT_JSON
        write_durably(path, json.dumps(payload, ensure_ascii=False, indent=2).encode("utf-8"))
        return path

    # -- outbox ---------------------------------------------------------------------------

    def _plan_or_dead_letter(
        self, built: BuiltReport, destination: Destination
    ) -> list[PlannedDelivery]:
        """One destination's deliveries; a payload that cannot be built fails only that
        delivery: a dead outbox row says why (``outbox list``) and the other outputs go on."""
        try:
            return self._plan(built, destination)
        except Exception as exc:  # any builder failure is this destination's alone
            reason = build_failure_reason(exc)
            log.error(
                "report %s: no payload for destination %s: %s",
                built.document.report_id,
                destination.name,
                reason,
            )
            key = idempotency_key(
                built.document.study_instance_uid,
                built.document.report_id,
                destination.name,
                self.installation_id,
            )
            return [PlannedDelivery(destination, key, Path(), dead_reason=reason)]

    def _plan(self, built: BuiltReport, destination: Destination) -> list[PlannedDelivery]:
        """The outbox rows of one destination (README: written with the report)."""
        study_uid, report_id = built.document.study_instance_uid, built.document.report_id
        installation = self.installation_id
        key = idempotency_key(study_uid, report_id, destination.name, installation)
        if isinstance(destination, DicomDestination):
            return [
                PlannedDelivery(destination, record.sop_instance_uid, self._rel(record.path), index)
                for index, record in enumerate(built.records)
                if (record.kind.lower() != "gsps" or destination.send_gsps)
                and (record.kind.lower() != "pdf" or destination.send_pdf)
            ]
        if isinstance(destination, HL7Destination):
            control_id = hl7_control_id(study_uid, report_id, destination.name, installation)
            oru = self._write_oru(built, destination.name, OruHeader.of(destination), control_id)
            return [PlannedDelivery(destination, control_id, oru)]
        if isinstance(destination, FileDestination) and destination.write_hl7:
            # No MLLP peer to configure: the default header.
            control_id = hl7_control_id(study_uid, report_id, destination.name, installation)
            self._write_oru(built, destination.name, OruHeader(), control_id)
        return [PlannedDelivery(destination, key, self._rel(built.json_path))]

    def _write_oru(
        self, built: BuiltReport, destination_name: str, header: OruHeader, control_id: str
    ) -> Path:
        document = built.document
        message = build_oru(document, built.source, header, control_id, document.created_at)
        path = self.data_dir / "reports" / str(document.report_id) / f"oru-{destination_name}.hl7"
        write_durably(path, message.encode("utf-8"))
        return self._rel(path)

    def _rel(self, path: Path) -> Path:
        return path.relative_to(self.data_dir) if path.is_absolute() else path

    @staticmethod
    def _outbox_row(
        report: Report, delivery: PlannedDelivery, objects: list[ReportObject]
    ) -> OutboxItem:
        destination = delivery.destination
        dead = delivery.dead_reason is not None
        return OutboxItem(
            report_id=report.id,
            destination=destination.name,
            kind=destination.kind,
            object_id=objects[delivery.record].id if delivery.record is not None else None,
            message_id=delivery.message_id,
            payload_path="" if dead else delivery.payload.as_posix(),
            **({"status": OutboxStatus.DEAD, "last_error": delivery.dead_reason} if dead else {}),
        )


def build_failure_reason(exc: BaseException) -> str:
    """Why a payload was not built, without PHI: library errors (strict HL7 validation,
    pydicom) may quote dataset values, so only the node's own messages are kept whole."""
    if isinstance(exc, OruBuildError) and exc.__cause__ is None:
        return f"payload not built: {exc}"
    return f"payload not built: {type(exc).__name__} (details withheld: may quote patient data)"


def superseded_json(
    document: ReportDocument, predecessor: SrReference | None
) -> dict[str, Any] | None:
    """The report this one replaces (its ORU says C, correction) and that report's SR, which
    the new SR names in its Predecessor Documents Sequence; None for a study's first report."""
    if document.supersedes_report_id is None:
        return None
    return {
        "report_id": document.supersedes_report_id,
        "sr_sop_instance_uid": predecessor.sop_instance_uid if predecessor else None,
    }


def document_notice(document: ReportDocument) -> str:
    """The JSON report's notice: test model banner, the scope notice, the AI disclaimer."""
    banner = TEST_MODEL_BANNER if document.model.is_test_model else None
    parts = [banner, document.scope_notice, AI_DISCLAIMER]
    return ". ".join(part.rstrip(".") for part in parts if part) + "."


def previous_sr(session: Session, document: ReportDocument, data_dir: Path) -> SrReference | None:
    """The SR of the newest earlier report of the same study (Predecessor Documents, C.17.2)."""
    path = predecessor_sr_path(session, document.study_instance_uid, document.report_id)
    if path is None:
        return None
    return SrReference.of(dcmread(data_dir / path, stop_before_pixels=True))


def start_store_process(log_level: str, log_file: Path) -> None:
    """A report store process's start (inference/report_store.py): it logs as the worker does,
    and reads highdicom's standard tables before its first report (load_standard_tables)."""
    setup_logging(log_level, log_file, rotate=False)  # the worker (or serve) rotates the file
    load_standard_tables()
