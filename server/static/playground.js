// ProSocialAlign playground: a dependency-free page that talks to the server's own OpenAI-style API.
// Streaming uses fetch + ReadableStream because the chat endpoint is a POST (EventSource only does GET).
"use strict";

const PREF_KEYS = ["empathy", "sensitivity", "non_judgmental", "truthfulness", "helpfulness"];
const ATTRIBUTE_LABELS = {
  empathy: "Empathy",
  sensitivity: "Sensitivity",
  non_judgmental: "Non-judgmental stance",
  truthfulness: "Truthfulness",
  helpfulness: "Helpfulness",
  safety: "Safety",
};
const API_KEY_STORAGE = "prosocial-playground.api-key";
const MAX_TOKENS_LIMIT = 4096;

const state = {
  model: null,
  histories: { guided: [], unguided: [] },
  inFlight: [],
};

const $ = (id) => document.getElementById(id);

/** Creates an element with optional class and text, so rendering code stays free of innerHTML. */
function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function formatNumber(value, digits = 3) {
  return typeof value === "number" && Number.isFinite(value) ? value.toFixed(digits) : String(value);
}

function attributeLabel(key) {
  return ATTRIBUTE_LABELS[key] || key.replace(/_/g, " ");
}

// ---------------------------------------------------------------- settings

function apiKey() {
  return $("api-key").value.trim();
}

function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function readPrefs() {
  const prefs = {};
  for (const key of PREF_KEYS) prefs[key] = Number($(`pref-${key}`).value);
  return prefs;
}

function showFormMessage(text) {
  $("form-message").textContent = text;
}

function bindSliderOutput(input, output, digits) {
  const update = () => {
    const text = Number(input.value).toFixed(digits);
    output.textContent = text;
    input.setAttribute("aria-valuetext", text);
  };
  input.addEventListener("input", update);
  update();
}

// ---------------------------------------------------------------- errors

/** Turns an HTTP error body (OpenAI-style, FastAPI-style or plain text) into a readable message. */
function describeHttpError(status, statusText, bodyText) {
  const title = `Error ${status}${statusText ? ` ${statusText}` : ""}`;
  let body = null;
  try {
    body = JSON.parse(bodyText);
  } catch {
    body = null;
  }
  if (body && typeof body.error === "object" && body.error !== null) {
    return { title, ...describeErrorObject(body.error) };
  }
  if (body && body.detail !== undefined) {
    const detail = Array.isArray(body.detail)
      ? body.detail.map((item) => `${(item.loc || []).join(".")}: ${item.msg}`).join("; ")
      : String(body.detail);
    return { title, message: detail, details: "" };
  }
  const text = (bodyText || "").trim();
  return { title, message: text || "The server gave no explanation.", details: "" };
}

/** What the user can do about errors the server names with a stable code. */
const ERROR_HINTS = {
  missing_api_key: "Enter the API key in the settings.",
  invalid_api_key: "Check the API key in the settings.",
  guidance_disabled: "This server runs without guidance: choose the Unguided mode to chat with it.",
};

function describeErrorObject(error) {
  const parts = [];
  for (const field of ["type", "code", "param"]) {
    if (error[field] !== undefined && error[field] !== null && error[field] !== "") {
      parts.push(`${field}: ${error[field]}`);
    }
  }
  return { message: error.message || "Unknown error.", details: parts.join(", "), hint: ERROR_HINTS[error.code] };
}

function renderError(target, error) {
  target.replaceChildren();
  target.append(el("strong", "error-title", `${error.title}: `), el("span", "error-message", error.message));
  if (error.details) target.append(el("span", "error-details", ` (${error.details})`));
  if (error.hint) target.append(el("span", "error-hint", error.hint));
  target.hidden = false;
}

// ---------------------------------------------------------------- model list

