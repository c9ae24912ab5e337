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

    def dump(self, path):
        name = os.path.splitext(os.path.basename(path))[0]
        # the front end validates workflow ids as UUIDs: a stable one per example
        wf = {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, "attention-control/" + name)), "revision": 0,
              "last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
              "links": self.links, "groups": [], "config": {}, "extra": {}, "version": 0.4}
        with open(path, "w") as f:
            json.dump(wf, f, indent=1)
            f.write("\n")


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


def p2p(name, source, targets, mode, reweight="", blend_src="", blend_tgt=""):
    g = Graph()
    ck = loader(g)
    lat = g.add("EmptyLatentImage", [256, 256, 1], outputs=[("LATENT", "LATENT")])
    edit = g.add("AttnCtl_PromptToPrompt",
                 [source, targets, mode, reweight, 0.8, "", 0.4, blend_src, blend_tgt, 0.3, 0.0, ""],
                 inputs={"model": (ck, 0, "MODEL"), "clip": (ck, 1, "CLIP"), "latent": (lat, 0, "LATENT")},
                 outputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                          ("latent", "LATENT")])
    return sample_and_save(g, name, ck, (edit, 0), (edit, 1), (edit, 2), (edit, 3))


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


def inversion_edit(name, image, source, target):
    """A real image edited with Prompt-to-Prompt: VAEEncode -> DDIM inversion -> edit -> source replay ->
    KSamplerAdvanced with add_noise disabled and the inversion's steps and scheduler."""
    g = Graph()
    ck = loader(g)
    img = g.add("LoadImage", [image, "image"], outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")])
    enc = g.add("VAEEncode", [], inputs={"pixels": (img, 0, "IMAGE"), "vae": (ck, 2, "VAE")},
                outputs=[("LATENT", "LATENT")])
    pos = g.add("CLIPTextEncode", [source], inputs={"clip": (ck, 1, "CLIP")},
                outputs=[("CONDITIONING", "CONDITIONING")])
    inv = g.add("AttnCtl_DDIMInversion", [20, "normal"],
                inputs={"model": (ck, 0, "MODEL"), "positive": (pos, 0, "CONDITIONING"), "latent": (enc, 0, "LATENT")},
                outputs=[("latent", "LATENT"), ("trajectory", "TRAJECTORY")])
    edit = g.add("AttnCtl_PromptToPrompt",
                 [source, target, "replace", "", 0.8, "", 0.4, "", "", 0.3, 0.0, ""],
                 inputs={"model": (ck, 0, "MODEL"), "clip": (ck, 1, "CLIP"), "latent": (inv, 0, "LATENT")},
                 outputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                          ("latent", "LATENT")])
    rep = g.add("AttnCtl_ReplaySource", [], inputs={"model": (edit, 0, "MODEL"), "trajectory": (inv, 1, "TRAJECTORY")},
                outputs=[("model", "MODEL")])
    ks = g.add("KSamplerAdvanced", ["disable", 0, "fixed", 20, 6.0, "euler", "normal", 0, 10000, "disable"],
               inputs={"model": (rep, 0, "MODEL"), "positive": (edit, 1, "CONDITIONING"),
                       "negative": (edit, 2, "CONDITIONING"), "latent_image": (edit, 3, "LATENT")},
               outputs=[("LATENT", "LATENT")])
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


WORKFLOWS = {
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


def main():
    out_dir = os.path.join(REPO, "example_workflows")
    collage_inputs(os.path.join(out_dir, "input"))
    for name, build in WORKFLOWS.items():
        build().dump(os.path.join(out_dir, f"{name}.json"))


if __name__ == "__main__":
    main()
