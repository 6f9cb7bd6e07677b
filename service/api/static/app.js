// CleanDIFT correspondence page: plain JS, no dependencies, talks to this service's API.
"use strict";

const LAYERS = ["mid", "us1", "us2", "us3", "us4", "us5", "us6", "us7", "us8", "us9", "us10"];
const COLOURS = ["#ff3b30", "#0a84ff", "#30d158", "#ff9f0a", "#bf5af2", "#64d2ff", "#ffd60a"];
const $ = (id) => document.getElementById(id);

const state = {
  images: { source: null, target: null },  // {file, bitmap, width, height, scale}
  points: [],
  matches: [],
  heatmap: null,
};

// ---------------------------------------------------------------- API calls
function headers() {
  const key = $("apikey").value.trim();
  return key ? { "X-API-Key": key } : {};
}

async function call(path, options = {}) {
  let response;
  try {
    response = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  } catch (err) {
    throw new Error(`The service cannot be reached (${err.message}).`);
  }
  if (!response.ok) {
    let detail = response.statusText;
    try {
      const problem = await response.json();
      detail = `${problem.title}: ${problem.detail}`;
    } catch (_) { /* not problem+json */ }
    throw new Error(`The service said ${response.status} — ${detail}`);
  }
  return response.json();
}

function showError(message) {
  const box = $("error");
  box.hidden = !message;
  box.textContent = message || "";
}

function showTimings(body) {
  const t = body.timings_ms || {};
  $("status").textContent = `${body.model} ${body.model_version} · queue ${fmt(t.queue)} ms · ` +
    `inference ${fmt(t.inference)} ms · total ${fmt(t.total)} ms`;
}

const fmt = (v) => (v === undefined ? "–" : Number(v).toFixed(0));

// The served model chosen in the header (empty: the deployment's default).
const chosenModel = () => $("model-choice").value;

function fillModelChoice(listing) {
  const select = $("model-choice");
  const names = listing.served || [listing.name];
  const keep = select.value || listing.default_model || names[0];
  select.replaceChildren(...names.map((name) => new Option(name, name)));
  select.value = names.includes(keep) ? keep : names[0];
  select.disabled = names.length < 2;
}

async function loadModel() {
  try {
    const listing = await call("/v1/models");
    fillModelChoice(listing);
    const model = (listing.models || []).find((m) => m.name === chosenModel()) || listing;
    $("model").textContent = `model: ${model.name} ${model.version} (${model.input_size} px)`;
    $("layer").value = model.correspondence_layer;
    showError("");
  } catch (err) {
    $("model").textContent = "model: unavailable";
    showError(err.message);
  }
}

// ---------------------------------------------------------------- images
async function setImage(role, file) {
  if (!file) return;
  let bitmap;
  try {
    bitmap = await createImageBitmap(file, { imageOrientation: "from-image" });
  } catch (_) {
    state.images[role] = { file, bitmap: null, width: 0, height: 0, scale: 1 };
    drawImage(role);
    showError(`“${file.name}” could not be read as an image by this browser; ` +
              "the service will say whether it can.");
    if (state.images.source && state.images.target) run();
    return;
  }
  state.images[role] = { file, bitmap, width: bitmap.width, height: bitmap.height, scale: 1 };
  if (role === "source") state.points = [];
  drawImage(role);
  $(`${role}-pca`).disabled = false;
  showError("");
  if (state.images.source && state.images.target && state.points.length) run();
  else redraw();
}

function drawImage(role) {
  const img = state.images[role];
  const canvas = $(`${role}-canvas`);
  const stage = $(`${role}-stage`);
  if (!img || !img.bitmap) {
    canvas.width = canvas.height = 0;
    stage.classList.remove("loaded");
    return;
  }
  const width = Math.min(stage.parentElement.clientWidth || 480, 520);
  img.scale = width / img.width;
  canvas.width = Math.round(img.width * img.scale);
  canvas.height = Math.round(img.height * img.scale);
  canvas.getContext("2d").drawImage(img.bitmap, 0, 0, canvas.width, canvas.height);
  for (const el of [$(`${role}-marks`), ...(role === "target" ? [$("heatmap")] : [])]) {
    el.setAttribute("width", canvas.width);
    el.setAttribute("height", canvas.height);
    el.style.width = `${canvas.width}px`;
    el.style.height = `${canvas.height}px`;
  }
  stage.classList.add("loaded");
}

// Image pixel coordinates: [0, 0] is the centre of the top-left pixel (API.md).
const toImage = (img, px) => px / img.scale - 0.5;
const toDisplay = (img, x) => (x + 0.5) * img.scale;

