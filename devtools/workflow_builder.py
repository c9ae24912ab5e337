"""Writes the UI-format example workflows of the pack (run: python -m devtools.workflow_builder).

A tiny graph builder: nodes with widget values and typed links, laid out left to right, saved in
the format the ComfyUI front end saves (version 0.4)."""
from __future__ import annotations

import json
import os
import uuid

from devtools.host import REPO


class Graph:
    def __init__(self):
        self.nodes, self.links = [], []

    def add(self, type_, widgets=(), inputs=None, outputs=(), title=None):
        nid = len(self.nodes) + 1
        # a grid of 5 columns with rows tall enough for the pack's widest nodes (box editor, P2P)
        node = {"id": nid, "type": type_, "pos": [40 + 360 * ((nid - 1) % 5), 80 + 560 * ((nid - 1) // 5)],
                "size": [320, 480], "flags": {}, "order": nid - 1, "mode": 0,
                "inputs": [], "outputs": [{"name": n, "type": t, "links": [], "slot_index": i}
                                         for i, (n, t) in enumerate(outputs)],
                "properties": {"Node name for S&R": type_}, "widgets_values": list(widgets)}
        if title:
            node["title"] = title
        self.nodes.append(node)
        for name, (src, slot, typ) in (inputs or {}).items():
            lid = len(self.links) + 1
            self.links.append([lid, src, slot, nid, len(node["inputs"]), typ])
            node["inputs"].append({"name": name, "type": typ, "link": lid})
            self.nodes[src - 1]["outputs"][slot]["links"].append(lid)
        return nid

    def note(self, text, title="About this workflow"):
        """A Note node (front end only: the API conversion drops it) with what the workflow does."""
        nid = self.add("Note", [text], title=title)
        self.nodes[-1]["color"], self.nodes[-1]["bgcolor"] = "#432", "#653"
        return nid

    def dump(self, path):
        name = os.path.splitext(os.path.basename(path))[0]
        groups = self.lay_out()
        self.execution_order()
        # the front end validates workflow ids as UUIDs: a stable one per example
        wf = {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, "attention-control/" + name)), "revision": 0,
              "last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
              "links": self.links, "groups": groups, "config": {}, "extra": {}, "version": 0.4}
        with open(path, "w") as f:
            json.dump(wf, f, indent=1)
            f.write("\n")

    def execution_order(self) -> None:
        """Nodes listed and numbered (`order`) as the front end's LiteGraph orders them on load (sources in
        list order, then breadth first along the links), so that the order is a fixed point: otherwise the
        first undo after loading rebuilds the graph in another order and records that as a change."""
        by_id = {n["id"]: n for n in self.nodes}
        pending = {n["id"]: sum(1 for i in n["inputs"] if i.get("link") is not None) for n in self.nodes}
        queue = [n for n in self.nodes if pending[n["id"]] == 0]
        out = []
        while queue:
            n = queue.pop(0)
            out.append(n)
            for o in n["outputs"]:
                for lid in o["links"]:
                    dst = by_id[self.links[lid - 1][3]]
                    pending[dst["id"]] -= 1
                    if pending[dst["id"]] == 0:
                        queue.append(dst)
        out += [n for n in self.nodes if n not in out]
        for i, n in enumerate(out):
            n["order"] = i
        self.nodes[:] = out

    def lay_out(self) -> list[dict]:
        """Positions every node left to right and returns one group per stage (load, prompts, attention
        control, sampling, output). A node's stage is its type's, or the latest stage of what feeds it, so
        that no wire runs back to the left; inside a stage, columns follow the longest path from the
        stage's first nodes, and each column's nodes are stacked in the order of what feeds them. The Note
        sits left of everything. Untitled prompt encoders get titles (Prompt / Negative prompt)."""
        feeds = {n["id"]: [] for n in self.nodes}
        for _lid, src, _slot, dst, _i, _t in self.links:
            feeds[dst].append(src)
        stage, depth = {}, {}
        for n in self.nodes:                   # ids are in creation order: sources come first
            nid = n["id"]
            if n["type"] == "CLIPTextEncode" and "title" not in n:
                n["title"] = "Negative prompt" if not (n["widgets_values"] or [""])[0] else "Prompt"
            if n["type"] == "Note":
                continue
            stage[nid] = max([_stage_of(n["type"])] + [stage[s] for s in feeds[nid] if s in stage])
            same = [depth[s] for s in feeds[nid] if s in stage and stage[s] == stage[nid]]
            depth[nid] = 1 + max(same) if same else 0
        for n in self.nodes:
            n["size"] = list(_size_of(n))
        gap_x, gap_y, top = 60, 50, 90
        x = 40
        notes = [n for n in self.nodes if n["type"] == "Note"]
        y = top
        for n in notes:
            n["pos"] = [x, y]
            y += n["size"][1] + gap_y
        if notes:
            x += max(n["size"][0] for n in notes) + 2 * gap_x
        groups = []
        row_of: dict[int, float] = {}
        for si, title in enumerate(STAGES):
            members = [n for n in self.nodes if stage.get(n["id"]) == si]
            if not members:
                continue
            x0 = x
            for d in range(max(depth[n["id"]] for n in members) + 1):
                col = [n for n in members if depth[n["id"]] == d]
                col.sort(key=lambda n: (min([row_of.get(s, 1e9) for s in feeds[n["id"]]] or [1e9]), n["id"]))
                y = top
                for n in col:
                    n["pos"] = [x, y]
                    row_of[n["id"]] = y
                    y += n["size"][1] + gap_y
                x += max(n["size"][0] for n in col) + gap_x
            x1 = x - gap_x
            y1 = max(n["pos"][1] + n["size"][1] for n in members)
            groups.append({"id": len(groups) + 1, "title": title, "bounding": [x0 - 20, top - 60, x1 - x0 + 40,
                                                                             y1 - top + 90],
                           "color": STAGE_COLOURS[si], "font_size": 24, "flags": {}})
            x += gap_x
        return groups


STAGES = ("Load", "Prompts, images and latents", "Attention control", "Sampling", "Output")
STAGE_COLOURS = ("#3f789e", "#8a8a3f", "#a1309b", "#3f8a5a", "#88733f")


def _stage_of(type_: str) -> int:
    if type_.endswith("Loader") or type_ in ("CheckpointLoaderSimple", "LoadImage", "UNETLoader", "CLIPLoader",
                                             "VAELoader", "AttnCtl_ShapesWorldLoader",
                                             "AttnCtl_ShapesWorldDiTLoader") or type_.startswith("ModelSampling"):
        return 0
    if type_ in ("CLIPTextEncode", "EmptyLatentImage", "EmptyHunyuanLatentVideo", "EmptySD3LatentImage",
                 "VAEEncode", "ImageBatch", "AttnCtl_PromptSwitch", "AttnCtl_Boxes", "AttnCtl_EditDirection"):
        return 1
    if type_ in ("KSampler", "KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced", "BasicScheduler",
                 "KSamplerSelect", "RandomNoise", "DisableNoise", "CFGGuider", "BasicGuider", "LatentFromBatch"):
        return 3
    if type_.startswith(("Save", "Preview")) or type_ in ("VAEDecode", "MaskToImage", "AttnCtl_AttentionHeatmap",
                                                          "PlotLossGraph", "LossGraphNode"):
        return 4
    return 2


def _size_of(n: dict) -> tuple[int, int]:
    """A node's size as the front end draws it, near enough to lay out without overlaps."""
    if n["type"] == "Note":
        return 360, 420
    if n["type"] == "AttnCtl_Boxes":
        return 420, 640                       # the box editor's canvas under the widgets
    widgets = n["widgets_values"]
    long_text = sum(1 for w in widgets if isinstance(w, str) and ("\n" in w or len(w) > 36))
    rows = max(len(n["inputs"]), len(n["outputs"]))
    h = 50 + 22 * rows + 26 * (len(widgets) - long_text) + 110 * long_text
    if n["type"].startswith(("Save", "Preview")) or n["type"] == "AttnCtl_AttentionHeatmap":
        h = max(h, 300)                       # room for the image preview
    w = 400 if n["type"].startswith("AttnCtl_") else 320
    w = max(w, 60 + 8 * len(n.get("title") or ""))   # the front end widens a node to fit its title
    mw, mh = MIN_SIZE.get(n["type"], (0, 0))
    return max(w, mw), max(h, mh)


# sizes the front end (1.32) gives these nodes at least (their multiline widgets, LoadImage's preview, long
# widget labels), measured on the examples: a node saved smaller grows on load and would overlap its neighbours
MIN_SIZE = {
    "LoadImage": (320, 340), "AttnCtl_PromptToPrompt": (400, 490), "AttnCtl_MasaCtrl": (400, 440),
    "AttnCtl_RegionPrompt": (400, 190), "AttnCtl_RegionConditioning": (400, 310), "AttnCtl_CollageLayer": (400, 190),
    "AttnCtl_EditAssumption": (400, 250), "BasicScheduler": (430, 160), "SamplerCustomAdvanced": (420, 170),
    "UNETLoader": (370, 130), "CLIPTextEncode": (360, 110),
}


def loader(g):
    return g.add("CheckpointLoaderSimple", ["v1-5-pruned-emaonly.safetensors"],
                 outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")])


def dit_loader(g):
    """The shapes-world DiT (a Flux-class model shipped with the pack); `make demo CKPT=...` keeps it
    (only CheckpointLoaderSimple nodes take the checkpoint)."""
    return g.add("AttnCtl_ShapesWorldDiTLoader", [], outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")],
                 title="Shapes World DiT (Flux-class)")


def capture(name, prompt, words, load=loader, cfg=7.0):
    """Capture Attention Maps -> KSampler -> VAEDecode -> Attention Heat Map (image + heat maps saved)."""
    g = Graph()
    ck = load(g)
    pos = g.add("CLIPTextEncode", [prompt], inputs={"clip": (ck, 1, "CLIP")},
                outputs=[("CONDITIONING", "CONDITIONING")])
    neg = g.add("CLIPTextEncode", [""], inputs={"clip": (ck, 1, "CLIP")}, outputs=[("CONDITIONING", "CONDITIONING")])
    cap = g.add("AttnCtl_CaptureAttention", [prompt, words, "all", 0.0, 1.0, False],
                inputs={"model": (ck, 0, "MODEL"), "clip": (ck, 1, "CLIP")},
                outputs=[("model", "MODEL"), ("attn_maps", "ATTN_MAPS")])
    lat = g.add("EmptyLatentImage", [256, 256, 1], outputs=[("LATENT", "LATENT")])
    ks = g.add("KSampler", [42, "fixed", 20, cfg, "euler", "normal", 1.0],
               inputs={"model": (cap, 0, "MODEL"), "positive": (pos, 0, "CONDITIONING"),
                       "negative": (neg, 0, "CONDITIONING"), "latent_image": (lat, 0, "LATENT")},
               outputs=[("LATENT", "LATENT")])
    dec = g.add("VAEDecode", [], inputs={"samples": (ks, 0, "LATENT"), "vae": (ck, 2, "VAE")},
                outputs=[("IMAGE", "IMAGE")])
    g.add("SaveImage", [f"AttnCtl/{name}_image"], inputs={"images": (dec, 0, "IMAGE")})
    hm = g.add("AttnCtl_AttentionHeatmap", [0.5, 0.6, False],
               inputs={"attn_maps": (cap, 1, "ATTN_MAPS"), "image": (dec, 0, "IMAGE")},
               outputs=[("heatmaps", "IMAGE"), ("masks", "MASK")])
    g.add("SaveImage", [f"AttnCtl/{name}_heatmaps"], inputs={"images": (hm, 0, "IMAGE")})
    return g


def p2p(name, source, targets, mode, reweight="", blend_src="", blend_tgt="", load=loader, cfg=6.0, seed=42,
        note=None, title=None):
    g = Graph()
    if note:
        g.note(note)
    ck = load(g)
    lat = g.add("EmptyLatentImage", [256, 256, 1], outputs=[("LATENT", "LATENT")])
    edit = g.add("AttnCtl_PromptToPrompt",
                 [source, targets, mode, reweight, 0.8, "", 0.4, blend_src, blend_tgt, 0.3, 0.0, ""],
                 inputs={"model": (ck, 0, "MODEL"), "clip": (ck, 1, "CLIP"), "latent": (lat, 0, "LATENT")},
                 outputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                          ("latent", "LATENT")], title=title)
    return sample_and_save(g, name, ck, (edit, 0), (edit, 1), (edit, 2), (edit, 3), seed=seed, cfg=cfg)


