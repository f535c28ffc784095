// segserve's page: drop an image, see its segmentation, explore classes and probabilities. Plain JS, no
// dependencies, nothing fetched from anywhere but this service. Endpoints used: /models, /metadata, /segment,
// /heatmaps (format=png: a stored zip of 8-bit PNGs, one per class), /analyze, /overlay (a browser that cannot
// show the file itself, e.g. TIFF, gets the service's decoding of it).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { meta: null, model: "", width: 0, height: 0, labels: null, probs: null, shown: new Set(),
  heat: null, analysis: null, urls: [] };

class ApiError extends Error {}

async function api(path, options) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (error) {
    throw new ApiError(`the service did not answer (${error.message})`);
  }
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error || message; } catch (_) { /* not JSON */ }
    throw new ApiError(message);
  }
  return response;
}

function form(file, fields = {}) {
  const body = new FormData();
  body.append("image", file, file.name || "upload");
  if (state.model) body.append("model", state.model);
  for (const [key, value] of Object.entries(fields)) body.append(key, value);
  return { method: "POST", body };
}

function setBusy(text) {
  $("status").textContent = text || "";
  $("status").classList.toggle("busy", Boolean(text));
}

function showError(text) {
  $("error").hidden = !text;
  $("error").textContent = text || "";
}

// ---------------------------------------------------------------------------------------------------- the model
async function loadModels() {
  const listing = await (await api("models")).json();
  const select = $("model");
  select.replaceChildren();
  for (const model of listing.models) {
    for (const version of model.versions) {
      const option = new Option(`${model.name}@${version.version}`, `${model.name}@${version.version}`);
      option.selected = version.default;
      select.append(option);
    }
  }
  $("model-picker").hidden = select.options.length < 2;
  state.model = select.options.length > 1 ? select.value : "";
  await loadCard();
}

async function loadCard() {
  const query = state.model ? `?model=${encodeURIComponent(state.model)}` : "";
  state.meta = await (await api(`metadata${query}`)).json();
  state.shown = new Set(state.meta.classes.map((_, index) => index));
  const card = $("card");
  card.replaceChildren();
  const validation = state.meta.validation || {};
  const percent = (value) => (typeof value === "number" ? `${(100 * (value > 1 ? value / 100 : value)).toFixed(1)}%` : "");
  const rows = [
    ["model", state.meta.model ? `${state.meta.model.name}@${state.meta.model.version}` : ""],
    ["backbone", `${state.meta.backbone} ${state.meta.variant || ""}`],
    ["classes", String(state.meta.classes.length)],
    ["trained on", state.meta.training_data || ""],
    ["image size", state.meta.image_size ? state.meta.image_size.join("x") : ""],
    ["val mIoU", percent(validation.mean_iou)],
    ["val pixel acc", percent(validation.pixel_accuracy)],
    ["engine", state.meta.engine ? state.meta.engine.engine + " " + state.meta.engine.precision : ""],
    ["providers", (state.meta.providers || []).join(", ")],
  ];
  for (const [term, value] of rows) {
    if (!value) continue;
    card.append(Object.assign(document.createElement("dt"), { textContent: term }));
    card.append(Object.assign(document.createElement("dd"), { textContent: value }));
  }
  renderLegend();
}

function renderLegend() {
  const body = $("legend").tBodies[0];
  body.replaceChildren();
  const present = new Map((state.analysis ? state.analysis.classes : []).map((entry) => [entry.index, entry]));
  state.meta.classes.forEach((name, index) => {
    const row = body.insertRow();
    row.dataset.index = index;
    row.classList.toggle("chosen", state.heat === index);
    const toggle = Object.assign(document.createElement("input"), { type: "checkbox", checked: state.shown.has(index) });
    toggle.setAttribute("aria-label", `show ${name}`);
    toggle.addEventListener("change", () => {
      if (toggle.checked) state.shown.add(index); else state.shown.delete(index);
      drawOverlay();
    });
    row.insertCell().append(toggle);
    const [r, g, b] = state.meta.palette[index];
    const swatch = Object.assign(document.createElement("span"), { className: "swatch" });
    swatch.style.background = `rgb(${r},${g},${b})`;
    const pick = Object.assign(document.createElement("button"), { type: "button", textContent: name });
    pick.addEventListener("click", () => showHeatmap(state.heat === index ? null : index));
    row.insertCell().append(swatch, pick);
    const entry = present.get(index);
    row.insertCell().textContent = entry ? `${(100 * entry.share).toFixed(1)}%` : "";
    row.insertCell().textContent = entry && entry.mean_confidence !== undefined ? `${(100 * entry.mean_confidence).toFixed(0)}%` : "";
    row.cells[2].className = row.cells[3].className = "num";
  });
}

