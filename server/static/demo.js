// ssd-serve demo page: public API only (GET /v1/model, POST /detect), boxes drawn on a canvas,
// the score slider filters the last response in the page (nothing is sent again).
"use strict";

const GOLDEN_RATIO = 0.618033988749895;
const TIMINGS = ["decode", "queue", "inference", "total"];

const $ = (id) => document.getElementById(id);
const state = { bitmap: null, response: null, sequence: 0 };

// The same colour per class as /detect/annotated (server/annotate.py): golden-ratio hue steps.
function classColour(classId) {
  const hue = (classId * GOLDEN_RATIO) % 1;
  const s = 0.85, v = 1;
  const i = Math.floor(hue * 6), f = hue * 6 - i;
  const p = v * (1 - s), q = v * (1 - s * f), t = v * (1 - s * (1 - f));
  const [r, g, b] = [[v, t, p], [q, v, p], [p, v, t], [p, q, v], [t, p, v], [v, p, q]][i % 6];
  return `rgb(${Math.round(r * 255)}, ${Math.round(g * 255)}, ${Math.round(b * 255)})`;
}

function textColour(rgb) {
  const [r, g, b] = rgb.match(/\d+/g).map(Number);
  return 0.299 * r + 0.587 * g + 0.114 * b > 140 ? "#000" : "#fff";
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function threshold() {
  return parseFloat($("threshold").value);
}

function shownDetections() {
  if (!state.response) return [];
  const min = threshold();
  return state.response.detections.filter((d) => d.score >= min);
}

function drawCanvas(detections) {
  const canvas = $("canvas");
  const ctx = canvas.getContext("2d");
  const { width, height } = state.bitmap;
  canvas.width = width;
  canvas.height = height;
  ctx.drawImage(state.bitmap, 0, 0);
  const short = Math.min(width, height);
  const line = Math.max(2, Math.round(short / 250));
  const fontSize = Math.max(11, Math.round(short / 32));
  const pad = Math.max(1, Math.round(short / 400)) + line;
  ctx.font = `${fontSize}px system-ui, sans-serif`;
  ctx.textBaseline = "top";
  for (const d of [...detections].reverse()) {  // highest score drawn last, on top
    const { x1, y1, x2, y2 } = d.box;
    const w = x2 - x1, h = y2 - y1;
    if (w <= 0 || h <= 0) continue;
    const colour = classColour(d.class_id);
    ctx.save();
    ctx.beginPath();
    ctx.rect(x1, y1, w, h);
    ctx.clip();  // outline and caption stay inside the box
    ctx.lineWidth = line;
    ctx.strokeStyle = colour;
    ctx.strokeRect(x1 + line / 2, y1 + line / 2, w - line, h - line);
    const caption = `${d.label} ${d.score.toFixed(2)}`;
    ctx.fillStyle = colour;
    ctx.fillRect(x1, y1, ctx.measureText(caption).width + 2 * pad, fontSize + 2 * pad);
    ctx.fillStyle = textColour(colour);
    ctx.fillText(caption, x1 + pad, y1 + pad);
    ctx.restore();
  }
}

function fmt(value) {
  return value.toFixed(1);
}

function renderList(detections) {
  const list = $("detections");
  list.replaceChildren(...detections.map((d) => {
    const item = document.createElement("li");
    item.dataset.label = d.label;
    item.dataset.classId = String(d.class_id);
    item.dataset.score = String(d.score);
    item.dataset.box = JSON.stringify(d.box);
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = classColour(d.class_id);
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = d.label;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = d.score.toFixed(3);
    const box = document.createElement("span");
    box.className = "box";
    box.textContent = `(${fmt(d.box.x1)}, ${fmt(d.box.y1)}) – (${fmt(d.box.x2)}, ${fmt(d.box.y2)})`;
    item.append(swatch, label, score, box);
    return item;
  }));
  $("count").textContent = String(detections.length);
}

function renderTimings(timings) {
  const rows = TIMINGS.filter((name) => name in timings).flatMap((name) => {
    const term = document.createElement("dt");
    term.textContent = name;
    const value = document.createElement("dd");
    value.dataset.name = name;
    value.textContent = `${timings[name].toFixed(1)} ms`;
    return [term, value];
  });
  $("timings").replaceChildren(...rows);
}

function render() {
  $("threshold-value").textContent = threshold().toFixed(2);
  if (!state.bitmap || !state.response) return;
  const detections = shownDetections();
  drawCanvas(detections);
  renderList(detections);
}

async function detect(file) {
  const sequence = ++state.sequence;
  setStatus(`detecting in ${file.name || "the image"}…`);
  let bitmap;
  try {
    bitmap = await createImageBitmap(file, { imageOrientation: "from-image" });
  } catch {
    setStatus("the browser cannot show this file as an image", true);
    return;
  }
  const form = new FormData();
  form.append("image", file, file.name || "image");
  const started = performance.now();
  let reply, body;
  try {
    reply = await fetch("/detect", { method: "POST", body: form });
    body = await reply.json();
  } catch (error) {
    setStatus(`no answer from the server: ${error}`, true);
    return;
  }
  if (sequence !== state.sequence) return;  // a newer image was chosen meanwhile
  if (!reply.ok) {
    setStatus(`${reply.status} ${body.error}: ${body.detail}`, true);
    return;
  }
  state.bitmap = bitmap;
  state.response = body;
  const roundTrip = performance.now() - started;
  const floor = $("threshold").min;
  setStatus(`${body.width}×${body.height} image: ${body.detections.length} detections scored ≥ ${floor}; ` +
    `round trip ${roundTrip.toFixed(0)} ms`);
  renderTimings(body.timings_ms);
  render();
}

async function loadModel() {
  try {
    const reply = await fetch("/v1/model");
    const info = await reply.json();
    if (!reply.ok) {
      $("model").textContent = `model not ready: ${info.detail}`;
      return;
    }
    $("model").textContent = `${info.name} on ${info.engine}/${info.device}`;
    $("threshold").min = String(info.score_threshold);
    render();
  } catch (error) {
    $("model").textContent = `no answer from the server: ${error}`;
  }
}

function setUp() {
  $("file").addEventListener("change", (event) => {
    const [file] = event.target.files;
    if (file) detect(file);
  });
  $("threshold").addEventListener("input", render);
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const [file] = event.dataTransfer.files;
    if (file) detect(file);
  });
  loadModel();
}

setUp();
