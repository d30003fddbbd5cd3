// minisd's web page: talks to the server's own A1111 API (/sdapi/v1/...); plain browser JavaScript, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { tab: "txt2img", initDataUrl: null, maskDrawn: false, maskUpload: null, lastSeed: null,
                lastParams: null, busy: false };

async function api(path, body) {
  const response = await fetch(path, body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    const detail = data && (typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail));
    throw new Error(detail || `HTTP ${response.status}`);
  }
  return data;
}

function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

// ---- tabs --------------------------------------------------------------------------------------------------

function selectTab(tab) {
  state.tab = tab;
  for (const button of document.querySelectorAll(".tabs button")) {
    button.classList.toggle("active", button.dataset.tab === tab);
  }
  $("form").hidden = tab === "pnginfo";
  $("pnginfo-panel").hidden = tab !== "pnginfo";
  $("img2img-panel").hidden = tab !== "img2img";
}
for (const button of document.querySelectorAll(".tabs button")) {
  button.addEventListener("click", () => selectTab(button.dataset.tab));
}

// ---- lists from the server ---------------------------------------------------------------------------------

function fillSelect(select, items, selected) {
  select.replaceChildren(...items.map(([value, label]) => new Option(label, value, false, value === selected)));
}

async function loadLists() {
  const [samplers, schedulers, models, options] = await Promise.all([
    api("/sdapi/v1/samplers"), api("/sdapi/v1/schedulers"), api("/sdapi/v1/sd-models"), api("/sdapi/v1/options")]);
  fillSelect($("sampler_name"), samplers.map((s) => [s.name, s.name]), "Euler a");
  fillSelect($("scheduler"), schedulers.map((s) => [s.name, s.label]), "automatic");
  fillSelect($("model"), models.map((m) => [m.title, m.title]), options.sd_model_checkpoint);
  if (options.minisd_image_size) {
    $("width").value = $("height").value = options.minisd_image_size;
  }
}

$("model").addEventListener("change", async () => {
  $("status").textContent = "loading model…";
  try {
    await api("/sdapi/v1/options", { sd_model_checkpoint: $("model").value });
    const options = await api("/sdapi/v1/options");
    if (options.minisd_image_size) $("width").value = $("height").value = options.minisd_image_size;
    $("status").textContent = "idle";
  } catch (e) { showError(e.message); }
});

// ---- init image and mask -----------------------------------------------------------------------------------

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function setInitImage(dataUrl) {
  state.initDataUrl = dataUrl;
  state.maskUpload = null;
  const img = $("init-img");
  img.onload = () => {
    const canvas = $("mask-canvas");
    canvas.width = img.naturalWidth;
    canvas.height = img.naturalHeight;
    clearMask();
  };
  img.src = dataUrl;
  $("stack").hidden = false;
  $("init-hint").hidden = true;
}

function clearMask() {
  const canvas = $("mask-canvas");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  state.maskDrawn = false;
  state.maskUpload = null;
}
$("clear-mask").addEventListener("click", clearMask);

function dropZone(zone, onFile) {
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer.files.length) onFile(e.dataTransfer.files[0]);
  });
}
dropZone($("drop-init"), async (file) => setInitImage(await readFile(file)));
$("init-file").addEventListener("change", async (e) => {
  if (e.target.files[0]) setInitImage(await readFile(e.target.files[0]));
});
$("mask-file").addEventListener("change", async (e) => {
  if (!e.target.files[0]) return;
  clearMask();
  state.maskUpload = await readFile(e.target.files[0]);
  const mask = new Image();
  mask.onload = () => {  // show the uploaded mask over the image: white where it repaints
    const canvas = $("mask-canvas");
    canvas.getContext("2d").drawImage(mask, 0, 0, canvas.width, canvas.height);
  };
  mask.src = state.maskUpload;
});

// Painting: white, opaque strokes on a transparent canvas at the image's own resolution.
(function paintMask() {
  const canvas = $("mask-canvas");
  let last = null;
  const at = (e) => {
    const box = canvas.getBoundingClientRect();
    return [(e.clientX - box.left) * canvas.width / box.width, (e.clientY - box.top) * canvas.height / box.height];
  };
  const stroke = (from, to) => {
    const ctx = canvas.getContext("2d");
    const scale = canvas.width / canvas.getBoundingClientRect().width;
    ctx.strokeStyle = ctx.fillStyle = "#fff";
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.lineWidth = Number($("brush").value) * scale;
    ctx.beginPath();
    ctx.moveTo(...from);
    ctx.lineTo(...to);
    ctx.stroke();
    state.maskDrawn = true;
    state.maskUpload = null;
  };
  canvas.addEventListener("pointerdown", (e) => {
    canvas.setPointerCapture(e.pointerId);
    last = at(e);
    stroke(last, last);
  });
  canvas.addEventListener("pointermove", (e) => {
    if (!last) return;
    const point = at(e);
    stroke(last, point);
    last = point;
  });
  for (const end of ["pointerup", "pointercancel"]) canvas.addEventListener(end, () => { last = null; });
})();

function maskDataUrl() {
  if (state.maskUpload) return state.maskUpload;
  if (!state.maskDrawn) return null;
  const source = $("mask-canvas");
  const out = document.createElement("canvas");
  out.width = source.width;
  out.height = source.height;
  const ctx = out.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, out.width, out.height);
  ctx.drawImage(source, 0, 0);
  return out.toDataURL("image/png");
}

// ---- seed --------------------------------------------------------------------------------------------------

