"""The chat page served at `/`: one self-contained HTML document, no build step, no external assets.

It talks to the same /v1/chat/completions endpoint as any client: `fetch` with `stream: true`,
reading the body as server-sent events by hand (EventSource cannot POST). Reasoning deltas fill
a collapsible "Thinking" box above each answer and are not sent back in later turns (DeepSeek's
guidance for its reasoner: reasoning is for the reader, the next turn sees only the answer).
Model output is inserted with `textContent`, never as HTML, so a reply cannot inject markup.
The page lives in a Python string rather than a package-data file so that any install of the
package, editable or not, serves it. Left out: markdown rendering and persistence of chats.
"""

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>seekling chat</title>
<style>
  :root { --bg: #f6f7f9; --fg: #1d2330; --muted: #6b7280; --user: #dbeafe; --bot: #ffffff; --line: #e5e7eb; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; background: var(--bg);
         color: var(--fg); display: flex; flex-direction: column; height: 100vh; }
  header { display: flex; gap: 12px; align-items: center; padding: 10px 16px; border-bottom: 1px solid var(--line);
           background: #fff; flex-wrap: wrap; }
  header h1 { font-size: 16px; margin: 0 8px 0 0; }
  header label { color: var(--muted); font-size: 13px; display: flex; gap: 4px; align-items: center; }
  header input { width: 70px; padding: 2px 4px; }
  header input#apikey { width: 140px; }
  #model { color: var(--muted); font-size: 13px; }
  #messages { flex: 1; overflow-y: auto; padding: 16px; display: flex; flex-direction: column; gap: 12px; }
  .msg { max-width: 860px; width: fit-content; padding: 10px 14px; border-radius: 10px; white-space: pre-wrap;
         word-wrap: break-word; border: 1px solid var(--line); }
  .user { align-self: flex-end; background: var(--user); }
  .assistant { align-self: flex-start; background: var(--bot); min-width: 200px; }
  .error { align-self: center; background: #fee2e2; color: #991b1b; }
  details.thinking { margin-bottom: 6px; color: var(--muted); font-size: 13px; }
  details.thinking summary { cursor: pointer; user-select: none; }
  details.thinking .reasoning { border-left: 3px solid var(--line); padding-left: 8px; margin-top: 4px; }
  details.thinking.empty { opacity: 0.6; }
  .streaming .content::after { content: "\258D"; animation: blink 1s steps(2) infinite; }
  @keyframes blink { 50% { opacity: 0; } }
  form { display: flex; gap: 8px; padding: 12px 16px; border-top: 1px solid var(--line); background: #fff; }
  textarea { flex: 1; resize: none; height: 56px; padding: 8px; font: inherit; border-radius: 8px;
             border: 1px solid var(--line); }
  button { padding: 0 16px; border-radius: 8px; border: 1px solid var(--line); background: #fff; cursor: pointer; }
  button#send { background: #2563eb; color: #fff; border-color: #2563eb; }
</style>
</head>
<body>
<header>
  <h1>seekling chat</h1>
  <span id="model">connecting...</span>
  <label>temperature <input id="temperature" type="number" min="0" max="2" step="0.1" value="0.8"></label>
  <label>max tokens <input id="max_tokens" type="number" min="1" step="1" placeholder="auto"
    title="empty: as many as the context leaves"></label>
  <label>API key <input id="apikey" type="password" placeholder="if the server has one"></label>
  <button id="reset" type="button" title="forget the conversation">Reset</button>
</header>
<div id="messages" aria-live="polite"></div>
<form id="composer">
  <textarea id="input" placeholder="Message (Enter to send, Shift+Enter for a new line)"></textarea>
  <button id="send" type="submit">Send</button>
</form>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let history = [];        // [{role, content}] sent with every request
let modelName = null;
let controller = null;   // AbortController of the stream in flight
let epoch = 0;           // bumped by Reset, so a stream ending after a reset leaves history alone

function headers() {
  const h = {"Content-Type": "application/json"};
  const key = $("apikey").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", {headers: headers()});
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    modelName = body.data[0].id;
    $("model").textContent = "model: " + modelName;
  } catch (e) {
    $("model").textContent = "model list unavailable (" + e.message + ")";
  }
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  if (role === "assistant") {
    const details = document.createElement("details");
    details.className = "thinking empty";
    details.open = true;
    const summary = document.createElement("summary");
    summary.textContent = "Thinking";
    const reasoning = document.createElement("div");
    reasoning.className = "reasoning";
    details.append(summary, reasoning);
    const content = document.createElement("div");
    content.className = "content";
    div.append(details, content);
  } else {
    div.textContent = text;
  }
  $("messages").append(div);
  div.scrollIntoView({block: "end"});
  return div;
}

function showError(message) {
  addMessage("error", message);
}

// Parse a server-sent-event body: events are separated by a blank line, payload lines start "data:".
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true}).replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (data) yield data;
    }
  }
}

