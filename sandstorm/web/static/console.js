// Sandstorm web console: run code in a sandbox and watch it live (SPEC §3 and §4).
//
// Flow: POST /v1/sandboxes/run (wait: false, stdin_open: true) -> open the sandbox's WebSocket
// stream with since=0 (a replay from seq 1, so nothing between the POST and the connect is
// lost) -> render the run's events -> on `exit` show the result. The sandbox stays for the file
// panel and the next run, which is an exec in it (the stream then resumes after the last seq
// seen), until "End sandbox", the isolation level changes, the page goes or keep_alive runs out.
// Program output and file names only ever reach the page as text nodes, never as markup.

import { createFilePanel } from "/static/files.js";

const SNIPPETS = {
  python: [
    "import sys, time",
    "",
    "print(\"Hello from a sandbox!\")",
    "print(\"a warning on stderr\", file=sys.stderr)",
    "time.sleep(1)",
    "name = input(\"What's your name? \")",
    "print(f\"Nice to meet you, {name}.\")",
    "",
  ].join("\n"),
  javascript: [
    "console.log(\"Hello from a sandbox!\");",
    "console.error(\"a warning on stderr\");",
    "process.stdin.setEncoding(\"utf8\");",
    "process.stdout.write(\"What's your name? \");",
    "process.stdin.once(\"data\", (line) => {",
    "  console.log(`Nice to meet you, ${line.trim()}.`);",
    "  process.exit(0);",
    "});",
    "",
  ].join("\n"),
  bash: [
    "echo \"Hello from a sandbox!\"",
    "echo \"a warning on stderr\" >&2",
    "sleep 1",
    "printf \"What's your name? \"",
    "read -r name",
    "echo \"Nice to meet you, $name.\"",
    "",
  ].join("\n"),
  sh: [
    "echo \"Hello from a sandbox!\"",
    "echo \"a warning on stderr\" >&2",
    "printf \"What's your name? \"",
    "read -r name",
    "echo \"Nice to meet you, $name.\"",
    "",
  ].join("\n"),
};
const INDENT = { python: "    ", javascript: "  ", bash: "  ", sh: "  " };
const KEEP_ALIVE_S = 600; // idle seconds before the gateway ends the console's sandbox
const MAX_OUTPUT_CHARS = 2_000_000; // beyond this the pane stops growing (the run goes on)

const $ = (id) => document.getElementById(id);
const ui = {
  apiKey: $("api-key"),
  gateway: $("gateway-status"),
  language: $("language"),
  isolation: $("isolation"),
  code: $("code"),
  run: $("run"),
  stop: $("stop"),
  stopLabel: $("stop-label"),
  clear: $("clear"),
  error: $("error"),
  output: $("output"),
  stdinForm: $("stdin-form"),
  stdin: $("stdin"),
  stdinSend: $("stdin-send"),
  stdinClose: $("stdin-close"),
  verdict: $("verdict"),
  exit: $("m-exit"),
  duration: $("m-duration"),
  cpu: $("m-cpu"),
  rss: $("m-rss"),
  runtime: $("m-runtime"),
  sandbox: $("s-sandbox"),
  endSandbox: $("end-sandbox"),
  exec: $("s-exec"),
  state: $("s-state"),
};

// The run in progress (null when idle).
let current = null;
// The sandbox the runs share: { id, isolation, lastSeq, runtime, runtimeTitle }, or null.
let sandbox = null;
// Drafts per language, so switching languages does not lose an edit.
const drafts = {};
let escapePressed = false;
let languagesLoaded = false;

// ------------------------------------------------------------------------------- helpers

// The API key lives in this tab's sessionStorage only (never a URL: URLs land in logs). REST
// calls send it as a Bearer token; the WebSocket, which a browser cannot give headers, offers
// it as the subprotocol "bearer.<key>".
const KEY_STORAGE = "sandstorm.apiKey";

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function onApiKeyChange() {
  const key = ui.apiKey.value.trim();
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
  loadRuntimes();
  loadLanguages();
}