$("seed-random").addEventListener("click", () => { $("seed").value = -1; });
$("seed-reuse").addEventListener("click", () => { if (state.lastSeed !== null) $("seed").value = state.lastSeed; });

// ---- generate, progress, interrupt -------------------------------------------------------------------------

function requestBody() {
  const number = (id) => Number($(id).value);
  const body = {
    prompt: $("prompt").value, negative_prompt: $("negative_prompt").value, sampler_name: $("sampler_name").value,
    scheduler: $("scheduler").value, steps: number("steps"), cfg_scale: number("cfg_scale"), width: number("width"),
    height: number("height"), batch_size: number("batch_size"), seed: number("seed"),
  };
  if (state.tab === "img2img") {
    body.init_images = [state.initDataUrl];
    body.denoising_strength = number("denoising_strength");
    const mask = maskDataUrl();
    if (mask) {
      body.mask = mask;
      body.mask_blur = number("mask_blur");
      body.inpainting_fill = 1;
      body.inpaint_full_res = $("inpaint_full_res").checked;
    }
  }
  return body;
}

async function watchProgress() {
  while (state.busy) {
    try {
      const p = await api("/sdapi/v1/progress");
      if (!state.busy) break;
      $("progress").value = p.progress;
      const s = p.state;
      $("status").textContent = s.job_count
        ? `step ${s.sampling_step}/${s.sampling_steps}`
          + (s.job_count > 1 ? `, batch ${s.job_no + 1}/${s.job_count}` : "")
          + (p.eta_relative > 0 ? `, ${p.eta_relative.toFixed(1)} s left` : "")
        : p.queue_size ? "queued" : "starting…";
      if (p.current_image) {
        $("preview").src = "data:image/png;base64," + p.current_image;
        $("preview").hidden = false;
      }
    } catch (e) { /* a missed poll is harmless */ }
    await new Promise((resolve) => setTimeout(resolve, 250));
  }
}

$("form").addEventListener("submit", async (e) => {
  e.preventDefault();
  if (state.busy) return;
  if (state.tab === "img2img" && !state.initDataUrl) { showError("img2img needs an image: drop one above"); return; }
  showError("");
  state.busy = true;
  $("generate").disabled = true;
  $("progress").value = 0;
  const endpoint = state.tab === "img2img" ? "/sdapi/v1/img2img" : "/sdapi/v1/txt2img";
  const progress = watchProgress();
  try {
    const result = await api(endpoint, requestBody());
    const info = JSON.parse(result.info);
    // prepended one by one: the last first, so that a batch reads in seed order
    for (let i = info.infotexts.length - 1; i >= 0; i--) {
      addToGallery(result.images[i], info.infotexts[i], info.all_seeds[i]);
    }
    state.lastSeed = info.all_seeds[0];
    $("progress").value = 1;
    $("status").textContent = info.minisd_job && info.minisd_job.interrupted ? "interrupted" : "done";
  } catch (err) {
    showError(err.message);
    $("status").textContent = "error";
  } finally {
    state.busy = false;
    $("generate").disabled = false;
    $("preview").hidden = true;
    await progress;
  }
});

$("interrupt").addEventListener("click", () => api("/sdapi/v1/interrupt", {}).catch((e) => showError(e.message)));

// ---- gallery -----------------------------------------------------------------------------------------------

function addToGallery(base64, infotext, seed) {
  const card = document.createElement("figure");
  card.className = "card";
  const img = document.createElement("img");
  img.src = "data:image/png;base64," + base64;
  img.alt = infotext.split("\n")[0];
  const text = document.createElement("pre");
  text.textContent = infotext;
  const buttons = document.createElement("div");
  buttons.className = "row";
  const button = (label, action) => {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = label;
    b.addEventListener("click", action);
    buttons.append(b);
  };
  button("Send to img2img", () => { setInitImage(img.src); selectTab("img2img"); });
  button("Use seed", () => { $("seed").value = seed; });
  const link = document.createElement("a");
  link.href = img.src;
  link.download = `minisd-${seed}.png`;
  link.textContent = "Save";
  buttons.append(link);
  card.append(img, text, buttons);
  $("gallery").prepend(card);
}

// ---- PNG info ----------------------------------------------------------------------------------------------

async function readPngInfo(file) {
  const dataUrl = await readFile(file);
  try {
    const info = await api("/sdapi/v1/png-info", { image: dataUrl });
    $("png-text").textContent = info.info || "(no generation parameters in this image)";
    state.lastParams = info.parameters;
    $("png-to-txt2img").hidden = !info.info;
    selectTab("pnginfo");
  } catch (e) { showError(e.message); }
}
dropZone($("drop-png"), readPngInfo);
$("png-file").addEventListener("change", (e) => e.target.files[0] && readPngInfo(e.target.files[0]));
$("png-to-txt2img").addEventListener("click", () => {
  const p = state.lastParams || {};
  $("prompt").value = p.Prompt || "";
  $("negative_prompt").value = p["Negative prompt"] || "";
  if (p.Steps) $("steps").value = p.Steps;
  if (p["CFG scale"]) $("cfg_scale").value = p["CFG scale"];
  if (p.Seed) $("seed").value = p.Seed;
  if (p.Size) [$("width").value, $("height").value] = p.Size.split("x");
  if (p.Sampler) $("sampler_name").value = p.Sampler;
  selectTab("txt2img");
});

loadLists().catch((e) => showError("cannot reach the server: " + e.message));
