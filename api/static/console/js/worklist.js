// The worklist: studies newest first, filtered and paged by the API (GET /api/studies),
// refreshed whenever the change stream says something moved.

import { getJson, query } from "./api.js";
import { h, replace } from "./dom.js";
import { applyLanguage, formatDicomDate, formatPersonName, label, t, timeElement, unlabel } from "./i18n.js";
import { describe } from "./ui.js";

export const STATUSES = [
  "receiving",
  "waiting",
  "queued",
  "reporting",
  "reported",
  "delivered",
  "failed",
  "out_of_scope",
  "cancelled",
];
const MODALITIES = ["CR", "DX", "CT", "MR", "MG", "US", "XA", "RF", "NM", "PT", "OT"];
const PAGE_SIZE = 50;
const FILTERS_KEY = "mgn.worklist";
const URGENT = new Set(["urgent", "critical"]);

export function statusBadge(status) {
  return h("span", { class: `badge status status-${status}`, i18n: `status.${status}`, dataset: { status } });
}

export function urgencyFlag(urgency) {
  if (!URGENT.has(urgency)) return null;
  return h("span", { class: `flag flag-${urgency}`, i18n: `urgency.${urgency}`, dataset: { urgency } });
}

function savedFilters() {
  try {
    return { q: "", status: "", modality: "", since: "", until: "", urgent: false, offset: 0, ...JSON.parse(sessionStorage.getItem(FILTERS_KEY) || "{}") };
  } catch {
    return { q: "", status: "", modality: "", since: "", until: "", urgent: false, offset: 0 };
  }
}

/** A date input (local calendar day) as the UTC instant of its local midnight. */
function dayStart(value, plusDays = 0) {
  if (!value) return "";
  const day = new Date(`${value}T00:00:00`);
  day.setDate(day.getDate() + plusDays);
  return day.toISOString();
}

