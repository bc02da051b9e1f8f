// The txt2img playground: plain browser JavaScript, no build step, no third-party code.
// It speaks the service's own routes: /ui/api/catalog (the CLI's search ranking), /ui/api/generate
// (POST /images' body and answer, with per-step progress as NDJSON), /ui/api/runs and /ui/files/, and
// /sdapi/v1/png-info (the recipe an image carries, read by the server, as A1111 tools read it).
"use strict";

const HISTORY_KEY = "txt2img.history";
const HISTORY_LIMIT = 30;
const HISTORY_IMAGE_LIMIT = 150000; // characters of data URL kept per image; bigger ones keep settings only
const RANDOM_SEEDS = 2 ** 32; // random seeds are drawn below 2**32, as AUTOMATIC1111 draws them
// The server takes seeds up to 2**63, but a JavaScript number holds integers exactly only up to this one:
// the page accepts no larger seed, so every seed it sends, shows and puts back is the one that made the image.
const SEED_RULE = `a seed is a whole number from 0 to ${Number.MAX_SAFE_INTEGER}`;

const $ = (selector) => document.querySelector(selector);

let catalogModels = []; // every catalog entry, fine-tunes first, as /ui/api/catalog lists them
let families = {}; // each family's defaults and schedulers (catalog/families.py), as /ui/api/catalog lists them
let generateLoras = null; // the Generate view's LoRA picker (loraPicker)
let compareLoras = []; // each Compare column's LoRA picker, in column order
// A LoRA's strength slider: A1111's range and then some (the server takes -4 to 4; 0 is the model alone).
const LORA_STRENGTH = { min: "-2", max: "2", step: "0.05" };

// ---- small DOM helpers (text only: server data never becomes HTML) ----

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value);
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

// Hyperparameters, metrics and trial parameters read as "name value, name value".
function describe(value) {
  if (value === null || value === undefined) return "–";
  if (Array.isArray(value)) return value.map(describe).join(", ");
  if (typeof value === "object") return Object.entries(value).map(([name, item]) => `${name} ${describe(item)}`).join(", ");
  if (typeof value === "number" && !Number.isInteger(value)) return String(Number(value.toPrecision(4)));
  return String(value);
}

function facts(pairs) {
  const list = element("dl", { class: "facts" });
  for (const [name, value] of pairs) {
    if (value === undefined || value === null || value === "") continue;
    list.append(element("dt", { text: name }), element("dd", { text: describe(value) }));
  }
  return list;
}

function showError(target, message) {
  target.textContent = message;
  target.hidden = !message;
}

// Catalog files the server left out (GET /models' catalog_problems): said, while every good entry is listed.
function showCatalogProblems(target, problems) {
  const lines = problems.map((problem) => `${problem.file}${problem.field ? ` (${problem.field})` : ""}: ${problem.message}`);
  showError(target, lines.length ? `Catalog files left out: ${lines.join("; ")}` : "");
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const randomSeed = () => Math.floor(Math.random() * RANDOM_SEEDS);

// Whether a seed field holds a seed the page can send exactly (or nothing); if not, the field says why
// and the browser keeps its form from being sent.
function checkSeed(input) {
  const text = input.value.trim();
  const valid = !input.validity.badInput && (text === "" || (/^\d+$/.test(text) && Number.isSafeInteger(Number(text))));
  input.setCustomValidity(valid ? "" : `Seed: ${SEED_RULE}.`);
  return valid;
}

function setSeed(input, seed) {
  input.value = seed;
  checkSeed(input);
}

// ---- talking to the server ----

class ServerError extends Error {
  constructor(status, body) {
    super(body && body.error ? body.error : `the server answered ${status}`);
    this.status = status;
  }
}

// A JSON answer: GET unless ``options`` (fetch's) say otherwise; a JSON error answer becomes a ServerError.
async function getJson(url, options = {}) {
  let response;
  try {
    response = await fetch(url, options);
  } catch (error) {
    throw new Error(`cannot reach the server (${error.message})`);
  }
  const body = await response.json().catch(() => null);
  if (!response.ok) throw new ServerError(response.status, body);
  return body;
}

// POST /ui/api/generate and read its NDJSON: progress lines, then the images or an error.
// A full queue (429) waits for Retry-After and tries again; onWait says so meanwhile.
async function generate(settings, { onStep, onWait }) {
  for (;;) {
    let response;
    try {
      response = await fetch("/ui/api/generate", {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify(settings),
      });
    } catch (error) {
      throw new Error(`cannot reach the server (${error.message})`);
    }
    if (response.status === 429) {
      const body = await response.json().catch(() => null);
      const seconds = Math.max(1, parseInt(response.headers.get("Retry-After") || "1", 10) || 1);
      onWait(`The queue is full (${body && body.error ? body.error : "429"}). Retrying in ${seconds} s…`);
      await sleep(seconds * 1000);
      continue;
    }
    if (!response.ok) throw new ServerError(response.status, await response.json().catch(() => null));
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffered = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffered += decoder.decode(value, { stream: true });
      const lines = buffered.split("\n");
      buffered = lines.pop();
      for (const line of lines) {
        if (!line.trim()) continue;
        const message = JSON.parse(line);
        if (message.error) throw new ServerError(message.status, message);
        if ("step" in message) onStep(message.step, message.steps);
        else return message;
      }
    }
    throw new Error("the server closed the connection before the images were ready");
  }
}

