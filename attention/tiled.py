"""Tiled sampling of canvases of any size: MultiDiffusion, Mixture of Diffusers, DiffCollage.

Papers (read for the facts, code written here):
- MultiDiffusion: Bar-Tal, Yariv, Lipman, Dekel, "MultiDiffusion: Fusing Diffusion Paths for
  Controlled Image Generation", ICML 2023. Every step, each window is denoised on its own and the
  results are averaged per pixel (panorama: weights 1).
- Mixture of Diffusers: Jimenez, "Mixture of Diffusers for scene composition and high resolution
  image generation", 2023. The tiles' noise predictions are mixed with Gaussian tile weights
  (variance 0.01 in tile-normalised coordinates, i.e. sigma = 0.1 x tile), normalised per pixel.
- DiffCollage: Zhang, Sheng, Liu, Li, Liu, Liu, Chen, "DiffCollage: Parallel Generation of Large
  Content with Diffusion Models", CVPR 2023. For a chain factor graph,
  `eps(x) = sum_tiles eps(x_i) - sum_overlaps eps(x_overlap)`, every term the same model
  evaluated on its own crop; the paper uses an overlap of half a tile, a 360 panorama closes the
  chain with the overlap across the seam.

All three are one operation here: a *plan* of pieces (crops of the canvas) with a per-pixel
weight each, and `merged = sum_pieces w_piece * f(crop_piece(x))` where `f` is one model call.
Because ComfyUI's denoised prediction is `a(sigma) x + b(sigma) out` with the same scalars for
every pixel, and the weights of every pixel sum to one in all three modes, merging denoised
predictions is the same as merging the raw model outputs (eps / v): the merge happens on the
denoised output of `apply_model`, for every parameterisation.

- multidiffusion: weights 1 per tile, normalised per pixel (plain average).
- mixture: separable Gaussian weights centred on each tile, sigma = 0.1 x tile side, normalised
  per pixel.
- diffcollage: sign +1 for tiles, -1 for the intersections of neighbouring tiles (not
  normalised; the signed coverage of every pixel is exactly 1, checked when planning). A row or
  column of tiles is the paper's chain. A 2-D grid uses the product of the row and column chains
  (inclusion-exclusion: + tiles, - horizontal and vertical overlaps, + the corner crops where four
  tiles meet); this extension is ours, the paper factorises chains and trees only.

Layout: along each axis tiles of `tile` latent pixels start every `tile - overlap`; the last tile
is shifted inward so that it ends at the canvas edge (no unrendered columns, the last overlap may
be larger). With horizontal wrap (360 panoramas) `ceil(W / (tile - overlap))` tiles are spread
evenly around the circle and tiles that cross the right edge continue at the left edge. A tile
larger than the canvas is clamped to the canvas. Pure torch: no ComfyUI import.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .core import AttentionControlError

MODES = ("multidiffusion", "mixture", "diffcollage")
# key of the per-call transformer_options inside a tiled model call: {"pieces": [...], "canvas": (H, W)}
TILE_KEY = "attention_control_tile"
MIXTURE_SIGMA = 0.1          # Gaussian sigma as a fraction of the tile side (Mixture of Diffusers: var 0.01)


@dataclass(frozen=True)
class Span:
    """An interval of one axis: indices (start + i) mod length for i < size (wrap only horizontally)."""
    start: int
    size: int
    sign: int = 1

    def parts(self, length: int) -> list[tuple[int, int, int]]:
        """[(canvas_start, local_start, n)] slices; two parts when the span crosses the edge."""
        s = self.start % length
        first = min(self.size, length - s)
        out = [(s, 0, first)]
        if first < self.size:
            out.append((0, first, self.size - first))
        return out


@dataclass(frozen=True)
class Piece:
    """One model call's crop of the canvas: rows x cols, with a sign (+1 tile, -1 overlap)."""
    rows: Span
    cols: Span
    kind: str = "tile"                # "tile" or "overlap"

    @property
    def sign(self) -> int:
        return self.rows.sign * self.cols.sign

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows.size, self.cols.size)


