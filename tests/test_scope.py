"""Studies outside the validated scope (issue 12): the shipped question is for chest
radiographs, so an extremity radiograph (pydicom-data's RG3_UNCI.dcm) is flagged in every
output, or skipped with the reason, by ``[scope] out_of_scope``."""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import hl7
import pydicom
import pytest
from pydicom.data import get_testdata_file
from sqlalchemy import select

from config.settings import FileDestination, NodeSettings, ScopeSettings
from dicom_node import finding_codes as fc
from inference.prompts import PromptLibrary, PromptTemplateError
from inference.scope import ScopeRule, StudyHeader, decide_scope
from medgemma_node.outputs import REPORT_JSON
from medgemma_node.status import database_status
from storage.db import Database
from storage.models import Job, JobStatus, Report, ReportObject
from storage.report_schema import OUT_OF_SCOPE_NOTICE
from tests.dicom_output_support import dciodvfy, pixelmed_sr, validators_installed
from tests.test_field_outputs import report_once, site
from tests.test_worker import ingest_file

CHEST_RULES = PromptLibrary.load().scope_rules


def bundled(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.fail(f"{name} is not bundled; install pydicom-data")
    return Path(str(path))


def header(name: str, **attributes: str) -> StudyHeader:
    dataset = pydicom.dcmread(bundled(name), stop_before_pixels=True)
    for keyword, value in attributes.items():
        setattr(dataset, keyword, value)
    return StudyHeader.of(dataset)


def test_the_shipped_chest_template_declares_its_scope() -> None:
    (rule,) = CHEST_RULES
    assert rule.name == "chest radiograph" and rule.modalities == {"CR", "DX"}


def test_an_extremity_radiograph_is_outside_and_says_why() -> None:
    scope = decide_scope(header("RG3_UNCI.dcm"), CHEST_RULES)
    assert not scope.in_scope
    assert scope.reason == (
        "not a chest radiograph: Body Part Examined EXTREMITY and no description names the region"
    )


@pytest.mark.parametrize(
    ("attributes", "in_scope", "reason"),
    [
        ({}, True, ""),  # RG1_UNCI: CR, CHEST, PA
        ({"Modality": "CT"}, False, "Modality CT is not CR/DX"),
        ({"BodyPartExamined": "", "StudyDescription": "胸部正位"}, True, ""),
        ({"BodyPartExamined": "", "StudyDescription": "CHEST PA+LAT"}, True, ""),
        ({"BodyPartExamined": "SKULL", "StudyDescription": "Skull AP"}, False, "SKULL"),
        ({"ViewPosition": "LLO"}, False, "View Position LLO is not a validated view"),
    ],
)
def test_the_rule_reads_modality_body_part_descriptions_and_view(
    attributes: dict[str, str], in_scope: bool, reason: str
) -> None:
    scope = decide_scope(header("RG1_UNCI.dcm", **attributes), CHEST_RULES)
    assert scope.in_scope is in_scope
    assert reason in scope.reason


def test_without_declared_scopes_every_study_is_inside() -> None:
    assert decide_scope(header("RG3_UNCI.dcm"), []).in_scope
    everything = ScopeRule("anything", frozenset(), frozenset(), (), frozenset())
    assert decide_scope(header("RG3_UNCI.dcm"), [everything]).in_scope


def test_a_site_template_with_a_bad_scope_key_is_refused(tmp_path: Path) -> None:
    (tmp_path / "hand.toml").write_text('en = "Q"\n[scope]\nmodalities = ["CR"]\n')
    with pytest.raises(PromptTemplateError, match=r"hand\.toml: scope\.modalities"):
        PromptLibrary.load(tmp_path)


def _scope_site(tmp_path: Path, out_of_scope: str) -> tuple[NodeSettings, Database]:
    settings, db = site(tmp_path)
    settings.scope = ScopeSettings(out_of_scope=out_of_scope)  # type: ignore[arg-type]
    settings.destinations = [
        FileDestination(kind="file", name="drop", directory=tmp_path / "drop", write_hl7=True)
    ]
    ingest_file(db, settings.storage.data_dir, bundled("RG3_UNCI.dcm"))
    return settings, db


def test_flag_reports_with_the_generic_question_and_every_output_says_so(
    tmp_path: Path,
) -> None:
    settings, db = _scope_site(tmp_path, "flag")
    report_once(db, settings)
    data_dir = settings.storage.data_dir
    with db.session() as session:
        report = session.scalars(select(Report)).one()
        sr_path = session.scalars(select(ReportObject.path).where(ReportObject.kind == "sr")).one()
        gsps_paths = session.scalars(
            select(ReportObject.path).where(ReportObject.kind == "gsps")
        ).all()
        report_id, question = report.id, report.question
    reason = decide_scope(header("RG3_UNCI.dcm"), CHEST_RULES).reason
    notice = f"{OUT_OF_SCOPE_NOTICE}: {reason}"

    assert question == PromptLibrary.load().select("CR", "EXTREMITY").text  # the generic one
    assert "chest radiograph" not in question
    payload = json.loads((data_dir / "reports" / str(report_id) / REPORT_JSON).read_text())
    assert payload["scope"] == {"in_scope": False, "reason": reason}
    assert notice in payload["notice"]
    oru = (data_dir / "reports" / str(report_id) / "oru-drop.hl7").read_bytes().decode()
    notes = [str(nte[3]) for nte in hl7.parse(oru).segments("NTE")]
    assert notice in notes
    sr = pydicom.dcmread(data_dir / sr_path)
    found = hd.sr.utils.find_content_items(sr, name=fc.OUT_OF_SCOPE, recursive=True)
    assert [item.TextValue for item in found] == [notice]
    assert gsps_paths  # the answer has a box
    for path in gsps_paths:  # the notice drawn on the image
        texts = [t.UnformattedTextValue for a in pydicom.dcmread(data_dir / path)
                 .GraphicAnnotationSequence for t in a.get("TextObjectSequence", [])]  # fmt: skip
        assert any(notice in text for text in texts)
    if validators_installed():
        for path in (sr_path, *gsps_paths):
            assert dciodvfy(data_dir / path).errors == []
        assert pixelmed_sr(data_dir / sr_path).errors == []
    db.dispose()


def test_skip_makes_no_report_and_the_job_says_why(tmp_path: Path) -> None:
    settings, db = _scope_site(tmp_path, "skip")
    report_once(db, settings)  # the worker takes the job, and skips it
    with db.session() as session:
        job = session.scalars(select(Job)).one()
        reports = session.scalars(select(Report)).all()
    assert (job.status, reports) == (JobStatus.SKIPPED, [])
    assert job.last_error is not None and "not a chest radiograph" in job.last_error
    assert database_status(settings)["jobs"] == {"skipped": 1}
    db.dispose()
