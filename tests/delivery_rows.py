"""Report rows and payload files for delivery tests, written the way the report code writes
them: Study/StudyVersion/Job/Report rows, a Basic Text SR and an Encapsulated PDF with
deterministic UIDs under <data>/reports/<report id>/, an ORU^R01 built by hl7_out.oru, a JSON
document, and outbox rows pointing at those files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session

from hl7_out.oru import OruHeader, build_oru
from storage.db import Database
from storage.models import (
    Job,
    JobStatus,
    OutboxItem,
    OutboxStatus,
    Report,
    ReportObject,
    Study,
    StudyVersion,
)
from storage.report_schema import (
    Finding,
    ModelIdentity,
    ParseStatus,
    ReportContent,
    ReportDocument,
)

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
MESSAGE_TIME = datetime(2024, 5, 1, 10, 0, 1, tzinfo=UTC)
TINY_PDF = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"


@dataclass(frozen=True)
class ReportFiles:
    report_id: int
    study_uid: str
    objects: list[tuple[int, str, str]]  # (report_objects.id, SOP Instance UID, payload path)
    oru_path: str
    control_id: str
    json_path: str
    data_dir: Path

    @property
    def sop_uids(self) -> list[str]:
        return [sop_uid for _, sop_uid, _ in self.objects]


def _uid(*parts: object) -> str:
    return generate_uid(entropy_srcs=["medgemma-delivery-test", *map(str, parts)])


def _common_dataset(sop_class: str, sop_uid: str, study_uid: str, number: int) -> Dataset:
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    dataset.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    dataset.SOPClassUID = sop_class
    dataset.SOPInstanceUID = sop_uid
    dataset.PatientName = f"DELIVERY^TEST{number}"
    dataset.PatientID = f"DT{number:04d}"
    dataset.PatientBirthDate = "19700101"
    dataset.PatientSex = "O"
    dataset.StudyInstanceUID = study_uid
    dataset.StudyDate = "20240501"
    dataset.StudyTime = "100000"
    dataset.ReferringPhysicianName = ""
    dataset.StudyID = str(number)
    dataset.AccessionNumber = f"ACC{number:04d}"
    dataset.SeriesNumber = 900
    dataset.InstanceNumber = 1
    dataset.Manufacturer = "medgemma-node tests"
    dataset.ContentDate = "20240501"
    dataset.ContentTime = "100001"
    return dataset


def write_basic_text_sr(path: Path, study_uid: str, sop_uid: str, number: int) -> Dataset:
    """A Basic Text SR (PS3.3 A.35.1): a CONTAINER with one TEXT item."""
    dataset = _common_dataset(BASIC_TEXT_SR, sop_uid, study_uid, number)
    dataset.Modality = "SR"
    dataset.SeriesInstanceUID = _uid("sr-series", study_uid)
    dataset.CompletionFlag = "PARTIAL"
    dataset.VerificationFlag = "UNVERIFIED"
    dataset.ValueType = "CONTAINER"
    dataset.ContinuityOfContent = "SEPARATE"
    dataset.ConceptNameCodeSequence = DicomSequence(
        [_code("18748-4", "LN", "Diagnostic imaging report")]
    )
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    item.ConceptNameCodeSequence = DicomSequence([_code("121071", "DCM", "Finding")])
    item.TextValue = "AI-generated, preliminary: no acute finding."
    dataset.ContentSequence = DicomSequence([item])
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path, enforce_file_format=True)
    return dataset


def write_encapsulated_pdf(path: Path, study_uid: str, sop_uid: str, number: int) -> None:
    """An Encapsulated PDF (PS3.3 A.45.1)."""
    dataset = _common_dataset(ENCAPSULATED_PDF, sop_uid, study_uid, number)
    dataset.Modality = "DOC"
    dataset.SeriesInstanceUID = _uid("pdf-series", study_uid)
    dataset.BurnedInAnnotation = "YES"
    dataset.DocumentTitle = "AI report"
    dataset.ConceptNameCodeSequence = DicomSequence([])
    dataset.MIMETypeOfEncapsulatedDocument = "application/pdf"
    dataset.EncapsulatedDocument = TINY_PDF + b"\x00" * (len(TINY_PDF) % 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path, enforce_file_format=True)


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    code = Dataset()
    code.CodeValue = value
    code.CodingSchemeDesignator = scheme
    code.CodeMeaning = meaning
    return code


def make_report(db: Database, data_dir: Path, number: int) -> ReportFiles:
    """A report with its two DICOM objects, its ORU and its JSON document on disk."""
    study_uid = _uid("study", number)
    with db.session() as session:
        study = Study(study_instance_uid=study_uid, modality="CR", calling_ae="MODALITY")
        version = StudyVersion(study=study, version_number=1)
        job = Job(study_version=version, status=JobStatus.DONE)
        session.add_all([study, version, job])
        session.flush()
        report = Report(
            job_id=job.id,
            study_id=study.id,
            study_version_id=version.id,
            parse_status="ok",
            content_json={"impression": "no acute finding"},
            model_json={"model_id": "test"},
        )
        session.add(report)
        session.flush()
        objects = _write_objects(session, data_dir, report.id, study_uid, number)
        report_id = report.id
    source = pydicom.dcmread(data_dir / objects[0][2])
    control_id = f"MG{report_id:08d}"
    oru_path = f"reports/{report_id}/oru-his.hl7"  # medgemma_node.outputs: oru-<destination>
    (data_dir / oru_path).write_bytes(_oru(report_id, study_uid, source, control_id).encode())
    json_path = f"reports/{report_id}/report.json"
    document = {"report_id": report_id, "study_instance_uid": study_uid, "impression": "none"}
    (data_dir / json_path).write_text(json.dumps(document, sort_keys=True))
    return ReportFiles(report_id, study_uid, objects, oru_path, control_id, json_path, data_dir)


def _write_objects(
    session: Session, data_dir: Path, report_id: int, study_uid: str, number: int
) -> list[tuple[int, str, str]]:
    objects = []
    for kind, sop_class, writer in (
        ("sr", BASIC_TEXT_SR, write_basic_text_sr),
        ("pdf", ENCAPSULATED_PDF, write_encapsulated_pdf),
    ):
        sop_uid = _uid(kind, study_uid)
        relative = f"reports/{report_id}/{kind}.dcm"
        writer(data_dir / relative, study_uid, sop_uid, number)
        row = ReportObject(
            report_id=report_id,
            kind=kind,
            sop_class_uid=sop_class,
            sop_instance_uid=sop_uid,
            path=relative,
        )
        session.add(row)
        session.flush()
        objects.append((row.id, sop_uid, relative))
    return objects


def _oru(report_id: int, study_uid: str, source: Dataset, control_id: str) -> str:
    document = ReportDocument(
        report_id=report_id,
        study_instance_uid=study_uid,
        version_number=1,
        created_at=datetime(2024, 5, 1, 10, 0, tzinfo=UTC),
        content=ReportContent(
            parse_status=ParseStatus.OK,
            findings=[Finding(label="no acute finding")],
            impression="No acute cardiopulmonary abnormality.",
        ),
        model=ModelIdentity(model_id="google/medgemma-1.5-4b-it", is_test_model=True),
    )
    return build_oru(document, source, OruHeader(), control_id, MESSAGE_TIME)


def queue(db: Database, report: ReportFiles, destination: str, kind: str) -> list[int]:
    """Outbox rows for one report and one destination, as medgemma_node.outputs writes them:
    dicom one row per object; hl7 the ORU; http the JSON; file one JSON row (with the ORU
    beside it as oru-<destination>.hl7)."""
    common = {"report_id": report.report_id, "destination": destination, "kind": kind}
    if kind == "dicom":
        rows = [
            OutboxItem(**common, object_id=object_id, message_id=sop_uid, payload_path=path)
            for object_id, sop_uid, path in report.objects
        ]
    elif kind == "hl7":
        rows = [OutboxItem(**common, message_id=report.control_id, payload_path=report.oru_path)]
    else:
        rows = [
            OutboxItem(
                **common,
                message_id=f"report-{report.report_id}-{destination}",
                payload_path=report.json_path,
            )
        ]
    if kind == "file":
        oru = Path(report.oru_path).with_name(f"oru-{destination}.hl7")
        (report.data_dir / oru).write_bytes((report.data_dir / report.oru_path).read_bytes())
    with db.session() as session:
        session.add_all(rows)
        session.flush()
        return [row.id for row in rows]


def outbox_rows(db: Database, destination: str | None = None) -> list[OutboxItem]:
    query = select(OutboxItem).order_by(OutboxItem.id)
    if destination is not None:
        query = query.where(OutboxItem.destination == destination)
    with db.session() as session:
        return list(session.scalars(query))


def all_in(db: Database, status: OutboxStatus, destination: str | None = None) -> bool:
    rows = outbox_rows(db, destination)
    return bool(rows) and all(row.status == status for row in rows)
