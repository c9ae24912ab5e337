"""Semantic tests on the shipped shapes-world model (issue 9): each technique does what its paper
promises, measured on fixed seeds with shapesworld.evaluate.

Two levels, both in the default run (`make test-semantic` runs this file alone and prints the
measured figures as SEMANTIC lines):
- effect tests: the technique's effect is well above chance / above no control;
- issue targets (test_issue_target_*): the thresholds issue 9 sets (word pointing 90 % / 60 %,
  P2P kept-object IoU 0.8, layout hit rate 70 %).
"""
import functools
import itertools

import numpy as np
import pytest
import torch

import ac_models as M
import ac_shapes as S
from attention_control.nodes.capture import CaptureAttention
from attention_control.nodes.common import resolve_words
from attention_control.nodes.layout import Boxes, LayoutGuidance
from attention_control.nodes.masactrl import MasaCtrl
from attention_control.nodes.p2p import PromptToPrompt
from attention_control.nodes.regions import RegionConditioning, RegionPrompt
from attention_control.nodes.collage import CollageLayer, CollageLayers
from attention_control.shapesworld import evaluate as E

COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle"]


def two_object_captions(n):
    pairs = [(c1, s1, c2, s2) for c1, c2 in itertools.permutations(COLOURS, 2)
             for s1, s2 in itertools.permutations(SHAPES, 2)]
    idx = np.random.default_rng(0).choice(len(pairs), size=n, replace=False)
    return [pairs[i] for i in idx]


@functools.lru_cache(maxsize=1)
def capture_measure():
    """Pointing game of colour and shape words on 16x16 maps, and the chance level (mask area)."""
    model, clip, _ = S.load()
    caps = two_object_captions(32)
    texts = [f"a {c1} {s1} and a {c2} {s2}" for c1, s1, c2, s2 in caps]
    # all captions share one token layout: BOS a c1 s1 and a c2 s2 -> capture by token index
    specs, _ = resolve_words(clip, texts[0], ", ".join(caps[0]))
    assert [s.positions for s in specs] == [[2], [3], [6], [7]]
    out = CaptureAttention.execute(model, clip, texts[0], "#2, #3, #6, #7", "16", 0.0, 1.0, False)
    cap_model, handle = out.result if hasattr(out, "result") else out
    lat = S.sample(cap_model, S.encode(clip, texts), S.encode(clip, [""] * len(texts)),
                   M.latent(len(texts), 32, 32), seed=11)
    rgb = S.to_rgb(lat)
    maps = handle.maps
    assert maps.shape == (len(texts), 4, 16, 16)
    colour, shape, chance = [], [], []
    for b, (c1, s1, c2, s2) in enumerate(caps):
        for col, ci, si in ((c1, 0, 1), (c2, 2, 3)):
            objs = [o for o in E.segment_objects(rgb[b]) if o["colour"] == col]
            if objs:
                colour.append(E.pointing_game(maps[b, ci], objs[0]["mask"]))
                shape.append(E.pointing_game(maps[b, si], objs[0]["mask"]))
                chance.append(float(objs[0]["mask"].mean()))
    return {"n": len(colour), "colour": float(np.mean(colour)), "shape": float(np.mean(shape)),
            "chance": float(np.mean(chance))}


@functools.lru_cache(maxsize=1)
def p2p_measure():
    """Colour swap red -> green of the circle: is the blue square kept (mask IoU with the source)?"""
    model, clip, _ = S.load()
    src, tgt = "a red circle and a blue square", "a green circle and a blue square"

    def blue(rgb):
        objs = [o for o in E.segment_objects(rgb) if o["colour"] == "blue"]
        return objs[0]["mask"] if objs else None

    ious, alone, swapped, seeds = [], [], 0, range(8)
    for seed in seeds:
        out = PromptToPrompt.execute(model, clip, M.latent(1, 32, 32), src, tgt, "replace", "", 0.8, "", 0.4,
                                     "", "", 0.3, 0.0, "")
        m, pos, neg, lat = out.result if hasattr(out, "result") else out
        res = S.to_rgb(S.sample(m, pos, neg, lat, seed=seed))
        plain = S.to_rgb(S.sample(model, S.encode(clip, [tgt]), S.encode(clip, [""]), M.latent(1, 32, 32), seed=seed))
        a, b, c = blue(res[0]), blue(res[1]), blue(plain[0])
        if a is not None:
            ious.append(E.mask_iou(a, b) if b is not None else 0.0)
            alone.append(E.mask_iou(a, c) if c is not None else 0.0)
        swapped += int(E.colour_present(res[1], "green") and not E.colour_present(res[1], "red"))
    return {"n": len(ious), "iou": float(np.mean(ious)), "iou_alone": float(np.mean(alone)),
            "swapped": swapped, "seeds": len(seeds)}


LAYOUT_BOX = (0.0, 0.0, 0.5, 0.5)


@functools.lru_cache(maxsize=1)
def layout_measure():
    """Single objects ("a red circle") guided into the top-left quadrant: how often does the object's
    centre land in the box, guided vs unguided (same seeds)?"""
    model, clip, _ = S.load()
    caps = [(c, s) for c in COLOURS for s in SHAPES]
    caps = caps + caps[:4]                                   # 16 samples in one batch
    texts = [f"a {c} {s}" for c, s in caps]
    box_text = "red circle: " + ",".join(str(v) for v in LAYOUT_BOX)
    out = Boxes.execute(box_text, "fraction", 256, 256)
    bx = (out.result if hasattr(out, "result") else out)[0]
    # every caption has the same token layout (BOS a colour shape): guide tokens 2-3 of each item
    out = LayoutGuidance.execute(model, clip, texts[0], bx, "backward", 30.0, 5, 0.2, 0.2, 0.5, "auto", "none")
    guided_model = (out.result if hasattr(out, "result") else out)[0]
    pos, neg = S.encode(clip, texts), S.encode(clip, [""] * len(texts))
    lat = M.latent(len(texts), 32, 32)
    # the paper's schedule: 50 steps, the first 10 guided (up to 5 iterations each)
    plain = S.to_rgb(S.sample(model, pos, neg, lat, seed=21, steps=50))
    guided = S.to_rgb(S.sample(guided_model, pos, neg, lat, seed=21, steps=50))
    hit = [E.box_hit(guided[i], c, LAYOUT_BOX) for i, (c, _s) in enumerate(caps)]
    hit0 = [E.box_hit(plain[i], c, LAYOUT_BOX) for i, (c, _s) in enumerate(caps)]
    present = [E.colour_present(guided[i], c) for i, (c, _s) in enumerate(caps)]
    return {"n": len(caps), "hit": float(np.mean(hit)), "hit_unguided": float(np.mean(hit0)),
            "present": float(np.mean(present))}


