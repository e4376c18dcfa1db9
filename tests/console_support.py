"""The console's browser tests' node, browser and helpers (tests/test_console.py).

A running `medgemma-node serve` with the scripted engine and the API on a free port; the
sample study is the real chest radiograph RG1_UNCI (1841 x 1955, MONOCHROME1) sent by DCMTK
storescu, with Imager Pixel Spacing 0.15 mm added so sizes in mm can be shown. Its scripted
report has two boxed findings (A1, A2) and one without a box; the two follow-up answers carry
one box each. A DICOM destination that nobody listens to keeps its deliveries pending with an
error, for the status page. Every request goes to the node's real routes, conversations too.

The browser (Debian's headless Chromium through Playwright, never a downloaded one) may reach
only the node: any other request is aborted and fails the test. Screenshots go to
test-artifacts/console/ (ignored by git) for a person to look at.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import pydicom
import pytest

from peers.dcmtk import dcmtk_storescu
from peers.dicom_files import copy_with_new_uids, testdata
from peers.net import free_port, wait_for
from peers.node_process import REPO, NodeProcess
from storage.db import Database
from storage.models import UserRole
from storage.users import create_user

CHROMIUM = Path("/usr/bin/chromium")  # Debian's; browsers are never downloaded
ARTIFACTS = REPO / "test-artifacts" / "console"
VIEWPORT = {"width": 1440, "height": 900}
PATIENT_NAME = "Oberkampf^Wendeline"
PATIENT_ID = "PID-CONSOLE-4471"
SPACING_MM = 0.15
# RG1_UNCI in the model's padded square (inference.preprocess.SquareGeometry): 1955 rows x
# 1841 columns, padded to 1955 with (1955 - 1841) // 2 = 57 columns on the left.
RG1_ROWS, RG1_COLUMNS = 1955, 1841
SIDE, COLUMN_OFFSET, ROW_OFFSET = 1955, 57, 0
TOLERANCE_PX = 1.5

REPORT_ANSWER = {
    "findings": [
        {
            "label": "nodule",
            "location": "right upper lobe",
            "size_mm": 14,
            "density": "solid",
            "boundary": "spiculated",
            "box_2d": [210, 180, 330, 300],
        },
        {
            "label": "pleural effusion",
            "location": "left costophrenic angle",
            "box_2d": [640, 620, 800, 860],
        },
        {"label": "cardiomegaly", "location": "heart"},
    ],
    "impression": "Right upper lobe nodule with spiculated margins; small left effusion.",
    "recommendation": "CT chest with contrast.",
    "urgency": "urgent",
}
# The follow-up answer when the node answers questions itself (MedGemma 1.5's box format).
TURN_ANSWER = (
    "Spiculated margins. The right hilum is marked.\n"
    '```json\n[{"box_2d": [400, 380, 520, 500], "label": "right hilum"}]\n```'
)
# The second, asked about the region the first one marked.
TURN_ANSWER_2 = (
    "No calcification in it; a rib crossing is marked.\n"
    '```json\n[{"box_2d": [560, 300, 640, 380], "label": "rib crossing"}]\n```'
)
QUESTION = "Are the margins of this nodule spiculated?"
QUESTION_2 = "Is it calcified?"


@dataclass
class ConsoleNode:
    node: NodeProcess
    tokens: dict[str, str]
    work: Path
    sample: pydicom.Dataset | None = None

    @property
    def url(self) -> str:
        return self.node.api_url.removesuffix("/api")

    def client(self, role: str | None = "admin", base: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.tokens[role]}"} if role else {}
        return httpx.Client(base_url=base or self.url, headers=headers, timeout=60)

    def send_sample(self) -> pydicom.Dataset:
        """C-STORE the sample study once (the first test that needs it sends it)."""
        if self.sample is None:
            copy = copy_with_new_uids(
                testdata("RG1_UNCI.dcm"),
                self.work / "send" / "rg1.dcm",
                PatientName=PATIENT_NAME,
                PatientID=PATIENT_ID,
                ImagerPixelSpacing=[SPACING_MM, SPACING_MM],
            )
            result = dcmtk_storescu(self.node.port, [copy], "-xs", aet="MODALITY1")
            assert result.returncode == 0, result.stderr
            self.sample = pydicom.dcmread(copy, stop_before_pixels=True)
        return self.sample

    def reported_sample(self) -> pydicom.Dataset:
        sample = self.send_sample()
        wait_for(
            lambda: self.study(sample.StudyInstanceUID).get("latest_report_id"),
            120,
            message=f"the sample study got no report:\n{self.node.log_text()[-3000:]}",
        )
        return sample

    def study(self, study_uid: str) -> dict[str, Any]:
        with self.client() as client:
            response = client.get(f"/api/studies/{study_uid}")
        return response.json() if response.status_code == 200 else {}

    def latest_report(self, study_uid: str) -> dict[str, Any]:
        report_id = self.study(study_uid)["latest_report_id"]
        with self.client() as client:
            return dict(client.get(f"/api/studies/{study_uid}/reports/{report_id}").json())


@pytest.fixture(scope="module", name="console")
def console_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleNode]:
    if not CHROMIUM.is_file():
        pytest.fail("Debian's chromium is needed (apt-get install chromium)")
    work = tmp_path_factory.mktemp("console")
    answers = work / "answers.json"
    scripted = [json.dumps(REPORT_ANSWER), TURN_ANSWER, TURN_ANSWER_2]
    answers.write_text(json.dumps(scripted), encoding="utf-8")
    sections = {
        "completion": {"default_seconds": 0.5, "poll_interval_s": 0.1, "rules": []},
        "model": {
            "engine": "scripted",
            "scripted_responses_file": str(answers),
            "batch_wait_ms": 0,
            "language": "en",
        },
        "destinations": [
            {"name": "files", "kind": "file", "directory": str(work / "results")},
            {
                "name": "pacs",
                "kind": "dicom",
                "ae_title": "PACS",
                "host": "127.0.0.1",
                "port": free_port(),  # nobody listens: deliveries stay pending, with an error
                "retry": {"initial_backoff_s": 600, "max_backoff_s": 600},
            },
        ],
        "api": {"enabled": True, "port": free_port()},
    }
    node = NodeProcess(work / "node", sections).start()
    try:
        db = Database(node.database_url)
        try:
            tokens = {role.value: create_user(db, f"dr-{role.value}", role) for role in UserRole}
        finally:
            db.dispose()
        console = ConsoleNode(node, tokens, work)
        wait_for(lambda: _answers(console.url), 60, message="the API did not answer")
        yield console
    finally:
        node.terminate()


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/api/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module", name="browser")
def browser_fixture() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
        )
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(name="page")
def page_fixture(browser: Any, console: ConsoleNode) -> Iterator[Any]:
    """A fresh browser tab that may reach only the node."""
    context = browser.new_context(viewport=VIEWPORT, locale="en-GB")
    tab = context.new_page()
    node = urlparse(console.url).netloc
    elsewhere: list[str] = []
    errors: list[str] = []

    def guard(route: Any) -> None:
        url = urlparse(route.request.url)
        if url.netloc != node:
            elsewhere.append(route.request.url)
            route.abort()
        else:
            route.continue_()

    tab.route("**/*", guard)
    tab.on("pageerror", lambda error: errors.append(str(error)))
    try:
        yield tab
    finally:
        context.close()
    assert elsewhere == [], "the console tried to reach another host"
    assert errors == [], "the console raised errors"


def shot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path


def sign_in(page: Any, console: ConsoleNode, role: str) -> None:
    page.goto(f"{console.url}/")
    page.fill("#token", console.tokens[role])
    page.click("#sign-in button[type=submit]")
    page.wait_for_selector("#nav:not([hidden])")


def open_sample(page: Any, console: ConsoleNode, role: str = "radiologist") -> pydicom.Dataset:
    sample = console.reported_sample()
    sign_in(page, console, role)
    page.click(f"tr.study-row[data-uid='{sample.StudyInstanceUID}']")
    page.wait_for_selector("#overlay g.box")
    page.wait_for_selector("#findings")
    return sample


# --------------------------------------------------------------------------- overlay geometry


def expected_screen_box(image_rect: dict[str, float], box: list[float], mode: str) -> list[float]:
    """Where a source-pixel box must appear, from the image element's displayed geometry."""
    if mode == "model":  # the padded square, resized to the displayed size
        scale_x = scale_y = image_rect["width"] / SIDE
        offset_x, offset_y = COLUMN_OFFSET, ROW_OFFSET
    else:
        scale_x, scale_y = image_rect["width"] / RG1_COLUMNS, image_rect["height"] / RG1_ROWS
        offset_x = offset_y = 0
    x0, y0, x1, y1 = box
    return [
        image_rect["x"] + (x0 + offset_x) * scale_x,
        image_rect["y"] + (y0 + offset_y) * scale_y,
        image_rect["x"] + (x1 + offset_x) * scale_x,
        image_rect["y"] + (y1 + offset_y) * scale_y,
    ]


