// Slide view: the slide as a Deep Zoom image in OpenSeadragon, heatmaps as simple images placed at
// their level-0 rectangle, with overlay choice, opacity, colour bar, scale bar and mouse position.
import {
  el,
  fmtLengthUm,
  fmtNumber,
  getJSON,
  idFromPath,
  niceLength,
  oodBadge,
  overlayChoices,
  overlayPanel,
  showColorbar,
  showError,
  topKList,
} from "/static/common.js";

overlayPanel(); // before anything looks up the panel's elements

const SCALEBAR_TARGET_PX = 120; // the bar is the largest 1-2-5 length not wider than this
const CRISP_TARGET_PX = 2048; // heatmaps are upscaled (nearest) to about this many pixels a side

const slideId = idFromPath("/slide/");
const encodedId = encodeURIComponent(slideId);

// Exposed for the browser tests and for poking at from the console.
const state = {
  slideId,
  info: null,
  viewer: null,
  slide: null, // the slide's TiledImage (world item 0)
  items: new Map(), // overlay name -> TiledImage, once loaded
  loading: new Map(), // overlay name -> Promise<TiledImage>
  active: "none",
  opacity: 0.5,
  tileErrors: 0,
};
window.oncotrace = state;

/**
 * The heatmap PNG (one pixel per grid cell) upscaled by an integer factor with nearest-neighbour,
 * as a blob URL. OpenSeadragon interpolates images when it magnifies them, which would smear
 * each cell into its neighbours (and NaN cells into their borders); after this only the outer
 * 1/k of a cell is blended, so a cell reads as the block of tiles it was computed from.
 */
async function crispImageUrl(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  const blob = await response.blob();
  const bitmap = await createImageBitmap(blob);
  const k = Math.max(1, Math.min(32, Math.floor(CRISP_TARGET_PX / Math.max(bitmap.width, bitmap.height))));
  if (k === 1) return URL.createObjectURL(blob);
  const canvas = document.createElement("canvas");
  canvas.width = bitmap.width * k;
  canvas.height = bitmap.height * k;
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
  bitmap.close();
  const scaled = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
  return URL.createObjectURL(scaled);
}

/** Load an overlay once, as a single-image tiled image over its level-0 rectangle. */
function overlayItem(ov) {
  if (!state.loading.has(ov.name)) {
    const width = state.info.width; // viewport units: the slide is 1 wide
    const promise = crispImageUrl(ov.url).then((url) => new Promise((resolve, reject) => {
      state.viewer.addTiledImage({
        tileSource: { type: "image", url, buildPyramid: false },
        x: ov.x / width,
        y: ov.y / width,
        width: ov.width / width,
        opacity: 0,
        success: (event) => {
          state.items.set(ov.name, event.item);
          resolve(event.item);
        },
        error: (event) => reject(new Error(`overlay ${ov.name} (${ov.url}) failed to load: ${event.message || "error"}`)),
      });
    }));
    state.loading.set(ov.name, promise);
    promise.catch(() => state.loading.delete(ov.name)); // allow a retry on the next selection
  }
  return state.loading.get(ov.name);
}

async function selectOverlay(name) {
  state.active = name;
  document.body.dataset.activeOverlay = name;
  for (const item of state.items.values()) item.setOpacity(0);
  const ov = state.info.overlays.find((o) => o.name === name);
  showColorbar(ov || null);
  if (!ov) return;
  const item = await overlayItem(ov);
  if (state.active === name) item.setOpacity(state.opacity); // the user may have moved on meanwhile
}

function setOpacity(fraction) {
  state.opacity = fraction;
  document.getElementById("opacity-value").textContent = `${Math.round(fraction * 100)} %`;
  const item = state.items.get(state.active);
  if (item) item.setOpacity(fraction);
}