def test_layout_guidance_moves_objects_into_the_box():
    r = layout_measure()
    print(f"SEMANTIC layout {r}")
    # measured 0.875 guided vs 0.25 unguided (16 fixed seeds, the paper's 50-step schedule)
    assert r["hit"] >= r["hit_unguided"] + 0.4, r
    # issue 16 item 3: guidance must not lose the object (its colour found at all); measured 16/16
    assert r["present"] >= 0.9, r


BACKWARD_BOX = (0.5, 0.0, 1.0, 0.5)


@functools.lru_cache(maxsize=1)
def backward_found_measure():
    """Issue 16 item 3: does backward guidance lose the object (its colour not found at all)? 16
    single objects (other subjects and seed than layout_measure) guided into the top-right quadrant
    at the node's defaults, 20 steps: objects found beside objects in the box, guided vs unguided."""
    model, clip, _ = S.load()
    caps = [(c, s) for c in COLOURS for s in SHAPES]
    caps = caps + caps[4:8]
    texts = [f"a {c} {s}" for c, s in caps]
    bx = _res(Boxes.execute("red circle: " + ",".join(str(v) for v in BACKWARD_BOX), "fraction", 256, 256))[0]
    m = _res(LayoutGuidance.execute(model, clip, texts[0], bx, "backward", 30.0, 5, 0.2, 0.2, 0.5, "auto", "none"))[0]
    pos, neg = S.encode(clip, texts), S.encode(clip, [""] * len(texts))
    lat = M.latent(len(texts), 32, 32)
    guided = S.to_rgb(S.sample(m, pos, neg, lat, seed=901))
    plain = S.to_rgb(S.sample(model, pos, neg, lat, seed=901))
    rate = lambda f, imgs: float(np.mean([f(imgs[i], c) for i, (c, _s) in enumerate(caps)]))
    hit = lambda img, c: E.box_hit(img, c, BACKWARD_BOX)
    return {"n": len(caps), "hit": rate(hit, guided), "hit_unguided": rate(hit, plain),
            "found": rate(E.colour_present, guided), "found_unguided": rate(E.colour_present, plain)}


def test_backward_layout_guidance_keeps_the_object():
    r = backward_found_measure()
    print(f"SEMANTIC backward_layout_found {r}")
    # measured: in box 0.81 vs 0.25 unguided, found 16/16 (both schedules; over three boxes and the
    # 20 / 50-step schedules 95 of 96 objects were found, the one lost in a box smaller than most objects)
    assert r["hit"] >= r["hit_unguided"] + 0.4, r
    assert r["found"] >= 0.9 and r["found"] >= r["found_unguided"] - 0.1, r


FORWARD_BOX = (0.5, 0.5, 1.0, 1.0)


@functools.lru_cache(maxsize=1)
def forward_layout_measure():
    """Forward guidance at the node's defaults (issue 16 item 2), single objects into the bottom-right
    quadrant, 16 samples, 20 steps: object centre in the box, guided vs unguided (same seed), and
    whether the object is there at all. Also the paper's layers at the old default strength 0.5."""
    model, clip, _ = S.load()
    caps = [(c, s) for c in COLOURS for s in SHAPES]
    caps = caps + caps[:4]
    texts = [f"a {c} {s}" for c, s in caps]
    bx = _res(Boxes.execute("red circle: " + ",".join(str(v) for v in FORWARD_BOX), "fraction", 256, 256))[0]
    pos, neg = S.encode(clip, texts), S.encode(clip, [""] * len(texts))
    lat = M.latent(len(texts), 32, 32)
    out = {}
    for key, fwd, layers in (("default", 1.0, "auto"), ("old", 0.5, "mid, up@1/4")):
        m = _res(LayoutGuidance.execute(model, clip, texts[0], bx, "forward", 30.0, 5, 0.2, 0.2, fwd, layers, "none"))[0]
        out[key] = S.to_rgb(S.sample(m, pos, neg, lat, seed=77))
    plain = S.to_rgb(S.sample(model, pos, neg, lat, seed=77))
    hit = lambda imgs: float(np.mean([E.box_hit(imgs[i], c, FORWARD_BOX) for i, (c, _s) in enumerate(caps)]))
    return {"n": len(caps), "hit": hit(out["default"]), "hit_old_default": hit(out["old"]), "hit_unguided": hit(plain),
            "present": float(np.mean([E.colour_present(out["default"][i], c) for i, (c, _s) in enumerate(caps)]))}


def test_forward_layout_guidance_moves_objects_at_its_defaults():
    r = forward_layout_measure()
    print(f"SEMANTIC forward_layout {r}")
    # measured: 0.94 at the defaults (strength 1.0, every layer) vs 0.31 unguided and 0.31 at the old default
    assert r["hit"] >= 0.8 and r["hit"] >= r["hit_unguided"] + 0.4, r
    assert r["present"] >= 0.9, r


def test_issue_target_layout_hit_rate():
    r = layout_measure()
    assert r["hit"] >= 0.70, r


def _background_tone(rgb) -> float:
    """Median grey of the background pixels (the world's background is a flat grey in [0.80, 0.97])."""
    bg = E.classify_pixels(rgb) == -1
    return float(np.median(E.to_hwc(rgb)[bg]))