// A fetch with the API key. An unreachable gateway or an HTTP error throws an Error whose message
// is the gateway's own, with `status` and the error `code` (null when the body has none).
async function request(method, path, { body, headers = {} } = {}) {
  const init = { method, headers: { ...authHeaders(), ...headers } };
  if (body !== undefined) init.body = body;
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    throw new Error(`cannot reach the gateway (${err.message})`);
  }
  if (!response.ok) {
    let detail = null;
    try {
      detail = JSON.parse(await response.text()).error || null;
    } catch {
      detail = null;
    }
    const message = detail ? `${detail.message} (${detail.code}, HTTP ${response.status})`
      : `HTTP ${response.status} ${response.statusText}`;
    const error = new Error(message);
    error.status = response.status;
    error.code = detail ? detail.code : null;
    throw error;
  }
  return response;
}

// A JSON request; the parsed answer (null for an empty one).
async function api(method, path, body) {
  const options = body === undefined ? {}
    : { body: JSON.stringify(body), headers: { "Content-Type": "application/json" } };
  const text = await (await request(method, path, options)).text();
  try {
    return text ? JSON.parse(text) : null;
  } catch {
    return null;
  }
}

// The error a route gives once its sandbox has ended (DELETE, keep_alive, lifetime, failure).
function sandboxGone(err) {
  return err.code === "not_found" || err.code === "sandbox_not_running";
}

function showError(message) {
  ui.error.textContent = message;
  ui.error.hidden = !message;
}

