// The console's shell: language, sign-in, the three pages (#/, #/study/<uid>, #/status) and
// the live stream that tells the open page to refresh.

import { ApiError, clearToken, getJson, getToken, onUnauthorized, setToken, watchChanges } from "./api.js";
import { h, replace } from "./dom.js";
import { applyLanguage, getLanguage, initialLanguage, label, setLanguage } from "./i18n.js";
import { mountStatus } from "./status.js";
import { mountStudy } from "./study.js";
import { describe } from "./ui.js";
import { mountWorklist } from "./worklist.js";

const view = document.getElementById("view");
const session = { user: null, config: { language: "en", live_interval_s: 1.5 } };
let current = null; // the mounted page: { refresh(), destroy() }
let live = null; // AbortController of the change stream

async function boot() {
  try {
    const response = await fetch("/console/config.json", { cache: "no-store" });
    if (response.ok) session.config = await response.json();
  } catch {
    // the node will say more once it answers; English until then
  }
  setLanguage(initialLanguage(session.config.language));
  markLanguage();
  for (const button of document.querySelectorAll("[data-lang]")) {
    button.addEventListener("click", () => {
      setLanguage(button.dataset.lang, true);
      markLanguage();
    });
  }
  document.getElementById("sign-out").addEventListener("click", signOut);
  onUnauthorized(() => {
    if (session.user) signOut("auth.expired");
  });
  window.addEventListener("hashchange", route);
  if (getToken()) {
    try {
      session.user = await getJson("/me");
    } catch {
      clearToken();
    }
  }
  if (session.user) signedIn();
  else showSignIn();
}

function markLanguage() {
  for (const button of document.querySelectorAll("[data-lang]")) {
    button.setAttribute("aria-pressed", String(button.dataset.lang === getLanguage()));
  }
}

function showSignIn(messageKey = null) {
  unmount();
  setChrome(false);
  const input = h("input", {
    id: "token",
    type: "password",
    autocomplete: "off",
    spellcheck: "false",
    required: true,
  });
  const message = h("p", { class: "form-error", id: "sign-in-error", role: "alert" });
  if (messageKey) label(message, messageKey);
  const form = h(
    "form",
    { class: "card sign-in", id: "sign-in" },
    h("h1", { i18n: "auth.title" }),
    h("p", { class: "muted", i18n: "auth.lead" }),
    h("label", { for: "token", i18n: "auth.token" }),
    input,
    message,
    h("button", { type: "submit", class: "btn btn-primary", i18n: "auth.submit" }),
    h("p", { class: "muted small", i18n: "auth.session" }),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    setToken(input.value.trim());
    try {
      session.user = await getJson("/me");
    } catch (error) {
      clearToken();
      label(message, error instanceof ApiError && error.status === 401 ? "auth.invalid" : "common.error", {
        detail: describe(error),
      });
      return;
    }
    signedIn();
  });
  replace(view, h("div", { class: "center" }, form));
  input.focus();
}

function signedIn() {
  setChrome(true);
  const user = document.getElementById("user");
  replace(user, h("span", { class: "user-name", text: session.user.name }), " · ", h("span", { i18n: `role.${session.user.role}` }));
  startLive();
  route();
}

function signOut(messageKey = null) {
  stopLive();
  clearToken();
  session.user = null;
  if (location.hash && location.hash !== "#/") history.replaceState(null, "", "#/");
  showSignIn(typeof messageKey === "string" ? messageKey : null);
}

function setChrome(signed) {
  for (const id of ["nav", "user", "sign-out", "live"]) document.getElementById(id).hidden = !signed;
}

function unmount() {
  current?.destroy();
  current = null;
}

function route() {
  if (!session.user) return;
  unmount();
  const hash = location.hash || "#/";
  const context = { user: session.user, config: session.config };
  const study = /^#\/study\/([^/]+)$/.exec(hash);
  let page = "worklist";
  if (study) {
    page = "study";
    current = mountStudy(view, context, decodeURIComponent(study[1]));
  } else if (hash === "#/status") {
    page = "status";
    current = mountStatus(view, context);
  } else {
    current = mountWorklist(view, context);
  }
  for (const link of document.querySelectorAll("[data-nav]")) {
    link.classList.toggle("active", link.dataset.nav === page || (page === "study" && link.dataset.nav === "worklist"));
  }
  applyLanguage(view);
  view.focus({ preventScroll: true });
}

function startLive() {
  stopLive();
  live = new AbortController();
  const indicator = document.getElementById("live");
  const text = document.getElementById("live-text");
  const show = (connected) => {
    indicator.classList.toggle("on", connected);
    label(text, connected ? "live.on" : "live.off");
  };
  show(false);
  watchChanges({
    signal: live.signal,
    onState: show,
    onChange: () => current?.refresh(),
  });
}

function stopLive() {
  live?.abort();
  live = null;
}

boot();