async function loadModel() {
  const status = $("model-status");
  status.textContent = "loading…";
  try {
    const response = await fetch("/v1/models", { headers: authHeaders() });
    const text = await response.text();
    if (!response.ok) {
      const error = describeHttpError(response.status, response.statusText, text);
      status.textContent = `(could not load the model list: ${error.message})`;
      return { ok: false, error };
    }
    const models = JSON.parse(text).data || [];
    if (models.length === 0) {
      status.textContent = "(the server lists no models)";
      return { ok: false, error: { title: "No model", message: "The server lists no models.", details: "" } };
    }
    state.model = models[0].id;
    $("model-name").textContent = state.model;
    status.textContent = "";
    return { ok: true };
  } catch (err) {
    const error = { title: "Network error", message: `Could not reach the server (${err.message}).`, details: "" };
    status.textContent = `(${error.message})`;
    return { ok: false, error };
  }
}

// ---------------------------------------------------------------- streaming

/** Yields the data payload of each server-sent event in the response body. */
async function* readSseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let dataLines = [];
  for (;;) {
    const { value, done } = await reader.read();
    buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
    // A "\r" at the end may be the first half of "\r\n": keep it for the next read.
    const held = !done && buffer.endsWith("\r") ? "\r" : "";
    const lines = (held ? buffer.slice(0, -1) : buffer).split(/\r\n|\r|\n/);
    buffer = done ? "" : lines.pop() + held;
    for (const line of lines) {
      if (line === "") {
        if (dataLines.length) yield dataLines.join("\n");
        dataLines = [];
      } else if (line.startsWith("data:")) {
        dataLines.push(line.slice(5).replace(/^ /, ""));
      }
      // Comments (":") and other fields (event, id, retry) carry nothing the page needs.
    }
    if (done) {
      if (dataLines.length) yield dataLines.join("\n");
      return;
    }
  }
}

/**
 * Sends one chat request and reports text as it arrives.
 * Resolves to {content, prosocial, finishReason, error}; never rejects except on abort.
 */
async function streamChat(body, signal, onText) {
  const result = { content: "", prosocial: undefined, finishReason: null, error: null };
  let response;
  try {
    response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "text/event-stream", ...authHeaders() },
      body: JSON.stringify(body),
      signal,
    });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    result.error = { title: "Network error", message: `Could not reach the server (${err.message}).`, details: "" };
    return result;
  }
  if (!response.ok) {
    result.error = describeHttpError(response.status, response.statusText, await response.text());
    return result;
  }
  const contentType = response.headers.get("content-type") || "";
  if (!contentType.includes("text/event-stream")) {
    // A non-streamed body is accepted as well.
    const completion = JSON.parse(await response.text());
    const choice = (completion.choices || [])[0] || {};
    result.content = (choice.message && choice.message.content) || "";
    result.finishReason = choice.finish_reason || null;
    result.prosocial = choice.prosocial !== undefined ? choice.prosocial : completion.prosocial;
    onText(result.content);
    return result;
  }
  for await (const data of readSseData(response)) {
    if (data === "[DONE]") break;
    let chunk;
    try {
      chunk = JSON.parse(data);
    } catch {
      result.error = { title: "Stream error", message: `Unreadable event from the server: ${data}`, details: "" };
      break;
    }
    if (chunk.error) {
      result.error = { title: "Error during generation", ...describeErrorObject(chunk.error) };
      break;
    }
    const choice = (chunk.choices || [])[0];
    if (choice) {
      const delta = choice.delta || {};
      if (typeof delta.content === "string" && delta.content) {
        result.content += delta.content;
        onText(result.content);
      }
      if (choice.finish_reason) result.finishReason = choice.finish_reason;
      if (choice.prosocial !== undefined && choice.prosocial !== null) result.prosocial = choice.prosocial;
    }
    // The transparency data sits on the choice; a top-level copy is accepted too.
    if (chunk.prosocial !== undefined && chunk.prosocial !== null) result.prosocial = chunk.prosocial;
  }
  return result;
}

// ---------------------------------------------------------------- rendering

/** Names and formats of the transparency fields the server documents; others are shown as they come. */
const TRANSPARENCY_FIELDS = [
  ["guided", "Guided", (v) => (v ? "yes" : "no")],
  ["safety_mask", "Safety mask", (v) => (v ? "on" : "off")],
  ["safety_threshold", "Safety threshold", (v) => formatNumber(v, 2)],
  ["response_threshold", "Response guard threshold", (v) => formatNumber(v, 2)],
  ["masked_tokens", "Tokens masked", (v) => String(v)],
  ["content_filtered", "Content filtered", (v) => (v ? "yes" : "no")],
  ["withheld", "Text withheld", (v) => (v ? "yes" : "no")],
  ["degenerate", "Draft looped", (v) => (v ? "yes" : "no")],
  ["backtrack", "Backtracked", (v) => describeBacktrack(v)],
];