// ---- views ----

function showView(name) {
  for (const tab of document.querySelectorAll("button.tab")) {
    if (tab.dataset.view === name) tab.setAttribute("aria-current", "page");
    else tab.removeAttribute("aria-current");
  }
  for (const view of document.querySelectorAll(".view")) view.hidden = view.id !== `view-${name}`;
  if (name === "runs") loadRuns();
  if (name === "catalog") loadCatalog($("#catalog-query").value.trim()); // models may have loaded since
}

// The model lists of Generate and Compare, with what is loaded now.
async function refreshModels() {
  try {
    const listing = await getJson("/ui/api/catalog");
    catalogModels = listing.models;
    families = listing.families;
    fillModelSelects(listing.default);
    showFamilyDefaults();
  } catch (error) {
    showError($("#catalog-error"), `Could not reload the catalog: ${error.message}`);
  }
}

// ---- LoRA pickers: the catalog's LoRAs that fit a model, each added with a strength ----

// The LoRA entries a request for modelId may list: those of the weights it runs on (its base, for a LoRA
// fine-tune), as the server's check has it (serving/adapters.py).
function fittingLoras(modelId) {
  const model = catalogModels.find((entry) => entry.id === modelId);
  if (!model) return [];
  const base = model.method === "lora" ? model.base : model.id;
  return catalogModels.filter((entry) => entry.method === "lora" && entry.base === base);
}

const loraText = (loras) => (loras || []).map((lora) => `${lora.model} × ${lora.scale}`).join(", ");

function loraRow(id, scale) {
  const slider = element("input", { type: "range", ...LORA_STRENGTH, value: String(scale), "aria-label": `Strength of ${id}` });
  const shown = element("output", { text: Number(slider.value).toFixed(2) });
  slider.addEventListener("input", () => { shown.textContent = Number(slider.value).toFixed(2); });
  const remove = element("button", { type: "button", text: "Remove", "aria-label": `Remove ${id}` });
  const row = element("li", { "data-lora": id }, element("span", { text: id }), slider, shown, remove);
  remove.addEventListener("click", () => row.remove());
  return row;
}

// A picker of LoRAs for the model modelOf() names: node to place, refresh() when the model or catalog
// changes (LoRAs that no longer fit leave), read() for a request's loras, set(loras) to show some.
function loraPicker(legend, modelOf) {
  const choice = element("select", { "aria-label": `LoRA to add (${legend})` });
  const add = element("button", { type: "button", text: "Add LoRA" });
  const adding = element("div", { class: "row" }, choice, add);
  const none = element("p", { class: "status", text: "No LoRA in the catalog fits this model." });
  const list = element("ul", { class: "lora-list" });
  const node = element("fieldset", { class: "loras" }, element("legend", { text: legend }), adding, none, list);
  const chosen = () => [...list.children];
  function addLora(id, scale = 1) {
    chosen().find((row) => row.dataset.lora === id)?.remove(); // once per request: adding again sets its strength
    list.append(loraRow(id, scale));
  }
  function refresh() {
    const fitting = fittingLoras(modelOf()).map((entry) => entry.id);
    const previous = choice.value;
    choice.replaceChildren(...fitting.map((id) => element("option", { value: id, text: id })));
    if (fitting.includes(previous)) choice.value = previous;
    for (const row of chosen()) if (!fitting.includes(row.dataset.lora)) row.remove();
    node.hidden = !modelOf(); // a Compare column without a model
    adding.hidden = !fitting.length;
    none.hidden = fitting.length > 0;
  }
  add.addEventListener("click", () => { if (choice.value) addLora(choice.value); });
  return {
    node,
    refresh,
    read: () => chosen().map((row) => ({ model: row.dataset.lora, scale: Number(row.querySelector("input").value) })),
    set(loras) {
      list.replaceChildren();
      for (const lora of loras || []) addLora(lora.model, lora.scale);
      refresh();
    },
  };
}

