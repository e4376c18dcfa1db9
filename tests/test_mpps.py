"""The MPPS SCP (PS3.4 F.7) against a pynetdicom SCU: a COMPLETED step whose instances have
all arrived completes its study at once (whichever comes last, the N-SET or the images);
DISCONTINUED is not processed; without a final step the quiet period applies; and the
statuses of N-CREATE / N-SET that cannot be applied."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, Association
from sqlalchemy import select

from config.settings import NodeSettings
from dicom_node.completion import CompletionScheduler
from dicom_node.mpps import MPPS_SOP_CLASS
from dicom_node.scp import StorageSCP
from medgemma_node.service import Node
from peers.dicom_files import make_ct_study
from peers.net import free_port, wait_for
from storage.db import Database
from storage.models import AuditEvent, Job, JobStatus, PerformedProcedureStep

LONG_QUIET = {"default_seconds": 600, "rules": [], "poll_interval_s": 0.2}


@dataclass
class RunningNode:
    scp: StorageSCP
    scheduler: CompletionScheduler
    db: Database
    images: list[Path]
    study_uid: str

    def associate(self) -> Association:
        ae = AE(ae_title="CT_ROOM1")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.add_requested_context(MPPS_SOP_CLASS)
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2")  # CT Image Storage
        assoc = ae.associate("127.0.0.1", self.scp.port, ae_title="MEDGEMMA")
        assert assoc.is_established
        return assoc

    def jobs(self) -> list[Job]:
        with self.db.session() as session:
            found = list(session.scalars(select(Job)))
            session.expunge_all()
            return found


def start_node(tmp_path: Path, completion: dict[str, object]) -> RunningNode:
    settings = NodeSettings.model_validate(
        {
            "storage": {"data_dir": tmp_path / "data"},
            "dicom": {"bind_address": "127.0.0.1", "port": free_port()},
            "completion": completion,
        }
    )
    (tmp_path / "data").mkdir()
    db = Database(settings.database_url)
    db.upgrade()
    scheduler = CompletionScheduler(db, settings.completion, use_mpps=True)
    scp = StorageSCP(settings, db, b"salt")
    Node._add_mpps(scp, scheduler.wake)
    scp.start()
    scheduler.start()
    images = make_ct_study(tmp_path / "ct", slices=2)
    study_uid = str(pydicom.dcmread(images[0], stop_before_pixels=True).StudyInstanceUID)
    return RunningNode(scp, scheduler, db, images, study_uid)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[RunningNode]:
    running = start_node(tmp_path, LONG_QUIET)
    try:
        yield running
    finally:
        running.scheduler.stop()
        running.scp.stop()
        running.db.dispose()


def in_progress(study_uid: str) -> Dataset:
    ds = Dataset()
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.Modality = "CT"
    step = Dataset()
    step.StudyInstanceUID = study_uid
    ds.ScheduledStepAttributesSequence = [step]
    ds.PerformedSeriesSequence = []
    return ds


def final(status: str, images: list[Path]) -> Dataset:
    ds = Dataset()
    ds.PerformedProcedureStepStatus = status
    series = Dataset()
    references = []
    for path in images:
        header = pydicom.dcmread(path, stop_before_pixels=True)
        series.SeriesInstanceUID = header.SeriesInstanceUID
        reference = Dataset()
        reference.ReferencedSOPClassUID = header.SOPClassUID
        reference.ReferencedSOPInstanceUID = header.SOPInstanceUID
        references.append(reference)
    series.ReferencedImageSequence = references
    ds.PerformedSeriesSequence = [series]
    return ds


def n_create(assoc: Association, uid: str, ds: Dataset) -> int:
    status, _ = assoc.send_n_create(ds, MPPS_SOP_CLASS, uid)
    return int(status.Status)


def n_set(assoc: Association, uid: str, ds: Dataset) -> int:
    status, _ = assoc.send_n_set(ds, MPPS_SOP_CLASS, uid)
    return int(status.Status)


def store(assoc: Association, path: Path) -> int:
    return int(assoc.send_c_store(pydicom.dcmread(path)).Status)


def test_completed_step_completes_the_study_without_its_quiet_period(node: RunningNode) -> None:
    assoc = node.associate()
    step = generate_uid()
    try:
        assert n_create(assoc, step, in_progress(node.study_uid)) == 0
        assert [store(assoc, path) for path in node.images] == [0, 0]
        assert node.jobs() == []  # in progress: the (10 minute) quiet period applies
        assert n_set(assoc, step, final("COMPLETED", node.images)) == 0
        [job] = wait_for(node.jobs, 30, message="MPPS COMPLETED did not complete the study")
    finally:
        assoc.release()
    assert job.status == JobStatus.QUEUED
    with node.db.session() as session:
        version = session.get_one(Job, job.id).study_version
        assert len(version.instances) == 2
        created = session.scalars(
            select(AuditEvent).where(AuditEvent.kind == "study.version_created")
        ).one()
        assert created.detail["completed_by"] == "complete"
        kinds = list(session.scalars(select(AuditEvent.kind).where(AuditEvent.kind.like("mpps%"))))
        assert kinds == ["mpps.created", "mpps.set"]


def test_images_after_the_completed_step_complete_it_with_the_last_one(
    node: RunningNode,
) -> None:
    assoc = node.associate()
    step = generate_uid()
    try:
        assert n_create(assoc, step, in_progress(node.study_uid)) == 0
        assert n_set(assoc, step, final("COMPLETED", node.images)) == 0
        assert store(assoc, node.images[0]) == 0
        # One listed image is missing: the study waits (checked after a scheduler round).
        node.scheduler.tick()
        assert node.jobs() == []
        assert store(assoc, node.images[1]) == 0
        [job] = wait_for(node.jobs, 30, message="the last image did not complete the study")
    finally:
        assoc.release()
    assert job.status == JobStatus.QUEUED


def test_discontinued_step_is_not_processed(tmp_path: Path) -> None:
    node = start_node(tmp_path, {"default_seconds": 0.5, "rules": [], "poll_interval_s": 0.2})
    try:
        assoc = node.associate()
        step = generate_uid()
        try:
            assert n_create(assoc, step, in_progress(node.study_uid)) == 0
            assert store(assoc, node.images[0]) == 0
            assert n_set(assoc, step, final("DISCONTINUED", node.images[:1])) == 0
        finally:
            assoc.release()
        [job] = wait_for(node.jobs, 30, message="the quiet period did not end")
        assert job.status == JobStatus.CANCELLED and "DISCONTINUED" in (job.last_error or "")
    finally:
        node.scheduler.stop()
        node.scp.stop()
        node.db.dispose()


def test_steps_that_cannot_be_applied_get_their_status(node: RunningNode) -> None:
    assoc = node.associate()
    step = generate_uid()
    try:
        assert n_set(assoc, generate_uid(), final("COMPLETED", [])) == 0x0112  # no such step
        wrong = in_progress(node.study_uid)
        wrong.PerformedProcedureStepStatus = "COMPLETED"
        assert n_create(assoc, step, wrong) == 0x0106  # must start IN PROGRESS
        assert n_create(assoc, step, in_progress(node.study_uid)) == 0
        assert n_create(assoc, step, in_progress(node.study_uid)) == 0x0111  # duplicate
        odd = Dataset()
        odd.PerformedProcedureStepStatus = "PAUSED"
        assert n_set(assoc, step, odd) == 0x0106
        assert n_set(assoc, step, final("DISCONTINUED", [])) == 0
        assert n_set(assoc, step, final("COMPLETED", [])) == 0x0110  # final already
        assert assoc.is_established  # the association goes on after each refusal
    finally:
        assoc.release()
    with node.db.session() as session:
        [row] = session.scalars(select(PerformedProcedureStep))
        assert row.status == "DISCONTINUED" and row.study_instance_uid == node.study_uid
    assoc_rows = wait_for(
        lambda: _association_rows(node.db), 20, message="no association audit row"
    )
    assert assoc_rows[0].detail["mpps"] == 7  # N-CREATE and N-SET requests, refused or not


def _association_rows(db: Database) -> list[AuditEvent]:
    with db.session() as session:
        rows = list(
            session.scalars(select(AuditEvent).where(AuditEvent.kind == "dicom.association"))
        )
        session.expunge_all()
        return rows