/** One line for the backtrack object: why the draft was redone and what the person got instead. */
function describeBacktrack(backtrack) {
  const why = backtrack.reason === "safety" ? "unsafe draft" : "looping draft";
  const what = backtrack.fallback ? "fallback message" : backtrack.redirected ? "safe redirect" : "regenerated";
  return `${why}: ${what} after ${backtrack.attempts} attempt(s), ${backtrack.discarded_tokens} draft tokens discarded`;
}

function renderTransparency(container, prosocial) {
  container.replaceChildren(el("h4", "", "Transparency"));
  if (!prosocial || typeof prosocial !== "object") {
    container.append(el("p", "not-available", "not available"));
    return;
  }
  const table = el("table", "transparency-table");
  const tbody = el("tbody");
  const addRow = (name, value) => {
    const header = el("th", "", name);
    header.scope = "row";
    const row = el("tr");
    row.append(header, el("td", "", value));
    tbody.append(row);
  };
  const shown = new Set(["prefs", "mean_rewards"]);
  for (const [key, name, format] of TRANSPARENCY_FIELDS) {
    shown.add(key);
    if (!(key in prosocial)) continue;
    addRow(name, prosocial[key] === null ? "n/a" : format(prosocial[key]));
  }
  for (const [group, prefix, digits] of [
    ["prefs", "Weight", 2],
    ["mean_rewards", "Mean reward", 3],
  ]) {
    const values = prosocial[group];
    if (!values || typeof values !== "object") continue;
    for (const [key, value] of Object.entries(values)) {
      addRow(`${prefix}: ${attributeLabel(key)}`, formatNumber(value, digits));
    }
  }
  for (const [key, value] of Object.entries(prosocial)) {
    if (shown.has(key)) continue;
    const text = value !== null && typeof value === "object" ? JSON.stringify(value) : String(value);
    addRow(attributeLabel(key), text);
  }
  table.append(tbody);
  container.append(table);
}

/** Keeps the newest text in view inside a pane's scrolling log. */
function scrollToEnd(log) {
  log.scrollTop = log.scrollHeight;
}

/** Adds one user/assistant exchange to a pane and returns the nodes that get filled in later. */
function appendTurn(paneName, userText) {
  const log = $(`log-${paneName}`);
  const turn = el("article", "turn");
  turn.setAttribute("aria-busy", "true");
  const user = el("div", "msg user");
  user.append(el("span", "role", "You"), el("p", "text", userText));
  const reply = el("div", "reply");
  const assistant = el("div", "msg assistant");
  const content = el("p", "text content");
  const status = el("p", "status muted", "waiting for the server…");
  assistant.append(el("span", "role", "Assistant"), content, status);
  const transparency = el("aside", "transparency");
  transparency.setAttribute("aria-label", `Transparency data (${paneName})`);
  reply.append(assistant, transparency);
  const error = el("div", "error");
  error.setAttribute("role", "alert");
  error.hidden = true;
  turn.append(user, error, reply);
  log.append(turn);
  scrollToEnd(log);
  return { log, turn, content, status, transparency, error };
}

// ---------------------------------------------------------------- sending

function buildBody(paneName, messages) {
  const body = {
    model: state.model,
    messages,
    stream: true,
    temperature: Number($("temperature").value),
    max_tokens: Number($("max-tokens").value),
  };
  if (paneName === "unguided") body.prosocial_guidance = false;
  else body.prosocial_prefs = readPrefs();
  return body;
}

