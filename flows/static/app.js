// tailforge classify page: plain JS, no framework, no network access beyond this server.
"use strict";

const GROUP_LABEL = { many: "head", medium: "medium", few: "tail" };
const state = { info: null, selectedSample: null, file: null, busy: false };
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c != null) node.append(c);
  return node;
}

function chip(group) {
  if (!group) return null;
  return el("span", { class: `chip ${group}`, title: `${group} group`, text: GROUP_LABEL[group] || group });
}

async function api(path, options) {
  const resp = await fetch(path, options);
  let body = null;
  try { body = await resp.json(); } catch (e) { /* not JSON */ }
  if (!resp.ok) {
    const msg = body && body.error ? body.error + (body.hint ? ` — ${body.hint}` : "") : `HTTP ${resp.status}`;
    throw new Error(msg);
  }
  return body;
}

function setStatus(text, isError = false) {
  const s = $("status");
  s.textContent = text;
  s.className = "status " + (isError ? "error" : "dim");
}

async function loadInfo() {
  const info = await api("/api/info");
  state.info = info;
  $("run-info").textContent = `run ${info.run} · ${info.dataset} · ${info.num_classes} classes · ` +
    `input ${info.image_size[0]}×${info.image_size[1]}×${info.channels}`;
  $("limits").textContent = `up to ${(info.max_upload_bytes / 1048576).toFixed(1)} MiB and ` +
    `${(info.max_pixels / 1e6).toFixed(1)} Mpx; resized to ${info.image_size[0]}×${info.image_size[1]} like training`;
}

async function loadModels() {
  const models = await api("/api/models");
  const sel = $("model-select");
  sel.replaceChildren();
  if (!models.length) {
    sel.append(el("option", { value: "", text: "no trained model in this run" }));
    setStatus("This run has no checkpoint yet: run `tailforge train` first.", true);
    return;
  }
  if (models.length > 1) sel.append(el("option", { value: "all", text: `compare all (${models.length})` }));
  for (const m of models) {
    const kd = m.details.teacher ? `${m.details.kd} student of ${m.details.teacher}` : null;
    const extra = [m.arch, m.details.loss, kd].filter(Boolean).join(", ");
    sel.append(el("option", { value: m.name, text: extra ? `${m.name} (${extra})` : m.name }));
  }
  sel.disabled = false;
}

async function loadSamples() {
  const data = await api("/api/samples");
  const strip = $("strip");
  strip.replaceChildren();
  for (const s of data.samples) {
    const btn = el("button", {
      class: `thumb ${s.group || ""}`, type: "button", "data-sample-id": s.sample_id,
      title: `${s.sample_id}: class ${s.class_name}` + (s.group ? ` (${GROUP_LABEL[s.group]})` : ""),
    }, el("img", { src: s.image_url, alt: `test image of class ${s.class_name}`, loading: "lazy" }),
       el("span", { class: "cls", text: s.class_name }),
       s.group === "few" ? el("span", { class: "tag", text: "tail" }) : null);
    btn.addEventListener("click", () => pickSample(s, btn));
    strip.append(btn);
  }
}

function pickSample(sample, btn) {
  document.querySelectorAll(".thumb.selected").forEach((b) => b.classList.remove("selected"));
  btn.classList.add("selected");
  state.selectedSample = sample;
  state.file = null;
  $("file-input").value = "";
  showPreview(sample.image_url);
  predict();
}

function pickFile(file) {
  if (!file) return;
  document.querySelectorAll(".thumb.selected").forEach((b) => b.classList.remove("selected"));
  state.selectedSample = null;
  state.file = file;
  showPreview(URL.createObjectURL(file));
  predict();
}

function showPreview(src) {
  const img = $("preview-orig");
  img.src = src;
  img.hidden = false;
  $("preview-input").hidden = true;
  $("truth").replaceChildren();
}

async function predict() {
  const model = $("model-select").value;
  if (!model || (!state.file && !state.selectedSample)) return;
  const form = new FormData();
  if (state.file) form.append("file", state.file, state.file.name);
  else form.append("sample_id", state.selectedSample.sample_id);
  form.append("model", model);
  form.append("top_k", "5");
  setStatus(`running ${model === "all" ? "all models" : model}…`);
  $("results").replaceChildren();
  state.busy = true;
  document.body.dataset.state = "busy";
  try {
    const res = await api("/api/predict", { method: "POST", body: form });
    render(res);
    document.body.dataset.state = "done";
  } catch (err) {
    setStatus(err.message, true);
    document.body.dataset.state = "error";
  } finally {
    state.busy = false;
  }
}

function render(res) {
  const inp = res.input;
  const mi = $("preview-input");
  mi.src = inp.model_input_png;
  mi.hidden = false;
  const truth = $("truth");
  truth.replaceChildren();
  if (inp.true_label != null) {
    truth.append("True class: ", el("strong", { text: inp.true_class }), " ", chip(inp.true_group));
  } else {
    truth.append(el("span", { class: "dim", text: `uploaded ${inp.filename || "image"} ` +
      (inp.original_size ? `(${inp.original_size[1]}×${inp.original_size[0]} px)` : "") + "; true class unknown" }));
  }
  const n = res.results.length;
  const correct = res.results.filter((r) => r.correct).length;
  setStatus(inp.true_label != null ? `${correct} of ${n} model(s) right` : `${n} model(s)`);
  const box = $("results");
  box.replaceChildren();
  for (const r of res.results) box.append(card(r, inp.true_label));
}

function card(r, trueLabel) {
  const verdict = r.correct == null ? null :
    el("span", { class: `verdict ${r.correct ? "ok" : "bad"}`, text: r.correct ? "right" : "wrong" });
  const c = el("div", { class: "card", "data-model": r.model }, el("h3", {}, el("span", { text: r.model }), verdict));
  for (const s of r.top) {
    const pct = (100 * s.prob).toFixed(1);
    const fill = el("span");
    fill.style.width = `${Math.max(0.5, 100 * s.prob)}%`;  // CSSOM, allowed by the page's CSP (style attributes are not)
    const bar = el("div", { class: "bar" }, fill);
    c.append(el("div", { class: `row${s.label === trueLabel ? " true" : ""}`, "data-label": String(s.label) },
      el("span", { class: "name" }, el("span", { text: s.class_name + " " }), chip(s.group)),
      el("span", { class: "pct", text: `${pct}%` }), bar));
  }
  if (r.true_rank != null && r.true_rank > r.top.length) {
    c.append(el("div", { class: "foot", text: `true class ranked ${r.true_rank} (p = ${(100 * r.true_prob).toFixed(1)}%)` }));
  }
  return c;
}

async function main() {
  $("file-input").addEventListener("change", (e) => pickFile(e.target.files[0]));
  $("model-select").addEventListener("change", () => predict());
  try {
    await loadInfo();
    await Promise.all([loadModels(), loadSamples()]);
    document.body.dataset.state = "ready";
  } catch (err) {
    setStatus(err.message, true);
    document.body.dataset.state = "error";
  }
}

main();
