// The image with its boxes: zoom, pan, display windows, and the report's regions on top.
//
// Geometry: the PNG (the model's 896 px padded square, or the stored size) is an <img> of its
// natural size inside a "canvas" element moved by one CSS transform (translate + scale). The
// boxes are an <svg> of the same size in the same canvas, whose viewBox is in source-image
// pixels (PS3.3 C.18.6.1.1 column/row, as the report's regions are):
//   full size:  viewBox = 0 0 columns rows
//   model view: viewBox = -column_offset -row_offset side side   (the padding, then 896/side)
// so each box is drawn in the report's own coordinates and sits on the same image pixels at
// every zoom. Strokes do not scale (vector-effect); label sizes are kept constant on screen.
//
// Display windows: the API renders 8-bit images and has no window parameter, so the presets
// remap the rendered grey levels with an SVG filter (feComponentTransfer, linear), in sRGB.

import { getJson, objectUrl } from "./api.js";
import { h, replace, svg } from "./dom.js";
import { label as relabel, t } from "./i18n.js";
import { describe } from "./ui.js";

export const WINDOWS = {
  none: null,
  lung: [0.0, 0.6],
  soft: [0.3, 0.9],
  bone: [0.5, 1.0],
  contrast: [0.2, 0.8],
  invert: "invert",
};
const LABEL_PX = 13;
const ZOOM_STEP = 1.25;
const MAX_SCREEN_PER_SOURCE = 8; // at most 8 screen pixels per source pixel

export function boxSizeText(box, spacing) {
  const width = Math.abs(box[2] - box[0]);
  const height = Math.abs(box[3] - box[1]);
  if (spacing) {
    const [row, column] = spacing;
    return { key: "report.boxMm", vars: { w: (width * column).toFixed(1), h: (height * row).toFixed(1) } };
  }
  return { key: "report.boxPx", vars: { w: Math.round(width), h: Math.round(height) } };
}

export class ImageViewer {
  /**
   * onSelect(anchorId | null): a box was clicked (null: the highlight was cleared).
   */
  constructor(root, { studyUid, onSelect }) {
    this.studyUid = studyUid;
    this.onSelect = onSelect;
    this.instances = [];
    this.index = 0;
    this.mode = "model";
    this.boxes = [];
    this.highlighted = null;
    this.showBoxes = true;
    this.urls = new Map();
    this.geometries = new Map();
    this.state = { s: 1, tx: 0, ty: 0, fitted: true };
    this.frame = null; // { W, H, vb: [x, y, w, h] } of the shown image
    this.build(root);
  }

