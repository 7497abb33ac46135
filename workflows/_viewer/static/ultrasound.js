// Ultrasound view: the frame, the heatmap mapped onto its pixel grid, the landmarks (fit vs
// hold-out) and the registration's TRE report.
import {
  el,
  fmtLengthUm,
  fmtNumber,
  getJSON,
  idFromPath,
  niceLength,
  overlayChoices,
  overlayPanel,
  showColorbar,
  showError,
} from "/static/common.js";

overlayPanel(); // before anything looks up the panel's elements

const SVG = "http://www.w3.org/2000/svg";
const SCALEBAR_TARGET_PX = 120; // as the slide view: the largest 1-2-5 length not wider than this
const slideId = idFromPath("/ultrasound/");
const encodedId = encodeURIComponent(slideId);

const state = { slideId, data: null, active: "none", opacity: 0.6 };
window.oncotrace = state;

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  return node;
}

function imageLoaded(img, url) {
  return new Promise((resolve, reject) => {
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error(`${url} failed to load`));
    img.src = url;
  });
}

async function selectOverlay(name) {
  state.active = name;
  document.body.dataset.activeOverlay = name;
  const img = document.getElementById("us-overlay");
  const ov = state.data.overlays.find((o) => o.name === name);
  showColorbar(ov || null);
  if (!ov) {
    img.hidden = true;
    img.removeAttribute("src");
    return;
  }
  img.style.opacity = String(state.opacity);
  await imageLoaded(img, ov.url);
  if (state.active === name) img.hidden = false;
}

function setOpacity(fraction) {
  state.opacity = fraction;
  document.getElementById("opacity-value").textContent = `${Math.round(fraction * 100)} %`;
  document.getElementById("us-overlay").style.opacity = String(fraction);
}

function drawLandmarks(landmarks, width, height) {
  const layer = document.getElementById("us-landmarks");
  layer.setAttribute("viewBox", `0 0 ${width} ${height}`);
  // Sizes in frame pixels chosen so markers and labels keep their size on screen.
  const perScreenPx = 1 / (state.scale || 1);
  const r = 6 * perScreenPx;
  layer.style.fontSize = `${12 * perScreenPx}px`;
  layer.style.setProperty("--label-stroke", `${3 * perScreenPx}px`);
  const counts = { fit: 0, holdout: 0 };
  layer.replaceChildren(
    ...landmarks.map((lm) => {
      const role = lm.role === "holdout" ? "holdout" : "fit";
      counts[role] += 1;
      // us_px puts the centre of the top-left pixel at (0, 0); in the SVG that pixel spans 0..1.
      const cx = lm.x + 0.5;
      const cy = lm.y + 0.5;
      const g = svg("g", { class: "landmark", "data-role": role, "data-id": lm.id, "data-testid": "landmark" });
      const title = svg("title", {});
      title.textContent = `${lm.id} (${role}) at x ${fmtNumber(lm.x, 1)}, y ${fmtNumber(lm.y, 1)} px`;
      const label = svg("text", { x: cx + r * 1.4, y: cy - r * 0.6 });
      label.textContent = lm.id;
      // hold-out rings drawn larger: an unfilled dashed ring reads smaller than a filled dot
      g.append(title, svg("circle", { cx, cy, r: role === "holdout" ? r * 1.4 : r }), label);
      return g;
    }),
  );
  document.getElementById("n-fit").textContent = String(counts.fit);
  document.getElementById("n-holdout").textContent = String(counts.holdout);
}

/** A TRE value that may be a number, {mean, max} or {model: number}. */
function treText(value, model) {
  if (value === null || value === undefined) return null;
  if (typeof value === "number") return `${fmtNumber(value, 3)} mm`;
  if (typeof value === "object") {
    if ("mean" in value) return `mean ${fmtNumber(value.mean, 3)} mm, max ${fmtNumber(value.max, 3)} mm`;
    if (model && typeof value[model] === "number") return `${fmtNumber(value[model], 3)} mm`;
  }
  return null;
}

