"""Semantic tests of the DiT techniques on the shapes-world DiT (a Flux-class model trained on the
same synthetic shapes as the UNet world; shapesworld/README.md): capture pointing, measured with the
same measures as the UNet shapes world (`make test-semantic` prints the SEMANTIC lines).

Thresholds come from measurement on the shipped weights (see each test)."""
from __future__ import annotations

import functools
import itertools

import numpy as np
import torch

import ac_models as M
import ac_shapes as S
from attention_control.nodes.capture import CaptureAttention
from attention_control.nodes.common import resolve_words
from attention_control.shapesworld import evaluate as E

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")


def _res(out):
    return out.result if hasattr(out, "result") else out


def two_object_captions(n, seed=3):
    pairs = [(c1, s1, c2, s2) for c1, c2 in itertools.permutations(COLOURS, 2)
             for s1, s2 in itertools.permutations(SHAPES, 2)]
    idx = np.random.default_rng(seed).choice(len(pairs), size=n, replace=False)
    return [pairs[i] for i in idx]


@functools.lru_cache(maxsize=1)
def dit_capture_measure():
    """Pointing game of colour and shape words on the DiT's joint-attention maps (all blocks, 16x16
    token grid), the other object's colour word as a control, and chance (mask area)."""
    model, clip, _ = S.load_dit()
    caps = two_object_captions(24)
    texts = [f"a {c1} {s1} and a {c2} {s2}" for c1, s1, c2, s2 in caps]
    specs, _ = resolve_words(clip, texts[0], ", ".join(caps[0]))
    assert [s.positions for s in specs] == [[2], [3], [6], [7]]
    cap_model, handle = _res(CaptureAttention.execute(model, clip, texts[0], "#2, #3, #6, #7", "all", 0.0, 1.0,
                                                      False))
    lat = S.sample(cap_model, S.encode(clip, texts), S.encode(clip, [""] * len(texts)),
                   M.latent(len(texts), 32, 32), seed=17, cfg=S.DIT_CFG)
    rgb = S.to_rgb(lat)
    maps = handle.maps
    assert maps.shape == (len(texts), 4, 16, 16)
    colour, shape, other, chance = [], [], [], []
    for b, (c1, s1, c2, s2) in enumerate(caps):
        for col, ci, si, oi in ((c1, 0, 1, 2), (c2, 2, 3, 0)):
            objs = [o for o in E.segment_objects(rgb[b]) if o["colour"] == col]
            if objs:
                colour.append(E.pointing_game(maps[b, ci], objs[0]["mask"]))
                shape.append(E.pointing_game(maps[b, si], objs[0]["mask"]))
                other.append(E.pointing_game(maps[b, oi], objs[0]["mask"]))
                chance.append(float(objs[0]["mask"].mean()))
    return {"n": len(colour), "colour": float(np.mean(colour)), "shape": float(np.mean(shape)),
            "other_colour": float(np.mean(other)), "chance": float(np.mean(chance)),
            "blocks": list(handle.layers)}


def test_dit_capture_words_point_at_their_object():
    r = dit_capture_measure()
    print(f"SEMANTIC dit_capture {r}")
    assert r["n"] >= 24
    assert r["blocks"] == ["double:0", "double:1", "single:0", "single:1", "single:2", "single:3"]
    # measured (650-step weights): colour 0.925, shape 0.925, the other colour word 0.075, chance 0.18
    # (40 objects).
    # an object's colour word points at it far above chance and far above the other object's
    # colour word (which points at the other object)
    assert r["colour"] >= 0.8 and r["colour"] >= 3.0 * r["chance"] and r["other_colour"] <= 0.2, r
    assert r["shape"] >= 0.75 and r["shape"] >= 3.0 * r["chance"], r


