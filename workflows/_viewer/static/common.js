// Helpers shared by the three pages: fetching the server's JSON, building DOM, formatting.

/** GET a JSON document; a non-2xx answer becomes an Error naming the URL and the server's text. */
export async function getJSON(url) {
  const response = await fetch(url, { headers: { Accept: "application/json" } });
  if (!response.ok) {
    let detail = await response.text();
    try {
      const body = JSON.parse(detail);
      detail = body.detail || body.error || detail;
    } catch {
      // not JSON: show the text as it came
    }
    throw new Error(`${url}: HTTP ${response.status}${detail ? ` — ${detail}` : ""}`);
  }
  return response.json();
}

/** Create an element: el("td", {class: "x", dataset: {id: "1"}}, "text", childNode). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "dataset") Object.assign(node.dataset, value);
    else if (key === "text") node.textContent = value;
    else if (key in node && typeof value !== "string") node[key] = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** The slide id in a page path such as /slide/<id> (ids may hold URL-escaped characters). */
export function idFromPath(prefix) {
  const path = window.location.pathname;
  if (!path.startsWith(prefix)) throw new Error(`unexpected page path ${path}`);
  return decodeURIComponent(path.slice(prefix.length).replace(/\/+$/, ""));
}

/** Show a plain error box at the top of the page (and keep it for tests: #error). */
export function showError(error) {
  const box = document.getElementById("error");
  box.textContent = error instanceof Error ? error.message : String(error);
  box.hidden = false;
  document.body.dataset.error = "1";
  console.error(error);
}

export function fmtProb(p) {
  return Number.isFinite(p) ? p.toFixed(3) : "–";
}

export function fmtNumber(value, digits = 2) {
  if (value === null || value === undefined) return "–";
  if (typeof value !== "number") return String(value);
  if (!Number.isFinite(value)) return String(value);
  return value.toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: 0 });
}

/**
 * A number rounded to `digits` significant digits, with thousands separators and no trailing
 * zeros: 6533.3335 -> "6,530", 0.012345 -> "0.0123", 1 -> "1". For values read off a colour
 * bar, where more digits than the colours can show only look precise.
 */
export function fmtSignificant(value, digits = 3) {
  if (value === null || value === undefined) return "–";
  if (typeof value !== "number") return String(value);
  if (!Number.isFinite(value)) return String(value);
  return value.toLocaleString("en-US", { maximumSignificantDigits: digits });
}

/** Largest 1, 2 or 5 × 10^k not above `value` (> 0): the length a scale bar shows. */
export function niceLength(value) {
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [5, 2, 1]) if (step * power <= value) return step * power;
  return power;
}

/** A length in micrometres as "250 µm" or "2 mm". */
export function fmtLengthUm(um) {
  if (um >= 1000) return `${fmtNumber(um / 1000, 3)} mm`;
  return `${fmtNumber(um, 3)} µm`;
}

/** top_k as [[class, p], ...]; falls back to the probabilities sorted high to low. */
export function topK(task) {
  if (Array.isArray(task.top_k) && task.top_k.length) {
    return task.top_k.map((entry) => (Array.isArray(entry) ? entry : [entry.label ?? entry.class, entry.p ?? entry.probability]));
  }
  return Object.entries(task.probabilities || {}).sort((a, b) => b[1] - a[1]);
}

/** A small list of class / probability bars. */
export function topKList(task) {
  return el(
    "div",
    { class: "topk" },
    topK(task).map(([cls, p]) =>
      el(
        "div",
        { class: "topk-item", dataset: { class: cls, p: String(p) }, "data-testid": "topk-item" },
        el("span", { class: "cls", text: cls }),
        el("span", { class: "bar" }, el("span", { style: `width: ${Math.max(0, Math.min(1, p)) * 100}%` })),
        el("span", { class: "p", text: fmtProb(p) }),
      ),
    ),
  );
}

/**
 * Build the overlay panel both viewer pages share inside section#overlay-panel: a heading
 * (data-title), the overlay choices, the opacity slider (data-opacity, in %) and the colour-bar
 * figure that showColorbar() fills. Call it before looking up any of those elements.
 */
export function overlayPanel() {
  const section = document.getElementById("overlay-panel");
  const opacity = section.dataset.opacity || "50";
  const tid = (id) => ({ id, "data-testid": id });
  section.replaceChildren(
    el("h2", { text: section.dataset.title || "Overlay" }),
    el("div", { ...tid("overlay-choices"), class: "choices", role: "radiogroup" }),
    el(
      "label",
      { class: "opacity" },
      "Opacity",
      el("input", { ...tid("opacity"), type: "range", min: "0", max: "100", step: "1", value: opacity }),
      el("output", { id: "opacity-value", for: "opacity" }, `${opacity} %`),
    ),
    el(
      "figure",
      { ...tid("colorbar-box"), class: "colorbar", hidden: true },
      el("figcaption", tid("colorbar-label")),
      el(
        "div",
        { class: "cb-body" },
        el("img", { ...tid("colorbar"), alt: "colour bar" }),
        el("div", { class: "range" }, el("span", tid("colorbar-max")), el("span", tid("colorbar-min"))),
      ),
    ),
  );
}

/**
 * Overlay radio buttons plus "none"; calls onChange(name) when the user picks one.
 * Each input has data-testid="overlay-<name>".
 */
export function overlayChoices(container, overlays, initial, onChange) {
  container.replaceChildren();
  const options = [{ name: "none", label: "none" }, ...overlays];
  for (const ov of options) {
    const input = el("input", {
      type: "radio",
      name: "overlay",
      value: ov.name,
      id: `overlay-${ov.name}`,
      "data-testid": `overlay-${ov.name}`,
    });
    input.checked = ov.name === initial;
    input.addEventListener("change", () => input.checked && onChange(ov.name));
    container.append(el("label", { for: input.id }, input, ov.label || ov.name));
  }
}

/**
 * Fill the colour-bar figure (img#colorbar, #colorbar-label, #colorbar-min, #colorbar-max) for
 * an overlay, or hide it (null). The bar image may be horizontal (low end left) or vertical
 * (high end at the top); the figure's data-orientation lays the labels out to match.
 */
export function showColorbar(ov) {
  const figure = document.getElementById("colorbar-box");
  if (!ov) {
    figure.hidden = true;
    figure.dataset.overlay = "none";
    return;
  }
  figure.hidden = false;
  figure.dataset.overlay = ov.name;
  const img = document.getElementById("colorbar");
  if (ov.colorbar) {
    img.onload = () => {
      figure.dataset.orientation = img.naturalHeight > img.naturalWidth ? "vertical" : "horizontal";
    };
    img.src = ov.colorbar;
    img.hidden = false;
  } else {
    img.removeAttribute("src");
    img.hidden = true;
  }
  img.alt = `colour bar of ${ov.label || ov.name}`;
  const unit = ov.unit ? ` (${ov.unit})` : "";
  document.getElementById("colorbar-label").textContent = `${ov.label || ov.name}${unit}`;
  document.getElementById("colorbar-min").textContent = fmtSignificant(ov.vmin, 3);
  document.getElementById("colorbar-max").textContent = fmtSignificant(ov.vmax, 3);
}

// A slide outside the model's training data: a badge with the distance and the threshold.
export function oodBadge(ood) {
  return el("span", {
    class: "ood",
    "data-testid": "ood-badge",
    title: `out of domain: distance ${fmtNumber(ood.distance, 1)} to the training slides, above the threshold ${fmtNumber(ood.threshold, 1)}; the prediction is not reliable`,
    text: "out of domain",
  });
}
