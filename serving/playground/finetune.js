// The playground's Fine-tune view: photos in, a DreamBooth run on this server, a servable model out.
// It speaks the training jobs API: POST /jobs/train (multipart: the photos and the run's fields, each
// hyperparameter under its JumpStart name), GET /jobs/{id} (status, progress, the loss curve as data, the
// latest validation images), DELETE /jobs/{id} (cancel at a checkpoint) and POST /jobs/{id}/resume.
// It also draws the loss curves the Runs view shows (loss_curve.json, training/report.py's LOSS_HISTORY).
// Loaded after playground.js, whose helpers ($, element, getJson, showError, showView...) it uses.
"use strict";

const FINE_TUNE_JOB_KEY = "txt2img.fineTuneJob"; // the job this browser watches: a reload keeps watching it
const FINE_TUNE_POLL_MS = 1000;
const FINE_TUNE_FINISHED = ["succeeded", "failed", "canceled"];
const SVG_NS = "http://www.w3.org/2000/svg";
const CURVE_BOX = { width: 640, height: 300, left: 64, right: 16, top: 16, bottom: 44 };

let fineTunePhotos = []; // {file, url}: the photos chosen, in order, with their thumbnail's object URL
let fineTuneJob = null; // the training job's latest answer
let fineTuneWatching = 0; // bumped to stop an older polling loop when another job is watched

// ---- photos ----

function fineTuneAddPhotos(files) {
  for (const file of files) fineTunePhotos.push({ file, url: URL.createObjectURL(file) });
  fineTuneShowPhotos();
}

function fineTuneRemovePhoto(photo) {
  URL.revokeObjectURL(photo.url);
  fineTunePhotos = fineTunePhotos.filter((item) => item !== photo);
  fineTuneShowPhotos();
}

function fineTuneShowPhotos() {
  const count = fineTunePhotos.length;
  $("#ft-photo-count").textContent = count ? `${count} photo${count === 1 ? "" : "s"}` : "No photos yet.";
  $("#ft-thumbnails").replaceChildren(...fineTunePhotos.map((photo) => element("li", {},
    element("img", { src: photo.url, alt: photo.file.name }),
    element("button", { type: "button", text: "Remove", "aria-label": `Remove ${photo.file.name}`, onclick: () => fineTuneRemovePhoto(photo) }))));
}

function fineTuneDrop(event) {
  event.preventDefault();
  fineTuneAddPhotos(event.dataTransfer.files);
}

// ---- the form ----

// The base models: the catalog without LoRA fine-tunes (a LoRA is an adapter, not a model to train on).
async function fineTuneFillBases() {
  try {
    const listing = await getJson("/ui/api/catalog");
    const select = $("#ft-base");
    const chosen = select.value || listing.default;
    select.replaceChildren(...listing.models.filter((model) => model.method !== "lora").map(modelOption));
    select.value = chosen;
  } catch (error) {
    showError($("#ft-error"), `Could not load the catalog: ${error.message}`);
  }
}

// POST /jobs/train's form: the photos, the run's fields, and each hyperparameter under its JumpStart name.
function fineTuneForm() {
  const form = new FormData();
  for (const photo of fineTunePhotos) form.append("images", photo.file, photo.file.name);
  const fields = { name: "#ft-name", base: "#ft-base", method: "#ft-method", instance_prompt: "#ft-instance-prompt",
    class_prompt: "#ft-class-prompt", max_steps: "#ft-steps", learning_rate: "#ft-learning-rate" };
  for (const [name, selector] of Object.entries(fields)) {
    const value = $(selector).value.trim();
    if (value) form.append(name, value); // a blank optional field is left to the server's default
  }
  return form;
}

async function fineTuneStart(event) {
  event.preventDefault();
  showError($("#ft-error"), "");
  $("#ft-start").disabled = true;
  try {
    fineTuneWatch(await getJson("/jobs/train", { method: "POST", body: fineTuneForm() }));
  } catch (error) {
    showError($("#ft-error"), `Could not start: ${error.message}`);
    $("#ft-start").disabled = false;
  }
}

async function fineTuneAct(action) {
  showError($("#ft-error"), "");
  const [url, method] = action === "cancel" ? [fineTuneJob.urls.cancel, "DELETE"] : [fineTuneJob.urls.resume, "POST"];
  try {
    await getJson(url, { method });
    fineTuneWatch(await getJson(fineTuneJob.urls.get)); // the job as it is now, whatever the action answered
  } catch (error) {
    showError($("#ft-error"), `Could not ${action}: ${error.message}`);
  }
}

// ---- following the job ----

// Show ``job`` and poll it every second until it finishes; a newer call stops the older loop.
async function fineTuneWatch(job) {
  const watching = ++fineTuneWatching;
  localStorage.setItem(FINE_TUNE_JOB_KEY, job.id);
  for (;;) {
    fineTuneShowJob(job);
    if (FINE_TUNE_FINISHED.includes(job.status)) return;
    await sleep(FINE_TUNE_POLL_MS);
    if (watching !== fineTuneWatching) return;
    try {
      job = await getJson(job.urls.get);
    } catch (error) {
      showError($("#ft-error"), `Lost track of the job: ${error.message}`);
      if (error.status === 404) return; // gone (retention): nothing more to follow
    }
    if (watching !== fineTuneWatching) return;
  }
}

