"use strict";
// The page of `serve`: send a scan to POST /predict, then show the slice, the answers (gated as
// predict gates them), the saliency overlay per task and, for an exam, a slider over its slices.

const $ = (id) => document.getElementById(id);
let model = null; // GET /model: tasks, probability columns, gating, threshold, warnings
let lastFile = null; // the file last sent: ticking "exam" sends it again
let sends = 0; // sends so far: an answer that arrives after a later send is dropped, not shown
let showTopSlice = null; // an exam's slider back on its most suspicious slice (a view button's click)

const png = (base64) => "data:image/png;base64," + base64;
const SLICE_HINT = "send a volume with ?exam=1"; // serve.py's SLICE_HINT, in a volume's refusal

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
  // what predict prints before its answers: a run that did not learn answers by chance
  $("warning").textContent = (model.warnings || []).join(" ");
  $("warning").hidden = !(model.warnings || []).length;
}

function setStatus(text, state, error = "") {
  $("status").textContent = text;
  $("status").dataset.state = state;
  // the refusal itself in its own alert region, emptied on every send: the same refusal twice is
  // announced twice, and the status line names the file only (not the message a second time)
  $("error").textContent = error;
}

async function send(file) {
  if (!file) return;
  const id = ++sends;
  lastFile = file;
  $("file").value = ""; // the same file picked again is a change: it is sent again
  $("result").hidden = true; // never the last scan's answer under this one's status
  await modelReady;
  if (id !== sends) return;
  if (!model) {
    setStatus("no model", "error", "the model's description could not be read: reload the page");
    return;
  }
  const exam = $("exam").checked || file.name.toLowerCase().endsWith(".zip");
  const query = new URLSearchParams({
    preview: "1",
    saliency: !model.exam_model ? "1" : "0",
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
    if (id === sends) setStatus(`${file.name}: no answer`, "error", `no answer from the server (${err})`);
    return;
  }
  if (id !== sends) return; // a later send's answer is the one to show
  if (!response.ok) {
    // a volume sent as a slice: the server speaks to curl (?exam=1); on this page that is the
    // "exam" box, which sends the file again
    const onPage = !exam && answer.error.includes(SLICE_HINT) ? " Tick “exam” to send it as an exam." : "";
    setStatus(`${file.name}: refused (${response.status})`, "error", `${file.name}: ${answer.error}${onPage}`);
    return;
  }
  show(answer, exam, file.name);
  setStatus(`done: ${file.name}: ${summary(answer)}`, "done");
}

// a task's answer in words: the fissure's 1/0 as tear/no tear, the others' labels as they are
const answerText = (task, label) => (task === "fissure" ? (label === 1 ? "tear" : "no tear") : label);

function summary(answer) {
  // the answer in words, for the status region that screen readers announce
  return model.tasks
    .map((task, k) => {
      const p = answer[model.probabilities[k]];
      return p === null ? null : `${answerText(task, answer[task])} (${p.toFixed(3)})`;
    })
    .filter((text) => text !== null)
    .join(", ");
}

function show(answer, exam, name) {
  $("result-title").textContent = `Answer for ${name}`;
  $("result").hidden = false;
  showAnswers(answer);
  showSlider(exam ? answer : null);
  showViews(answer);
  $("note").textContent = answer.note ? "note: " + answer.note : "";
}

function showPicture(base64, caption) {
  $("slice").src = png(base64);
  $("slice").alt = caption; // the text alternative follows what the picture shows
  $("caption").textContent = caption;
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
    const text = gated ? "not reported" : answerText(task, label);
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
      let where = "";
      if (showTopSlice) {
        showTopSlice(); // the views are of the exam's most suspicious slice: the slider goes back to it
        where = ` on slice ${answer.top_slice + 1} of ${answer.per_slice.length} (the most suspicious slice)`;
      }
      const shows =
        name === "slice" ? "the slice as the model reads it" : `where ${name.slice(10)}'s answer looks (LayerCAM)`;
      showPicture(base64, shows + where);
    });
    views.appendChild(button);
    return button;
  });
  buttons[0].click();
}

function showSlider(answer) {
  const box = $("exam-slider");
  box.hidden = !answer || !answer.per_slice;
  showTopSlice = null;
  if (box.hidden) return;
  const slices = answer.per_slice;
  const slider = $("slider");
  slider.max = String(slices.length - 1);
  const describe = (k) => {
    const text = `P(tear) on slice ${k + 1} of ${slices.length}: ${slices[k].p.toFixed(3)}`;
    $("slider-text").textContent = text;
    slider.setAttribute("aria-valuetext", text); // read out instead of the 0-based index
  };
  showTopSlice = () => {
    slider.value = String(answer.top_slice);
    describe(answer.top_slice);
  };
  slider.oninput = () => {
    const k = Number(slider.value);
    const shown = nearestPreview(slices, k);
    $("views").querySelectorAll("button").forEach((b) => b.setAttribute("aria-pressed", "false"));
    const top = k === answer.top_slice ? " (the most suspicious slice)" : "";
    // a long exam comes with pictures of some slices: the nearest one is shown, and named
    const nearest = shown.slice === k ? "" : ` (the nearest with a picture to slice ${k + 1})`;
    showPicture(shown.preview, `slice ${shown.slice + 1} of ${slices.length}${top}${nearest}`);
    describe(k);
  };
  showTopSlice();
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
  $("exam").addEventListener("change", () => send(lastFile)); // the same scan, as an exam or not
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
