// Attention Control: front-end widgets (vanilla JS, no dependencies).
//
// 1. A box editor on AttnCtl_Boxes: a canvas of the node's width x height image where boxes are drawn
//    with the mouse (drag on an empty area = new box, drag inside a box = move it, drag a corner handle
//    of the selected box = resize, Delete key or the "delete" button = remove the selected box). Each box
//    carries a phrase (edit it in the text field under the canvas; double-click a box to focus it).
//    Every change rewrites the node's `boxes` STRING widget with one 'phrase: x0,y0,x1,y1' line per box
//    (fractions rounded to 3 decimals, or whole pixels when units = pixels), so the boxes are saved in the
//    workflow JSON and sent to the server as usual, and each change is one undo step of the front end's
//    change tracker; the editor re-reads that widget (lines or JSON) whenever the text changes or a
//    workflow is loaded. Phrases the linked node's prompt lacks are marked before queueing; arrows nudge
//    by latent cells, Ctrl+D duplicates, [ ] change the z-order, boxes snap to latent cells.
// 2. An attention-map viewer on AttnCtl_AttentionHeatmap: after a run, the node's own heat-map previews
//    (no Save or Preview node needed; UNet and DiT maps alike) are shown as a grid labelled with the
//    captured words, with a step slider labelled by sampler step when per_step is on; click a map to
//    enlarge it, hover to rank the words at that pixel (from the node's 0-255 map data).
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const EXT = "attention_control.widgets";
const BOXES_NODE = "AttnCtl_Boxes";
const HEATMAP_NODE = "AttnCtl_AttentionHeatmap";
const CAPTURE_NODE = "AttnCtl_CaptureAttention";
const COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
                "#fabed4", "#469990", "#dcbeff", "#9a6324"];
const HANDLE_PX = 7;        // corner handle half-size, CSS pixels
const MIN_SIDE = 0.01;      // a drawn box smaller than this (fraction of a side) is dropped
const EDITOR_MIN_HEIGHT = 256;

const clamp01 = (v) => Math.min(1, Math.max(0, v));
const round3 = (v) => Math.round(v * 1000) / 1000;

function widgetByName(node, name) {
  return (node.widgets || []).find((w) => w.name === name);
}

/** Records one undo step in the front end's change tracker (the editor's pointer and key events do not
 *  reach the graph canvas, whose handlers would otherwise check the state). */
function undoStep() {
  try {
    const wf = app.extensionManager?.workflow?.activeWorkflow;
    (wf?.changeTracker ?? app.workflowManager?.activeWorkflow?.changeTracker)?.checkState?.();
  } catch (_) { /* an older front end without a change tracker */ }
}

// ------------------------------------------------------------------------------------ box text model
/** Parses the `boxes` text (lines 'phrase: x0,y0,x1,y1' or JSON) into [{phrase, box}] in fractions.
 *  Throws an Error with a short message when the text does not parse. */
export function parseBoxesText(text, units, width, height) {
  const sx = units === "pixels" ? 1 / Math.max(1, width) : 1;
  const sy = units === "pixels" ? 1 / Math.max(1, height) : 1;
  const toFrac = (b) => [b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy].map(Number);
  const out = [];
  const src = String(text ?? "").trim();
  if (src.startsWith("[")) {
    const items = JSON.parse(src);
    if (!Array.isArray(items)) throw new Error("the JSON form must be a list");
    items.forEach((it, n) => {
      if (!it || !Array.isArray(it.box) || it.box.length !== 4) throw new Error(`JSON item ${n + 1} needs "box": [x0,y0,x1,y1]`);
      const box = toFrac(it.box);
      if (box.some((v) => !Number.isFinite(v))) throw new Error(`JSON item ${n + 1}: coordinates must be numbers`);
      out.push({ phrase: String(it.phrase ?? "").trim(), box });
    });
  } else {
    src.split(/\r?\n/).forEach((raw, n) => {
      const line = raw.trim();
      if (!line || line.startsWith("#")) return;
      const at = line.lastIndexOf(":");
      if (at < 0) throw new Error(`line ${n + 1} needs 'phrase: x0,y0,x1,y1'`);
      const vals = line.slice(at + 1).replace(/ /g, ",").split(",").filter((v) => v.trim()).map(Number);
      if (vals.length !== 4 || vals.some((v) => !Number.isFinite(v))) throw new Error(`line ${n + 1} needs four numbers`);
      out.push({ phrase: line.slice(0, at).trim(), box: toFrac(vals) });
    });
  }
  return out;
}

/** The line form of the boxes, one 'phrase: x0,y0,x1,y1' per box, in the node's units (fractions to 3
 *  decimals, or whole pixels): readable, diffable, and what the server parses. */
export function formatBoxes(boxes, units, width, height) {
  const px = units === "pixels";
  return boxes.map((b) => {
    const v = px ? [b.box[0] * width, b.box[1] * height, b.box[2] * width, b.box[3] * height].map(Math.round)
                 : b.box.map(round3);
    const phrase = String(b.phrase || "").replace(/[\r\n:]+/g, " ").trim() || "object";
    return `${phrase}: ${v.join(",")}`;
  }).join("\n");
}

/** The prompt texts of the nodes the Boxes output feeds (a `prompt` / `base_prompt` widget), with titles. */
function linkedPrompts(node) {
  const out = [];
  const graph = node.graph;
  for (const o of node.outputs || []) {
    for (const id of o.links || []) {
      const link = graph?.getLink?.(id) ?? graph?.links?.[id];
      const t = link ? graph.getNodeById?.(link.target_id) : null;
      const w = t && (widgetByName(t, "prompt") || widgetByName(t, "base_prompt"));
      if (w && typeof w.value === "string") out.push({ title: t.title || t.type, text: w.value });
    }
  }
  return out;
}