def layout(name, prompt, box_text, mode="backward"):
    g = Graph()
    ck = loader(g)
    bx = g.add("AttnCtl_Boxes", [box_text, "fraction", 256, 256], outputs=[("boxes", "BOXES")])
    guide = g.add("AttnCtl_LayoutGuidance", [prompt, mode, 30.0, 5, 0.2, 0.2, 0.5, "auto", "none"],
                  inputs={"model": (ck, 0, "MODEL"), "clip": (ck, 1, "CLIP"), "boxes": (bx, 0, "BOXES")},
                  outputs=[("model", "MODEL"), ("positive", "CONDITIONING")])
    neg = g.add("CLIPTextEncode", [""], inputs={"clip": (ck, 1, "CLIP")}, outputs=[("CONDITIONING", "CONDITIONING")])
    lat = g.add("EmptyLatentImage", [256, 256, 1], outputs=[("LATENT", "LATENT")])
    return sample_and_save(g, name, ck, (guide, 0), (guide, 1), (neg, 0), (lat, 0))


def masactrl(name, source, target):
    g = Graph()
    ck = loader(g)
    lat = g.add("EmptyLatentImage", [256, 256, 1], outputs=[("LATENT", "LATENT")])
    edit = g.add("AttnCtl_MasaCtrl", [source, target, "", 0.08, -1, "mutual", "", "", 0.1],
                 inputs={"model": (ck, 0, "MODEL"), "clip": (ck, 1, "CLIP"), "latent": (lat, 0, "LATENT")},
                 outputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                          ("latent", "LATENT")])
    return sample_and_save(g, name, ck, (edit, 0), (edit, 1), (edit, 2), (edit, 3))


def ddim_inverted(g, ck, image, caption, widgets):
    """LoadImage -> VAEEncode -> DDIM Inversion with the caption (its widgets given) -> the inversion node."""
    img = g.add("LoadImage", [image, "image"], outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")])
    enc = g.add("VAEEncode", [], inputs={"pixels": (img, 0, "IMAGE"), "vae": (ck, 2, "VAE")},
                outputs=[("LATENT", "LATENT")])
    pos = g.add("CLIPTextEncode", [caption], inputs={"clip": (ck, 1, "CLIP")},
                outputs=[("CONDITIONING", "CONDITIONING")])
    return g.add("AttnCtl_DDIMInversion", widgets,
                 inputs={"model": (ck, 0, "MODEL"), "positive": (pos, 0, "CONDITIONING"), "latent": (enc, 0, "LATENT")},
                 outputs=[("latent", "LATENT"), ("trajectory", "TRAJECTORY")])


def replay_and_save(g, ck, name, edit, inv, cfg, negative=None):
    """Replay Source on the edit node's model -> KSamplerAdvanced (add_noise off, the inversion's 20 steps) from
    its latent with its conditioning (or the (node, slot) `negative`) -> VAEDecode -> SaveImage."""
    rep = g.add("AttnCtl_ReplaySource", [], inputs={"model": (edit, 0, "MODEL"), "trajectory": (inv, 1, "TRAJECTORY")},
                outputs=[("model", "MODEL")])
    ks = g.add("KSamplerAdvanced", ["disable", 0, "fixed", 20, cfg, "euler", "normal", 0, 10000, "disable"],
               inputs={"model": (rep, 0, "MODEL"), "positive": (edit, 1, "CONDITIONING"),
                       "negative": (*(negative or (edit, 2)), "CONDITIONING"), "latent_image": (edit, 3, "LATENT")},
               outputs=[("LATENT", "LATENT")], title=f"KSamplerAdvanced (add_noise off, 20 steps, cfg {cfg:g})")
    dec = g.add("VAEDecode", [], inputs={"samples": (ks, 0, "LATENT"), "vae": (ck, 2, "VAE")},
                outputs=[("IMAGE", "IMAGE")])
    g.add("SaveImage", [f"AttnCtl/{name}"], inputs={"images": (dec, 0, "IMAGE")})
    return g


def inversion_edit(name, image, source, target):
    """A real image edited with Prompt-to-Prompt: VAEEncode -> DDIM inversion -> edit -> source replay ->
    KSamplerAdvanced with add_noise disabled and the inversion's steps and scheduler."""
    g = Graph()
    ck = loader(g)
    inv = ddim_inverted(g, ck, image, source, [20, "normal"])
    edit = g.add("AttnCtl_PromptToPrompt",
                 [source, target, "replace", "", 0.8, "", 0.4, "", "", 0.3, 0.0, ""],
                 inputs={"model": (ck, 0, "MODEL"), "clip": (ck, 1, "CLIP"), "latent": (inv, 0, "LATENT")},
                 outputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                          ("latent", "LATENT")])
    return replay_and_save(g, ck, name, edit, inv, cfg=6.0)