@functools.lru_cache(maxsize=1)
def masactrl_appearance_measure():
    """MasaCtrl's claim (issue 16 item 4): the target's layout comes from its own denoising, its
    appearance from the source. Source and target share the caption ("a <colour> <shape>", 12
    subjects) but not the noise (batch_index [0, 1]), so the target's object sits elsewhere; the
    appearance attribute is the background tone, which no caption names (uniform in [0.80, 0.97] in
    training). Measured against the target sampled alone from the same noise.

    The issue's own setup cannot be measured on this model: it does not follow position words
    ("on the left" -> "on the right" leaves the object in place, so "it moves" fails with and
    without MasaCtrl), colourless captions ("a circle") are outside its training captions, and a
    colour the target prompt names wins over MasaCtrl (source "a red circle", target "a green
    circle": the target is green in 12/12, with or without MasaCtrl, at every start step and layer
    tried). Self-attention does carry the layout in this model (zeroing it moves objects 6 px), so
    the weak colour transfer is the text conditioning winning, not a missing self-attention level."""
    model, clip, _ = S.load()
    subjects = [(c, s) for c in COLOURS for s in SHAPES]
    rows = []
    for i, (c, s) in enumerate(subjects):
        out = MasaCtrl.execute(model, clip, M.latent(1, 32, 32), f"a {c} {s}", f"a {c} {s}", "", 4 / 50, -1,
                               "mutual", "", "", 0.1, None, None)
        m, pos, neg, lat = _res(out)
        lat = dict(lat, batch_index=[0, 1])                    # target from other noise than the source
        res = S.to_rgb(S.sample(m, pos, neg, lat, seed=500 + i))
        plain = S.to_rgb(S.sample(model, pos, neg, lat, seed=500 + i))
        objs = [[o for o in E.segment_objects(img) if o["colour"] == c] for img in (res[0], res[1], plain[1])]
        if not all(objs):
            continue
        (src,), (tgt,), (alone,) = ([o[0]["centre"]] for o in objs)
        tone = [_background_tone(img) for img in (res[0], res[1], plain[1])]
        rows.append({"from_alone": float(np.hypot(tgt[0] - alone[0], tgt[1] - alone[1])),
                     "from_source": float(np.hypot(tgt[0] - src[0], tgt[1] - src[1])),
                     "tone_gap": abs(tone[1] - tone[0]), "tone_gap_alone": abs(tone[2] - tone[0]),
                     "source_unchanged": bool(torch.equal(res[0], plain[0]))})
    n = len(rows)
    mean = lambda k: float(np.mean([r[k] for r in rows]))
    return {"n": n, "target_shift_from_alone_px": mean("from_alone"), "target_shift_from_source_px": mean("from_source"),
            "tone_gap": mean("tone_gap"), "tone_gap_alone": mean("tone_gap_alone"),
            "tone_closer": sum(r["tone_gap"] < r["tone_gap_alone"] for r in rows),
            "source_unchanged": all(r["source_unchanged"] for r in rows)}


def test_masactrl_target_keeps_its_layout_and_takes_the_source_appearance():
    r = masactrl_appearance_measure()
    print(f"SEMANTIC masactrl_appearance {r}")
    assert r["n"] >= 10, r
    assert r["source_unchanged"], r
    # layout: the target's object stays where its own noise puts it (not copied from the source)
    assert r["target_shift_from_alone_px"] <= 1.5 and r["target_shift_from_source_px"] >= 5.0, r
    # appearance: the background tone moves toward the source's (measured: gap 0.014 vs 0.031 alone,
    # closer in 10/12; the target object 0.4 px from where it lies alone, 8 px from the source object)
    assert r["tone_gap"] <= 0.7 * r["tone_gap_alone"], r
    assert r["tone_closer"] >= 0.7 * r["n"], r


@functools.lru_cache(maxsize=1)
def masactrl_measure():
    """Source "a <colour> <shape> on the left", target "... on the right" (same noise): does the
    target keep the source object's colour and shape, with MasaCtrl vs the target sampled alone
    from the same noise? Also: where does the target's object sit (fraction on the right half)?"""
    model, clip, _ = S.load()
    pairs = [(c, s) for c in COLOURS for s in SHAPES][::2]          # 6 subjects
    same, same_plain, right, n = 0, 0, 0, 0
    for i, (c, s) in enumerate(pairs):
        src, tgt = f"a {c} {s} on the left", f"a {c} {s} on the right"
        out = MasaCtrl.execute(model, clip, M.latent(1, 32, 32), src, tgt, "", 4 / 50, -1, "mutual", "", "", 0.1,
                               None, None)
        m, pos, neg, lat = out.result if hasattr(out, "result") else out
        res = S.to_rgb(S.sample(m, pos, neg, lat, seed=100 + i))
        plain = S.to_rgb(S.sample(model, pos, neg, lat, seed=100 + i))
        o_src = [o for o in E.segment_objects(res[0]) if o["colour"] == c]
        if not o_src:
            continue
        n += 1
        ref = (c, o_src[0]["shape"])
        for img, counter in ((res[1], "masa"), (plain[1], "plain")):
            objs = [o for o in E.segment_objects(img) if o["colour"] == c]
            ok = bool(objs) and objs[0]["shape"] == ref[1]
            if counter == "masa":
                same += ok
                right += bool(objs) and objs[0]["centre"][0] >= 16
            else:
                same_plain += ok
    return {"n": n, "keeps_identity": same / max(n, 1), "keeps_identity_plain": same_plain / max(n, 1),
            "target_on_right": right / max(n, 1)}


def test_masactrl_keeps_the_subject():
    r = masactrl_measure()
    print(f"SEMANTIC masactrl {r}")
    assert r["n"] >= 4
    assert r["keeps_identity"] >= max(r["keeps_identity_plain"], 0.5), r


def test_capture_colour_words_point_at_their_object():
    r = capture_measure()
    print(f"SEMANTIC capture {r}")
    assert r["n"] >= 32
    # the object's own words point at it well above chance (v-prediction weights, step 1700:
    # colour 0.375, shape 0.36, chance 0.15)
    assert r["colour"] >= 2.0 * r["chance"] and r["shape"] >= 2.0 * r["chance"], r