@functools.lru_cache(maxsize=1)
def dit_regions_measure():
    """Attention-mask region prompts on the DiT (Chen et al.: each region's image tokens see the base
    prompt and their region's prompt): "a red circle" in a box on the left, "a blue square" on the
    right, the full caption as the base prompt, vs the plain caption, same seeds: how often is each
    colour in its own half?"""
    from attention_control.nodes.layout import Boxes
    from attention_control.nodes.regions import RegionConditioning, RegionPrompt
    model, clip, _ = S.load_dit()
    caption = "a red circle and a blue square"
    bx = _res(Boxes.execute("a red circle: 0.05,0.2,0.45,0.8\na blue square: 0.55,0.2,0.95,0.8", "fraction",
                            256, 256))[0]
    regs = _res(RegionPrompt.execute("", 1.0, None, None, bx))[0]
    m, pos = _res(RegionConditioning.execute(model, clip, regs, caption, 0.0))
    n = 12
    neg = S.encode(clip, [""] * n)
    lat = M.latent(n, 32, 32)
    out = S.to_rgb(S.sample(m, pos, neg, lat, seed=33, cfg=S.DIT_CFG))
    plain = S.to_rgb(S.sample(model, S.encode(clip, [caption] * n), neg, lat, seed=33, cfg=S.DIT_CFG))

    def placed(img):
        return E.box_hit(img, "red", (0.0, 0.0, 0.5, 1.0)) and E.box_hit(img, "blue", (0.5, 0.0, 1.0, 1.0))

    return {"n": n, "placed": float(np.mean([placed(out[i]) for i in range(n)])),
            "placed_plain": float(np.mean([placed(plain[i]) for i in range(n)]))}


def test_dit_region_prompts_put_each_colour_in_its_region():
    r = dit_regions_measure()
    print(f"SEMANTIC dit_regions {r}")
    # measured (650-step weights, image_attention full): 0.83 vs 0.08 for the plain caption (12 seeds)
    assert r["placed"] >= 0.7 and r["placed"] >= r["placed_plain"] + 0.4, r


LAYOUT_BOX = (0.5, 0.0, 1.0, 0.5)


@functools.lru_cache(maxsize=1)
def dit_layout_measure():
    """Layout guidance on the DiT (issue 18): 12 single objects ("a <colour> <shape>") guided into the
    top-right quadrant at the node's defaults (backward: strength 30, 5 iterations, the first 20 % of
    the steps; forward: strength 1.0 on the same steps), all blocks, vs unguided, same seeds: how
    often is the object's colour in the box, and is it found at all?"""
    from attention_control.nodes.layout import Boxes, LayoutGuidance
    model, clip, _ = S.load_dit()
    caps = [(c, s) for c in COLOURS for s in SHAPES]
    texts = [f"a {c} {s}" for c, s in caps]
    pos, neg = S.encode(clip, texts), S.encode(clip, [""] * len(texts))
    lat = M.latent(len(texts), 32, 32)
    bx = _res(Boxes.execute("red circle: " + ",".join(str(v) for v in LAYOUT_BOX), "fraction", 256, 256))[0]
    rate = lambda f, imgs: float(np.mean([f(imgs[i], c) for i, (c, _s) in enumerate(caps)]))
    hit = lambda img, c: E.box_hit(img, c, LAYOUT_BOX)
    out = {"n": len(caps)}
    plain = S.to_rgb(S.sample(model, pos, neg, lat, seed=901, cfg=S.DIT_CFG))
    out["hit_unguided"], out["found_unguided"] = rate(hit, plain), rate(E.colour_present, plain)
    for mode in ("backward", "forward"):
        # texts[0]'s phrase positions (2, 3) are every caption's colour and shape words
        m = _res(LayoutGuidance.execute(model, clip, texts[0], bx, mode, 30.0, 5, 0.2, 0.2, 1.0, "auto", "none"))[0]
        imgs = S.to_rgb(S.sample(m, pos, neg, lat, seed=901, cfg=S.DIT_CFG))
        out[f"hit_{mode}"], out[f"found_{mode}"] = rate(hit, imgs), rate(E.colour_present, imgs)
    return out


def test_dit_layout_guidance_moves_objects_into_the_box():
    r = dit_layout_measure()
    print(f"SEMANTIC dit_layout {r}")
    # measured (650-step weights, 20 euler steps, cfg 5): backward 1.0 and forward 1.0 in the box vs
    # 0.33 unguided, every object found (12 objects)
    for mode in ("backward", "forward"):
        assert r[f"hit_{mode}"] >= r["hit_unguided"] + 0.4, r
        assert r[f"found_{mode}"] >= 0.9, r


