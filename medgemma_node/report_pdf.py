"""PDF reports built on the delivery side, the first time a destination needs them.

    pdfs = ReportPdfFiles(settings, db)
    pdfs.ensure_pdf(report_id)                      # <data>/reports/<id>/report.pdf
    pdfs.ensure_encapsulated(report_id, path, uid)  # <data>/reports/<id>/pdf-<uid>.dcm
    sender = PreparingSender(DicomSender(...), pdfs.prepare_dicom)
    sender = PreparingSender(FileSender(...), pdfs.file_preparer(destination))

Off the inference worker's critical path (issue 14, design.md): with the report the worker
writes only the outbox rows and, for DICOM destinations with ``send_pdf``, the report_objects
row of the Encapsulated PDF (its derived SOP Instance UID and its path). The files are made
here from the stored report and the source images — the PDF by delivery.pdf_report, the
Encapsulated PDF by dicom_node.encapsulated_pdf around it — deterministically, written with
storage.files.write_durably and re-used once there. A retry, a second destination or a second
delivery process thus sends the same bytes under the same SOP Instance UID: exactly once.

This module composes two stages (delivery/ and dicom_node/), which do not import each other:
it belongs to the process wiring.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from pydicom import Dataset, dcmread

from config.settings import FileDestination, NodeSettings
from delivery.pdf_fonts import check_pdf_fonts
from delivery.pdf_report import PdfReportRenderer, PdfReportRequest, SupersededReport
from delivery.preparing_sender import PayloadInputMissing
from dicom_node.encapsulated_pdf import build_encapsulated_pdf
from dicom_node.output_common import encode_file
from medgemma_node.outputs import node_identity
from storage.db import Database
from storage.delivery_types import Parcel
from storage.files import report_pdf_relpath, write_durably
from storage.outbox import report_object_files
from storage.reports import StoredReport, stored_report

PDF_OBJECT_KIND = "pdf"


class ReportPdfFiles:
    """Builds a report's PDF and Encapsulated PDF when missing; one per delivery process."""

    def __init__(
        self, settings: NodeSettings, db: Database, renderer: PdfReportRenderer | None = None
    ) -> None:
        self.settings = settings
        self.db = db
        self.data_dir = settings.storage.data_dir
        self.node = node_identity(settings)
        self._renderer = renderer
        # Lanes of several destinations may ask for the same report at once: build it once.
        self._lock = threading.Lock()

    @property
    def renderer(self) -> PdfReportRenderer:
        if self._renderer is None:
            self._renderer = PdfReportRenderer(check_pdf_fonts(self.settings.model.language))
        return self._renderer

    # -- the files ------------------------------------------------------------------------

    def ensure_pdf(self, report_id: int) -> bytes:
        """The report's PDF, built and stored first if it is not there yet."""
        with self._lock:
            return self._pdf(report_id, self._stored(report_id), None)

    def ensure_encapsulated(self, report_id: int, path: Path, sop_instance_uid: str) -> None:
        """The Encapsulated PDF at ``path`` (absolute), built if it is not there yet."""
        with self._lock:
            if path.is_file():
                return
            stored = self._stored(report_id)
            sources = self._sources(stored)
            pdf = self._pdf(report_id, stored, sources)
            dataset = build_encapsulated_pdf(
                stored.document, pdf, sources, node=self.node, sop_instance_uid=sop_instance_uid
            )
            write_durably(path, encode_file(dataset))

    def _pdf(self, report_id: int, stored: StoredReport, sources: list[Dataset] | None) -> bytes:
        path = self.data_dir / report_pdf_relpath(report_id)
        if path.is_file():
            return path.read_bytes()
        request = PdfReportRequest(
            stored.document,
            sources if sources is not None else self._sources(stored),
            institution=self.settings.identity.institution_name,
            supersedes=self._superseded(stored),
            out_of_scope_reason=stored.document.content.out_of_scope_reason,
        )
        pdf = self.renderer.render(request)
        write_durably(path, pdf)
        return pdf

    def _stored(self, report_id: int) -> StoredReport:
        try:
            return stored_report(self.db, report_id)
        except LookupError as exc:
            raise PayloadInputMissing(str(exc)) from exc

    def _sources(self, stored: StoredReport) -> list[Dataset]:
        """The source images with their pixels (the PDF shows them)."""
        try:
            return [dcmread(self.data_dir / path) for path in stored.source_paths]
        except FileNotFoundError as exc:
            raise PayloadInputMissing(f"source image missing: {exc.filename}") from exc

    @staticmethod
    def _superseded(stored: StoredReport) -> SupersededReport | None:
        old = stored.document.supersedes_report_id
        return None if old is None else SupersededReport(old, stored.superseded_at)

    # -- before a send --------------------------------------------------------------------

    def prepare_dicom(self, parcel: Parcel) -> None:
        """A DICOM destination's Encapsulated PDF row: its file, built if missing."""
        item = parcel.item
        if item.object_kind == PDF_OBJECT_KIND and not parcel.path.is_file():
            if item.sop_instance_uid is None:
                raise PayloadInputMissing(f"outbox row {item.id}: the PDF object has no UID")
            self.ensure_encapsulated(item.report_id, parcel.path, item.sop_instance_uid)

    def file_preparer(self, destination: FileDestination) -> Callable[[Parcel], None]:
        """What a file destination's report set needs: the PDF (write_pdf) and the
        Encapsulated PDF among the DICOM copies (copy_dicom)."""

        def prepare(parcel: Parcel) -> None:
            item = parcel.item
            if item.object_kind is not None:  # one object's row
                self.prepare_dicom(parcel)
                return
            if parcel.path.suffix.lower() != ".json":
                return
            if destination.write_pdf:
                self.ensure_pdf(item.report_id)
            if destination.copy_dicom:
                for obj in report_object_files(self.db, item.report_id):
                    if obj.kind == PDF_OBJECT_KIND:
                        path = self.data_dir / obj.path
                        self.ensure_encapsulated(item.report_id, path, obj.sop_instance_uid)

        return prepare