function refreshLoraPickers() {
  generateLoras.refresh();
  for (const picker of compareLoras) picker.refresh();
}

// ---- catalog ----

function modelOption(model) {
  const label = `${model.id}${model.source === "finetune" ? " (fine-tune)" : ""}${model.loaded ? " · loaded" : ""}`;
  return element("option", { value: model.id, text: label });
}

// The chosen model's family shows its defaults in the empty fields and offers only the schedulers it fits.
function showFamilyDefaults() {
  generateLoras.refresh();
  const model = catalogModels.find((entry) => entry.id === $("#gen-model").value);
  const family = model && families[model.family];
  if (!family) return;
  $("#gen-steps").placeholder = `${family.default_steps} (model's own)`;
  $("#gen-guidance").placeholder = `${family.default_guidance} (model's own)`;
  fillSchedulerSelect(family.schedulers);
}

// The schedulers a request may name, as the server lists them (after "model's own").
function fillSchedulerSelect(schedulers) {
  const select = $("#gen-scheduler");
  const chosen = select.value;
  select.replaceChildren(element("option", { value: "", text: "model's own" }),
    ...schedulers.map((name) => element("option", { value: name, text: name })));
  select.value = schedulers.includes(chosen) ? chosen : "";
}

function fillModelSelects(defaultModel) {
  const generateSelect = $("#gen-model");
  const chosen = generateSelect.value || defaultModel;
  generateSelect.replaceChildren(...catalogModels.map(modelOption));
  generateSelect.value = chosen;
  document.querySelectorAll(".cmp-model").forEach((select, index) => {
    const previous = select.value;
    const none = index >= 2 ? [element("option", { value: "", text: "(none)" })] : [];
    select.replaceChildren(...none, ...catalogModels.map(modelOption));
    select.value = previous || (index < 2 ? defaultModel : "");
  });
  refreshLoraPickers();
}

function modelCard(model) {
  const finetune = model.source === "finetune";
  const badges = element("p", {},
    finetune ? element("span", { class: "badge finetune", text: `fine-tune · ${model.method}` }) : null,
    model.loaded ? element("span", { class: "badge loaded", text: "loaded" }) : null,
    ...model.tags.map((tag) => element("span", { class: "badge", text: tag })));
  const details = [
    ["family", model.family],
    ["resolution", `${model.resolution} px`],
    ["license", model.license || "see the model card"],
    ["example prompt", model.example_prompt],
  ];
  if (finetune) {
    details.push(["base", model.base], ["method", model.method], ["hyperparameters", model.hyperparameters], ["metrics", model.metrics]);
    if (model.tuning) details.push(["tuning", `study ${model.tuning.study}, best of ${model.tuning.trials.length} trials`]);
  }
  const buttons = element("div", { class: "buttons" },
    element("button", { type: "button", text: "Use this model", "aria-label": `Use ${model.id}`, onclick: () => useModel(model) }));
  if (finetune) {
    buttons.append(element("button", { type: "button", text: "Compare with base", "aria-label": `Compare ${model.id} with its base ${model.base}`, onclick: () => compareWithBase(model) }));
  }
  return element("li", { class: "card" },
    element("h3", { text: model.id }), badges,
    model.description ? element("p", { text: model.description }) : null,
    facts(details), buttons);
}

async function loadCatalog(query) {
  const status = $("#catalog-status");
  showError($("#catalog-error"), "");
  status.textContent = "Loading…";
  try {
    const listing = await getJson(`/ui/api/catalog?q=${encodeURIComponent(query)}`);
    if (!query) {
      catalogModels = listing.models;
      families = listing.families;
      fillModelSelects(listing.default);
      showFamilyDefaults();
    }
    if (query !== $("#catalog-query").value.trim()) return; // a later search is on its way
    const loaded = listing.loaded.length ? listing.loaded.join(", ") : "none";
    status.textContent = `${listing.models.length} model(s)${query ? ` matching “${query}”` : ""}. Loaded now: ${loaded}.`;
    $("#catalog-list").replaceChildren(...listing.models.map(modelCard));
    showCatalogProblems($("#catalog-error"), listing.catalog_problems);
  } catch (error) {
    status.textContent = "";
    showError($("#catalog-error"), `Could not load the catalog: ${error.message}`);
  }
}