@functools.lru_cache(maxsize=1)
def dit_masactrl_measure():
    """MasaCtrl on the DiT (issue 18), as the UNet world's appearance test: source and target share
    the caption ("a <colour> <shape>", 8 subjects) but not the noise, so the target's object sits
    elsewhere; the appearance attribute is the background tone, which no caption names. Node defaults
    on DiTs (start block: depth 1/3), start step 4/50 as the paper; against the target sampled alone."""
    from attention_control.nodes.masactrl import MasaCtrl
    from test_semantic_shapes import _background_tone
    model, clip, _ = S.load_dit()
    rows = []
    for i, (c, s) in enumerate([(c, s) for c in COLOURS for s in SHAPES][:8]):
        m, pos, neg, lat = _res(MasaCtrl.execute(model, clip, M.latent(1, 32, 32), f"a {c} {s}", f"a {c} {s}", "",
                                                 4 / 50, -1, "mutual", "", "", 0.1, None, None))
        lat = dict(lat, batch_index=[0, 1])                    # target from other noise than the source
        res = S.to_rgb(S.sample(m, pos, neg, lat, seed=500 + i, cfg=S.DIT_CFG))
        plain = S.to_rgb(S.sample(model, pos, neg, lat, seed=500 + i, cfg=S.DIT_CFG))
        objs = [[o for o in E.segment_objects(img) if o["colour"] == c] for img in (res[0], res[1], plain[1])]
        if not all(objs):
            continue
        (src,), (tgt,), (alone,) = ([o[0]["centre"]] for o in objs)
        tone = [_background_tone(img) for img in (res[0], res[1], plain[1])]
        rows.append({"from_alone": float(np.hypot(tgt[0] - alone[0], tgt[1] - alone[1])),
                     "from_source": float(np.hypot(tgt[0] - src[0], tgt[1] - src[1])),
                     "tone_gap": abs(tone[1] - tone[0]), "tone_gap_alone": abs(tone[2] - tone[0]),
                     "source_unchanged": bool(torch.equal(res[0], plain[0]))})
    mean = lambda k: float(np.mean([r[k] for r in rows]))
    return {"n": len(rows), "target_shift_from_alone_px": mean("from_alone"),
            "target_shift_from_source_px": mean("from_source"), "tone_gap": mean("tone_gap"),
            "tone_gap_alone": mean("tone_gap_alone"), "tone_closer": sum(r["tone_gap"] < r["tone_gap_alone"] for r in rows),
            "source_unchanged": all(r["source_unchanged"] for r in rows)}


def test_dit_masactrl_target_keeps_its_layout_and_takes_the_source_appearance():
    r = dit_masactrl_measure()
    print(f"SEMANTIC dit_masactrl_appearance {r}")
    # measured (650-step weights, 8 subjects): the target's object 0.94 px from where it lies alone and 4.3 px
    # from the source's; background tone gap 0.008 vs 0.029 alone, closer in 8/8 (at start block 0 the
    # target copies the source's layout instead: 0.24 px from the source's object)
    assert r["n"] >= 6 and r["source_unchanged"], r
    assert r["target_shift_from_alone_px"] <= 1.5 and r["target_shift_from_source_px"] >= 3.0, r
    assert r["tone_gap"] <= 0.5 * r["tone_gap_alone"] and r["tone_closer"] >= 0.7 * r["n"], r