/** Whether `phrase` occurs in `text` as whole words (case-insensitive), as the server's word lookup wants. */
export function phraseInText(phrase, text) {
  const words = (s) => String(s || "").toLowerCase().split(/[^\p{L}\p{N}]+/u).filter(Boolean);
  const p = words(phrase), t = words(text);
  if (!p.length) return false;
  for (let i = 0; i + p.length <= t.length; i++) if (p.every((w, j) => t[i + j] === w)) return true;
  return false;
}

/** The phrases of the linked prompts a box can take: its words and the runs of two and three words. */
function promptPhrases(prompts) {
  const seen = new Set();
  for (const { text } of prompts) {
    const w = String(text).toLowerCase().split(/[^\p{L}\p{N}]+/u).filter(Boolean);
    for (let n = 1; n <= 3; n++) for (let i = 0; i + n <= w.length; i++) seen.add(w.slice(i, i + n).join(" "));
  }
  return [...seen];
}

const LATENT_CELL = 8;     // image pixels per latent cell: the snap grid
let lastSampled = null;    // the last image a Save / Preview node of the workflow received (the editors' background)
const LATENT_NODES = ["EmptyLatentImage", "EmptySD3LatentImage", "EmptyHunyuanLatentVideo", "EmptyFlux2LatentImage",
                      "EmptyHunyuanImageLatent", "EmptyChromaRadianceLatentImage", "EmptyQwenImageLayeredLatentImage"];

/** The width / height of the workflow's empty latent node (the image size the boxes are drawn for), or null. */
function latentSize(graph) {
  for (const n of graph?.nodes || []) {
    if (!LATENT_NODES.includes(n.type)) continue;
    const w = Number(widgetByName(n, "width")?.value), h = Number(widgetByName(n, "height")?.value);
    if (w > 0 && h > 0) return [w, h];
  }
  return null;
}

// ------------------------------------------------------------------------------------ box editor
/** A one-line text input of the editor's bar. */
function textField(className, placeholder) {
  const el = document.createElement("input");
  el.type = "text";
  el.className = className;
  el.placeholder = placeholder;
  Object.assign(el.style, { flex: "1 1 auto", minWidth: "40px", background: "#222", color: "#ddd",
                            border: "1px solid #555", borderRadius: "3px", padding: "1px 4px" });
  return el;
}

class BoxEditor {
  constructor(node) {
    this.node = node;
    this.boxes = [];          // [{phrase, box: [x0, y0, x1, y1]}] in fractions
    this.selected = -1;
    this.drag = null;         // {mode: 'new'|'move'|'resize', index, start, orig, corner}
    this.error = "";
    this.lastText = null;     // the widget text the editor last read or wrote

    const root = document.createElement("div");
    root.className = "attnctl-box-editor";
    root.tabIndex = 0;
    Object.assign(root.style, {
      display: "flex", flexDirection: "column", gap: "4px", width: "100%", height: "100%",
      boxSizing: "border-box", outline: "none", fontFamily: "sans-serif", fontSize: "12px",
    });
    const area = document.createElement("div");
    Object.assign(area.style, { flex: "1 1 auto", minHeight: "80px", position: "relative", overflow: "hidden" });
    const canvas = document.createElement("canvas");
    canvas.className = "attnctl-box-canvas";
    Object.assign(canvas.style, { position: "absolute", cursor: "crosshair", touchAction: "none",
                                  border: "1px solid #666", boxSizing: "border-box" });
    area.appendChild(canvas);

    const bar = document.createElement("div");
    Object.assign(bar.style, { display: "flex", gap: "4px", alignItems: "center", flex: "0 0 auto" });
    const phrase = textField("attnctl-box-phrase", "select a box, type its phrase");
    const del = document.createElement("button");
    del.className = "attnctl-box-delete";
    del.textContent = "delete";
    del.title = "Delete the selected box (or press Delete)";
    Object.assign(del.style, { flex: "0 0 auto", background: "#333", color: "#ddd", border: "1px solid #555",
                               borderRadius: "3px", padding: "1px 6px", cursor: "pointer" });
    const info = document.createElement("span");
    info.className = "attnctl-box-info";
    Object.assign(info.style, { flex: "0 0 auto", color: "#999", whiteSpace: "nowrap" });
    bar.append(phrase, del, info);
    // the prompt's words and phrases as suggestions of the phrase field
    const list = document.createElement("datalist");
    list.id = `attnctl-phrases-${Math.random().toString(36).slice(2)}`;
    phrase.setAttribute("list", list.id);
    const bar2 = document.createElement("div");
    Object.assign(bar2.style, { display: "flex", gap: "4px", alignItems: "center", flex: "0 0 auto" });
    const coords = textField("attnctl-box-coords", "x0,y0,x1,y1");
    coords.title = "The selected box's corners in the node's units; Enter applies";
    const snapLabel = document.createElement("label");
    Object.assign(snapLabel.style, { flex: "0 0 auto", color: "#999", whiteSpace: "nowrap" });
    const snapBox = document.createElement("input");
    snapBox.type = "checkbox";
    snapBox.className = "attnctl-box-snap";
    snapBox.checked = true;
    snapLabel.title = "Snap drawn and moved boxes to latent cells (8 image pixels)";
    snapLabel.append(snapBox, " snap");
    const help = document.createElement("span");
    Object.assign(help.style, { flex: "0 0 auto", color: "#777", whiteSpace: "nowrap", cursor: "help" });
    help.textContent = "?";
    help.title = "drag: draw / move; corner: resize; arrows: nudge one latent cell (shift: 8); Ctrl+D: duplicate; "
      + "[ ]: send back / bring forward; Delete: remove the box; Ctrl+Z / Ctrl+Y: undo / redo each edit";
    bar2.append(coords, snapLabel, help);
    root.append(area, bar, bar2, list);

    Object.assign(this, { root, area, canvas, phrase, del, info, coords, snapBox, list });
    this.bind();
    if (typeof ResizeObserver !== "undefined") {
      this.observer = new ResizeObserver(() => this.draw());
      this.observer.observe(area);
    }
  }

