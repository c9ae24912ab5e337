"""Semantic tests on the shipped shapes-world model (issue 9): each technique does what its paper
promises, measured on fixed seeds with shapesworld.evaluate."""
import itertools

import numpy as np
import pytest
import torch

import ac_models as M
import ac_shapes as S
import nodes
from attention_control.nodes.capture import CaptureAttention
from attention_control.nodes.p2p import PromptToPrompt
from attention_control.shapesworld import evaluate as E

COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle"]


def two_object_captions(n):
    pairs = [(c1, s1, c2, s2) for c1, c2 in itertools.permutations(COLOURS, 2)
             for s1, s2 in itertools.permutations(SHAPES, 2)]
    rng = np.random.default_rng(0)
    idx = rng.choice(len(pairs), size=n, replace=False)
    return [pairs[i] for i in idx]


@pytest.fixture(scope="module")
def world():
    return S.load()


def test_capture_pointing_game(world):
    model, clip, _ = world
    caps = two_object_captions(32)
    texts = [f"a {c1} {s1} and a {c2} {s2}" for c1, s1, c2, s2 in caps]
    # all captions share one token layout: BOS a c1 s1 and a c2 s2 -> capture by token index
    from attention_control.nodes.common import resolve_words
    specs, _ = resolve_words(clip, texts[0], f"{caps[0][0]}, {caps[0][1]}, {caps[0][2]}, {caps[0][3]}")
    assert [s.positions for s in specs] == [[2], [3], [6], [7]]
    out = CaptureAttention.execute(model, clip, texts[0], "#2, #3, #6, #7", "16", 0.0, 1.0, False)
    cap_model, handle = out.result if hasattr(out, "result") else out
    pos = S.encode(clip, texts)
    neg = S.encode(clip, [""] * len(texts))
    lat = S.sample(cap_model, pos, neg, M.latent(len(texts), 32, 32), seed=11)
    rgb = S.to_rgb(lat)
    maps = handle.maps                                     # (B, 4, 16, 16)
    assert maps.shape == (len(texts), 4, 16, 16)
    hits = {"colour": [], "shape": []}
    for b, (c1, s1, c2, s2) in enumerate(caps):
        for colour, ci, si in ((c1, 0, 1), (c2, 2, 3)):
            objs = [o for o in E.segment_objects(rgb[b]) if o["colour"] == colour]
            if not objs:
                continue
            hits["colour"].append(E.pointing_game(maps[b, ci], objs[0]["mask"]))
            hits["shape"].append(E.pointing_game(maps[b, si], objs[0]["mask"]))
    n = len(hits["colour"])
    colour_rate = sum(hits["colour"]) / n
    shape_rate = sum(hits["shape"]) / n
    print(f"SEMANTIC capture pointing: colour {colour_rate:.2f} shape {shape_rate:.2f} over {n} objects")
    assert n >= 40
    assert colour_rate >= 0.90
    assert shape_rate >= 0.60


def _blue_square(rgb):
    objs = [o for o in E.segment_objects(rgb) if o["colour"] == "blue"]
    return objs[0]["mask"] if objs else None


def test_p2p_colour_swap_keeps_the_other_object(world):
    model, clip, _ = world
    src, tgt = "a red circle and a blue square", "a green circle and a blue square"
    ious, swapped, alone_ious = [], 0, []
    seeds = list(range(8))
    for seed in seeds:
        out = PromptToPrompt.execute(model, clip, M.latent(1, 32, 32), src, tgt, "replace", "", 0.8, "", 0.4,
                                     "", "", 0.3, 0.0, "")
        m, pos, neg, lat = out.result if hasattr(out, "result") else out
        res = S.to_rgb(S.sample(m, pos, neg, lat, seed=seed))
        a, b = _blue_square(res[0]), _blue_square(res[1])
        if a is not None and b is not None:
            ious.append(E.mask_iou(a, b))
        swapped += int(E.colour_present(res[1], "green") and not E.colour_present(res[1], "red"))
        # without control: the target prompt alone from the same noise
        plain = S.to_rgb(S.sample(model, S.encode(clip, [tgt]), S.encode(clip, [""]), M.latent(1, 32, 32), seed=seed))
        c = _blue_square(plain[0])
        if a is not None and c is not None:
            alone_ious.append(E.mask_iou(a, c))
    print(f"SEMANTIC p2p swap: colour changed {swapped}/{len(seeds)}, blue IoU {np.mean(ious):.2f} "
          f"(target alone {np.mean(alone_ious) if alone_ious else float('nan'):.2f})")
    assert len(ious) >= 6
    assert np.mean(ious) >= 0.8
    assert swapped >= 6