@dataclass(frozen=True)
class TileConfig:
    """Tile settings in latent pixels."""
    tile_h: int
    tile_w: int
    overlap: int
    mode: str = "multidiffusion"
    batch: int = 1
    wrap: bool = False

    def validate(self, names: dict | None = None, scale: int = 1) -> "TileConfig":
        """Configuration errors that do not depend on the canvas (input names as the node shows them)."""
        n = {"tile_h": "tile_height", "tile_w": "tile_width", "overlap": "overlap", "mode": "merge",
             "batch": "tile_batch_size", **(names or {})}
        if self.mode not in MODES:
            raise AttentionControlError(f"{n['mode']}: '{self.mode}' is not a merge mode; use one of {', '.join(MODES)}")
        for key in ("tile_h", "tile_w"):
            if getattr(self, key) < 1:
                raise AttentionControlError(f"{n[key]}: {getattr(self, key) * scale} is too small; use at least {scale}")
        if self.overlap < 0:
            raise AttentionControlError(f"{n['overlap']}: {self.overlap * scale} is negative; use 0 or more")
        small = min(self.tile_h, self.tile_w)
        if self.overlap >= small:
            which = n["tile_h"] if self.tile_h <= self.tile_w else n["tile_w"]
            raise AttentionControlError(
                f"{n['overlap']}: {self.overlap * scale} must be smaller than the tile ({which} = {small * scale}); "
                f"use an overlap of at most {(small - 1) * scale} (a quarter to a half of the tile is usual)")
        if self.batch < 1:
            raise AttentionControlError(f"{n['batch']}: {self.batch} must be 1 or more")
        return self


