// Browser side of the studio's chunked, resumable model upload (protocol: webapp/api/v1/uploads.py).
// Runs as the `js_on_load` of the Models tab's upload block: `element` is that block, `trigger`
// fires its Gradio events ("change" once a batch has finished, so the table refreshes).
// Files are sliced (never read whole), each slice is PUT with its Content-Range, and after a dropped
// connection the upload resumes from the byte count the server reports. The upload id is remembered in
// localStorage by file name, size and date, so choosing the same file again after a reload, a crash or
// a closed tab resumes where the server stopped instead of starting over. One progress line per file.
const CHUNK = 8 * 1024 * 1024;
const MAX_RETRIES = 8;
const find = (selector) => element.querySelector(selector);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const size = (n) => n >= 1 << 30 ? `${(n / (1 << 30)).toFixed(2)} GB` : n >= 1 << 20 ? `${(n / (1 << 20)).toFixed(1)} MB`
  : `${Math.ceil(n / 1024)} KB`;

async function api(method, url, body, headers) {
  const response = await fetch(url, { method, body, headers, credentials: "same-origin" });
  let data = null;
  try { data = await response.json(); } catch (ignored) { data = null; }
  if (!response.ok) {
    const error = new Error((data && (data.detail || data.error)) || `HTTP ${response.status}`);
    error.status = response.status;
    throw error;
  }
  return data;
}

function progressLine(file) {
  const div = document.createElement("div");
  div.className = "studio-upload-line";
  div.dataset.file = file.name;
  find(".studio-upload-lines").appendChild(div);
  return (text, state) => { div.textContent = `${file.name}: ${text}`; div.dataset.state = state; };
}

async function serverOffset(id) {
  for (let attempt = 1; ; attempt += 1) {
    try { return (await api("GET", `/api/v1/uploads/${id}`)).received; } catch (error) {
      if (attempt >= MAX_RETRIES || (error.status && error.status < 500)) throw error;
      await sleep(Math.min(30000, 500 * 2 ** attempt));
    }
  }
}

async function sendBytes(file, id, show, start) {
  let offset = start;
  let failures = 0;
  while (offset < file.size) {
    const end = Math.min(offset + CHUNK, file.size);
    try {
      const answer = await api("PUT", `/api/v1/uploads/${id}`, file.slice(offset, end),
        { "content-range": `bytes ${offset}-${end - 1}/${file.size}`, "content-type": "application/octet-stream" });
      offset = answer.received;
      failures = 0;
      show(`uploading ${Math.floor((100 * offset) / file.size)}% (${size(offset)} of ${size(file.size)})`, "uploading");
    } catch (error) {
      if (error.status && error.status < 500 && error.status !== 409) throw error;  // bad input: give up
      failures += 1;
      if (failures > MAX_RETRIES) throw error;
      show(`connection lost at ${size(offset)}; resuming (attempt ${failures})`, "retrying");
      await sleep(Math.min(30000, 500 * 2 ** failures));
      offset = await serverOffset(id);
    }
  }
}

async function waitForImport(taskId, show) {
  for (;;) {
    await sleep(600);
    let task;
    try { task = await api("GET", `/api/v1/tasks/${taskId}`); } catch (error) { continue; }
    const item = task.items[0] || {};
    if (task.finished) {
      if (item.state === "failed") show(`failed — ${item.message}`, "failed");
      else show(`Active as "${item.model_name}" (${item.message})`, "done");
      return;
    }
    const pct = item.total ? ` ${Math.floor((100 * (item.done || 0)) / item.total)}%` : "";
    show(`checking: ${item.state}${pct}`, "checking");
  }
}

const remembered = (file, type) => `studio-upload:${type}:${file.name}:${file.size}:${file.lastModified}`;

async function resumable(key) {
  // An unfinished upload of this very file by this user (another user's id answers 404: start anew).
  const id = window.localStorage.getItem(key);
  if (!id) return null;
  try {
    const session = await api("GET", `/api/v1/uploads/${id}`);
    if (session.status === "open") return session;
  } catch (ignored) { /* expired, finished or not ours */ }
  window.localStorage.removeItem(key);
  return null;
}

// Who sees the uploaded models: {visibility, allowed_roles}, which the tab's "Visible to" and "Roles" pickers
// write into a hidden box in the browser itself. Unreadable: refuse rather than guess (a guess could be "everyone").
function sharing() {
  const box = document.querySelector("#models-upload-sharing textarea, #models-upload-sharing input");
  const chosen = box ? JSON.parse(box.value) : null;
  if (!chosen || !chosen.visibility) throw new Error("choose who sees the models (Visible to) again");
  return chosen;
}

async function uploadOne(file, type, shared) {
  const show = progressLine(file);
  const key = remembered(file, type);
  try {
    let session = await resumable(key);
    if (session) {
      show(`resuming at ${size(session.received)} of ${size(file.size)}`, "uploading");
    } else {
      show("starting", "uploading");
      session = await api("POST", "/api/v1/uploads",
        JSON.stringify({ file_name: file.name, size: file.size, type, ...shared }),
        { "content-type": "application/json" });
      window.localStorage.setItem(key, session.id);
    }
    await sendBytes(file, session.id, show, session.received || 0);
    const task = await api("POST", `/api/v1/uploads/${session.id}/complete`);
    window.localStorage.removeItem(key);
    show("all bytes received; checking", "checking");
    await waitForImport(task.id, show);
  } catch (error) {
    if (error.status && error.status < 500 && error.status !== 409) window.localStorage.removeItem(key);
    show(`failed — ${error.message}`, "failed");
  }
}

find(".studio-upload-button").addEventListener("click", async () => {
  const input = find(".studio-upload-input");
  const files = Array.from(input.files || []);
  if (!files.length) { find(".studio-upload-lines").textContent = "Choose one or more model files first."; return; }
  const type = find(".studio-upload-type").value;
  let shared;
  try { shared = sharing(); } catch (error) { find(".studio-upload-lines").textContent = error.message; return; }
  find(".studio-upload-lines").textContent = "";
  const button = find(".studio-upload-button");
  button.disabled = true;
  try {
    for (const file of files) await uploadOne(file, type, shared);  // one at a time: disk and link stay steady
  } finally {
    button.disabled = false;
    input.value = "";
    trigger("change");
  }
});