  // ---- node widgets
  get units() { return widgetByName(this.node, "units")?.value ?? "fraction"; }
  get imgW() { return Number(widgetByName(this.node, "width")?.value) || 512; }
  get imgH() { return Number(widgetByName(this.node, "height")?.value) || 512; }
  get textWidget() { return widgetByName(this.node, "boxes"); }

  /** Re-reads the boxes from the `boxes` widget (lines or JSON). Keeps the current boxes if it does not parse. */
  load(force = false) {
    const w = this.textWidget;
    if (!w) return;
    const text = String(w.value ?? "");
    if (!force && text === this.lastText) return;
    this.lastText = text;
    try {
      this.boxes = parseBoxesText(text, this.units, this.imgW, this.imgH);
      this.error = "";
    } catch (e) {
      this.error = `boxes text does not parse: ${e.message}`;
    }
    if (this.selected >= this.boxes.length) this.selected = -1;
    this.syncBar();
    this.draw();
  }

  /** Writes the boxes into the `boxes` widget as lines (called on every change); `undo`: record the change
   *  as one undo step (typing a phrase records one step when the field is left, not one per key). */
  commit(undo = true) {
    const w = this.textWidget;
    if (!w) return;
    const text = formatBoxes(this.boxes, this.units, this.imgW, this.imgH);
    this.lastText = text;
    this.error = "";
    if (w.value !== text) {
      w.value = text;
      w.callback?.(text);
      this.node.setDirtyCanvas?.(true, true);
      this.node.graph?.change?.();
      if (undo) undoStep();
    }
    this.syncBar();
    this.draw();
  }

  /** The image under the boxes: the connected IMAGE's source (LoadImage's file or its node's last preview),
   *  else the workflow's last sampled image; null until one has loaded. Without a connected image the
   *  width / height widgets follow the workflow's empty latent node. */
  background() {
    const slot = (this.node.inputs || []).findIndex((i) => i.name === "image");
    const src = slot >= 0 && this.node.inputs[slot].link != null ? this.node.getInputNode?.(slot) : null;
    let info = null;
    if (src) {
      const shown = app.nodeOutputs?.[String(src.id)]?.images;
      const file = widgetByName(src, "image")?.value;
      if (shown?.length) info = shown[0];
      else if (src.type === "LoadImage" && typeof file === "string" && file) {
        const at = file.lastIndexOf("/");
        info = { filename: file.slice(at + 1), subfolder: at >= 0 ? file.slice(0, at) : "", type: "input" };
      }
    } else {
      this.followLatent();
      info = lastSampled;
    }
    const url = info ? imageUrl(info) : null;
    if (url !== this.bgUrl) {
      this.bgUrl = url;
      this.bgImg = null;
      if (url) {
        const im = new Image();
        im.onload = () => { if (this.bgUrl === url) { this.bgImg = im; this.followImage(im); this.draw(); } };
        im.src = url;
      }
    }
    return this.bgImg;
  }

  setSize(w, h) {
    let changed = false;
    for (const [name, v] of [["width", w], ["height", h]]) {
      const wd = widgetByName(this.node, name);
      if (wd && Number(wd.value) !== v) { wd.value = v; changed = true; }
    }
    if (changed) {
      this.load(true);
      this.node.setDirtyCanvas?.(true, true);
    }
  }

  followLatent() {
    const size = latentSize(this.node.graph);
    if (size) this.setSize(size[0], size[1]);
  }

  followImage(im) {
    const slot = (this.node.inputs || []).findIndex((i) => i.name === "image");
    if (slot >= 0 && this.node.inputs[slot].link != null && im.naturalWidth > 0) this.setSize(im.naturalWidth, im.naturalHeight);
  }

  /** A fraction snapped to the latent grid on one axis (when snapping is on). */
  snap(v, axis) {
    if (!this.snapBox?.checked) return v;
    const cells = (axis === 0 ? this.imgW : this.imgH) / LATENT_CELL;
    return clamp01(Math.round(v * cells) / cells);
  }

  /** Phrases of the boxes that the linked prompts do not hold (each box index -> the prompt titles). */
  missingPhrases() {
    const prompts = linkedPrompts(this.node);
    const miss = new Map();
    if (!prompts.length) return miss;
    this.boxes.forEach((b, i) => {
      const lacking = prompts.filter((p) => !phraseInText(b.phrase, p.text)).map((p) => p.title);
      if (lacking.length) miss.set(i, lacking);
    });
    return miss;
  }

  // ---- geometry
  /** The image rectangle inside the canvas area, CSS pixels: the width x height aspect, fitted and centred. */
  layout() {
    const aw = this.area.clientWidth, ah = this.area.clientHeight;
    const ar = this.imgW / this.imgH;
    let w = aw, h = aw / ar;
    if (h > ah) { h = ah; w = ah * ar; }
    return { x: (aw - w) / 2, y: (ah - h) / 2, w: Math.max(1, w), h: Math.max(1, h) };
  }

