// zimage web page: plain JS, no build step. Talks to the same API as every other client:
// POST /v1/jobs, then GET /v1/jobs/{id}/events (server-sent events, read with fetch so that the API key can go
// in a header; EventSource cannot send one), then the image files, fetched with the key and shown as blob URLs.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "zimage.apiKey";

function headers(extra = {}) {
  const key = $("api-key").value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function api(method, path, body) {
  const init = { method, headers: headers(body ? { "Content-Type": "application/json" } : {}) };
  if (body) init.body = JSON.stringify(body);
  const r = await fetch(path, init);
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error((data.error && data.error.message) || `HTTP ${r.status}`);
  return data;
}

// ------------------------------------------------------------------ status
// /health is public and says only the state and the queue; the engine (model, device) is at /v1/status, behind
// the key, so it is shown once a key (or no key) is accepted.
async function pollHealth() {
  try {
    const r = await fetch("/health");
    const h = await r.json();
    let engine = "";
    const s = await fetch("/v1/status", { headers: headers() });
    if (s.ok) {
      const e = (await s.json()).engine;
      if (e) engine = ` · ${e.model} on ${e.device}`;
    }
    const jobs = `${h.running} running, ${h.queue} queued`;
    $("status").textContent = h.status === "ok" ? `ready${engine} · ${jobs}` : `${h.status}: ${h.detail || ""}`;
  } catch (e) {
    $("status").textContent = "server unreachable";
  }
  setTimeout(pollHealth, 3000);
}

// ------------------------------------------------------------------ form
function readForm() {
  const seed = $("seed").value.trim();
  const body = {
    prompt: $("prompt").value,
    negative_prompt: $("negative").value,
    size: `${$("width").value}x${$("height").value}`,
    num_inference_steps: Number($("steps").value),
    guidance_scale: Number($("guidance").value),
    n: Number($("n").value),
  };
  if (seed !== "") body.seed = Number(seed);
  const loras = chosenLoras();
  if (loras.length) body.loras = loras;
  return { ...body, ...pictureFields() };  // picture.js: image, mask, strength, size "auto"
}

function fillForm(p) {
  $("prompt").value = p.prompt;
  $("negative").value = p.negative_prompt || "";
  $("width").value = p.width;
  $("height").value = p.height;
  const preset = `${p.width}x${p.height}`;
  $("aspect").value = [...$("aspect").options].some((o) => o.value === preset) ? preset : "custom";
  $("seed").value = p.seed;
  $("steps").value = p.steps;
  $("guidance").value = p.guidance;
  $("n").value = p.n;
  $("lora-chosen").replaceChildren();
  for (const l of p.loras || []) addLora(l.name, l.scale);
  markChosen();
  window.scrollTo(0, 0);
}

$("aspect").addEventListener("change", () => {
  const v = $("aspect").value;
  if (v === "custom") return;
  const [w, h] = v.split("x");
  $("width").value = w;
  $("height").value = h;
});
for (const id of ["width", "height"]) $(id).addEventListener("input", () => { $("aspect").value = "custom"; });
$("randomize").addEventListener("click", () => { $("seed").value = Math.floor(Math.random() * 2 ** 32); });
$("api-key").value = localStorage.getItem(KEY_STORE) || "";
$("api-key").addEventListener("change", () => {
  localStorage.setItem(KEY_STORE, $("api-key").value.trim());
  loadRecent();
  loadLoras();
});

$("form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  $("form-error").textContent = "";
  try {
    const job = await api("POST", "/v1/jobs", readForm());
    track(job);
  } catch (e) {
    $("form-error").textContent = e.message;
  }
});

// ------------------------------------------------------------------ LoRAs
// GET /v1/loras lists the files requests may name (the server's --lora-dir). Each is added at most once (the
// server refuses a name given twice) and at most 8 (its limit); a file that failed to read is shown, disabled,
// with the reason as its tooltip, so that a broken file is not silently missing.
const MAX_LORAS = 8;

async function loadLoras() {
  let list;
  try {
    list = await api("GET", "/v1/loras");
  } catch (e) {
    showLoraNote(`LoRAs: ${e.message}`);
    return;
  }
  const box = $("lora-available");
  box.replaceChildren();
  $("lora-chosen").replaceChildren();
  if (!list.runtime || !list.data.length) {
    showLoraNote(list.runtime ? "no LoRA files in the server's LoRA folder" : "no LoRAs: the server was started without --lora-dir");
    return;
  }
  showLoraNote("");
  for (const lora of list.data) box.append(loraButton(lora));
}

function showLoraNote(text) {
  $("lora-note").textContent = text;
  $("lora-note").hidden = !text;
}

function loraButton(lora) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = "lora-add";
  b.dataset.lora = lora.name;
  b.textContent = `+ ${lora.name}`;
  if (lora.error) {
    b.disabled = true;
    b.title = lora.error;
    b.classList.add("broken");
  } else {
    b.title = [lora.layout, lora.rank && `rank ${lora.rank}`, lora.short_hash, lora.merged && "also merged"]
      .filter(Boolean).join(" · ");
    b.addEventListener("click", () => addLora(lora.name, 1));
  }
  return b;
}