function useModel(model) {
  $("#gen-model").value = model.id;
  showFamilyDefaults();
  if (!$("#gen-prompt").value && model.example_prompt) $("#gen-prompt").value = model.example_prompt;
  showView("generate");
  $("#gen-prompt").focus();
}

function compareWithBase(model) {
  const selects = document.querySelectorAll(".cmp-model");
  selects[0].value = model.id;
  selects[1].value = model.base;
  selects[2].value = "";
  selects[3].value = "";
  for (const picker of compareLoras) picker.set([]);
  if (!$("#cmp-prompt").value) $("#cmp-prompt").value = model.example_prompt || $("#gen-prompt").value || "a photo of sks dog";
  showView("compare");
  $("#cmp-submit").focus();
}

// ---- generate ----

function formSettings() {
  const form = $("#generate-form");
  const number = (name) => (form.elements[name].value === "" ? undefined : Number(form.elements[name].value));
  const text = (name) => form.elements[name].value || undefined;
  return {
    model: text("model"),
    prompt: form.elements.prompt.value,
    negative_prompt: text("negative_prompt"),
    width: number("width"),
    height: number("height"),
    num_inference_steps: number("num_inference_steps"),
    guidance_scale: number("guidance_scale"),
    scheduler: text("scheduler"),
    seed: number("seed"),
    num_images: number("num_images"),
    loras: generateLoras.read(),
  };
}

function applySettings(settings) {
  const form = $("#generate-form");
  for (const name of ["model", "prompt", "negative_prompt", "width", "height", "num_inference_steps", "guidance_scale", "scheduler", "seed"]) {
    if (form.elements[name]) form.elements[name].value = settings[name] ?? "";
  }
  showFamilyDefaults();
  generateLoras.set(settings.loras);
  checkSeed(form.elements.seed); // a history entry of an older page may hold a seed this one cannot send
  form.elements.num_images.value = 1;
}

// What made one image: the request's settings with this image's seed and the size it came out at.
function imageSettings(settings, answer, seed) {
  const { num_images: _, ...rest } = settings;
  return { ...rest, model: answer.model, width: answer.width, height: answer.height, seed, scheduler: settings.scheduler || "model's own" };
}

// ---- an image's recipe: what made a dropped image, and "Use these settings" ----

let droppedRecipe = null; // the txt2img recipe of the image dropped last

function dataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function pngInfo(file) {
  const response = await fetch("/sdapi/v1/png-info", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ image: await dataUrl(file) }),
  });
  const body = await response.json().catch(() => null);
  if (!response.ok) throw new Error(body && body.detail ? body.detail : `the server answered ${response.status}`);
  return body;
}

function recipeFacts(recipe) {
  return facts([
    ["Model", recipe.model],
    ["Model sha", recipe.model_sha.slice(0, 12)],
    ["LoRAs", loraText(recipe.loras) || "none"],
    ["Prompt", recipe.prompt],
    ["Negative prompt", recipe.negative_prompt],
    ["Prompt syntax", recipe.prompt_syntax],
    ["Seed", recipe.seed],
    ["Size", `${recipe.width}×${recipe.height}`],
    ["Steps", recipe.num_inference_steps],
    ["Guidance", recipe.guidance_scale],
    ["Scheduler", recipe.scheduler || "model's own"],
    ["txt2img", recipe.txt2img_version],
  ]);
}

async function showRecipe(file) {
  droppedRecipe = null;
  $("#recipe-view").hidden = true;
  showError($("#recipe-error"), "");
  let info;
  try {
    info = await pngInfo(file);
  } catch (error) {
    showError($("#recipe-error"), `Cannot read ${file.name}: ${error.message}`);
    return;
  }
  if (!info.items.txt2img) {
    const a1111 = info.info ? ` Its AUTOMATIC1111 parameters: ${info.info}` : "";
    showError($("#recipe-error"), `${file.name} carries no txt2img recipe.${a1111}`);
    return;
  }
  droppedRecipe = JSON.parse(info.items.txt2img);
  $("#recipe-facts").replaceChildren(recipeFacts(droppedRecipe));
  $("#recipe-view").hidden = false;
}