// ---------------------------------------------------------------------------------------------------- decoding
async function pixelsOf(blob) {
  const bitmap = await createImageBitmap(blob);
  const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.drawImage(bitmap, 0, 0);
  return context.getImageData(0, 0, bitmap.width, bitmap.height);
}

function storedZipEntries(buffer) {
  // The service's heatmap zip stores its PNGs uncompressed: walk the local file headers.
  const view = new DataView(buffer);
  const entries = [];
  let offset = 0;
  while (offset + 30 <= buffer.byteLength && view.getUint32(offset, true) === 0x04034b50) {
    const method = view.getUint16(offset + 8, true);
    const size = view.getUint32(offset + 18, true);
    const nameLength = view.getUint16(offset + 26, true);
    const extraLength = view.getUint16(offset + 28, true);
    const name = new TextDecoder().decode(new Uint8Array(buffer, offset + 30, nameLength));
    const start = offset + 30 + nameLength + extraLength;
    if (method !== 0) throw new ApiError(`unexpected compressed heatmap ${name}`);
    entries.push({ name, data: new Uint8Array(buffer, start, size) });
    offset = start + size;
  }
  return entries;
}

// ---------------------------------------------------------------------------------------------------- segmenting
async function segment(file) {
  showError("");
  if (!file) return;
  setBusy(`Segmenting ${file.name || "the image"} …`);
  $("drop").setAttribute("aria-busy", "true");
  try {
    const [labelsBlob, heatBlob, analysis] = await Promise.all([
      api("segment", form(file)).then((r) => r.blob()),
      api("heatmaps", form(file, { format: "png" })).then((r) => r.blob()),
      api("analyze", form(file)).then((r) => r.json()),
    ]);
    let photo;
    try {
      photo = await createImageBitmap(file);
    } catch (_) { // a format this browser cannot show: the service's own decoding
      photo = await createImageBitmap(await api("overlay", form(file, { alpha: "0" })).then((r) => r.blob()));
    }
    const labelPixels = await pixelsOf(labelsBlob);
    const colours = new Map(state.meta.palette.map(([r, g, b], index) => [(r << 16) | (g << 8) | b, index]));
    const labels = new Uint16Array(labelPixels.width * labelPixels.height);
    for (let i = 0, j = 0; i < labels.length; i += 1, j += 4) {
      const d = labelPixels.data;
      labels[i] = colours.get((d[j] << 16) | (d[j + 1] << 8) | d[j + 2]) ?? 0;
    }
    const probs = new Array(state.meta.classes.length).fill(null);
    for (const entry of storedZipEntries(await heatBlob.arrayBuffer())) {
      const index = parseInt(entry.name, 10);
      const image = await pixelsOf(new Blob([entry.data], { type: "image/png" }));
      const channel = new Uint8Array(image.width * image.height);
      for (let i = 0; i < channel.length; i += 1) channel[i] = image.data[4 * i];
      probs[index] = channel;
    }
    Object.assign(state, { width: labelPixels.width, height: labelPixels.height, labels, probs, analysis, heat: null });
    for (const url of state.urls) URL.revokeObjectURL(url);
    state.urls = [URL.createObjectURL(labelsBlob), URL.createObjectURL(heatBlob)];
    $("dl-labels").href = state.urls[0];
    $("dl-heatmaps").href = state.urls[1];
    for (const id of ["photo", "overlay", "heat"]) Object.assign($(id), { width: state.width, height: state.height });
    $("photo").getContext("2d").drawImage(photo, 0, 0, state.width, state.height);
    $("result").hidden = false;
    drawOverlay();
    showHeatmap(null);
    renderLegend();
    const inference = analysis.timings_ms ? ` in ${Math.round(analysis.timings_ms.inference)} ms` : "";
    setBusy("");
    $("status").textContent = `${state.width}x${state.height}, ${analysis.model || ""} ${analysis.engine}${inference}`;
  } catch (error) {
    setBusy("");
    showError(error instanceof ApiError ? error.message : `could not show the result: ${error.message}`);
  } finally {
    $("drop").removeAttribute("aria-busy");
  }
}