// ---------------------------------------------------------------- drawing
function marker(svg, x, y, colour, label, attrs) {
  const ns = "http://www.w3.org/2000/svg";
  const circle = document.createElementNS(ns, "circle");
  circle.setAttribute("cx", x);
  circle.setAttribute("cy", y);
  circle.setAttribute("r", 6);
  circle.setAttribute("fill", colour);
  circle.setAttribute("stroke", "white");
  circle.setAttribute("stroke-width", 2);
  for (const [k, v] of Object.entries(attrs)) circle.setAttribute(k, v);
  const title = document.createElementNS(ns, "title");
  title.textContent = label;
  circle.appendChild(title);
  svg.appendChild(circle);
}

function redraw() {
  const src = state.images.source;
  const tgt = state.images.target;
  const srcMarks = $("source-marks");
  const tgtMarks = $("target-marks");
  srcMarks.replaceChildren();
  tgtMarks.replaceChildren();
  $("matches").replaceChildren();
  state.points.forEach(([x, y], i) => {
    const colour = COLOURS[i % COLOURS.length];
    if (src) marker(srcMarks, toDisplay(src, x), toDisplay(src, y), colour, `point ${i + 1}`,
                    { class: "point", "data-x": x, "data-y": y });
    const match = state.matches[i];
    if (!match || !tgt) return;
    const [tx, ty] = match.target;
    marker(tgtMarks, toDisplay(tgt, tx), toDisplay(tgt, ty), colour,
           `match ${i + 1}: score ${match.score.toFixed(3)}`,
           { class: "match", "data-x": tx, "data-y": ty, "data-score": match.score });
    const item = document.createElement("li");
    item.innerHTML = `<span class="swatch" style="background:${colour}"></span>` +
      `(${x.toFixed(1)}, ${y.toFixed(1)}) → (${tx.toFixed(1)}, ${ty.toFixed(1)}) · ` +
      `score ${match.score.toFixed(3)}` +
      (match.exact === false ? " · approximate (the search hit a limit)" : "");
    $("matches").appendChild(item);
  });
  drawHeatmap();
}

function drawHeatmap() {
  const canvas = $("heatmap");
  const ctx = canvas.getContext("2d");
  canvas.width = canvas.width;  // clears
  const map = state.heatmap;
  if (!map || !$("show-heatmap").checked || !state.images.target) return;
  const small = document.createElement("canvas");
  small.width = map.width;
  small.height = map.height;
  const pixels = small.getContext("2d").createImageData(map.width, map.height);
  const lo = Math.min(...map.values);
  const hi = Math.max(...map.values);
  map.values.forEach((v, i) => {
    const t = hi > lo ? (v - lo) / (hi - lo) : 0;
    pixels.data.set(colourmap(t), i * 4);
  });
  small.getContext("2d").putImageData(pixels, 0, 0);
  ctx.imageSmoothingEnabled = true;
  ctx.drawImage(small, 0, 0, canvas.width, canvas.height);
}

function colourmap(t) {  // dark blue -> red -> yellow
  const r = Math.round(255 * Math.min(1, 2 * t));
  const g = Math.round(255 * Math.max(0, 2 * t - 1));
  const b = Math.round(255 * Math.max(0, 0.6 - t));
  return [r, g, b, 255];
}

// ---------------------------------------------------------------- correspondence
async function run() {
  if (!state.images.source || !state.images.target || !state.points.length) return;
  const form = new FormData();
  form.append("source", state.images.source.file);
  form.append("target", state.images.target.file);
  form.append("points", JSON.stringify(state.points));
  form.append("layer", $("layer").value);
  form.append("heatmap", "true");
  if (chosenModel()) form.append("model", chosenModel());
  $("status").textContent = "matching…";
  try {
    const body = await call("/correspond", { method: "POST", body: form });
    state.matches = body.matches;
    state.heatmap = body.heatmap || null;
    showTimings(body);
    showError("");
  } catch (err) {
    state.matches = [];
    state.heatmap = null;
    $("status").textContent = "";
    showError(err.message);
  }
  redraw();
}

// ---------------------------------------------------------------- PCA view
function halfToFloat(h) {
  const s = (h & 0x8000) ? -1 : 1;
  const e = (h >> 10) & 0x1f;
  const f = h & 0x3ff;
  if (e === 0) return s * Math.pow(2, -14) * (f / 1024);
  if (e === 31) return f ? NaN : s * Infinity;
  return s * Math.pow(2, e - 15) * (1 + f / 1024);
}

function decodeFeature(info) {
  const bytes = Uint8Array.from(atob(info.data), (c) => c.charCodeAt(0));
  const halves = new Uint16Array(bytes.buffer);
  return Float32Array.from(halves, halfToFloat);
}