function formatMs(ms) {
  if (ms === null || ms === undefined) return "–";
  return ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${ms.toFixed(1)} ms`;
}

function formatBytes(n) {
  if (n === null || n === undefined) return "–";
  if (n >= 1 << 20) return `${(n / (1 << 20)).toFixed(1)} MiB`;
  if (n >= 1 << 10) return `${(n / (1 << 10)).toFixed(1)} KiB`;
  return `${n} B`;
}

function setVerdict(verdict, label) {
  ui.verdict.className = `badge badge-${verdict}`;
  ui.verdict.textContent = label || verdict;
}

function setState(state) {
  ui.state.textContent = state || "–";
}

function base64ToBytes(b64) {
  const raw = atob(b64);
  const bytes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
  return bytes;
}

// ------------------------------------------------------------------------------- output

let outputChars = 0;
let outputCapped = false;

function append(kind, text) {
  if (!text) return;
  if (outputCapped) return;
  if (outputChars + text.length > MAX_OUTPUT_CHARS) {
    text = text.slice(0, Math.max(0, MAX_OUTPUT_CHARS - outputChars));
    outputCapped = true;
  }
  outputChars += text.length;
  const pane = ui.output;
  const atBottom = pane.scrollHeight - pane.scrollTop - pane.clientHeight < 24;
  const last = pane.lastElementChild;
  if (last && last.dataset.kind === kind) {
    last.firstChild.appendData(text);
  } else {
    const span = document.createElement("span");
    span.className = kind;
    span.dataset.kind = kind;
    span.appendChild(document.createTextNode(text));
    pane.appendChild(span);
  }
  if (outputCapped) note("output beyond 2 MB is not shown here; the run goes on");
  if (atBottom) pane.scrollTop = pane.scrollHeight;
}

function note(text) {
  const pane = ui.output;
  const last = pane.lastElementChild;
  const needsBreak = last && last.textContent && !last.textContent.endsWith("\n");
  const div = document.createElement("span");
  div.className = "note";
  div.dataset.kind = "note";
  div.textContent = `${needsBreak ? "\n" : ""}— ${text}\n`;
  pane.appendChild(div);
  pane.scrollTop = pane.scrollHeight;
}

function clearOutput() {
  ui.output.replaceChildren();
  outputChars = 0;
  outputCapped = false;
}

// ------------------------------------------------------------------------------- result

function resetResult() {
  setVerdict("idle", "idle");
  for (const el of [ui.exit, ui.duration, ui.cpu, ui.rss, ui.runtime]) el.textContent = "–";
}

function showResult(result) {
  setVerdict(result.verdict);
  if (result.signal !== null && result.signal !== undefined) {
    ui.exit.textContent = `signal ${result.signal}`;
  } else if (result.exit_code !== null && result.exit_code !== undefined) {
    ui.exit.textContent = String(result.exit_code);
  } else {
    ui.exit.textContent = "–";
  }
  ui.duration.textContent = formatMs(result.duration_ms);
  ui.cpu.textContent = formatMs(result.cpu_time_ms);
  ui.rss.textContent = formatBytes(result.max_rss_bytes);
}

// ------------------------------------------------------------------------------- controls

function setRunning(running) {
  ui.run.disabled = running || !languagesLoaded;
  ui.endSandbox.disabled = running || !sandbox;
  ui.stop.disabled = !running;
  ui.stdin.disabled = !running;
  ui.stdinSend.disabled = !running;
  ui.stdinClose.disabled = !running;
  ui.language.disabled = running || !languagesLoaded;
  ui.isolation.disabled = running;
  ui.stopLabel.textContent = "Stop";
  document.body.classList.toggle("running", running);
}

function send(frame) {
  if (!current || !current.ws || current.ws.readyState !== WebSocket.OPEN) return false;
  current.ws.send(JSON.stringify(frame));
  return true;
}

function stop() {
  if (!current || current.finished) return;
  // First press interrupts (SIGINT) so the program may clean up; the second press kills.
  const signal = current.interrupted ? "SIGKILL" : "SIGINT";
  if (!current.execId || !send({ type: "signal", exec_id: current.execId, signal })) {
    current.pendingStop = true; // sent once the stream is open
    return;
  }
  current.interrupted = true;
  ui.stopLabel.textContent = "Kill";
  note(`sent ${signal}`);
}

function sendStdin(event) {
  event.preventDefault();
  if (!current || current.finished) return;
  const line = ui.stdin.value;
  if (send({ type: "stdin", exec_id: current.execId, data: `${line}\n` })) {
    append("stdin", `${line}\n`);
    ui.stdin.value = "";
  }
}

function closeStdin() {
  if (!current || current.finished) return;
  if (send({ type: "stdin_close", exec_id: current.execId })) {
    note("stdin closed (EOF)");
    ui.stdin.disabled = true;
    ui.stdinSend.disabled = true;
    ui.stdinClose.disabled = true;
  }
}

// ------------------------------------------------------------------------------- run

async function run() {
  if (current && !current.finished) return;
  showError("");
  clearOutput();
  resetResult();
  ui.sandbox.textContent = "–";
  ui.exec.textContent = "–";
  setState("creating");
  setVerdict("running", "starting…");
  const run = {
    id: null, execId: null, ws: null, finished: false, interrupted: false, pendingStop: false,
    decoders: { stdout: new TextDecoder("utf-8"), stderr: new TextDecoder("utf-8") },
  };
  current = run;
  setRunning(true);
  const program = { code: ui.code.value, language: ui.language.value, wait: false, stdin_open: true };
  const isolation = ui.isolation.value;
  let body = null;
  try {
    if (sandbox && sandbox.isolation !== isolation) await endSandbox();
    if (sandbox) body = await execIn(sandbox, program);
    if (!body) body = await startSandbox(program, isolation);
  } catch (err) {
    showError(err.message);
    setVerdict("failed", "not started");
    setState(sandbox ? "idle" : "–");
    run.finished = true;
    setRunning(false);
    return;
  }
  run.id = sandbox.id;
  run.execId = body.exec_id;
  ui.sandbox.textContent = sandbox.id;
  ui.exec.textContent = body.exec_id;
  ui.runtime.textContent = sandbox.runtime;
  ui.runtime.title = sandbox.runtimeTitle;
  setState(body.state || "running");
  setVerdict("running", "running");
  openStream(run, sandbox.lastSeq);
}

async function startSandbox(program, isolation) {
  const body = await api("POST", "/v1/sandboxes/run", {
    ...program, isolation_level: isolation, keep_alive: KEEP_ALIVE_S,
  });
  sandbox = {
    id: body.id,
    isolation,
    lastSeq: 0,
    runtime: `${body.runtime} (${body.isolation_level}, ${body.selection})`,
    runtimeTitle: `isolation ${body.isolation_level}: runtime ${body.runtime} chosen by ${body.selection}`,
  };
  files.setSandbox(body.id);
  return body;
}

// The next run in the sandbox the console already has; null when that sandbox has ended.
async function execIn(box, program) {
  try {
    return await api("POST", `/v1/sandboxes/${encodeURIComponent(box.id)}/exec`, program);
  } catch (err) {
    if (!sandboxGone(err)) throw err;
    forgetSandbox(box.id);
    return null;
  }
}

function forgetSandbox(id) {
  if (!sandbox || sandbox.id !== id) return;
  sandbox = null;
  files.setSandbox(null);
  ui.endSandbox.disabled = true;
}

async function endSandbox() {
  if (!sandbox) return;
  const { id } = sandbox;
  forgetSandbox(id);
  try {
    const deleted = await api("DELETE", `/v1/sandboxes/${encodeURIComponent(id)}`);
    if (!sandbox) setState(deleted.state);
  } catch (err) {
    showError(`could not destroy ${id}: ${err.message}`);
  }
}

function openStream(run, since) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const url = `${scheme}//${location.host}/v1/sandboxes/${encodeURIComponent(run.id)}/stream?since=${since}`;
  const key = apiKey();
  const ws = key ? new WebSocket(url, [`bearer.${key}`]) : new WebSocket(url);
  run.ws = ws;
  ws.addEventListener("open", () => {
    if (run.pendingStop) {
      run.pendingStop = false;
      stop();
    }
  });
  ws.addEventListener("message", (event) => {
    let frame;
    try {
      frame = JSON.parse(event.data);
    } catch {
      return;
    }
    if (sandbox && sandbox.id === run.id && frame.seq > sandbox.lastSeq) sandbox.lastSeq = frame.seq;
    onFrame(run, frame);
  });
  ws.addEventListener("close", (event) => {
    if (!run.finished) lostStream(run, event);
  });
}

