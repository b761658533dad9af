// The public v1 API, called exactly as any other client calls it: paths relative to the page's
// base URL (so the page works under any route prefix), the API key as a bearer token.

const KEY_ITEM = "consistory.apiKey";

export function apiKey() {
  return sessionStorage.getItem(KEY_ITEM) || "";
}

export function setApiKey(value) {
  // Session storage only: the key leaves with the tab, and other tabs never see it.
  if (value) sessionStorage.setItem(KEY_ITEM, value);
  else sessionStorage.removeItem(KEY_ITEM);
}

export function apiUrl(path) {
  return new URL(path, document.baseURI).href;
}

export class ApiError extends Error {
  constructor(status, detail, retryAfterS = 0) {
    super(detail);
    this.status = status;
    this.detail = detail;
    this.retryAfterS = retryAfterS;
  }
}

export function authHeaders(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : { ...extra };
}

async function errorOf(response) {
  const text = await response.text();
  let detail = `${response.status} ${response.statusText}`.trim();
  try {
    const body = JSON.parse(text);
    if (typeof body.detail === "string") detail = body.detail;
  } catch {
    // Not the service's JSON (a proxy's page): the status line says what happened.
  }
  const retry = Number(response.headers.get("Retry-After"));
  return new ApiError(response.status, detail, Number.isFinite(retry) ? retry : 0);
}

export async function call(method, path, body, options = {}) {
  const init = { method, headers: authHeaders(body === undefined ? {} : { "Content-Type": "application/json" }) };
  if (body !== undefined) init.body = JSON.stringify(body);
  if (options.signal) init.signal = options.signal;
  let response;
  try {
    response = await fetch(apiUrl(path), init);
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, `the service did not answer (${error.message}); check that it is running`);
  }
  if (!response.ok) throw await errorOf(response);
  return response.status === 204 ? null : response.json();
}

export async function openStream(path, lastEventId, signal) {
  const headers = authHeaders({ Accept: "text/event-stream" });
  if (lastEventId !== null) headers["Last-Event-ID"] = String(lastEventId);
  let response;
  try {
    response = await fetch(apiUrl(path), { headers, signal, cache: "no-store" });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, `the event stream did not open (${error.message})`);
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

function shellQuote(text) {
  return `'${text.replace(/'/g, `'\\''`)}'`;
}

export function curlCommand(method, path, body) {
  // The key is left as a variable: a command copied into a chat or a shell history stays safe.
  const parts = ["curl -s"];
  if (method !== "GET" && !(method === "POST" && body !== undefined)) parts.push(`-X ${method}`);
  parts.push(shellQuote(apiUrl(path)));
  if (apiKey() || document.documentElement.dataset.auth === "required") {
    parts.push(`-H "Authorization: Bearer $CONSISTORY_API_KEY"`);
  }
  if (body !== undefined) {
    parts.push("-H 'Content-Type: application/json'");
    parts.push(`-d ${shellQuote(JSON.stringify(body))}`);
  }
  return parts.join(" \\\n  ");
}
