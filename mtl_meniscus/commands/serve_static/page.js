"use strict";
// The page of `serve`: send a scan to POST /predict, then show the slice, the answers (gated as
// predict gates them), the saliency overlay per task and, for an exam, a slider over its slices.

const $ = (id) => document.getElementById(id);
let model = null; // GET /model: tasks, probability columns, gating, threshold

const png = (base64) => "data:image/png;base64," + base64;

async function loadModel() {
  try {
    model = await (await fetch("/model")).json();
  } catch (err) {
    $("model").textContent = "the model's description could not be read: " + err;
    return;
  }
  const calibrated = model.calibration ? ", calibrated" : ", uncalibrated";
  $("model").textContent =
    `${model.model} model (${model.tasks.join(", ")}), fissure threshold ` +
    `${model.fissure_threshold.toFixed(3)}${calibrated}, test-time augmentation: ${model.tta_copies} ` +
    (model.tta_copies === 1 ? "copy" : "copies");
  $("version").textContent = model.version;
}

function setStatus(text, state) {
  $("status").textContent = text;
  $("status").className = state === "error" ? "error" : "";
  $("status").dataset.state = state;
}

async function send(file) {
  if (!file) return;
  await modelReady;
  if (!model) return;
  const exam = $("exam").checked || file.name.toLowerCase().endsWith(".zip");
  const query = new URLSearchParams({
    preview: "1",
    saliency: model && !model.exam_model ? "1" : "0",
    exam: exam ? "1" : "0",
  });
  const form = new FormData();
  form.append("file", file, file.name);
  setStatus(`predicting ${file.name}…`, "busy");
  let response, answer;
  try {
    response = await fetch("/predict?" + query, { method: "POST", body: form });
    answer = await response.json();
  } catch (err) {
    setStatus(`no answer from the server (${err})`, "error");
    return;
  }
  if (!response.ok) {
    setStatus(`refused (${response.status}): ${answer.error}`, "error");
    return;
  }
  show(answer, exam);
  setStatus(`done: ${file.name}`, "done");
}

function show(answer, exam) {
  $("result").hidden = false;
  showAnswers(answer);
  showViews(answer);
  showSlider(exam ? answer : null);
  $("note").textContent = answer.note ? "note: " + answer.note : "";
}

function showAnswers(answer) {
  const body = $("answers").querySelector("tbody");
  body.replaceChildren();
  let gatedOff = [];
  model.tasks.forEach((task, k) => {
    const p = answer[model.probabilities[k]];
    const label = answer[task];
    const row = body.insertRow();
    row.dataset.task = task;
    const gated = model.gated_by[task] && p === null;
    if (gated) gatedOff.push(task);
    const text = task === "fissure" ? (label === 1 ? "tear" : "no tear") : gated ? "not reported" : label;
    row.className = gated ? "gated" : task === "fissure" && label === 1 ? "positive" : "";
    for (const [cls, value] of [
      ["task", task],
      ["answer", text],
      ["p", p === null ? "–" : p.toFixed(3)],
    ]) {
      const cell = row.insertCell();
      cell.className = cls;
      cell.textContent = value;
    }
  });
  const cut = model.fissure_threshold.toFixed(3);
  $("gating").textContent = gatedOff.length
    ? `${gatedOff.join(" and ")}: reported only where a tear is predicted (P(tear) ≥ ${cut}), as predict gates them.`
    : `A tear is predicted (P(tear) ≥ ${cut}): orientation and position are reported.`;
}

function showViews(answer) {
  const views = $("views");
  views.replaceChildren();
  const pictures = [["slice", answer.preview]];
  for (const [task, overlay] of Object.entries(answer.saliency || {})) {
    pictures.push(["saliency: " + task, overlay]);
  }
  const buttons = pictures.map(([name, base64]) => {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = name;
    button.dataset.view = name;
    button.addEventListener("click", () => {
      buttons.forEach((b) => b.setAttribute("aria-pressed", String(b === button)));
      $("slice").src = png(base64);
      $("caption").textContent =
        name === "slice" ? "the slice as the model reads it" : `where ${name.slice(10)}'s answer looks (LayerCAM)`;
    });
    views.appendChild(button);
    return button;
  });
  buttons[0].click();
}

function showSlider(answer) {
  const box = $("exam-slider");
  box.hidden = !answer || !answer.per_slice;
  if (box.hidden) return;
  const slices = answer.per_slice;
  const slider = $("slider");
  slider.max = String(slices.length - 1);
  slider.value = String(answer.top_slice);
  slider.oninput = () => {
    const k = Number(slider.value);
    const shown = nearestPreview(slices, k);
    $("slice").src = png(shown.preview);
    $("views").querySelectorAll("button").forEach((b) => b.setAttribute("aria-pressed", "false"));
    const top = k === answer.top_slice ? " (the most suspicious slice)" : "";
    $("caption").textContent = `slice ${shown.slice + 1} of ${slices.length}${top}`;
    $("slider-text").textContent = `P(tear) on slice ${k + 1}: ${slices[k].p.toFixed(3)}`;
  };
  slider.oninput();
}

function nearestPreview(slices, k) {
  let best = null;
  for (const s of slices) {
    if (s.preview && (best === null || Math.abs(s.slice - k) < Math.abs(best.slice - k))) best = s;
  }
  return best;
}

function wireDrop() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => send(e.target.files[0]));
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    send(e.dataTransfer.files[0]);
  });
}

const modelReady = loadModel();
wireDrop();
