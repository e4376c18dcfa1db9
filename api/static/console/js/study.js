// One study: the image with its boxes on the left; the report and the conversation on the
// right. A box, a finding's row and a region chip all point at the same anchor (A1, A2...).

import { ApiError, getJson } from "./api.js";
import { ConversationPanel } from "./chat.js";
import { h, replace } from "./dom.js";
import { formatDicomDate, formatPersonName } from "./i18n.js";
import { renderReport, reportAnchors } from "./report.js";
import { describe, toast } from "./ui.js";
import { ImageViewer } from "./viewer.js";
import { statusBadge, urgencyFlag } from "./worklist.js";

const TAB_KEY = "mgn.studyTab";

export function mountStudy(container, context, studyUid) {
  const header = h("div", { class: "study-head", id: "study-head" });
  const viewerRoot = h("div", { class: "viewer-column" });
  const reportRoot = h("div", { class: "tab-panel", id: "panel-report", role: "tabpanel" });
  const chatRoot = h("div", { class: "tab-panel", id: "panel-ask", role: "tabpanel" });
  const tabButtons = ["report", "ask"].map((name) =>
    h("button", { type: "button", role: "tab", class: "tab", id: `tab-${name}`, dataset: { tab: name }, i18n: `tab.${name}`, onclick: () => showTab(name) }),
  );
  replace(
    container,
    h(
      "section",
      { class: "page study" },
      header,
      h("div", { class: "study-body" }, viewerRoot, h("aside", { class: "side" }, h("div", { class: "tabs", role: "tablist" }, tabButtons), reportRoot, chatRoot)),
    ),
  );

  let detail = null;
  let report = null;
  let loading = null;
  let destroyed = false;

  const viewer = new ImageViewer(viewerRoot, {
    studyUid,
    onSelect: (id) => {
      markFinding(id);
      chat.highlight(id);
    },
  });
  const chat = new ConversationPanel(chatRoot, {
    studyUid,
    user: context.user,
    onAnchors: () => drawBoxes(),
    onHighlight: (id) => {
      viewer.select(id);
      markFinding(id);
    },
    onAppended: () => load(),
  });

  function showTab(name) {
    sessionStorage.setItem(TAB_KEY, name);
    for (const button of tabButtons) button.setAttribute("aria-selected", String(button.dataset.tab === name));
    reportRoot.hidden = name !== "report";
    chatRoot.hidden = name !== "ask";
  }
  showTab(sessionStorage.getItem(TAB_KEY) || "report");

  function latestReportId() {
    return detail?.reports?.length ? Math.max(...detail.reports.map((r) => r.id)) : null;
  }

  function drawBoxes() {
    const latest = report && report.id === latestReportId();
    viewer.setBoxes(latest ? chat.anchors : reportAnchors(report));
  }

  function markFinding(id) {
    for (const row of reportRoot.querySelectorAll("tr[data-anchor]")) row.classList.toggle("active", row.dataset.anchor === id);
  }

  function renderHeader() {
    const patient = detail.patient || {};
    const name = formatPersonName(patient.name);
    const facts = [detail.modality, detail.body_part, formatDicomDate(detail.study_date), detail.study_description].filter(Boolean);
    replace(
      header,
      h("a", { href: "#/", class: "back", i18n: "study.back" }),
      h(
        "div",
        { class: "study-title" },
        name ? h("h1", { class: "patient-name", id: "patient-name", text: name }) : h("h1", { class: "muted", i18n: "study.unknownPatient" }),
        patient.id ? h("span", { class: "patient-id muted", id: "patient-id", text: patient.id }) : null,
      ),
      h("span", { class: "muted" }, facts.join(" · ")),
      detail.accession_number ? h("span", { class: "muted", i18n: "study.accession", vars: { value: detail.accession_number } }) : null,
      h("span", { class: "spacer" }),
      urgencyFlag(detail.urgency),
      statusBadge(detail.status),
    );
  }

  function showNoReport() {
    replace(reportRoot, h("p", { class: "muted", id: "no-report", i18n: "report.none", vars: { status: { $t: `status.${detail.status}` } } }));
  }

  function fetchReport(reportId) {
    return getJson(`/studies/${encodeURIComponent(studyUid)}/reports/${reportId}`);
  }

  async function showReport(reportId, fetched = null) {
    report = fetched || (await fetchReport(reportId));
    const anchors = reportAnchors(report);
    // Box sizes in mm need each boxed image's pixel spacing.
    const spacings = new Map();
    for (const sop of new Set(anchors.map((a) => a.image_sop_uid))) {
      try {
        spacings.set(sop, (await viewer.geometryFor(sop)).pixel_spacing_mm);
      } catch {
        spacings.set(sop, null);
      }
    }
    renderReport(reportRoot, {
      studyUid,
      report,
      reports: detail.reports,
      spacing: (sop) => spacings.get(sop) || null,
      onAnchor: (id) => {
        viewer.select(id);
        chat.highlight(id);
        markFinding(id);
      },
      onVersion: (id) => showReport(id),
    });
    if (report.id === latestReportId()) chat.setReport(report, anchors);
    drawBoxes();
  }

  async function load() {
    if (loading) return loading;
    loading = (async () => {
      let fresh;
      try {
        fresh = await getJson(`/studies/${encodeURIComponent(studyUid)}`);
      } catch (error) {
        if (error instanceof ApiError && error.status === 404) replace(viewerRoot, h("p", { class: "notice", i18n: "study.notFound" }));
        else replace(header, h("a", { href: "#/", class: "back", i18n: "study.back" }), h("p", { class: "form-error", i18n: "common.error", vars: { detail: describe(error) } }));
        return;
      }
      const first = detail === null;
      const reportsChanged = !detail || latestReportId() !== Math.max(0, ...fresh.reports.map((r) => r.id));
      detail = fresh;
      if (destroyed) return;
      renderHeader();
      if (first) {
        const instances = detail.series.flatMap((series) => series.instances);
        const latest = latestReportId();
        await chat.restore();
        if (latest === null) {
          showNoReport();
          chat.setReport(null, []);
        }
        const latestReport = latest !== null ? await fetchReport(latest) : null;
        const start = latestReport ? reportAnchors(latestReport)[0]?.image_sop_uid : null;
        await viewer.setInstances(instances, start);
        if (latestReport) await showReport(latest, latestReport);
      } else if (reportsChanged && latestReportId() !== null) {
        await showReport(latestReportId());
      } else if (latestReportId() === null) {
        showNoReport();
      }
    })();
    try {
      await loading;
    } catch (error) {
      toast("common.error", { detail: describe(error) }, "error");
    } finally {
      loading = null;
    }
  }

  load();
  return {
    refresh: () => load(),
    destroy() {
      destroyed = true;
      viewer.destroy();
    },
  };
}
