// The page of `dmuh serve`: send a dropped or chosen image (or a text) to POST /search and show the
// ranked database images. Everything shown comes from the server as data and is set as text,
// never as HTML.
"use strict";
const $ = (id) => document.getElementById(id);
let info = null;
let lastQuery = null;

function showError(message) {
  $("error").textContent = message || "";
}

async function loadInfo() {
  try {
    const response = await fetch("/info");
    info = await response.json();
  } catch (error) {
    $("info").textContent = "cannot reach the server";
    return;
  }
  const model = info.model && info.model.method ? `${info.model.method} / ${info.model.model}` : "unknown model";
  $("info").textContent = `${info.count.toLocaleString()} codes of ${info.bits} bits, ${info.kind} index, ${model}` +
    (info.queries.image ? "" : " (this server takes no image queries)");
  $("k").max = info.max_k;
  $("rerank-box").hidden = !info.rerank.includes("uncertainty");
  $("text-box").hidden = !info.queries.text;
}

function options(form) {
  form.append("k", String(Math.max(1, Math.min(Number($("k").value) || 10, info ? info.max_k : 10))));
  if ($("rerank").checked && !$("rerank-box").hidden) form.append("rerank", "uncertainty");
  return form;
}

async function search(form, preview) {
  showError("");
  $("status").textContent = "searching...";
  $("results").replaceChildren();
  let response, body;
  try {
    response = await fetch("/search", { method: "POST", body: options(form) });
    body = await response.json();
  } catch (error) {
    $("status").textContent = "";
    showError("the search failed: " + error);
    return;
  }
  $("status").textContent = "";
  if (!response.ok) {
    showError(body.error || `error ${response.status}`);
    return;
  }
  showQuery(body.query, preview);
  showResults(body.results);
}

function showQuery(query, preview) {
  $("query").style.display = "flex";
  $("query-image").hidden = !preview;
  if (preview) $("query-image").src = preview;
  $("query-code").textContent = query.code;
  $("uncertainty-line").hidden = query.uncertainty === null;
  $("bits-line").hidden = !query.uncertain_bits.length;
  if (query.uncertainty !== null) $("query-uncertainty").textContent = query.uncertainty.toExponential(3);
  $("uncertain-bits").replaceChildren(...query.uncertain_bits.map((bit) => {
    const item = document.createElement("li");
    item.textContent = `bit ${bit.bit}: ${bit.uncertainty.toExponential(2)}`;
    return item;
  }));
}

function showResults(results) {
  $("results").replaceChildren(...results.map((row) => {
    const figure = document.createElement("figure");
    figure.className = "hit";
    figure.dataset.id = row.id;
    figure.dataset.distance = row.distance;
    if (info && info.thumbnails) {
      const image = document.createElement("img");
      image.src = `/thumbnail/${encodeURIComponent(row.id)}`;
      image.alt = row.path || `id ${row.id}`;
      image.loading = "lazy";
      figure.append(image);
    }
    const caption = document.createElement("figcaption");
    caption.textContent = `#${row.rank} · distance ${row.distance}` +
      (row.weighted_distance !== undefined ? ` · weighted ${row.weighted_distance.toFixed(3)}` : "");
    const path = document.createElement("div");
    path.className = "path";
    path.textContent = row.path || `id ${row.id}`;
    figure.append(caption, path);
    return figure;
  }));
  $("status").textContent = `${results.length} results`;
}

function searchFile(file) {
  if (!file) return;
  if (lastQuery) URL.revokeObjectURL(lastQuery);
  lastQuery = URL.createObjectURL(file);
  const form = new FormData();
  form.append("image", file, file.name);
  search(form, lastQuery);
}

$("drop").addEventListener("click", () => $("file").click());
$("drop").addEventListener("keydown", (event) => { if (event.key === "Enter" || event.key === " ") $("file").click(); });
$("file").addEventListener("change", () => searchFile($("file").files[0]));
$("drop").addEventListener("dragover", (event) => { event.preventDefault(); $("drop").classList.add("over"); });
$("drop").addEventListener("dragleave", () => $("drop").classList.remove("over"));
$("drop").addEventListener("drop", (event) => {
  event.preventDefault();
  $("drop").classList.remove("over");
  searchFile(event.dataTransfer.files[0]);
});
$("text-go").addEventListener("click", () => {
  const form = new FormData();
  form.append("text", $("text").value);
  $("rerank").checked = false;
  search(form, null);
});
loadInfo();