  /** An event's position as fractions of the image (the widget may be scaled by the canvas zoom). */
  point(ev) {
    const r = this.canvas.getBoundingClientRect();
    return [clamp01((ev.clientX - r.left) / Math.max(1, r.width)), clamp01((ev.clientY - r.top) / Math.max(1, r.height))];
  }

  /** Handle tolerance in fractions (x, y), from the canvas's on-screen size. */
  tolerance() {
    const r = this.canvas.getBoundingClientRect();
    const z = r.width / Math.max(1, this.canvas.clientWidth || r.width);
    return [HANDLE_PX * z / Math.max(1, r.width), HANDLE_PX * z / Math.max(1, r.height)];
  }

  hitCorner(p) {
    if (this.selected < 0) return -1;
    const b = this.boxes[this.selected].box;
    const [tx, ty] = this.tolerance();
    const corners = [[b[0], b[1]], [b[2], b[1]], [b[2], b[3]], [b[0], b[3]]];
    return corners.findIndex(([x, y]) => Math.abs(p[0] - x) <= tx * 1.5 && Math.abs(p[1] - y) <= ty * 1.5);
  }

  hitBox(p) {
    for (let i = this.boxes.length - 1; i >= 0; i--) {
      const b = this.boxes[i].box;
      if (p[0] >= b[0] && p[0] <= b[2] && p[1] >= b[1] && p[1] <= b[3]) return i;
    }
    return -1;
  }

