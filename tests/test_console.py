"""The web console in a real browser (Debian's headless Chromium through Playwright), against a
running `medgemma-node serve` with the scripted engine.

The sample study is the real chest radiograph RG1_UNCI (1841 x 1955, MONOCHROME1) sent by
DCMTK storescu, with Imager Pixel Spacing 0.15 mm added so sizes in mm can be shown. Its
scripted report has two boxed findings (A1, A2) and one without a box. A DICOM destination
that nobody listens to keeps its deliveries pending with an error, for the status page.

Conversations: when the node's OpenAPI document has the conversation endpoints, the tests use
them (the scripted engine's second answer carries a box). Until then the browser's requests to
those four routes only are forwarded to tests/conversation_double.py, a scripted TEST DOUBLE
that asks the node who the user is and which anchors the report has.

The browser may reach only the node (and the double): any other request is aborted and fails
the test. Screenshots go to test-artifacts/console/ (ignored by git) for a person to look at.
"""

from __future__ import annotations

import json
import re
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
from tests.conversation_double import (
    SCRIPTED_ANSWER,
    SCRIPTED_REPORT_ID,
    ConversationDouble,
    RunningDouble,
)

pytestmark = [pytest.mark.slow, pytest.mark.browser]

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
QUESTION = "Are the margins of this nodule spiculated?"


@dataclass
class ConsoleNode:
    node: NodeProcess
    tokens: dict[str, str]
    work: Path
    double: RunningDouble | None = None
    sample: pydicom.Dataset | None = None

    @property
    def url(self) -> str:
        return self.node.api_url.removesuffix("/api")

    def client(self, role: str | None = "admin", base: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.tokens[role]}"} if role else {}
        return httpx.Client(base_url=base or self.url, headers=headers, timeout=60)

    @property
    def conversation_base(self) -> str:
        """Where the conversation endpoints are served: the node, or the test double."""
        return self.double.url if self.double else self.url

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


def has_conversation_routes(base_url: str) -> bool:
    paths = httpx.get(f"{base_url}/api/openapi.json", timeout=30).json()["paths"]
    return any(re.fullmatch(r"/api/conversations/\{[^}]+\}/messages", path) for path in paths)


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleNode]:
    if not CHROMIUM.is_file():
        pytest.fail("Debian's chromium is needed (apt-get install chromium)")
    work = tmp_path_factory.mktemp("console")
    answers = work / "answers.json"
    answers.write_text(json.dumps([json.dumps(REPORT_ANSWER), TURN_ANSWER]), encoding="utf-8")
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
        if has_conversation_routes(console.url):
            yield console
            return
        with RunningDouble(ConversationDouble(node.api_url)) as double:
            console.double = double
            yield console
    finally:
        node.terminate()


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/api/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
        )
        try:
            yield launched
        finally:
            launched.close()


CONVERSATION_ROUTE = re.compile(r"^/api/(studies/[^/]+/conversations|conversations(/.*)?)$")


@pytest.fixture
def page(browser: Any, console: ConsoleNode) -> Iterator[Any]:
    """A fresh browser tab that may reach only the node (conversations: see the module doc)."""
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
        elif console.double is not None and CONVERSATION_ROUTE.match(url.path):
            forwarded = route.fetch(url=f"{console.double.url}{url.path}")
            route.fulfill(response=forwarded)
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


# --------------------------------------------------------------------------- sign-in


def test_console_page_is_offline_and_refuses_a_bad_token(page: Any, console: ConsoleNode) -> None:
    served = httpx.get(f"{console.url}/", timeout=30)
    assert served.status_code == 200 and served.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in served.headers["content-security-policy"]
    page.goto(f"{console.url}/")
    page.fill("#token", "mgn_not-a-token")
    page.click("#sign-in button[type=submit]")
    page.wait_for_selector("#sign-in-error:has-text('not valid')")
    shot(page, "01-sign-in-refused")
    page.fill("#token", console.tokens["radiologist"])
    page.click("#sign-in button[type=submit]")
    page.wait_for_selector("#nav:not([hidden])")
    assert page.inner_text("#user") == "dr-radiologist · Radiologist"
    assert page.evaluate("sessionStorage.getItem('mgn.token')") == console.tokens["radiologist"]
    page.click("#sign-out")
    page.wait_for_selector("#token")
    assert page.evaluate("sessionStorage.getItem('mgn.token')") is None