function useRecipe() {
  applySettings({ ...droppedRecipe, scheduler: droppedRecipe.scheduler || "" });
  const model = $("#gen-model").value;
  showError($("#recipe-error"), model === droppedRecipe.model ? "" : `Model ${droppedRecipe.model} is not in this server's catalog.`);
}

function onRecipeDrop(event) {
  event.preventDefault();
  const [file] = event.dataTransfer.files;
  if (file) showRecipe(file);
}

function resultCard(image, format, settings) {
  const source = `data:image/${format};base64,${image.image}`;
  const name = `txt2img-${settings.model}-${image.seed}.${format === "jpeg" ? "jpg" : "png"}`;
  return element("li", { class: "result", "data-seed": String(image.seed) },
    element("img", { src: source, alt: `${settings.prompt} (seed ${image.seed})`, width: String(settings.width), height: String(settings.height) }),
    facts([
      ["model", settings.model], ["LoRAs", loraText(settings.loras)], ["prompt", settings.prompt], ["negative", settings.negative_prompt],
      ["size", `${settings.width}×${settings.height}`], ["steps", settings.num_inference_steps],
      ["guidance", settings.guidance_scale], ["scheduler", settings.scheduler], ["seed", image.seed],
    ]),
    element("div", { class: "buttons" },
      element("a", { class: "button", href: source, download: name, text: "Download" }),
      element("button", { type: "button", text: "Reuse this seed", onclick: () => { setSeed($("#gen-seed"), image.seed); $("#gen-seed").focus(); } })));
}

function reportProgress(prefix) {
  const box = $(`#${prefix}-progress`);
  const label = $(`#${prefix}-progress-label`);
  const bar = $(`#${prefix}-progress-bar`);
  return {
    onStep(step, steps) {
      box.hidden = false;
      bar.max = steps;
      bar.value = step;
      label.textContent = step === 0 ? "Waiting in the queue…" : `Denoising: step ${step} of ${steps}`;
    },
    onWait(message) {
      box.hidden = false;
      label.textContent = message;
    },
    done() { box.hidden = true; },
  };
}

async function onGenerate(event) {
  event.preventDefault();
  const settings = formSettings();
  // A blank seed is drawn here, not by the server, so the seeds shown are those that made the images.
  settings.seed ??= randomSeed();
  const count = settings.num_images || 1;
  const exact = settings.seed <= Number.MAX_SAFE_INTEGER - (count - 1); // image i uses seed + i
  showError($("#gen-error"), exact ? "" : `${count} images from seed ${settings.seed} run past the largest seed: ${SEED_RULE}.`);
  if (!exact) return;
  const submit = $("#gen-submit");
  const progress = reportProgress("gen");
  submit.disabled = true;
  progress.onStep(0, settings.num_inference_steps || 1);
  try {
    const answer = await generate(settings, progress);
    const cards = answer.images.map((image) => resultCard(image, answer.format, imageSettings(settings, answer, image.seed)));
    $("#gen-gallery").prepend(...cards);
    for (const image of answer.images) remember(imageSettings(settings, answer, image.seed), image, answer.format);
  } catch (error) {
    showError($("#gen-error"), `Generation failed: ${error.message}`);
  } finally {
    progress.done();
    submit.disabled = false;
  }
  refreshModels();
}

// ---- history (localStorage) ----

function readHistory() {
  try {
    return JSON.parse(localStorage.getItem(HISTORY_KEY)) || [];
  } catch {
    return [];
  }
}

function writeHistory(entries) {
  // Trim the oldest entries until the list fits the browser's storage quota.
  while (entries.length) {
    try {
      localStorage.setItem(HISTORY_KEY, JSON.stringify(entries));
      return;
    } catch {
      entries = entries.slice(0, -1);
    }
  }
  localStorage.removeItem(HISTORY_KEY);
}

function remember(settings, image, format) {
  const source = `data:image/${format};base64,${image.image}`;
  const entry = { settings, at: new Date().toISOString(), thumbnail: source.length <= HISTORY_IMAGE_LIMIT ? source : null };
  writeHistory([entry, ...readHistory()].slice(0, HISTORY_LIMIT));
  renderHistory();
}