def test_p2p_swap_changes_the_colour_and_keeps_the_layout():
    r = p2p_measure()
    print(f"SEMANTIC p2p {r}")
    assert r["n"] >= 6
    assert r["swapped"] >= 6, r
    assert r["iou"] >= r["iou_alone"] + 0.3, r


BLEND_CASES = [("a yellow triangle and a green circle", "a blue triangle and a green circle", "triangle", "yellow", "blue"),
               ("a blue square and a red triangle", "a yellow square and a red triangle", "square", "blue", "yellow"),
               ("a green square and a yellow circle", "a red square and a yellow circle", "square", "green", "red")]


@functools.lru_cache(maxsize=1)
def local_blend_measure():
    """Colour swaps with local blend on the edited word (issue 16 item 1), vs the same P2P edit without
    blending, same seeds, at the shapes world's 32x32 latent: the blend mask's area against the edited
    object's area, how much the target differs from the source outside the object (with and without
    blending), and whether the object took the new colour."""
    from attention_control.attention.router import get_router
    model, clip, _ = S.load()
    rows = []
    for src, tgt, word, col, new in BLEND_CASES:
        for seed in (51, 52):
            outs = {}
            for blend in (word, ""):
                out = _res(PromptToPrompt.execute(model, clip, M.latent(1, 32, 32), src, tgt, "replace", "", 0.8, "",
                                                  0.4, blend, "", 0.3, 0.0, ""))
                m, pos, neg, lat = out
                img = S.to_rgb(S.sample(m, pos, neg, lat, seed=seed))
                outs[blend] = (img, get_router(m).controllers[-1].last_blend_mask)
            img, mask = outs[word]
            objs = [o for o in E.segment_objects(img[0]) if o["colour"] == col]
            if not objs:
                continue
            obj = torch.as_tensor(objs[0]["mask"])
            near = torch.nn.functional.max_pool2d(obj[None, None].float(), 3, 1, 1)[0, 0] > 0   # object + 1 px
            union = torch.maximum(mask[0], mask[1])[0] > 0.5
            outside = lambda im: float((im[0] - im[1]).abs().amax(0)[~near].mean())
            rows.append({"area_ratio": float(union.sum() / obj.sum()), "cover": float(union.float().mean()),
                         "outside_diff": outside(img), "outside_diff_no_blend": outside(outs[""][0]),
                         "object_changed": float((img[0] - img[1]).abs().amax(0)[obj].mean()),
                         "new_colour": E.colour_present(img[1], new)})
    med = lambda k: float(np.median([r[k] for r in rows]))
    return {"n": len(rows), **{k: med(k) for k in ("area_ratio", "cover", "outside_diff", "outside_diff_no_blend",
                                                      "object_changed")},
            "max_area_ratio": max(r["area_ratio"] for r in rows), "min_area_ratio": min(r["area_ratio"] for r in rows),
            "new_colour": float(np.mean([r["new_colour"] for r in rows]))}


def test_local_blend_follows_the_edited_object():
    r = local_blend_measure()
    print(f"SEMANTIC local_blend {r}")
    assert r["n"] >= 5, r
    assert 0.5 <= r["area_ratio"] <= 2.0 and r["max_area_ratio"] <= 3.0, r     # the mask is the object, not the canvas
    assert r["outside_diff"] <= 0.02 and r["outside_diff"] < 0.5 * r["outside_diff_no_blend"], r
    assert r["object_changed"] >= 0.3 and r["new_colour"] >= 0.8, r


def test_issue_target_capture_pointing():
    r = capture_measure()
    assert r["colour"] >= 0.90 and r["shape"] >= 0.60, r


def test_issue_target_p2p_iou():
    r = p2p_measure()
    assert r["iou"] >= 0.8, r


def _res(out):
    return out.result if hasattr(out, "result") else out


@functools.lru_cache(maxsize=1)
def regions_measure():
    """Region prompts "a red circle" in a box on the left and "a blue square" in a box on the right,
    the full caption as the background prompt (the usual global + regional prompting), bootstrapping
    0.4, vs the plain caption, same seeds: how often is each colour in its own half?
    (A region prompt on this small model tints the background inside its region: "a red circle" was
    only ever seen on images with nothing else, so seeing the other object it shifts the colours;
    placement is what is measured.)"""
    model, clip, _ = S.load()
    caption = "a red circle and a blue square"
    bx = _res(Boxes.execute("a red circle: 0.05,0.2,0.45,0.8\na blue square: 0.55,0.2,0.95,0.8", "fraction",
                            256, 256))[0]
    regs = _res(RegionPrompt.execute("", 1.0, None, None, bx))[0]
    m, pos = _res(RegionConditioning.execute(model, clip, regs, caption, 0.4))
    n = 12
    neg = S.encode(clip, [""] * n)
    lat = M.latent(n, 32, 32)
    out = S.to_rgb(S.sample(m, pos, neg, lat, seed=31))
    plain = S.to_rgb(S.sample(model, S.encode(clip, [caption] * n), neg, lat, seed=31))

    def placed(img):
        return E.box_hit(img, "red", (0.0, 0.0, 0.5, 1.0)) and E.box_hit(img, "blue", (0.5, 0.0, 1.0, 1.0))

    return {"n": n, "placed": float(np.mean([placed(out[i]) for i in range(n)])),
            "placed_plain": float(np.mean([placed(plain[i]) for i in range(n)]))}


def test_region_prompts_put_each_colour_in_its_region():
    r = regions_measure()
    print(f"SEMANTIC regions {r}")
    assert r["placed"] >= 0.75 and r["placed"] >= r["placed_plain"] + 0.25, r


LAYER_RGB = (0.95, 0.45, 0.2)        # an orange red that is not the world's red (0.9, 0.1, 0.1)