  build(root) {
    const modeButton = (mode, key, titleKey) =>
      h("button", {
        type: "button",
        class: "seg",
        dataset: { mode },
        i18n: key,
        i18nTitle: titleKey,
        onclick: () => this.setMode(mode),
      });
    this.modeButtons = [modeButton("model", "viewer.modelView", "viewer.modelViewTitle"), modeButton("full", "viewer.fullSize", "viewer.fullSizeTitle")];
    this.zoomText = h("span", { class: "zoom-text num", id: "zoom-text" });
    this.windowSelect = h(
      "select",
      { id: "window-preset", i18nTitle: "viewer.windowNote", i18nAria: "viewer.window" },
      Object.keys(WINDOWS).map((name) => h("option", { value: name, i18n: `window.${name}` })),
    );
    this.windowSelect.addEventListener("change", () => this.applyWindow());
    this.boxesToggle = h("input", { type: "checkbox", id: "boxes-toggle", checked: true });
    this.boxesToggle.addEventListener("change", () => {
      this.showBoxes = this.boxesToggle.checked;
      this.overlay.classList.toggle("hidden", !this.showBoxes);
    });
    this.imageText = h("span", { class: "muted small", id: "image-index" });
    this.prevButton = h("button", { type: "button", class: "btn btn-icon", i18nTitle: "viewer.prevImage", text: "‹", onclick: () => this.go(-1) });
    this.nextButton = h("button", { type: "button", class: "btn btn-icon", i18nTitle: "viewer.nextImage", text: "›", onclick: () => this.go(1) });
    this.imageNav = h("span", { class: "image-nav" }, this.prevButton, this.imageText, this.nextButton);

    this.img = h("img", { class: "image", id: "study-image", alt: "", draggable: "false" });
    this.overlay = svg("svg", { class: "overlay", id: "overlay", preserveAspectRatio: "none" });
    this.canvas = h("div", { class: "canvas", id: "canvas" }, this.img, this.overlay);
    this.message = h("div", { class: "stage-message", id: "stage-message" });
    this.stage = h("div", { class: "stage", id: "stage", tabindex: 0 }, this.canvas, this.message);
    this.dims = h("span", { id: "image-dims" });
    this.spacingText = h("span", { id: "image-spacing" });

    replace(
      root,
      h(
        "div",
        { class: "viewer" },
        h(
          "div",
          { class: "viewer-toolbar" },
          h("span", { class: "segmented" }, this.modeButtons),
          h("span", { class: "group" },
            h("button", { type: "button", class: "btn btn-icon", id: "zoom-out", i18nTitle: "viewer.zoomOut", text: "−", onclick: () => this.zoomBy(1 / ZOOM_STEP) }),
            this.zoomText,
            h("button", { type: "button", class: "btn btn-icon", id: "zoom-in", i18nTitle: "viewer.zoomIn", text: "+", onclick: () => this.zoomBy(ZOOM_STEP) }),
            h("button", { type: "button", class: "btn btn-quiet", id: "zoom-fit", i18n: "viewer.fit", onclick: () => this.fit() }),
            h("button", { type: "button", class: "btn btn-quiet", id: "zoom-actual", i18n: "viewer.actual", onclick: () => this.actualSize() }),
          ),
          h("label", { class: "inline" }, h("span", { i18n: "viewer.window" }), this.windowSelect),
          h("label", { class: "inline check" }, this.boxesToggle, h("span", { i18n: "viewer.boxes" })),
          this.imageNav,
        ),
        this.stage,
        h("div", { class: "viewer-footer muted small" }, this.dims, this.spacingText, h("span", { class: "spacer" }), h("span", { i18n: "viewer.hint" })),
      ),
    );
    this.bindPointer();
    this.resizeObserver = new ResizeObserver(() => {
      if (this.frame && this.state.fitted) this.fit();
    });
    this.resizeObserver.observe(this.stage);
    this.markMode();
  }

  // ------------------------------------------------------------------ images

  /** instances: [{sop_instance_uid}] in display order; start: the SOP UID to show first. */
  async setInstances(instances, start) {
    this.instances = instances;
    const found = instances.findIndex((i) => i.sop_instance_uid === start);
    this.index = found >= 0 ? found : 0;
    await this.load();
  }

  get sopUid() {
    return this.instances[this.index]?.sop_instance_uid;
  }

  async go(step) {
    const next = this.index + step;
    if (next < 0 || next >= this.instances.length) return;
    this.index = next;
    await this.load();
  }

  async setMode(mode) {
    if (mode === this.mode) return;
    this.mode = mode;
    this.markMode();
    await this.load();
  }

  markMode() {
    for (const button of this.modeButtons) button.setAttribute("aria-pressed", String(button.dataset.mode === this.mode));
  }

  async showSop(sopUid) {
    const found = this.instances.findIndex((i) => i.sop_instance_uid === sopUid);
    if (found >= 0 && found !== this.index) {
      this.index = found;
      await this.load();
    }
  }

