// The conversation panel: questions about the study, answers anchored to regions.
//
// API (REST API issue): POST /api/studies/{uid}/conversations -> {id};
// POST /api/conversations/{id}/messages {question, anchor_id?} -> {answer, findings,
// anchors: [{id, label, box: [x0, y0, x1, y1], image_sop_uid}], disclaimer, ...}, or 202
// while the model has not answered: followed to GET /api/answers/{request_id} (api.js);
// GET /api/conversations/{id} -> every turn with its anchors;
// POST /api/conversations/{id}/append (radiologist) -> the new report version.
// The conversation id is kept per study in this tab, so coming back shows it again.

import { ApiError, getJson, postForAnswer, postJson } from "./api.js";
import { h, replace } from "./dom.js";
import { label, unlabel } from "./i18n.js";
import { canAsk, describe, toast } from "./ui.js";

const KEY_PREFIX = "mgn.conversation.";

export class ConversationPanel {
  /**
   * onAnchors(anchors): every anchor to draw; onHighlight(id | null): show one;
   * onAppended(reportId): a new report version exists.
   */
  constructor(root, { studyUid, user, onAnchors, onHighlight, onAppended }) {
    this.studyUid = studyUid;
    this.user = user;
    this.onAnchors = onAnchors;
    this.onHighlight = onHighlight;
    this.onAppended = onAppended;
    this.reportAnchors = [];
    this.conversation = null; // {id, state, anchors, turns}
    this.about = null;
    this.highlighted = null;
    this.busy = false;
    this.hasReport = false;
    this.build(root);
  }

