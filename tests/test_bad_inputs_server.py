"""Issue 15 through the real ComfyUI server: each bad input of every pack node, posted as a tiny API
workflow, comes back as a named error (HTTP 400 from validate_inputs for widget values, else
the node's execution error), writes no image, and the same workflow with good values runs right
after it on the same server.

One server for the session (tests/ac_server.py), 2 sampler steps, 64 px latents: about a minute.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from ac_server import RUN_TIMEOUT, comfy_server  # noqa: F401  (fixture)
from devtools.server import PromptRejected, execution_error_message

NAN, INF = float("nan"), float("inf")
STEPS = 2
RGB_IMAGE = "attnctl_shapes_example.png"               # example_workflows/input: RGB, no alpha
LAYER_IMAGES = ("attnctl_collage_background.png", "attnctl_collage_red_circle.png")


class Api:
    """A tiny API-format prompt: add(class_type, **inputs) -> node id; links are [id, slot]."""

    def __init__(self, model: dict, seed: int):
        self.nodes: dict = {}
        self.seed = seed
        if "loader" in model:
            self.ck = self.add(model["loader"])
        else:
            self.ck = self.add("CheckpointLoaderSimple", ckpt_name=model["ckpt_name"])
        self.model, self.clip, self.vae = [self.ck, 0], [self.ck, 1], [self.ck, 2]

    def add(self, class_type: str, **inputs) -> str:
        nid = str(len(self.nodes) + 1)
        self.nodes[nid] = {"class_type": class_type, "inputs": inputs}
        return nid

    def text(self, t: str) -> list:
        return [self.add("CLIPTextEncode", text=t, clip=self.clip), 0]

    def latent(self, size: int = 64, batch: int = 1) -> list:
        return [self.add("EmptyLatentImage", width=size, height=size, batch_size=batch), 0]

    def boxes(self, text: str = "red circle: 0,0,0.5,0.5") -> list:
        return [self.add("AttnCtl_Boxes", boxes=text, units="fraction", width=512, height=512), 0]

    def sample_and_save(self, model, positive, negative, latent, denoise: float = 1.0) -> str:
        ks = self.add("KSampler", model=model, seed=self.seed, steps=STEPS, cfg=5.0, sampler_name="euler",
                      scheduler="normal", positive=positive, negative=negative, latent_image=latent, denoise=denoise)
        return self.save([self.add("VAEDecode", samples=[ks, 0], vae=self.vae), 0])

    def save(self, image) -> str:
        return self.add("SaveImage", images=image, filename_prefix="AttnCtl/bad_inputs")


# ------------------------------------------------------------------ one valid workflow per node family
# each returns (api, {role: node id}); a case then overrides inputs of one role's node

def wf_p2p(a: Api):
    n = a.add("AttnCtl_PromptToPrompt", model=a.model, clip=a.clip, latent=a.latent(), source_prompt="a red circle",
              target_prompts="a blue circle", mode="replace", reweight="", cross_replace=0.8, word_windows="",
              self_replace=0.4, blend_source_words="", blend_target_words="", blend_threshold=0.3, blend_start=0.0,
              negative_prompt="")
    a.sample_and_save([n, 0], [n, 1], [n, 2], [n, 3])
    return {"node": n}


def wf_masactrl(a: Api):
    n = a.add("AttnCtl_MasaCtrl", model=a.model, clip=a.clip, latent=a.latent(), source_prompt="a red circle",
              target_prompts="a red circle on the right", negative_prompt="", start_step=1.0, start_layer=-1,
              mode="mutual", mask_source_word="", mask_target_word="", mask_threshold=0.1)
    a.sample_and_save([n, 0], [n, 1], [n, 2], [n, 3])
    return {"node": n}


def wf_layout(a: Api):
    bx = a.add("AttnCtl_Boxes", boxes="red circle: 0,0,0.5,0.5", units="fraction", width=512, height=512)
    n = a.add("AttnCtl_LayoutGuidance", model=a.model, clip=a.clip, prompt="a red circle", boxes=[bx, 0],
              mode="forward", strength=30.0, iterations=1, energy_threshold=0.2, guided_steps=0.5,
              forward_strength=0.5, layers="auto", special_tokens="none")
    a.sample_and_save([n, 0], [n, 1], a.text(""), a.latent())
    return {"node": n, "boxes": bx}


def wf_capture(a: Api):
    n = a.add("AttnCtl_CaptureAttention", model=a.model, clip=a.clip, prompt="a red circle", words="red, circle",
              layers="all", start_percent=0.0, end_percent=1.0, keep_per_step=False)
    ks = a.add("KSampler", model=[n, 0], seed=a.seed, steps=STEPS, cfg=5.0, sampler_name="euler", scheduler="normal",
               positive=a.text("a red circle"), negative=a.text(""), latent_image=a.latent(), denoise=1.0)
    img = a.add("VAEDecode", samples=[ks, 0], vae=a.vae)
    hm = a.add("AttnCtl_AttentionHeatmap", attn_maps=[n, 1], image=[img, 0], threshold=0.5, alpha=0.6,
               per_step=False)
    a.save([hm, 0])
    return {"node": n, "sampler": ks, "heatmap": hm}


def wf_paint(a: Api):
    n = a.add("AttnCtl_PaintWithWords", model=a.model, clip=a.clip, prompt="a red circle and a blue square",
              mode="ediff-i", weight=0.3, strengths="", collage_positive=1.0, collage_negative=1.0, layers="all",
              end_percent=1.0, boxes=a.boxes("red circle: 0,0,0.5,0.5\nblue square: 0.5,0.5,1,1"), mask_phrases="")
    a.sample_and_save([n, 0], [n, 1], a.text(""), a.latent())
    return {"node": n}


def wf_regions(a: Api):
    r = a.add("AttnCtl_RegionPrompt", prompt="a red circle", strength=1.0, boxes=a.boxes())
    n = a.add("AttnCtl_RegionConditioning", model=a.model, clip=a.clip, regions=[r, 0],
              background_prompt="a red circle", bootstrap=0.5, bootstrap_colours="random")
    a.sample_and_save([n, 0], [n, 1], a.text(""), a.latent())
    return {"node": n, "region": r}


def wf_collage(a: Api):
    prev, layers = None, []
    for img_name, prompt in zip(LAYER_IMAGES, ("", "a red circle")):
        img = a.add("LoadImage", image=img_name)
        inputs = dict(image=[img, 0], prompt=prompt, strength=0.6, mask_meaning="transparency (LoadImage's MASK)",
                      mask=[img, 1])
        if prev is not None:
            inputs["layers"] = [prev, 0]
        prev = a.add("AttnCtl_CollageLayer", **inputs)
        layers.append(prev)
    n = a.add("AttnCtl_CollageLayers", model=a.model, clip=a.clip, vae=a.vae, layers=[prev, 0],
              attention_positive=1.0, attention_negative=1.0, dilate=8, blur=8.0)
    a.sample_and_save([n, 0], [n, 1], a.text(""), [n, 2])
    return {"node": n, "layer": layers[-1]}


def wf_tiled(a: Api):
    n = a.add("AttnCtl_TiledDiffusion", model=a.model, tile_width=64, tile_height=64, overlap=32,
              merge="multidiffusion", tile_batch_size=2, wrap_horizontal=False, sdxl_size_cond="per tile")
    a.sample_and_save([n, 0], a.text("a red circle"), a.text(""), a.latent(96))
    return {"node": n}


def wf_null_text(a: Api):
    img = a.add("LoadImage", image=RGB_IMAGE)
    enc = a.add("VAEEncode", pixels=[img, 0], vae=a.vae)
    pos = a.text("a blue square and a red circle")
    n = a.add("AttnCtl_NullTextInversion", model=a.model, positive=pos, negative=a.text(""), latent=[enc, 0],
              steps=STEPS, scheduler="normal", cfg=1.0, iterations=1)      # cfg 1: plain DDIM inversion
    ks = a.add("KSamplerAdvanced", model=a.model, add_noise="disable", noise_seed=a.seed, steps=STEPS, cfg=1.0,
               sampler_name="euler", scheduler="normal", positive=pos, negative=[n, 2], latent_image=[n, 0],
               start_at_step=0, end_at_step=STEPS, return_with_leftover_noise="disable")
    a.save([a.add("VAEDecode", samples=[ks, 0], vae=a.vae), 0])
    return {"node": n}


def wf_boxes_to_mask(a: Api):
    n = a.add("AttnCtl_BoxesToMask", boxes=a.boxes(), width=64, height=64, index=0, union=False)
    a.save([a.add("MaskToImage", mask=[n, 0]), 0])
    return {"node": n}


FAMILIES = {"p2p": wf_p2p, "masactrl": wf_masactrl, "layout": wf_layout, "capture": wf_capture,
            "paint": wf_paint, "regions": wf_regions, "collage": wf_collage, "tiled": wf_tiled,
            "null_text": wf_null_text, "boxes_to_mask": wf_boxes_to_mask}


# ------------------------------------------------------------------ the bad inputs
# (family, role, input overrides or a callable(api, roles) that edits the prompt, input to be named,
#  stage: "validate" = refused by POST /prompt, "execute" = the node's execution error)

def _solid(a: Api, value: float, size: int = 64) -> list:
    return [a.add("SolidMask", value=value, width=size, height=size), 0]


def _three_masks(a: Api) -> list:
    bx = a.boxes("a: 0,0,0.5,0.5\nb: 0.5,0,1,0.5\nc: 0,0.5,0.5,1")
    return [a.add("AttnCtl_BoxesToMask", boxes=bx, width=64, height=64, index=-1, union=False), 0]


def _batch2_latent(a, r):
    a.nodes[r["node"]]["inputs"]["latent"] = a.latent(batch=2)


def _edit(role, **inputs):
    def f(a, r):
        a.nodes[r[role]]["inputs"].update({k: (v(a) if callable(v) else v) for k, v in inputs.items()})
    return f


CASES = [
    ("p2p", _edit("node", reweight="red: nan"), "reweight", "validate"),
    ("p2p", _edit("node", reweight="red 3"), "reweight", "validate"),
    ("p2p", _edit("node", word_windows="circle: 0.2-x"), "word_windows", "validate"),
    ("p2p", _edit("node", cross_replace=NAN), "cross_replace", "validate"),
    ("p2p", _edit("node", blend_threshold=INF), "blend_threshold", "validate"),
    ("p2p", _batch2_latent, "latent", "execute"),
    ("masactrl", _edit("node", start_step=NAN), "start_step", "validate"),
    ("masactrl", _edit("node", start_step=2.5), "start_step", "validate"),
    ("masactrl", _edit("node", mask_threshold=INF), "mask_threshold", "validate"),
    ("masactrl", _edit("node", start_step=float(STEPS)), "start_step", "execute"),
    ("masactrl", _batch2_latent, "latent", "execute"),
    ("masactrl", _edit("node", source_mask=lambda a: _solid(a, 1.0), target_mask=lambda a: _solid(a, 0.0)),
     "target_mask", "execute"),
    ("masactrl", _edit("node", source_mask=_three_masks), "source_mask", "execute"),
    ("masactrl", _edit("node", source_mask=lambda a: _solid(a, NAN)), "source_mask", "execute"),
    ("layout", _edit("node", strength=NAN), "strength", "validate"),
    ("layout", _edit("node", layers="sideways"), "layers", "validate"),
    ("layout", _edit("boxes", boxes="red circle 0,0,0.5,0.5"), "boxes", "validate"),
    ("layout", _edit("boxes", boxes="giraffe: 0,0,0.5,0.5"), "boxes", "execute"),
    ("capture", _edit("node", layers="up@1/x"), "layers", "validate"),
    ("capture", _edit("node", start_percent=0.8, end_percent=0.2), "start_percent", "validate"),
    ("capture", _edit("node", end_percent=NAN), "end_percent", "validate"),
    ("capture", _edit("heatmap", threshold=NAN), "threshold", "validate"),
    # a fresh capture node (words differ from the valid workflow's, so it is not served from the cache):
    # a handle filled by an earlier prompt's run would still hold that run's maps
    ("capture", lambda a, r: (_edit("sampler", denoise=0.0)(a, r), _edit("node", words="circle")(a, r)),
     "attn_maps", "execute"),
    ("paint", _edit("node", weight=NAN), "weight", "validate"),
    ("paint", _edit("node", strengths="red circle: nan"), "strengths", "validate"),
    ("paint", _edit("node", masks=lambda a: _solid(a, NAN), mask_phrases="red circle"), "masks", "execute"),
    ("paint", _edit("node", masks=_three_masks, mask_phrases="red circle"), "mask_phrases", "execute"),
    ("regions", _edit("region", strength=INF), "strength", "validate"),
    ("regions", _edit("node", bootstrap=NAN), "bootstrap", "validate"),
    ("regions", _edit("region", mask=_three_masks), "mask", "execute"),
    ("regions", _edit("region", mask=lambda a: _solid(a, NAN)), "mask", "execute"),
    ("collage", _edit("layer", strength=NAN), "strength", "validate"),
    ("collage", _edit("node", blur=INF), "blur", "validate"),
    ("collage", _edit("layer", image=lambda a: [a.add("LoadImage", image=RGB_IMAGE), 0],
                      mask=lambda a: [a.add("LoadImage", image=RGB_IMAGE), 1]), "mask", "execute"),
    ("collage", _edit("layer", mask=lambda a: _solid(a, NAN, 256)), "mask", "execute"),
    ("tiled", _edit("node", tile_width=60), "tile_width", "validate"),
    ("tiled", _edit("node", overlap=64), "overlap", "validate"),
    ("null_text", _edit("node", cfg=NAN), "cfg", "validate"),
    ("boxes_to_mask", _edit("node", index=5), "index", "execute"),
]


def _ids():
    seen: dict = {}
    out = []
    for fam, _, name, stage in CASES:
        key = f"{fam}-{name}-{stage}"
        seen[key] = seen.get(key, 0) + 1
        out.append(key if seen[key] == 1 else f"{key}{seen[key]}")
    return out


_SEED = [100]


def _build(model, family, edit=None):
    _SEED[0] += 1                                 # a new prompt each time: never served from the cache
    a = Api(model, _SEED[0])
    roles = FAMILIES[family](a)
    if edit is not None:
        edit(a, roles)
    return a


def _rejection_text(e: PromptRejected) -> str:
    return json.dumps(e.body.get("node_errors", {}), allow_nan=True)


def _check_images(srv, entry):
    from PIL import Image
    paths = srv.output_images(entry)
    assert paths, f"no image written: {entry.get('outputs')}"
    for p in paths:
        px = np.asarray(Image.open(p)).astype(np.float32)
        assert np.isfinite(px).all() and px.max() > 0, f"{p} is empty (a NaN image saves as black)"


@pytest.mark.parametrize("family,edit,name,stage", CASES, ids=_ids())
def test_bad_input_is_named_and_the_next_valid_workflow_runs(comfy_server, family, edit, name, stage):
    srv = comfy_server.server
    bad = _build(comfy_server.model, family, edit)
    try:
        entry = srv.run(bad.nodes, timeout=RUN_TIMEOUT, check=False)
    except PromptRejected as e:
        text = _rejection_text(e)
        assert stage == "validate", f"expected an execution error, the prompt was refused: {text[:800]}"
        assert f"{name}:" in text, f"{name!r} not named in: {text[:1500]}"
    else:
        msg = execution_error_message(entry)
        assert stage == "execute", f"expected validate_inputs to refuse it; it ran: {msg or entry.get('status')}"
        assert entry["status"]["status_str"] == "error", entry["status"]
        assert f"{name}:" in msg, f"{name!r} not named in: {msg}"
        assert not srv.output_images(entry), "a failed prompt wrote an image"
    good = _build(comfy_server.model, family)
    entry = srv.run(good.nodes, timeout=RUN_TIMEOUT)
    assert entry["status"]["status_str"] == "success"
    _check_images(srv, entry)


def test_the_cases_cover_every_pack_node_with_inputs():
    """Every pack node with widget or mask inputs is the node a case edits (no server needed)."""
    targets = set()
    for family, edit, _name, _stage in CASES:
        a = Api({"ckpt_name": "x"}, 0)
        roles = FAMILIES[family](a)
        before = json.loads(json.dumps(a.nodes))
        edit(a, roles)
        targets |= {a.nodes[nid]["class_type"] for nid in before if a.nodes[nid] != before[nid]}
    expected = {"AttnCtl_PromptToPrompt", "AttnCtl_MasaCtrl", "AttnCtl_LayoutGuidance", "AttnCtl_Boxes",
                "AttnCtl_CaptureAttention", "AttnCtl_AttentionHeatmap", "AttnCtl_PaintWithWords",
                "AttnCtl_RegionPrompt", "AttnCtl_RegionConditioning", "AttnCtl_CollageLayer",
                "AttnCtl_CollageLayers", "AttnCtl_TiledDiffusion", "AttnCtl_NullTextInversion",
                "AttnCtl_BoxesToMask", "KSampler"}
    assert expected <= targets, expected - targets
    assert len(CASES) == 39
