"""Identities across installations (issue 12): every UID, MSH-10 and idempotency key the node
mints derives from the installation id, so two installations reporting the same study never
collide, while a rebuild on one installation keeps them (retries stay idempotent)."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import hl7
import pydicom
import pytest
from sqlalchemy import delete, select

from config.settings import FileDestination, NodeSettings
from inference.scripted_engine import ScriptedEngine
from inference.worker import InferenceWorker
from medgemma_node.outputs import ReportOutputs
from medgemma_node.service import Node
from medgemma_node.status import database_status
from peers.dicom_files import copy_with_new_uids
from storage.db import Database
from storage.ingest import close_quiet_studies as close_studies
from storage.installation import INSTALLATION_FILE, ensure_installation_id
from storage.models import Job, JobStatus, OutboxItem, OutboxStatus, Report, ReportObject
from tests.test_worker import CHEST_ANSWER, ingest_file, make_settings


def _installation(root: Path, name: str) -> tuple[NodeSettings, Database]:
    settings = make_settings(root / name, f"sqlite:///{root / name / 'node.db'}")
    settings.destinations = [
        FileDestination(kind="file", name="drop", directory=root / name / "drop", write_hl7=True)
    ]
    db = Database(settings.storage.database_url)
    db.upgrade()
    return settings, db


def _identities(settings: NodeSettings, db: Database) -> tuple[str, str, str]:
    """(SR SOP Instance UID, MSH-10 of the file destination's ORU, idempotency key)."""
    with db.session() as session:
        report = session.scalars(select(Report)).one()
        sr_uid = session.scalars(
            select(ReportObject.sop_instance_uid).where(ReportObject.kind == "sr")
        ).one()
        key = session.scalars(select(OutboxItem.message_id)).one()
        report_id = report.id
    oru = settings.storage.data_dir / "reports" / str(report_id) / "oru-drop.hl7"
    message = hl7.parse(oru.read_text(encoding="utf-8").replace("\n", "\r"))
    return sr_uid, str(message.segment("MSH")[10]), key


def _rebuild(settings: NodeSettings, db: Database) -> tuple[str, str, str]:
    """Build the same report's outputs again with a fresh hook (as after a restart)."""
    with db.sessions() as session:
        report = session.scalars(select(Report)).one()
        # The first build's rows go (in this rolled-back transaction): UIDs are unique there.
        session.execute(delete(OutboxItem))
        session.execute(delete(ReportObject))
        ReportOutputs(settings)(session, report)
        session.flush()
        sr_uid = session.scalars(
            select(ReportObject.sop_instance_uid)
            .where(ReportObject.kind == "sr")
            .order_by(ReportObject.id.desc())
        ).first()
        key = session.scalars(select(OutboxItem.message_id).order_by(OutboxItem.id.desc())).first()
        report_id = report.id
        session.rollback()
    oru = settings.storage.data_dir / "reports" / str(report_id) / "oru-drop.hl7"
    message = hl7.parse(oru.read_text(encoding="utf-8").replace("\n", "\r"))
    assert sr_uid is not None and key is not None
    return sr_uid, str(message.segment("MSH")[10]), key


def test_two_installations_never_share_identities_and_a_rebuild_keeps_them(
    tmp_path: Path, rg1_unci: Path
) -> None:
    study = copy_with_new_uids(rg1_unci, tmp_path / "study.dcm")
    found: list[tuple[str, str, str]] = []
    for name in ("site-a", "site-b"):
        settings, db = _installation(tmp_path, name)
        ingest_file(db, settings.storage.data_dir, study)
        close_studies(db, lambda _modality, _ae: 0.0)
        engine = ScriptedEngine(texts=[CHEST_ANSWER])
        worker = InferenceWorker(db, settings, lambda e=engine: e, ReportOutputs(settings))
        assert worker.run_once() == 1
        found.append(_identities(settings, db))
        assert _rebuild(settings, db) == found[-1], "a rebuild must keep every identity"
        db.dispose()
    (sr_a, msh_a, key_a), (sr_b, msh_b, key_b) = found
    assert sr_a != sr_b and msh_a != msh_b and key_a != key_b
    for sr_uid in (sr_a, sr_b):
        # No UID root configured: the UUID-derived form (PS3.5 B.2).
        assert sr_uid.startswith("2.25.") and len(sr_uid) <= 64
        assert pydicom.uid.UID(sr_uid).is_valid


def test_installation_id_file_and_database_database_wins(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings, db = _installation(tmp_path, "site")
    data_dir = settings.storage.data_dir
    with db.session() as session:
        created = ensure_installation_id(session, data_dir)
    assert (data_dir / INSTALLATION_FILE).read_text().strip() == created
    other = str(uuid.uuid4())
    (data_dir / INSTALLATION_FILE).write_text(other + "\n")
    with caplog.at_level(logging.WARNING), db.session() as session:
        assert ensure_installation_id(session, data_dir) == created
    assert "differs" in caplog.text and other in caplog.text
    assert (data_dir / INSTALLATION_FILE).read_text().strip() == created
    assert database_status(settings)["installation_id"] == created
    db.dispose()


def test_a_new_database_over_an_existing_data_directory_keeps_its_id(tmp_path: Path) -> None:
    settings, db = _installation(tmp_path, "site")
    data_dir = settings.storage.data_dir
    kept = str(uuid.uuid4())
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / INSTALLATION_FILE).write_text(kept)
    with db.session() as session:
        assert ensure_installation_id(session, data_dir) == kept
    db.dispose()


@pytest.mark.parametrize("uid_root", [None, "1.2.826.0.1.3680043.10.1234."])
def test_start_warns_when_no_uid_root_is_configured(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, uid_root: str | None
) -> None:
    settings, db = _installation(tmp_path, "site")
    settings.identity = settings.identity.model_copy(update={"uid_root": uid_root})
    node = Node(settings, with_scp=False)
    node.db = db
    with caplog.at_level(logging.INFO, logger="medgemma_node.service"):
        node.start()
        node.stop()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    installation = (settings.storage.data_dir / INSTALLATION_FILE).read_text().strip()
    assert f"installation id {installation}" in caplog.text
    if uid_root is None:
        assert any("no [identity] uid_root configured" in w and "2.25" in w for w in warnings)
    else:
        assert not any("uid_root" in w for w in warnings)


def test_a_study_without_patient_id_fails_only_the_hl7_delivery(
    tmp_path: Path, rg1_unci: Path
) -> None:
    """Issue 12: no Patient ID -> SR and JSON still made, the job done, the ORU's delivery
    dead-lettered with a reason that names no patient."""
    settings, db = _installation(tmp_path, "site")
    study = copy_with_new_uids(rg1_unci, tmp_path / "study.dcm")
    dataset = pydicom.dcmread(study)
    del dataset.PatientID, dataset.OtherPatientIDs  # no identifier for PID-3 at all
    dataset.AccessionNumber = ""
    dataset.save_as(study)
    ingest_file(db, settings.storage.data_dir, study)
    close_studies(db, lambda _modality, _ae: 0.0)
    engine = ScriptedEngine(texts=[CHEST_ANSWER])
    worker = InferenceWorker(db, settings, lambda: engine, ReportOutputs(settings))
    assert worker.run_once() == 1
    with db.session() as session:
        job_status = session.scalars(select(Job.status)).one()
        kinds = session.scalars(select(ReportObject.kind)).all()
        [row] = session.scalars(select(OutboxItem)).all()
    assert job_status == JobStatus.DONE and "sr" in kinds
    assert row.status == OutboxStatus.DEAD and row.last_error is not None
    assert "Patient ID" in row.last_error
    assert str(dataset.PatientName) not in row.last_error
    db.dispose()
