"""Priors from PACS (issue 17) against a real Orthanc: C-FIND, C-GET and C-MOVE, the model
request (prior image first), the SR's evidence, the ORU and JSON, failures and patient safety.

Orthanc holds prior CRs; the node's own SCP (a real StorageSCP on a free port) receives the
images of a C-MOVE, Orthanc knowing it as a modality. The current study is stored the way the
SCP stores it. The scripted engine is the test double for MedGemma: it records each request
(images and question) and answers with a comparison JSON.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from config.settings import NodeSettings
from dicom_node.priors import PacsPriorFinder
from dicom_node.scp import StorageSCP
from inference.demo_model import write_demo_model
from inference.engine import GenerationRequest, GenerationResult
from inference.parsing import parse_report
from inference.preprocess import prepare_study
from inference.prompts import PromptLibrary
from inference.scripted_engine import ScriptedEngine
from inference.transformers_engine import TransformersEngine
from inference.worker import InferenceWorker
from medgemma_node.outputs import REPORT_JSON, ReportOutputs
from peers.dicom_files import copy_with_new_uids
from peers.net import free_port
from peers.orthanc import OrthancServer
from storage.db import Database
from storage.ingest import close_quiet_studies
from storage.models import Job, PriorInstance, PriorLink, Report, ReportObject, Study
from storage.report_schema import Change, PriorComparison
from tests.dicom_output_support import assert_valid, validators_installed
from tests.test_worker import ingest_file, make_settings

NODE_AET = "MEDGEMMA"
PATIENT = "PRI-0001"
CURRENT_DATE = "20261020"
PRIOR_DATE = "20251021"  # a year earlier
COMPARISON_ANSWER = json.dumps(
    {
        "findings": [
            {
                "label": "nodule",
                "location": "right upper lobe",
                "size_mm": 14,
                "change": "larger",
                "box_2d": [200, 150, 300, 260],
                "image_index": 1,
            },
            {
                "label": "consolidation",
                "location": "left lower zone",
                "change": "new",
                "box_2d": [600, 600, 800, 850],
                "image_index": 1,
            },
            {"label": "pleural effusion", "location": "left", "change": "resolved"},
        ],
        "comparison": "Compared with 2025-10-21: the nodule has grown, the effusion resolved.",
        "impression": "Growing right upper lobe nodule.",
        "recommendation": "CT chest.",
        "urgency": "urgent",
    }
)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'node.db'}")
    database.upgrade()
    yield database
    database.dispose()


@pytest.fixture
def node_port() -> int:
    return free_port()


@pytest.fixture
def orthanc(tmp_path: Path, node_port: int) -> Iterator[OrthancServer]:
    config = {
        # The node as a known modality: the C-MOVE destination, and allowed to query.
        "DicomModalities": {"node": [NODE_AET, "127.0.0.1", node_port]},
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowGet": True,
        "DicomAlwaysAllowMove": True,
    }
    with OrthancServer(tmp_path / "orthanc", extra_config=config) as server:
        yield server


def settings_for(
    tmp_path: Path, db: Database, pacs: OrthancServer, node_port: int, **priors: object
) -> NodeSettings:
    settings = make_settings(tmp_path, db.url)
    settings.dicom = settings.dicom.model_copy(
        update={"ae_title": NODE_AET, "bind_address": "127.0.0.1", "port": node_port}
    )
    values = {
        "enabled": True,
        "ae_title": pacs.aet,
        "host": "127.0.0.1",
        "port": pacs.dicom_port,
        "total_timeout_s": 20.0,
        **priors,
    }
    settings.priors = settings.priors.model_copy(update=values)
    settings.destinations = NodeSettings.model_validate(
        {"destinations": [{"name": "files", "kind": "file", "directory": str(tmp_path / "out")}]}
    ).destinations
    settings.destinations[0].write_hl7 = True
    return settings


def chest_cr(rg1: Path, work: Path, patient_id: str, study_date: str, **more: object) -> Path:
    return copy_with_new_uids(
        rg1,
        work / f"{pydicom.uid.generate_uid()}.dcm",
        PatientID=patient_id,
        PatientName="DOE^JOHN",
        StudyDate=study_date,
        **more,
    )


def queue_current(db: Database, settings: NodeSettings, rg1: Path, work: Path) -> Path:
    current = chest_cr(rg1, work, PATIENT, CURRENT_DATE)
    ingest_file(db, settings.storage.data_dir, current)
    close_quiet_studies(db, lambda _modality, _ae: 0.0)
    return current


def run_worker(
    db: Database, settings: NodeSettings, answer: str = COMPARISON_ANSWER
) -> tuple[ScriptedEngine, PacsPriorFinder]:
    engine = ScriptedEngine(responder=lambda _request: answer)
    finder = PacsPriorFinder(settings, db)
    worker = InferenceWorker(
        db, settings, lambda: engine, ReportOutputs(settings), prior_finder=finder
    )
    assert worker.run_once() == 1
    return engine, finder


def stored(db: Database) -> tuple[Report, PriorComparison, Path]:
    with db.session() as session:
        report = session.scalars(select(Report)).one()
        link = session.scalars(select(PriorLink)).one()
        sr = session.scalars(select(ReportObject).where(ReportObject.kind == "sr")).one()
        session.expunge(report)
        return report, PriorComparison.model_validate(link.detail), Path(sr.path)


def pixels(image: object) -> bytes:
    return image.tobytes()  # type: ignore[attr-defined]


@pytest.mark.parametrize("mode", ["get", "move"])
def test_prior_found_fetched_and_shown_first_and_cited(
    tmp_path: Path, db: Database, orthanc: OrthancServer, node_port: int, rg1_unci: Path, mode: str
) -> None:
    prior_file = chest_cr(rg1_unci, tmp_path / "pacs", PATIENT, PRIOR_DATE)
    orthanc.upload(prior_file)
    prior = pydicom.dcmread(prior_file, stop_before_pixels=True)
    settings = settings_for(tmp_path, db, orthanc, node_port, mode=mode)
    scp = StorageSCP(settings, db, b"salt")
    scp.start()
    try:
        current_file = queue_current(db, settings, rg1_unci, tmp_path / "modality")
        engine, finder = run_worker(db, settings)
    finally:
        scp.stop()
    report, comparison, sr_path = stored(db)
    assert comparison.compared and comparison.source == mode
    assert comparison.study_instance_uid == prior.StudyInstanceUID
    assert comparison.study_date == PRIOR_DATE
    assert comparison.sop_instance_uids == [prior.SOPInstanceUID]
    # The prior went to the prior store and started no job of its own.
    with db.session() as session:
        assert session.scalars(select(PriorInstance.sop_instance_uid)).all() == [
            prior.SOPInstanceUID
        ]
        assert session.scalars(select(Study.study_instance_uid)).all() == [
            pydicom.dcmread(current_file, stop_before_pixels=True).StudyInstanceUID
        ]
        assert len(session.scalars(select(Job)).all()) == 1
    # The model request: the prior image, then the current one; the comparison question.
    [[request]] = engine.calls
    assert len(request.images) == 2
    data_dir = settings.storage.data_dir
    with db.session() as session:
        prior_path = session.scalars(select(PriorInstance.path)).one()
    assert pixels(request.images[0]) == pixels(prepare_study([data_dir / prior_path]).images[0])
    assert pixels(request.images[1]) == pixels(prepare_study([current_file]).images[0])
    assert "2025-10-21" in request.prompt and "PRIOR" in request.prompt
    # Findings carry the change; the box on the current image (index 1) is on image 0 now.
    nodule, _consolidation, effusion = report.content_json["findings"]
    assert nodule["change"] == "larger" and nodule["image_index"] == 0 and nodule["region"]
    assert effusion["change"] == "resolved"
    assert finder.state["compared"] == 1 and finder.state["last_error"] is None
    check_outputs(data_dir, report, sr_path, prior)


def check_outputs(data_dir: Path, report: Report, sr_path: Path, prior: pydicom.Dataset) -> None:
    sr = pydicom.dcmread(data_dir / sr_path)
    [current_evidence] = sr.CurrentRequestedProcedureEvidenceSequence
    [other_evidence] = sr.PertinentOtherEvidenceSequence
    assert current_evidence.StudyInstanceUID == sr.StudyInstanceUID
    assert other_evidence.StudyInstanceUID == prior.StudyInstanceUID
    cited = other_evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert cited.ReferencedSOPInstanceUID == prior.SOPInstanceUID
    texts = [item.get("TextValue", "") for item in _walk(sr)]
    assert any("Compared with the prior study of 2025-10-21" in t for t in texts)
    assert any(t == "larger" for t in texts)
    if validators_installed():
        assert_valid(data_dir / sr_path)
    reports_dir = data_dir / "reports" / str(report.id)
    payload = json.loads((reports_dir / REPORT_JSON).read_text())
    assert payload["report"]["prior"]["study_instance_uid"] == prior.StudyInstanceUID
    assert payload["report"]["content"]["findings"][0]["change"] == "larger"
    oru = (reports_dir / "oru-files.hl7").read_text()
    assert "Compared with the prior study of 2025-10-21" in oru
    assert "[larger since prior]" in oru


def _walk(dataset: pydicom.Dataset) -> Iterator[pydicom.Dataset]:
    for item in dataset.get("ContentSequence", []):
        yield item
        yield from _walk(item)


def test_prior_already_held_is_used_without_retrieving(
    tmp_path: Path, db: Database, orthanc: OrthancServer, node_port: int, rg1_unci: Path
) -> None:
    """A prior the node received itself earlier (a study it reported last year)."""
    prior_file = chest_cr(rg1_unci, tmp_path / "pacs", PATIENT, PRIOR_DATE)
    orthanc.upload(prior_file)
    settings = settings_for(tmp_path, db, orthanc, node_port, mode="get")
    ingest_file(db, settings.storage.data_dir, prior_file)  # received, its job done long ago
    queue_current(db, settings, rg1_unci, tmp_path / "modality")
    with db.session() as session:
        for job in session.scalars(select(Job)).all()[:-1]:
            job.status = "done"
    run_worker(db, settings)
    _report, comparison, _sr = stored(db)
    assert comparison.compared and comparison.source == "stored"
    with db.session() as session:
        assert session.scalars(select(PriorInstance)).all() == []


def test_same_name_different_patient_ids_never_mix(
    tmp_path: Path, db: Database, orthanc: OrthancServer, node_port: int, rg1_unci: Path
) -> None:
    ours = chest_cr(rg1_unci, tmp_path / "pacs", PATIENT, PRIOR_DATE)
    # Same name, another Patient ID, a more recent study: must never be chosen.
    theirs = chest_cr(rg1_unci, tmp_path / "pacs", "PRI-0002", "20260901")
    for path in (ours, theirs):
        orthanc.upload(path)
    settings = settings_for(tmp_path, db, orthanc, node_port, mode="get")
    queue_current(db, settings, rg1_unci, tmp_path / "modality")
    run_worker(db, settings)
    _report, comparison, _sr = stored(db)
    ours_uid = pydicom.dcmread(ours, stop_before_pixels=True).StudyInstanceUID
    assert comparison.study_instance_uid == ours_uid
    with db.session() as session:
        patients = {
            pydicom.dcmread(settings.storage.data_dir / p, stop_before_pixels=True).PatientID
            for p in session.scalars(select(PriorInstance.path))
        }
    assert patients == {PATIENT}


def test_no_prior_within_max_age_says_so(
    tmp_path: Path, db: Database, orthanc: OrthancServer, node_port: int, rg1_unci: Path
) -> None:
    orthanc.upload(chest_cr(rg1_unci, tmp_path / "pacs", PATIENT, "20201020"))
    settings = settings_for(tmp_path, db, orthanc, node_port, max_age_days=365)
    queue_current(db, settings, rg1_unci, tmp_path / "modality")
    engine, finder = run_worker(db, settings)
    _report, comparison, _sr = stored(db)
    assert not comparison.compared and "within 365 days" in comparison.reason
    assert len(engine.calls[0][0].images) == 1 and "PRIOR" not in engine.calls[0][0].prompt
    assert finder.state["last_error"] is None  # no prior is not an error


def test_pacs_down_report_without_prior_within_the_limit(
    tmp_path: Path, db: Database, orthanc: OrthancServer, node_port: int, rg1_unci: Path
) -> None:
    settings = settings_for(tmp_path, db, orthanc, node_port, total_timeout_s=5.0)
    orthanc.stop()
    queue_current(db, settings, rg1_unci, tmp_path / "modality")
    engine, finder = run_worker(db, settings)
    _report, comparison, sr_path = stored(db)
    assert not comparison.compared and "cannot connect" in comparison.reason
    assert comparison.seconds <= settings.priors.total_timeout_s
    assert len(engine.calls[0][0].images) == 1
    assert finder.state["last_error"] == comparison.reason
    sr = pydicom.dcmread(settings.storage.data_dir / sr_path)
    assert "PertinentOtherEvidenceSequence" not in sr
    texts = [item.get("TextValue", "") for item in _walk(sr)]
    assert any(t.startswith("No prior study compared:") and "cannot connect" in t for t in texts)


def test_pacs_slow_report_without_prior_within_the_limit(
    tmp_path: Path, db: Database, orthanc: OrthancServer, node_port: int, rg1_unci: Path
) -> None:
    """Orthanc paused (SIGSTOP): the TCP connection opens, nothing answers. The total limit
    (2 s) is shorter than each association timeout, so only it can end the wait."""
    settings = settings_for(
        tmp_path, db, orthanc, node_port, total_timeout_s=2.0, connect_timeout_s=30.0
    )
    queue_current(db, settings, rg1_unci, tmp_path / "modality")
    pid = orthanc.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        _engine, finder = run_worker(db, settings)
    finally:
        os.kill(pid, signal.SIGCONT)
    _report, comparison, _sr = stored(db)
    assert not comparison.compared
    assert "did not answer within priors.total_timeout_s (2 s)" in comparison.reason
    # Bounded by the finder's join(total_timeout_s), measured by the finder itself.
    assert comparison.seconds < settings.priors.total_timeout_s + 1.0
    assert finder.state["last_error"] == comparison.reason


def test_tiny_test_model_reads_prior_then_current_in_one_turn(
    tmp_path: Path, db: Database, orthanc: OrthancServer, node_port: int, rg1_unci: Path
) -> None:
    """The real load and generate path (tiny random Gemma 3) with the two-image request."""
    orthanc.upload(chest_cr(rg1_unci, tmp_path / "pacs", PATIENT, PRIOR_DATE))
    settings = settings_for(tmp_path, db, orthanc, node_port, mode="get")
    queue_current(db, settings, rg1_unci, tmp_path / "modality")
    write_demo_model(tmp_path / "demo")
    engine = TransformersEngine(settings.model, weights_dir=tmp_path / "demo")
    seen: list[int] = []
    generate = engine.generate

    def recording(requests: list[GenerationRequest]) -> list[GenerationResult]:
        seen.extend(len(request.images) for request in requests)
        return generate(requests)

    engine.generate = recording  # type: ignore[method-assign]
    finder = PacsPriorFinder(settings, db)
    worker = InferenceWorker(
        db, settings, lambda: engine, ReportOutputs(settings), prior_finder=finder
    )
    assert worker.run_once() == 1
    _report, comparison, _sr = stored(db)
    assert comparison.compared and seen == [2]
    with db.session() as session:
        report = session.scalars(select(Report)).one()
    assert report.is_test_model and report.timings_json["new_tokens"] > 0


def test_comparison_template_and_change_words() -> None:
    library = PromptLibrary.load()
    chest = library.select("CR", "CHEST", "", "zh", comparison=True)
    assert chest.template_name == "chest_xray_comparison" and "{prior_date}" in chest.text
    assert library.select("MR", "", "", "en", comparison=True).template_name == (
        "comparison_default"
    )
    assert library.select("CR", "CHEST").template_name == "chest_xray"
    answer = json.dumps({"findings": [{"label": "结节", "change": "增大"}], "comparison": "x"})
    content = parse_report(answer, "zh").content
    assert content.findings[0].change is Change.LARGER and content.comparison == "x"