def null_text_edit(name, image, source, target, cfg=7.5, iterations=10):
    """A real image edited with Prompt-to-Prompt at a real CFG scale: Null-Text Inversion (the caption, an empty
    negative optimised per step) -> Prompt-to-Prompt -> Replay Source -> KSamplerAdvanced with the optimised
    negative (add_noise off, the inversion's steps, scheduler and cfg)."""
    g = Graph()
    ck = loader(g)
    img = g.add("LoadImage", [image, "image"], outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")], title="Real image")
    enc = g.add("VAEEncode", [], inputs={"pixels": (img, 0, "IMAGE"), "vae": (ck, 2, "VAE")},
                outputs=[("LATENT", "LATENT")])
    pos = g.add("CLIPTextEncode", [source], inputs={"clip": (ck, 1, "CLIP")},
                outputs=[("CONDITIONING", "CONDITIONING")], title="Caption of the image")
    empty = g.add("CLIPTextEncode", [""], inputs={"clip": (ck, 1, "CLIP")},
                  outputs=[("CONDITIONING", "CONDITIONING")], title="Negative prompt (empty: the null text)")
    inv = g.add("AttnCtl_NullTextInversion", [20, "normal", cfg, iterations],
                inputs={"model": (ck, 0, "MODEL"), "positive": (pos, 0, "CONDITIONING"),
                        "negative": (empty, 0, "CONDITIONING"), "latent": (enc, 0, "LATENT")},
                outputs=[("latent", "LATENT"), ("trajectory", "TRAJECTORY"), ("negative", "CONDITIONING")])
    edit = g.add("AttnCtl_PromptToPrompt",
                 [source, target, "replace", "", 0.8, "", 0.4, "", "", 0.3, 0.0, ""],
                 inputs={"model": (ck, 0, "MODEL"), "clip": (ck, 1, "CLIP"), "latent": (inv, 0, "LATENT")},
                 outputs=P2P_OUTPUTS)
    return replay_and_save(g, ck, name, edit, inv, cfg=cfg, negative=(inv, 2))


def rf_inversion(name, image, source, target, steps=20, cfg=2.5, gamma=0.5, eta=0.9, note=None):
    """RF-Inversion (Rout et al.) on a rectified-flow DiT, without attention edits: Flow Inversion with the
    controlled forward pass (gamma) -> RF-Inversion Guidance (eta, the first quarter of the steps) on the plain
    model -> the target prompt sampled from the inverted noise (SamplerCustomAdvanced, euler)."""
    g = Graph()
    if note:
        g.note(note)
    ck = dit_loader(g)
    img = g.add("LoadImage", [image, "image"], outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")], title="Real image")
    enc = g.add("VAEEncode", [], inputs={"pixels": (img, 0, "IMAGE"), "vae": (ck, 2, "VAE")},
                outputs=[("LATENT", "LATENT")])
    cap = g.add("CLIPTextEncode", [source], inputs={"clip": (ck, 1, "CLIP")},
                outputs=[("CONDITIONING", "CONDITIONING")], title="Caption of the image (inversion prompt)")
    inv = g.add("AttnCtl_FlowInversion", [steps, "simple", gamma, 0, "fixed"],
                inputs={"model": (ck, 0, "MODEL"), "positive": (cap, 0, "CONDITIONING"), "latent": (enc, 0, "LATENT")},
                outputs=[("latent", "LATENT"), ("trajectory", "TRAJECTORY"), ("noise", "NOISE")],
                title=f"Flow Inversion (controlled, gamma {gamma:g})")
    guided = g.add("AttnCtl_RFInversionGuidance", [eta, 0, max(1, steps // 4)],
                   inputs={"model": (ck, 0, "MODEL"), "trajectory": (inv, 1, "TRAJECTORY")},
                   outputs=[("model", "MODEL")], title=f"RF-Inversion Guidance (eta {eta:g}, first quarter)")
    tgt = g.add("CLIPTextEncode", [target], inputs={"clip": (ck, 1, "CLIP")},
                outputs=[("CONDITIONING", "CONDITIONING")], title="Target prompt (the edit)")
    neg = g.add("CLIPTextEncode", [""], inputs={"clip": (ck, 1, "CLIP")}, outputs=[("CONDITIONING", "CONDITIONING")],
                title="Negative prompt")
    guider = g.add("CFGGuider", [cfg], inputs={"model": (guided, 0, "MODEL"), "positive": (tgt, 0, "CONDITIONING"),
                                               "negative": (neg, 0, "CONDITIONING")},
                   outputs=[("GUIDER", "GUIDER")], title=f"CFGGuider (cfg {cfg:g})")
    smp = g.add("KSamplerSelect", ["euler"], outputs=[("SAMPLER", "SAMPLER")])
    sig = g.add("BasicScheduler", ["simple", steps, 1.0], inputs={"model": (ck, 0, "MODEL")},
                outputs=[("SIGMAS", "SIGMAS")], title="BasicScheduler (the inversion's steps and scheduler)")
    ks = g.add("SamplerCustomAdvanced", [],
               inputs={"noise": (inv, 2, "NOISE"), "guider": (guider, 0, "GUIDER"), "sampler": (smp, 0, "SAMPLER"),
                       "sigmas": (sig, 0, "SIGMAS"), "latent_image": (inv, 0, "LATENT")},
               outputs=[("output", "LATENT"), ("denoised_output", "LATENT")],
               title="SamplerCustomAdvanced (from the inverted noise)")
    dec = g.add("VAEDecode", [], inputs={"samples": (ks, 0, "LATENT"), "vae": (ck, 2, "VAE")},
                outputs=[("IMAGE", "IMAGE")])
    g.add("SaveImage", [f"AttnCtl/{name}"], inputs={"images": (dec, 0, "IMAGE")})
    return g


def tiled_diffusion(name, prompt="a red circle and a blue square", merge="mixture", wrap=False):
    g = Graph()
    ck = loader(g)
    tile = g.add("AttnCtl_TiledDiffusion", [256, 256, 128, merge, 1, wrap, "per tile"],
                 inputs={"model": (ck, 0, "MODEL")}, outputs=[("model", "MODEL")])
    pos = g.add("CLIPTextEncode", [prompt], inputs={"clip": (ck, 1, "CLIP")},
                outputs=[("CONDITIONING", "CONDITIONING")])
    neg = g.add("CLIPTextEncode", [""], inputs={"clip": (ck, 1, "CLIP")}, outputs=[("CONDITIONING", "CONDITIONING")])
    lat = g.add("EmptyLatentImage", [768, 256, 1], outputs=[("LATENT", "LATENT")])
    return sample_and_save(g, name, ck, (tile, 0), (pos, 0), (neg, 0), (lat, 0))


def paint_with_words(name, prompt, box_text):
    g = Graph()
    ck = loader(g)
    bx = g.add("AttnCtl_Boxes", [box_text, "fraction", 256, 256], outputs=[("boxes", "BOXES")])
    paint = g.add("AttnCtl_PaintWithWords", [prompt, "ediff-i", 0.3, "", 1.0, 1.0, "all", 1.0, ""],
                  inputs={"model": (ck, 0, "MODEL"), "clip": (ck, 1, "CLIP"), "boxes": (bx, 0, "BOXES")},
                  outputs=[("model", "MODEL"), ("positive", "CONDITIONING")])
    neg = g.add("CLIPTextEncode", [""], inputs={"clip": (ck, 1, "CLIP")}, outputs=[("CONDITIONING", "CONDITIONING")])
    lat = g.add("EmptyLatentImage", [256, 256, 1], outputs=[("LATENT", "LATENT")])
    # where each phrase is painted: the boxes as ComfyUI masks, saved beside the result
    mask = g.add("AttnCtl_BoxesToMask", [256, 256, -1, True], inputs={"boxes": (bx, 0, "BOXES")},
                 outputs=[("mask", "MASK")], title="Boxes to Mask (the painted regions)")
    img = g.add("MaskToImage", [], inputs={"mask": (mask, 0, "MASK")}, outputs=[("IMAGE", "IMAGE")])
    g.add("SaveImage", [f"AttnCtl/{name}_regions"], inputs={"images": (img, 0, "IMAGE")})
    return sample_and_save(g, name, ck, (paint, 0), (paint, 1), (neg, 0), (lat, 0))


def region_prompts(name, box_text, background="", load=loader, bootstrap=0.4, seed=2, cfg=6.0):
    """Boxes -> Region Prompt (one region per box, prompted with its phrase) -> Region Conditioning."""
    g = Graph()
    ck = load(g)
    bx = g.add("AttnCtl_Boxes", [box_text, "fraction", 256, 256], outputs=[("boxes", "BOXES")])
    reg = g.add("AttnCtl_RegionPrompt", ["", 1.0], inputs={"boxes": (bx, 0, "BOXES")},
                outputs=[("regions", "REGIONS")])
    cond = g.add("AttnCtl_RegionConditioning", [background, bootstrap, "random"],
                 inputs={"model": (ck, 0, "MODEL"), "clip": (ck, 1, "CLIP"), "regions": (reg, 0, "REGIONS")},
                 outputs=[("model", "MODEL"), ("positive", "CONDITIONING")])
    neg = g.add("CLIPTextEncode", [""], inputs={"clip": (ck, 1, "CLIP")}, outputs=[("CONDITIONING", "CONDITIONING")])
    lat = g.add("EmptyLatentImage", [256, 256, 1], outputs=[("LATENT", "LATENT")])
    # seed 2: on the shapes world about two seeds in three put both objects in their boxes
    return sample_and_save(g, name, ck, (cond, 0), (cond, 1), (neg, 0), (lat, 0), seed=seed, cfg=cfg)


def collage(name, layers):
    """LoadImage per layer (RGBA PNGs in example_workflows/input) -> Collage Layer chain -> Collage Layers."""
    g = Graph()
    ck = loader(g)
    prev = None
    for image, prompt, strength in layers:
        img = g.add("LoadImage", [image, "image"], outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")])
        inputs = {"image": (img, 0, "IMAGE"), "mask": (img, 1, "MASK")}
        if prev is not None:
            inputs["layers"] = (prev, 0, "COLLAGE_LAYERS")
        prev = g.add("AttnCtl_CollageLayer", [prompt, strength, "transparency (LoadImage's MASK)"], inputs=inputs,
                     outputs=[("layers", "COLLAGE_LAYERS")])
    col = g.add("AttnCtl_CollageLayers", [1.0, 1.0, 8, 8.0],
                inputs={"model": (ck, 0, "MODEL"), "clip": (ck, 1, "CLIP"), "vae": (ck, 2, "VAE"),
                        "layers": (prev, 0, "COLLAGE_LAYERS")},
                outputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("latent", "LATENT"),
                         ("layer_masks", "MASK"), ("composite", "IMAGE")])
    neg = g.add("CLIPTextEncode", [""], inputs={"clip": (ck, 1, "CLIP")}, outputs=[("CONDITIONING", "CONDITIONING")])
    return sample_and_save(g, name, ck, (col, 0), (col, 1), (neg, 0), (col, 2))


P2P_OUTPUTS = [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent", "LATENT")]


def flow_inversion_edit(name, image, source, target, steps=20, cfg=5.0, eta=0.0, note=None):
    """A real image edited with Prompt-to-Prompt on a rectified-flow DiT: LoadImage -> VAEEncode -> Flow
    Inversion -> Prompt-to-Prompt on the inverted latent -> Replay Source (+ RF-Inversion guidance when
    eta > 0) -> SamplerCustomAdvanced from the inversion's noise (euler, the inversion's steps and
    scheduler: KSamplerAdvanced with add_noise off cannot start a flow model from a latent)."""
    g = Graph()
    if note:
        g.note(note)
    ck = dit_loader(g)
    img = g.add("LoadImage", [image, "image"], outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")], title="Real image")
    enc = g.add("VAEEncode", [], inputs={"pixels": (img, 0, "IMAGE"), "vae": (ck, 2, "VAE")},
                outputs=[("LATENT", "LATENT")])
    pos = g.add("CLIPTextEncode", [source], inputs={"clip": (ck, 1, "CLIP")},
                outputs=[("CONDITIONING", "CONDITIONING")], title="Caption of the image (inversion prompt)")
    inv = g.add("AttnCtl_FlowInversion", [steps, "simple", 0.0, 0, "fixed"],
                inputs={"model": (ck, 0, "MODEL"), "positive": (pos, 0, "CONDITIONING"), "latent": (enc, 0, "LATENT")},
                outputs=[("latent", "LATENT"), ("trajectory", "TRAJECTORY"), ("noise", "NOISE")],
                title="Flow Inversion (image -> noise)")
    edit = g.add("AttnCtl_PromptToPrompt",
                 [source, target, "replace", "", 0.8, "", 0.4, "", "", 0.3, 0.0, ""],
                 inputs={"model": (ck, 0, "MODEL"), "clip": (ck, 1, "CLIP"), "latent": (inv, 0, "LATENT")},
                 outputs=P2P_OUTPUTS, title="Prompt-to-Prompt (source = the image's caption)")
    model = g.add("AttnCtl_ReplaySource", [], inputs={"model": (edit, 0, "MODEL"), "trajectory": (inv, 1, "TRAJECTORY")},
                  outputs=[("model", "MODEL")], title="Replay Source (item 0 = the real image)")
    if eta > 0:
        model = g.add("AttnCtl_RFInversionGuidance", [eta, 0, max(1, steps // 4)],
                      inputs={"model": (model, 0, "MODEL"), "trajectory": (inv, 1, "TRAJECTORY")},
                      outputs=[("model", "MODEL")])
    guider = g.add("CFGGuider", [cfg], inputs={"model": (model, 0, "MODEL"), "positive": (edit, 1, "CONDITIONING"),
                                               "negative": (edit, 2, "CONDITIONING")},
                   outputs=[("GUIDER", "GUIDER")], title=f"CFGGuider (cfg {cfg:g})")
    smp = g.add("KSamplerSelect", ["euler"], outputs=[("SAMPLER", "SAMPLER")])
    sig = g.add("BasicScheduler", ["simple", steps, 1.0], inputs={"model": (ck, 0, "MODEL")},
                outputs=[("SIGMAS", "SIGMAS")], title="BasicScheduler (the inversion's steps and scheduler)")
    ks = g.add("SamplerCustomAdvanced", [],
               inputs={"noise": (inv, 2, "NOISE"), "guider": (guider, 0, "GUIDER"), "sampler": (smp, 0, "SAMPLER"),
                       "sigmas": (sig, 0, "SIGMAS"), "latent_image": (edit, 3, "LATENT")},
               outputs=[("output", "LATENT"), ("denoised_output", "LATENT")],
               title="SamplerCustomAdvanced (from the inverted noise)")
    dec = g.add("VAEDecode", [], inputs={"samples": (ks, 0, "LATENT"), "vae": (ck, 2, "VAE")},
                outputs=[("IMAGE", "IMAGE")])
    g.add("SaveImage", [f"AttnCtl/{name}"], inputs={"images": (dec, 0, "IMAGE")})
    return g


WAN_FILES = {"unet": "wan2.1_t2v_1.3B_fp16.safetensors", "clip": "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
             "vae": "wan_2.1_vae.safetensors"}


def video_p2p_wan(name, source, target, note=None, width=832, height=480, length=33, steps=30, cfg=6.0):
    """Video-P2P on Wan 2.1 t2v: ComfyUI's Wan loaders -> Prompt-to-Prompt on an empty video latent
    (source and target videos from one noise) -> KSampler -> one VAEDecode + animated WEBP per video."""
    g = Graph()
    if note:
        g.note(note)
    unet = g.add("UNETLoader", [WAN_FILES["unet"], "default"], outputs=[("MODEL", "MODEL")],
                 title="Load Wan 2.1 t2v (models/diffusion_models)")
    clip = g.add("CLIPLoader", [WAN_FILES["clip"], "wan", "default"], outputs=[("CLIP", "CLIP")],
                 title="Load umt5 xxl (models/text_encoders)")
    vae = g.add("VAELoader", [WAN_FILES["vae"]], outputs=[("VAE", "VAE")], title="Load Wan VAE (models/vae)")
    shift = g.add("ModelSamplingSD3", [8.0], inputs={"model": (unet, 0, "MODEL")}, outputs=[("MODEL", "MODEL")],
                  title="ModelSamplingSD3 (Wan's shift 8)")
    lat = g.add("EmptyHunyuanLatentVideo", [width, height, length, 1], outputs=[("LATENT", "LATENT")],
                title=f"Empty video latent ({length} frames)")
    edit = g.add("AttnCtl_PromptToPrompt",
                 [source, target, "replace", "", 0.8, "", 0.4, "", "", 0.3, 0.0, ""],
                 inputs={"model": (shift, 0, "MODEL"), "clip": (clip, 0, "CLIP"), "latent": (lat, 0, "LATENT")},
                 outputs=P2P_OUTPUTS, title="Video-P2P (every frame, one noise)")
    ks = g.add("KSampler", [42, "fixed", steps, cfg, "uni_pc", "simple", 1.0],
               inputs={"model": (edit, 0, "MODEL"), "positive": (edit, 1, "CONDITIONING"),
                       "negative": (edit, 2, "CONDITIONING"), "latent_image": (edit, 3, "LATENT")},
               outputs=[("LATENT", "LATENT")])
    for i, label in ((0, "source"), (1, "edited")):
        one = g.add("LatentFromBatch", [i, 1], inputs={"samples": (ks, 0, "LATENT")}, outputs=[("LATENT", "LATENT")],
                    title=f"The {label} video (batch item {i})")
        dec = g.add("VAEDecode", [], inputs={"samples": (one, 0, "LATENT"), "vae": (vae, 0, "VAE")},
                    outputs=[("IMAGE", "IMAGE")])
        g.add("SaveAnimatedWEBP", [f"AttnCtl/{name}_{label}", 16.0, False, 90, "default"],
              inputs={"images": (dec, 0, "IMAGE")})
    return g


def time_edit(name, source, destination, prompt, note):
    """Edit Assumption (TIME) -> the same prompt sampled by the plain and the edited model (same seed), and the
    edit saved with Save Assumption Edit."""
    g = Graph()
    g.note(note)
    ck = loader(g)
    edit = g.add("AttnCtl_EditAssumption", [source, destination, 0.1, True, 1.0],
                 inputs={"model": (ck, 0, "MODEL"), "clip": (ck, 1, "CLIP")},
                 outputs=[("MODEL", "MODEL"), ("edit", "ATTNCTL_ASSUMPTION_EDIT")])
    g.add("AttnCtl_SaveAssumptionEdit", ["attention_edits/time_edit"],
          inputs={"edit": (edit, 1, "ATTNCTL_ASSUMPTION_EDIT")})
    return compare_models(g, name, ck, prompt, (("plain", (ck, 0)), ("edited", (edit, 0))), batch=2, seed=42)


def prompt_switching(name, first, second, at, note, seed=21):
    """Prompt Switching (first prompt up to `at`, the second after) beside each prompt alone: three KSamplers,
    the same seed and batch, each decoded and saved as AttnCtl/<name>_<label>."""
    g = Graph()
    g.note(note)
    ck = loader(g)
    sw = g.add("AttnCtl_PromptSwitch", [f"0.0-{at}: {first}\n{at}-1.0: {second}"], inputs={"clip": (ck, 1, "CLIP")},
               outputs=[("conditioning", "CONDITIONING")], title="Prompt Switching (eDiff-I)")
    alone = [g.add("CLIPTextEncode", [text], inputs={"clip": (ck, 1, "CLIP")},
                   outputs=[("CONDITIONING", "CONDITIONING")], title=f"{label} prompt alone")
             for label, text in (("First", first), ("Second", second))]
    neg = g.add("CLIPTextEncode", [""], inputs={"clip": (ck, 1, "CLIP")}, outputs=[("CONDITIONING", "CONDITIONING")],
                title="Negative prompt")
    lat = g.add("EmptyLatentImage", [256, 256, 4], outputs=[("LATENT", "LATENT")])
    for label, pos in (("first", alone[0]), ("second", alone[1]), ("switched", sw)):
        ks = g.add("KSampler", [seed, "fixed", 20, 6.0, "euler", "normal", 1.0],
                   inputs={"model": (ck, 0, "MODEL"), "positive": (pos, 0, "CONDITIONING"),
                           "negative": (neg, 0, "CONDITIONING"), "latent_image": (lat, 0, "LATENT")},
                   outputs=[("LATENT", "LATENT")], title=f"KSampler ({label})")
        dec = g.add("VAEDecode", [], inputs={"samples": (ks, 0, "LATENT"), "vae": (ck, 2, "VAE")},
                    outputs=[("IMAGE", "IMAGE")])
        g.add("SaveImage", [f"AttnCtl/{name}_{label}"], inputs={"images": (dec, 0, "IMAGE")})
    return g


def segment_words(name, image, caption, words, inpaint_prompt, note, load=loader, cfg=6.0, seed=7):
    """A real image segmented by the words of its caption (Segment Words: preview and masks saved), then the
    first word's mask used to inpaint: VAEEncode -> Set Latent Noise Mask -> KSampler with `inpaint_prompt`
    (None: no inpainting; the shapes-world DiT does not inpaint with a noise mask, it erases the region)."""
    g = Graph()
    g.note(note)
    ck = load(g)
    img = g.add("LoadImage", [image, "image"], outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")], title="Real image")
    seg = g.add("AttnCtl_SegmentWords", [caption, words, 0.1, 1, 0, "fixed", 1, 0.5, False, "all", "auto"],
                inputs={"model": (ck, 0, "MODEL"), "clip": (ck, 1, "CLIP"), "vae": (ck, 2, "VAE"),
                        "image": (img, 0, "IMAGE")},
                outputs=[("masks", "MASK"), ("preview", "IMAGE"), ("attn_maps", "ATTN_MAPS")],
                title="Segment Words (attention)")
    g.add("SaveImage", [f"AttnCtl/{name}_preview"], inputs={"images": (seg, 1, "IMAGE")}, title="Word heat maps")
    mimg = g.add("MaskToImage", [], inputs={"mask": (seg, 0, "MASK")}, outputs=[("IMAGE", "IMAGE")])
    g.add("SaveImage", [f"AttnCtl/{name}_masks"], inputs={"images": (mimg, 0, "IMAGE")}, title="Word masks")
    if inpaint_prompt is None:
        return g
    first = g.add("AttnCtl_SegmentWords", [caption, words.split(",")[0].strip(), 0.1, 1, 0, "fixed", 1, 0.5, False, "all",
                                            "auto"],
                  inputs={"model": (ck, 0, "MODEL"), "clip": (ck, 1, "CLIP"), "vae": (ck, 2, "VAE"),
                          "image": (img, 0, "IMAGE")},
                  outputs=[("masks", "MASK"), ("preview", "IMAGE"), ("attn_maps", "ATTN_MAPS")],
                  title="Mask of the first word")
    enc = g.add("VAEEncode", [], inputs={"pixels": (img, 0, "IMAGE"), "vae": (ck, 2, "VAE")},
                outputs=[("LATENT", "LATENT")])
    masked = g.add("SetLatentNoiseMask", [], inputs={"samples": (enc, 0, "LATENT"), "mask": (first, 0, "MASK")},
                   outputs=[("LATENT", "LATENT")])
    pos = g.add("CLIPTextEncode", [inpaint_prompt], inputs={"clip": (ck, 1, "CLIP")},
                outputs=[("CONDITIONING", "CONDITIONING")], title="Inpainting prompt")
    neg = g.add("CLIPTextEncode", [""], inputs={"clip": (ck, 1, "CLIP")}, outputs=[("CONDITIONING", "CONDITIONING")],
                title="Negative prompt")
    return sample_and_save(g, f"{name}_inpainted", ck, (ck, 0), (pos, 0), (neg, 0), (masked, 0), seed=seed, cfg=cfg)


def colour_sentences(colour, shapes=("circle", "square", "triangle")):
    """One shapes-world sentence per line naming `colour`: alone and beside another object."""
    out = [f"a {colour} {s}" for s in shapes]
    out += [f"a {colour} {s} and a {o} {t}" for s in shapes for o in ("red", "green", "blue", "yellow") if o != colour
            for t in shapes if t != s]
    return "\n".join(out)


def pix2pix_zero_real(name, image, caption, source, target, note):
    """A real image edited with Pix2Pix-Zero: VAEEncode -> DDIM Inversion (noise regularisation 20) ->
    Edit Direction (saved) -> Pix2Pix-Zero (caption as negative, guidance 0.1) -> Replay Source ->
    KSamplerAdvanced (add_noise off, the inversion's steps) -> [reference, edit] saved."""
    g = Graph()
    g.note(note)
    ck = loader(g)
    inv = ddim_inverted(g, ck, image, caption, [20, "normal", 20.0])
    d = g.add("AttnCtl_EditDirection", [source, target, False], inputs={"clip": (ck, 1, "CLIP")},
              outputs=[("direction", "ATTNCTL_EDIT_DIRECTION")])
    g.add("AttnCtl_SaveEditDirection", [f"edit_directions/{name}"],
          inputs={"direction": (d, 0, "ATTNCTL_EDIT_DIRECTION")})
    edit = g.add("AttnCtl_Pix2PixZero", [caption, 0.5, 0.1, 1.0, "all", caption],
                 inputs={"model": (ck, 0, "MODEL"), "clip": (ck, 1, "CLIP"), "latent": (inv, 0, "LATENT"),
                         "direction": (d, 0, "ATTNCTL_EDIT_DIRECTION")},
                 outputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                          ("latent", "LATENT")])
    # the paper's baseline: the direction added to the caption, no cross-attention guidance
    cap = g.add("CLIPTextEncode", [caption], inputs={"clip": (ck, 1, "CLIP")},
                outputs=[("CONDITIONING", "CONDITIONING")], title="Caption (for the direction-only baseline)")
    moved = g.add("AttnCtl_AddEditDirection", [0.5], inputs={"conditioning": (cap, 0, "CONDITIONING"),
                                                             "direction": (d, 0, "ATTNCTL_EDIT_DIRECTION")},
                  outputs=[("conditioning", "CONDITIONING")], title="Add Edit Direction (baseline: no guidance)")
    ks = g.add("KSamplerAdvanced", ["disable", 0, "fixed", 20, 5.0, "euler", "normal", 0, 10000, "disable"],
               inputs={"model": (ck, 0, "MODEL"), "positive": (moved, 0, "CONDITIONING"),
                       "negative": (cap, 0, "CONDITIONING"), "latent_image": (inv, 0, "LATENT")},
               outputs=[("LATENT", "LATENT")], title="KSamplerAdvanced (direction only)")
    dec = g.add("VAEDecode", [], inputs={"samples": (ks, 0, "LATENT"), "vae": (ck, 2, "VAE")},
                outputs=[("IMAGE", "IMAGE")])
    g.add("SaveImage", [f"AttnCtl/{name}_direction_only"], inputs={"images": (dec, 0, "IMAGE")})
    return replay_and_save(g, ck, name, edit, inv, cfg=5.0)


NOTE_P2PZERO = (
    "Pix2Pix-Zero (Parmar et al. 2023) edits a real image without naming everything in it. Edit Direction "
    "turns sentences about the source concept and about the target concept into a direction in the text "
    "embedding space (mean of the targets minus mean of the sources). DDIM Inversion (noise regularisation 20, "
    "the paper's) takes the image to noise; Pix2Pix-Zero samples [reference, edit] from it, the edit with the "
    "caption plus the direction, and before every step moves the edit's latent by one gradient step so that its "
    "cross-attention maps stay those of the reference: the edit keeps the image's layout. Replay Source keeps "
    "the reference on the inversion's trajectory; the caption is the negative, as the paper.\n\n"
    "The third image is the paper's baseline, Add Edit Direction alone (the caption plus the direction, no "
    "guidance), sampled from the same inverted noise.\n\n"
    "Try: strength 1 for a stronger edit (more of the image changes colour), guidance 0 to see the direction "
    "alone (the layout drifts), other sentences in source/target, or an empty latent (EmptyLatentImage) with "
    "an empty negative and guidance 0.15 for a generated image. On a real SD checkpoint: source 'cat', target "
    "'dog' with templates on.")


def compare_models(g, name, ck, prompt, models, batch, seed, cfg=6.0):
    """One prompt sampled by each (label, (node, slot)) model from the same seed (20 euler steps, cfg 6),
    each decoded and saved as AttnCtl/<name>_<label>."""
    pos = g.add("CLIPTextEncode", [prompt], inputs={"clip": (ck, 1, "CLIP")}, outputs=[("CONDITIONING", "CONDITIONING")])
    neg = g.add("CLIPTextEncode", [""], inputs={"clip": (ck, 1, "CLIP")}, outputs=[("CONDITIONING", "CONDITIONING")])
    lat = g.add("EmptyLatentImage", [256, 256, batch], outputs=[("LATENT", "LATENT")])
    for label, model in models:
        ks = g.add("KSampler", [seed, "fixed", 20, cfg, "euler", "normal", 1.0],
                   inputs={"model": (*model, "MODEL"), "positive": (pos, 0, "CONDITIONING"),
                           "negative": (neg, 0, "CONDITIONING"), "latent_image": (lat, 0, "LATENT")},
                   outputs=[("LATENT", "LATENT")], title=f"KSampler ({label} model)")
        dec = g.add("VAEDecode", [], inputs={"samples": (ks, 0, "LATENT"), "vae": (ck, 2, "VAE")},
                    outputs=[("IMAGE", "IMAGE")])
        g.add("SaveImage", [f"AttnCtl/{name}_{label}"], inputs={"images": (dec, 0, "IMAGE")})
    return g


def encoded_images(g, ck, images, caption, label="Training image"):
    """LoadImage -> ImageBatch chain -> VAEEncode, and the images' caption -> (latent node, caption node)."""
    batch_img = None
    for i, image in enumerate(images):
        img = g.add("LoadImage", [image, "image"], outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")],
                    title=f"{label} {i + 1}")
        batch_img = img if batch_img is None else g.add(
            "ImageBatch", [], inputs={"image1": (batch_img, 0, "IMAGE"), "image2": (img, 0, "IMAGE")},
            outputs=[("IMAGE", "IMAGE")])
    enc = g.add("VAEEncode", [], inputs={"pixels": (batch_img, 0, "IMAGE"), "vae": (ck, 2, "VAE")},
                outputs=[("LATENT", "LATENT")])
    cap = g.add("CLIPTextEncode", [caption], inputs={"clip": (ck, 1, "CLIP")},
                outputs=[("CONDITIONING", "CONDITIONING")], title=f"Caption of the {label.lower()}s (rare token)")
    return enc, cap


def trained_shifts(g, ck, images, caption, steps, lr, batch, cut_mix=None):
    """The encoded images and their caption -> Train Spectral Shifts (with a Cut-Mix-Unmix node's output)."""
    enc, cap = encoded_images(g, ck, images, caption)
    inputs = {"model": (ck, 0, "MODEL"), "latents": (enc, 0, "LATENT"), "positive": (cap, 0, "CONDITIONING")}
    if cut_mix is not None:
        inputs["cut_mix"] = (cut_mix, 0, "ATTNCTL_CUT_MIX")
    return g.add("AttnCtl_TrainSpectralShifts", [steps, lr, batch, 0], inputs=inputs,
                 outputs=[("MODEL", "MODEL"), ("shifts", "ATTNCTL_SPECTRAL_SHIFTS"), ("loss_map", "LOSS_MAP")])


def cut_mix_unmix(name, images_a, images_b, mix_prompt, prompt, note, steps=60, lr=0.005, batch=4):
    """SVDiff on two subjects: the second subject's images -> Cut-Mix-Unmix -> Train Spectral Shifts on the
    first (with the mixes) -> the two-subject prompt sampled by the plain and the personalised model; the loss
    curves (with the unmix term) by core's Plot Loss Graph."""
    g = Graph()
    g.note(note)
    ck = loader(g)
    enc_b, cap_b = encoded_images(g, ck, images_b, "a zwx", label="Second subject image")
    mix = g.add("AttnCtl_CutMixUnmix", [mix_prompt, "sks", "zwx", 0.5, 1.0],
                inputs={"clip": (ck, 1, "CLIP"), "latents_b": (enc_b, 0, "LATENT"), "positive_b": (cap_b, 0, "CONDITIONING")},
                outputs=[("cut_mix", "ATTNCTL_CUT_MIX")])
    train = trained_shifts(g, ck, images_a, "a sks", steps, lr, batch, cut_mix=mix)
    g.add("LossGraphNode", [f"AttnCtl/{name}_loss"], inputs={"loss": (train, 2, "LOSS_MAP")})
    applied = g.add("AttnCtl_ApplySpectralShifts", [1.0],
                    inputs={"model": (ck, 0, "MODEL"), "shifts": (train, 1, "ATTNCTL_SPECTRAL_SHIFTS")},
                    outputs=[("MODEL", "MODEL")])
    return compare_models(g, name, ck, prompt, (("plain", (ck, 0)), ("personalised", (applied, 0))), batch=4, seed=0)


def svdiff(name, images, caption, prompt, note, steps=60, lr=0.02, batch=4):
    """Train Spectral Shifts on a few images -> Save Spectral Shifts (a file) and Apply Spectral Shifts (the
    trained shifts, scale 1) -> the prompt sampled by the plain and the personalised model (same seed); the loss
    curve by core's Plot Loss Graph."""
    g = Graph()
    g.note(note)
    ck = loader(g)
    train = trained_shifts(g, ck, images, caption, steps, lr, batch)
    g.add("AttnCtl_SaveSpectralShifts", [f"spectral_shifts/{name}"],
          inputs={"shifts": (train, 1, "ATTNCTL_SPECTRAL_SHIFTS")})
    g.add("LossGraphNode", [f"AttnCtl/{name}_loss"], inputs={"loss": (train, 2, "LOSS_MAP")})
    applied = g.add("AttnCtl_ApplySpectralShifts", [1.0],
                    inputs={"model": (ck, 0, "MODEL"), "shifts": (train, 1, "ATTNCTL_SPECTRAL_SHIFTS")},
                    outputs=[("MODEL", "MODEL")])
    return compare_models(g, name, ck, prompt, (("plain", (ck, 0)), ("personalised", (applied, 0))), batch=4, seed=0)


def expert_denoisers(name, images, caption, prompt, note, switch=0.5, steps=60, lr=0.02, batch=4):
    """Two experts from one checkpoint (the plain model and a personalised one, SVDiff trained here) -> Expert
    Denoisers both ways round at `switch` -> the prompt sampled by each expert alone and by both pairs (same
    seed, one KSampler each)."""
    g = Graph()
    g.note(note)
    ck = loader(g)
    train = trained_shifts(g, ck, images, caption, steps, lr, batch)
    pers = g.add("AttnCtl_ApplySpectralShifts", [1.0],
                 inputs={"model": (ck, 0, "MODEL"), "shifts": (train, 1, "ATTNCTL_SPECTRAL_SHIFTS")},
                 outputs=[("MODEL", "MODEL")], title="Personalised expert (spectral shifts)")
    a = g.add("AttnCtl_ExpertDenoisers", [switch], inputs={"model": (ck, 0, "MODEL"), "model_2": (pers, 0, "MODEL")},
              outputs=[("model", "MODEL")], title=f"Expert Denoisers (plain, then personalised from {switch:g})")
    b = g.add("AttnCtl_ExpertDenoisers", [switch], inputs={"model": (pers, 0, "MODEL"), "model_2": (ck, 0, "MODEL")},
              outputs=[("model", "MODEL")], title=f"Expert Denoisers (personalised, then plain from {switch:g})")
    return compare_models(g, name, ck, prompt, (("plain", (ck, 0)), ("personalised", (pers, 0)),
                                                 ("plain_then_personalised", (a, 0)),
                                                 ("personalised_then_plain", (b, 0))), batch=2, seed=0)


def sketch_guidance(name, images, sketch, caption, prompt, note, steps=60, lr=0.002, batch=8, load=None, cfg=6.0,
                    strength=1.6):
    """Train Sketch Predictor on shapes-world scenes (LoadImage -> ImageBatch chain, one caption, Sobel edges) ->
    Save Sketch Predictor and Sketch Guidance with a drawn outline -> the prompt sampled by the plain and the
    guided model (same seed); the loss curve by core's Plot Loss Graph."""
    g = Graph()
    g.note(note)
    ck = (load or loader)(g)
    batch_img = None
    for i, image in enumerate(images):
        img = g.add("LoadImage", [image, "image"], outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")],
                    title=f"Training image {i + 1}")
        batch_img = img if batch_img is None else g.add(
            "ImageBatch", [], inputs={"image1": (batch_img, 0, "IMAGE"), "image2": (img, 0, "IMAGE")},
            outputs=[("IMAGE", "IMAGE")])
    cap = g.add("CLIPTextEncode", [caption], inputs={"clip": (ck, 1, "CLIP")},
                outputs=[("CONDITIONING", "CONDITIONING")], title="Caption of the training images")
    train = g.add("AttnCtl_TrainSketchPredictor", [steps, lr, batch, 0, "auto"],
                  inputs={"model": (ck, 0, "MODEL"), "vae": (ck, 2, "VAE"), "images": (batch_img, 0, "IMAGE"),
                          "positive": (cap, 0, "CONDITIONING")},
                  outputs=[("predictor", "ATTNCTL_SKETCH_PREDICTOR"), ("loss_map", "LOSS_MAP"), ("edges", "IMAGE")])
    g.add("AttnCtl_SaveSketchPredictor", [f"sketch_predictors/{name}"],
          inputs={"predictor": (train, 0, "ATTNCTL_SKETCH_PREDICTOR")})
    g.add("LossGraphNode", [f"AttnCtl/{name}_loss"], inputs={"loss": (train, 1, "LOSS_MAP")})
    sk = g.add("LoadImage", [sketch, "image"], outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")], title="Sketch")
    guided = g.add("AttnCtl_SketchGuidance", [strength, 0.0, 0.5, "auto"],
                   inputs={"model": (ck, 0, "MODEL"), "predictor": (train, 0, "ATTNCTL_SKETCH_PREDICTOR"),
                           "sketch": (sk, 0, "IMAGE")},
                   outputs=[("model", "MODEL")])
    return compare_models(g, name, ck, prompt, (("plain", (ck, 0)), ("guided", (guided, 0))), batch=4, seed=3,
                          cfg=cfg)


def sample_and_save(g, name, ck, model, positive, negative, latent, seed=42, cfg=6.0):
    """KSampler (seed 42, 20 euler steps, cfg 6) -> VAEDecode -> SaveImage; inputs are (node, slot)."""
    ks = g.add("KSampler", [seed, "fixed", 20, cfg, "euler", "normal", 1.0],
               inputs={"model": (*model, "MODEL"), "positive": (*positive, "CONDITIONING"),
                       "negative": (*negative, "CONDITIONING"), "latent_image": (*latent, "LATENT")},
               outputs=[("LATENT", "LATENT")])
    dec = g.add("VAEDecode", [], inputs={"samples": (ks, 0, "LATENT"), "vae": (ck, 2, "VAE")},
                outputs=[("IMAGE", "IMAGE")])
    g.add("SaveImage", [f"AttnCtl/{name}"], inputs={"images": (dec, 0, "IMAGE")})
    return g


NOTE_P2P_DIT = (
    "Prompt-to-Prompt on a DiT (joint attention). One batch [source, target] from one noise: during the first "
    "cross_replace of the steps the target's image-query x text-key attention is the source's (mapped word to "
    "word), and during the first self_replace its image-to-image block is the source's, so the target keeps the "
    "source's layout and only the swapped word changes.\n\n"
    "Try: another colour or shape in target_prompts (one target per line); mode refine (add words) or reweight "
    "('blue: 3'); cross_replace 0.8 and self_replace 0.4 are the defaults (self 0 keeps less of the layout, "
    "0.8 more); blend_source_words / blend_target_words 'red circle' / 'green circle' to keep every pixel "
    "outside the circle. The shapes-world DiT is a Flux-class model: cfg 5.")

NOTE_REAL_DIT = (
    "A real image edited on a rectified-flow DiT. Flow Inversion integrates the model's ODE backwards from the "
    "encoded image to the noise that regenerates it; Prompt-to-Prompt builds [source, target] on the inverted "
    "latent; Replay Source keeps item 0 on the inversion's trajectory (it comes back as the image itself) so the "
    "target takes the real image's attention; SamplerCustomAdvanced starts from the inversion's noise output "
    "with euler and the inversion's steps and scheduler (KSamplerAdvanced with add_noise off cannot start a "
    "flow model from a latent). CFG 2.5: the inversion ran at CFG 1, and a low CFG keeps the edit close to the "
    "image (on the shapes-world DiT the colour swap takes in 7 of 7 images at 2.5 but 64% at 5; "
    "tests/test_semantic_dit.py).\n\n"
    "Try: your own image (LoadImage, 256x256 for the shapes-world DiT) with its caption in both the CLIPTextEncode "
    "and source_prompt; another colour in target_prompts; Flow Inversion gamma 0.5 (RF-Inversion's controlled "
    "inversion: more editable, less exact); an AttnCtl_RFInversionGuidance node after Replay Source (eta 0.9, "
    "steps 0-5) to pull the edit toward the image; more steps (both nodes) for a closer reconstruction.")

NOTE_WAN = (
    "Video-P2P on Wan 2.1 text-to-video: the Prompt-to-Prompt node on a video latent makes a [source, target] "
    "batch of two videos from one noise and applies the same attention edit to every frame (the DiT's joint "
    "attention over all frames' tokens), so the edited object changes in every frame and the rest stays.\n\n"
    "Needs Wan 2.1 t2v 1.3B: wan2.1_t2v_1.3B_fp16.safetensors in models/diffusion_models, "
    "umt5_xxl_fp8_e4m3fn_scaled.safetensors in models/text_encoders, wan_2.1_vae.safetensors in models/vae "
    "(make demo MODELS=<a ComfyUI models folder> runs it; without them the demo skips it).\n\n"
    "Try: another colour or object in target_prompts; self_replace 0.2-0.6 (how much of the motion and layout is "
    "kept); fewer frames (length 17) or 480x320 for a quick look; blend words to keep the background pixel for "
    "pixel.")

NOTE_TIME = (
    "TIME (Orgad et al. 2023) edits what the model assumes when a prompt leaves something out: Edit Assumption "
    "changes the K and V projections of every cross-attention in closed form (a weight patch, like a LoRA; "
    "strength 0 is the model unchanged) so that the source prompt's words project like the destination's. The "
    "same prompt and seed are sampled by the plain and the edited model; Save Assumption Edit writes the edit to "
    "output/attention_edits/ for Load Assumption Edit.\n\n"
    "On a real SD1.5 checkpoint (make demo CKPT=...): source 'a pack of roses', destination 'a pack of blue "
    "roses', prompt 'a pack of roses' (or 'roses in a vase': the edit generalises to related prompts; "
    "'a pack of red roses' stays red). On the shipped shapes-world model the edit moves the model to what the "
    "destination's aligned embeddings draw, but its random 4-layer text encoder keeps a colour inside its own "
    "token, which TIME's alignment skips, so no red appears there (README, measured figures).\n\n"
    "Try: several pairs, one per line; lambda 1 for a smaller, more specific edit; strength 0.5 for half the "
    "edit; augment off to edit the bare prompts only.")

NOTE_SVDIFF = (
    "SVDiff (Han et al. 2023) personalises a model on a few images by training only a shift of the singular "
    "values of every weight matrix: Train Spectral Shifts learns them from four images of a green square "
    "captioned with the rare token 'a sks' (60 steps, batch 4, lr 0.02: about a minute on a CPU for the "
    "shapes-world model; a real SD1.5 subject wants the paper's 1e-3 and 500-1000 steps). Save Spectral Shifts "
    "writes them to output/spectral_shifts/ (Load Spectral Shifts lists that file in your next runs); Apply "
    "Spectral Shifts puts the trained shifts on the model at a scale, as core's Load LoRA Model applies a "
    "trained LoRA. The same prompt and seed are sampled by the plain and the personalised model; Plot Loss Graph "
    "draws the training loss.\n\n"
    "Try: your own images (4-8, one subject, same size) with 'a photo of sks <class>'; scale 0.5-1.5 on Apply "
    "Spectral Shifts; a prompt without the token to see the rest of the model kept; the Cut-Mix-Unmix node on "
    "cut_mix to train two subjects that one prompt can name.")

NOTE_SKETCH = (
    "Sketch-guided text-to-image (Voynov et al. 2022). Train Sketch Predictor learns, from a few images of the "
    "kind you generate, a small per-pixel MLP that reads the frozen model's self-attention features of a "
    "noised latent and predicts its edge map (edges by a Sobel filter here). Sketch Guidance then pulls every step of "
    "the first half of the schedule toward latents whose predicted edges match the drawn outline (a gradient "
    "step scaled to the step's own size). The two KSamplers sample the same prompt and seed, plain and guided.\n\n"
    "Strength 0.8 on the UNet here (its thick outline; edge IoU with the sketch 0.39 vs 0.13 plain over these 4 "
    "seeds), 1.6 (the paper's) on the DiT (0.45 vs 0.14).\n\n"
    "Try: your own sketch (dark lines on white, at the image size); strength 0.5-4; end 0.3-0.8; more training "
    "images and steps for a real model; Save / Load Sketch Predictor to reuse it.")

NOTE_SEGMENT = (
    "Word segmentation of a real image with the model's own attention (DAAM on a real image, refined by "
    "self-attention propagation as training-free diffusion segmenters do). Segment Words encodes the image, "
    "noises it a little (noise_level 0.1), reads each word's cross-attention in one model call and propagates "
    "the maps through the finest self-attention layers in a second: one mask per word. The second Segment Words "
    "gives the circle's mask alone, and Set Latent Noise Mask repaints only there with 'a green circle'.\n\n"
    "On the shapes world the masks reach IoU 0.90 with the true objects (raw cross-attention thresholded: 0.46). "
    "Try: refine 0 (raw maps), soft masks, more samples on real photographs, a phrase ('blue square') as one "
    "word; feed the masks to Region Prompt, Paint with Words (mask_phrases in the words' order) or MasaCtrl.")

NOTE_SEGMENT_DIT = (
    "Segment Words on the shapes-world DiT (a Flux-class model): the same node, the word maps read from joint "
    "attention (the image queries' share of the softmax on each word's text keys) and refined through the "
    "image-query x image-key part of every block. Shapes-world mask IoU 0.84 (raw cross-attention 0.71).\n\n"
    "Try: refine 2-3, refine_layers single (the single-stream blocks), soft masks. (No inpainting here: the shapes-world DiT erases a noise-masked region instead of "
    "repainting it; the UNet example `segment_words` inpaints.)")

NOTE_PROMPT_SWITCH = (
    "eDiff-I's prompt switching. The noisy early steps fix the layout, the later ones the details: Prompt "
    "Switching gives 'a red circle' the first 30 % of the schedule and 'a blue circle' the rest, in one "
    "CONDITIONING built on core's timestep ranges (any sampler). The three KSamplers share the seed: the switched "
    "images keep the red prompt's layout (object mask IoU 0.59 with it, against 0.26 for the blue prompt alone) "
    "and are blue (12 of 12 in the test).\n\n"
    "Try: switch at 0.1 (less of the first layout kept: IoU 0.32) or 0.6 (0.81); more lines (0.0-0.2 / 0.2-0.5 / "
    "0.5-1.0); a shape word instead of the colour.")

NOTE_SKETCH_DIT = NOTE_SKETCH.replace("Sketch-guided text-to-image (Voynov et al. 2022).",
                                      "Sketch-guided text-to-image (Voynov et al. 2022) on a DiT (the shapes-world "
                                      "Flux-class model: the values of the image tokens of four blocks, cfg 5).")

# the Note of each example built without one (what the technique does, which inputs to try)
NOTE_NULL_TEXT = (
    "Null-text inversion (Mokady et al. 2022): DDIM inversion alone gives the image back only at CFG 1. Null-Text "
    "Inversion inverts the image, then for each step optimises the empty negative prompt so that sampling at cfg "
    "7.5 lands on the inversion's trajectory; its per-step negative goes to the sampler. Prompt-to-Prompt swaps "
    "'red' for 'green' in the caption and Replay Source keeps the source on the trajectory, so the edit keeps "
    "the rest of the image at a real CFG scale.\n\n"
    "Measured (help page): the CFG reconstruction error falls from 75 % of the latent's norm (DDIM inversion) to "
    "33 %. Try: iterations 0 (plain DDIM inversion: the drift comes back), another cfg (sample with the same), "
    "another target word.")

NOTE_RF_INVERSION = (
    "RF-Inversion (Rout et al. 2024) edits a real image with a rectified-flow model by a prompt alone, no "
    "attention edit: Flow Inversion with gamma 0.5 runs the controlled forward ODE (pulled toward one noise), "
    "RF-Inversion Guidance pulls every prediction of the first quarter of the steps toward the image (eta 0.9), "
    "and the later steps follow the target prompt.\n\n"
    "Try: eta between 0.5 and 1 (1 gives the image back), stop_step (later = more of the image), gamma 0 "
    "(plain inversion), or Prompt-to-Prompt on the same inversion (the example real_image_edit_dit).")

NOTE_EXPERTS = (
    "Expert denoisers (eDiff-I, Balaji et al. 2022): the noisy first part of the schedule fixes what is drawn "
    "and the rest refines it, so each part can have its own denoiser (Wan 2.2's high- and low-noise models, "
    "SDXL's refiner). Expert Denoisers sends the steps before `switch` to `model` and the rest to `model_2` in "
    "one sampler run. Here both experts come from the one shipped checkpoint: the plain model and a "
    "personalised copy (SVDiff spectral shifts trained on four green squares captioned 'a sks'). 'a sks' is "
    "sampled from one seed by each expert alone and by both pairs: the early expert sets the layout (where the "
    "object is and how large), the late one changes its finish (the personalised expert turns the plain "
    "model's blob into its green square's colour).\n\n"
    "Try: switch 0.2 or 0.8, a multistep sampler (dpmpp_2m: its history carries across the switch), on Wan "
    "2.2 the high-noise model as `model` and the low-noise one as `model_2`.")

NOTE_CUT_MIX = (
    "Cut-Mix-Unmix (SVDiff, Han et al. 2023): personalising on two subjects at once. Train Spectral Shifts learns "
    "'a sks' (green squares) from its images and, through Cut-Mix-Unmix, mixes: the left half of a sks latent "
    "joined to the right half of a zwx latent (red circles), captioned with the mix prompt, with the unmix term "
    "keeping each token's cross-attention on its own half. The two-subject prompt is sampled by the plain and "
    "the personalised model; the loss graph shows the unmix curve.\n\n"
    "Measured (help page): the unmix term on the mixes fell from 0.39 to 0.18 at weight 1 (it rose at weight 0); "
    "with this budget the two-subject prompt does not yet draw both subjects more often than joint training "
    "without mixes: here the personalised model draws green squares and no red circle yet (lr 0.005: at 0.02, "
    "SVDiff's one-subject rate, the mixes degrade the images). Try: more steps, mix_fraction, unmix_weight 0 "
    "(Cut-Mix alone), a real SD checkpoint with photos of two subjects.")

NOTES = {
    "capture_attention": (
        "DAAM-style attention maps: Capture Attention Maps patches the MODEL so that sampling records how much the "
        "image attends to each word (cross-attention after softmax, summed over layers, heads and steps). Attention "
        "Heat Map draws one map per word over the decoded image and gives masks.\n\n"
        "Try: other words of the prompt (a phrase such as 'red circle' sums its tokens), layers 'up' or '16', "
        "start/end_percent to see when a word takes its place, keep_per_step with per_step for one map per step."),
    "capture_attention_dit": (
        "Attention maps on a DiT (the shapes-world Flux-class model): the same nodes read the image queries' share "
        "of the joint-attention softmax on each word's text keys.\n\nTry: layers 'double' or 'single', a phrase "
        "as one word, keep_per_step."),
    "collage_layers": (
        "Collage Diffusion: RGBA layers (a background, a red disc with its mask) are composited, and each layer's "
        "region is noised by its own strength and bound to its prompt through cross-attention, so the result keeps "
        "the collage's layout and harmonises it.\n\nTry: a layer's strength (0 = kept as pasted, 1 = redrawn), "
        "the harmony strength of Collage Layers, your own images with alpha (LoadImage's MASK)."),
    "inversion_p2p_edit": (
        "A real image edited with Prompt-to-Prompt: DDIM Inversion takes the shipped image up to noise along the "
        "deterministic path, Prompt-to-Prompt swaps 'red' for 'green' in the caption, and Replay Source makes the "
        "source half of the batch follow the inversion exactly, so the edit keeps everything but the circle.\n\n"
        "Try: another target word, more inversion steps (sample with the same steps), Null-Text Inversion for "
        "higher CFG."),
    "layout_guidance": (
        "Layout guidance (Chen et al., backward mode): during the first steps the latent is moved by the gradient of "
        "an energy that asks the phrase's cross-attention to lie inside its box. Draw or move the box in the Boxes "
        "editor; its phrase must be in the prompt.\n\nMeasured on the shapes world: the object's centre lands in the "
        "box in 81-88 % of seeds vs 25 % unguided. Try: mode forward (no gradients, cheaper), strength, the number "
        "of guided steps, two boxes with two phrases."),
    "masactrl": (
        "MasaCtrl: the target image is sampled with the source's self-attention keys and values from a chosen step "
        "and layer on, so it takes the source's appearance and keeps its own layout or pose ('on the left' -> 'on "
        "the right').\n\nTry: start_step and start_layer (later = more of the target's own structure), a word mask "
        "(mask words) so foreground and background attend apart."),
    "p2p_replace": (
        "Prompt-to-Prompt word swap: the source prompt and each target prompt (one per line) are sampled from the "
        "same noise; for the first part of the steps the targets use the source's cross-attention maps, so the "
        "layout stays and only the swapped word changes.\n\nTry: cross_replace (the fraction of steps with the "
        "source's maps), self_replace, other colour or shape words."),
    "null_text_edit": NOTE_NULL_TEXT,
    "p2p_refine": (
        "Prompt-to-Prompt refine: the target adds words ('and a blue square'); the words both prompts share keep "
        "the source's attention, the new ones attend freely, so the red circle stays and a square appears.\n\n"
        "Try: cross_replace, adding a position word."),
    "p2p_reweight": (
        "Prompt-to-Prompt reweight: one word's cross-attention is scaled ('blue: 3'), which strengthens (or with a "
        "factor below 1 weakens) what it describes while the rest stays.\n\nTry: factors 0.5, 2, 5; two words."),
    "p2p_local_blend": (
        "Prompt-to-Prompt with local blending: the swap (red -> yellow) is confined to where the blended words "
        "attend; elsewhere the target's latent is the source's at every step, so the square is untouched.\n\n"
        "Try: the blend threshold, blending on the shape word only."),
    "paint_with_words": (
        "Paint with words (eDiff-I): each box's phrase gets extra cross-attention inside its box, weighted by "
        "w' log(1 + sigma) max(QK^T), so the phrase is painted where it was drawn. Boxes to Mask saves "
        "the boxes as masks beside the result.\n\nTry: the weight, moving the boxes, masks instead of boxes (mask_phrases in mask order), the mode."),
    "region_prompts": (
        "Region prompts: each box gets its own prompt; in cross-attention every pixel attends to its region's prompt "
        "(attention-couple style, one forward), with a background prompt for the rest.\n\nMeasured on the shapes "
        "world: each colour lands in its region in most seeds, far above the plain prompt. Try: the boxes, the "
        "bootstrap fraction (early steps with the whole prompt), masks instead of boxes."),
    "region_prompts_dit": (
        "Region prompts on a DiT (the shapes-world Flux-class model): joint attention is masked so that each "
        "region's image tokens see their own prompt's tokens.\n\nTry: the boxes, the image attention setting of "
        "Region Conditioning."),
    "tiled_diffusion": (
        "Tiled sampling (Mixture of Diffusers here; MultiDiffusion and DiffCollage on the same node): a 768x256 "
        "panorama from 256-pixel tiles denoised at every step and blended, wrapping around horizontally for a "
        "seamless 360 strip.\n\nTry: merge multidiffusion, tile overlap, wrap off, a per-tile prompt."),
    "tiled_multidiffusion": (
        "MultiDiffusion (Bar-Tal et al. 2023): a 768x256 panorama from 256-pixel tiles (128 px overlap); at every "
        "step each tile is denoised on its own and the canvas takes the plain average of the tiles over each "
        "pixel, the paper's closed-form solution.\n\nMeasured on the shapes world (help page): the colour change "
        "across tile borders is 1.80x that across other columns (visible bands where tiles disagree) vs 0.80x with "
        "merge mixture. Try: merge mixture (the tiled_diffusion example), more overlap, wrap on for a 360 strip."),
    "tiled_diffcollage": (
        "DiffCollage (Zhang et al. 2023): the same 768x256 canvas as a chain of overlapping 256-pixel tiles, merged "
        "as a factor graph: the sum of the tiles' predictions minus those of their overlaps, so each overlap is "
        "counted once.\n\nTry: merge multidiffusion or mixture on the same seed, the overlap, wrap on (a cycle "
        "of tiles)."),
}


WORKFLOWS = {
    "null_text_edit": lambda: null_text_edit("null_text_edit", "attnctl_shapes_example.png",
                                             "a blue square and a red circle", "a blue square and a green circle"),
    "rf_inversion_dit": lambda: rf_inversion("rf_inversion_dit", "attnctl_shapes_example.png",
                                             "a blue square and a red circle", "a blue square and a green circle",
                                             note=NOTE_RF_INVERSION),
    "cut_mix_unmix": lambda: cut_mix_unmix("cut_mix_unmix", [f"attnctl_svdiff_sks_{i}.png" for i in range(1, 5)],
                                           [f"attnctl_svdiff_zwx_{i}.png" for i in range(1, 5)],
                                           "a sks on the left and a zwx on the right",
                                           "a sks on the left and a zwx on the right", NOTE_CUT_MIX),
    "expert_denoisers": lambda: expert_denoisers("expert_denoisers",
                                                 [f"attnctl_svdiff_sks_{i}.png" for i in range(1, 5)], "a sks",
                                                 "a sks", NOTE_EXPERTS),
    "pix2pix_zero_real": lambda: pix2pix_zero_real("pix2pix_zero_real", "attnctl_p2pzero_example.png",
                                                   "a red circle and a green square", colour_sentences("red"),
                                                   colour_sentences("blue"), NOTE_P2PZERO),
    "sketch_guidance": lambda: sketch_guidance("sketch_guidance", [f"attnctl_sketch_train_{i}.png" for i in range(1, 9)],
                                               "attnctl_sketch_outline.png", "a shape", "a red square", NOTE_SKETCH,
                                               strength=0.8),
    "segment_words": lambda: segment_words("segment_words", "attnctl_shapes_example.png",
                                           "a blue square and a red circle", "circle, square, blue, red",
                                           "a blue square and a green circle", NOTE_SEGMENT),
    "segment_words_dit": lambda: segment_words("segment_words_dit", "attnctl_shapes_example.png",
                                               "a blue square and a red circle", "circle, square, blue, red",
                                               None, NOTE_SEGMENT_DIT, load=dit_loader),
    "prompt_switching": lambda: prompt_switching("prompt_switching", "a red circle", "a blue circle", 0.3,
                                                 NOTE_PROMPT_SWITCH),
    "sketch_guidance_dit": lambda: sketch_guidance(
        "sketch_guidance_dit", [f"attnctl_sketch_train_{i}.png" for i in range(1, 9)], "attnctl_sketch_outline.png",
        "a shape", "a red square", NOTE_SKETCH_DIT, load=dit_loader, cfg=5.0),
    "svdiff_personalise": lambda: svdiff("svdiff_personalise", [f"attnctl_svdiff_sks_{i}.png" for i in range(1, 5)],
                                         "a sks", "a sks", NOTE_SVDIFF),
    "time_edit": lambda: time_edit("time_edit", "a circle", "a red circle", "a circle", NOTE_TIME),
    "p2p_dit": lambda: p2p("p2p_dit", "a red circle and a blue square", "a green circle and a blue square",
                           "replace", load=dit_loader, cfg=5.0, seed=5, note=NOTE_P2P_DIT,
                           title="Prompt-to-Prompt (joint attention)"),
    "real_image_edit_dit": lambda: flow_inversion_edit("real_image_edit_dit", "attnctl_shapes_example.png",
                                                       "a blue square and a red circle",
                                                       "a blue square and a green circle", cfg=2.5,
                                                       note=NOTE_REAL_DIT),
    "video_p2p_wan": lambda: video_p2p_wan("video_p2p_wan",
                                           "a red car driving along a coastal road, sunny day, cinematic",
                                           "a blue car driving along a coastal road, sunny day, cinematic",
                                           note=NOTE_WAN),
    "capture_attention": lambda: capture("capture_attention", "a red circle and a blue square",
                                         "red, blue, circle, square"),
    "capture_attention_dit": lambda: capture("capture_attention_dit", "a red circle and a blue square",
                                             "red, blue, circle, square", load=dit_loader, cfg=5.0),
    "region_prompts_dit": lambda: region_prompts("region_prompts_dit",
                                                 "a red circle: 0.05,0.2,0.45,0.8\na blue square: 0.55,0.2,0.95,0.8",
                                                 background="a red circle and a blue square", load=dit_loader,
                                                 bootstrap=0.0, seed=33, cfg=5.0),
    "region_prompts": lambda: region_prompts("region_prompts",
                                             "a red circle: 0.05,0.2,0.45,0.8\na blue square: 0.55,0.2,0.95,0.8",
                                             background="a red circle and a blue square"),
    "collage_layers": lambda: collage("collage_layers", [("attnctl_collage_background.png", "", 0.8),
                                                         ("attnctl_collage_red_circle.png", "a red circle", 0.5),
                                                         ("attnctl_collage_blue_square.png", "a blue square", 0.7)]),
    "paint_with_words": lambda: paint_with_words("paint_with_words", "a red circle and a blue square",
                                                 "red circle: 0.0,0.0,0.5,0.5\nblue square: 0.5,0.5,1.0,1.0"),
    "tiled_diffusion": lambda: tiled_diffusion("tiled_diffusion", wrap=True),
    "tiled_multidiffusion": lambda: tiled_diffusion("tiled_multidiffusion", merge="multidiffusion"),
    "tiled_diffcollage": lambda: tiled_diffusion("tiled_diffcollage", merge="diffcollage"),
    "masactrl": lambda: masactrl("masactrl", "a red circle on the left", "a red circle on the right"),
    "inversion_p2p_edit": lambda: inversion_edit("inversion_p2p_edit", "attnctl_shapes_example.png",
                                                 "a blue square and a red circle",
                                                 "a blue square and a green circle"),
    "layout_guidance": lambda: layout("layout_guidance", "a red circle", "red circle: 0.0,0.0,0.5,0.5"),
    "p2p_replace": lambda: p2p("p2p_replace", "a red circle and a blue square",
                               "a green circle and a blue square\na yellow circle and a blue square", "replace"),
    "p2p_refine": lambda: p2p("p2p_refine", "a red circle", "a red circle and a blue square", "refine"),
    "p2p_reweight": lambda: p2p("p2p_reweight", "a red circle and a blue square", "", "reweight",
                                reweight="blue: 3"),
    "p2p_local_blend": lambda: p2p("p2p_local_blend", "a red circle and a blue square",
                                   "a yellow circle and a blue square", "replace", blend_src="red circle",
                                   blend_tgt="yellow circle"),
}


def collage_inputs(out_dir):
    """The RGBA layer PNGs of the collage example (256x256): a light grey background, a red circle and
    a blue square on transparent layers."""
    import numpy as np
    from PIL import Image
    n = 256
    yy, xx = np.mgrid[0:n, 0:n] + 0.5
    bg = np.zeros((n, n, 4), np.uint8)
    bg[...] = (225, 225, 225, 255)
    disc = (xx - 80) ** 2 + (yy - 96) ** 2 <= 48 ** 2
    red = np.zeros((n, n, 4), np.uint8)
    red[disc] = (230, 26, 26, 255)
    sq = (np.abs(xx - 176) <= 40) & (np.abs(yy - 168) <= 40)
    blue = np.zeros((n, n, 4), np.uint8)
    blue[sq] = (26, 51, 230, 255)
    for name, a in (("background", bg), ("red_circle", red), ("blue_square", blue)):
        Image.fromarray(a, "RGBA").save(os.path.join(out_dir, f"attnctl_collage_{name}.png"))


def svdiff_inputs(out_dir, n=4, seed=0, token="sks", shape="square", colour="green"):
    """The SVDiff examples' training images (256x256 RGB): one green square each (the second subject of
    Cut-Mix-Unmix: a red circle; random size, place and light background), drawn on the shapes world's 32x32
    grid and scaled by 8, as its VAE pools 8x8."""
    import numpy as np
    from PIL import Image

    from shapesworld import data as D
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = np.full((32, 32, 3), rng.uniform(0.80, 0.97), np.float32)
        size = rng.uniform(10, 15)
        h = size / 2
        img[D.shape_mask(shape, rng.uniform(h, 32 - h), rng.uniform(h, 32 - h), size)] = D.PALETTE[colour]
        big = np.kron(img, np.ones((8, 8, 1), np.float32))
        Image.fromarray((big * 255).round().astype(np.uint8)).save(
            os.path.join(out_dir, f"attnctl_svdiff_{token}_{i + 1}.png"), optimize=True)


def sketch_inputs(out_dir, n=8, seed=0):
    """The sketch example's inputs (256x256 RGB, the shapes world's 32x32 grid scaled by 8): n training scenes of
    the shapes-world generator, and the outline of a square (dark lines on white) to follow."""
    import numpy as np
    from PIL import Image

    from shapesworld import data as D
    imgs, _caps, _objs = D.sample_batch(np.random.default_rng(seed), n)
    up = lambda a: np.kron(a, np.ones((8, 8, 1), np.float32))
    for i in range(n):
        Image.fromarray((up(imgs[i].transpose(1, 2, 0)) * 255).round().astype(np.uint8)).save(
            os.path.join(out_dir, f"attnctl_sketch_train_{i + 1}.png"), optimize=True)
    m = D.shape_mask("square", 12.0, 12.0, 14.0)
    inner = m.copy()
    inner[1:] &= m[:-1]
    inner[:-1] &= m[1:]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    sk = np.ones((32, 32, 3), np.float32)
    sk[m & ~inner] = 0.0
    Image.fromarray((up(sk) * 255).round().astype(np.uint8)).save(os.path.join(out_dir, "attnctl_sketch_outline.png"),
                                                                  optimize=True)


def p2pzero_inputs(out_dir):
    """The Pix2Pix-Zero example's real image (256x256 RGB): a red circle and a green square drawn on the shapes
    world's 32x32 grid (not by a model), scaled by 8."""
    import numpy as np
    from PIL import Image

    from shapesworld import data as D
    img = np.full((32, 32, 3), 0.88, np.float32)
    img[D.shape_mask("circle", 10.0, 11.0, 12.0)] = D.PALETTE["red"]
    img[D.shape_mask("square", 22.5, 21.5, 11.0)] = D.PALETTE["green"]
    big = np.kron(img, np.ones((8, 8, 1), np.float32))
    Image.fromarray((big * 255).round().astype(np.uint8)).save(os.path.join(out_dir, "attnctl_p2pzero_example.png"),
                                                               optimize=True)


# examples the demo cannot run without model files the pack does not ship: a text card as their thumbnail
CARD_THUMBNAILS = {
    "video_p2p_wan": ["Video-P2P on Wan 2.1 t2v 1.3B", "source video + edited video (every frame)",
                      "needs Wan 2.1 weights: make demo MODELS=<dir>"],
}


def card_thumbnail(dest, lines, size=(480, 160)):
    """A JPEG text card (dark, like the demo's thumbnail strips)."""
    from PIL import Image, ImageDraw

    from devtools.demo import _font
    im = Image.new("RGB", size, (24, 24, 24))
    draw = ImageDraw.Draw(im)
    font = _font(18)
    for i, line in enumerate(lines):
        draw.text((16, 28 + 38 * i), line, fill=(235, 235, 235) if i == 0 else (170, 170, 170), font=font)
    im.save(dest, "JPEG", quality=85, optimize=True)
    return dest


def main():
    out_dir = os.path.join(REPO, "example_workflows")
    collage_inputs(os.path.join(out_dir, "input"))
    svdiff_inputs(os.path.join(out_dir, "input"))
    svdiff_inputs(os.path.join(out_dir, "input"), seed=1, token="zwx", shape="circle", colour="red")
    p2pzero_inputs(os.path.join(out_dir, "input"))
    sketch_inputs(os.path.join(out_dir, "input"))
    for name, build in WORKFLOWS.items():
        g = build()
        if name in NOTES and not any(n["type"] == "Note" for n in g.nodes):
            g.note(NOTES[name])
        g.dump(os.path.join(out_dir, f"{name}.json"))
    for name, lines in CARD_THUMBNAILS.items():
        card_thumbnail(os.path.join(out_dir, f"{name}.jpg"), lines)


if __name__ == "__main__":
    main()