# --------------------------------------------------------------------------- worklist


def test_sample_study_appears_live_in_the_worklist(page: Any, console: ConsoleNode) -> None:
    sign_in(page, console, "radiologist")
    page.wait_for_selector("#live.on")  # the change stream is open
    sample = console.send_sample()  # sent after the page was loaded: it must appear by itself
    row = f"tr.study-row[data-uid='{sample.StudyInstanceUID}']"
    page.wait_for_selector(row, timeout=60_000)
    # Reported, its deliveries pending (the PACS is down), with the report's urgency.
    page.wait_for_selector(f"{row}[data-status='reported']", timeout=120_000)
    page.wait_for_selector(f"{row} .flag[data-urgency='urgent']", timeout=30_000)
    cells = page.inner_text(row)
    assert "Oberkampf, Wendeline" in cells and PATIENT_ID in cells
    assert "CR" in cells and "CHEST" in cells
    shot(page, "02-worklist")

    page.select_option("#wl-status", "failed")
    page.wait_for_selector("#worklist tr.empty")
    page.select_option("#wl-status", "reported")
    page.wait_for_selector(row)
    page.fill("#wl-search", "no-such-text-anywhere")
    page.wait_for_selector("#worklist tr.empty")
    page.click("text=Clear filters")
    page.wait_for_selector(row)


def test_patient_names_only_after_sign_in(console: ConsoleNode) -> None:
    console.send_sample()
    page_html = httpx.get(f"{console.url}/", timeout=30).text
    assert "Oberkampf" not in page_html
    with console.client(role=None) as anonymous:
        assert anonymous.get("/api/studies").status_code == 401


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


def test_overlay_boxes_sit_on_the_report_boxes_at_every_zoom(
    page: Any, console: ConsoleNode
) -> None:
    sample = open_sample(page, console)
    report = console.latest_report(sample.StudyInstanceUID)
    assert len(report_boxes(report)) == 2
    page.wait_for_selector("#canvas[data-mode='model']")
    fitted = zoom_text(page)
    assert_boxes_on_report(page, report, "model")
    shot(page, "03-study-model-view")

    # Zoom in twice around the centre, then by the wheel at a point, then pan.
    page.click("#zoom-in")
    page.click("#zoom-in")
    stage = page.locator("#stage").bounding_box()
    page.mouse.move(stage["x"] + stage["width"] * 0.3, stage["y"] + stage["height"] * 0.3)
    page.mouse.wheel(0, -300)
    page.mouse.down()
    page.mouse.move(stage["x"] + stage["width"] * 0.5, stage["y"] + stage["height"] * 0.45)
    page.mouse.up()
    assert zoom_text(page) != fitted
    assert_boxes_on_report(page, report, "model")
    shot(page, "04-study-model-view-zoomed")

    page.click("[data-mode='full']")
    page.wait_for_selector("#canvas[data-mode='full']")
    assert page.eval_on_selector("#study-image", "e => [e.naturalWidth, e.naturalHeight]") == [
        RG1_COLUMNS,
        RG1_ROWS,
    ]
    assert_boxes_on_report(page, report, "full")
    for _ in range(4):
        page.click("#zoom-in")
    assert_boxes_on_report(page, report, "full")
    shot(page, "05-study-full-size-zoomed")

    page.uncheck("#boxes-toggle")
    assert page.is_hidden("#overlay")
    page.check("#boxes-toggle")
    page.select_option("#window-preset", "lung")
    assert "display-window" in page.eval_on_selector("#study-image", "e => e.style.filter")


