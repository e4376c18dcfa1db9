// The node's REST API (/api, same origin) with the signed-in user's bearer token.
//
// The token lives in sessionStorage: it is gone when the tab closes and is never written to a
// cookie (so no other site can make the browser use it). Images and downloads are fetched
// with the token and shown through blob: URLs, since <img src> cannot send it.

const TOKEN_KEY = "mgn.token";
const RECONNECT_MS = 3000;

export class ApiError extends Error {
  constructor(status, detail, retryAfter = null) {
    super(detail);
    this.status = status;
    this.detail = detail;
    this.retryAfter = retryAfter;
  }
}

let unauthorized = () => {};

export function onUnauthorized(handler) {
  unauthorized = handler;
}

export function getToken() {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function setToken(token) {
  sessionStorage.setItem(TOKEN_KEY, token);
}

export function clearToken() {
  sessionStorage.removeItem(TOKEN_KEY);
}

/** "?a=1&status=x&status=y" from an object; empty values are left out. */
export function query(params) {
  const search = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    for (const item of Array.isArray(value) ? value : [value]) {
      if (item !== undefined && item !== null && item !== "") search.append(name, String(item));
    }
  }
  const text = search.toString();
  return text ? `?${text}` : "";
}

function headers(extra = {}) {
  const token = getToken();
  return token ? { Authorization: `Bearer ${token}`, ...extra } : extra;
}

async function errorOf(response) {
  let detail = response.statusText || `HTTP ${response.status}`;
  try {
    const body = await response.json();
    if (typeof body.detail === "string") detail = body.detail;
    else if (Array.isArray(body.detail)) {
      detail = body.detail.map((item) => item.msg || JSON.stringify(item)).join("; ");
    }
  } catch {
    // not JSON: keep the status text
  }
  const retryAfter = Number(response.headers.get("Retry-After")) || null;
  return new ApiError(response.status, detail, retryAfter);
}

export async function request(path, { method = "GET", json, signal } = {}) {
  const options = { method, headers: headers(), signal, cache: "no-store" };
  if (json !== undefined) {
    options.headers = headers({ "Content-Type": "application/json" });
    options.body = JSON.stringify(json);
  }
  let response;
  try {
    response = await fetch(`/api${path}`, options);
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "offline");
  }
  if (response.status === 401) {
    const error = await errorOf(response);
    unauthorized(error);
    throw error;
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

export async function getJson(path, options) {
  return (await request(path, options)).json();
}

export async function postJson(path, body = {}, options = {}) {
  return (await request(path, { ...options, method: "POST", json: body })).json();
}

/**
 * POST a question and return its answer. The node waits for the model up to a bounded time
 * and otherwise answers 202 with the Location of the answer (GET /api/answers/{id}); that is
 * followed, each GET waiting up to ``waitS`` seconds, until it is answered or fails.
 */
export async function postForAnswer(path, body, { waitS = 30, signal } = {}) {
  let response = await request(`${path}?wait=${waitS}`, { method: "POST", json: body, signal });
  while (response.status === 202) {
    const pending = await response.json();
    const location = response.headers.get("Location") || pending.location;
    response = await request(`${location.replace(/^\/api/, "")}?wait=${waitS}`, { signal });
  }
  return response.json();
}

export async function objectUrl(path, options) {
  const blob = await (await request(path, options)).blob();
  return URL.createObjectURL(blob);
}

/** Save an API answer as a file (SR, JSON, PDF): fetched with the token, then a blob link. */
export async function download(path, filename) {
  const response = await request(path);
  const disposition = response.headers.get("Content-Disposition") || "";
  const named = /filename="?([^";]+)"?/.exec(disposition);
  const url = URL.createObjectURL(await response.blob());
  const link = document.createElement("a");
  link.href = url;
  link.download = named ? named[1] : filename;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

/**
 * Follow /api/events (server-sent events) until ``signal`` aborts: ``onChange(token)`` for
 * every change event, ``onState(connected)`` when the stream opens or drops. A dropped
 * stream is opened again after a pause; the caller refreshes on the first event anyway.
 */
export async function watchChanges({ onChange, onState, signal }) {
  while (!signal.aborted) {
    try {
      const response = await request("/events", { signal });
      onState(true);
      await readEvents(response.body, signal, (event, data) => {
        if (event === "change") onChange(JSON.parse(data).token);
      });
    } catch (error) {
      if (signal.aborted) return;
      if (error instanceof ApiError && error.status === 401) return;
    }
    onState(false);
    await new Promise((resolve) => setTimeout(resolve, RECONNECT_MS));
  }
}

/** The text/event-stream format (WHATWG HTML 9.2): "event:" and "data:" lines, blank line. */
async function readEvents(body, signal, dispatch) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  signal.addEventListener("abort", () => reader.cancel().catch(() => {}), { once: true });
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      }
      if (data.length) dispatch(event, data.join("\n"));
    }
  }
}