function fineTuneStatusLine(job) {
  const progress = job.progress || {};
  if (job.status === "queued") return "Queued: waiting for the trainer.";
  if (job.status === "succeeded") return `Done: ${job.result.model} is in the catalog.`;
  if (job.status === "failed") return `Failed: ${job.error || "see the server's log"}`;
  const step = `step ${progress.step ?? 0} of ${progress.total_steps ?? "?"}`;
  if (job.status === "canceled") return `Canceled at ${step}; Resume continues from its checkpoint.`;
  const numbers = [progress.loss != null ? `loss ${describe(progress.loss)}` : "",
    progress.lr != null ? `learning rate ${describe(progress.lr)}` : "",
    progress.eta_s != null ? `about ${Math.round(progress.eta_s)} s left` : ""].filter(Boolean);
  return `Training: ${step}${numbers.length ? `, ${numbers.join(", ")}` : ""}.`;
}

function fineTuneShowJob(job) {
  fineTuneJob = job;
  const running = !FINE_TUNE_FINISHED.includes(job.status);
  $("#ft-job").hidden = false;
  $("#ft-status").textContent = fineTuneStatusLine(job);
  $("#ft-job").dataset.status = job.status;
  const progress = job.progress || {};
  $("#ft-progress").max = progress.total_steps || 1;
  $("#ft-progress").value = job.status === "succeeded" ? $("#ft-progress").max : progress.step || 0;
  drawLossCurve($("#ft-curve"), job.curve || []);
  fineTuneShowValidation(job.validation_images || []);
  $("#ft-start").disabled = running;
  $("#ft-cancel").disabled = !running;
  $("#ft-resume").disabled = !["canceled", "failed"].includes(job.status);
  $("#ft-compare").disabled = job.status !== "succeeded";
}

// The run's validation images: its contact sheet (the grid of them all, captioned) once drawn, else each image.
function fineTuneShowValidation(urls) {
  const box = $("#ft-validation");
  if (box.dataset.urls === urls.join(" ")) return; // unchanged: keep the images the browser has drawn
  box.dataset.urls = urls.join(" ");
  const sheet = urls.find((url) => url.endsWith("/contact_sheet.png"));
  const shown = sheet ? [sheet] : urls;
  box.replaceChildren(...shown.map((url) => element("figure", { class: `figure${sheet ? " sheet" : ""}` },
    element("img", { src: url, alt: sheet ? "Validation grid" : `Validation image ${decodeURIComponent(url.split("/").pop())}` }))));
  if (!urls.length) box.append(element("p", { class: "status", text: "None yet: they are drawn as the run goes." }));
}

// "Compare with base": the new model and its base on one prompt and seed, in the Compare view.
async function fineTuneCompare() {
  const id = fineTuneJob.result.model;
  await refreshModels(); // the new entry, which the server's catalog has without a restart
  const model = catalogModels.find((entry) => entry.id === id);
  if (!model) {
    showError($("#ft-error"), `${id} is not in the server's catalog yet.`);
    return;
  }
  $("#cmp-prompt").value = model.example_prompt || $("#ft-instance-prompt").value;
  compareWithBase(model);
  $("#compare-form").requestSubmit();
}

// A reload keeps following the job this browser started last, while the server still has it.
async function fineTuneResumeWatching() {
  const id = localStorage.getItem(FINE_TUNE_JOB_KEY);
  if (!id) return;
  try {
    fineTuneWatch(await getJson(`/jobs/${encodeURIComponent(id)}`));
  } catch {
    localStorage.removeItem(FINE_TUNE_JOB_KEY);
  }
}

// ---- loss curves, drawn as SVG: the step on x, the loss on y, ticks on both, and a legend ----

function svgElement(tag, attributes = {}, text = "") {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
  if (text) node.textContent = text;
  return node;
}

// About ``count`` round values (1, 2 or 5 times a power of ten apart) from at most ``low`` to at least ``high``.
function niceTicks(low, high, count, whole = false) {
  const span = high - low || Math.abs(high) || 1;
  const raw = span / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  let step = [1, 2, 5, 10].map((factor) => factor * power).find((candidate) => candidate >= raw);
  if (whole) step = Math.max(1, Math.round(step));
  const ticks = [];
  const last = Math.ceil(high / step - 1e-9) * step;
  for (let tick = Math.floor(low / step + 1e-9) * step; tick <= last + step * 1e-9; tick += step) ticks.push(Number(tick.toPrecision(12)));
  if (ticks.length === 1) ticks.push(Number((ticks[0] + step).toPrecision(12)));
  return ticks;
}

// The exponential moving average training/report.py's running_average draws: the trend through the noise.
function runningAverage(values, keep = 0.9) {
  let average = values.length ? values[0] : 0;
  return values.map((value) => (average = keep * average + (1 - keep) * value));
}

