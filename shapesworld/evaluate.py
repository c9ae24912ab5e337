"""Measures for shapes-world images and attention maps. Pure numpy / torch (no ComfyUI).

- ``segment_objects(rgb)``: palette-colour pixels -> connected components -> colour, shape, mask, bbox
- ``colour_present(rgb, colour)``, ``shape_of(rgb, colour)``
- ``pointing_game(attn_map, mask)``, ``mask_iou(a, b)``, ``box_hit(rgb, colour, box)``

Images are float RGB in [0, 1], either (3, H, W) or (H, W, 3) (numpy or torch). Images larger than
32x32 (e.g. 256x256 from the x8 VAE) are area-downscaled to 32x32 first.
"""
from __future__ import annotations

import logging
from collections import deque

import numpy as np
import torch

from .data import COLOURS, PALETTE, SHAPES, SIZE

logger = logging.getLogger(__name__)

MIN_SATURATION = 0.30   # max(rgb) - min(rgb): the background is grey/white (0), the palette >= 0.6
MAX_COLOUR_DIST = 0.45  # Euclidean RGB distance to the nearest palette colour
MIN_PIXELS = 6          # components smaller than this are noise

_PAL = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32)  # (4, 3)


def to_hwc(rgb) -> np.ndarray:
    """Any (3,H,W)/(H,W,3)/(1,...) numpy/torch image -> float32 numpy (32, 32, 3) in [0, 1]."""
    if isinstance(rgb, torch.Tensor):
        rgb = rgb.detach().float().cpu().numpy()
    a = np.asarray(rgb, dtype=np.float32)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 3:
        raise ValueError(f"expected an image (3,H,W) or (H,W,3), got shape {a.shape}")
    if a.shape[0] in (3, 4) and a.shape[-1] not in (3, 4):
        a = a.transpose(1, 2, 0)
    a = a[..., :3]
    h, w = a.shape[:2]
    if (h, w) != (SIZE, SIZE) and h % SIZE == 0 and w % SIZE == 0:
        fh, fw = h // SIZE, w // SIZE
        a = a.reshape(SIZE, fh, SIZE, fw, 3).mean(axis=(1, 3))
    return np.clip(a, 0.0, 1.0)


def classify_pixels(rgb) -> np.ndarray:
    """(H, W) int map: -1 background, else index into COLOURS."""
    a = to_hwc(rgb)
    sat = a.max(axis=-1) - a.min(axis=-1)
    d = np.linalg.norm(a[:, :, None, :] - _PAL[None, None], axis=-1)  # (H, W, 4)
    idx = d.argmin(axis=-1)
    ok = (sat >= MIN_SATURATION) & (d.min(axis=-1) <= MAX_COLOUR_DIST)
    return np.where(ok, idx, -1)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask (list of boolean masks)."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    comps = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        comp = np.zeros_like(mask, dtype=bool)
        q = deque([(y0, x0)])
        seen[y0, x0] = True
        while q:
            y, x = q.popleft()
            comp[y, x] = True
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    q.append((ny, nx))
        comps.append(comp)
    return comps


def classify_shape(mask: np.ndarray) -> str:
    """circle / square / triangle from the fill ratio of the bounding box and the row-width profile."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    bh, bw = y1 - y0 + 1, x1 - x0 + 1
    fill = mask.sum() / float(bh * bw)
    # triangle (apex up): the top rows are much narrower than the bottom rows
    rows = mask[y0:y1 + 1, x0:x1 + 1].sum(axis=1).astype(np.float32)
    k = max(1, bh // 4)
    top, bottom = rows[:k].mean(), rows[-k:].mean()
    taper = top / max(bottom, 1e-6)
    if fill < 0.66 or taper < 0.45:
        return "triangle"
    if fill > 0.88:
        return "square"
    return "circle"


def segment_objects(rgb) -> list[dict]:
    """Detected objects, largest first: dicts {colour, shape, mask (bool HxW), bbox (x0,y0,x1,y1) px,
    area, centre (x, y) px}. Components of one colour smaller than MIN_PIXELS are dropped."""
    lab = classify_pixels(rgb)
    out = []
    for ci, colour in enumerate(COLOURS):
        m = lab == ci
        if m.sum() < MIN_PIXELS:
            continue
        for comp in _components(m):
            n = int(comp.sum())
            if n < MIN_PIXELS:
                continue
            ys, xs = np.nonzero(comp)
            out.append({
                "colour": colour,
                "shape": classify_shape(comp),
                "mask": comp,
                "bbox": (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1),
                "area": n,
                "centre": (float(xs.mean()) + 0.5, float(ys.mean()) + 0.5),
            })
    out.sort(key=lambda o: -o["area"])
    return out


def _largest(rgb, colour: str):
    objs = [o for o in segment_objects(rgb) if o["colour"] == colour]
    return objs[0] if objs else None


def colour_present(rgb, colour: str) -> bool:
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; expected one of {COLOURS}")
    return _largest(rgb, colour) is not None


def shape_of(rgb, colour: str) -> str | None:
    """Shape of the largest object of that colour, or None when there is none."""
    o = _largest(rgb, colour)
    return None if o is None else o["shape"]


def _resize_map(m: torch.Tensor, hw) -> torch.Tensor:
    if tuple(m.shape) == tuple(hw):
        return m
    return torch.nn.functional.interpolate(m[None, None].float(), size=tuple(hw), mode="bilinear",
                                           align_corners=False)[0, 0]


def pointing_game(attn_map, mask) -> bool:
    """True when the argmax of the (resized) attention map falls inside the boolean mask."""
    m = torch.as_tensor(np.asarray(attn_map) if not isinstance(attn_map, torch.Tensor) else attn_map).float()
    mk = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask).bool()
    while m.ndim > 2:
        m = m[0] if m.shape[0] == 1 else m.mean(0)
    m = _resize_map(m, mk.shape)
    i = int(torch.argmax(m))
    return bool(mk.flatten()[i])


def mask_iou(a, b) -> float:
    a = np.asarray(a.cpu() if isinstance(a, torch.Tensor) else a).astype(bool)
    b = np.asarray(b.cpu() if isinstance(b, torch.Tensor) else b).astype(bool)
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 0.0


def box_hit(rgb, colour: str, box) -> bool:
    """An object of that colour has its centre inside box = (x0, y0, x1, y1) in fractions of the image."""
    x0, y0, x1, y1 = box
    for o in segment_objects(rgb):
        if o["colour"] != colour:
            continue
        cx, cy = o["centre"][0] / SIZE, o["centre"][1] / SIZE
        if x0 <= cx <= x1 and y0 <= cy <= y1:
            return True
    return False


def check_caption(rgb, caption: str) -> dict:
    """Colour presence and shape correctness for each "a <colour> <shape>" phrase of a caption."""
    words = caption.replace(",", " ").split()
    res = []
    for i in range(len(words) - 1):
        if words[i] in COLOURS and words[i + 1] in SHAPES:
            c, s = words[i], words[i + 1]
            got = shape_of(rgb, c)
            res.append({"colour": c, "shape": s, "present": got is not None, "shape_ok": got == s})
    return {"objects": res}
