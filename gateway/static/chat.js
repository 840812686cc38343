// The K2 chat page: pick a model (GET /v1/models), chat with streamed replies (POST
// /v1/chat/completions, stream=true, read with fetch + ReadableStream as server-sent events),
// see reasoning (a collapsible block) and tool calls (cards that take the tool's result and
// continue the conversation), stop a reply (AbortController: closing the connection cancels the
// request down the pipeline), send an API key as a Bearer token (kept in localStorage).
// Every error is shown in the API's own shape (status, type, code, param, message), mid-stream
// `data: {"error": ...}` frames included.
import { ApiError, api, sseData } from "./api.js";
import { ReplyView, el } from "./views.js";

const KEY_STORAGE = "k2serve.apiKey";
const $ = (id) => document.getElementById(id);
const apiKey = () => $("api-key").value.trim();

function showError(err) {
  const box = $("error");
  const status = err.status ? `${err.status} ` : "";
  const code = err.code ? ` (${err.code})` : "";
  const param = err.param ? ` [${err.param}]` : "";
  box.textContent = `${status}${err.type}${code}${param}: ${err.message}`;
  box.dataset.status = err.status ?? "";
  box.dataset.type = err.type;
  box.dataset.code = err.code ?? "";
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function setStatus(state, text) {
  $("status").dataset.state = state;
  $("status").textContent = text;
}

// `epoch` counts "New chat" presses: a reply still unwinding from an older chat leaves the
// new one's history alone.
const chat = { history: [], controller: null, pendingCalls: new Set(), epoch: 0 };

function addMessage(message) {
  chat.history.push(message);
  const node = el("div", `msg ${message.role}`);
  node.append(el("div", "role", message.role), el("div", "content", message.content));
  $("messages").append(node);
  return node;
}

function requestBody() {
  const system = $("system").value.trim();
  const body = {
    model: $("model").value,
    messages: [...(system ? [{ role: "system", content: system }] : []), ...chat.history],
    stream: true,
    stream_options: { include_usage: true },
  };
  if ($("temperature").value !== "") body.temperature = Number($("temperature").value);
  if ($("max-tokens").value !== "") body.max_tokens = Number($("max-tokens").value);
  const tools = $("tools").value.trim();
  if (tools) {
    try {
      body.tools = JSON.parse(tools);
    } catch (e) {
      throw new ApiError(null, { type: "page_error", param: "tools", message: e.message });
    }
    const choice = $("tool-choice").value.trim() || "auto";
    body.tool_choice = ["auto", "none", "required"].includes(choice)
      ? choice
      : { type: "function", function: { name: choice } };
  }
  return body;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

function answerToolCall(id, result) {
  addMessage({ role: "tool", tool_call_id: id, content: result });
  chat.pendingCalls.delete(id);
  if (chat.pendingCalls.size === 0) reply();
}

// Streams one assistant reply to the current history into `view`; the end state: done,
// stopped (aborted) or error (shown).
async function stream(view, signal) {
  try {
    const res = await api("/v1/chat/completions", apiKey(), {
      method: "POST",
      body: JSON.stringify(requestBody()),
      signal,
    });
    for await (const chunk of sseData(res.body)) {
      if (chunk.error) throw new ApiError(null, chunk.error);
      view.apply(chunk);
    }
    return "done";
  } catch (err) {
    if (err.name === "AbortError") return "stopped";
    showError(err);
    return "error";
  }
}

// The finished reply joins the history (partial when stopped). An error before any output
// takes the turn back (the user message returns to the input box), so a retry does not repeat it.
function settle(view, state, userNode) {
  const message = view.finish(state, answerToolCall);
  if (message) {
    chat.history.push(message);
    (message.tool_calls || []).forEach((call) => chat.pendingCalls.add(call.id));
  } else if (state === "error" && userNode) {
    view.node.remove();
    userNode.remove();
    $("input").value = chat.history.pop().content;
  }
  setStatus(state, state === "done" ? "" : state);
}

async function reply(userNode = null) {
  clearError();
  const view = new ReplyView($("messages"));
  const epoch = chat.epoch;
  chat.controller = new AbortController();
  setBusy(true);
  setStatus("streaming", "streaming…");
  const state = await stream(view, chat.controller.signal);
  chat.controller = null;
  setBusy(false);
  if (epoch === chat.epoch) settle(view, state, userNode);
}

// Fills the model list for the current key; the selection survives a reload that still lists
// it. Only the latest call's answer is applied (the key may change while one is in flight).
let modelsCall = 0;
async function loadModels() {
  const call = ++modelsCall;
  clearError();
  const select = $("model");
  const previous = select.value;
  try {
    const res = await api("/v1/models", apiKey());
    const ids = (await res.json()).data.map((model) => model.id);
    if (call !== modelsCall) return;
    select.replaceChildren(...ids.map((id) => el("option", "", id)));
    if (ids.includes(previous)) select.value = previous;
    select.dataset.loaded = "true";
  } catch (err) {
    if (call !== modelsCall) return;
    select.replaceChildren();
    select.dataset.loaded = "false";
    showError(err);
  }
}

function send(event) {
  event.preventDefault();
  const text = $("input").value;
  if (!text.trim() || chat.controller) return;
  $("input").value = "";
  chat.pendingCalls.clear(); // a new user turn answers no pending tool call
  reply(addMessage({ role: "user", content: text }));
}

function init() {
  $("api-key").value = localStorage.getItem(KEY_STORAGE) || "";
  $("api-key").addEventListener("change", () => {
    localStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
    loadModels();
  });
  $("composer").addEventListener("submit", send);
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) send(event);
  });
  $("stop").addEventListener("click", () => chat.controller?.abort());
  $("new-chat").addEventListener("click", () => {
    chat.controller?.abort();
    chat.epoch += 1;
    chat.history = [];
    chat.pendingCalls.clear();
    $("messages").replaceChildren();
    clearError();
    setStatus("idle", "");
  });
  loadModels();
}

document.addEventListener("DOMContentLoaded", init);