function drawOverlay() {
  if (!state.labels) return;
  const canvas = $("overlay");
  const context = canvas.getContext("2d");
  const image = context.createImageData(state.width, state.height);
  const palette = state.meta.palette;
  for (let i = 0, j = 0; i < state.labels.length; i += 1, j += 4) {
    const index = state.labels[i];
    if (!state.shown.has(index)) continue;
    const colour = palette[index];
    image.data[j] = colour[0]; image.data[j + 1] = colour[1]; image.data[j + 2] = colour[2]; image.data[j + 3] = 255;
  }
  context.putImageData(image, 0, 0);
  canvas.style.opacity = $("opacity").value;
  // the download is the blend the user sees
  const blend = new OffscreenCanvas(state.width, state.height);
  const blendContext = blend.getContext("2d");
  blendContext.drawImage($("photo"), 0, 0);
  blendContext.globalAlpha = Number($("opacity").value);
  blendContext.drawImage(canvas, 0, 0);
  blend.convertToBlob({ type: "image/png" }).then((blob) => {
    if (state.urls[2]) URL.revokeObjectURL(state.urls[2]);
    state.urls[2] = URL.createObjectURL(blob);
    $("dl-overlay").href = state.urls[2];
  });
}

// viridis, five stops
const STOPS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
function colourOf(value) {
  const position = (value / 255) * (STOPS.length - 1);
  const low = Math.min(Math.floor(position), STOPS.length - 2);
  const t = position - low;
  return STOPS[low].map((c, k) => Math.round(c + t * (STOPS[low + 1][k] - c)));
}

function showHeatmap(index) {
  state.heat = index;
  const heat = $("heat");
  heat.hidden = index === null || !state.probs || !state.probs[index];
  $("heat-scale").hidden = heat.hidden;
  $("overlay").hidden = !heat.hidden;
  renderLegend();
  if (heat.hidden) return;
  const context = heat.getContext("2d");
  const image = context.createImageData(state.width, state.height);
  const lookup = Array.from({ length: 256 }, (_, v) => colourOf(v));
  const values = state.probs[index];
  for (let i = 0, j = 0; i < values.length; i += 1, j += 4) {
    const [r, g, b] = lookup[values[i]];
    image.data[j] = r; image.data[j + 1] = g; image.data[j + 2] = b; image.data[j + 3] = 210;
  }
  context.putImageData(image, 0, 0);
  $("heat-name").textContent = `P(${state.meta.classes[index]})`;
  const bar = $("scale-bar").getContext("2d");
  for (let x = 0; x < 200; x += 1) {
    const [r, g, b] = colourOf((x / 199) * 255);
    bar.fillStyle = `rgb(${r},${g},${b})`;
    bar.fillRect(x, 0, 1, 12);
  }
}

function probe(event) {
  if (!state.labels) return;
  const box = $("photo").getBoundingClientRect();
  const point = event.touches ? event.touches[0] : event;
  const x = Math.floor(((point.clientX - box.left) / box.width) * state.width);
  const y = Math.floor(((point.clientY - box.top) / box.height) * state.height);
  if (x < 0 || y < 0 || x >= state.width || y >= state.height) return;
  const i = y * state.width + x;
  const name = state.meta.classes[state.labels[i]];
  const top = state.probs
    .map((values, index) => [values ? values[i] / 255 : 0, index])
    .sort((a, b) => b[0] - a[0])
    .slice(0, 3)
    .map(([p, index]) => `${state.meta.classes[index]} ${(100 * p).toFixed(0)}%`);
  $("probe").textContent = `(${x}, ${y}): ${name} · ${top.join(", ")}`;
  $("probe").dataset.className = name;
}

// ---------------------------------------------------------------------------------------------------- wiring
function wire() {
  const drop = $("drop");
  $("file").addEventListener("change", () => segment($("file").files[0]));
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    segment(event.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (event) => {
    const item = [...event.clipboardData.items].find((entry) => entry.kind === "file");
    if (item) segment(item.getAsFile());
  });
  $("opacity").addEventListener("input", () => { $("overlay").style.opacity = $("opacity").value; });
  $("opacity").addEventListener("change", drawOverlay);
  for (const kind of ["mousemove", "click", "touchstart"]) $("stage").addEventListener(kind, probe, { passive: true });
  $("model").addEventListener("change", async () => {
    state.model = $("model").value;
    state.analysis = null;
    await loadCard().catch((error) => showError(error.message));
  });
}

wire();
loadModels().catch((error) => showError(`cannot read the model card: ${error.message}`));