export function mountWorklist(container, context) {
  const filters = savedFilters();
  let loading = false;
  let again = false;
  let searchTimer = null;
  let lastShown = "";

  const search = h("input", { type: "search", id: "wl-search", i18nPlaceholder: "wl.search", value: filters.q });
  const status = h(
    "select",
    { id: "wl-status", i18nAria: "wl.status" },
    h("option", { value: "", i18n: "wl.allStatuses" }),
    STATUSES.map((s) => h("option", { value: s, i18n: `status.${s}` })),
  );
  const modality = h(
    "select",
    { id: "wl-modality", i18nAria: "wl.modality" },
    h("option", { value: "", i18n: "wl.allModalities" }),
    MODALITIES.map((m) => h("option", { value: m, text: m })),
  );
  const since = h("input", { type: "date", id: "wl-since", value: filters.since });
  const until = h("input", { type: "date", id: "wl-until", value: filters.until });
  const urgent = h("input", { type: "checkbox", id: "wl-urgent" });
  status.value = filters.status;
  modality.value = filters.modality;
  urgent.checked = filters.urgent;
  const body = h("tbody", { id: "wl-rows" });
  const note = h("p", { class: "muted small", id: "wl-note" });
  const count = h("span", { class: "muted", id: "wl-count" });
  const newer = h("button", { type: "button", class: "btn btn-quiet", i18n: "wl.newer", onclick: () => page(-1) });
  const older = h("button", { type: "button", class: "btn btn-quiet", i18n: "wl.older", onclick: () => page(1) });
  const error = h("p", { class: "form-error", role: "alert", id: "wl-error" });

  const changed = () => {
    filters.offset = 0;
    load();
  };
  search.addEventListener("input", () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(changed, 300);
  });
  for (const input of [status, modality, since, until, urgent]) input.addEventListener("change", changed);

  const clearButton = h("button", {
    type: "button",
    class: "btn btn-quiet",
    i18n: "wl.clear",
    onclick: () => {
      search.value = "";
      status.value = modality.value = since.value = until.value = "";
      urgent.checked = false;
      changed();
    },
  });

  replace(
    container,
    h(
      "section",
      { class: "page worklist" },
      h(
        "div",
        { class: "toolbar" },
        search,
        status,
        modality,
        h("label", { class: "inline" }, h("span", { i18n: "wl.since" }), since),
        h("label", { class: "inline" }, h("span", { i18n: "wl.until" }), until),
        h("label", { class: "inline check" }, urgent, h("span", { i18n: "wl.urgentOnly" })),
        clearButton,
      ),
      error,
      h(
        "div",
        { class: "table-wrap" },
        h(
          "table",
          { class: "table worklist-table", id: "worklist" },
          h(
            "thead",
            {},
            h(
              "tr",
              {},
              ["urgency", "status", "patient", "modality", "bodyPart", "study", "received", "images", "source"].map((c) =>
                h("th", { i18n: `wl.col.${c}`, class: `col-${c}` }),
              ),
            ),
          ),
          body,
        ),
      ),
      h("div", { class: "pager" }, note, h("span", { class: "spacer" }), count, newer, older),
    ),
  );

  function page(step) {
    filters.offset = Math.max(0, filters.offset + step * PAGE_SIZE);
    load();
  }

  async function load() {
    if (loading) {
      again = true;
      return;
    }
    loading = true;
    Object.assign(filters, {
      q: search.value.trim(),
      status: status.value,
      modality: modality.value,
      since: since.value,
      until: until.value,
      urgent: urgent.checked,
    });
    sessionStorage.setItem(FILTERS_KEY, JSON.stringify(filters));
    try {
      const result = await getJson(
        "/studies" +
          query({
            q: filters.q,
            status: filters.status,
            modality: filters.modality,
            since: dayStart(filters.since),
            until: dayStart(filters.until, 1),
            limit: PAGE_SIZE,
            offset: filters.offset,
          }),
      );
      unlabel(error);
      render(result);
    } catch (failure) {
      label(error, "common.error", { detail: describe(failure) });
    } finally {
      loading = false;
      if (again) {
        again = false;
        load();
      }
    }
  }

  function render(result) {
    const anyFilter = filters.q || filters.status || filters.modality || filters.since || filters.until;
    // A change elsewhere (a delivery, another page's study) refreshes this page too: keep the
    // rows when nothing they show moved, so a click or the keyboard focus on a row is not lost
    // to a redraw under the pointer.
    const shown = JSON.stringify([result, filters]);
    if (shown === lastShown) return;
    lastShown = shown;
    const items = filters.urgent ? result.items.filter((item) => URGENT.has(item.urgency)) : result.items;
    const hidden = result.items.length - items.length;
    replace(body, items.length ? items.map(row) : h("tr", { class: "empty" }, h("td", { colspan: 9, i18n: anyFilter || filters.urgent ? "wl.empty" : "wl.emptyAll" })));
    if (hidden) label(note, "wl.urgentHidden", { n: hidden });
    else unlabel(note);
    const first = result.total ? result.offset + 1 : 0;
    label(count, "wl.count", { from: first, to: result.offset + result.items.length, total: result.total });
    newer.disabled = result.offset === 0;
    older.disabled = result.offset + result.items.length >= result.total;
  }

  function row(item) {
    const open = () => (location.hash = `#/study/${encodeURIComponent(item.study_instance_uid)}`);
    const patientName = formatPersonName(item.patient?.name);
    const described = [item.study_description, formatDicomDate(item.study_date)].filter(Boolean).join(" · ");
    return h(
      "tr",
      {
        class: `study-row${URGENT.has(item.urgency) ? " urgent" : ""}`,
        tabindex: 0,
        dataset: { uid: item.study_instance_uid, status: item.status },
        onclick: open,
        onkeydown: (event) => event.key === "Enter" && open(),
      },
      h("td", { class: "col-urgency" }, urgencyFlag(item.urgency)),
      h("td", { class: "col-status" }, statusBadge(item.status)),
      h(
        "td",
        { class: "col-patient" },
        patientName ? h("div", { class: "patient-name", text: patientName }) : h("div", { class: "muted", i18n: "study.unknownPatient" }),
        item.patient?.id ? h("div", { class: "muted small patient-id", text: item.patient.id }) : null,
      ),
      h("td", { class: "col-modality", text: item.modality }),
      h("td", { class: "col-bodyPart", text: item.body_part || t("common.none") }),
      h(
        "td",
        { class: "col-study" },
        h("div", { text: described || t("common.none") }),
        item.accession_number ? h("div", { class: "muted small", i18n: "study.accession", vars: { value: item.accession_number } }) : null,
      ),
      h("td", { class: "col-received" }, timeElement("span", item.first_received_at, "relative")),
      h("td", { class: "col-images num", text: item.instance_count }),
      h("td", { class: "col-source muted", text: item.calling_ae }),
    );
  }

  const clock = setInterval(() => applyLanguage(body), 30_000);
  load();
  return {
    refresh: load,
    destroy() {
      clearInterval(clock);
      clearTimeout(searchTimer);
    },
  };
}
