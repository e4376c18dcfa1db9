// What every page shares: roles, messages, error texts.

import { ApiError } from "./api.js";
import { label, t } from "./i18n.js";

const ROLE_RANK = { viewer: 0, radiologist: 1, admin: 2 };

/** Radiologists and administrators ask questions and append them to reports. */
export function canAsk(user) {
  return ROLE_RANK[user?.role] >= ROLE_RANK.radiologist;
}

export function isAdmin(user) {
  return user?.role === "admin";
}

let toastTimer = null;

/** A short message at the bottom of the page (translated, relabelled on a switch). */
export function toast(key, vars, kind = "info") {
  const element = document.getElementById("toast");
  label(element, key, vars);
  element.className = `toast toast-${kind}`;
  element.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => (element.hidden = true), kind === "error" ? 8000 : 4000);
}

/** The message of any error, for toast("common.error", {detail}). */
export function describe(error) {
  if (error instanceof ApiError) {
    if (error.status === 0) return t("common.offline");
    if (error.status === 403) return t("common.forbidden");
    return error.detail;
  }
  return String(error?.message || error);
}
