// The try-it page: sends each photo to POST faces (relative to <base>, so any route prefix works) and draws the
// answer. No framework, no build step, no request to any other host.
"use strict";

const results = document.getElementById("results");
const statusLine = document.getElementById("status");
const drop = document.getElementById("drop");
const input = document.getElementById("photos");

function fmt(value, digits = 3) {
  return typeof value === "number" ? value.toFixed(digits) : "n/a";
}

function element(tag, attributes = {}, text) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

async function showMetadata() {
  const list = document.getElementById("metadata");
  try {
    const answer = await fetch("metadata");
    const meta = await answer.json();
    if (!answer.ok) throw new Error(meta.error || `HTTP ${answer.status}`);
    const val = meta.validation_metrics || {};
    const test = meta.test_metrics || {};
    const calibration = meta.calibration || {};
    const rows = [
      ["Model version", meta.model_version],
      ["Input size", (meta.input_size || []).join(" x ") + " (height x width)"],
      ["Validation", `accuracy ${fmt(val.val_accuracy)}, balanced ${fmt(val.val_balanced_accuracy)}, AUC ${fmt(val.val_auc)} on ${val.val_count ?? "n/a"} images`],
      ["Test", test.accuracy === undefined ? "no report" : `accuracy ${fmt(test.accuracy)}, balanced ${fmt(test.balanced_accuracy)}, AUC ${fmt(test.auc)} on ${test.count} images (${test.split})`],
      ["Calibration", `temperature ${fmt(calibration.temperature)}; uncertain when p_male is in [${(calibration.uncertain_band || []).map((v) => fmt(v)).join(", ")}]` +
        (calibration.target_accuracy ? ` (target accuracy ${calibration.target_accuracy} on val)` : "")],
      ["Most faces per photo", meta.limits ? meta.limits.max_faces : "n/a"],
    ];
    list.replaceChildren();
    for (const [term, value] of rows) {
      list.append(element("dt", {}, term), element("dd", {}, String(value)));
    }
  } catch (error) {
    list.replaceChildren(element("dt", {}, "Error"), element("dd", { class: "error" }, error.message));
  }
}

function drawFaces(card, answer) {
  const stage = card.querySelector(".stage");
  const list = card.querySelector(".faces");
  const [width, height] = answer.image_size;
  answer.faces.forEach((face, index) => {
    const [x0, y0, x1, y1] = face.box;
    const kind = face.uncertain ? "uncertain" : face.label;
    const box = element("div", { class: `face-box ${face.label}${face.uncertain ? " uncertain" : ""}`,
                                 "data-label": face.label, "aria-hidden": "true" });
    Object.assign(box.style, { left: `${(100 * x0) / width}%`, top: `${(100 * y0) / height}%`,
                               width: `${(100 * (x1 - x0)) / width}%`, height: `${(100 * (y1 - y0)) / height}%` });
    box.append(element("span", {}, `${index + 1}: ${face.label} ${fmt(face.p_male, 2)}${face.uncertain ? " ?" : ""}`));
    stage.append(box);

    const item = element("li", { class: `face ${kind}` });
    if (face.crop) item.append(element("img", { src: face.crop, alt: `face ${index + 1} as the model saw it (aligned)` }));
    const text = element("div");
    text.append(element("strong", { class: "label" }, `${index + 1}. ${face.label}`));
    if (face.uncertain) text.append(" ", element("span", { class: "badge" }, "uncertain"));
    const meter = element("meter", { min: "0", max: "1", value: String(face.p_male), "aria-label": `p_male of face ${index + 1}` });
    text.append(element("br"), "p_male ", meter, ` ${fmt(face.p_male)}`);
    text.append(element("br"), element("small", {}, `detection score ${fmt(face.detection_score, 2)}`));
    item.append(text);
    list.append(item);
  });
}

async function analyse(file) {
  const card = document.getElementById("photo-card").content.firstElementChild.cloneNode(true);
  card.querySelector(".name").textContent = file.name || "pasted image";
  const photo = card.querySelector(".photo");
  photo.src = URL.createObjectURL(file);
  photo.alt = `your photo ${file.name || ""}`.trim();
  results.prepend(card);
  const summary = card.querySelector(".summary");
  summary.textContent = "Looking for faces\u2026";
  try {
    const answer = await fetch("faces?crops=true", { method: "POST", body: file,
                                                      headers: { "Content-Type": file.type || "application/octet-stream" } });
    let body;
    try { body = await answer.json(); } catch { body = { error: `HTTP ${answer.status}` }; }
    if (!answer.ok) {
      summary.className = "summary error";
      summary.textContent = `${answer.status}: ${body.error || answer.statusText}`;
      return;
    }
    const n = body.faces.length;
    summary.textContent = n === 0 ? "No face found." : `${n} face${n === 1 ? "" : "s"} found (largest first).`;
    drawFaces(card, body);
  } catch (error) {
    summary.className = "summary error";
    summary.textContent = `The endpoint could not be reached: ${error.message}`;
  }
}

async function analyseAll(files) {
  const list = Array.from(files || []);
  if (!list.length) return;
  statusLine.textContent = `Sending ${list.length} photo${list.length === 1 ? "" : "s"}\u2026`;
  await Promise.all(list.map(analyse));
  statusLine.textContent = `Done: ${list.length} photo${list.length === 1 ? "" : "s"}.`;
}

input.addEventListener("change", () => { analyseAll(input.files); input.value = ""; });
drop.addEventListener("keydown", (event) => {
  if (event.key === "Enter" || event.key === " ") { event.preventDefault(); input.click(); }
});
for (const type of ["dragenter", "dragover"]) {
  drop.addEventListener(type, (event) => { event.preventDefault(); drop.classList.add("over"); });
}
for (const type of ["dragleave", "drop"]) {
  drop.addEventListener(type, () => drop.classList.remove("over"));
}
drop.addEventListener("drop", (event) => { event.preventDefault(); analyseAll(event.dataTransfer.files); });
document.addEventListener("paste", (event) => analyseAll(event.clipboardData && event.clipboardData.files));
showMetadata();