def test_report_panel_shows_findings_sizes_notice_and_downloads(
    page: Any, console: ConsoleNode
) -> None:
    sample = open_sample(page, console)
    report = console.latest_report(sample.StudyInstanceUID)
    notice = page.inner_text("#ai-notice")
    assert "preliminary" in notice and "physician" in notice
    assert page.is_visible("#test-model")  # the scripted engine is a test model
    assert report["content"]["impression"] in page.inner_text("#impression")
    rows = page.eval_on_selector_all(
        "#findings tbody tr", "rows => rows.map(r => [...r.cells].map(c => c.innerText))"
    )
    assert [row[1] for row in rows] == ["nodule", "pleural effusion", "cardiomegaly"]
    assert rows[0][0] == "A1" and rows[0][2] == "right upper lobe"
    assert rows[0][4:] == ["solid", "spiculated"]
    # The box size measured with Imager Pixel Spacing (0.15 mm), as the node's SR does.
    a1 = report_boxes(report)["A1"]
    width_mm, height_mm = (a1[2] - a1[0]) * SPACING_MM, (a1[3] - a1[1]) * SPACING_MM
    assert f"box {width_mm:.1f}×{height_mm:.1f} mm" in rows[0][3]
    assert "model 14 mm" in rows[0][3]
    assert "Imager Pixel Spacing" in page.inner_text("#image-spacing")
    assert "scripted-engine" in page.inner_text("#model-identity")

    page.click("#findings tr[data-anchor='A2']")
    assert page.get_attribute("#overlay g.box[data-anchor='A2']", "class").endswith("highlight")

    with page.expect_download() as sr_download:
        page.click("#download-sr")
    sr_path = console.work / "downloaded-sr.dcm"
    sr_download.value.save_as(sr_path)
    sr = pydicom.dcmread(sr_path)
    assert sr.SOPClassUID.startswith("1.2.840.10008.5.1.4.1.1.88.")
    assert sr.StudyInstanceUID == sample.StudyInstanceUID
    with page.expect_download() as json_download:
        page.click("#download-json")
    json_path = console.work / "downloaded.json"
    json_download.value.save_as(json_path)
    assert json.loads(json_path.read_text())["id"] == report["id"]
    assert api_serves_pdf(console.url)  # ?format=pdf in its OpenAPI: the PDF button is shown
    with page.expect_download() as pdf_download:
        page.click("#download-pdf")
    assert Path(pdf_download.value.path()).read_bytes().startswith(b"%PDF-")


def api_serves_pdf(base_url: str) -> bool:
    document = httpx.get(f"{base_url}/api/openapi.json", timeout=30).json()
    operation = document["paths"]["/api/studies/{study_uid}/reports/{report_id}"]["get"]
    [format_parameter] = [p for p in operation["parameters"] if p["name"] == "format"]
    return "pdf" in json.dumps(format_parameter["schema"])


# --------------------------------------------------------------------------- conversation


def test_ask_about_a_region_see_the_anchored_answer_and_append(
    page: Any, console: ConsoleNode
) -> None:
    sample = open_sample(page, console, "radiologist")
    page.click("#tab-ask")
    page.click("#anchor-chips .chip[data-anchor='A1']")
    assert page.inner_text("#about .chip") == "About A1"
    page.fill("#question", QUESTION)
    with page.expect_response(lambda r: r.url.endswith("/messages")) as answered:
        page.click("#ask")
    answer = answered.value.json()
    assert answered.value.request.post_data_json == {"question": QUESTION, "anchor_id": "A1"}
    page.wait_for_selector("#transcript .answer-text")
    shown = page.inner_text("#transcript .answer-text")
    assert shown == answer["answer"]
    if console.double is not None:
        assert shown == SCRIPTED_ANSWER
    else:
        assert shown.startswith("Spiculated margins")
    new_ids = answer.get("new_anchor_ids") or [answer["anchors"][-1]["id"]]
    new_id = new_ids[0]
    chip = f"#transcript .answer-anchors .chip[data-anchor='{new_id}']"
    assert "hilum" in page.inner_text(chip)
    assert page.inner_text("#transcript .bubble-question .chip") == "about A1"
    # The new region is drawn, highlighted, where the answer says.
    page.click(chip)
    group = f"#overlay g.box[data-anchor='{new_id}']"
    assert "highlight" in page.get_attribute(group, "class")
    new_box = next(a["box"] for a in answer["anchors"] if a["id"] == new_id)
    drawn = drawn_boxes(page)[new_id]
    expected = expected_screen_box(image_rect(page), new_box, "model")
    assert max(abs(a - b) for a, b in zip(drawn, expected, strict=True)) <= TOLERANCE_PX
    shot(page, "06-conversation")

    page.click("#append")
    page.click("#append-confirm")
    page.wait_for_selector("#chat-state:has-text('part of the report')")
    toast = page.inner_text("#toast")
    if console.double is not None:
        assert toast == f"Appended as report #{SCRIPTED_REPORT_ID}."
        assert [c["call"] for c in console.double.double.calls][-3:] == ["start", "ask", "append"]
    else:  # the node made a new report version that supersedes the first
        page.wait_for_selector("#versions li", timeout=30_000)
        assert len(console.study(sample.StudyInstanceUID)["reports"]) == 2


