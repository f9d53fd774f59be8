// The console's few dynamic parts: live build progress, a refreshing results plot and the playground.
"use strict";

function csrfToken() {
  const meta = document.querySelector('meta[name="csrf-token"]');
  return meta ? meta.content : "";
}

async function postJSON(url, body) {
  return fetch(url, {
    method: "POST", credentials: "same-origin",
    headers: {"Content-Type": "application/json", "Accept": "application/json", "X-CSRF-Token": csrfToken()},
    body: JSON.stringify(body),
  });
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error ? body.error.message + (body.error.field ? " (" + body.error.field + ")" : "") : response.statusText;
  } catch (e) {
    return response.status + " " + response.statusText;
  }
}

// Elements with data-poll show a profile's status until it is final, then the page reloads with its results.
function pollStatus(el) {
  const tick = async () => {
    try {
      const response = await fetch(el.dataset.poll, {credentials: "same-origin", headers: {"Accept": "application/json"}});
      if (response.ok) {
        const state = await response.json();
        el.textContent = state.label;
        el.className = "status " + state.status;
        if (state.final) { location.reload(); return; }
      }
    } catch (e) { /* the next tick retries */ }
    setTimeout(tick, 1000);
  };
  setTimeout(tick, 1000);
}

// The profile list asks for all its unfinished profiles in one request, and reloads when one finishes.
function pollStatuses(table) {
  const cells = Array.from(table.querySelectorAll("[data-profile-id]"));
  if (!cells.length) return;
  const url = table.dataset.statuses + "?ids=" + cells.map((c) => c.dataset.profileId).join(",");
  const tick = async () => {
    try {
      const response = await fetch(url, {credentials: "same-origin", headers: {"Accept": "application/json"}});
      if (response.ok) {
        const states = await response.json();
        for (const cell of cells) {
          const state = states[cell.dataset.profileId];
          if (!state) continue;
          cell.textContent = state.label;
          cell.className = "status " + state.status;
          if (state.final) { location.reload(); return; }
        }
      }
    } catch (e) { /* the next tick retries */ }
    setTimeout(tick, 2000);
  };
  setTimeout(tick, 2000);
}

function refreshImage(img) {
  const base = img.src.split("?")[0];
  setInterval(() => { img.src = base + "?t=" + Date.now(); }, Number(img.dataset.refresh));
}

// ----------------------------------------------------------------------------------------- playground

function blend(form) {
  return Array.from(form.querySelectorAll("input[data-profile]"))
    .filter((input) => Number(input.value) > 0)
    .map((input) => ({id: input.dataset.profile, weight: Number(input.value)}));
}

function showError(message) {
  const el = document.getElementById("playground-error");
  el.textContent = message;
  el.hidden = !message;
}

// Reads an OpenAI-style SSE stream of chat chunks into `target` as the tokens arrive.
// The first chunk names the profiles the server applied; `applied` shows them.
async function streamInto(response, target, applied) {
  if (!response.ok) { target.textContent = ""; showError(await errorText(response)); return; }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut).trim();
      buffer = buffer.slice(cut + 2);
      if (!event.startsWith("data: ")) continue;
      const data = event.slice(6);
      if (data === "[DONE]") { target.classList.add("done"); continue; }
      const chunk = JSON.parse(data);
      if (chunk.error) { showError(chunk.error.message); continue; }
      if (chunk.steering && applied) applied.textContent = describeSteering(chunk.steering);
      for (const choice of chunk.choices || []) {
        if (choice.delta && choice.delta.content) target.textContent += choice.delta.content;
      }
    }
  }
}

function describeSteering(steering) {
  if (!steering.profiles.length) return "unsteered";
  return "steered by " + steering.profiles.map((p) =>
    `${p.id.slice(0, 8)} × ${p.weight} (${p.method}, layer ${p.layer}, strength ${p.strength})`).join(" + ");
}

function generate(form) {
  const model = form.dataset.model;
  const messages = [{role: "user", content: form.querySelector("#prompt").value}];
  const common = {model, messages, stream: true, max_tokens: Number(form.max_tokens.value),
                  temperature: Number(form.temperature.value)};
  showError("");
  const sides = [["answer-unsteered", {profiles: []}], ["answer-steered", {profiles: blend(form)}]];
  return Promise.all(sides.map(async ([id, steering]) => {
    const target = document.getElementById(id);
    target.textContent = "";
    target.classList.remove("done");
    const response = await postJSON(form.dataset.chat, {...common, steering});
    await streamInto(response, target, document.getElementById(id.replace("answer-", "applied-")));
  }));
}

function bars(container, title, options, probs) {
  container.innerHTML = "";
  const heading = document.createElement("h3");
  heading.textContent = title;
  container.appendChild(heading);
  options.forEach((option, i) => {
    const row = document.createElement("div");
    row.className = "bar-row";
    row.innerHTML = '<span class="bar-label"></span><span class="bar"><span class="fill"></span></span><span class="bar-value"></span>';
    row.querySelector(".bar-label").textContent = option;
    row.querySelector(".fill").style.width = (100 * probs[i]).toFixed(1) + "%";
    row.querySelector(".bar-value").textContent = probs[i].toFixed(3);
    container.appendChild(row);
  });
}

async function scoreQuestion(form, playground) {
  const question = form.querySelector("#mc-question").value;
  const options = form.querySelector("#mc-options").value.split("\n").map((s) => s.trim()).filter(Boolean);
  showError("");
  const sides = [["bars-unsteered", "unsteered", {profiles: []}], ["bars-steered", "steered", {profiles: blend(playground)}]];
  await Promise.all(sides.map(async ([id, title, steering]) => {
    const response = await postJSON(playground.dataset.score, {model: playground.dataset.model,
      questions: [{question, options}], steering});
    if (!response.ok) { showError(await errorText(response)); return; }
    const result = await response.json();
    bars(document.getElementById(id), title, options, result.scores[0].probs);
  }));
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-poll]").forEach(pollStatus);
  document.querySelectorAll("table[data-statuses]").forEach(pollStatuses);
  document.querySelectorAll("img[data-refresh]").forEach(refreshImage);
  document.querySelectorAll("[data-reload]").forEach((el) => setTimeout(() => location.reload(), Number(el.dataset.reload)));
  document.querySelectorAll("form[data-confirm]").forEach((form) => {
    form.addEventListener("submit", (event) => { if (!confirm(form.dataset.confirm)) event.preventDefault(); });
  });
  const playground = document.getElementById("playground");
  if (playground) {
    playground.querySelectorAll('input[type="range"]').forEach((input) => {
      input.addEventListener("input", () => { input.nextElementSibling.textContent = Number(input.value).toFixed(1); });
    });
    playground.addEventListener("submit", (event) => { event.preventDefault(); generate(playground); });
    const scoreForm = document.getElementById("score-form");
    scoreForm.addEventListener("submit", (event) => { event.preventDefault(); scoreQuestion(scoreForm, playground); });
  }
});