function renderReport(report, spacing, width, height) {
  report = report || {};
  const chosen = report.chosen || {};
  const model = report.model || chosen.model || "–";
  const smoothing = chosen.smoothing ?? report.smoothing;
  const rows = [
    ["model", "model", model === "tps" && Number.isFinite(smoothing) ? `thin-plate spline (smoothing ${fmtNumber(smoothing, 3)})` : model],
    ["loo_tre_mm", "leave-one-out TRE", treText(chosen.loo_tre_mm ?? report.loo_tre_mm, model) ?? "–"],
    ["holdout_tre_mm", "hold-out TRE", treText(report.holdout_tre_mm, model) ?? "no hold-out landmarks"],
    ["rmse_fit_mm", "fit residual (RMSE)", treText(report.rmse_fit_mm) ?? "–"],
    ["landmarks", "landmarks", `${report.n_fit ?? "?"} fit, ${report.n_holdout ?? "?"} hold-out`],
    ["scale", "scale (ultrasound mm per slide mm)", report.scale_mm_per_mm === undefined ? "–" : fmtNumber(report.scale_mm_per_mm, 4)],
    ["rotation_deg", "rotation", report.rotation_deg === undefined ? "–" : `${fmtNumber(report.rotation_deg, 2)}°`],
    ["spacing_mm", "ultrasound pixel spacing", spacing ? `${fmtNumber(spacing[0], 4)} × ${fmtNumber(spacing[1], 4)} mm/px` : "–"],
    ["frame", "frame", spacing ? `${width} × ${height} px = ${fmtNumber(width * spacing[0], 1)} × ${fmtNumber(height * spacing[1], 1)} mm` : `${width} × ${height} px`],
  ];
  if (report.tre_over_bin && Number.isFinite(report.tre_over_bin.loo)) {
    rows.push(["tre_over_bin", "LOO TRE / heatmap bin", fmtNumber(report.tre_over_bin.loo, 2)]);
  }
  document.getElementById("tre-report").replaceChildren(
    ...rows.map(([key, k, v]) => el("tr", { dataset: { key } }, el("th", { text: k }), el("td", { text: String(v) }))),
  );
  document.getElementById("tre-warnings").replaceChildren(
    ...(report.warnings || []).map((w) => el("li", { class: "error-text", text: w })),
  );
}

/** Scale the stage (frame, overlay, landmarks together) to fill the free area, keeping the
 * aspect ratio: frames are often a few hundred pixels, too small to judge at 1:1. */
function fitStage() {
  const main = document.querySelector(".us-main");
  const { width, height } = state.data;
  const style = getComputedStyle(main);
  const free = [
    main.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight),
    main.clientHeight - parseFloat(style.paddingTop) - parseFloat(style.paddingBottom),
  ];
  const scale = Math.max(0.1, Math.min(free[0] / width, free[1] / height));
  const stageWidth = Math.floor(width * scale);
  document.getElementById("us-stage").style.width = `${stageWidth}px`;
  state.scale = stageWidth / width; // CSS px per frame px, as drawn
  updateScalebar();
}

/** The millimetre scale bar, from the frame's mm/px (x) and the stage's current size. */
function updateScalebar() {
  const box = document.getElementById("us-scalebar");
  const spacing = state.data.spacing_mm;
  if (!spacing || !(spacing[0] > 0) || !state.scale) {
    box.hidden = true;
    return;
  }
  const mmPerCssPx = spacing[0] / state.scale;
  const lengthMm = niceLength(mmPerCssPx * SCALEBAR_TARGET_PX);
  const widthPx = lengthMm / mmPerCssPx;
  box.querySelector(".bar").style.width = `${widthPx}px`;
  box.querySelector(".label").textContent = fmtLengthUm(lengthMm * 1000);
  box.dataset.mm = String(lengthMm);
  box.dataset.px = String(widthPx);
  box.hidden = false;
}

async function main() {
  document.getElementById("us-title").textContent = `Ultrasound — ${slideId}`;
  document.title = `OncoTrace — ultrasound ${slideId}`;
  document.getElementById("slide-link").href = `/slide/${encodedId}`;
  const data = await getJSON(`/api/ultrasound/${encodedId}`);
  data.overlays = data.overlays || [];
  state.data = data;
  const spacing = data.spacing_mm;
  document.getElementById("us-meta").textContent = `${data.width} × ${data.height} px` + (spacing ? ` · ${fmtNumber(spacing[0], 4)} mm/px` : "");
  fitStage();
  drawLandmarks(data.landmarks || [], data.width, data.height);
  window.addEventListener("resize", () => {
    fitStage();
    drawLandmarks(data.landmarks || [], data.width, data.height);
  });
  renderReport(data.report, spacing, data.width, data.height);
  const frameLoaded = imageLoaded(document.getElementById("us-frame"), data.frame);

  const opacity = document.getElementById("opacity");
  opacity.addEventListener("input", () => setOpacity(Number(opacity.value) / 100));
  setOpacity(Number(opacity.value) / 100);
  document.getElementById("show-landmarks").addEventListener("change", (event) => {
    document.getElementById("us-landmarks").style.display = event.target.checked ? "" : "none";
  });
  const initial = data.overlays.length ? data.overlays[0].name : "none";
  overlayChoices(document.getElementById("overlay-choices"), data.overlays, initial, (name) =>
    selectOverlay(name).catch(showError),
  );
  await Promise.all([frameLoaded, selectOverlay(initial)]);
  document.body.dataset.ready = "1";
}

main().catch(showError);