async function runPane(paneName, userText, controller) {
  const nodes = appendTurn(paneName, userText);
  const messages = [...state.histories[paneName], { role: "user", content: userText }];
  try {
    const result = await streamChat(buildBody(paneName, messages), controller.signal, (text) => {
      nodes.content.textContent = text;
      nodes.status.textContent = "streaming…";
      scrollToEnd(nodes.log);
    });
    renderTransparency(nodes.transparency, result.prosocial);
    if (result.error) {
      nodes.status.textContent = result.content ? "interrupted" : "no reply";
      renderError(nodes.error, result.error);
    } else {
      nodes.status.textContent = result.finishReason ? `finished (${result.finishReason})` : "finished";
      if (!result.content) nodes.content.textContent = "(empty reply)";
      state.histories[paneName] = [...messages, { role: "assistant", content: result.content }];
    }
  } catch (err) {
    nodes.status.textContent = err.name === "AbortError" ? "stopped" : `failed: ${err.message}`;
    renderTransparency(nodes.transparency, undefined);
  } finally {
    nodes.turn.setAttribute("aria-busy", "false");
    scrollToEnd(nodes.log);
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

/** Checks the form; returns an error sentence or "" when it can be sent. */
function validateForm(userText, mode) {
  if (!userText) return "Type a message first.";
  const prefs = readPrefs();
  if (mode !== "unguided" && PREF_KEYS.every((key) => prefs[key] === 0)) {
    return "Set at least one preference slider above zero: the server rejects an all-zero preference vector.";
  }
  const maxTokens = Number($("max-tokens").value);
  if (!Number.isInteger(maxTokens) || maxTokens < 1 || maxTokens > MAX_TOKENS_LIMIT) {
    return `Max tokens must be a whole number from 1 to ${MAX_TOKENS_LIMIT}.`;
  }
  return "";
}

async function onSubmit(event) {
  event.preventDefault();
  const userText = $("prompt").value.trim();
  const mode = selectedMode();
  const problem = validateForm(userText, mode);
  showFormMessage(problem);
  if (problem) return;
  const panes = panesForMode(mode);
  setBusy(true);
  try {
    if (!state.model) {
      const loaded = await loadModel();
      if (!loaded.ok) {
        for (const paneName of panes) {
          const nodes = appendTurn(paneName, userText);
          nodes.turn.setAttribute("aria-busy", "false");
          nodes.status.textContent = "not sent";
          renderError(nodes.error, { ...loaded.error, title: `Could not load the model list: ${loaded.error.title}` });
          renderTransparency(nodes.transparency, undefined);
        }
        return;
      }
    }
    $("prompt").value = "";
    state.inFlight = panes.map(() => new AbortController());
    await Promise.all(panes.map((paneName, i) => runPane(paneName, userText, state.inFlight[i])));
  } finally {
    state.inFlight = [];
    setBusy(false);
  }
}

function stopAll() {
  for (const controller of state.inFlight) controller.abort();
}

function clearConversation() {
  stopAll();
  state.histories = { guided: [], unguided: [] };
  $("log-guided").replaceChildren();
  $("log-unguided").replaceChildren();
  showFormMessage("");
  $("prompt").focus();
}

function selectedMode() {
  return document.querySelector('input[name="mode"]:checked').value;
}

/** The panes a send goes to, in display order. */
function panesForMode(mode) {
  return mode === "both" ? ["unguided", "guided"] : [mode];
}

function applyMode() {
  const panes = panesForMode(selectedMode());
  $("pane-unguided").hidden = !panes.includes("unguided");
  $("pane-guided").hidden = !panes.includes("guided");
  $("panes").classList.toggle("two", panes.length === 2);
}

// ---------------------------------------------------------------- start-up

function init() {
  for (const key of PREF_KEYS) {
    const input = $(`pref-${key}`);
    bindSliderOutput(input, $(`pref-${key}-value`), 2);
    input.addEventListener("input", () => showFormMessage(""));
  }
  bindSliderOutput($("temperature"), $("temperature-value"), 2);

  const keyInput = $("api-key");
  keyInput.value = sessionStorage.getItem(API_KEY_STORAGE) || "";
  keyInput.addEventListener("input", () => sessionStorage.setItem(API_KEY_STORAGE, keyInput.value));
  keyInput.addEventListener("change", () => loadModel());

  $("chat-form").addEventListener("submit", onSubmit);
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      $("chat-form").requestSubmit();
    }
  });
  $("stop").addEventListener("click", stopAll);
  $("clear").addEventListener("click", clearConversation);
  for (const radio of document.querySelectorAll('input[name="mode"]')) radio.addEventListener("change", applyMode);
  applyMode();
  loadModel();
}

document.addEventListener("DOMContentLoaded", init);