  // ---- events
  bind() {
    const c = this.canvas;
    c.addEventListener("pointerdown", (ev) => this.onDown(ev));
    c.addEventListener("pointermove", (ev) => this.onMove(ev));
    c.addEventListener("pointerup", (ev) => this.onUp(ev));
    c.addEventListener("pointercancel", (ev) => this.onUp(ev));
    c.addEventListener("dblclick", (ev) => {
      ev.stopPropagation();
      const i = this.hitBox(this.point(ev));
      if (i >= 0) {
        this.select(i);
        this.phrase.focus();
        this.phrase.select();
      }
    });
    // keep the graph canvas from treating these events as its own (panning, deleting the node, ...)
    for (const type of ["mousedown", "mouseup", "click", "contextmenu"]) c.addEventListener(type, (ev) => ev.stopPropagation());
    this.root.addEventListener("keydown", (ev) => {
      if (ev.target === this.phrase) {
        if (ev.key === "Enter" || ev.key === "Escape") this.root.focus();
        ev.stopPropagation();
        return;
      }
      if (ev.key === "Delete" || ev.key === "Backspace") {
        // never the node: the graph's Delete handler would remove it
        ev.preventDefault();
        ev.stopPropagation();
        if (this.selected >= 0) this.remove(this.selected);
        return;
      }
      const sel = this.boxes[this.selected];
      if (!sel) return;
      const arrows = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };
      if (arrows[ev.key]) {
        // one latent cell per press (shift: eight), the box kept inside the image
        ev.preventDefault();
        ev.stopPropagation();
        const k = ev.shiftKey ? 8 : 1;
        const dx = arrows[ev.key][0] * k * LATENT_CELL / this.imgW, dy = arrows[ev.key][1] * k * LATENT_CELL / this.imgH;
        const b = sel.box, w = b[2] - b[0], h = b[3] - b[1];
        const x0 = Math.min(1 - w, Math.max(0, b[0] + dx)), y0 = Math.min(1 - h, Math.max(0, b[1] + dy));
        b.splice(0, 4, x0, y0, x0 + w, y0 + h);
        this.commit();
      } else if ((ev.ctrlKey || ev.metaKey) && ev.key.toLowerCase() === "d") {
        ev.preventDefault();
        ev.stopPropagation();
        this.duplicate(this.selected);
      } else if (ev.key === "]" || ev.key === "[") {
        ev.preventDefault();
        ev.stopPropagation();
        this.reorder(this.selected, ev.key === "]" ? 1 : -1);
      }
    });
    this.coords.addEventListener("keydown", (ev) => {
      ev.stopPropagation();
      if (ev.key === "Enter") this.applyCoords();
      if (ev.key === "Escape") { this.syncBar(); this.root.focus(); }
    });
    this.coords.addEventListener("change", () => this.applyCoords());
    for (const type of ["pointerdown", "mousedown", "keyup", "keypress"]) {
      this.coords.addEventListener(type, (ev) => ev.stopPropagation());
    }
    this.snapBox.addEventListener("pointerdown", (ev) => ev.stopPropagation());
    this.phrase.addEventListener("input", () => {
      if (this.selected < 0) return;
      this.boxes[this.selected].phrase = this.phrase.value;
      this.commit(false);
    });
    this.phrase.addEventListener("change", () => undoStep());
    for (const type of ["pointerdown", "mousedown", "keyup", "keypress"]) {
      this.phrase.addEventListener(type, (ev) => ev.stopPropagation());
    }
    this.del.addEventListener("pointerdown", (ev) => ev.stopPropagation());
    this.del.addEventListener("click", (ev) => {
      ev.stopPropagation();
      if (this.selected >= 0) this.remove(this.selected);
    });
  }

  onDown(ev) {
    if (ev.button !== 0) return;
    ev.preventDefault();
    ev.stopPropagation();
    this.root.focus({ preventScroll: true });
    const p = this.point(ev);
    const corner = this.hitCorner(p);
    if (corner >= 0) {
      this.drag = { mode: "resize", index: this.selected, corner, orig: [...this.boxes[this.selected].box] };
    } else {
      const i = this.hitBox(p);
      if (i >= 0) {
        this.select(i);
        this.drag = { mode: "move", index: i, start: p, orig: [...this.boxes[i].box] };
      } else {
        p[0] = this.snap(p[0], 0);
        p[1] = this.snap(p[1], 1);
        this.boxes.push({ phrase: this.defaultPhrase(), box: [p[0], p[1], p[0], p[1]] });
        this.select(this.boxes.length - 1);
        this.drag = { mode: "new", index: this.selected, start: p, orig: [p[0], p[1], p[0], p[1]] };
      }
    }
    this.drag.moved = false;
    try { this.canvas.setPointerCapture(ev.pointerId); } catch (_) { /* synthetic events */ }
    this.draw();
  }

  onMove(ev) {
    if (!this.drag) {
      const p = this.point(ev);
      this.canvas.style.cursor = this.hitCorner(p) >= 0 ? "nwse-resize" : this.hitBox(p) >= 0 ? "move" : "crosshair";
      return;
    }
    ev.preventDefault();
    ev.stopPropagation();
    const raw = this.point(ev);
    const d = this.drag;
    const p = d.mode === "move" ? raw : [this.snap(raw[0], 0), this.snap(raw[1], 1)];
    const b = this.boxes[d.index].box;
    d.moved = true;
    if (d.mode === "new") {
      b.splice(0, 4, Math.min(d.start[0], p[0]), Math.min(d.start[1], p[1]), Math.max(d.start[0], p[0]),
               Math.max(d.start[1], p[1]));
    } else if (d.mode === "move") {
      const w = d.orig[2] - d.orig[0], h = d.orig[3] - d.orig[1];
      const x0 = Math.min(1 - w, Math.max(0, this.snap(d.orig[0] + p[0] - d.start[0], 0)));
      const y0 = Math.min(1 - h, Math.max(0, this.snap(d.orig[1] + p[1] - d.start[1], 1)));
      b.splice(0, 4, x0, y0, x0 + w, y0 + h);
    } else {
      // the dragged corner follows the pointer, the opposite corner stays
      const fx = [d.orig[2], d.orig[0], d.orig[0], d.orig[2]][d.corner];
      const fy = [d.orig[3], d.orig[3], d.orig[1], d.orig[1]][d.corner];
      b.splice(0, 4, Math.min(fx, p[0]), Math.min(fy, p[1]), Math.max(fx, p[0]), Math.max(fy, p[1]));
    }
    this.draw();
  }

  onUp(ev) {
    if (!this.drag) return;
    ev.stopPropagation();
    try { this.canvas.releasePointerCapture(ev.pointerId); } catch (_) { /* not captured */ }
    const d = this.drag;
    this.drag = null;
    const b = this.boxes[d.index].box;
    if ((b[2] - b[0] < MIN_SIDE || b[3] - b[1] < MIN_SIDE) && d.mode !== "move") {
      if (d.mode === "new") {
        this.boxes.splice(d.index, 1);     // a click on an empty area: deselect
        this.selected = -1;
      } else {
        b.splice(0, 4, ...d.orig);
      }
      this.syncBar();
      this.draw();
      return;
    }
    if (d.moved) this.commit();
    else this.draw();
  }

  select(i) {
    this.selected = i;
    this.syncBar();
  }

  remove(i) {
    this.boxes.splice(i, 1);
    this.selected = Math.min(i, this.boxes.length - 1);
    this.commit();
  }

  duplicate(i) {
    const b = this.boxes[i];
    const w = b.box[2] - b.box[0], h = b.box[3] - b.box[1];
    const dx = Math.min(LATENT_CELL * 2 / this.imgW, 1 - b.box[2]), dy = Math.min(LATENT_CELL * 2 / this.imgH, 1 - b.box[3]);
    const x0 = b.box[0] + dx, y0 = b.box[1] + dy;
    this.boxes.splice(i + 1, 0, { phrase: b.phrase, box: [x0, y0, x0 + w, y0 + h] });
    this.select(i + 1);
    this.commit();
  }

  /** Moves box i one place up (+1: drawn later, on top) or down the z-order (the text's line order). */
  reorder(i, dir) {
    const j = i + dir;
    if (j < 0 || j >= this.boxes.length) return;
    [this.boxes[i], this.boxes[j]] = [this.boxes[j], this.boxes[i]];
    this.select(j);
    this.commit();
  }

  /** Applies the numbers typed in the coordinate field ('x0,y0,x1,y1' in the node's units). */
  applyCoords() {
    const sel = this.boxes[this.selected];
    if (!sel) return;
    try {
      const [b] = parseBoxesText(`x: ${this.coords.value}`, this.units, this.imgW, this.imgH);
      const v = b.box;
      if (!(v[0] >= 0 && v[1] >= 0 && v[2] <= 1 && v[3] <= 1 && v[0] < v[2] && v[1] < v[3])) {
        throw new Error("needs 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 of the image");
      }
      sel.box = v;
      this.coords.style.borderColor = "#555";
      this.commit();
    } catch (e) {
      this.coords.style.borderColor = "#f66";
      this.coords.title = `not applied: ${e.message}`;
    }
  }

  defaultPhrase() {
    const used = new Set(this.boxes.map((b) => b.phrase));
    let n = this.boxes.length + 1;
    while (used.has(`object ${n}`)) n++;
    return `object ${n}`;
  }

  syncBar() {
    const sel = this.boxes[this.selected];
    if (document.activeElement !== this.phrase) this.phrase.value = sel ? sel.phrase : "";
    this.phrase.disabled = !sel;
    this.del.disabled = !sel;
    this.coords.disabled = !sel;
    if (document.activeElement !== this.coords) {
      const px = this.units === "pixels";
      this.coords.value = sel ? (px ? [sel.box[0] * this.imgW, sel.box[1] * this.imgH, sel.box[2] * this.imgW,
                                       sel.box[3] * this.imgH].map(Math.round) : sel.box.map(round3)).join(",") : "";
      this.coords.style.borderColor = "#555";
    }
    const prompts = linkedPrompts(this.node);
    const phrases = promptPhrases(prompts);
    if (this.list.childElementCount !== phrases.length || this.listKey !== phrases.join("|")) {
      this.listKey = phrases.join("|");
      this.list.replaceChildren(...phrases.map((p) => Object.assign(document.createElement("option"), { value: p })));
    }
    const missing = this.missingPhrases();
    if (!this.error && sel && missing.has(this.selected)) {
      this.info.textContent = "not in prompt";
      this.info.title = `'${sel.phrase}' is not in the prompt of ${missing.get(this.selected).join(", ")}: the run `
        + "would stop with an error; pick a phrase of the prompt";
      this.info.style.color = "#f66";
      return;
    }
    if (this.error) {
      this.info.textContent = "!";
      this.info.title = this.error;
      this.info.style.color = "#f66";
    } else if (sel) {
      const [x0, y0, x1, y1] = sel.box;
      this.info.textContent = `${Math.round((x1 - x0) * this.imgW)}x${Math.round((y1 - y0) * this.imgH)}`;
      this.info.title = `box ${this.selected + 1}: ${sel.box.map(round3).join(", ")}`;
      this.info.style.color = "#999";
    } else {
      this.info.textContent = `${this.boxes.length} box${this.boxes.length === 1 ? "" : "es"}`;
      this.info.title = "drag on the canvas to draw a box";
      this.info.style.color = "#999";
    }
  }

  // ---- drawing
  draw() {
    const L = this.layout();
    const c = this.canvas;
    Object.assign(c.style, { left: `${L.x}px`, top: `${L.y}px`, width: `${L.w}px`, height: `${L.h}px` });
    const dpr = window.devicePixelRatio || 1;
    const pw = Math.max(1, Math.round(L.w * dpr)), ph = Math.max(1, Math.round(L.h * dpr));
    if (c.width !== pw || c.height !== ph) { c.width = pw; c.height = ph; }
    const g = c.getContext("2d");
    if (!g) return;
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    const W = L.w, H = L.h;
    g.fillStyle = "#1b1b1b";
    g.fillRect(0, 0, W, H);
    const bg = this.background();
    if (bg) {
      g.globalAlpha = 0.75;
      g.drawImage(bg, 0, 0, W, H);
      g.globalAlpha = 1;
    }
    g.strokeStyle = "#2e2e2e";
    g.lineWidth = 1;
    for (let k = 1; k < 4; k++) {
      g.beginPath(); g.moveTo(Math.round(W * k / 4) + 0.5, 0); g.lineTo(Math.round(W * k / 4) + 0.5, H); g.stroke();
      g.beginPath(); g.moveTo(0, Math.round(H * k / 4) + 0.5); g.lineTo(W, Math.round(H * k / 4) + 0.5); g.stroke();
    }
    g.fillStyle = "#555";
    g.font = "10px sans-serif";
    g.textAlign = "right";
    g.textBaseline = "bottom";
    g.fillText(`${this.imgW} x ${this.imgH}`, W - 3, H - 2);
    g.textAlign = "left";
    g.textBaseline = "top";
    const missing = this.missingPhrases();
    this.boxes.forEach((b, i) => {
      const col = COLORS[i % COLORS.length];
      const x = b.box[0] * W, y = b.box[1] * H, w = (b.box[2] - b.box[0]) * W, h = (b.box[3] - b.box[1]) * H;
      g.globalAlpha = 0.22;
      g.fillStyle = col;
      g.fillRect(x, y, w, h);
      g.globalAlpha = 1;
      g.strokeStyle = col;
      g.lineWidth = i === this.selected ? 2.5 : 1.5;
      g.strokeRect(x, y, w, h);
      if (missing.has(i)) {
        // a phrase the linked prompt lacks: a red dashed frame and a '!' before the label
        g.save();
        g.setLineDash([4, 3]);
        g.strokeStyle = "#ff3030";
        g.lineWidth = 2;
        g.strokeRect(x + 1, y + 1, Math.max(0, w - 2), Math.max(0, h - 2));
        g.restore();
      }
      const label = (missing.has(i) ? "! " : "") + (b.phrase || "(no phrase)");
      g.font = "11px sans-serif";
      const tw = g.measureText(label).width + 6;
      g.fillStyle = col;
      g.fillRect(x, y, Math.min(tw, Math.max(w, tw)), 14);
      g.fillStyle = "#fff";
      g.fillText(label, x + 3, y + 1.5);
      if (i === this.selected) {
        g.fillStyle = "#fff";
        for (const [cx, cy] of [[x, y], [x + w, y], [x + w, y + h], [x, y + h]]) {
          g.fillRect(cx - HANDLE_PX / 2, cy - HANDLE_PX / 2, HANDLE_PX, HANDLE_PX);
        }
      }
    });
    if (this.error) {
      g.fillStyle = "#f66";
      g.font = "11px sans-serif";
      g.fillText("the boxes text does not parse (kept the last boxes)", 4, H - 16);
    }
  }
}