function onFrame(run, frame) {
  switch (frame.type) {
    case "status":
      setState(frame.state);
      break;
    case "stdout":
    case "stderr":
      if (frame.exec_id !== run.execId) break;
      if (frame.data_b64 !== undefined && frame.data_b64 !== null) {
        const bytes = base64ToBytes(frame.data_b64);
        append(frame.type, run.decoders[frame.type].decode(bytes, { stream: true }));
      } else {
        append(frame.type, run.decoders[frame.type].decode() + (frame.data || ""));
      }
      break;
    case "exit":
      if (frame.exec_id !== run.execId) break;
      append("stdout", run.decoders.stdout.decode());
      append("stderr", run.decoders.stderr.decode());
      finish(run, frame.result);
      break;
    case "lagged":
      note(`events ${frame.missed_from}–${frame.missed_to} were dropped from the replay buffer`);
      break;
    case "error":
      showError(`${frame.message} (${frame.code})`);
      break;
    default:
      break; // exec_started, exec_accepted and anything newer: nothing to show
  }
}

async function finish(run, result) {
  if (run.finished) return;
  run.finished = true;
  showResult(result);
  if (current === run) setRunning(false);
  const ws = run.ws;
  if (ws && ws.readyState <= WebSocket.OPEN) ws.close(1000);
  if (current !== run) return;
  files.refresh();
  try {
    const status = await api("GET", `/v1/sandboxes/${encodeURIComponent(run.id)}/status`);
    if (current === run) setState(status.state);
  } catch (err) {
    if (sandboxGone(err)) forgetSandbox(run.id);
  }
}

async function lostStream(run, event) {
  // The socket closed before the run's exit (a lagged client gets 1013, or the gateway went
  // away): the result is still available over REST.
  const why = event.code === 1013 ? "the stream fell too far behind" : `code ${event.code}`;
  note(`stream closed (${why}); fetching the result`);
  try {
    const exec = await api("GET",
      `/v1/sandboxes/${encodeURIComponent(run.id)}/execs/${encodeURIComponent(run.execId)}`);
    if (exec && exec.result) {
      if (exec.result.stdout || exec.result.stderr) note("full output as kept by the gateway:");
      append("stdout", exec.result.stdout);
      append("stderr", exec.result.stderr);
      finish(run, exec.result);
      return;
    }
    showError("the stream closed while the program was still running");
  } catch (err) {
    showError(`the stream closed and the result is unavailable: ${err.message}`);
  }
  run.finished = true;
  setVerdict("failed", "stream lost");
  if (current === run) setRunning(false);
}

// ------------------------------------------------------------------------------- editor

