"""Synthetic "shapes world" data: 32x32 images of coloured shapes with captions and masks.

Pure numpy. Everything is deterministic from a ``numpy.random.Generator``.

An image has a flat near-white / light-grey background and one or two objects. Each object is a
shape (circle, square, triangle) in a saturated colour (red, green, blue, yellow), 8-16 px in
size, at a random position; two objects do not overlap (1 px gap at least) and never share a colour.

Captions: "a red circle", "a red circle and a blue square", and (a small fraction of single-object
images) "a red circle on the left" / "... on the right" / "... at the top" / "... at the bottom".
The caption set is finite: ``all_captions()`` lists it (used to precompute text embeddings).
"""
from __future__ import annotations

import itertools
import logging

import numpy as np

logger = logging.getLogger(__name__)

SIZE = 32
COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
PALETTE = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.70, 0.15),
    "blue": (0.10, 0.20, 0.90),
    "yellow": (0.95, 0.85, 0.10),
}
POSITIONS = ("on the left", "on the right", "at the top", "at the bottom")
MIN_SIZE, MAX_SIZE = 8, 16
P_TWO = 0.5          # fraction of images with two objects
P_POSITION = 0.1     # fraction of single-object captions that get a position phrase


def object_phrase(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


def all_captions() -> list[str]:
    """Every caption the generator can produce (sorted, deterministic)."""
    objs = [(c, s) for c in COLOURS for s in SHAPES]
    caps = set()
    for c, s in objs:
        caps.add(object_phrase(c, s))
        for p in POSITIONS:
            caps.add(f"{object_phrase(c, s)} {p}")
    for a, b in itertools.permutations(objs, 2):
        if a[0] == b[0]:
            continue  # two objects always have different colours
        caps.add(f"{object_phrase(*a)} and {object_phrase(*b)}")
    return sorted(caps)


_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5


def shape_mask(shape: str, cx: float, cy: float, size: float) -> np.ndarray:
    """Boolean (32, 32) mask of a shape of extent ``size`` px centred at (cx, cy) in pixels."""
    h = size / 2.0
    if shape == "circle":
        return (_XX - cx) ** 2 + (_YY - cy) ** 2 <= h * h
    if shape == "square":
        return (np.abs(_XX - cx) <= h) & (np.abs(_YY - cy) <= h)
    if shape == "triangle":
        # apex up, base at the bottom: width grows linearly from apex to base
        top, bottom = cy - h, cy + h
        frac = (_YY - top) / max(size, 1e-6)
        inside_y = (_YY >= top) & (_YY <= bottom)
        return inside_y & (np.abs(_XX - cx) <= frac * h)
    raise ValueError(f"unknown shape {shape!r}")


def position_word(cx: float, cy: float) -> str:
    dx, dy = cx / SIZE - 0.5, cy / SIZE - 0.5
    if abs(dx) >= abs(dy):
        return "on the left" if dx < 0 else "on the right"
    return "at the top" if dy < 0 else "at the bottom"


def _place(rng: np.random.Generator, shape: str, size: float, occupied: np.ndarray | None):
    for _ in range(60):
        h = size / 2.0
        cx = rng.uniform(h, SIZE - h)
        cy = rng.uniform(h, SIZE - h)
        m = shape_mask(shape, cx, cy, size)
        if m.sum() < 12:
            continue
        if occupied is None:
            return cx, cy, m
        # keep a 1 px gap: dilate the new mask by one pixel
        d = m.copy()
        d[1:] |= m[:-1]
        d[:-1] |= m[1:]
        d[:, 1:] |= m[:, :-1]
        d[:, :-1] |= m[:, 1:]
        if not (d & occupied).any():
            return cx, cy, m
        size = max(MIN_SIZE, size - 0.5)
    return None


def sample_scene(rng: np.random.Generator, n_objects: int | None = None):
    """One scene: (image float32 (32,32,3) in [0,1], caption, objects).

    objects: list of dicts {colour, shape, mask (bool 32x32), centre (x, y) in pixels, size}.
    """
    if n_objects is None:
        n_objects = 2 if rng.random() < P_TWO else 1
    bg = rng.uniform(0.80, 0.97)
    img = np.full((SIZE, SIZE, 3), bg, dtype=np.float32)
    objects = []
    occupied = None
    used = set()  # colours already used: two objects never share a colour
    while len(objects) < n_objects:
        colour = COLOURS[rng.integers(len(COLOURS))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        if colour in used:
            continue
        size = rng.uniform(MIN_SIZE, MAX_SIZE)
        placed = _place(rng, shape, size, occupied)
        if placed is None:
            continue
        cx, cy, m = placed
        used.add(colour)
        col = np.asarray(PALETTE[colour], dtype=np.float32)
        img[m] = col
        occupied = m if occupied is None else (occupied | m)
        objects.append({"colour": colour, "shape": shape, "mask": m, "centre": (cx, cy), "size": size})
    caption = " and ".join(object_phrase(o["colour"], o["shape"]) for o in objects)
    if n_objects == 1 and rng.random() < P_POSITION:
        caption = f"{caption} {position_word(*objects[0]['centre'])}"
    return img, caption, objects


def sample_batch(rng: np.random.Generator, n: int):
    """n scenes: images float32 (n, 3, 32, 32) in [0, 1], list of captions, list of object lists."""
    imgs = np.empty((n, 3, SIZE, SIZE), dtype=np.float32)
    caps, objs = [], []
    for i in range(n):
        img, cap, ob = sample_scene(rng)
        imgs[i] = img.transpose(2, 0, 1)
        caps.append(cap)
        objs.append(ob)
    return imgs, caps, objs