function renderHistory() {
  const items = readHistory().map((entry) => element("li", {},
    entry.thumbnail ? element("img", { src: entry.thumbnail, alt: "" }) : null,
    element("span", { text: `${entry.settings.model} · “${entry.settings.prompt}” · seed ${entry.settings.seed} · ${new Date(entry.at).toLocaleString()}` }),
    element("button", { type: "button", text: "Use these settings", onclick: () => { applySettings(entry.settings); $("#gen-prompt").focus(); } })));
  $("#gen-history").replaceChildren(...items);
}

// ---- compare ----

// A Compare column's title: its model, and its LoRAs with their strengths.
const columnTitle = (column) => column.model + (column.loras.length ? ` + ${loraText(column.loras)}` : "");

async function onCompare(event) {
  event.preventDefault();
  const columns = [...document.querySelectorAll(".cmp-model")]
    .map((select, index) => ({ model: select.value, loras: compareLoras[index].read() }))
    .filter((column) => column.model);
  showError($("#cmp-error"), "");
  if (new Set(columns.map((column) => JSON.stringify(column))).size < 2) {
    showError($("#cmp-error"), "Pick at least two different models, or one model with different LoRAs.");
    return;
  }
  const submit = $("#cmp-submit");
  submit.disabled = true;
  const shared = {
    prompt: $("#cmp-prompt").value,
    seed: Number($("#cmp-seed").value),
    num_inference_steps: Number($("#cmp-steps").value) || undefined,
  };
  const panels = columns.map((column) => {
    const title = columnTitle(column);
    const status = element("p", { class: "status", role: "status", text: "Waiting in the queue…" });
    const bar = element("progress", { max: "1", value: "0", "aria-label": `Progress of ${title}` });
    const panel = element("li", { class: "result", "data-model": column.model }, element("h3", { text: title }), status, bar);
    return { column, title, panel, status, bar };
  });
  $("#cmp-results").replaceChildren(...panels.map((item) => item.panel));
  await Promise.all(panels.map(async ({ column, title, panel, status, bar }) => {
    const settings = { ...shared, ...column, num_images: 1 };
    try {
      const answer = await generate(settings, {
        onStep(step, steps) {
          bar.max = steps;
          bar.value = step;
          status.textContent = step === 0 ? "Waiting in the queue…" : `Step ${step} of ${steps}`;
        },
        onWait(message) { status.textContent = message; },
      });
      const [image] = answer.images;
      panel.replaceWith(resultCard(image, answer.format, imageSettings(settings, answer, image.seed)));
    } catch (error) {
      bar.remove();
      status.className = "error";
      status.setAttribute("role", "alert");
      status.textContent = `${title}: ${error.message}`;
    }
  }));
  submit.disabled = false;
  refreshModels();
}

// ---- runs ----

function figure(path, caption) {
  if (!path) return null;
  const url = `/ui/files/${path.split("/").map(encodeURIComponent).join("/")}`;
  return element("figure", { class: "figure" },
    element("a", { href: url, target: "_blank", rel: "noopener" }, element("img", { src: url, alt: caption, loading: "lazy" })),
    element("figcaption", { text: caption }));
}

function metricsTable(rows, columns) {
  const head = element("tr", {}, ...columns.map((column) => element("th", { scope: "col", text: column })));
  const body = rows.map((row) => element("tr", {}, ...row.map((cell) => element("td", { text: describe(cell) }))));
  return element("table", {}, element("thead", {}, head), element("tbody", {}, ...body));
}

function runDetails(run) {
  const parts = [];
  const training = [figure(run.contact_sheet, "Contact sheet"), figure(run.loss_curve, "Loss curve"),
    run.loss_history ? lossHistoryFigure(run.loss_history) : null, // finetune.js
    ...run.validation.map((path) => figure(path, `Validation: ${path.split("/").pop()}`))].filter(Boolean);
  parts.push(element("h4", { text: "Training" }),
    training.length ? element("div", { class: "figures" }, ...training) : element("p", { class: "status", text: "No training images in this home." }));
  if (run.evaluations.length) {
    parts.push(element("h4", { text: "Evaluations" }));
    for (const evaluation of run.evaluations) {
      const names = Object.keys(evaluation.metrics);
      parts.push(element("p", { text: `Evaluated ${evaluation.created || ""}` }),
        metricsTable([names.map((name) => evaluation.metrics[name])], names),
        element("div", { class: "figures" }, figure(evaluation.grid, "Evaluation grid")));
    }
  }
  if (run.tuning) {
    const tuning = run.tuning;
    parts.push(element("h4", { text: `Tuning: study ${tuning.study}` }),
      element("p", { text: `Objective ${tuning.objective} (${tuning.direction}); best trial ${tuning.best_trial}.` }),
      metricsTable(tuning.trials.map((trial) => [trial.number, trial.state, trial.params, trial.value]), ["trial", "state", "hyperparameters", tuning.objective]),
      element("div", { class: "figures" }, figure(tuning.objective_plot, "Objective by trial"),
        ...tuning.trials.map((trial) => figure(trial.grid, `Trial ${trial.number}`))));
  }
  return parts;
}