  async load() {
    const sop = this.sopUid;
    this.imageNav.hidden = this.instances.length < 2;
    relabel(this.imageText, "viewer.image", { n: this.index + 1, total: this.instances.length });
    this.prevButton.disabled = this.index === 0;
    this.nextButton.disabled = this.index >= this.instances.length - 1;
    if (!sop) {
      this.showMessage("viewer.noImage");
      return;
    }
    this.showMessage("viewer.loading");
    const base = `/studies/${encodeURIComponent(this.studyUid)}/instances/${encodeURIComponent(sop)}`;
    const mode = this.mode;
    try {
      const geometry = await this.geometryFor(sop);
      const key = `${sop}|${mode}`;
      if (!this.urls.has(key)) this.urls.set(key, await objectUrl(`${base}/image.png${mode === "full" ? "?size=0" : ""}`));
      if (sop !== this.sopUid || mode !== this.mode) return; // the user moved on meanwhile
      await this.showImage(this.urls.get(key), geometry);
    } catch (error) {
      this.showMessage("viewer.error", { detail: describe(error) });
    }
  }

  /** Rows, columns, pixel spacing and model-view placement of one instance (cached). */
  async geometryFor(sop) {
    if (!this.geometries.has(sop)) {
      const base = `/studies/${encodeURIComponent(this.studyUid)}/instances/${encodeURIComponent(sop)}`;
      const pending = getJson(`${base}/geometry`);
      this.geometries.set(sop, pending);
      pending.catch(() => this.geometries.delete(sop));
    }
    return this.geometries.get(sop);
  }

  async showImage(url, geometry) {
    this.img.src = url;
    await this.img.decode();
    const W = this.img.naturalWidth;
    const H = this.img.naturalHeight;
    const mv = geometry.model_view;
    const vb = this.mode === "model" ? [-mv.column_offset, -mv.row_offset, mv.side, mv.side] : [0, 0, geometry.columns, geometry.rows];
    this.frame = { W, H, vb, geometry };
    this.img.width = W;
    this.img.height = H;
    this.canvas.style.width = `${W}px`;
    this.canvas.style.height = `${H}px`;
    for (const [name, value] of [["width", W], ["height", H], ["viewBox", vb.join(" ")]]) this.overlay.setAttribute(name, String(value));
    this.canvas.dataset.mode = this.mode;
    this.canvas.dataset.sop = this.sopUid;
    this.message.hidden = true;
    this.canvas.hidden = false;
    relabel(this.dims, "viewer.dims", { columns: geometry.columns, rows: geometry.rows });
    const spacing = geometry.pixel_spacing_mm;
    if (spacing) {
      relabel(this.spacingText, "viewer.spacing", { row: fmt(spacing[0]), col: fmt(spacing[1]), source: geometry.spacing_source ? { $t: `spacing.${geometry.spacing_source}` } : "" });
    } else relabel(this.spacingText, "viewer.noSpacing");
    this.applyWindow();
    this.drawBoxes();
    this.fit();
  }

  showMessage(key, vars) {
    this.canvas.hidden = true;
    this.message.hidden = false;
    relabel(this.message, key, vars);
  }

  get spacing() {
    return this.frame?.geometry.pixel_spacing_mm || null;
  }

  // ------------------------------------------------------------------ transform

  fit() {
    if (!this.frame) return;
    const { width, height } = this.stage.getBoundingClientRect();
    const s = Math.min(width / this.frame.W, height / this.frame.H);
    this.setTransform(s, (width - this.frame.W * s) / 2, (height - this.frame.H * s) / 2, true);
  }

  actualSize() {
    const { width, height } = this.stage.getBoundingClientRect();
    this.zoomAt(1 / this.state.s, width / 2, height / 2);
  }

  zoomBy(factor) {
    const { width, height } = this.stage.getBoundingClientRect();
    this.zoomAt(factor, width / 2, height / 2);
  }

