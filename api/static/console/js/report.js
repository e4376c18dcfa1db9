// The report panel: what the model said, what it is (preliminary AI output, which model),
// the versions that replaced one another, and the files to download.

import { download } from "./api.js";
import { h, replace } from "./dom.js";
import { timeElement } from "./i18n.js";
import { describe, toast } from "./ui.js";
import { urgencyFlag } from "./worklist.js";
import { boxSizeText } from "./viewer.js";

/** A1..An: the findings that have a region, in report order (as the conversation numbers them). */
export function reportAnchors(report) {
  const anchors = [];
  for (const finding of report?.content?.findings || []) {
    const region = finding.region;
    if (!region) continue;
    anchors.push({
      id: `A${anchors.length + 1}`,
      label: finding.label,
      box: [region.x0, region.y0, region.x1, region.y1],
      image_sop_uid: region.sop_instance_uid,
      source: "report",
      finding,
    });
  }
  return anchors;
}

function section(titleKey, ...content) {
  return h("section", { class: "report-section" }, h("h3", { i18n: titleKey }), content);
}

function text(value) {
  return value === null || value === undefined || value === "" ? h("span", { class: "muted", i18n: "common.none" }) : String(value);
}

/**
 * report: GET /api/studies/{uid}/reports/{id}; reports: the study's report summaries;
 * spacing(sop) -> [row, col] mm or null; onAnchor(id): a finding's row was clicked;
 * onVersion(id): show another version.
 */
export function renderReport(container, { studyUid, report, reports, spacing, onAnchor, onVersion }) {
  const anchors = reportAnchors(report);
  const anchorOf = new Map(anchors.map((a) => [a.finding, a]));
  const content = report.content;
  replace(
    container,
    h(
      "div",
      { class: "report", id: "report", dataset: { reportId: report.id } },
      h("div", { class: "notice", role: "note", id: "ai-notice" }, h("strong", { i18n: "report.notice" })),
      report.is_test_model ? h("div", { class: "notice notice-danger", id: "test-model", i18n: "report.testModel" }) : null,
      h(
        "div",
        { class: "report-head" },
        h("span", { class: "report-title", i18n: "report.version", vars: { id: report.id, version: report.version_number } }),
        urgencyFlag(content.urgency),
        h("span", { class: "spacer" }),
        timeElement("span", report.created_at),
      ),
      versions(report, reports, onVersion),
      section("report.impression", h("p", { class: "impression", id: "impression" }, text(content.impression))),
      section("report.findings", findingsTable(content.findings || [], anchorOf, spacing, onAnchor)),
      section("report.recommendation", h("p", { id: "recommendation" }, text(content.recommendation))),
      section(
        "report.urgency",
        h("p", { id: "urgency" }, content.urgency ? h("span", { class: `urgency urgency-${content.urgency}`, i18n: `urgency.${content.urgency}` }) : text(null)),
      ),
      content.parse_status !== "ok" || (!content.findings?.length && content.narrative)
        ? section("report.narrative", h("p", { class: "narrative" }, text(content.narrative || report.raw_text)), h("p", { class: "muted small", i18n: `report.parse.${content.parse_status}` }))
        : null,
      report.prior_statement ? section("report.comparison", h("p", { id: "comparison" }, report.prior_statement)) : null,
      content.follow_up?.length ? section("report.followUp", followUps(content.follow_up)) : null,
      section("report.model", modelIdentity(report)),
      h(
        "details",
        { class: "report-section" },
        h("summary", { i18n: "report.question" }),
        h("pre", { class: "question", text: report.question || "" }),
      ),
      section("report.downloads", downloads(studyUid, report)),
    ),
  );
}

function versions(report, reports, onVersion) {
  if (!reports || reports.length < 2) return null;
  const newestFirst = [...reports].sort((a, b) => b.id - a.id);
  return h(
    "div",
    { class: "versions", id: "versions" },
    h("span", { class: "muted small", i18n: "report.versions" }),
    h(
      "ol",
      {},
      newestFirst.map((summary, index) => {
        const newer = index > 0 ? newestFirst[index - 1] : null;
        const older = newestFirst[index + 1];
        const supersedes = summary.supersedes_report_id ?? older?.id;
        return h(
          "li",
          { class: summary.id === report.id ? "shown" : "", dataset: { reportId: summary.id } },
          h("button", { type: "button", class: "link", text: `#${summary.id} · v${summary.version_number}`, onclick: () => onVersion(summary.id) }),
          " ",
          newer ? h("span", { class: "muted small", i18n: "report.supersededBy", vars: { id: newer.id } }) : h("span", { class: "badge quiet", i18n: "report.current" }),
          supersedes ? [" · ", h("span", { class: "muted small", i18n: "report.supersedes", vars: { id: supersedes } })] : null,
          " ",
          timeElement("span", summary.created_at),
        );
      }),
    ),
  );
}

