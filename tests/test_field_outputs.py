"""Outputs of studies as hospitals send them (issue 12), from the worker to real peers: an
ORU for a study without Patient ID reaches a real MLLP listener, a site that requires a
patient id gets a dead letter with the reason instead, and a report of a new study version
says it corrects the earlier one (OBR-25/OBX-11 C, JSON ``supersedes``, SR predecessor)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import hl7
import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from config.settings import FileDestination, HL7Destination, NodeSettings
from inference.scripted_engine import ScriptedEngine
from inference.worker import InferenceWorker
from medgemma_node.outputs import REPORT_JSON, ReportOutputs
from peers.dicom_files import copy_with_new_uids
from peers.mllp_listener import MLLPListener, ReplyMode
from storage.db import Database
from storage.ingest import close_quiet_studies
from storage.models import Job, JobStatus, OutboxItem, OutboxStatus, Report, ReportObject
from tests.test_delivery import FAST_RETRY, make_worker
from tests.test_worker import CHEST_ANSWER, ingest_file, make_settings

ACCESSION = "ER24-0815"


@pytest.fixture
def listener() -> Iterator[MLLPListener]:
    with MLLPListener(ReplyMode.AA) as started:
        yield started


def his(name: str, port: int, **options: object) -> HL7Destination:
    return HL7Destination(
        kind="hl7", name=name, host="127.0.0.1", port=port, retry=FAST_RETRY,
        connect_timeout_s=2.0, ack_timeout_s=2.0, **options,
    )  # fmt: skip


def site(tmp_path: Path) -> tuple[NodeSettings, Database]:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'node.db'}")
    settings.storage.data_dir.mkdir(parents=True)
    db = Database(settings.storage.database_url)
    db.upgrade()
    return settings, db


def report_once(db: Database, settings: NodeSettings) -> None:
    """Close the quiet study (a new version when instances came late) and report it."""
    close_quiet_studies(db, lambda _modality, _ae: 0.0)
    engine = ScriptedEngine(texts=[CHEST_ANSWER])
    worker = InferenceWorker(db, settings, lambda: engine, ReportOutputs(settings))
    assert worker.run_once() == 1


def test_an_oru_without_patient_id_reaches_a_real_mllp_listener(
    tmp_path: Path, rg1_unci: Path, listener: MLLPListener
) -> None:
    settings, db = site(tmp_path)
    settings.destinations = [
        his("his", listener.port),
        his("his-strict", listener.port, require_patient_id=True),
    ]
    study = copy_with_new_uids(rg1_unci, tmp_path / "er.dcm", AccessionNumber=ACCESSION)
    dataset = pydicom.dcmread(study)
    del dataset.PatientID, dataset.OtherPatientIDs  # an unknown emergency patient
    dataset.save_as(study)
    ingest_file(db, settings.storage.data_dir, study)

    report_once(db, settings)
    delivery = make_worker(db, settings.storage.data_dir, settings.destinations)
    assert delivery.deliver_once() == 1

    with db.session() as session:
        assert session.scalars(select(Job.status)).one() == JobStatus.DONE
        assert "sr" in session.scalars(select(ReportObject.kind)).all()
        rows = {row.destination: row for row in session.scalars(select(OutboxItem))}
    assert rows["his"].status == OutboxStatus.SENT
    strict = rows["his-strict"]
    assert strict.status == OutboxStatus.DEAD and strict.payload_path == ""
    assert strict.last_error is not None and "require_patient_id" in strict.last_error
    (received,) = listener.received
    assert received.control_id == rows["his"].message_id
    pid_3 = received.message.segment("PID")[3][0]
    assert [str(pid_3[i]) for i in (0, 3, 4)] == [ACCESSION, "", "ACSN"]
    db.dispose()


def test_a_new_study_version_is_reported_as_a_correction(tmp_path: Path, rg1_unci: Path) -> None:
    settings, db = site(tmp_path)
    settings.destinations = [
        FileDestination(kind="file", name="drop", directory=tmp_path / "drop", write_hl7=True)
    ]
    data_dir = settings.storage.data_dir
    first_file = copy_with_new_uids(rg1_unci, tmp_path / "first.dcm")
    ingest_file(db, data_dir, first_file)
    report_once(db, settings)
    late = pydicom.dcmread(first_file)  # a late instance of the same study: a new version
    late.SOPInstanceUID = late.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    late.save_as(tmp_path / "late.dcm")
    ingest_file(db, data_dir, tmp_path / "late.dcm")
    report_once(db, settings)

    with db.session() as session:
        first, second = session.scalars(select(Report).order_by(Report.id)).all()
        first_sr = session.scalars(
            select(ReportObject.sop_instance_uid).where(
                ReportObject.report_id == first.id, ReportObject.kind == "sr"
            )
        ).one()
        ids = (first.id, second.id, second.supersedes_report_id, first.supersedes_report_id)
    first_id, second_id, superseded, none = ids
    assert (superseded, none) == (first_id, None)
    for report_id, status in ((first_id, "P"), (second_id, "C")):
        text = (data_dir / "reports" / str(report_id) / "oru-drop.hl7").read_bytes().decode()
        message = hl7.parse(text)
        assert str(message.segment("OBR")[25]) == status
        assert {str(obx[11]) for obx in message.segments("OBX")} == {status}
    payload = json.loads((data_dir / "reports" / str(second_id) / REPORT_JSON).read_text())
    assert payload["supersedes"] == {"report_id": first_id, "sr_sop_instance_uid": first_sr}
    assert payload["report"]["supersedes_report_id"] == first_id
    first_payload = json.loads((data_dir / "reports" / str(first_id) / REPORT_JSON).read_text())
    assert first_payload["supersedes"] is None
    sr = pydicom.dcmread(data_dir / _sr_path(db, second_id))
    reference = sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert reference.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first_sr
    db.dispose()


def _sr_path(db: Database, report_id: int) -> str:
    with db.session() as session:
        return session.scalars(
            select(ReportObject.path).where(
                ReportObject.report_id == report_id, ReportObject.kind == "sr"
            )
        ).one()
