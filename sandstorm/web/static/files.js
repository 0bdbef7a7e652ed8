// The console's file panel: the current sandbox's files over the REST routes of SPEC §8.
//
// It opens at /workspace; directories open on click and "Up" goes to the parent. A download is
// fetched with the API key (a plain link could not send it) and handed to the browser as an
// object URL. An upload, dropped on the panel or picked, is the File itself as the PUT body, so
// the browser streams it from disk. File names only ever reach the page as text.

const HOME = "/workspace";

function joinPath(dir, name) {
  return dir === "/" ? `/${name}` : `${dir}/${name}`;
}

function parentOf(path) {
  const cut = path.lastIndexOf("/");
  return cut <= 0 ? "/" : path.slice(0, cut);
}

// An entry's RFC 3339 mtime in the browser's time zone, to the second.
function formatTime(mtime) {
  const d = new Date(mtime);
  const pad = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} `
    + `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

function button(label, accessibleName, onClick, className = "btn ghost small") {
  const el = document.createElement("button");
  el.type = "button";
  el.className = className;
  el.textContent = label;
  if (accessibleName) el.setAttribute("aria-label", accessibleName);
  el.addEventListener("click", onClick);
  return el;
}

// deps: request and api (console.js's fetch helpers), showError, formatBytes, and
// onSandboxGone(id), called when a route says the sandbox has ended.
export function createFilePanel({ request, api, showError, formatBytes, onSandboxGone }) {
  const $ = (id) => document.getElementById(id);
  const ui = {
    panel: $("files"),
    path: $("files-path"),
    up: $("files-up"),
    refresh: $("files-refresh"),
    upload: $("files-upload"),
    picker: $("files-picker"),
    mkdirForm: $("files-mkdir-form"),
    mkdirName: $("files-mkdir-name"),
    mkdirButton: $("files-mkdir"),
    list: $("files-list"),
    status: $("files-status"),
  };
  let sandboxId = null;
  let dir = HOME;
  let listing = 0; // the latest listing asked for: an older answer arriving late is dropped

  function url(route, path) {
    return `/v1/sandboxes/${encodeURIComponent(sandboxId)}/files${route}`
      + `?path=${encodeURIComponent(path)}`;
  }

  function say(text) {
    ui.status.textContent = text;
  }

  function failed(err, doing) {
    if ((err.code === "not_found" || err.code === "sandbox_not_running") && sandboxId) {
      const id = sandboxId;
      showError(`the sandbox ${id} has ended; the next run starts a new one`);
      onSandboxGone(id);
      return;
    }
    showError(`${doing}: ${err.message}`);
    say("");
  }

  function setControls() {
    const off = !sandboxId;
    for (const el of [ui.refresh, ui.upload, ui.mkdirName, ui.mkdirButton]) el.disabled = off;
    ui.up.disabled = off || dir === "/";
    ui.path.textContent = sandboxId ? dir : "–";
    ui.panel.classList.toggle("files-off", off);
  }

  function setSandbox(id) {
    if (id !== sandboxId) {
      sandboxId = id;
      dir = HOME;
      ui.list.replaceChildren();
      say(id ? "" : "Run code to start a sandbox; its files show here.");
    }
    setControls();
    if (id) refresh();
  }

  async function open(path) {
    dir = path;
    setControls();
    await refresh();
  }

  async function refresh() {
    if (!sandboxId) return;
    const ticket = ++listing;
    const shown = dir;
    let body;
    try {
      body = await api("GET", url("/list", shown));
    } catch (err) {
      if (ticket === listing) failed(err, `could not list ${shown}`);
      return;
    }
    if (ticket !== listing) return;
    render(body.entries);
    const count = `${body.entries.length} ${body.entries.length === 1 ? "entry" : "entries"}`;
    say(body.truncated ? `${count} (the listing was cut short)` : count);
  }

  function render(entries) {
    const sorted = [...entries].sort((a, b) =>
      (a.type === "dir" ? 0 : 1) - (b.type === "dir" ? 0 : 1) || a.name.localeCompare(b.name));
    ui.list.replaceChildren(...sorted.map(row));
  }

  function row(entry) {
    const tr = document.createElement("tr");
    tr.dataset.name = entry.name;
    tr.dataset.type = entry.type;
    const name = document.createElement("td");
    name.className = "files-name";
    if (entry.type === "dir") {
      name.appendChild(button(`${entry.name}/`, `Open ${entry.name}`,
        () => open(entry.path), "files-open"));
    } else {
      name.textContent = entry.type === "symlink" ? `${entry.name} → ${entry.target}` : entry.name;
    }
    const cells = [
      entry.type,
      entry.type === "dir" ? "–" : formatBytes(entry.size),
      formatTime(entry.mtime),
    ].map((text) => {
      const td = document.createElement("td");
      td.textContent = text;
      return td;
    });
    const actions = document.createElement("td");
    actions.className = "files-actions";
    if (entry.type !== "dir") {
      actions.appendChild(button("Download", `Download ${entry.name}`, () => download(entry)));
    }
    actions.appendChild(button("Delete", `Delete ${entry.name}`, () => remove(entry)));
    tr.append(name, ...cells, actions);
    return tr;
  }

  async function download(entry) {
    say(`downloading ${entry.name}…`);
    let blob;
    try {
      blob = await (await request("GET", url("/content", entry.path))).blob();
    } catch (err) {
      failed(err, `could not download ${entry.path}`);
      return;
    }
    const href = URL.createObjectURL(blob);
    const link = document.createElement("a");
    link.href = href;
    link.download = entry.name;
    link.hidden = true;
    document.body.appendChild(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(href), 60_000);
    say(`downloaded ${entry.name} (${formatBytes(blob.size)})`);
  }

  async function remove(entry) {
    const dirNote = entry.type === "dir" ? " and everything in it" : "";
    if (!window.confirm(`Delete ${entry.path}${dirNote}?`)) return;
    const recursive = entry.type === "dir" ? "&recursive=true" : "";
    try {
      await request("DELETE", `${url("", entry.path)}${recursive}`);
    } catch (err) {
      failed(err, `could not delete ${entry.path}`);
      return;
    }
    await refresh();
  }

  async function makeDirectory(event) {
    event.preventDefault();
    const name = ui.mkdirName.value.trim();
    if (!sandboxId || !name) return;
    const path = name.startsWith("/") ? name : joinPath(dir, name);
    try {
      await request("POST", `${url("/mkdir", path)}&parents=true`);
    } catch (err) {
      failed(err, `could not make ${path}`);
      return;
    }
    ui.mkdirName.value = "";
    await refresh();
  }

  async function upload(fileList) {
    if (!sandboxId) {
      showError("run code first: uploads go into the sandbox a run starts");
      return;
    }
    const target = dir;
    for (const file of fileList) {
      const path = joinPath(target, file.name);
      say(`uploading ${file.name} (${formatBytes(file.size)})…`);
      try {
        await request("PUT", url("/content", path), {
          body: file, headers: { "Content-Type": "application/octet-stream" },
        });
      } catch (err) {
        failed(err, `could not upload ${path}`);
        return;
      }
    }
    await refresh();
  }

  // Files only: a dropped folder has no bytes to send.
  function droppedFiles(transfer) {
    const items = [...(transfer.items || [])].filter((item) => item.kind === "file");
    const folders = items.filter((item) => item.webkitGetAsEntry?.()?.isDirectory);
    if (folders.length) showError("folders cannot be uploaded here; drop the files themselves");
    const skip = new Set(folders.map((item) => item.getAsFile()?.name));
    return [...transfer.files].filter((file) => !skip.has(file.name));
  }

  const carriesFiles = (event) => [...(event.dataTransfer?.types || [])].includes("Files");

  function onDragOver(event) {
    if (!carriesFiles(event)) return;
    event.preventDefault();
    event.dataTransfer.dropEffect = sandboxId ? "copy" : "none";
    ui.panel.classList.add("files-dropping");
  }

  function onDragLeave(event) {
    if (!ui.panel.contains(event.relatedTarget)) ui.panel.classList.remove("files-dropping");
  }

  function onDrop(event) {
    if (!carriesFiles(event)) return;
    event.preventDefault();
    ui.panel.classList.remove("files-dropping");
    upload(droppedFiles(event.dataTransfer));
  }

  ui.up.addEventListener("click", () => open(parentOf(dir)));
  ui.refresh.addEventListener("click", refresh);
  ui.upload.addEventListener("click", () => ui.picker.click());
  ui.picker.addEventListener("change", () => {
    const picked = [...ui.picker.files];
    ui.picker.value = "";
    upload(picked);
  });
  ui.mkdirForm.addEventListener("submit", makeDirectory);
  ui.panel.addEventListener("dragenter", onDragOver);
  ui.panel.addEventListener("dragover", onDragOver);
  ui.panel.addEventListener("dragleave", onDragLeave);
  ui.panel.addEventListener("drop", onDrop);
  // Files dropped beside the panel must not make the browser open them in place of the console.
  for (const type of ["dragover", "drop"]) {
    window.addEventListener(type, (event) => {
      if (!carriesFiles(event) || ui.panel.contains(event.target)) return;
      event.preventDefault();
      event.dataTransfer.dropEffect = "none";
    });
  }
  setControls();
  say("Run code to start a sandbox; its files show here.");

  return { setSandbox, refresh };
}