function runCard(run) {
  const model = run.model;
  const details = element("div", { class: "run-details", hidden: "" });
  const toggle = element("button", { type: "button", "aria-expanded": "false", text: `Open ${model.id}` });
  toggle.addEventListener("click", () => {
    const opening = details.hidden;
    if (opening && !details.childElementCount) details.append(...runDetails(run));
    details.hidden = !opening;
    toggle.setAttribute("aria-expanded", String(opening));
    toggle.textContent = `${opening ? "Close" : "Open"} ${model.id}`;
  });
  return element("li", { class: "run", "data-model": model.id },
    element("h3", { text: model.id }),
    facts([["base", model.base], ["method", model.method], ["hyperparameters", model.hyperparameters], ["metrics", model.metrics], ["created", model.created]]),
    element("div", { class: "buttons" }, toggle,
      element("button", { type: "button", text: "Compare with base", "aria-label": `Compare ${model.id} with its base ${model.base}`, onclick: () => compareWithBase(model) })),
    details);
}

async function loadRuns() {
  showError($("#runs-error"), "");
  try {
    const { runs, catalog_problems: problems } = await getJson("/ui/api/runs");
    showCatalogProblems($("#runs-error"), problems);
    const list = $("#runs-list");
    if (!runs.length) list.replaceChildren(element("li", { class: "status", text: "No fine-tunes in this home yet: see `txt2img train`." }));
    else list.replaceChildren(...runs.map(runCard));
  } catch (error) {
    showError($("#runs-error"), `Could not load the runs: ${error.message}`);
  }
}

// ---- start ----

function debounce(action, ms) {
  let timer;
  return (...args) => { clearTimeout(timer); timer = setTimeout(() => action(...args), ms); };
}

document.addEventListener("DOMContentLoaded", () => {
  generateLoras = loraPicker("LoRAs", () => $("#gen-model").value);
  $("#gen-loras").append(generateLoras.node);
  compareLoras = [...document.querySelectorAll(".cmp-column")].map((column, index) => {
    const select = column.querySelector(".cmp-model");
    const picker = loraPicker(`LoRAs of model ${index + 1}`, () => select.value);
    column.append(picker.node);
    select.addEventListener("change", picker.refresh);
    return picker;
  });
  for (const tab of document.querySelectorAll("button.tab")) tab.addEventListener("click", () => showView(tab.dataset.view));
  const search = debounce(() => loadCatalog($("#catalog-query").value.trim()), 250);
  $("#catalog-query").addEventListener("input", search);
  $("#catalog-search").addEventListener("submit", (event) => { event.preventDefault(); loadCatalog($("#catalog-query").value.trim()); });
  $("#generate-form").addEventListener("submit", onGenerate);
  $("#gen-model").addEventListener("change", showFamilyDefaults);
  $("#compare-form").addEventListener("submit", onCompare);
  $("#gen-dice").addEventListener("click", () => setSeed($("#gen-seed"), randomSeed()));
  $("#cmp-dice").addEventListener("click", () => setSeed($("#cmp-seed"), randomSeed()));
  for (const input of [$("#gen-seed"), $("#cmp-seed")]) input.addEventListener("input", () => checkSeed(input));
  $("#recipe-file").addEventListener("change", () => { if ($("#recipe-file").files[0]) showRecipe($("#recipe-file").files[0]); });
  $("#recipe-drop").addEventListener("dragover", (event) => event.preventDefault());
  $("#recipe-drop").addEventListener("drop", onRecipeDrop);
  $("#recipe-use").addEventListener("click", useRecipe);
  $("#history-clear").addEventListener("click", () => { localStorage.removeItem(HISTORY_KEY); renderHistory(); });
  renderHistory();
  loadCatalog("");
});
