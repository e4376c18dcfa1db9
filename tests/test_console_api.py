"""The console's server side against a real uvicorn on a free port: the page and its files
(offline, strict policy, complete translations), its settings, instance geometry,
/api/status, the change stream, and what is audited. The last test opens the page in
headless Chromium to see the default language come from [model] language."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from sqlalchemy import func, select

from api.routers.console import CONSOLE_DIR
from api.schemas import StudyStatus
from config.settings import NodeSettings
from peers.dicom_files import copy_with_new_uids, testdata
from storage.db import Database
from storage.ingest import ReceivedInstance, record_instance
from storage.models import AuditEvent, JobStatus, OutboxItem, OutboxStatus, UserRole
from tests.api_support import RunningApi, add_report, complete, receive, running_api

SVG_NAMESPACE = "http://www.w3.org/2000/svg"  # an XML name, never fetched
CHROMIUM = Path("/usr/bin/chromium")


def settings_for(data_dir: Path, language: str = "en", **extra: Any) -> NodeSettings:
    return NodeSettings.model_validate(
        {
            "storage": {"data_dir": data_dir},
            "dicom": {"port": 1},
            "api": {"host": "127.0.0.1", "port": 0},
            "model": {"language": language},
            **extra,
        }
    )


def console_files() -> list[Path]:
    return sorted(path for path in CONSOLE_DIR.rglob("*") if path.is_file())


# --------------------------------------------------------------------------- page and files


def test_page_and_files_are_served_from_the_node_with_a_strict_policy(tmp_path: Path) -> None:
    with running_api(settings_for(tmp_path / "data")) as api, api.client() as anonymous:
        page = anonymous.get("/")
        assert page.status_code == 200
        policy = page.headers["content-security-policy"]
        for directive in ("default-src 'self'", "script-src 'self'", "connect-src 'self'"):
            assert directive in policy
        assert '<script type="module" src="/console/js/main.js">' in page.text
        for path in console_files():
            relative = path.relative_to(CONSOLE_DIR).as_posix()
            served = anonymous.get(f"/console/{relative}")
            assert served.status_code == 200, relative
            assert served.content == path.read_bytes()
        assert anonymous.get("/console/js/no-such.js").status_code == 404


def test_console_files_name_no_other_host_and_import_only_their_own_modules() -> None:
    for path in console_files():
        if path.suffix not in (".html", ".js", ".css", ".svg"):
            continue
        text = path.read_text(encoding="utf-8")
        urls = set(re.findall(r"https?://[^\s\"'<>)]+", text)) - {SVG_NAMESPACE}
        assert urls == set(), path.name
        assert "@import" not in text and "url(http" not in text
        for module in re.findall(r'from "\./([\w-]+\.js)"', text):
            assert (path.parent / module).is_file(), (path.name, module)


def translations() -> dict[str, dict[str, str]]:
    source = (CONSOLE_DIR / "js" / "i18n.js").read_text(encoding="utf-8")
    blocks = re.search(r"  en: \{\n(.*?)\n  \},\n  zh: \{\n(.*?)\n  \},\n\};", source, re.S)
    assert blocks is not None
    entry = re.compile(r'^    "([\w.]+)": "(.*)",$')
    parsed = {}
    for language, block in zip(("en", "zh"), blocks.groups(), strict=True):
        lines = block.splitlines()
        matches = [entry.match(line) for line in lines]
        assert all(matches), [line for line, m in zip(lines, matches, strict=True) if not m]
        parsed[language] = {m.group(1): m.group(2) for m in matches if m}
    return parsed


def test_every_label_exists_in_english_and_chinese() -> None:
    strings = translations()
    assert set(strings["en"]) == set(strings["zh"])
    assert all(strings["zh"].values()) and all(strings["en"].values())
    prefixes = {key.split(".")[0] for key in strings["en"]}
    used = set()
    for path in (CONSOLE_DIR / "js").glob("*.js"):
        for key in re.findall(r'"([a-z]+\.[A-Za-z_.]+)"', path.read_text(encoding="utf-8")):
            if key.split(".")[0] in prefixes and not key.endswith(".js"):
                used.add(key)
    assert used - set(strings["en"]) == set()
    # Keys made from values the API sends: every study status, job status and urgency.
    for status in StudyStatus:
        assert f"status.{status.value}" in strings["en"]
    for job_status in [*JobStatus, "skipped"]:
        assert f"st.job.{job_status}" in strings["en"]
    for urgency in ("routine", "urgent", "critical"):
        assert f"urgency.{urgency}" in strings["en"]
    for role in UserRole:
        assert f"role.{role.value}" in strings["en"]


# --------------------------------------------------------------------------- config, audit


def test_console_config_needs_no_token_and_names_the_default_language(tmp_path: Path) -> None:
    with running_api(settings_for(tmp_path / "data", "zh")) as api, api.client() as anonymous:
        config = anonymous.get("/console/config.json")
    assert config.status_code == 200
    assert config.json()["language"] == "zh" and config.json()["languages"] == ["en", "zh"]


def audit_count(db: Database) -> int:
    with db.session() as session:
        return int(session.scalar(select(func.count()).select_from(AuditEvent)) or 0)


def test_console_files_are_not_audited_but_its_api_calls_are(tmp_path: Path) -> None:
    with running_api(settings_for(tmp_path / "data")) as api:
        before = audit_count(api.db)
        with api.client() as anonymous:
            for path in ("/", "/console/js/main.js", "/console/config.json"):
                assert anonymous.get(path).status_code == 200
        assert audit_count(api.db) == before
        with api.client(UserRole.VIEWER) as viewer:
            assert viewer.get("/api/status").status_code == 200
        assert audit_count(api.db) == before + 1


# --------------------------------------------------------------------------- geometry


def store_real_instance(db: Database, data_dir: Path, name: str, **attributes: object) -> Any:
    """RG1_UNCI as a new study, written where the SCP would and recorded as it records."""
    relpath = f"instances/{name}.dcm"
    copy = copy_with_new_uids(testdata("RG1_UNCI.dcm"), data_dir / relpath, **attributes)
    ds = pydicom.dcmread(copy, stop_before_pixels=True)
    record_instance(
        db,
        ReceivedInstance(
            study_uid=ds.StudyInstanceUID,
            series_uid=ds.SeriesInstanceUID,
            sop_uid=ds.SOPInstanceUID,
            sop_class_uid=ds.SOPClassUID,
            transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
            relpath=relpath,
            size_bytes=copy.stat().st_size,
            calling_ae="MOD",
            modality="CR",
            body_part="CHEST",
            instance_number=1,
            patient_hash="0" * 12,
        ),
    )
    return ds


def test_geometry_gives_spacing_and_the_place_in_the_models_square(tmp_path: Path) -> None:
    settings = settings_for(tmp_path / "data")
    data_dir = settings.storage.data_dir
    with running_api(settings) as api:
        spaced = store_real_instance(api.db, data_dir, "spaced", ImagerPixelSpacing=[0.2, 0.1])
        plain = store_real_instance(api.db, data_dir, "plain")  # Pixel Spacing 0\0: none
        with api.client(UserRole.VIEWER) as viewer:
            url = "/api/studies/{}/instances/{}/geometry"
            with_spacing = viewer.get(url.format(spaced.StudyInstanceUID, spaced.SOPInstanceUID))
            without = viewer.get(url.format(plain.StudyInstanceUID, plain.SOPInstanceUID))
            crossed = viewer.get(url.format(plain.StudyInstanceUID, spaced.SOPInstanceUID))
        with api.client() as anonymous:
            refused = anonymous.get(url.format(spaced.StudyInstanceUID, spaced.SOPInstanceUID))
    assert with_spacing.json() == {
        "sop_instance_uid": spaced.SOPInstanceUID,
        "rows": 1955,
        "columns": 1841,
        "frames": 1,
        "pixel_spacing_mm": [0.2, 0.1],
        "spacing_source": "ImagerPixelSpacing",
        "model_view": {"size": 896, "side": 1955, "row_offset": 0, "column_offset": 57},
    }
    assert without.json()["pixel_spacing_mm"] is None
    assert without.json()["spacing_source"] is None
    assert crossed.status_code == 404  # an instance of another study
    assert refused.status_code == 401


# --------------------------------------------------------------------------- status


def test_status_shows_queue_destinations_and_disk_without_secrets(tmp_path: Path) -> None:
    destinations = [
        {"name": "files", "kind": "file", "directory": str(tmp_path / "out")},
        {"name": "ris", "kind": "http", "url": "https://user:s3cret@ris.example:8443/in?key=k9"},
    ]
    settings = settings_for(tmp_path / "data", destinations=destinations)
    with running_api(settings) as api:
        complete(api.db, receive(api.db, "1.2.3.1"))  # a queued job
        report_id = add_report(api.db, complete(api.db, receive(api.db, "1.2.3.2")), [])
        with api.db.session() as session:
            for status, error in ((OutboxStatus.SENT, None), (OutboxStatus.DEAD, "HTTP 503")):
                session.add(
                    OutboxItem(
                        report_id=report_id,
                        destination="ris",
                        kind="http",
                        message_id=f"m-{status}",
                        payload_path="x",
                        status=status,
                        last_error=error,
                    )
                )
        with api.client(UserRole.VIEWER) as viewer:
            status = viewer.get("/api/status").json()
    assert status["queue"]["jobs"] == {"queued": 1, "done": 1}
    assert status["studies"] == 2 and status["instances"] == 2
    by_name = {d["name"]: d for d in status["destinations"]}
    assert by_name["ris"]["target"] == "https://ris.example:8443/in"
    assert "s3cret" not in str(status) and "k9" not in str(status)
    assert by_name["ris"]["counts"] == {"sent": 1, "dead": 1}
    assert by_name["ris"]["last_error"] == "HTTP 503"
    assert by_name["files"]["counts"] == {} and by_name["files"]["last_error"] is None
    assert status["disk"]["total_mb"] >= status["disk"]["free_mb"] > 0
    assert status["model"]["loaded"] is False and status["serving"] is False


# --------------------------------------------------------------------------- change stream


def next_change(lines: Any, deadline: float) -> str:
    event = None
    for line in lines:
        if time.monotonic() > deadline:
            break
        if line.startswith("event: "):
            event = line.removeprefix("event: ")
        elif line.startswith("data: ") and event == "change":
            return str(line.removeprefix("data: "))
    raise AssertionError("no change event in time")


def test_change_stream_announces_a_new_study(tmp_path: Path) -> None:
    with running_api(settings_for(tmp_path / "data")) as api:
        headers = {"Authorization": f"Bearer {api.tokens[UserRole.VIEWER]}"}
        timeout = httpx.Timeout(30, read=20)
        with httpx.Client(base_url=api.url, timeout=timeout) as client:
            assert client.get("/api/events").status_code == 401
            with client.stream("GET", "/api/events", headers=headers) as stream:
                assert stream.headers["content-type"].startswith("text/event-stream")
                lines = stream.iter_lines()
                first = next_change(lines, time.monotonic() + 20)
                receive(api.db, "1.2.3.9")
                second = next_change(lines, time.monotonic() + 20)
    assert first != second


# --------------------------------------------------------------------------- in a browser


@pytest.mark.browser
def test_sign_in_page_speaks_the_nodes_default_language(tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.is_file():
        pytest.fail("Debian's chromium is needed (apt-get install chromium)")
    api: RunningApi
    with running_api(settings_for(tmp_path / "data", "zh")) as api, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page(locale="en-GB")  # the browser's own language does not win
            page.goto(f"{api.url}/")
            page.wait_for_selector("#token")
            heading = page.inner_text("#sign-in h1")
            lang = page.evaluate("document.documentElement.lang")
            page.fill("#token", api.tokens[UserRole.VIEWER])
            page.click("#sign-in button[type=submit]")
            page.wait_for_selector("#worklist tr.empty")
            empty = page.inner_text("#worklist tr.empty")
        finally:
            browser.close()
    assert heading == "登录" and lang == "zh-CN"
    assert empty.startswith("尚无检查")