function updateScalebar() {
  const box = document.getElementById("scalebar");
  const mpp = state.info.mpp;
  if (!state.slide || !mpp || !Number.isFinite(mpp[0])) {
    box.hidden = true;
    return;
  }
  // Screen (CSS) pixels per level-0 pixel at the current, possibly animating, zoom.
  const screenPerPx = state.slide.viewportToImageZoom(state.viewer.viewport.getZoom(true));
  const umPerScreenPx = mpp[0] / screenPerPx;
  const lengthUm = niceLength(umPerScreenPx * SCALEBAR_TARGET_PX);
  const widthPx = lengthUm / umPerScreenPx;
  box.querySelector(".bar").style.width = `${widthPx}px`;
  box.querySelector(".label").textContent = fmtLengthUm(lengthUm);
  box.dataset.um = String(lengthUm);
  box.dataset.px = String(widthPx);
  box.hidden = false;
}

function showPosition(position) {
  const out = document.getElementById("position");
  const p = state.slide.viewerElementToImageCoordinates(position);
  const { width, height, mpp } = state.info;
  if (p.x < 0 || p.y < 0 || p.x >= width || p.y >= height) {
    out.textContent = "outside the slide";
    out.dataset.inside = "0";
    return;
  }
  out.dataset.inside = "1";
  out.dataset.xPx = String(p.x);
  out.dataset.yPx = String(p.y);
  const px = `x ${fmtNumber(Math.floor(p.x), 0)}, y ${fmtNumber(Math.floor(p.y), 0)} px (level 0)`;
  if (mpp && Number.isFinite(mpp[0])) {
    const xUm = p.x * mpp[0];
    const yUm = p.y * mpp[1];
    out.dataset.xUm = String(xUm);
    out.dataset.yUm = String(yUm);
    out.replaceChildren(px, el("br"), `x ${fmtNumber(xUm, 1)}, y ${fmtNumber(yUm, 1)} µm`);
  } else {
    out.replaceChildren(px, el("br"), "no µm: the slide has no pixel size");
  }
}

function renderPredictions(tasks) {
  const box = document.getElementById("predictions");
  const entries = Object.entries(tasks || {});
  if (!entries.length) {
    box.textContent = "no predictions for this slide";
    return;
  }
  box.replaceChildren(
    ...entries.map(([task, t]) =>
      el(
        "div",
        { class: "task", "data-testid": "prediction", dataset: { task } },
        el("div", {}, el("b", { text: `${task}: ` }), el("span", { class: "label-pred", "data-testid": "predicted-label", text: t.label })),
        topKList(t),
      ),
    ),
  );
}

function renderInfo(info) {
  const mpp = info.mpp && Number.isFinite(info.mpp[0]) ? `${fmtNumber(info.mpp[0], 4)} × ${fmtNumber(info.mpp[1], 4)} µm/px` : "unknown";
  const rows = [
    ["size", `${fmtNumber(info.width, 0)} × ${fmtNumber(info.height, 0)} px`],
    ["pixel size", mpp],
    ["pyramid levels", info.levels],
    ["overlays", info.overlays.map((o) => o.name).join(", ") || "none"],
  ];
  document.getElementById("slide-info").replaceChildren(
    ...rows.map(([k, v]) => el("tr", {}, el("th", { text: k }), el("td", { text: String(v ?? "–") }))),
  );
  const mm = info.mpp && Number.isFinite(info.mpp[0]) ? ` · ${fmtNumber((info.width * info.mpp[0]) / 1000, 2)} × ${fmtNumber((info.height * info.mpp[1]) / 1000, 2)} mm` : "";
  document.getElementById("slide-meta").textContent = `${fmtNumber(info.width, 0)} × ${fmtNumber(info.height, 0)} px${mm}`;
}

/**
 * OpenSeadragon's drawer: WebGL on a GPU, the 2D canvas when WebGL is software-rendered
 * (SwiftShader, llvmpipe: headless browsers, VMs, remote desktops), where it is several times
 * slower than canvas and the viewer would load about one tile per sluggish frame.
 * `?drawer=webgl|canvas` overrides.
 */