function attachBoxEditor(node) {
  if (node.attnctlBoxEditor) return;
  const editor = new BoxEditor(node);
  node.attnctlBoxEditor = editor;
  const widget = node.addDOMWidget("box_editor", "attnctl_box_editor", editor.root, {
    serialize: false,                         // not a value: the `boxes` widget holds the data
    hideOnZoom: false,
    getValue: () => "",
    setValue: () => {},
    getMinHeight: () => EDITOR_MIN_HEIGHT,
  });
  widget.serialize = false;                   // keeps widgets_values as the server expects
  editor.widget = widget;

  const text = widgetByName(node, "boxes");
  if (text) {
    const cb = text.callback;
    text.callback = function (v, ...rest) {
      const r = cb?.apply(this, [v, ...rest]);
      editor.load();
      return r;
    };
    // the multiline text widget is a textarea: typing in it does not always call the callback
    text.element?.addEventListener?.("input", () => editor.load());
  }
  const units = widgetByName(node, "units");
  if (units) {
    const cb = units.callback;
    let prev = units.value;
    units.callback = function (v, ...rest) {
      const r = cb?.apply(this, [v, ...rest]);
      // the boxes stay where they are on the image: rewrite the text in the new units
      if (v !== prev && !editor.error && editor.boxes.length) editor.commit();
      prev = v;
      return r;
    };
  }
  for (const name of ["width", "height"]) {
    const w = widgetByName(node, name);
    if (!w) continue;
    const cb = w.callback;
    w.callback = function (...args) {
      const r = cb?.apply(this, args);
      editor.load(true);
      return r;
    };
  }
  const onConfigure = node.onConfigure;
  node.onConfigure = function (...args) {
    const r = onConfigure?.apply(this, args);
    editor.load(true);
    ensureSize(node);
    return r;
  };
  const onRemoved = node.onRemoved;
  node.onRemoved = function (...args) {
    editor.observer?.disconnect();
    return onRemoved?.apply(this, args);
  };
  editor.load(true);
  ensureSize(node);
}

