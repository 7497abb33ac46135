// Case list: one row per slide with the chosen task's prediction; filter and sort in the page.
import { el, fmtProb, getJSON, oodBadge, showError, topKList } from "/static/common.js";

const controls = {
  task: document.getElementById("task"),
  sortClass: document.getElementById("sort-class"),
  sortDir: document.getElementById("sort-dir"),
  minScore: document.getElementById("min-score"),
  status: document.getElementById("status-filter"),
  text: document.getElementById("filter"),
};

let cases = [];

/** Classes of a task, from the first scored case that has it (the model fixes them for all). */
function classesOf(task) {
  for (const c of cases) {
    const t = c.tasks && c.tasks[task];
    if (t && t.probabilities) return Object.keys(t.probabilities);
  }
  return [];
}

function fillSelect(select, values, wanted) {
  select.replaceChildren(...values.map((v) => el("option", { value: v, text: v })));
  if (values.includes(wanted)) select.value = wanted;
}

/** p(sort class) of the chosen task, or null when the case has no prediction for it. */
function scoreOf(c, task, cls) {
  const p = c.tasks && c.tasks[task] && c.tasks[task].probabilities ? c.tasks[task].probabilities[cls] : undefined;
  return Number.isFinite(p) ? p : null;
}

function matchesText(c, needle) {
  if (!needle) return true;
  const hay = [c.slide_id, c.status];
  for (const t of Object.values(c.tasks || {})) hay.push(t.label);
  if (c.error) hay.push(c.error.stage, c.error.type, c.error.message);
  return hay.some((s) => typeof s === "string" && s.toLowerCase().includes(needle));
}

function row(c, task, cls) {
  const link = el("a", { href: `/slide/${encodeURIComponent(c.slide_id)}`, class: "slide-link", text: c.slide_id });
  const views = el("td", { class: "views" }, el("a", { href: link.href, text: "slide" }));
  if (c.has_ultrasound) {
    views.append(
      " · ",
      el("a", {
        href: `/ultrasound/${encodeURIComponent(c.slide_id)}`,
        class: "us-link",
        "data-testid": "us-link",
        text: "ultrasound",
      }),
    );
  }
  const status = el("td", {}, el("span", { class: `status ${c.status}`, text: c.status === "error" ? "failed" : "scored" }));
  if (c.ood && c.ood.flagged) status.append(" ", oodBadge(c.ood));
  const attrs = { "data-testid": "case-row", dataset: { slideId: c.slide_id, status: c.status } };
  if (c.status === "error") {
    const e = c.error || {};
    const message = el(
      "td",
      { colspan: 3, class: "error-text", "data-testid": "case-error" },
      el("span", { class: "stage", text: e.stage || "unknown stage" }),
      " · ",
      el("span", { class: "type", text: e.type || "Error" }),
      ": ",
      el("span", { class: "message", text: e.message || "(no message)" }),
    );
    return el("tr", attrs, el("td", {}, link), status, message, el("td", { class: "overlays" }), views);
  }
  const t = (c.tasks || {})[task];
  const score = scoreOf(c, task, cls);
  return el(
    "tr",
    attrs,
    el("td", {}, link),
    status,
    el("td", { class: "label-pred", "data-testid": "predicted-label", text: t ? t.label : "–" }),
    el("td", {}, t ? topKList(t) : "–"),
    el("td", { class: "score", "data-testid": "score", dataset: { score: score === null ? "" : String(score) }, text: fmtProb(score) }),
    el("td", { class: "overlays", text: (c.overlays || []).join(", ") }),
    views,
  );
}

function render() {
  const task = controls.task.value;
  const cls = controls.sortClass.value;
  const dir = controls.sortDir.value === "asc" ? 1 : -1;
  const min = Number.parseFloat(controls.minScore.value) || 0;
  const status = controls.status.value;
  const needle = controls.text.value.trim().toLowerCase();
  document.getElementById("score-header").textContent = cls ? `p(${cls})` : "Score";

  const shown = cases.filter((c) => {
    if (status !== "all" && c.status !== status) return false;
    if (!matchesText(c, needle)) return false;
    // The score threshold is about predictions; failed slides stay listed (the status filter hides them).
    if (c.status === "done" && min > 0) {
      const s = scoreOf(c, task, cls);
      if (s === null || s < min) return false;
    }
    return true;
  });
  shown.sort((a, b) => {
    const sa = scoreOf(a, task, cls);
    const sb = scoreOf(b, task, cls);
    if (sa === null || sb === null) {
      if (sa !== sb) return sa === null ? 1 : -1; // unscored (failed) cases last
      return a.slide_id.localeCompare(b.slide_id);
    }
    return (sa - sb) * dir || a.slide_id.localeCompare(b.slide_id);
  });
  document.querySelector("#cases tbody").replaceChildren(...shown.map((c) => row(c, task, cls)));
  document.getElementById("count").textContent = `${shown.length} of ${cases.length} slides`;

  const params = new URLSearchParams({ task, sort: cls, dir: controls.sortDir.value });
  if (min > 0) params.set("min", String(min));
  if (status !== "all") params.set("status", status);
  if (needle) params.set("q", controls.text.value.trim());
  history.replaceState(null, "", `?${params}`);
}

async function main() {
  const data = await getJSON("/api/cases");
  cases = data.cases || [];
  const tasks = data.tasks && data.tasks.length ? data.tasks : [...new Set(cases.flatMap((c) => Object.keys(c.tasks || {})))];
  const params = new URLSearchParams(window.location.search);
  fillSelect(controls.task, tasks, params.get("task"));
  const setClasses = (wanted) => {
    const classes = classesOf(controls.task.value);
    // Default sort: the last class (for binary tasks the positive one, e.g. "malignant").
    fillSelect(controls.sortClass, classes, classes.includes(wanted) ? wanted : classes[classes.length - 1]);
  };
  setClasses(params.get("sort"));
  if (params.get("dir") === "asc") controls.sortDir.value = "asc";
  if (params.get("min")) controls.minScore.value = params.get("min");
  if (["done", "error"].includes(params.get("status"))) controls.status.value = params.get("status");
  if (params.get("q")) controls.text.value = params.get("q");

  const nDone = cases.filter((c) => c.status === "done").length;
  document.getElementById("summary").textContent =
    `${cases.length} slides: ${nDone} scored, ${cases.length - nDone} failed · tasks: ${tasks.join(", ") || "none"}`;

  controls.task.addEventListener("change", () => {
    setClasses(controls.sortClass.value);
    render();
  });
  for (const c of [controls.sortClass, controls.sortDir, controls.status]) c.addEventListener("change", render);
  for (const c of [controls.minScore, controls.text]) c.addEventListener("input", render);
  render();
  document.body.dataset.ready = "1";
}

main().catch(showError);