def test_a_viewer_cannot_ask(page: Any, console: ConsoleNode) -> None:
    sample = open_sample(page, console, "viewer")
    page.click("#tab-ask")
    page.wait_for_selector("#viewer-note")
    assert page.locator("#question").count() == 0
    assert page.locator("#ask").count() == 0 and page.locator("#append").count() == 0
    assert page.locator("#anchor-chips .chip").count() == 2  # regions are still shown
    shot(page, "07-viewer-cannot-ask")
    with console.client("viewer", base=console.conversation_base) as viewer:
        refused = viewer.post(f"/api/studies/{sample.StudyInstanceUID}/conversations", json={})
    assert refused.status_code == 403
    page.goto(f"{console.url}/#/study/1.2.826.0.1.3680043.8.498.1")
    page.wait_for_selector("text=This study is not on the node.")


# --------------------------------------------------------------------------- languages


def test_switching_to_chinese_relabels_everything_and_is_remembered(
    page: Any, console: ConsoleNode
) -> None:
    sample = console.reported_sample()
    sign_in(page, console, "radiologist")
    row = f"tr.study-row[data-uid='{sample.StudyInstanceUID}']"
    page.wait_for_selector(row)
    page.click("[data-lang='zh']")
    assert page.inner_text("[data-nav='worklist']") == "工作列表"
    assert page.evaluate("document.documentElement.lang") == "zh-CN"
    headers = page.eval_on_selector_all("#worklist th", "ths => ths.map(t => t.innerText)")
    assert headers[:3] == ["优先级", "状态", "患者"]
    assert page.inner_text(f"{row} .badge.status") == "已出报告"
    assert page.inner_text(f"{row} .flag") == "紧急"
    shot(page, "08-worklist-zh")

    page.click(row)
    page.wait_for_selector("#findings")
    assert page.inner_text("#tab-report") == "报告" and page.inner_text("#tab-ask") == "提问"
    assert "须由医师审核" in page.inner_text("#ai-notice")
    assert page.inner_text("[data-mode='model']") == "模型视图"
    shot(page, "09-study-zh")

    page.reload()  # the choice survives a reload; the token too (same tab)
    page.wait_for_selector("#findings")
    assert page.inner_text("#tab-report") == "报告"
    untranslated = page.evaluate(
        "[...document.querySelectorAll('[data-i18n]')]"
        ".filter(e => e.textContent === e.dataset.i18n).map(e => e.dataset.i18n)"
    )
    assert untranslated == []
    page.click("[data-lang='en']")
    assert page.inner_text("#tab-report") == "Report"
    assert page.locator("#findings tbody tr").count() == 3  # relabelled, not re-rendered


# --------------------------------------------------------------------------- status


def test_status_page_shows_queue_model_destinations_and_disk(
    page: Any, console: ConsoleNode
) -> None:
    console.reported_sample()
    sign_in(page, console, "admin")
    page.click("[data-nav='status']")
    page.wait_for_selector("#destinations")
    assert "Loaded" in page.inner_text("#status-model")
    assert "answers C-ECHO" in page.inner_text("#status-node")
    done = page.inner_text("#status-queue .counter-done .counter-value")
    assert int(done) >= 1
    pacs = "#destinations tr[data-destination='pacs']"
    page.wait_for_selector(f"{pacs} .last-error:not(:empty)", timeout=60_000)
    assert "cannot connect" in page.inner_text(f"{pacs} .last-error")
    assert "free" in page.inner_text("#status-disk")
    shot(page, "10-status")