function ensureSize(node) {
  const min = node.computeSize?.();
  if (!min) return;
  const w = Math.max(node.size[0], 300, min[0]);
  const h = Math.max(node.size[1], min[1]);
  if (w !== node.size[0] || h !== node.size[1]) node.setSize([w, h]);
}

// ------------------------------------------------------------------------------------ heat-map viewer
/** The words of the CaptureAttention node upstream of a heat-map node's attn_maps input. */
function capturedWords(node) {
  const slot = (node.inputs || []).findIndex((i) => i.name === "attn_maps");
  let src = slot >= 0 ? node.getInputNode?.(slot) : null;
  for (let hop = 0; src && src.comfyClass !== CAPTURE_NODE && hop < 8; hop++) {
    src = src.getInputNode?.(0);                 // through reroutes
  }
  const words = src ? widgetByName(src, "words")?.value : "";
  return String(words || "").split(",").map((s) => s.trim()).filter(Boolean);
}

/** Ids of the nodes fed by the heat-map node's `heatmaps` output (Save/Preview nodes). */
function heatmapTargets(node) {
  const graph = node.graph;
  const links = node.outputs?.[0]?.links || [];
  const ids = [];
  for (const id of links) {
    const link = graph?.getLink?.(id) ?? graph?.links?.[id];
    if (link) ids.push(String(link.target_id));
  }
  return ids;
}

function imageUrl(img) {
  const q = new URLSearchParams({ filename: img.filename, subfolder: img.subfolder || "", type: img.type || "output" });
  return api.apiURL(`/view?${q.toString()}`);
}

class HeatmapViewer {
  constructor(node) {
    this.node = node;
    this.images = [];
    const root = document.createElement("div");
    root.className = "attnctl-heatmap-viewer";
    Object.assign(root.style, { display: "flex", flexDirection: "column", gap: "4px", width: "100%", height: "100%",
                                overflow: "auto", fontFamily: "sans-serif", fontSize: "11px", color: "#ccc" });
    const bar = document.createElement("div");
    Object.assign(bar.style, { display: "none", gap: "6px", alignItems: "center" });
    const slider = document.createElement("input");
    slider.type = "range";
    slider.min = "0";
    slider.value = "0";
    slider.className = "attnctl-heatmap-step";
    slider.style.flex = "1 1 auto";
    const label = document.createElement("span");
    bar.append(slider, label);
    const grid = document.createElement("div");
    grid.className = "attnctl-heatmap-grid";
    Object.assign(grid.style, { display: "grid", gap: "3px" });
    const hint = document.createElement("div");
    hint.textContent = "heat maps appear here after a run; click one to enlarge it, hover to rank the words";
    hint.style.color = "#888";
    const rankBox = document.createElement("div");
    rankBox.className = "attnctl-heatmap-rank";
    Object.assign(rankBox.style, { whiteSpace: "pre", color: "#bbb", minHeight: "1em" });
    root.append(bar, grid, rankBox, hint);
    for (const type of ["pointerdown", "mousedown"]) slider.addEventListener(type, (ev) => ev.stopPropagation());
    slider.addEventListener("input", () => this.render());
    Object.assign(this, { root, bar, slider, label, grid, hint, rankBox });
  }

  /** images: the heat maps (the node's own previews, or a downstream Save / Preview node's); data: the
   *  node's `attnctl_maps` (words, sampler steps of per-step rows, 0-255 maps for the hover ranking). */
  show(images, data) {
    this.images = images || [];
    if (data) this.data = data;
    this.render();
  }

  /** The words at fraction (fx, fy) of item `item`'s maps, highest attention first, as 'word 0.87' lines. */
  rank(item, fx, fy) {
    const d = this.data;
    if (!d || !d.words?.length) return "";
    const x = Math.min(d.w - 1, Math.floor(fx * d.w)), y = Math.min(d.h - 1, Math.floor(fy * d.h));
    const W = d.words.length;
    return d.words.map((word, k) => [word, d.values[((item * W + k) * d.h + y) * d.w + x] / 255])
      .sort((a, b) => b[1] - a[1]).map(([word, v]) => `${word} ${v.toFixed(2)}`).join("\n");
  }