function addLora(name, scale) {
  const chosen = $("lora-chosen");
  if (chosen.querySelector(`[data-lora="${CSS.escape(name)}"]`) || chosen.children.length >= MAX_LORAS) return;
  const row = $("lora-row").content.firstElementChild.cloneNode(true);
  row.dataset.lora = name;
  row.querySelector(".lora-name").textContent = name;
  const range = row.querySelector(".lora-range"), num = row.querySelector(".lora-scale");
  range.value = num.value = scale;
  range.addEventListener("input", () => { num.value = range.value; });
  num.addEventListener("input", () => { range.value = num.value; });  // the number may go past the slider (|s| <= 10)
  row.querySelector(".lora-remove").addEventListener("click", () => { row.remove(); markChosen(); });
  chosen.append(row);
  markChosen();
}

// an added LoRA's button is disabled until it is removed again
function markChosen() {
  const names = new Set([...$("lora-chosen").children].map((r) => r.dataset.lora));
  for (const b of $("lora-available").querySelectorAll(".lora-add:not(.broken)")) b.disabled = names.has(b.dataset.lora);
}

function chosenLoras() {
  return [...$("lora-chosen").children].map((r) => ({ name: r.dataset.lora, scale: Number(r.querySelector(".lora-scale").value) }));
}

// ------------------------------------------------------------------ jobs
function track(job) {
  const card = $("job-card").content.firstElementChild.cloneNode(true);
  card.dataset.job = job.id;
  card.querySelector(".job-prompt").textContent = job.params.prompt;
  card.querySelector(".cancel").addEventListener("click", () => api("DELETE", `/v1/jobs/${job.id}`).catch((e) => setState(card, e.message)));
  $("jobs").prepend(card);
  follow(job.id, card);
}

function setState(card, text) { card.querySelector(".job-state").textContent = text; }

async function follow(id, card) {
  const bar = card.querySelector("progress");
  try {
    const r = await fetch(`/v1/jobs/${id}/events`, { headers: headers() });
    if (!r.ok) throw new Error(`events: HTTP ${r.status}`);
    const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += value;
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        const ev = parseEvent(block);
        if (!ev) continue;
        const d = ev.data;
        if (ev.event === "queued") setState(card, `queued, position ${d.position + 1}`);
        else if (ev.event === "running") setState(card, "running");
        else if (ev.event === "progress") {
          bar.max = d.total; bar.value = d.step;
          setState(card, d.phase === "denoise" ? `step ${d.step} of ${d.total}` : d.phase);
        } else if (ev.event === "preview") card.querySelector(".preview").src = d.image;
        else if (ev.event === "succeeded") { card.remove(); await showJob(d.job); return; }
        else if (ev.event === "failed") { setState(card, `failed: ${d.job.error ? d.job.error.message : ""}`); return; }
        else if (ev.event === "cancelled") { setState(card, "cancelled"); return; }
      }
    }
  } catch (e) {
    setState(card, `lost the event stream: ${e.message}`);
  }
}

function parseEvent(block) {
  let event = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) event = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).trim());
  }
  return data.length ? { event, data: JSON.parse(data.join("\n")) } : null;
}

// ------------------------------------------------------------------ gallery
async function showJob(job) {
  const p = job.params;
  for (const img of [...job.images].reverse()) {
    const item = $("gallery-item").content.firstElementChild.cloneNode(true);
    const r = await fetch(`/v1/images/${img.id}`, { headers: headers() });
    if (!r.ok) continue;
    const url = URL.createObjectURL(await r.blob());
    const el = item.querySelector("img");
    el.src = url;
    el.alt = p.prompt;
    el.dataset.image = img.id;
    item.querySelector(".params").textContent =
      `${p.prompt} · ${p.width}x${p.height} · seed ${img.seed} · ${p.steps} steps · guidance ${p.guidance}` +
      (p.negative_prompt ? ` · not: ${p.negative_prompt}` : "");
    if (p.image_sha256) item.querySelector(".params").textContent += ` · from a picture, strength ${p.strength}` + (p.mask_sha256 ? ", masked" : "");
    if (p.loras && p.loras.length) item.querySelector(".params").textContent += ` · LoRAs ${p.loras.map((l) => `${l.name}:${l.scale}`).join(", ")}`;
    item.querySelector(".reuse").addEventListener("click", () => fillForm({ ...p, seed: img.seed, n: 1 }));
    item.querySelector(".use-image").addEventListener("click", async () => {
      await usePicture(await (await fetch(url)).blob());  // picture.js; the blob URL is this page's own copy
      $("image-box").scrollIntoView();
    });
    const a = item.querySelector(".download");
    a.href = url;
    a.download = img.id;
    $("gallery").prepend(item);
  }
}

async function loadRecent() {
  $("gallery").replaceChildren();
  try {
    const list = await api("GET", "/v1/jobs?limit=20");
    $("form-error").textContent = "";  // the key works now: an earlier "API key is not valid" is stale
    for (const job of list.data.reverse()) {
      if (job.status === "succeeded") await showJob(job);
      else if ((job.status === "queued" || job.status === "running") && !document.querySelector(`[data-job="${job.id}"]`)) track(job);
    }
  } catch (e) {
    $("form-error").textContent = e.message;
  }
}

pollHealth();
loadRecent();
loadLoras();
