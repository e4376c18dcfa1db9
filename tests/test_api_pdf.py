"""The PDF report through the REST API: GET /api/studies/{uid}/reports/{id}?format=pdf.

A copy of the real chest radiograph RG1_UNCI is received and reported by the inference worker
(scripted answer, one boxed nodule), then asked for as PDF through a real uvicorn server with
the node's PDF builder (medgemma_node.report_pdf, as `serve` wires it); poppler's pdftotext
reads the answer back.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from medgemma_node.report_pdf import ReportPdfFiles
from medgemma_node.service import SharedReportPdfs
from storage.db import Database
from storage.files import report_pdf_relpath
from storage.models import Report, UserRole
from tests.api_support import RunningApi, running_api
from tests.test_pdf_delivery import Reported, reported

PATIENT_NAME = "Oberkampf^Wendeline"
SCOPE_REASON = "body part HAND: the model was validated on chest radiographs only"


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'node.db'}")
    database.upgrade()
    yield database
    database.dispose()


@pytest.fixture
def report(tmp_path: Path, sqlite_db: Database, rg1_unci: Path) -> Reported:
    found = reported(tmp_path, sqlite_db, rg1_unci, [])
    found.settings.api = found.settings.api.model_copy(update={"host": "127.0.0.1", "port": 0})
    return found


@pytest.fixture
def api(report: Reported, sqlite_db: Database) -> Iterator[RunningApi]:
    pdfs = SharedReportPdfs(report.settings, sqlite_db)  # as `serve` wires it
    with running_api(report.settings, report_pdf=pdfs.ensure_pdf) as running:
        yield running


def pdftotext(data: bytes, tmp_path: Path) -> str:
    path = tmp_path / "answer.pdf"
    path.write_bytes(data)
    result = subprocess.run(
        ["pdftotext", "-raw", str(path), "-"], capture_output=True, timeout=60, check=True
    )
    return " ".join(result.stdout.decode("utf-8").split())


def pdf_path(report: Reported) -> str:
    return f"/api/studies/{report.study_uid}/reports/{report.report_id}"


def test_the_pdf_report_over_http(api: RunningApi, report: Reported, tmp_path: Path) -> None:
    with api.client(UserRole.VIEWER) as client:
        response = client.get(pdf_path(report), params={"format": "pdf"})
        again = client.get(pdf_path(report), params={"format": "pdf"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/pdf"
    name = f"{report.study_uid}_{report.report_id}_report.pdf"
    assert response.headers["content-disposition"] == f'attachment; filename="{name}"'
    assert response.content.startswith(b"%PDF-")
    text = pdftotext(response.content, tmp_path)
    assert "AI-assisted analysis: preliminary, must be reviewed by a licensed physician" in text
    assert "Solitary right upper lobe nodule." in text
    assert "TEST MODEL" in text and "Outside the validated scope" not in text
    # Built once, stored where the destinations take it from, and served again as it is.
    assert (report.data_dir / report_pdf_relpath(report.report_id)).read_bytes() == (
        response.content
    )
    assert again.content == response.content


def test_the_pdf_says_why_the_study_is_outside_the_validated_scope(
    api: RunningApi, report: Reported, sqlite_db: Database, tmp_path: Path
) -> None:
    with sqlite_db.session() as session:
        row = session.get_one(Report, report.report_id)
        scope = {"in_scope": False, "reason": SCOPE_REASON}
        row.content_json = {**row.content_json, "scope": scope}
    with api.client(UserRole.VIEWER) as client:
        response = client.get(pdf_path(report), params={"format": "pdf"})
    assert response.status_code == 200, response.text
    assert f"Outside the validated scope: {SCOPE_REASON}" in pdftotext(response.content, tmp_path)


def test_a_chinese_report_says_it_in_chinese(
    report: Reported, sqlite_db: Database, tmp_path: Path
) -> None:
    with sqlite_db.session() as session:
        row = session.get_one(Report, report.report_id)
        scope = {"in_scope": False, "reason": "检查部位为手部，模型仅在胸片上验证"}
        row.content_json = {**row.content_json, "language": "zh", "scope": scope}
    pdf = ReportPdfFiles(report.settings, sqlite_db).ensure_pdf(report.report_id)
    text = pdftotext(pdf, tmp_path)
    assert "AI辅助分析 结论仅供参考，须由执业医师复核确认" in text
    assert "超出已验证的适用范围: 检查部位为手部，模型仅在胸片上验证" in text


def test_unknown_study_or_report_and_lost_images_are_404(
    api: RunningApi, report: Reported, sqlite_db: Database
) -> None:
    with sqlite_db.session() as session:
        other_report = session.scalar(select(Report.id).where(Report.id != report.report_id))
    assert other_report is None  # one report: any other id is unknown
    with api.client(UserRole.VIEWER) as client:
        pdf = {"format": "pdf"}
        unknown_study = client.get(f"/api/studies/1.2.3.4/reports/{report.report_id}", params=pdf)
        unknown_report = client.get(
            f"/api/studies/{report.study_uid}/reports/{report.report_id + 1}", params=pdf
        )
        anonymous = client.get(pdf_path(report), params=pdf, headers={"Authorization": ""})
        for image in (report.data_dir / "instances").rglob("*.dcm"):
            image.unlink()  # the images the PDF shows are gone, and no PDF was built
        lost = client.get(pdf_path(report), params=pdf)
        still_json = client.get(pdf_path(report))
    assert unknown_study.status_code == 404 and "no study" in unknown_study.json()["detail"]
    assert unknown_report.status_code == 404 and "no report" in unknown_report.json()["detail"]
    assert anonymous.status_code == 401
    assert lost.status_code == 404 and "source image missing" in lost.json()["detail"]
    assert still_json.status_code == 200


def test_without_a_pdf_builder_the_api_says_so(report: Reported) -> None:
    with running_api(report.settings) as api, api.client(UserRole.VIEWER) as client:
        response = client.get(pdf_path(report), params={"format": "pdf"})
    assert response.status_code == 503 and "PDF" in response.json()["detail"]


def test_the_openapi_document_offers_pdf_as_the_console_reads_it(api: RunningApi) -> None:
    with api.client() as client:
        document = client.get("/api/openapi.json").json()
    operation = document["paths"]["/api/studies/{study_uid}/reports/{report_id}"]["get"]
    [format_parameter] = [p for p in operation["parameters"] if p["name"] == "format"]
    assert "pdf" in format_parameter["schema"]["enum"]
    assert "application/pdf" in operation["responses"]["200"]["content"]