  zoom(src, caption) {
    const over = document.createElement("div");
    over.className = "attnctl-heatmap-zoom";
    Object.assign(over.style, { position: "fixed", inset: "0", background: "rgba(0,0,0,0.85)", zIndex: "10000",
                                display: "flex", flexDirection: "column", alignItems: "center", justifyContent: "center",
                                color: "#ddd", fontFamily: "sans-serif", cursor: "zoom-out" });
    const big = document.createElement("img");
    big.src = src;
    Object.assign(big.style, { maxWidth: "90vw", maxHeight: "85vh", imageRendering: "pixelated" });
    const cap = document.createElement("div");
    cap.textContent = caption;
    cap.style.marginTop = "8px";
    over.append(big, cap);
    over.addEventListener("click", () => over.remove());
    document.body.appendChild(over);
  }

  render() {
    const words = this.data?.words?.length ? this.data.words : capturedWords(this.node);
    const n = this.images.length;
    this.grid.replaceChildren();
    this.hint.style.display = n ? "none" : "block";
    if (!n) { this.bar.style.display = "none"; return; }
    const cols = words.length && n % words.length === 0 ? words.length : Math.min(n, 4);
    const rows = Math.ceil(n / cols);
    const perStep = !!widgetByName(this.node, "per_step")?.value && rows > 1;
    let first = 0, count = rows;
    if (perStep) {
      this.bar.style.display = "flex";
      this.slider.max = String(rows - 1);
      const s = Math.min(rows - 1, Number(this.slider.value) || 0);
      const items = Math.max(1, this.data?.items || 1);
      const steps = this.data?.steps || [];
      const step = steps[Math.floor(s / items)];
      this.label.textContent = step ? `sampler step ${step}` + (items > 1 ? `, image ${(s % items) + 1}` : "")
                                    : `step map ${s + 1} / ${rows}`;
      first = s;
      count = 1;
    } else {
      this.bar.style.display = "none";
    }
    this.grid.style.gridTemplateColumns = `repeat(${cols}, 1fr)`;
    for (let c = 0; c < cols; c++) {
      const head = document.createElement("div");
      head.textContent = words.length === cols ? words[c] : `map ${c + 1}`;
      Object.assign(head.style, { textAlign: "center", overflow: "hidden", textOverflow: "ellipsis", whiteSpace: "nowrap" });
      this.grid.appendChild(head);
    }
    for (let r = first; r < first + count; r++) {
      for (let c = 0; c < cols; c++) {
        const img = this.images[r * cols + c];
        const el = document.createElement("img");
        if (img) el.src = imageUrl(img);
        el.alt = words[c] || "";
        Object.assign(el.style, { width: "100%", aspectRatio: "1", objectFit: "contain", background: "#111",
                                  cursor: "zoom-in" });
        const item = r % Math.max(1, this.data?.items || 1);
        const caption = `${words[c] || `map ${c + 1}`}${this.label.textContent && perStep ? ` (${this.label.textContent})` : ""}`;
        el.addEventListener("pointerdown", (ev) => ev.stopPropagation());
        el.addEventListener("click", (ev) => { ev.stopPropagation(); this.zoom(el.src, caption); });
        el.addEventListener("mousemove", (ev) => {
          const b = el.getBoundingClientRect();
          const text = this.rank(item, (ev.clientX - b.left) / Math.max(1, b.width), (ev.clientY - b.top) / Math.max(1, b.height));
          el.title = text;
          this.rankBox.textContent = text ? `at this pixel:\n${text}` : "";
        });
        this.grid.appendChild(el);
      }
    }
    this.node.setDirtyCanvas?.(true, true);
  }
}

function attachHeatmapViewer(node) {
  if (node.attnctlHeatmapViewer) return;
  const viewer = new HeatmapViewer(node);
  node.attnctlHeatmapViewer = viewer;
  const widget = node.addDOMWidget("heatmap_viewer", "attnctl_heatmap_viewer", viewer.root, {
    serialize: false, hideOnZoom: false, getValue: () => "", setValue: () => {}, getMinHeight: () => 120,
  });
  widget.serialize = false;
}

function onExecuted(ev) {
  const { node: id, output } = ev.detail || {};
  if (!app.graph || !output) return;
  const sender = app.graph.getNodeById?.(Number(id)) ?? app.graph.getNodeById?.(id);
  if (output.images?.length && sender && /^(SaveImage|PreviewImage)$/.test(sender.type)) {
    lastSampled = output.images[0];
    for (const n of app.graph.nodes || []) n.attnctlBoxEditor?.draw();
  }
  for (const node of app.graph.nodes || []) {
    const viewer = node.attnctlHeatmapViewer;
    if (!viewer) continue;
    // the heat-map node's own previews and map data (no Save / Preview node needed), or a downstream one's images
    if (String(node.id) === String(id) && output.attnctl_images?.length) {
      viewer.show(output.attnctl_images, output.attnctl_maps?.[0]);
    } else if (output.images?.length && heatmapTargets(node).includes(String(id)) && !viewer.data) {
      viewer.show(output.images);
    }
  }
}

app.registerExtension({
  name: EXT,
  async setup() {
    api.addEventListener("executed", onExecuted);
  },
  async nodeCreated(node) {
    const cls = node.comfyClass || node.constructor?.comfyClass || node.type;
    if (cls === BOXES_NODE) attachBoxEditor(node);
    else if (cls === HEATMAP_NODE) attachHeatmapViewer(node);
  },
});