  build(root) {
    this.chips = h("div", { class: "chips", id: "anchor-chips" });
    this.transcript = h("ol", { class: "transcript", id: "transcript", "aria-live": "polite" });
    this.state = h("p", { class: "muted small", id: "chat-state" });
    this.aboutChip = h("span", { class: "about", id: "about" });
    this.question = h("textarea", { id: "question", rows: 3, maxlength: 2000, i18nPlaceholder: "chat.placeholder" });
    this.question.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) this.send();
    });
    this.sendButton = h("button", { type: "submit", class: "btn btn-primary", id: "ask", i18n: "chat.send" });
    this.appendButton = h("button", { type: "button", class: "btn", id: "append", i18n: "chat.append", onclick: () => this.confirmAppend() });
    this.waiting = h("span", { class: "waiting muted small", id: "waiting", i18n: "chat.sending", hidden: true });
    this.error = h("p", { class: "form-error", role: "alert", id: "chat-error" });
    const asking = canAsk(this.user);
    const form = h(
      "form",
      { class: "compose", id: "compose" },
      this.aboutChip,
      this.question,
      this.error,
      h("div", { class: "compose-actions" }, this.waiting, h("span", { class: "spacer" }), this.appendButton, this.sendButton),
    );
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.send();
    });
    this.noReport = h("p", { class: "muted", id: "chat-no-report", i18n: "chat.noReport", hidden: true });
    replace(
      root,
      h(
        "div",
        { class: "chat", id: "chat" },
        h("div", { class: "notice notice-quiet", i18n: "chat.notice" }),
        h("div", { class: "regions" }, h("h3", { i18n: "chat.regions" }), this.chips),
        this.transcript,
        this.state,
        this.noReport,
        asking ? form : h("p", { class: "notice notice-quiet", id: "viewer-note", i18n: "chat.viewerNote" }),
      ),
    );
    this.form = asking ? form : null;
    this.renderAbout();
    this.renderTranscript();
  }

  // ------------------------------------------------------------------ state

  /** The report the conversation starts from (its findings are A1..An). */
  setReport(report, anchors) {
    this.hasReport = Boolean(report);
    this.reportAnchors = anchors;
    this.noReport.hidden = this.hasReport;
    if (this.form) this.form.hidden = !this.hasReport;
    this.publishAnchors();
  }

  get anchors() {
    const fromConversation = this.conversation?.anchors;
    if (!fromConversation?.length) return this.reportAnchors;
    const reportIds = new Set(this.reportAnchors.map((a) => a.id));
    return fromConversation.map((a) => ({ ...a, source: a.source || (reportIds.has(a.id) ? "report" : "answer") }));
  }

  publishAnchors() {
    this.renderChips();
    this.onAnchors(this.anchors);
  }

  storageKey() {
    return KEY_PREFIX + this.studyUid;
  }

  async restore() {
    const id = sessionStorage.getItem(this.storageKey());
    if (!id) return;
    try {
      const view = await getJson(`/conversations/${encodeURIComponent(id)}`);
      this.conversation = { id: view.id, state: view.state || "open", anchors: view.anchors || [], turns: view.turns || [] };
    } catch (error) {
      if (error instanceof ApiError && error.status === 404) sessionStorage.removeItem(this.storageKey());
      return;
    }
    this.renderTranscript();
    this.publishAnchors();
  }

  // ------------------------------------------------------------------ anchors

  renderChips() {
    const anchors = this.anchors;
    replace(
      this.chips,
      anchors.length
        ? anchors.map((anchor) =>
            h("button", {
              type: "button",
              class: `chip chip-${anchor.source || "report"}${anchor.id === this.highlighted ? " active" : ""}`,
              dataset: { anchor: anchor.id },
              text: `${anchor.id} ${anchor.label}`,
              onclick: () => this.pick(anchor.id),
            }),
          )
        : h("span", { class: "muted small", i18n: "chat.noRegions" }),
    );
  }

  /** A region chip (or a box on the image) was chosen: highlight it; ask about it. */
  pick(anchorId) {
    this.highlight(anchorId);
    this.onHighlight(anchorId);
    if (this.form && anchorId) {
      this.about = anchorId;
      this.renderAbout();
      this.question.focus();
    }
  }

  highlight(anchorId) {
    this.highlighted = anchorId;
    for (const chip of this.root().querySelectorAll(".chip[data-anchor]")) {
      chip.classList.toggle("active", chip.dataset.anchor === anchorId);
    }
  }

  root() {
    return this.chips.closest(".chat") || document;
  }

  renderAbout() {
    this.aboutChip.hidden = !this.about;
    if (!this.about) {
      replace(this.aboutChip);
      return;
    }
    replace(
      this.aboutChip,
      h("span", { class: "chip active", i18n: "chat.about", vars: { id: this.about } }),
      h("button", {
        type: "button",
        class: "btn btn-icon",
        id: "clear-about",
        text: "×",
        i18nTitle: "chat.clearAbout",
        onclick: () => {
          this.about = null;
          this.renderAbout();
        },
      }),
    );
  }

  // ------------------------------------------------------------------ transcript

  renderTranscript() {
    const turns = this.conversation?.turns || [];
    if (!turns.length) {
      replace(this.transcript, h("li", { class: "muted empty", i18n: "chat.empty" }));
    } else {
      let known = new Set(this.reportAnchors.map((a) => a.id));
      replace(
        this.transcript,
        turns.map((turn) => {
          const item = this.turnItem(turn, known);
          known = new Set([...known, ...(turn.anchors || []).map((a) => a.id)]);
          return item;
        }),
      );
    }
    const appended = this.conversation && this.conversation.state !== "open";
    if (appended) label(this.state, "chat.appendedState");
    else unlabel(this.state);
    if (this.appendButton) this.appendButton.hidden = !this.conversation || appended || !turns.length;
  }

  turnItem(turn, known) {
    const fresh = turn.new_anchor_ids || (turn.anchors || []).map((a) => a.id).filter((id) => !known.has(id));
    const about = turn.referenced_anchor_id || turn.anchor_id;
    const byId = new Map((turn.anchors || this.anchors).map((a) => [a.id, a]));
    return h(
      "li",
      { class: "turn", dataset: { turn: turn.turn_index ?? "" } },
      h(
        "div",
        { class: "bubble bubble-question" },
        h("span", { class: "who", i18n: "chat.question" }),
        about ? h("button", { type: "button", class: "chip chip-small", dataset: { anchor: about }, i18n: "chat.refers", vars: { id: about }, onclick: () => this.pick(about) }) : null,
        h("p", { class: "question-text", text: turn.question }),
      ),
      h(
        "div",
        { class: "bubble bubble-answer" },
        h("span", { class: "who", i18n: "chat.answer" }),
        turn.answered_by === "node" ? h("span", { class: "badge quiet", i18n: "chat.byNode" }) : null,
        h("p", { class: "answer-text", text: turn.answer }),
        fresh.length
          ? h(
              "div",
              { class: "answer-anchors" },
              h("span", { class: "muted small", i18n: "chat.newRegions" }),
              fresh.map((id) =>
                h("button", {
                  type: "button",
                  class: "chip chip-answer",
                  dataset: { anchor: id },
                  text: byId.get(id) ? `${id} ${byId.get(id).label}` : id,
                  onclick: () => this.pick(id),
                }),
              ),
            )
          : null,
      ),
    );
  }

  // ------------------------------------------------------------------ asking

  async send() {
    const question = this.question.value.trim();
    if (!question || this.busy || !this.form) return;
    this.setBusy(true);
    unlabel(this.error);
    try {
      const result = await this.ask(question);
      this.question.value = "";
      const turn = { ...result, question: result.question || question, referenced_anchor_id: result.referenced_anchor_id ?? this.about };
      this.conversation.turns = [...this.conversation.turns, turn];
      if (result.anchors) this.conversation.anchors = result.anchors;
      this.about = null;
      this.renderAbout();
      this.renderTranscript();
      this.publishAnchors();
      const fresh = turn.new_anchor_ids?.[0];
      if (fresh) {
        this.highlight(fresh); // show where the answer points; asking about it is a click away
        this.onHighlight(fresh);
      }
    } catch (error) {
      if (error instanceof ApiError && error.status === 429) label(this.error, "chat.busy", { s: error.retryAfter || 5 });
      else label(this.error, "common.error", { detail: describe(error) });
    } finally {
      this.setBusy(false);
    }
  }

  async ask(question) {
    if (!this.conversation || this.conversation.state !== "open") await this.start();
    const body = this.about ? { question, anchor_id: this.about } : { question };
    try {
      return await postForAnswer(`/conversations/${this.conversation.id}/messages`, body);
    } catch (error) {
      if (!(error instanceof ApiError && error.status === 409)) throw error;
      await this.start(); // appended or closed elsewhere: a new conversation
      return postForAnswer(`/conversations/${this.conversation.id}/messages`, body);
    }
  }

  async start() {
    const view = await postJson(`/studies/${encodeURIComponent(this.studyUid)}/conversations`, {});
    this.conversation = { id: view.id, state: view.state || "open", anchors: view.anchors || [], turns: [] };
    sessionStorage.setItem(this.storageKey(), String(view.id));
  }

  setBusy(busy) {
    this.busy = busy;
    this.waiting.hidden = !busy;
    this.sendButton.disabled = busy;
    this.question.disabled = busy;
  }

  // ------------------------------------------------------------------ append

  confirmAppend() {
    const count = this.conversation?.turns.length || 0;
    const dialog = h(
      "dialog",
      { class: "dialog", id: "append-dialog" },
      h("p", { i18n: "chat.appendConfirm", vars: { n: count } }),
      h(
        "div",
        { class: "dialog-actions" },
        h("button", { type: "button", class: "btn btn-quiet", i18n: "common.cancel", onclick: () => dialog.close() }),
        h("button", {
          type: "button",
          class: "btn btn-primary",
          id: "append-confirm",
          i18n: "common.confirm",
          onclick: () => {
            dialog.close();
            this.append();
          },
        }),
      ),
    );
    dialog.addEventListener("close", () => dialog.remove());
    document.body.append(dialog);
    dialog.showModal();
  }

  async append() {
    try {
      const result = await postJson(`/conversations/${this.conversation.id}/append`, {});
      const reportId = result.report_id ?? result.appended_report_id ?? result.id;
      this.conversation.state = "appended";
      this.renderTranscript();
      toast("chat.appended", { id: reportId });
      this.onAppended(reportId);
    } catch (error) {
      toast("common.error", { detail: describe(error) }, "error");
    }
  }
}
