// Small DOM helpers: elements from a tag, properties and children; nothing is parsed as HTML,
// so text from the model or a DICOM header can never become markup.

import { label, t } from "./i18n.js";

const I18N_ATTRIBUTES = { i18nTitle: "title", i18nPlaceholder: "placeholder", i18nAria: "aria-label" };

const SVG_NS = "http://www.w3.org/2000/svg";

/**
 * h("button", {class: "btn", i18n: "chat.send", onclick: f}, child, ...)
 * Properties: class, text, i18n (+ vars), title/placeholder/aria keys (i18nTitle,
 * i18nPlaceholder, i18nAria), dataset, on<event>, anything else as an attribute.
 */
export function h(tag, props = {}, ...children) {
  const element = document.createElement(tag);
  setProps(element, props);
  append(element, children);
  return element;
}

export function svg(tag, attributes = {}) {
  const element = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value !== undefined && value !== null) element.setAttribute(name, String(value));
  }
  return element;
}

function setProps(element, props) {
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") element.className = value;
    else if (name === "text") element.textContent = value;
    else if (name === "i18n") label(element, value, props.vars);
    else if (name === "vars") continue;
    else if (name === "dataset") Object.assign(element.dataset, value);
    else if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else if (name in I18N_ATTRIBUTES) {
      element.dataset[name] = value;
      element.setAttribute(I18N_ATTRIBUTES[name], t(value));
    } else if (value === true) element.setAttribute(name, "");
    else element.setAttribute(name, String(value));
  }
}

export function append(element, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return element;
}

export function clear(element) {
  while (element.firstChild) element.firstChild.remove();
  return element;
}

export function replace(element, ...children) {
  clear(element);
  return append(element, children);
}