@functools.lru_cache(maxsize=1)
def dit_real_image_masactrl_measure():
    """MasaCtrl with a real image as the source on the DiT (issue 18): images the DiT made of "a <colour>
    <shape>" (8 subjects) flow-inverted (20 steps), Replay Source keeps item 0 on the trajectory, and
    the target (same caption, another seed's noise, so its object lies elsewhere) queries the real
    image's keys and values (node defaults, start step 4/50); CFG 5. As the generated-source test
    above: the target's object where it lies alone, the background tone taken from the image."""
    import comfy.sample
    from attention_control.nodes.inversion import FlowInversion, ReplaySource
    from attention_control.nodes.masactrl import MasaCtrl
    from test_semantic_shapes import _background_tone
    model, clip, _ = S.load_dit()
    rows, steps = [], 20
    for i, (c, s) in enumerate([(c, s) for c in COLOURS for s in SHAPES][:8]):
        cap = f"a {c} {s}"
        pos = S.encode(clip, [cap])
        x0 = S.sample(model, pos, S.encode(clip, [""]), M.latent(1, 32, 32), seed=700 + i, cfg=S.DIT_CFG)
        inv, traj, noise = _res(FlowInversion.execute(model, pos, {"samples": x0}, steps, "simple", 0.0, 0))
        m, p, n, lat = _res(MasaCtrl.execute(model, clip, inv, cap, cap, "", 4 / 50, -1, "mutual", "", "", 0.1, None,
                                             None))
        m = _res(ReplaySource.execute(m, traj))[0]
        nz = noise.generate_noise(lat)
        nz[1] = torch.randn(nz[1].shape, generator=torch.Generator().manual_seed(900 + i))
        with torch.inference_mode():
            out, alone = (comfy.sample.sample(mm, nz, steps, S.DIT_CFG, "euler", "simple", p, n, lat["samples"],
                                              disable_pbar=True, seed=0) for mm in (m, model))
        imgs = (S.to_rgb(x0)[0], S.to_rgb(out)[1], S.to_rgb(alone)[1])
        objs = [[o for o in E.segment_objects(img) if o["colour"] == c] for img in imgs]
        if not all(objs):
            continue
        src, tgt, lone = (o[0]["centre"] for o in objs)
        tone = [_background_tone(img) for img in imgs]
        rows.append({"err": float((out[:1] - x0).norm() / x0.norm()),
                     "from_alone": float(np.hypot(tgt[0] - lone[0], tgt[1] - lone[1])),
                     "from_source": float(np.hypot(tgt[0] - src[0], tgt[1] - src[1])),
                     "tone_gap": abs(tone[1] - tone[0]), "tone_gap_alone": abs(tone[2] - tone[0])})
    out = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    out.update(err=max(r["err"] for r in rows), n=len(rows),
               tone_closer=sum(r["tone_gap"] < r["tone_gap_alone"] for r in rows))
    return out


def test_dit_masactrl_with_an_inverted_real_image_as_the_source():
    r = dit_real_image_masactrl_measure()
    print(f"SEMANTIC dit_real_image_masactrl {r}")
    # measured (650-step weights, 7 of 8 subjects segmented): the target's object 0.49 px from where it
    # lies alone, 4.7 px from the image's; tone gap 0.016 vs 0.023 alone, closer in 5 of 7. Weaker than
    # with a generated source (0.009 vs 0.032): the replayed source is the CFG-1 inversion's path, the
    # target samples at CFG 5 (at CFG 2.5: 0.014 vs 0.020, 3 of 6)
    assert r["n"] >= 6 and r["err"] < 1e-5, r
    assert r["from_alone"] <= 1.5 and r["from_source"] >= 3.0, r
    assert r["tone_gap"] <= 0.8 * r["tone_gap_alone"] and r["tone_closer"] >= 0.6 * r["n"], r

