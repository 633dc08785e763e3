// The captioning page: choose, drop or paste an image (or give a URL), caption it through
// POST /v1/caption, show the n best captions and, for each word, where the model looked.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { source: null, result: null, pinned: null, timer: null, request: 0 };

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function setStatus(text, busy = false) {
  $("status").textContent = text;
  $("status").classList.toggle("busy", busy);
}

async function loadInfo() {
  try {
    const info = await (await fetch("/v1/info")).json();
    const m = info.model || {};
    if (m.backbone) {
      $("model").innerHTML = "";
      const name = document.createElement("b");
      name.textContent = m.source || "model";
      $("model").append(name, ` \u00b7 ${m.backbone} \u00b7 d_model ${m.d_model} \u00b7 ` +
        `${m.vocabulary} words \u00b7 ${m.engine}`);
    }
    $("url-form").hidden = !info.allow_urls;
    $("key-row").hidden = !info.api_key_required;
    $("beam").max = Math.min(info.max_beam || 8, 8);
  } catch (e) {
    showError("The server did not answer /v1/info: is it running?");
  }
}

function options() {
  const form = new FormData();
  form.append("beam", $("beam").value);
  form.append("num_captions", $("num").value);
  form.append("attention", "true");
  for (const id of ["temperature", "seed", "no_repeat_ngram_size", "min_words"]) {
    if ($(id).value !== "") form.append(id, $(id).value);
  }
  return form;
}

function showImage(src) {
  const img = $("image");
  img.onload = fit;
  img.src = src;
  $("stage").classList.remove("empty");
  clearOverlay();
}

// The image as large as the stage allows, small ones scaled up (their pixels kept sharp).
function fit() {
  const img = $("image");
  if (!img.naturalWidth) return;
  const room = $("stage").clientWidth - 32;
  const scale = Math.min(room / img.naturalWidth, 420 / img.naturalHeight);
  img.style.width = `${Math.round(img.naturalWidth * scale)}px`;
  img.style.height = `${Math.round(img.naturalHeight * scale)}px`;
  img.classList.toggle("pixels", scale >= 3);
  drawWord(state.pinned);
}

async function caption() {
  if (!state.source) return;
  const form = options();
  if (state.source.file) form.append("image", state.source.file, state.source.file.name);
  else form.append("url", state.source.url);
  const headers = {};
  if ($("key").value) headers.Authorization = `Bearer ${$("key").value}`;
  const mine = ++state.request;
  const started = performance.now();
  showError("");
  setStatus("Captioning\u2026", true);
  let answer, body;
  try {
    answer = await fetch("/v1/caption", { method: "POST", body: form, headers });
    body = await answer.json().catch(() => ({}));
  } catch (e) {
    body = { error: `The server could not be reached (${e.message}).` };
  }
  if (mine !== state.request) return;          // a newer request is on its way
  if (!answer || !answer.ok) {
    const code = answer ? ` (HTTP ${answer.status})` : "";
    showError((body.error || "Something went wrong.") + code);
    setStatus("");
    render(null);
    return;
  }
  setStatus(`Captioned in ${Math.round(performance.now() - started)} ms`);
  render(body);
}

function render(result) {
  state.result = result;
  state.pinned = null;
  clearOverlay();
  $("caption").textContent = result ? result.caption : "";
  const words = $("words");
  words.innerHTML = "";
  $("nbest").innerHTML = "";
  $("hint").hidden = !(result && result.words);
  if (!result) return;
  (result.words || []).forEach((word, i) => {
    if (word === "<eos>") return;
    const chip = document.createElement("button");
    chip.type = "button";
    chip.className = "word";
    chip.textContent = word;
    chip.addEventListener("mouseenter", () => drawWord(i));
    chip.addEventListener("focus", () => drawWord(i));
    chip.addEventListener("mouseleave", () => drawWord(state.pinned));
    chip.addEventListener("blur", () => drawWord(state.pinned));
    chip.addEventListener("click", () => pin(i));
    words.append(chip);
  });
  result.captions.forEach((c, i) => {
    const li = document.createElement("li");
    li.className = i === 0 ? "best" : "";
    const p = Math.exp(c.score);                 // the geometric mean of its words' probabilities
    li.innerHTML = `<span class="rank">${i + 1}</span><span class="text"></span>` +
      `<span class="score" title="score ${c.score.toFixed(3)} (log-probability per word)">` +
      `<span class="meter"><i></i></span>${c.score.toFixed(2)}</span>`;
    li.querySelector(".text").textContent = c.caption;
    li.querySelector(".meter i").style.width = `${(100 * p).toFixed(1)}%`;   // CSSOM: CSP allows
    $("nbest").append(li);
  });
}