function curveAxes(svg, scaleX, scaleY, xTicks, yTicks) {
  const { width, height, left, right, top, bottom } = CURVE_BOX;
  svg.append(svgElement("rect", { x: left, y: top, width: width - left - right, height: height - top - bottom, class: "frame" }));
  for (const tick of xTicks) {
    const x = scaleX(tick);
    svg.append(svgElement("line", { x1: x, x2: x, y1: height - bottom, y2: height - bottom + 5, class: "tick" }),
      svgElement("text", { x, y: height - bottom + 18, "text-anchor": "middle", class: "tick-label" }, String(tick)));
  }
  for (const tick of yTicks) {
    const y = scaleY(tick);
    svg.append(svgElement("line", { x1: left, x2: width - right, y1: y, y2: y, class: "grid" }),
      svgElement("line", { x1: left - 5, x2: left, y1: y, y2: y, class: "tick" }),
      svgElement("text", { x: left - 8, y: y + 4, "text-anchor": "end", class: "tick-label" }, describe(tick)));
  }
  svg.append(svgElement("text", { x: (left + width - right) / 2, y: height - 6, "text-anchor": "middle", class: "axis-label" }, "step"),
    svgElement("text", { x: 14, y: (top + height - bottom) / 2, transform: `rotate(-90 14 ${(top + height - bottom) / 2})`, "text-anchor": "middle", class: "axis-label" }, "loss"));
}

function curveLegend(svg) {
  const x = CURVE_BOX.width - CURVE_BOX.right - 170;
  [["loss per step", "loss"], ["running average", "average"]].forEach(([label, kind], index) => {
    const y = CURVE_BOX.top + 16 + 18 * index;
    svg.append(svgElement("line", { x1: x, x2: x + 24, y1: y - 4, y2: y - 4, class: kind }),
      svgElement("text", { x: x + 30, y, class: "legend" }, label));
  });
}

// Draw ``points`` ([{step, loss}], as GET /jobs/{id}'s curve lists them) into ``svg``, replacing what it held.
function drawLossCurve(svg, points) {
  const { width, height, left, right, top, bottom } = CURVE_BOX;
  svg.replaceChildren();
  svg.dataset.points = String(points.length);
  if (!points.length) {
    svg.append(svgElement("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "axis-label" }, "No steps logged yet"));
    return;
  }
  const steps = points.map((point) => point.step);
  const losses = points.map((point) => point.loss);
  const xTicks = niceTicks(Math.min(...steps), Math.max(...steps), 8, true);
  const yTicks = niceTicks(Math.min(...losses), Math.max(...losses), 5);
  const [firstStep, lastStep] = [xTicks[0], xTicks[xTicks.length - 1]];
  const [low, high] = [yTicks[0], yTicks[yTicks.length - 1]];
  const scaleX = (step) => left + ((step - firstStep) / (lastStep - firstStep)) * (width - left - right);
  const scaleY = (loss) => top + (1 - (loss - low) / (high - low)) * (height - top - bottom);
  curveAxes(svg, scaleX, scaleY, xTicks, yTicks);
  const line = (values, kind) => svgElement("polyline", { class: kind,
    points: values.map((value, index) => `${scaleX(steps[index]).toFixed(1)},${scaleY(value).toFixed(1)}`).join(" ") });
  svg.append(line(losses, "loss"), line(runningAverage(losses), "average"));
  if (points.length === 1) svg.append(svgElement("circle", { cx: scaleX(steps[0]), cy: scaleY(losses[0]), r: 3, class: "average-point" }));
  curveLegend(svg);
}

// The Runs view's curve of a finished run: its loss_curve.json (one loss per step) drawn as above.
function lossHistoryFigure(path) {
  const svg = svgElement("svg", { class: "curve", role: "img", "aria-label": "Loss per step", viewBox: `0 0 ${CURVE_BOX.width} ${CURVE_BOX.height}` });
  getJson(`/ui/files/${path.split("/").map(encodeURIComponent).join("/")}`)
    .then((losses) => drawLossCurve(svg, losses.map((loss, index) => ({ step: index + 1, loss }))))
    .catch((error) => svg.append(svgElement("text", { x: 20, y: 40, class: "axis-label" }, `No curve: ${error.message}`)));
  return element("figure", { class: "figure curve-figure" }, svg, element("figcaption", { text: "Loss per step" }));
}

// ---- start ----

document.addEventListener("DOMContentLoaded", () => {
  $('button.tab[data-view="finetune"]').addEventListener("click", fineTuneFillBases);
  $("#ft-photos").addEventListener("change", () => { fineTuneAddPhotos($("#ft-photos").files); $("#ft-photos").value = ""; });
  $("#ft-drop").addEventListener("dragover", (event) => event.preventDefault());
  $("#ft-drop").addEventListener("drop", fineTuneDrop);
  $("#ft-form").addEventListener("submit", fineTuneStart);
  $("#ft-cancel").addEventListener("click", () => fineTuneAct("cancel"));
  $("#ft-resume").addEventListener("click", () => fineTuneAct("resume"));
  $("#ft-compare").addEventListener("click", fineTuneCompare);
  fineTuneFillBases();
  fineTuneResumeWatching();
});
