"""PDF reports through the node: planned with the report, built on the first send, sent once.

A copy of RG1_UNCI is received and reported by the inference worker (scripted answer, one
boxed nodule); the delivery worker built by the process wiring (medgemma_node.service) then
sends to a real Orthanc (send_pdf) and a file destination (write_pdf, copy_dicom).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import typer
from sqlalchemy import select, update

from config.settings import DicomDestination, FileDestination, NodeSettings
from delivery import pdf_fonts
from dicom_node.encapsulated_pdf import ENCAPSULATED_PDF_STORAGE
from inference.scripted_engine import ScriptedEngine
from inference.worker import InferenceWorker
from medgemma_node.cli import pdf_fonts_or_exit
from medgemma_node.outputs import ReportOutputs
from medgemma_node.service import delivery_worker
from peers.orthanc import OrthancServer
from storage.db import Database
from storage.files import report_pdf_relpath, uid_component
from storage.ingest import close_quiet_studies
from storage.models import OutboxItem, OutboxStatus, Report, ReportObject, utcnow
from tests.test_worker import CHEST_ANSWER, ingest_copy, make_settings


@dataclass(frozen=True)
class Reported:
    settings: NodeSettings
    study_uid: str
    report_id: int

    @property
    def data_dir(self) -> Path:
        return self.settings.storage.data_dir

    @property
    def pdf_path(self) -> Path:
        return self.data_dir / report_pdf_relpath(self.report_id)


def reported(tmp_path: Path, db: Database, rg1_unci: Path, destinations: list[object]) -> Reported:
    settings = make_settings(tmp_path, db.url)
    settings.destinations = destinations  # type: ignore[assignment]
    study_uid = ingest_copy(db, settings.storage.data_dir, rg1_unci, tmp_path / "in")
    close_quiet_studies(db, lambda _modality, _ae: 0.0)
    engine = ScriptedEngine(responder=lambda _request: CHEST_ANSWER)
    worker = InferenceWorker(db, settings, lambda: engine, ReportOutputs(settings))
    assert worker.run_once() == 1, "the study is reported"
    with db.session() as session:
        report_id = session.scalars(select(Report.id)).one()
    return Reported(settings, study_uid, report_id)


def pacs(orthanc: OrthancServer) -> DicomDestination:
    return DicomDestination(
        kind="dicom", name="pacs", ae_title=orthanc.aet, host="127.0.0.1",
        port=orthanc.dicom_port, send_pdf=True,
    )  # fmt: skip


def files(directory: Path, **options: bool) -> FileDestination:
    return FileDestination(kind="file", name="files", directory=directory, **options)


def statuses(db: Database) -> dict[str, int]:
    with db.session() as session:
        rows = session.scalars(select(OutboxItem.status)).all()
    return {status: rows.count(status) for status in set(rows)}


def pending_again(db: Database) -> None:
    """Every row due again, as after a crash between sending and marking SENT."""
    with db.session() as session:
        session.execute(
            update(OutboxItem).values(
                status=OutboxStatus.PENDING, next_attempt_at=utcnow(), sent_at=None
            )
        )


def orthanc_pdfs(orthanc: OrthancServer) -> list[pydicom.Dataset]:
    found = []
    for orthanc_id in orthanc.instance_ids():
        if orthanc.instance_tags(orthanc_id)["SOPClassUID"] == ENCAPSULATED_PDF_STORAGE:
            response = orthanc._http.get(f"/instances/{orthanc_id}/file")
            response.raise_for_status()
            found.append(pydicom.dcmread(io.BytesIO(response.content)))
    return found


def document(dataset: pydicom.Dataset) -> bytes:
    """The Encapsulated Document without its pad byte (PS3.5 7.1)."""
    return bytes(dataset.EncapsulatedDocument[: int(dataset.EncapsulatedDocumentLength)])


@pytest.fixture
def orthanc(tmp_path: Path) -> object:
    with OrthancServer(tmp_path / "orthanc") as server:
        yield server


def test_pdf_is_planned_with_the_report_built_on_first_send_and_sent_once(
    tmp_path: Path, db: Database, rg1_unci: Path, orthanc: OrthancServer
) -> None:
    out = tmp_path / "out"
    report = reported(tmp_path, db, rg1_unci, [pacs(orthanc), files(out, write_pdf=True)])
    with db.session() as session:
        (pdf_object,) = session.scalars(select(ReportObject).where(ReportObject.kind == "pdf"))
        pdf_uid, object_path = pdf_object.sop_instance_uid, report.data_dir / pdf_object.path
    # Off the inference worker's path: only the rows exist, no file yet.
    assert not object_path.exists() and not report.pdf_path.exists()

    deliveries = delivery_worker(report.settings, db)
    deliveries.deliver_once()
    assert statuses(db) == {OutboxStatus.SENT: 4}  # SR, GSPS, PDF to PACS; the file set
    pdf = report.pdf_path.read_bytes()
    (stored,) = orthanc_pdfs(orthanc)
    assert stored.SOPInstanceUID == pdf_uid
    assert stored.StudyInstanceUID == report.study_uid
    assert document(stored) == pdf  # the document PACS holds is the PDF file
    stem = f"{uid_component(report.study_uid)}_{report.report_id}"
    assert (out / f"{stem}_report.pdf").read_bytes() == pdf
    assert (out / f"{stem}_pdf_{pdf_uid}.dcm").read_bytes() == object_path.read_bytes()

    # A retry re-sends the same object: same UID, nothing rebuilt, still one PDF in PACS.
    built_at = report.pdf_path.stat().st_mtime_ns, object_path.stat().st_mtime_ns
    pending_again(db)
    deliveries.deliver_once()
    assert statuses(db) == {OutboxStatus.SENT: 4}
    assert [ds.SOPInstanceUID for ds in orthanc_pdfs(orthanc)] == [pdf_uid]
    assert (report.pdf_path.stat().st_mtime_ns, object_path.stat().st_mtime_ns) == built_at

    # Built again from the stored report (files lost): the very same bytes.
    dicom_bytes = object_path.read_bytes()
    report.pdf_path.unlink()
    object_path.unlink()
    pending_again(db)
    delivery_worker(report.settings, db).deliver_once()
    assert report.pdf_path.read_bytes() == pdf
    assert object_path.read_bytes() == dicom_bytes
    assert len(orthanc_pdfs(orthanc)) == 1


def test_destinations_without_pdf_get_none(tmp_path: Path, db: Database, rg1_unci: Path) -> None:
    out = tmp_path / "out"
    report = reported(tmp_path, db, rg1_unci, [files(out, write_pdf=False)])
    with db.session() as session:
        assert session.scalars(select(ReportObject.kind)).all() == ["sr", "gsps"]
    delivery_worker(report.settings, db).deliver_once()
    assert statuses(db) == {OutboxStatus.SENT: 1}
    assert not list(out.glob("*.pdf")) and not report.pdf_path.exists()


def test_a_pdf_that_cannot_be_built_stays_local(
    tmp_path: Path, db: Database, rg1_unci: Path
) -> None:
    out = tmp_path / "out"
    report = reported(tmp_path, db, rg1_unci, [files(out, write_pdf=True)])
    for image in (report.data_dir / "instances").rglob("*.dcm"):
        image.unlink()  # the source is gone: the PDF can never be built
    delivery_worker(report.settings, db).deliver_once()
    with db.session() as session:
        (row,) = session.scalars(select(OutboxItem)).all()
        assert row.status == OutboxStatus.DEAD
        assert "source image missing" in (row.last_error or "")


def test_serve_refuses_to_start_without_the_font_of_its_language(
    tmp_path: Path,
    db: Database,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = make_settings(tmp_path, db.url, language="zh")
    settings.destinations = [files(tmp_path / "out", write_pdf=True)]
    pdf_fonts_or_exit(settings)  # installed here: no error
    missing = tuple(
        pdf_fonts.FontFile(font.family, tmp_path / font.path.name, font.package)
        for font in pdf_fonts.CJK_CANDIDATES
    )
    monkeypatch.setattr(pdf_fonts, "CJK_CANDIDATES", missing)
    with pytest.raises(typer.Exit) as stopped:
        pdf_fonts_or_exit(settings)
    assert stopped.value.exit_code == 2
    assert "fonts-wqy-microhei" in capsys.readouterr().err