async function send(text) {
  if (!modelName) await loadModel();
  const turn = history.concat([{role: "user", content: text}]);
  const myEpoch = epoch;
  let failed = false;
  addMessage("user", text);
  const bubble = addMessage("assistant");
  bubble.classList.add("streaming");
  const details = bubble.querySelector("details.thinking");
  const reasoningEl = bubble.querySelector(".reasoning");
  const contentEl = bubble.querySelector(".content");
  let content = "", reasoning = "";
  controller = new AbortController();
  setBusy(true);
  try {
    const body = {model: modelName, messages: turn, stream: true, temperature: Number($("temperature").value)};
    if ($("max_tokens").value.trim() !== "") body.max_tokens = Number($("max_tokens").value);
    const r = await fetch("/v1/chat/completions", {method: "POST", headers: headers(), body: JSON.stringify(body),
                                                   signal: controller.signal});
    if (!r.ok) {
      let msg = r.status + " " + r.statusText;
      try { const e = await r.json(); if (e.error) msg = e.error.message; } catch (_) {}
      throw new Error(msg);
    }
    for await (const data of sseEvents(r)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      for (const choice of chunk.choices || []) {
        const d = choice.delta || {};
        if (d.reasoning_content) {
          reasoning += d.reasoning_content;
          reasoningEl.textContent = reasoning;
          details.classList.remove("empty");
        }
        if (d.content) {
          content += d.content;
          // Models usually start the answer with the newlines that follow </think>; don't show them.
          contentEl.textContent = content.replace(/^\s+/, "");
        }
      }
      bubble.scrollIntoView({block: "end"});
    }
  } catch (e) {
    if (e.name !== "AbortError") { failed = true; showError(e.message); }
  } finally {
    bubble.classList.remove("streaming");
    details.querySelector("summary").textContent =
      reasoning ? "Thinking (" + reasoning.length + " characters)" : "No thinking";
    if (reasoning) details.open = false;
    bubble.dataset.done = "1";
    controller = null;
    setBusy(false);
  }
  // Only the answer goes back into the conversation, never the reasoning; a failed turn is
  // dropped so the user can simply send again.
  if (!failed && myEpoch === epoch) history = turn.concat([{role: "assistant", content: content}]);
}

function setBusy(busy) {
  $("send").textContent = busy ? "Stop" : "Send";
  $("send").dataset.busy = busy ? "1" : "";
}

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  if (controller) { controller.abort(); return; }
  const text = $("input").value.trim();
  if (!text) return;
  $("input").value = "";
  send(text);
});

$("input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) {
    ev.preventDefault();
    $("composer").requestSubmit();
  }
});

$("reset").addEventListener("click", () => {
  if (controller) controller.abort();
  epoch += 1;
  history = [];
  $("messages").replaceChildren();
  $("input").focus();
});

$("apikey").addEventListener("change", loadModel);
loadModel();
</script>
</body>
</html>
"""
