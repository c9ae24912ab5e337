"""Convert a UI-format workflow (what the ComfyUI front end saves: {"nodes": [...], "links": [...]}) to
the API format that POST /prompt takes ({id: {"class_type", "inputs"}}).

The node definitions come from the server's GET /object_info (V1 and V3 nodes have the same shape
there). The front end stores one `widgets_values` entry per widget, in the order of the node's
inputs (required, then optional), where a widget is an input of a value type (INT, FLOAT, STRING,
BOOLEAN, a combo list, ...) that is not `forceInput`. Rules applied here:

- socket types (MODEL, CLIP, LATENT, ATTN_MAPS, ...) never take a widget value; they come from links.
- a widget input that is linked (a widget converted to an input) keeps its slot in widgets_values;
  the link wins.
- INT inputs named seed / noise_seed, and inputs with `control_after_generate`, are followed by an
  extra "control_after_generate" value (fixed / increment / randomize), which is skipped; so is the
  extra upload-button value of inputs with image_upload / video_upload / audio_upload.
- `widgets_values` given as a dict (some packs) is read by input name.
- Front-end-only nodes (Note, MarkdownNote, PrimitiveNode) are dropped; Reroute nodes are followed;
  muted nodes (mode 2) are dropped; bypassed nodes (mode 4) pass their first input of the same type
  through to each output. Subgraphs are not supported (a clear error).
"""
from __future__ import annotations

import copy
import json

SOCKET_FREE_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
UI_ONLY_NODES = {"Note", "MarkdownNote", "PrimitiveNode"}
MODE_MUTED, MODE_BYPASS = 2, 4
SEED_NAMES = ("seed", "noise_seed")
UPLOAD_FLAGS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")


class WorkflowError(ValueError):
    pass


def _ordered_inputs(node_def: dict) -> list[tuple[str, list]]:
    """(name, spec) of the node's required then optional inputs, in the order the front end uses."""
    out = []
    inputs = node_def.get("input", {})
    order = node_def.get("input_order", {})
    for section in ("required", "optional"):
        specs = inputs.get(section) or {}
        names = order.get(section) or list(specs)
        for name in names:
            if name in specs:
                out.append((name, specs[name]))
    return out


def is_widget(spec) -> bool:
    """Does this input spec (from object_info) show as a widget in the front end?"""
    if not isinstance(spec, (list, tuple)) or not spec:
        return False
    typ = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if opts.get("forceInput"):
        return False
    if isinstance(typ, list):          # a combo given as its list of choices
        return True
    return typ in SOCKET_FREE_TYPES


def _extra_widget_values(name: str, spec) -> int:
    """Number of front-end-only values stored after this widget's own value."""
    typ = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    n = 0
    if opts.get("control_after_generate") or (typ == "INT" and name in SEED_NAMES):
        n += 1
    if any(opts.get(f) for f in UPLOAD_FLAGS):
        n += 1
    return n


def _default(spec):
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if "default" in opts:
        return opts["default"]
    if isinstance(spec[0], list) and spec[0]:
        return spec[0][0]
    if spec[0] == "COMBO" and opts.get("options"):      # V3 combos: ["COMBO", {"options": [...]}]
        return opts["options"][0]
    raise KeyError


def _widget_values(node: dict, node_def: dict) -> dict:
    """Map the node's widgets_values onto its widget input names."""
    vals = node.get("widgets_values")
    widgets = [(n, s) for n, s in _ordered_inputs(node_def) if is_widget(s)]
    out = {}
    if vals is None:
        vals = []
    if isinstance(vals, dict):
        for name, spec in widgets:
            if name in vals:
                out[name] = vals[name]
        return out
    i = 0
    for name, spec in widgets:
        if i < len(vals):
            out[name] = vals[i]
            i += 1 + _extra_widget_values(name, spec)
    return out


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """Returns the API-format prompt for a UI-format workflow (a deep copy; the input is not changed)."""
    if "nodes" not in workflow or "links" not in workflow:
        if all(isinstance(v, dict) and "class_type" in v for v in workflow.values()):
            return copy.deepcopy(workflow)      # already API format
        raise WorkflowError("not a UI-format workflow: it needs 'nodes' and 'links'")
    if (workflow.get("definitions") or {}).get("subgraphs"):
        raise WorkflowError("workflows with subgraphs are not supported by this converter")

    nodes = {int(n["id"]): n for n in workflow["nodes"]}
    links = {}
    for ln in workflow["links"]:
        if isinstance(ln, dict):
            lid, a, a_slot, b, b_slot, typ = (ln["id"], ln["origin_id"], ln["origin_slot"],
                                              ln["target_id"], ln["target_slot"], ln.get("type"))
        else:
            lid, a, a_slot, b, b_slot, typ = ln[:6]
        links[int(lid)] = (int(a), int(a_slot), int(b), int(b_slot), typ)

    def source(link_id, seen=()):
        """Follow a link back through Reroute and bypassed nodes: (node_id, slot) or None."""
        if link_id is None or int(link_id) not in links:
            return None
        a, a_slot, _, _, typ = links[int(link_id)]
        if a in seen:
            raise WorkflowError(f"cycle through node {a}")
        src = nodes.get(a)
        if src is None:
            raise WorkflowError(f"link {link_id} comes from missing node {a}")
        ctype = src.get("type")
        if ctype == "Reroute":
            ins = src.get("inputs") or []
            return source(ins[0].get("link") if ins else None, seen + (a,))
        if ctype in UI_ONLY_NODES or src.get("mode") == MODE_MUTED:
            return None
        if src.get("mode") == MODE_BYPASS:
            out_type = (src.get("outputs") or [{}])[a_slot].get("type", typ) if src.get("outputs") else typ
            for inp in src.get("inputs") or []:
                if inp.get("link") is not None and inp.get("type") == out_type:
                    return source(inp["link"], seen + (a,))
            return None
        return (a, a_slot)

    api = {}
    for nid in sorted(nodes):
        node = nodes[nid]
        ctype = node.get("type")
        if ctype in UI_ONLY_NODES or ctype == "Reroute" or node.get("mode") in (MODE_MUTED, MODE_BYPASS):
            continue
        node_def = object_info.get(ctype)
        if node_def is None:
            raise WorkflowError(f"node {nid}: unknown node type {ctype!r} (not in /object_info; "
                                f"is its pack installed and did it import?)")
        specs = dict(_ordered_inputs(node_def))
        inputs = {}
        wv = _widget_values(node, node_def)
        for name, spec in _ordered_inputs(node_def):
            if is_widget(spec):
                if name in wv:
                    inputs[name] = wv[name]
                else:
                    try:
                        inputs[name] = _default(spec)
                    except KeyError:
                        pass
        for inp in node.get("inputs") or []:
            name = inp.get("name")
            if (inp.get("widget") or {}).get("name"):
                name = inp["widget"]["name"]
            if inp.get("link") is None:
                continue
            if name not in specs:
                raise WorkflowError(f"node {nid} ({ctype}): input {name!r} is not an input of this node type")
            src = source(inp["link"])
            if src is None:
                # A PrimitiveNode feeding a widget: the widget's own value (kept in widgets_values) stands.
                continue
            inputs[name] = [str(src[0]), src[1]]
        entry = {"class_type": ctype, "inputs": inputs}
        if node.get("title"):
            entry["_meta"] = {"title": node["title"]}
        api[str(nid)] = entry
    return api


def load(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def nodes_of_type(api: dict, class_type: str) -> list[str]:
    return [k for k, v in api.items() if v["class_type"] == class_type]