def axis_tiles(length: int, tile: int, overlap: int, wrap: bool = False, align: int = 1) -> list[Span]:
    """Tiles covering [0, length) exactly: stride tile - overlap, the last one shifted inward
    (or, with wrap, spread evenly around the circle). A tile longer than the axis is clamped.
    `align`: every start is a multiple of it (a DiT's patch size; length, tile and overlap must be
    multiples of it, which the callers check); 1 gives the plain layout."""
    if length < 1:
        raise AttentionControlError(f"latent: an empty canvas side ({length}) cannot be tiled")
    tile = min(tile, length)
    if tile >= length:
        return [Span(0, length)]
    stride = tile - overlap
    if stride < 1:
        raise AttentionControlError(f"overlap: {overlap} latent pixels leaves no stride for tiles of {tile}; "
                                    f"use an overlap smaller than the tile")
    if wrap:
        n = math.ceil(length / stride)
        units = length // align
        return [Span(align * ((i * units) // n), tile) for i in range(n)]
    n = math.ceil((length - tile) / stride) + 1
    starts = [min(i * stride, length - tile) for i in range(n)]
    return [Span(s, tile) for s in starts]


def axis_overlaps(tiles: list[Span], length: int, wrap: bool = False) -> list[Span]:
    """Intersections of neighbouring tiles (sign -1); with wrap also the last-first one across the seam."""
    out = []
    pairs = list(zip(tiles[:-1], tiles[1:]))
    if wrap and len(tiles) > 2:
        pairs.append((tiles[-1], tiles[0]))
    for a, b in pairs:
        both = (coverage([a], length) > 0) & (coverage([b], length) > 0)
        if not both.any():
            continue
        runs = _circular_runs(both) if wrap else _circular_runs(torch.cat([both, torch.zeros(1, dtype=torch.bool)]))
        out += [Span(s, n, -1) for s, n in runs]          # two strips only for two tiles around a circle
    return out


def _circular_runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """(start, length) of the runs of True in a circular boolean vector (not all True)."""
    n = mask.numel()
    if bool(mask.all()):
        return [(0, n)]
    off = int(torch.nonzero(~mask)[0])
    runs, start = [], None
    for i in range(1, n + 1):
        j = (off + i) % n
        if bool(mask[j]) and start is None:
            start = j
        elif not bool(mask[j]) and start is not None:
            runs.append((start, (j - start) % n))
            start = None
    return runs


def coverage(spans: list[Span], length: int, signed: bool = False) -> torch.Tensor:
    c = torch.zeros(length, dtype=torch.float64)
    for s in spans:
        for cs, _ls, n in s.parts(length):
            c[cs:cs + n] += s.sign if signed else 1
    return c


@dataclass(frozen=True)
class Plan:
    height: int
    width: int
    mode: str
    pieces: tuple
    tile_h: int
    tile_w: int
    wrap: bool
    grid: tuple                       # (tiles along height, tiles along width)

    @property
    def single(self) -> bool:
        return len(self.pieces) == 1 and self.pieces[0].shape == (self.height, self.width)

    def describe(self, scale: int = 8) -> str:
        n_ovl = sum(1 for p in self.pieces if p.kind == "overlap")
        extra = f" + {n_ovl} overlap crops" if n_ovl else ""
        return (f"{self.grid[0]}x{self.grid[1]} tiles of {self.tile_w * scale}x{self.tile_h * scale} px{extra} on a "
                f"{self.width * scale}x{self.height * scale} px canvas ({self.mode}{', wrapped' if self.wrap else ''})")


def plan_tiles(height: int, width: int, cfg: TileConfig, align: int = 1) -> Plan:
    """The pieces that one tiled model call evaluates on an (height, width) latent. With `align`
    (a DiT's patch size in latent pixels) every piece starts and ends on the patch grid."""
    if align > 1:
        for what, v in (("latent: the canvas height", height), ("latent: the canvas width", width),
                        ("tile_height: the tile height", cfg.tile_h), ("tile_width: the tile width", cfg.tile_w),
                        ("overlap: the overlap", cfg.overlap)):
            if v % align:
                raise AttentionControlError(f"{what} ({v} latent pixels) is not a multiple of the model's patch "
                                            f"size ({align} latent pixels)")
    wrap = cfg.wrap and cfg.tile_w < width
    rows = axis_tiles(height, cfg.tile_h, cfg.overlap, False, align)
    cols = axis_tiles(width, cfg.tile_w, cfg.overlap, wrap, align)
    pieces = [Piece(r, c) for r in rows for c in cols]
    if cfg.mode == "diffcollage":
        r_all = [(r, "tile") for r in rows] + [(r, "overlap") for r in axis_overlaps(rows, height, False)]
        c_all = [(c, "tile") for c in cols] + [(c, "overlap") for c in axis_overlaps(cols, width, wrap)]
        pieces = [Piece(r, c, "tile" if (kr == "tile" and kc == "tile") else "overlap")
                  for r, kr in r_all for c, kc in c_all]
        for spans, length, name in ((rows, height, "height"), (cols, width, "width")):
            ovl = axis_overlaps(spans, length, wrap and name == "width")
            signed = coverage(spans + ovl, length, signed=True)
            if not torch.all(signed == 1):
                raise AttentionControlError(
                    f"overlap: with merge = diffcollage the tiles along the {name} must form a chain (each pixel in "
                    f"fewer overlaps than tiles); reduce the overlap (DiffCollage uses half a tile) or "
                    f"enlarge the tile")
    return Plan(height, width, cfg.mode, tuple(pieces), min(cfg.tile_h, height), min(cfg.tile_w, width), wrap,
                (len(rows), len(cols)))


# --------------------------------------------------------------------------------------------
# crops and merge

def crop(t: torch.Tensor, piece: Piece, height: int, width: int) -> torch.Tensor:
    """The piece's crop of a tensor whose last two dims are (height, width), or a downscaled level
    of it (ceil-halving, as the UNet's levels: ControlNet residuals): start floor-divided, size the
    level size of the piece."""
    h, w = t.shape[-2], t.shape[-1]
    rows, cols = piece.rows, piece.cols
    if (h, w) != (height, width):
        k = level_of(height, width, h, w)
        if k is None:
            raise ValueError(f"cannot crop a {tuple(t.shape)} tensor for a {height}x{width} canvas")
        rows = Span(min(rows.start >> k, h - _ceil_halve(rows.size, k)), _ceil_halve(rows.size, k))
        cols = Span((cols.start >> k) % w, _ceil_halve(cols.size, k))
        height, width = h, w
    r = t[..., rows.start:rows.start + rows.size, :]
    parts = cols.parts(width)
    if len(parts) == 1:
        cs, _, n = parts[0]
        return r[..., cs:cs + n]
    return torch.cat([r[..., cs:cs + n] for cs, _, n in parts], dim=-1)


def canvas_level(height: int, width: int, ds: int) -> tuple[int, int]:
    """(h, w) of the canvas at a UNet level with downscale factor ds (ceil-halving per level)."""
    k = max(int(ds), 1).bit_length() - 1
    return _ceil_halve(height, k), _ceil_halve(width, k)


def crop_per_piece(t: torch.Tensor, pieces, height: int, width: int) -> torch.Tensor:
    """(P, ..., h, w): each piece's crop of a canvas tensor (..., H_l, W_l) at the canvas size or one
    of its levels, stacked."""
    return torch.stack([crop(t, p, height, width) for p in pieces])


def _ceil_halve(n: int, k: int) -> int:
    for _ in range(k):
        n = (n + 1) // 2
    return n


def level_of(height: int, width: int, h: int, w: int, max_levels: int = 8) -> int | None:
    for k in range(max_levels + 1):
        if (_ceil_halve(height, k), _ceil_halve(width, k)) == (h, w):
            return k
    return None


def gaussian_1d(size: int, sigma_frac: float = MIXTURE_SIGMA) -> torch.Tensor:
    """Mixture of Diffusers' tile weight along one side: exp(-(u - mid)^2 / (2 (sigma_frac size)^2))."""
    u = torch.arange(size, dtype=torch.float64)
    mid = (size - 1) / 2.0
    return torch.exp(-((u - mid) ** 2) / (2.0 * (sigma_frac * size) ** 2))


def raw_weight(piece: Piece, mode: str) -> torch.Tensor:
    h, w = piece.shape
    if mode == "mixture":
        return gaussian_1d(h)[:, None] * gaussian_1d(w)[None, :]
    return torch.full((h, w), float(piece.sign), dtype=torch.float64)


def piece_weights(plan: Plan, device=None, dtype=torch.float32) -> list[torch.Tensor]:
    """Per-piece (h, w) weights whose sum at every canvas pixel is 1 (normalised per pixel for
    multidiffusion and mixture; the signed coverage for diffcollage, already 1)."""
    raws = [raw_weight(p, plan.mode) for p in plan.pieces]
    if plan.mode == "diffcollage":
        return [r.to(device=device, dtype=dtype) for r in raws]
    total = torch.zeros(plan.height, plan.width, dtype=torch.float64)
    for p, r in zip(plan.pieces, raws):
        accumulate(total, r, p, plan.height, plan.width)
    return [(r / crop(total, p, plan.height, plan.width)).to(device=device, dtype=dtype)
            for p, r in zip(plan.pieces, raws)]


def accumulate(out: torch.Tensor, value: torch.Tensor, piece: Piece, height: int, width: int) -> None:
    """out[..., piece] += value (in place; wrapped columns land at the left edge)."""
    r = out[..., piece.rows.start:piece.rows.start + piece.rows.size, :]
    for cs, ls, n in piece.cols.parts(width):
        r[..., cs:cs + n] += value[..., ls:ls + n]


def batches(plan: Plan, batch_size: int) -> list[list[int]]:
    """Piece indices grouped by crop size (only equal sizes share a model call), at most
    batch_size per group, in plan order."""
    by_shape: dict = {}
    for i, p in enumerate(plan.pieces):
        by_shape.setdefault(p.shape, []).append(i)
    out = []
    for idx in by_shape.values():
        for s in range(0, len(idx), batch_size):
            out.append(idx[s:s + batch_size])
    return out


def tiled_call(x: torch.Tensor, plan: Plan, weights: list[torch.Tensor], batch_size: int, call) -> torch.Tensor:
    """merged = sum_pieces w_p * f(crop_p(x)).

    `call(indices, x_batch)` gets the pieces' indices and their crops of x concatenated along the
    batch (piece-major: piece 0's B rows, then piece 1's ...) and returns f of that batch, same
    layout. Returns a tensor shaped like x."""
    out = None
    B = x.shape[0]
    for idx in batches(plan, batch_size):
        xb = torch.cat([crop(x, plan.pieces[i], plan.height, plan.width) for i in idx], dim=0)
        yb = call(idx, xb)
        if out is None:                  # (B, C_out[, frames], H, W): the output's own channels
            out = torch.zeros((B,) + yb.shape[1:-2] + x.shape[-2:], dtype=yb.dtype, device=yb.device)
        for j, i in enumerate(idx):
            w = weights[i].to(device=yb.device, dtype=yb.dtype)
            accumulate(out, yb[j * B:(j + 1) * B] * w, plan.pieces[i], plan.height, plan.width)
    return out


# --------------------------------------------------------------------------------------------
# conditioning per piece

def repeat_rows(t: torch.Tensor, k: int) -> torch.Tensor:
    return t if k == 1 else torch.cat([t] * k, dim=0)


def batch_spatial(t: torch.Tensor, pieces: list[Piece], height: int, width: int) -> torch.Tensor:
    return torch.cat([crop(t, p, height, width) for p in pieces], dim=0)


def is_spatial(t, B: int, height: int, width: int, ndims=(4,)) -> bool:
    return (torch.is_tensor(t) and t.ndim in ndims and t.shape[0] == B
            and level_of(height, width, t.shape[-2], t.shape[-1]) is not None)


def batch_kwarg(t, pieces: list[Piece], B: int, height: int, width: int, ndims=(4,), lists: bool = False):
    """A model input for a batch of pieces: spatial (B, C, h, w) tensors at the canvas size or one
    of its levels are cropped, other (B, ...) tensors repeated per piece, anything else unchanged.
    `ndims`: the ranks of spatial tensors ((4, 5) where video / 5-D image latents are tiled over
    their last two dims); `lists`: the (B, ...) tensors of a list (reference latents of DiT edit
    models: whole images, not crops of the canvas) are repeated per piece too."""
    if is_spatial(t, B, height, width, ndims):
        return batch_spatial(t, pieces, height, width)
    if torch.is_tensor(t) and t.ndim >= 1 and t.shape[0] == B:
        return repeat_rows(t, len(pieces))
    if lists and isinstance(t, list):
        return [repeat_rows(v, len(pieces)) if torch.is_tensor(v) and v.ndim >= 1 and v.shape[0] == B else v
                for v in t]
    return t


def batch_control(control, pieces: list[Piece], B: int, height: int, width: int):
    """ControlNet / T2I-adapter residuals ({'input': [...], 'middle': [...], 'output': [...]}) for
    a batch of pieces: each residual cropped at its level. New lists every call (the UNet pops them)."""
    if not isinstance(control, dict):
        return control
    out = {}
    for key, lst in control.items():
        if isinstance(lst, (list, tuple)):
            out[key] = [None if c is None else batch_kwarg(c, pieces, B, height, width) for c in lst]
        else:
            out[key] = lst
    return out


def sdxl_size_rows(y: torch.Tensor, pieces: list[Piece], embed, scale: int = 8, pooled: int = 1280) -> torch.Tensor:
    """SDXL's ADM vector per piece: [pooled | orig h | orig w | crop top | crop left | target h | target w]
    (256 each). The original size is kept as given; the crop becomes the piece's offset in the
    canvas and the target its size (pixels), so each tile is conditioned as the crop of a large
    image that it is. `embed(value) -> (256,)`."""
    rows = []
    for p in pieces:
        yp = y.clone()
        vals = [p.rows.start * scale, p.cols.start * scale, p.rows.size * scale, p.cols.size * scale]
        emb = torch.cat([embed(v).reshape(-1) for v in vals]).to(device=y.device, dtype=y.dtype)
        yp[:, pooled + 512:pooled + 1536] = emb
        rows.append(yp)
    return torch.cat(rows, dim=0)