def _collage_layers(strength):
    size = 256
    bg = torch.full((1, size, size, 3), 0.9)
    layer = torch.zeros(1, size, size, 3)
    for c in range(3):
        layer[..., c] = LAYER_RGB[c]
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = (((yy - 96) ** 2 + (xx - 96) ** 2) <= 40 ** 2).float()
    ls = _res(CollageLayer.execute(bg, "", 1.0, "opacity (1 = layer)"))[0]
    ls = _res(CollageLayer.execute(layer, "a red circle", strength, "opacity (1 = layer)", ls, disc[None]))[0]
    return ls, disc


@functools.lru_cache(maxsize=1)
def collage_measure():
    """An orange-red disc layer captioned "a red circle" on a grey background layer, at noise
    strength 0.1, 0.3 and 1.0 (8 seeds): the mean colour inside the disc, its distance to the layer's
    colour (fidelity) and to the world's red (harmonisation), and whether a red object is there."""
    import torch.nn.functional as F
    from attention_control.shapesworld.data import PALETTE
    model, clip, vae = S.load()
    res = {}
    layer, red = torch.tensor(LAYER_RGB), torch.tensor(PALETTE["red"])
    for s in (0.1, 0.3, 1.0):
        ls, disc = _collage_layers(s)
        m, pos, lat, _masks, _comp = _res(CollageLayers.execute(model, clip, vae, ls, 1.0, 1.0, 8, 8.0))
        inner = F.adaptive_avg_pool2d(disc[None, None], (32, 32))[0, 0] >= 0.99
        d_layer, d_red, present = [], [], 0
        for seed in range(8):
            img = S.to_rgb(S.sample(m, pos, S.encode(clip, [""]), lat, seed=40 + seed))[0]
            mean = img[:, inner].mean(-1)
            d_layer.append(float((mean - layer).norm()))
            d_red.append(float((mean - red).norm()))
            present += E.colour_present(img, "red")
        res[s] = {"to_layer": float(np.mean(d_layer)), "to_red": float(np.mean(d_red)), "present": present / 8}
    res["layer_to_red"] = float((layer - red).norm())
    return res


def test_collage_strength_trades_fidelity_for_harmony():
    r = collage_measure()
    print(f"SEMANTIC collage {r}")
    # measured (shipped weights): distance to the layer's colour 0.365 / 0.389 / 0.434 at strength
    # 0.1 / 0.3 / 1.0: this model snaps colours to its four-colour palette even in the last steps, so
    # the trade-off is small in colour; it is monotone
    assert r[0.1]["to_layer"] <= r[0.3]["to_layer"] <= r[1.0]["to_layer"], r
    assert r[0.1]["to_layer"] < r[1.0]["to_layer"] - 0.03, r   # low strength keeps more of the layer
    assert r[1.0]["to_red"] < r["layer_to_red"], r             # and the caption pulls it to the world's red
    assert r[1.0]["present"] >= 0.75, r


@functools.lru_cache(maxsize=1)
def time_measure():
    """TIME 'a circle' -> 'a red circle' (paper defaults: lambda 0.1, augmented templates), 8 images from one
    seed. The edited model given 'a circle' should draw what the unedited one draws from the destination's
    aligned embeddings (the targets the closed form fits: every source position gets the K / V of its aligned
    destination position); prompts naming another colour keep it."""
    from attention_control.nodes import weight_edits as WE
    model, clip, _ = S.load()
    n = 8
    edited, _edit = WE.EditAssumption.execute(model, clip, "a circle", "a red circle", 0.1, True, 1.0).result
    _c, aligned = WE.aligned_embeddings(clip, ["a circle"], ["a red circle"], False)
    neg = S.encode(clip, [""] * n)

    def run(m, ctx):
        return S.to_rgb(S.sample(m, [[ctx.expand(n, -1, -1).contiguous(), {}]], neg, M.latent(n, 32, 32), seed=0))

    def dist(a, b):
        return float((a - b).abs().mean())

    src = S.encode(clip, ["a circle"])[0][0]
    ed, plain, ideal = run(edited, src), run(model, src), run(model, aligned[None])
    blue_ctx = S.encode(clip, ["a blue circle"])[0][0]
    blue_ed, blue_plain = run(edited, blue_ctx), run(model, blue_ctx)

    def count(imgs, fn):
        return int(sum(bool(fn(imgs[i])) for i in range(n)))

    return {"n": n, "edited_to_ideal": dist(ed, ideal), "plain_to_ideal": dist(plain, ideal),
            "red_edited": count(ed, lambda x: E.colour_present(x, "red")),
            "red_ideal": count(ideal, lambda x: E.colour_present(x, "red")),
            "blue_kept": count(blue_ed, lambda x: E.colour_present(x, "blue")),
            "blue_plain": count(blue_plain, lambda x: E.colour_present(x, "blue")),
            "blue_circle_kept": count(blue_ed, lambda x: E.shape_of(x, "blue") == "circle"),
            "blue_circle_plain": count(blue_plain, lambda x: E.shape_of(x, "blue") == "circle")}


def test_time_edit_draws_what_the_destination_embeddings_draw():
    """The weight edit acts as the paper's closed form intends: the edited model given the source prompt draws
    (pixel for pixel, same noise) close to what the plain model draws from the destination's aligned
    embeddings, much closer than the plain model given the source; another colour's prompt keeps its colour.
    Measured, not asserted: this world's random 4-layer text encoder keeps a colour in its own token (the
    aligned destination embeddings, which skip the added word, draw no red either: red_ideal), so TIME's
    colour efficacy cannot show here; and the edit turns 'a blue circle' into other blue shapes more often
    (its position-2 token moves with the source's, a specificity cost of the alignment's position shift)."""
    r = time_measure()
    print(f"SEMANTIC time_edit {r}")
    assert r["edited_to_ideal"] < 0.5 * r["plain_to_ideal"], r
    assert r["blue_kept"] >= r["blue_plain"] - 1, r