@functools.lru_cache(maxsize=1)
def dit_p2p_measure():
    """Prompt-to-Prompt on the DiT (issue 18) at the node's defaults (replace, cross 0.8, self 0.4,
    every block): colour swap red -> green of the circle; is the blue square kept (mask IoU with the
    source), against the target caption sampled alone from the same noise?

    Which blocks carry the layout, measured here (8 seeds, IoU of the kept square): every block 0.93,
    the first half of the depth (2 double + 1 single) 0.86, the single blocks 0.85, the double blocks
    0.79, the last half 0.73, the target alone 0.29: every block takes part, so the default is all.
    The self window matters as on UNets: 0 -> 0.81 (and the swap shows in 4 of 8), 0.8 -> 0.99."""
    from attention_control.nodes.p2p import PromptToPrompt
    model, clip, _ = S.load_dit()
    src, tgt = "a red circle and a blue square", "a green circle and a blue square"

    def blue(rgb):
        objs = [o for o in E.segment_objects(rgb) if o["colour"] == "blue"]
        return objs[0]["mask"] if objs else None

    ious, alone, swapped, seeds = [], [], 0, range(8)
    for seed in seeds:
        m, pos, neg, lat = _res(PromptToPrompt.execute(model, clip, M.latent(1, 32, 32), src, tgt, "replace", "", 0.8,
                                                       "", 0.4, "", "", 0.3, 0.0, ""))
        res = S.to_rgb(S.sample(m, pos, neg, lat, seed=seed, cfg=S.DIT_CFG))
        plain = S.to_rgb(S.sample(model, S.encode(clip, [tgt]), S.encode(clip, [""]), M.latent(1, 32, 32), seed=seed,
                                  cfg=S.DIT_CFG))
        a, b, c = blue(res[0]), blue(res[1]), blue(plain[0])
        if a is not None:
            ious.append(E.mask_iou(a, b) if b is not None else 0.0)
            alone.append(E.mask_iou(a, c) if c is not None else 0.0)
        swapped += int(E.colour_present(res[1], "green") and not E.colour_present(res[1], "red"))
    return {"n": len(ious), "iou": float(np.mean(ious)), "iou_alone": float(np.mean(alone)), "swapped": swapped,
            "seeds": len(seeds)}


def test_dit_p2p_swap_changes_the_colour_and_keeps_the_other_object():
    r = dit_p2p_measure()
    print(f"SEMANTIC dit_p2p {r}")
    # measured (650-step weights): IoU 0.93 vs 0.29 alone, swapped in 7 of 8
    assert r["n"] >= 6 and r["swapped"] >= 6, r
    assert r["iou"] >= r["iou_alone"] + 0.4, r


@functools.lru_cache(maxsize=1)
def dit_real_image_p2p_measure():
    """Prompt-to-Prompt on a real image on the DiT (issue 18), as example_workflows/real_image_edit_dit:
    images the DiT made of "a red circle and a blue square" are flow-inverted (20 steps, their
    caption), Prompt-to-Prompt swaps red -> green (node defaults) on the inverted latent, Replay
    Source keeps item 0 on the trajectory, euler from the inverted noise at CFG 2.5. Against the
    target caption sampled from the same inverted noise without the edit: is the square kept (mask
    IoU with the image's), does the circle turn green where the red one was (IoU with the image's
    red circle), and is the source row the image?"""
    import comfy.sample
    from attention_control.nodes.inversion import FlowInversion, ReplaySource
    from attention_control.nodes.p2p import PromptToPrompt
    model, clip, _ = S.load_dit()
    src, tgt, steps, cfg = "a red circle and a blue square", "a green circle and a blue square", 20, 2.5

    def obj(rgb, colour):
        objs = [o for o in E.segment_objects(rgb) if o["colour"] == colour]
        return objs[0]["mask"] if objs else None

    def iou(a, b):
        return E.mask_iou(a, b) if b is not None else 0.0

    r = {k: [] for k in ("err", "iou", "iou_alone", "circle", "circle_alone", "swapped", "swapped_alone")}
    pos, empty = S.encode(clip, [src]), S.encode(clip, [""])
    for seed in range(60, 68):
        x0 = S.sample(model, pos, empty, M.latent(1, 32, 32), seed=seed, cfg=S.DIT_CFG)
        img = S.to_rgb(x0)[0]
        red, blue = obj(img, "red"), obj(img, "blue")
        if red is None or blue is None:
            continue
        inv, traj, noise = _res(FlowInversion.execute(model, pos, {"samples": x0}, steps, "simple", 0.0, 0))
        m, p, n, lat = _res(PromptToPrompt.execute(model, clip, inv, src, tgt, "replace", "", 0.8, "", 0.4, "", "",
                                                   0.3, 0.0, ""))
        m = _res(ReplaySource.execute(m, traj))[0]
        with torch.inference_mode():
            out = comfy.sample.sample(m, noise.generate_noise(lat), steps, cfg, "euler", "simple", p, n,
                                      lat["samples"], disable_pbar=True, seed=0)
            alone = comfy.sample.sample(model, noise.generate_noise(inv), steps, cfg, "euler", "simple",
                                        S.encode(clip, [tgt]), empty, inv["samples"], disable_pbar=True, seed=0)
        r["err"].append(float((out[:1] - x0).norm() / x0.norm()))
        for key, rgb in (("", S.to_rgb(out)[1]), ("_alone", S.to_rgb(alone)[0])):
            r["iou" + key].append(iou(blue, obj(rgb, "blue")))
            r["circle" + key].append(iou(red, obj(rgb, "green")))
            r["swapped" + key].append(int(E.colour_present(rgb, "green") and not E.colour_present(rgb, "red")))
    out = {k: float(np.mean(v)) for k, v in r.items()}
    out["err"] = max(r["err"])
    out["n"] = len(r["err"])
    return out