  /** Scale by ``factor`` keeping the stage point (px, py) on the same image pixel. */
  zoomAt(factor, px, py) {
    if (!this.frame) return;
    const { s, tx, ty } = this.state;
    const { width, height } = this.stage.getBoundingClientRect();
    const fitScale = Math.min(width / this.frame.W, height / this.frame.H);
    const maxScale = (MAX_SCREEN_PER_SOURCE * this.frame.vb[2]) / this.frame.W;
    const next = Math.min(Math.max(s * factor, fitScale / 4), Math.max(maxScale, fitScale));
    const applied = next / s;
    this.setTransform(next, px - (px - tx) * applied, py - (py - ty) * applied, false);
  }

  panBy(dx, dy) {
    const { s, tx, ty } = this.state;
    this.setTransform(s, tx + dx, ty + dy, false);
  }

  setTransform(s, tx, ty, fitted) {
    this.state = { s, tx, ty, fitted };
    this.canvas.style.transform = `translate(${tx}px, ${ty}px) scale(${s})`;
    this.canvas.dataset.scale = String(s);
    this.zoomText.textContent = t("viewer.zoom", { pct: Math.round(s * 100) });
    this.scaleLabels();
  }

  bindPointer() {
    let drag = null;
    this.stage.addEventListener("wheel", (event) => {
      event.preventDefault();
      const rect = this.stage.getBoundingClientRect();
      this.zoomAt(Math.exp(-event.deltaY * 0.0015), event.clientX - rect.left, event.clientY - rect.top);
    }, { passive: false });
    this.stage.addEventListener("pointerdown", (event) => {
      if (event.button !== 0) return;
      drag = { x: event.clientX, y: event.clientY, moved: 0, id: event.pointerId };
    });
    this.stage.addEventListener("pointermove", (event) => {
      if (!drag || event.pointerId !== drag.id) return;
      const dx = event.clientX - drag.x;
      const dy = event.clientY - drag.y;
      drag.moved += Math.abs(dx) + Math.abs(dy);
      if (drag.moved > 3) {
        if (!this.stage.hasPointerCapture(event.pointerId)) this.stage.setPointerCapture(event.pointerId);
        this.stage.classList.add("dragging");
        this.panBy(dx, dy);
      }
      drag.x = event.clientX;
      drag.y = event.clientY;
    });
    const end = (event) => {
      if (!drag || event.pointerId !== drag.id) return;
      const wasDrag = drag.moved > 3;
      drag = null;
      this.stage.classList.remove("dragging");
      if (wasDrag) this.suppressClick = true;
    };
    this.stage.addEventListener("pointerup", end);
    this.stage.addEventListener("pointercancel", end);
    this.stage.addEventListener("click", (event) => {
      if (this.suppressClick) {
        this.suppressClick = false;
        event.stopPropagation();
      }
    }, true);
    this.stage.addEventListener("dblclick", (event) => {
      const rect = this.stage.getBoundingClientRect();
      if (this.state.fitted) this.zoomAt(2, event.clientX - rect.left, event.clientY - rect.top);
      else this.fit();
    });
    this.stage.addEventListener("keydown", (event) => {
      const moves = { ArrowLeft: [40, 0], ArrowRight: [-40, 0], ArrowUp: [0, 40], ArrowDown: [0, -40] };
      if (event.key === "+" || event.key === "=") this.zoomBy(ZOOM_STEP);
      else if (event.key === "-") this.zoomBy(1 / ZOOM_STEP);
      else if (event.key === "0") this.fit();
      else if (moves[event.key]) this.panBy(...moves[event.key]);
      else return;
      event.preventDefault();
    });
  }

  // ------------------------------------------------------------------ window

  applyWindow() {
    const preset = WINDOWS[this.windowSelect.value];
    if (!preset) {
      this.img.style.filter = "";
      return;
    }
    const [slope, intercept] = preset === "invert" ? [-1, 1] : [1 / (preset[1] - preset[0]), -preset[0] / (preset[1] - preset[0])];
    for (const func of document.querySelectorAll("#display-window feFuncR, #display-window feFuncG, #display-window feFuncB")) {
      func.setAttribute("slope", String(slope));
      func.setAttribute("intercept", String(intercept));
    }
    this.img.style.filter = "url(#display-window)";
  }