def _green_squares(n, seed=0):
    """n shapes-world images of one green square (random size, place and background), as latents."""
    from attention_control.shapesworld import data as D
    from attention_control.shapesworld.comfy_glue import rgb_to_latent
    rng = np.random.default_rng(seed)
    imgs = []
    for _ in range(n):
        img = np.full((32, 32, 3), rng.uniform(0.80, 0.97), np.float32)
        size = rng.uniform(10, 15)
        h = size / 2
        img[D.shape_mask("square", rng.uniform(h, 32 - h), rng.uniform(h, 32 - h), size)] = D.PALETTE["green"]
        imgs.append(img)
    return rgb_to_latent(torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2))


@functools.lru_cache(maxsize=1)
def svdiff_measure():
    """SVDiff on 8 images of a green square bound to the rare token 'sks' ('a sks'), 60 steps at batch 4, lr 0.02:
    how often 'a sks' draws a green square after training vs before, and whether prompts without the token
    keep their objects (16 images from one seed per prompt)."""
    from attention_control.nodes.svdiff import TrainSpectralShifts
    model, clip, _ = S.load()
    with torch.inference_mode():
        tuned, _shifts, loss = TrainSpectralShifts.execute(model, {"samples": _green_squares(8)},
                                                           S.encode(clip, ["a sks"]), 60, 0.02, 4, 0).result
    def count(m, prompt, colour, shape, n):
        imgs = S.to_rgb(S.sample(m, S.encode(clip, [prompt] * n), S.encode(clip, [""] * n), M.latent(n, 32, 32),
                                 seed=0))
        return int(sum(E.shape_of(imgs[i], colour) == shape for i in range(n)))

    out = {"loss_first10": float(np.mean(loss["loss"][:10])), "loss_last10": float(np.mean(loss["loss"][-10:]))}
    for key, prompt, colour, shape, n in (("sks", "a sks", "green", "square", 16),
                                          ("blue_circle", "a blue circle", "blue", "circle", 8),
                                          ("green_circle", "a green circle", "green", "circle", 8)):
        out[f"{key}_trained"] = count(tuned, prompt, colour, shape, n)
        out[f"{key}_plain"] = count(model, prompt, colour, shape, n)
        out[f"{key}_n"] = n
    return out


def test_svdiff_binds_a_new_object_to_a_rare_token_and_leaves_other_prompts():
    r = svdiff_measure()
    print(f"SEMANTIC svdiff {r}")
    assert r["sks_trained"] >= r["sks_plain"] + 5, r
    for key in ("blue_circle", "green_circle"):
        assert r[f"{key}_trained"] >= r[f"{key}_plain"] - 1, r


def _colour_sentences(colour):
    shapes = ("circle", "square", "triangle")
    out = [f"a {colour} {s}" for s in shapes]
    out += [f"a {colour} {s} and a {o} {t}" for s in shapes for o in ("red", "green", "blue", "yellow")
            if o != colour for t in shapes if t != s]
    return "\n".join(out)


@functools.lru_cache(maxsize=1)
def pix2pix_zero_measure():
    """Pix2Pix-Zero 'red -> blue' (direction from shapes-world sentences, templates off) on generated 'a red circle
    and a green square' (6 seeds, 20 euler steps, cfg 6): with the paper's guidance for generated images (0.15)
    and with the direction alone (guidance 0), the same noise; is the circle blue and where is the square?"""
    from attention_control.nodes import pix2pix_zero as PZ
    model, clip, _ = S.load()
    direction = PZ.EditDirectionNode.execute(clip, _colour_sentences("red"), _colour_sentences("blue"), False).result[0]
    out = {}
    for label, guidance in (("guided", 0.15), ("alone", 0.0)):
        n, blue, ious = 0, 0, []
        for seed in range(6):
            m, pos, neg, lat = PZ.Pix2PixZero.execute(model, clip, M.latent(1, 32, 32), "a red circle and a green square",
                                                      direction, 1.0, guidance, 1.0, "all", "").result
            ref, ed = S.to_rgb(S.sample(m, pos, neg, lat, seed=seed))
            objs = E.segment_objects(ref)
            square = [o for o in objs if o["colour"] == "green"]
            if not square or not any(o["colour"] == "red" for o in objs):
                continue
            n += 1
            blue += bool(E.colour_present(ed, "blue")) and not bool(E.colour_present(ed, "red"))
            kept = [o for o in E.segment_objects(ed) if o["colour"] == "green"]
            ious.append(E.mask_iou(square[0]["mask"], kept[0]["mask"]) if kept else 0.0)
        out.update({f"n_{label}": n, f"blue_{label}": blue, f"square_iou_{label}": float(np.mean(ious))})
    return out


@functools.lru_cache(maxsize=1)
def pix2pix_zero_real_measure(n_scenes=4):
    """Pix2Pix-Zero 'red -> blue' on real images (shapes-world scenes drawn by the generator, not by the model: a
    red object and one other, never blue): DDIM Inversion with the paper's noise regularisation (20), the node
    with the unedited caption as negative (the paper: the reference item then reconstructs), Replay Source,
    cfg 5, strength 0.5; guidance 0.1 (the paper's for real images) vs 0 (the direction alone). Where is the
    image's structure (foreground mask IoU with the input), and what colour is the red object's region?"""
    import nodes as comfy_nodes
    from attention_control.nodes import pix2pix_zero as PZ
    from attention_control.nodes.inversion import DDIMInversion, ReplaySource
    from attention_control.shapesworld import comfy_glue, data
    model, clip, _ = S.load()
    direction = PZ.EditDirectionNode.execute(clip, _colour_sentences("red"), _colour_sentences("blue"), False).result[0]
    rng, scenes = np.random.default_rng(0), []
    while len(scenes) < n_scenes:
        img, cap, objs = data.sample_scene(rng, 2)
        if "red" in [o["colour"] for o in objs] and "blue" not in [o["colour"] for o in objs]:
            scenes.append((img, cap, objs))

    def major(cls, mask):
        v = cls[mask]
        return E.COLOURS[np.bincount(v[v >= 0], minlength=len(E.COLOURS)).argmax()] if (v >= 0).any() else None

    out = {label: {"not_red": 0, "blue": 0, "fg_iou": []} for label in ("guided", "alone")}
    for img, cap, objs in scenes:
        lat = {"samples": comfy_glue.rgb_to_latent(torch.from_numpy(img.transpose(2, 0, 1)[None].copy()))}
        inv, traj = DDIMInversion.execute(model, S.encode(clip, [cap]), lat, 20, "normal", 20.0).result
        red = [o for o in objs if o["colour"] == "red"][0]["mask"]
        fg_in = np.logical_or.reduce([o["mask"] for o in objs])
        for label, guidance in (("guided", 0.1), ("alone", 0.0)):
            m, pos, neg, lt = PZ.Pix2PixZero.execute(model, clip, inv, cap, direction, 0.5, guidance, 1.0, "all",
                                                     cap).result
            m = ReplaySource.execute(m, traj).result[0]
            res = comfy_nodes.common_ksampler(m, 0, 20, 5.0, "euler", "normal", pos, neg, lt, denoise=1.0,
                                              disable_noise=True)[0]["samples"]
            ed = E.to_hwc(S.to_rgb(res)[1])
            cls = E.classify_pixels(ed)
            r = out[label]
            r["not_red"] += major(cls, red) != "red"
            r["blue"] += major(cls, red) == "blue"
            r["fg_iou"].append(E.mask_iou(fg_in, (ed.max(-1) - ed.min(-1)) >= E.MIN_SATURATION))
    return {f"{k}_{label}": (float(np.mean(v)) if isinstance(v, list) else v)
            for label, r in out.items() for k, v in r.items()} | {"n": len(scenes)}