def test_dit_p2p_edits_an_inverted_real_image():
    r = dit_real_image_p2p_measure()
    print(f"SEMANTIC dit_real_image_p2p {r}")
    # measured (650-step weights, 8 seeds, 7 with both objects): square IoU 0.97 vs 0.77 without the
    # edit, the green circle where the red one was 0.70 vs 0.25, swapped 7 of 7 vs 6 of 7; at CFG 5 the edit keeps the square (0.96) but the swap fails more often (0.64): the inversion
    # ran at CFG 1, so editing an inverted image wants a low CFG (the example workflow uses 2.5)
    assert r["n"] >= 5 and r["err"] < 1e-5, r
    assert r["iou"] >= 0.85 and r["iou"] >= r["iou_alone"] + 0.1, r
    assert r["circle"] >= r["circle_alone"] + 0.2 and r["swapped"] >= 0.7, r

@functools.lru_cache(maxsize=1)
def dit_inversion_measure():
    """Flow inversion on the DiT (issue 18): images the DiT made (4 captions) inverted with their
    caption and sampled back (euler, cfg 1, the inverted noise): latent error relative to the image
    latent at 20 steps, and the objects' mask IoU with the original, against sampling the
    caption from fresh noise."""
    import comfy.sample
    from attention_control.nodes.inversion import FlowInversion
    model, clip, _ = S.load_dit()
    caps = ["a red circle and a blue square", "a green triangle and a yellow circle", "a blue square",
            "a yellow triangle"]
    out = {}
    for steps in (20,):
        errs, ious, fresh_ious = [], [], []
        for i, cap in enumerate(caps):
            pos = S.encode(clip, [cap])
            x0 = S.sample(model, pos, S.encode(clip, [""]), M.latent(1, 32, 32), seed=40 + i, cfg=S.DIT_CFG)
            inv, _traj, noise = _res(FlowInversion.execute(model, pos, {"samples": x0}, steps, "simple", 0.0, 0))
            with torch.inference_mode():
                rec = comfy.sample.sample(model, noise.generate_noise(inv), steps, 1.0, "euler", "simple", pos, pos,
                                          inv["samples"], disable_pbar=True, seed=0)
                fresh = comfy.sample.sample(model, torch.randn(x0.shape, generator=torch.Generator().manual_seed(99 + i)),
                                            steps, 1.0, "euler", "simple", pos, pos, torch.zeros_like(x0),
                                            disable_pbar=True, seed=0)
            errs.append(float((rec - x0).norm() / x0.norm()))
            a, b, c = (S.to_rgb(t)[0] for t in (x0, rec, fresh))
            for o in E.segment_objects(a):
                ob = [p for p in E.segment_objects(b) if p["colour"] == o["colour"]]
                oc = [p for p in E.segment_objects(c) if p["colour"] == o["colour"]]
                ious.append(E.mask_iou(o["mask"], ob[0]["mask"]) if ob else 0.0)
                fresh_ious.append(E.mask_iou(o["mask"], oc[0]["mask"]) if oc else 0.0)
        out[steps] = {"rel_err": float(np.mean(errs)), "iou": float(np.mean(ious)),
                      "iou_fresh": float(np.mean(fresh_ious)), "objects": len(ious)}
    return out


