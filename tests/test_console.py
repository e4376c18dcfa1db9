"""The web console in a real browser (Debian's headless Chromium through Playwright), against a
running `medgemma-node serve` with the scripted engine (tests/console_support.py: the node, the
sample study, the browser guard): sign-in, the live worklist, the overlay geometry at every
zoom, the report panel, a two-turn conversation through the node's real conversation routes
(the second answer not ready at once: the console follows the 202 to its answer) and append,
the viewer's read-only panel, Chinese, and the status page."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest

from peers.node_process import NodeProcess
from storage.db import Database
from storage.priors import link_prior
from storage.report_schema import PriorComparison
from tests.console_support import (
    PATIENT_ID,
    QUESTION,
    QUESTION_2,
    RG1_COLUMNS,
    RG1_ROWS,
    SPACING_MM,
    TOLERANCE_PX,
    ConsoleNode,
    api_serves_pdf,
    assert_boxes_on_report,
    browser_fixture,  # noqa: F401  (the module's browser)
    console_fixture,  # noqa: F401  (the module's node)
    drawn_boxes,
    expected_screen_box,
    image_rect,
    open_sample,
    page_fixture,  # noqa: F401  (a fresh tab per test)
    report_boxes,
    shot,
    sign_in,
    zoom_text,
)
from tests.test_e2e import node_status

pytestmark = [pytest.mark.slow, pytest.mark.browser]


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


def test_the_report_says_what_it_was_compared_with(page: Any, console: ConsoleNode) -> None:
    sample = console.reported_sample()
    report_id = console.latest_report(sample.StudyInstanceUID)["id"]
    db = Database(console.node.database_url)
    try:  # as a worker with [priors] on records it (this node has them off)
        with db.session() as session:
            link_prior(session, report_id, PriorComparison.without("no_patient_id"))
    finally:
        db.dispose()
    report = console.latest_report(sample.StudyInstanceUID)
    assert report["prior_statement"] == "No prior study compared: the study has no Patient ID"
    open_sample(page, console)
    assert page.inner_text("#comparison") == report["prior_statement"]


# --------------------------------------------------------------------------- conversation


def test_ask_about_a_region_see_the_anchored_answer_and_append(
    page: Any,
    console: ConsoleNode,
) -> None:
    sample = open_sample(page, console, "radiologist")
    page.click("#tab-ask")
    page.click("#anchor-chips .chip[data-anchor='A1']")
    assert page.inner_text("#about .chip") == "About A1"
    page.fill("#question", QUESTION)
    with page.expect_response(lambda r: "/messages" in r.url) as answered:
        page.click("#ask")
    assert answered.value.status == 200, "answered within the wait"
    answer = answered.value.json()
    assert answered.value.request.post_data_json == {"question": QUESTION, "anchor_id": "A1"}
    page.wait_for_selector("#transcript .answer-text")
    shown = page.inner_text("#transcript .answer-text")
    assert shown == answer["answer"] and shown.startswith("Spiculated margins")
    [new_id] = answer["new_anchor_ids"]
    assert new_id == "A3", "A1 and A2 are the report's"
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

    # The second question, about the new region, is not answered at once (the browser's
    # request is sent with wait=0, the worker held until the node has said 202): the console
    # follows the 202 to /api/answers/{id}.
    page.route("**/messages?*", lambda route: route.continue_(url=_no_wait(route.request.url)))
    page.click(f"#anchor-chips .chip[data-anchor='{new_id}']")
    page.fill("#question", QUESTION_2)
    with page.expect_response(lambda r: "/api/answers/" in r.url and r.status == 200) as later:
        with worker_held(console.node), page.expect_response(_is_messages) as posted:
            page.click("#ask")
        assert posted.value.status == 202, "not answered while the worker was held"
    second = later.value.json()
    page.wait_for_selector("#transcript li.turn:nth-child(2) .answer-text")
    assert page.inner_text("#transcript li.turn:nth-child(2) .answer-text") == second["answer"]
    assert second["referenced_anchor_id"] == new_id and second["new_anchor_ids"] == ["A4"]

    page.click("#append")
    page.click("#append-confirm")
    page.wait_for_selector("#chat-state:has-text('part of the report')")
    reports = console.study(sample.StudyInstanceUID)["reports"]
    assert len(reports) == 2, "a new report version"
    assert page.inner_text("#toast") == f"Appended as report #{reports[-1]['id']}."
    # The report tab shows the new version, which supersedes the first.
    first_id, new_id = reports[0]["id"], reports[-1]["id"]
    page.click("#tab-report")
    page.wait_for_selector(f"#versions li.shown[data-report-id='{new_id}']", timeout=30_000)
    assert f"supersedes #{first_id}" in page.inner_text(f"#versions li[data-report-id='{new_id}']")
    assert f"superseded by #{new_id}" in page.inner_text(
        f"#versions li[data-report-id='{first_id}']"
    )
    assert "Is it calcified?" in page.inner_text("#report")
    shot(page, "07-appended-report")
    with console.client() as client:
        conversation_id = answer["conversation_id"]
        stored = client.get(f"/api/conversations/{conversation_id}").json()
    assert stored["state"] == "appended" and stored["appended_report_id"] == reports[-1]["id"]
    assert [t["question"] for t in stored["turns"]] == [QUESTION, QUESTION_2]
    assert {t["asked_by"] for t in stored["turns"]} == {"dr-radiologist"}


def _is_messages(response: Any) -> bool:
    return "/messages" in response.url


@contextlib.contextmanager
def worker_held(node: NodeProcess) -> Iterator[None]:
    """The node's inference worker stopped (SIGSTOP) while the block runs, so a question sent
    meanwhile is not answered before the block ends (SIGCONT): a scripted answer otherwise
    comes within milliseconds, before the API has looked once."""
    status = node_status(node, with_worker=True)
    assert status is not None, "medgemma-node status failed"
    [worker] = status["workers"]
    os.kill(worker["pid"], signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(worker["pid"], signal.SIGCONT)


def _no_wait(url: str) -> str:
    return re.sub(r"([?&])wait=[^&]*", r"\1wait=0", url)


def test_a_viewer_cannot_ask(page: Any, console: ConsoleNode) -> None:
    sample = open_sample(page, console, "viewer")
    page.click("#tab-ask")
    page.wait_for_selector("#viewer-note")
    assert page.locator("#question").count() == 0
    assert page.locator("#ask").count() == 0 and page.locator("#append").count() == 0
    # The regions are still shown: the latest report's (a conversation may have been appended).
    boxed = report_boxes(console.latest_report(sample.StudyInstanceUID))
    assert page.locator("#anchor-chips .chip").count() == len(boxed) >= 2
    shot(page, "08-viewer-cannot-ask")
    with console.client("viewer") as viewer:
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
    shot(page, "09-worklist-zh")

    page.click(row)
    page.wait_for_selector("#findings")
    assert page.inner_text("#tab-report") == "报告" and page.inner_text("#tab-ask") == "提问"
    assert "须由医师审核" in page.inner_text("#ai-notice")
    assert page.inner_text("[data-mode='model']") == "模型视图"
    shot(page, "10-study-zh")

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
    findings = console.latest_report(sample.StudyInstanceUID)["content"]["findings"]
    assert page.locator("#findings tbody tr").count() == len(findings)  # relabelled only


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
    shot(page, "11-status")