def test_pix2pix_zero_changes_the_colour_and_keeps_the_structure():
    r = pix2pix_zero_measure()
    print(f"SEMANTIC pix2pix_zero {r}")
    # measured: the circle blue (no red left) 6/6 both ways; the green square at mask IoU 0.89 guided vs 0.31
    # with the direction alone
    assert r["n_guided"] >= 5 and r["blue_guided"] >= r["n_guided"] - 1, r
    assert r["square_iou_guided"] >= 0.7 and r["square_iou_guided"] >= r["square_iou_alone"] + 0.3, r


def test_pix2pix_zero_edits_an_inverted_real_image():
    r = pix2pix_zero_real_measure()
    print(f"SEMANTIC pix2pix_zero_real {r}")
    # measured (4 scenes): the image's foreground kept at IoU 0.90 guided vs 0.64 with the direction alone; the
    # red object blue in 2 of 4 both ways (the guidance keeps the layout without costing the edit)
    assert r["fg_iou_guided"] >= 0.8 and r["fg_iou_guided"] >= r["fg_iou_alone"] + 0.15, r
    assert r["blue_guided"] >= max(r["blue_alone"], r["n"] // 2), r


def _outline(shape, cx, cy, size):
    """(1, 1, 32, 32) exact outline of a shapes-world shape: its mask minus the mask eroded by one pixel."""
    import torch.nn.functional as F
    from attention_control.shapesworld import data as D
    m = torch.from_numpy(D.shape_mask(shape, cx, cy, size)).float()[None, None]
    return (m + F.max_pool2d(-m, 3, 1, 1)).clamp(0, 1)


def _edge_iou(rgb, sketch):
    """IoU of the image's Sobel edges (> 0.3) and the sketch, both dilated by one pixel (1 px tolerance)."""
    import torch.nn.functional as F
    from attention_control.attention.sketch import sobel_edges
    dil = lambda m: F.max_pool2d(m.float(), 3, 1, 1) > 0.5
    e, s = dil(sobel_edges(rgb) > 0.3), dil(sketch > 0.5)
    return ((e & s).flatten(1).sum(1).float() / (e | s).flatten(1).sum(1).clamp_min(1).float()).tolist()


@functools.lru_cache(maxsize=2)
def sketch_measure(host="unet"):
    """Sketch guidance: the edge predictor trained 60 steps (batch 8, lr 2e-3, seed 0, layers auto) on 32
    shapes-world scenes with their captions and Sobel edges; then 8 single-object prompts sampled (seed 3, 20
    euler steps, cfg 6; the DiT at its cfg 5) with their shape's outline at a fixed place as the sketch
    (strength 1.6, the first half of the steps) and without guidance, the same noise: edge IoU with the
    sketch."""
    from attention_control.attention.sketch import sobel_edges
    from attention_control.nodes import sketch as NS
    from attention_control.shapesworld import data as D
    from attention_control.shapesworld.comfy_glue import rgb_to_latent
    model, clip, _ = S.load() if host == "unet" else S.load_dit()
    cfg = S.CFG if host == "unet" else S.DIT_CFG
    imgs, caps, _objs = D.sample_batch(np.random.default_rng(0), 32)
    imgs = torch.from_numpy(imgs)
    with torch.inference_mode():
        lgp, loss = NS.train_predictor(model, rgb_to_latent(imgs), sobel_edges(imgs), S.encode(clip, caps), 60,
                                       2e-3, 8, 0)
    texts = ["a red square", "a blue circle", "a green triangle", "a yellow square"] * 2
    sk = torch.cat([_outline(t.split()[-1], 12 if i % 2 == 0 else 20, 12 if i % 3 == 0 else 19, 14)
                    for i, t in enumerate(texts)])
    pos, neg, lat = S.encode(clip, texts), S.encode(clip, [""] * len(texts)), M.latent(len(texts), 32, 32)
    with torch.inference_mode():
        gm = NS.build_guidance(model, lgp, sk.expand(-1, 3, -1, -1).permute(0, 2, 3, 1), 1.6, 0.0, 0.5,
                               "light on dark")
        guided = _edge_iou(S.to_rgb(S.sample(gm, pos, neg, lat, seed=3, cfg=cfg)), sk)
        plain = _edge_iou(S.to_rgb(S.sample(model, pos, neg, lat, seed=3, cfg=cfg)), sk)
    return {"n": len(texts), "iou_guided": float(np.mean(guided)), "iou_unguided": float(np.mean(plain)),
            "better": int(sum(g > p for g, p in zip(guided, plain))), "loss_first": loss[0], "loss_last": loss[-1]}


@pytest.mark.parametrize("host", ["unet", "dit"])
def test_sketch_guidance_follows_the_outline(host):
    r = sketch_measure(host)
    print(f"SEMANTIC sketch {host} {r}")
    # measured (self-attention values as features): UNet edge IoU 0.44 guided vs 0.16 unguided, guided higher on
    # 8 of 8 prompts (queries 0.44, keys 0.37; 0.33 after 40 training steps; strength 4 and above overshoots:
    # 0.16; layers down,mid only: 0.30); the shapes-world DiT (auto: double 0, single 0, 1, 3) 0.62 vs 0.25,
    # 8 of 8
    assert r["iou_guided"] >= 2.0 * r["iou_unguided"] and r["iou_guided"] >= r["iou_unguided"] + 0.15, r
    assert r["better"] >= r["n"] - 1, r


def test_prompt_switching_keeps_the_first_layout_and_the_second_colour():
    """eDiff-I prompt switching 'a red circle' -> 'a blue circle' at 0.3 of the schedule, 12 seeds: the object
    keeps the first prompt's layout (mask IoU with the first prompt alone, same noise) far more than the
    second prompt alone does, and takes the second prompt's colour."""
    from attention_control.nodes import prompt_switch as PS
    model, clip, _ = S.load()
    n = 12
    neg, lat = S.encode(clip, [""] * n), M.latent(n, 32, 32)
    sw = [[c[0].expand(n, -1, -1), c[1]]
          for c in PS.schedule_conditioning(clip, "0-0.3: a red circle\n0.3-1: a blue circle")]
    run = lambda pos: S.to_rgb(S.sample(model, pos, neg, lat, seed=21))
    first, second, switched = run(S.encode(clip, ["a red circle"] * n)), run(S.encode(clip, ["a blue circle"] * n)), \
        run(sw)

    def mask(img):
        objs = E.segment_objects(img)
        return objs[0]["mask"] if objs else np.zeros((32, 32), bool)
    iou_switched = float(np.mean([E.mask_iou(mask(switched[i]), mask(first[i])) for i in range(n)]))
    iou_second = float(np.mean([E.mask_iou(mask(second[i]), mask(first[i])) for i in range(n)]))
    blue = sum(E.colour_present(switched[i], "blue") for i in range(n))
    blue_first = sum(E.colour_present(first[i], "blue") for i in range(n))
    print(f"SEMANTIC prompt switch layout IoU {iou_switched:.2f} vs {iou_second:.2f}, blue {blue}/{n} "
          f"(first alone {blue_first})")
    # measured: IoU 0.59 vs 0.26, blue 12 / 12 (first prompt alone 0); switching at 0.1: 0.32, at 0.6: 0.81
    assert iou_switched >= iou_second + 0.2, (iou_switched, iou_second)
    assert blue >= n - 1 and blue_first <= 1, (blue, blue_first)


@pytest.mark.parametrize("which", ["unet", "dit"])
def test_word_segmentation_of_real_images_with_self_attention_refinement(which):
    """Segment Words on 8 generator scenes of two objects (real images: drawn, not sampled), the colour and
    shape word of each object: mask IoU with the generator's object mask. Baseline: the raw cross-attention
    of one forward thresholded at 0.5 (the heat-map node's masks); without refinement at its best threshold;
    with self-attention refinement (node defaults)."""
    from attention_control.nodes.segment import SegmentWords
    from attention_control.shapesworld import data as D
    model, clip, vae = S.load() if which == "unet" else S.load_dit()
    rng = np.random.default_rng(5)
    scenes = [D.sample_scene(rng, 2) for _ in range(8)]

    def masks(img, caption, words, refine, soft):
        image = torch.from_numpy(img)[None].repeat_interleave(8, 1).repeat_interleave(8, 2)
        out = SegmentWords.execute(model, clip, vae, image, caption, ", ".join(words), 0.1, 1, 0, refine, 0.5, soft)
        m = out.args[0] if hasattr(out, "args") else out[0]
        return torch.nn.functional.avg_pool2d(m[:, None], 8)[:, 0]             # back to the 32x32 scene

    ious = {"raw": [], "refined": [], **{f"unrefined@{t}": [] for t in (0.2, 0.3, 0.4, 0.5)}}
    kinds = {"colour": [], "shape": []}
    for img, caption, objs in scenes:
        words = [w for o in objs for w in (o["colour"], o["shape"])]
        truth = [o["mask"] for o in objs for _ in range(2)]
        soft0 = masks(img, caption, words, 0, True)
        refined = masks(img, caption, words, 1, False)
        for w, gt in enumerate(truth):
            ious["raw"].append(E.mask_iou((soft0[w] > 0.5).numpy(), gt))
            for t in (0.2, 0.3, 0.4, 0.5):
                ious[f"unrefined@{t}"].append(E.mask_iou((soft0[w] > t).numpy(), gt))
            r = E.mask_iou((refined[w] > 0.5).numpy(), gt)
            ious["refined"].append(r)
            kinds["colour" if w % 2 == 0 else "shape"].append(r - ious["raw"][-1])
    mean = {k: float(np.mean(v)) for k, v in ious.items()}
    best_unrefined = max(v for k, v in mean.items() if k.startswith("unrefined"))
    gain = {k: float(np.mean(v)) for k, v in kinds.items()}
    print(f"SEMANTIC segment words {which}: mask IoU refined {mean['refined']:.2f}, unrefined (best threshold) "
          f"{best_unrefined:.2f}, raw cross-attention {mean['raw']:.2f}; gain over raw: colour words "
          f"{gain['colour']:+.2f}, shape words {gain['shape']:+.2f}")
    # measured: unet 0.90 / 0.74 / 0.46; dit 0.84 / 0.78 / 0.71
    assert mean["refined"] >= mean["raw"] + (0.3 if which == "unet" else 0.08), mean
    assert mean["refined"] >= best_unrefined + 0.03, mean
    assert min(gain.values()) > 0.0, gain