def test_dit_flow_inversion_reconstructs_real_images():
    r = dit_inversion_measure()
    print(f"SEMANTIC dit_inversion {r}")
    # measured (650-step weights): relative latent error 0.38 (10 steps) -> 0.22 (20) -> 0.12 (40); the
    # 7 objects' IoU with the original 0.78 / 0.80 / 0.82 against 0.04 from fresh noise
    # (the error's fall with the step count is tests/test_flow_inversion.py's)
    assert r[20]["objects"] >= 6 and r[20]["rel_err"] <= 0.3, r
    assert r[20]["iou"] >= 0.7 and r[20]["iou"] >= r[20]["iou_fresh"] + 0.5, r


@functools.lru_cache(maxsize=1)
def dit_time_measure():
    """TIME 'a circle' -> 'a red circle' on the shapes-world DiT (the edit lands on txt_in, the Flux class's
    text-entry projection), 16 images from one seed per prompt: the paper's efficacy ('a circle' red),
    generality ('a circle on the left' red) and specificity ('a blue circle' stays blue, never red), each
    against the plain model; and, as on the UNet, the edited model given 'a circle' against the plain model
    given the destination's aligned embeddings."""
    from attention_control.nodes import weight_edits as WE
    model, clip, _ = S.load_dit()
    n = 16
    edited, _edit = WE.EditAssumption.execute(model, clip, "a circle", "a red circle", 0.1, True, 1.0).result
    _c, aligned = WE.aligned_embeddings(clip, ["a circle"], ["a red circle"], False)
    neg = S.encode(clip, [""] * n)

    def run(m, prompt, ctx=None):
        pos = S.encode(clip, [prompt] * n)
        if ctx is not None:
            pos = [[ctx.expand(n, -1, -1).contiguous(), pos[0][1]]]
        return S.to_rgb(S.sample(m, pos, neg, M.latent(n, 32, 32), seed=0, cfg=S.DIT_CFG))

    def count(imgs, colour):
        return int(sum(E.colour_present(imgs[i], colour) for i in range(n)))

    def dist(a, b):
        return float((a - b).abs().mean())

    ed, plain, ideal = run(edited, "a circle"), run(model, "a circle"), run(model, "a circle", aligned[None])
    left_ed, left_plain = run(edited, "a circle on the left"), run(model, "a circle on the left")
    blue_ed, blue_plain = run(edited, "a blue circle"), run(model, "a blue circle")
    return {"n": n, "edited_to_ideal": dist(ed, ideal), "plain_to_ideal": dist(plain, ideal),
            "red_edited": count(ed, "red"), "red_plain": count(plain, "red"), "red_ideal": count(ideal, "red"),
            "left_red_edited": count(left_ed, "red"), "left_red_plain": count(left_plain, "red"),
            "blue_kept": count(blue_ed, "blue"), "blue_plain": count(blue_plain, "blue"),
            "blue_turned_red": count(blue_ed, "red")}


def test_dit_time_edit_efficacy_generality_and_specificity():
    """On the DiT the edit shows the paper's three effects, weakly (the random text encoder carries little of
    the added word into the other tokens; the DiT's joint attention reads them): 'a circle' comes out red
    3 of 16 times against 0 plain, 'a circle on the left' 3 against 0, 'a blue circle' stays blue 16 of 16
    and never turns red; and the edited model draws what the destination's aligned embeddings draw."""
    r = dit_time_measure()
    print(f"SEMANTIC dit_time_edit {r}")
    assert r["edited_to_ideal"] < 0.5 * r["plain_to_ideal"], r
    assert r["red_edited"] >= r["red_plain"] + 2, r
    assert r["left_red_edited"] >= r["left_red_plain"] + 2, r
    assert r["blue_kept"] >= r["blue_plain"] - 1 and r["blue_turned_red"] == 0, r