  // ------------------------------------------------------------------ boxes

  /** boxes: [{id, label, box: [x0, y0, x1, y1], image_sop_uid, source}] of every image. */
  setBoxes(boxes) {
    this.boxes = boxes;
    this.drawBoxes();
  }

  drawBoxes() {
    const overlay = this.overlay;
    while (overlay.firstChild) overlay.firstChild.remove();
    if (!this.frame) return;
    for (const anchor of this.boxes.filter((b) => b.image_sop_uid === this.sopUid)) {
      const [x0, y0, x1, y1] = anchor.box;
      const size = boxSizeText(anchor.box, this.spacing);
      const group = svg("g", { class: `box box-${anchor.source || "report"}`, "data-anchor": anchor.id });
      const title = svg("title");
      title.textContent = `${anchor.id} ${anchor.label} · ${t(size.key, size.vars)}`;
      const rect = svg("rect", {
        class: "box-rect",
        x: Math.min(x0, x1),
        y: Math.min(y0, y1),
        width: Math.abs(x1 - x0),
        height: Math.abs(y1 - y0),
        "vector-effect": "non-scaling-stroke",
        "data-anchor": anchor.id,
      });
      const text = svg("text", { class: "box-label", x: Math.min(x0, x1), y: Math.min(y0, y1), "data-anchor": anchor.id });
      text.textContent = `${anchor.id} ${anchor.label}${this.spacing ? ` · ${size.vars.w} × ${size.vars.h} mm` : ""}`;
      group.append(title, rect, text);
      group.addEventListener("click", (event) => {
        event.stopPropagation();
        this.select(this.highlighted === anchor.id ? null : anchor.id, true);
      });
      overlay.append(group);
    }
    this.markHighlight();
    this.scaleLabels();
  }

  /** Highlight one anchor's box (and bring its image); ``notify`` tells the study page. */
  async select(anchorId, notify = false) {
    this.highlighted = anchorId;
    const anchor = this.boxes.find((b) => b.id === anchorId);
    if (anchor && anchor.image_sop_uid !== this.sopUid) await this.showSop(anchor.image_sop_uid);
    this.markHighlight();
    if (notify) this.onSelect?.(anchorId);
  }

  markHighlight() {
    for (const group of this.overlay.querySelectorAll("g.box")) {
      const on = group.dataset.anchor === this.highlighted;
      group.classList.toggle("highlight", on);
      group.classList.toggle("dim", Boolean(this.highlighted) && !on);
    }
  }

  /** Labels keep LABEL_PX on screen at every zoom, above their box (inside it at the top). */
  scaleLabels() {
    if (!this.frame) return;
    const sourcePerScreen = this.frame.vb[2] / (this.frame.W * this.state.s);
    const size = LABEL_PX * sourcePerScreen;
    for (const text of this.overlay.querySelectorAll("text.box-label")) {
      const rect = text.previousElementSibling;
      const top = Number(rect.getAttribute("y"));
      const above = top - 4 * sourcePerScreen;
      const y = above - size < this.frame.vb[1] ? top + size + 2 * sourcePerScreen : above;
      text.setAttribute("font-size", String(size));
      text.setAttribute("stroke-width", String(3 * sourcePerScreen));
      text.setAttribute("y", String(y));
      text.setAttribute("x", String(Number(rect.getAttribute("x")) + 2 * sourcePerScreen));
    }
  }

  destroy() {
    this.resizeObserver.disconnect();
    for (const url of this.urls.values()) URL.revokeObjectURL(url);
    this.urls.clear();
  }
}

function fmt(value) {
  return Number(value).toFixed(3).replace(/0+$/, "").replace(/\.$/, "");
}