function pickDrawer() {
  const wanted = new URLSearchParams(window.location.search).get("drawer");
  if (wanted === "webgl" || wanted === "canvas") return wanted;
  try {
    const gl = document.createElement("canvas").getContext("webgl");
    if (!gl) return "canvas";
    const debug = gl.getExtension("WEBGL_debug_renderer_info");
    const renderer = debug ? String(gl.getParameter(debug.UNMASKED_RENDERER_WEBGL)) : "";
    const lose = gl.getExtension("WEBGL_lose_context");
    if (lose) lose.loseContext();
    return /swiftshader|llvmpipe|softpipe|software/i.test(renderer) ? "canvas" : "webgl";
  } catch {
    return "canvas";
  }
}

async function main() {
  document.getElementById("slide-title").textContent = slideId;
  document.title = `OncoTrace — ${slideId}`;
  if (!window.OpenSeadragon) {
    throw new Error(
      "OpenSeadragon did not load from /vendor/openseadragon/. Run `oncotrace viewer-setup` once, then restart `oncotrace view`.",
    );
  }
  const [info, list] = await Promise.all([
    getJSON(`/api/slides/${encodedId}`),
    getJSON("/api/cases").catch(() => null), // only for the ultrasound link; the view works without it
  ]);
  info.overlays = info.overlays || [];
  state.info = info;
  renderInfo(info);
  renderPredictions(info.tasks);
  if (info.ood && info.ood.flagged) {
    document.getElementById("predictions").prepend(
      el("p", { class: "ood-note" }, oodBadge(info.ood), " this slide lies outside the data the model was trained on (stain, scanner, tissue or resolution); do not trust its prediction."),
    );
  }
  const entry = list && (list.cases || []).find((c) => c.slide_id === slideId);
  if (entry && entry.has_ultrasound) {
    const link = document.getElementById("us-link");
    link.href = `/ultrasound/${encodedId}`;
    link.hidden = false;
  }

  const viewer = window.OpenSeadragon({
    element: document.getElementById("osd"),
    prefixUrl: "/vendor/openseadragon/images/",
    tileSources: info.dzi,
    showNavigator: true,
    navigatorPosition: "TOP_RIGHT",
    maxZoomPixelRatio: 4,
    visibilityRatio: 0.2,
    gestureSettingsMouse: { clickToZoom: false },
    drawer: pickDrawer(),
  });
  state.viewer = viewer;
  viewer.addHandler("tile-load-failed", (event) => {
    state.tileErrors += 1;
    document.body.dataset.tileErrors = String(state.tileErrors);
    console.warn("tile failed", event.tile && event.tile.getUrl && event.tile.getUrl(), event.message);
  });
  await new Promise((resolve, reject) => {
    viewer.addOnceHandler("open", resolve);
    viewer.addOnceHandler("open-failed", (event) => reject(new Error(`${info.dzi}: ${event.message}`)));
  });
  state.slide = viewer.world.getItemAt(0);
  for (const name of ["animation", "zoom", "resize", "open"]) viewer.addHandler(name, updateScalebar);
  updateScalebar();

  new window.OpenSeadragon.MouseTracker({
    element: viewer.canvas,
    moveHandler: (event) => showPosition(event.position),
  });

  const opacity = document.getElementById("opacity");
  opacity.addEventListener("input", () => setOpacity(Number(opacity.value) / 100));
  setOpacity(Number(opacity.value) / 100);

  const wanted = new URLSearchParams(window.location.search).get("overlay");
  const names = info.overlays.map((o) => o.name);
  const initial = names.includes(wanted) ? wanted : wanted === "none" ? "none" : (names[0] ?? "none");
  overlayChoices(document.getElementById("overlay-choices"), info.overlays, initial, (name) =>
    selectOverlay(name).catch(showError),
  );
  await selectOverlay(initial);
  document.body.dataset.ready = "1";
}

main().catch(showError);