// Top-3 principal components by power iteration on X (N tokens x C channels), no C x C matrix.
function pca3(data, channels, tokens) {
  const mean = new Float32Array(channels);
  for (let c = 0; c < channels; c++) {
    let sum = 0;
    for (let n = 0; n < tokens; n++) sum += data[c * tokens + n];
    mean[c] = sum / tokens;
  }
  const x = (c, n) => data[c * tokens + n] - mean[c];
  const components = [];
  const out = [];
  for (let k = 0; k < 3; k++) {
    let v = Float32Array.from({ length: channels }, (_, i) => Math.sin(i * 12.9898 + k));
    let proj = new Float32Array(tokens);
    for (let iter = 0; iter < 15; iter++) {
      proj = new Float32Array(tokens);
      for (let c = 0; c < channels; c++) for (let n = 0; n < tokens; n++) proj[n] += x(c, n) * v[c];
      for (const [u, p] of components) {  // deflate earlier components
        let dot = 0;
        for (let n = 0; n < tokens; n++) dot += proj[n] * p[n];
        for (let n = 0; n < tokens; n++) proj[n] -= dot * p[n];
      }
      const next = new Float32Array(channels);
      for (let c = 0; c < channels; c++) {
        let sum = 0;
        for (let n = 0; n < tokens; n++) sum += x(c, n) * proj[n];
        next[c] = sum;
      }
      const norm = Math.hypot(...next) || 1;
      v = next.map((a) => a / norm);
    }
    const pnorm = Math.hypot(...proj) || 1;
    components.push([v, proj.map((a) => a / pnorm)]);
    out.push(proj);
  }
  return out;
}

async function showPca(role) {
  const img = state.images[role];
  if (!img) return;
  const form = new FormData();
  form.append("image", img.file);
  form.append("layers", $("layer").value);
  if (chosenModel()) form.append("model", chosenModel());
  $("pca-title").textContent = `(${role}, ${$("layer").value}, computing…)`;
  try {
    const body = await call("/features?format=json", { method: "POST", body: form });
    const info = body.features[$("layer").value];
    const [channels, height, width] = info.shape;
    const comps = pca3(decodeFeature(info), channels, height * width);
    const canvas = $("pca");
    canvas.width = width;
    canvas.height = height;
    const ctx = canvas.getContext("2d");
    const pixels = ctx.createImageData(width, height);
    comps.forEach((comp, k) => {
      const lo = Math.min(...comp);
      const hi = Math.max(...comp);
      comp.forEach((v, n) => { pixels.data[n * 4 + k] = hi > lo ? 255 * (v - lo) / (hi - lo) : 0; });
    });
    for (let n = 0; n < width * height; n++) pixels.data[n * 4 + 3] = 255;
    ctx.putImageData(pixels, 0, 0);
    canvas.style.width = `${Math.min(480, width * 10)}px`;
    $("pca-title").textContent = `(${role}, ${$("layer").value}, ${channels}×${height}×${width})`;
    showTimings(body);
    showError("");
  } catch (err) {
    $("pca-title").textContent = "";
    showError(err.message);
  }
}

// ---------------------------------------------------------------- wiring
function wire() {
  for (const key of LAYERS) $("layer").add(new Option(key, key));
  $("layer").value = "us6";
  $("apikey").value = localStorage.getItem("cleandift-api-key") || "";
  $("apikey").addEventListener("change", () => {
    localStorage.setItem("cleandift-api-key", $("apikey").value.trim());
    loadModel();
  });
  $("layer").addEventListener("change", run);
  $("model-choice").addEventListener("change", async () => {
    await loadModel();
    run();
  });
  $("show-heatmap").addEventListener("change", drawHeatmap);
  $("clear").addEventListener("click", () => {
    state.points = [];
    state.matches = [];
    state.heatmap = null;
    redraw();
  });
  for (const role of ["source", "target"]) {
    $(`${role}-file`).addEventListener("change", (e) => setImage(role, e.target.files[0]));
    $(`${role}-pca`).addEventListener("click", () => showPca(role));
    const stage = $(`${role}-stage`);
    stage.addEventListener("dragover", (e) => { e.preventDefault(); stage.classList.add("dragover"); });
    stage.addEventListener("dragleave", () => stage.classList.remove("dragover"));
    stage.addEventListener("drop", (e) => {
      e.preventDefault();
      stage.classList.remove("dragover");
      setImage(role, e.dataTransfer.files[0]);
    });
  }
  $("source-canvas").addEventListener("click", (e) => {
    const img = state.images.source;
    if (!img || !img.bitmap) return;
    const rect = e.target.getBoundingClientRect();
    const x = toImage(img, (e.clientX - rect.left) * (e.target.width / rect.width));
    const y = toImage(img, (e.clientY - rect.top) * (e.target.height / rect.height));
    state.points.push([Math.round(x * 10) / 10, Math.round(y * 10) / 10]);
    redraw();
    run();
  });
  loadModel();
}

wire();
