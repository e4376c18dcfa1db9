// The node's status for hospital IT and radiologists: is it receiving, is the model there, is
// anything stuck on its way out, is the disk filling up (GET /api/status).

import { getJson, postJson, query } from "./api.js";
import { h, replace } from "./dom.js";
import { formatTime, label, t, timeElement, unlabel } from "./i18n.js";
import { describe, isAdmin, toast } from "./ui.js";

const REFRESH_MS = 10_000;
const JOB_STATUSES = ["queued", "running", "done", "failed", "skipped"];

function ok(good, goodKey, badKey, vars) {
  return h("span", { class: `state ${good ? "state-ok" : "state-bad"}`, i18n: good ? goodKey : badKey, vars });
}

function card(titleKey, id, ...content) {
  return h("section", { class: "card status-card", id }, h("h2", { i18n: titleKey }), content);
}

function facts(rows) {
  return h("dl", { class: "facts" }, rows.filter(Boolean).map(([key, value]) => [h("dt", { i18n: key }), h("dd", {}, value)]));
}

function megabytes(value) {
  return value >= 10240 ? `${(value / 1024).toFixed(1)} GB` : `${Math.round(value)} MB`;
}

export function mountStatus(container, context) {
  const checked = h("span", { class: "muted small", id: "status-checked" });
  const body = h("div", { class: "status-grid", id: "status-grid" });
  const error = h("p", { class: "form-error", role: "alert" });
  replace(container, h("section", { class: "page status-page" }, h("div", { class: "page-head" }, h("h1", { i18n: "st.title" }), h("span", { class: "spacer" }), checked), error, body));

  let loading = false;
  async function load() {
    if (loading) return;
    loading = true;
    try {
      const status = await getJson("/status");
      unlabel(error);
      render(status);
      label(checked, "st.checked", { time: formatTime(status.checked_at, "clock") });
    } catch (failure) {
      label(error, "common.error", { detail: describe(failure) });
    } finally {
      loading = false;
    }
  }

  function render(status) {
    replace(body, nodeCard(status), modelCard(status), queueCard(status), diskCard(status), destinationsCard(status, context.user, load));
  }

  const timer = setInterval(load, REFRESH_MS);
  load();
  return { refresh: load, destroy: () => clearInterval(timer) };
}

function nodeCard(status) {
  const scp = status.scp;
  const broken = status.parts.filter((part) => part.last_error);
  return card(
    "st.node",
    "status-node",
    facts([
      ["st.scp", [h("code", { text: `${scp.ae_title}@${scp.host}:${scp.port}` }), " ", ok(scp.listening, "st.listening", "st.notListening")]],
      ["st.serving", ok(status.serving, "st.running", "st.notRunning")],
      ["st.database", ok(status.database.reachable, "st.reachable", "st.notListening")],
      ["st.parts", broken.length ? broken.map((part) => h("div", { class: "error-text" }, h("strong", { text: part.name }), ": ", part.last_error)) : ok(true, "st.ok")],
    ]),
  );
}

function modelCard(status) {
  const model = status.model;
  const identity = model.identity;
  return card(
    "st.model",
    "status-model",
    h("p", {}, ok(model.loaded, "st.loaded", "st.notLoaded", { status: model.status })),
    identity ? h("p", {}, h("code", { text: `${identity.model_id} (${identity.revision})` }), ` · ${identity.device}`) : null,
    identity?.is_test_model ? h("p", { class: "notice notice-danger", i18n: "report.testModel" }) : null,
    model.message ? h("p", { class: "muted small pre", text: model.message }) : null,
  );
}

function queueCard(status) {
  const queue = status.queue;
  return card(
    "st.queue",
    "status-queue",
    h(
      "div",
      { class: "counters" },
      JOB_STATUSES.map((name) =>
        h("div", { class: `counter counter-${name}${queue.jobs[name] ? " nonzero" : ""}`, dataset: { job: name } }, h("span", { class: "counter-value num", text: queue.jobs[name] || 0 }), h("span", { class: "counter-label", i18n: `st.job.${name}` })),
      ),
    ),
    facts([
      ["st.waitingRetry", String(queue.waiting_for_retry)],
      ["st.oldest", timeElement("span", queue.oldest_queued_at, "relative")],
      ["st.studies", String(status.studies)],
      ["st.instances", String(status.instances)],
    ]),
  );
}

function diskCard(status) {
  const disk = status.disk;
  const total = Math.max(disk.total_mb, 1);
  const fill = h("div", { class: `meter-fill${disk.ok ? "" : " meter-bad"}` });
  const mark = h("div", { class: "meter-mark" });
  fill.style.width = `${Math.round(((total - disk.free_mb) / total) * 1000) / 10}%`;
  mark.style.left = `${Math.max(0, Math.round(((total - disk.watermark_mb) / total) * 1000) / 10)}%`;
  return card(
    "st.disk",
    "status-disk",
    h("p", { i18n: "st.diskFree", vars: { free: megabytes(disk.free_mb), watermark: megabytes(disk.watermark_mb) } }),
    h("div", { class: "meter" }, fill, mark),
    disk.ok ? null : h("p", { class: "notice notice-danger", i18n: "st.diskLow" }),
  );
}

function destinationsCard(status, user, reload) {
  if (!status.destinations.length) return card("st.destinations", "status-destinations", h("p", { class: "muted", i18n: "st.noDestinations" }));
  const columns = ["name", "kind", "target", "pending", "sent", "dead", "lastSent", "lastError"];
  return card(
    "st.destinations",
    "status-destinations",
    h(
      "div",
      { class: "table-wrap" },
      h(
        "table",
        { class: "table", id: "destinations" },
        h("thead", {}, h("tr", {}, columns.map((c) => h("th", { i18n: `st.col.${c}` })), isAdmin(user) ? h("th") : null)),
        h(
          "tbody",
          {},
          status.destinations.map((d) =>
            h(
              "tr",
              { dataset: { destination: d.name } },
              h("td", {}, h("strong", { text: d.name }), !d.configured ? h("div", { class: "muted small", i18n: "st.notConfigured" }) : !d.enabled ? h("div", { class: "muted small", i18n: "st.disabled" }) : null),
              h("td", { text: d.kind }),
              h("td", {}, h("code", { text: d.target || t("common.none") })),
              h("td", { class: "num", text: d.counts.pending || 0 }),
              h("td", { class: "num", text: d.counts.sent || 0 }),
              h("td", { class: `num ${d.counts.dead ? "error-text" : ""}`, text: d.counts.dead || 0 }),
              h("td", {}, timeElement("span", d.last_sent_at, "relative")),
              h("td", { class: "error-text small last-error" }, d.last_error || ""),
              isAdmin(user) ? h("td", {}, d.counts.dead ? retryButton(d.name, reload) : null) : null,
            ),
          ),
        ),
      ),
    ),
  );
}

function retryButton(destination, reload) {
  return h("button", {
    type: "button",
    class: "btn btn-small",
    i18n: "st.retryDead",
    onclick: async () => {
      try {
        const result = await postJson(`/outbox/retry-dead${query({ destination })}`);
        toast("st.retried", { n: result.count });
        reload();
      } catch (error) {
        toast("common.error", { detail: describe(error) }, "error");
      }
    },
  });
}