function findingsTable(findings, anchorOf, spacing, onAnchor) {
  if (!findings.length) return h("p", { class: "muted", i18n: "report.noFindings" });
  const columns = ["anchor", "finding", "location", "size", "density", "boundary"];
  return h(
    "table",
    { class: "table findings", id: "findings" },
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", { i18n: `report.col.${c}` })))),
    h(
      "tbody",
      {},
      findings.map((finding) => {
        const anchor = anchorOf.get(finding);
        const sizes = [];
        if (finding.size_mm !== null && finding.size_mm !== undefined) sizes.push(h("div", { class: "nowrap", i18n: "report.sizeModel", vars: { mm: finding.size_mm } }));
        if (anchor) {
          const size = boxSizeText(anchor.box, spacing(anchor.image_sop_uid));
          sizes.push(h("div", { class: "muted small box-size nowrap", i18n: size.key, vars: size.vars }));
        }
        return h(
          "tr",
          {
            class: anchor ? "has-anchor" : "",
            dataset: anchor ? { anchor: anchor.id } : {},
            onclick: anchor ? () => onAnchor(anchor.id) : null,
          },
          h("td", {}, anchor ? h("span", { class: "chip", text: anchor.id }) : null),
          h("td", {}, text(finding.label)),
          h("td", {}, text(finding.location)),
          h("td", {}, sizes.length ? sizes : text(null)),
          h("td", {}, text(finding.density)),
          h("td", {}, text(finding.boundary)),
        );
      }),
    ),
  );
}

function followUps(turns) {
  return h(
    "ol",
    { class: "follow-ups" },
    turns.map((turn) =>
      h(
        "li",
        {},
        h("div", {}, h("strong", { i18n: "chat.question" }), turn.anchor_id ? ` [${turn.anchor_id}] ` : " ", turn.question),
        h("div", {}, h("strong", { i18n: "chat.answer" }), " ", turn.answer, turn.answered_by === "node" ? [" (", h("span", { i18n: "chat.byNode" }), ")"] : null),
      ),
    ),
  );
}

function modelIdentity(report) {
  const model = report.model || {};
  const parts = [model.dtype, model.quantization !== "none" ? model.quantization : null, model.device].filter(Boolean);
  return h(
    "dl",
    { class: "facts", id: "model-identity" },
    h("dt", { i18n: "report.model" }),
    h("dd", {}, h("code", { text: `${model.model_id} (${model.revision})` }), parts.length ? ` · ${parts.join(" · ")}` : ""),
    h("dt", { i18n: "report.created" }),
    h("dd", {}, timeElement("span", report.created_at)),
  );
}

let pdfServed = null;

/** Whether the API serves reports as PDF (?format=pdf): read once from its OpenAPI document;
 * without the document (docs = "off") the button is left out. */
function apiServesPdf() {
  pdfServed ??= fetch("/api/openapi.json", { cache: "no-store" })
    .then((response) => (response.ok ? response.json() : null))
    .then((document) => {
      const operation = document?.paths?.["/api/studies/{study_uid}/reports/{report_id}"]?.get;
      const format = operation?.parameters?.find((parameter) => parameter.name === "format");
      const schemas = [format?.schema, ...(format?.schema?.anyOf || [])];
      return schemas.some((schema) => schema?.enum?.includes("pdf"));
    })
    .catch(() => false);
  return pdfServed;
}

function downloads(studyUid, report) {
  const base = `/studies/${encodeURIComponent(studyUid)}/reports/${report.id}`;
  const kinds = new Set((report.objects || []).map((o) => o.kind));
  const button = (key, path, filename, id) =>
    h("button", {
      type: "button",
      class: "btn",
      id,
      i18n: key,
      onclick: async () => {
        try {
          await download(path, filename);
        } catch (error) {
          toast("report.downloadFailed", { detail: describe(error) }, "error");
        }
      },
    });
  const container = h(
    "div",
    { class: "downloads", id: "downloads" },
    kinds.has("sr") ? button("report.dlSr", `${base}?format=sr`, `report-${report.id}-sr.dcm`, "download-sr") : null,
    button("report.dlJson", base, `report-${report.id}.json`, "download-json"),
  );
  apiServesPdf().then((served) => {
    container.dataset.pdf = served ? "served" : "not-served";
    if (served) container.append(button("report.dlPdf", `${base}?format=pdf`, `report-${report.id}.pdf`, "download-pdf"));
  });
  return container;
}