function pin(i) {
  state.pinned = state.pinned === i ? null : i;
  document.querySelectorAll(".word").forEach((chip, k) => {
    chip.classList.toggle("pinned", chipIndex(k) === state.pinned);
  });
  drawWord(state.pinned);
}

function chipIndex(k) {          // the k-th chip's word index (the chips skip <eos>)
  let seen = -1;
  const words = state.result.words;
  for (let i = 0; i < words.length; i++) {
    if (words[i] !== "<eos>" && ++seen === k) return i;
  }
  return null;
}

function clearOverlay() {
  const canvas = $("overlay");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  canvas.dataset.word = "";
  document.querySelectorAll(".word").forEach((c) => c.classList.remove("active"));
}

// One word's attention over the whole image (the model sees it squeezed to a square, so the grid
// spans the image as shown): dark where the word did not look, warm and clear where it did.
function drawWord(i) {
  clearOverlay();
  const r = state.result;
  if (i === null || i === undefined || !r || !r.attention) return;
  const [h, w] = r.attention.shape;
  const grid = r.attention.maps[i];
  const peak = Math.max(...grid.flat()) || 1;
  const small = document.createElement("canvas");
  small.width = w;
  small.height = h;
  const cells = small.getContext("2d").createImageData(w, h);
  grid.flat().forEach((v, k) => {
    const t = Math.max(0, v) / peak;
    cells.data.set([Math.round(255 * t), Math.round(180 * t), Math.round(50 * t),
                    Math.round(255 * (0.66 - 0.3 * t))], 4 * k);
  });
  small.getContext("2d").putImageData(cells, 0, 0);
  const canvas = $("overlay");
  const img = $("image");
  canvas.width = img.clientWidth * devicePixelRatio;
  canvas.height = img.clientHeight * devicePixelRatio;
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = true;
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(small, 0, 0, canvas.width, canvas.height);
  canvas.dataset.word = r.words[i];
  const k = [...document.querySelectorAll(".word")].findIndex((_, n) => chipIndex(n) === i);
  if (k >= 0) document.querySelectorAll(".word")[k].classList.add("active");
}

function useFile(file) {
  if (!file) return;
  state.source = { file };
  if (file.type.startsWith("image/")) showImage(URL.createObjectURL(file));
  else $("stage").classList.add("empty");
  caption();
}

function later() {
  clearTimeout(state.timer);
  state.timer = setTimeout(caption, 250);
}

function wire() {
  $("file").addEventListener("change", (e) => useFile(e.target.files[0]));
  const drop = $("drop");
  ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => {
    e.preventDefault();
    drop.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((t) => drop.addEventListener(t, () => drop.classList.remove("over")));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    useFile(e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    const item = [...e.clipboardData.items].find((x) => x.type.startsWith("image/"));
    if (item) useFile(item.getAsFile());
  });
  $("url-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const url = $("url").value.trim();
    if (!url) return;
    state.source = { url };
    showImage(url);
    caption();
  });
  for (const [id, out] of [["beam", "beam-value"], ["num", "num-value"]]) {
    $(id).addEventListener("input", () => { $(out).textContent = $(id).value; later(); });
  }
  for (const id of ["temperature", "seed", "no_repeat_ngram_size", "min_words"]) {
    $(id).addEventListener("change", later);
  }
  window.addEventListener("resize", fit);
}

wire();
loadInfo();
