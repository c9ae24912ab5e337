// Attention Control: a sidebar tab that finds the pack's nodes by the words users type (vanilla JS).
//
// The front end's own node search (comfyui-frontend-package 1.32) matches node names and display names
// only, so "p2p", "panorama" or "daam" find nothing there. This tab (the public extensionManager
// sidebar-tab API, no patched front-end code) searches each node's display name, id, category and its
// search aliases (nodes/aliases.py, written to aliases.json beside this file by devtools/help_pages.py).
// Click a result, or press Enter for the first, to add that node at the centre of the canvas.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const EXT = "attention_control.finder";
const TAB = "attnctl-find";
const PREFIX = "AttnCtl_";

/** Lower case, hyphens / underscores / dots as spaces, runs of spaces as one. */
const norm = (s) => String(s ?? "").toLowerCase().replace(/[-_.]+/g, " ").replace(/\s+/g, " ").trim();

/** The pack's nodes as [{id, name, category, aliases}] from the server's node definitions. */
async function packNodes() {
  const [defs, aliases] = await Promise.all([
    api.getNodeDefs(),
    fetch(new URL("./aliases.json", import.meta.url)).then((r) => (r.ok ? r.json() : {})).catch(() => ({})),
  ]);
  return Object.entries(defs)
    .filter(([id]) => id.startsWith(PREFIX))
    .map(([id, d]) => ({ id, name: d.display_name || id, category: d.category || "", aliases: aliases[id] || [] }))
    .sort((a, b) => a.name.localeCompare(b.name));
}

/** The nodes that match `query`, best first, each with the alias it was found by (or null). A node
 *  matches when every word of the query occurs in its name, id, category or aliases; an alias or name
 *  equal to the whole query ranks first, then one that starts with it, then the rest. */
export function findNodes(query, nodes) {
  const q = norm(query);
  if (!q) return nodes.map((n) => ({ node: n, alias: null }));
  const words = q.split(" ");
  const out = [];
  for (const n of nodes) {
    const fields = [n.name, n.id.slice(PREFIX.length), n.category].map(norm);
    const al = n.aliases.map(norm);
    const hay = [...fields, ...al].join(" | ");
    if (!words.every((w) => hay.includes(w))) continue;
    const exact = [fields[0], ...al].findIndex((s) => s === q);
    const starts = [fields[0], ...al].findIndex((s) => s.startsWith(q));
    const rank = exact >= 0 ? 0 : starts >= 0 ? 1 : 2;
    const hit = exact >= 0 ? exact : starts >= 0 ? starts : [fields[0], ...al].findIndex((s) => s.includes(q));
    out.push({ node: n, alias: hit > 0 ? n.aliases[hit - 1] : null, rank });
  }
  return out.sort((a, b) => a.rank - b.rank || a.node.name.localeCompare(b.node.name));
}

/** Adds a node of `type` at the centre of the visible canvas and selects it (one undo step). */
function addNode(type) {
  const LG = window.LiteGraph;
  const canvas = app.canvas;
  const node = LG?.createNode(type);
  if (!node || !app.graph) return null;
  const el = canvas.canvas;
  const scale = window.devicePixelRatio || 1;
  const centre = canvas.ds.convertOffsetToCanvas([el.width / scale / 2, el.height / scale / 2]);
  let pos = [centre[0] - node.size[0] / 2, centre[1] - node.size[1] / 2];
  // nodes added one after another cascade instead of piling up on one spot
  while ((app.graph.nodes || []).some((n) => Math.abs(n.pos[0] - pos[0]) < 12 && Math.abs(n.pos[1] - pos[1]) < 12)) {
    pos = [pos[0] + 36, pos[1] + 36];
  }
  node.pos = pos;
  app.graph.add(node);
  canvas.selectNode?.(node);
  canvas.setDirty(true, true);
  try {
    app.extensionManager?.workflow?.activeWorkflow?.changeTracker?.checkState?.();
  } catch (_) { /* no change tracker */ }
  return node;
}

function render(el) {
  el.innerHTML = "";
  el.classList.add("attnctl-find");
  Object.assign(el.style, { display: "flex", flexDirection: "column", gap: "6px", padding: "8px", height: "100%",
                            boxSizing: "border-box", font: "13px sans-serif" });
  const title = document.createElement("div");
  title.textContent = "Attention Control nodes";
  title.style.fontWeight = "bold";
  const input = document.createElement("input");
  input.type = "search";
  input.className = "attnctl-find-input";
  input.placeholder = "p2p, panorama, heatmap, inversion, regional...";
  Object.assign(input.style, { width: "100%", padding: "4px 6px", boxSizing: "border-box" });
  const hint = document.createElement("div");
  hint.style.opacity = "0.7";
  hint.textContent = "Click a node (or press Enter) to add it to the canvas.";
  const list = document.createElement("div");
  list.className = "attnctl-find-results";
  Object.assign(list.style, { overflowY: "auto", flex: "1" });
  el.append(title, input, hint, list);

  let nodes = [];
  let shown = [];
  const draw = () => {
    shown = findNodes(input.value, nodes);
    list.innerHTML = "";
    if (!shown.length) {
      const none = document.createElement("div");
      none.className = "attnctl-find-none";
      none.textContent = `No Attention Control node matches "${input.value}".`;
      list.append(none);
      return;
    }
    for (const { node, alias } of shown) {
      const item = document.createElement("div");
      item.className = "attnctl-find-item";
      item.dataset.type = node.id;
      item.title = `${node.id} (${node.category})`;
      Object.assign(item.style, { padding: "4px 6px", cursor: "pointer", borderRadius: "4px" });
      const name = document.createElement("div");
      name.textContent = node.name;
      const sub = document.createElement("div");
      sub.style.opacity = "0.65";
      sub.style.fontSize = "11px";
      sub.textContent = alias ? `found as "${alias}" - ${node.category}` : node.category;
      item.append(name, sub);
      item.addEventListener("mouseenter", () => (item.style.background = "rgba(127,127,127,0.25)"));
      item.addEventListener("mouseleave", () => (item.style.background = ""));
      item.addEventListener("click", () => addNode(node.id));
      list.append(item);
    }
  };
  input.addEventListener("input", draw);
  input.addEventListener("keydown", (e) => {
    e.stopPropagation();  // typing here is not a canvas shortcut
    if (e.key === "Enter" && shown.length) addNode(shown[0].node.id);
  });
  packNodes().then((n) => {
    nodes = n;
    draw();
  });
  setTimeout(() => input.focus(), 0);
}

app.registerExtension({
  name: EXT,
  async setup() {
    app.extensionManager?.registerSidebarTab?.({
      id: TAB,
      icon: "pi pi-search-plus",
      title: "Attention Control",
      tooltip: "Find Attention Control nodes by technique (p2p, panorama, daam, inversion...)",
      type: "custom",
      render,
    });
  },
});