function onEditorKey(event) {
  if ((event.ctrlKey || event.metaKey) && event.key === "Enter") {
    event.preventDefault();
    if (!ui.run.disabled) run();
    return;
  }
  if (event.key === "Escape") {
    escapePressed = true;
    return;
  }
  if (event.key === "Tab" && !event.ctrlKey && !event.altKey && !event.metaKey) {
    if (escapePressed) {
      escapePressed = false;
      return; // let Tab move the focus
    }
    event.preventDefault();
    const indent = INDENT[ui.language.value] || "    ";
    const el = ui.code;
    const { selectionStart: start, selectionEnd: end, value } = el;
    if (event.shiftKey) {
      // Outdent the current line.
      const lineStart = value.lastIndexOf("\n", start - 1) + 1;
      const leading = value.slice(lineStart, lineStart + indent.length);
      const remove = leading.length - leading.trimStart().length;
      if (remove > 0) {
        el.setRangeText("", lineStart, lineStart + remove, "preserve");
        el.selectionStart = el.selectionEnd = Math.max(lineStart, start - remove);
      }
    } else {
      el.setRangeText(indent, start, end, "end");
    }
    drafts[ui.language.value] = el.value;
    return;
  }
  escapePressed = false;
}

function onLanguageChange() {
  const language = ui.language.value;
  ui.code.value = drafts[language] ?? SNIPPETS[language] ?? "";
}

// ------------------------------------------------------------------------------- start-up

async function loadLanguages() {
  try {
    const languages = await api("GET", "/v1/languages");
    ui.language.replaceChildren();
    for (const lang of languages) {
      const option = document.createElement("option");
      option.value = lang.name;
      option.textContent = `${lang.name} ${lang.version}`;
      ui.language.appendChild(option);
    }
    if (languages.length === 0) {
      showError("the gateway offers no languages (is the default image built?)");
      return;
    }
    languagesLoaded = true;
    ui.language.value = languages.some((l) => l.name === "python") ? "python" : languages[0].name;
    onLanguageChange();
    setRunning(false);
  } catch (err) {
    showError(`could not load languages: ${err.message}`);
  }
}

async function loadRuntimes() {
  // Annotate each isolation level with the runtimes that could serve it here.
  try {
    const runtimes = await api("GET", "/v1/runtimes");
    for (const option of ui.isolation.options) {
      const level = option.value;
      const usable = runtimes.filter((r) => r.available && r.isolation_levels.includes(level));
      option.textContent = usable.length
        ? `${level} · ${usable.map((r) => r.name).join(", ")}`
        : `${level} · no runtime here`;
    }
  } catch {
    // Purely informational.
  }
}

async function loadHealth() {
  try {
    const health = await api("GET", "/health");
    ui.gateway.textContent = `gateway ${health.version} · ${location.host}`;
    ui.gateway.classList.add("ok");
  } catch (err) {
    ui.gateway.textContent = "gateway unreachable";
    ui.gateway.classList.add("down");
  }
}

const files = createFilePanel({
  request,
  api,
  showError,
  formatBytes,
  onSandboxGone(id) {
    forgetSandbox(id);
    setState("destroyed");
  },
});

function init() {
  ui.apiKey.value = apiKey();
  ui.apiKey.addEventListener("change", onApiKeyChange);
  ui.run.addEventListener("click", run);
  ui.endSandbox.addEventListener("click", endSandbox);
  ui.stop.addEventListener("click", stop);
  ui.clear.addEventListener("click", clearOutput);
  ui.stdinForm.addEventListener("submit", sendStdin);
  ui.stdinClose.addEventListener("click", closeStdin);
  ui.code.addEventListener("keydown", onEditorKey);
  ui.code.addEventListener("input", () => { drafts[ui.language.value] = ui.code.value; });
  ui.language.addEventListener("change", onLanguageChange);
  document.addEventListener("keydown", (event) => {
    if ((event.ctrlKey || event.metaKey) && event.key === "Enter" && event.target !== ui.code) {
      event.preventDefault();
      if (!ui.run.disabled) run();
    }
  });
  // Leaving the page: do not leave the sandbox to its keep_alive.
  window.addEventListener("pagehide", () => {
    if (sandbox) {
      fetch(`/v1/sandboxes/${encodeURIComponent(sandbox.id)}`, {
        method: "DELETE", keepalive: true, headers: authHeaders(),
      });
    }
  });
  resetResult();
  loadHealth();
  loadRuntimes();
  loadLanguages();
}

init();