def drawn_boxes(page: Any) -> dict[str, list[float]]:
    rects = page.eval_on_selector_all(
        "#overlay rect.box-rect",
        "els => els.map(e => { const r = e.getBoundingClientRect();"
        " return [e.dataset.anchor, [r.left, r.top, r.right, r.bottom]]; })",
    )
    return {anchor: box for anchor, box in rects}


def image_rect(page: Any) -> dict[str, float]:
    rect: dict[str, float] = page.eval_on_selector(
        "#study-image",
        "e => { const r = e.getBoundingClientRect();"
        " return {x: r.left, y: r.top, width: r.width, height: r.height}; }",
    )
    return rect


def report_boxes(report: dict[str, Any]) -> dict[str, list[float]]:
    boxes, number = {}, 0
    for finding in report["content"]["findings"]:
        region = finding.get("region")
        if region:
            number += 1
            boxes[f"A{number}"] = [region["x0"], region["y0"], region["x1"], region["y1"]]
    return boxes


def assert_boxes_on_report(page: Any, report: dict[str, Any], mode: str) -> None:
    wanted = report_boxes(report)
    drawn = drawn_boxes(page)
    assert set(drawn) == set(wanted)
    rect = image_rect(page)
    for anchor, box in wanted.items():
        expected = expected_screen_box(rect, box, mode)
        difference = max(abs(a - b) for a, b in zip(drawn[anchor], expected, strict=True))
        assert difference <= TOLERANCE_PX, (anchor, mode, drawn[anchor], expected)


def zoom_text(page: Any) -> str:
    return str(page.inner_text("#zoom-text"))


def api_serves_pdf(base_url: str) -> bool:
    document = httpx.get(f"{base_url}/api/openapi.json", timeout=30).json()
    operation = document["paths"]["/api/studies/{study_uid}/reports/{report_id}"]["get"]
    [format_parameter] = [p for p in operation["parameters"] if p["name"] == "format"]
    return "pdf" in json.dumps(format_parameter["schema"])
