"""ComfyUI glue of tiled sampling on DiT models (issue 17): each tile's model call gets the positions
its tokens have in the canvas, not positions that start at 0.

A DiT sees a tile as a whole image: its positional encoding starts at the tile's top-left token (or,
for SD3, is the centre crop of its position grid for the tile's size), so without this every tile is
placed at the origin of the image plane. Per family, through public ComfyUI patch points only (set in
a per-tile copy of the call's transformer_options, never in a shared dict):

- Flux, Flux.2, Wan 2.1, Lumina 2, Z-Image read `transformer_options["rope_options"]` when they
  build their RoPE ids (flux/model.py `process_img`, wan/model.py `rope_encode`, lumina/model.py
  `patchify_and_embed`): id = i * scale + shift, in patch units. A tile at latent offset (r0, c0) gets
  shift_y += (r0 / patch) * scale_y and shift_x += (c0 / patch) * scale_x, added to a rope_options
  another node set (ModelPatcher.set_model_rope_options), so its tokens get exactly the canvas's ids.
  One shift per model call: these families evaluate one tile per call (tile_batch_size does not
  batch them).
- Chroma and Qwen-Image do not read rope_options (0.3.75): their `_forward` builds the ids itself
  (Chroma: 0..h-1; Qwen-Image: centred on the image, text ids after max(h, w) / 2). Both hand the
  RoPE table to every block as `pe` through `patches_replace["dit"]`: the tile's call carries a
  replace patch at each of the model's blocks that swaps in the table of the canvas ids of the tile's
  tokens (built with the model's own `pe_embedder`, per batch row, so tiles batch), keeping the rows
  of tokens after the image (Kontext / edit reference images) as the model built them. Another
  patch at the same key is kept and called with the new table.
- SD3 adds an absolute sin-cos embedding before its blocks: the centre crop of a
  `pos_embed_max_size`^2 grid for the image's size (`cropped_pos_embed`). The canvas takes the centre
  crop for the canvas; a tile takes the window of that crop at its own offset: the replace patch at
  `("double_block", 0)` turns the image stream `x + crop(tile)` into `x + crop(tile) - crop(tile) +
  window` (float rounding of one subtraction away from the window added directly). Where the canvas
  (in patches) is larger than the grid along an axis, or along the width with wrap_horizontal (a
  cylinder has no absolute column), tiles keep the model's own crop along that axis (each tile as a
  standalone image there), logged once per run.

Everything else about a DiT call is the UNet path's: the latent and 5-D latents' frames (Wan: every
frame in each tile), concat latents (Wan i2v) and ControlNet token residuals are cropped, other
batch tensors repeated per tile, reference latents passed whole.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .core import AttentionControlError, UnsupportedModelError
from .dit_router import OVERRIDE_SLOT, DitOverride, detect_family, model_call_geometry

ROPE_OPTION_FAMILIES = ("Flux", "Flux.2", "Wan", "Lumina 2", "Z-Image")
PE_PATCH_FAMILIES = ("Chroma", "Qwen-Image")
ABS_EMBED_FAMILIES = ("SD3",)
# the DiT families whose tiles get their canvas positions (the router reaches more: HunyuanVideo, HiDream, ...;
# their positions are not reachable here, so tiling refuses them)
TILED_DIT_FAMILIES = ("Flux", "Flux.2", "Chroma", "SD3", "Wan", "Qwen-Image", "Lumina 2", "Z-Image")
VIDEO_FAMILIES = ("Wan", "Qwen-Image")         # 5-D latents (B, C, frames, H, W): tiled over H, W
UNET_FAMILIES = "SD1.x, SD2.x, SDXL (UNet models)"
HOW = {
    "Flux": "rope_options shift", "Flux.2": "rope_options shift", "Wan": "rope_options shift",
    "Lumina 2": "rope_options shift", "Z-Image": "rope_options shift",
    "Chroma": "RoPE table per block (patches_replace dit)", "Qwen-Image": "RoPE table per block (patches_replace dit)",
    "SD3": "position-embedding window (patches_replace dit, first block)",
}


def families_text() -> str:
    return f"{UNET_FAMILIES} and the DiT families {', '.join(TILED_DIT_FAMILIES)}"


@dataclass(frozen=True)
class DitTiling:
    """What tiling needs to know about a DiT: its family, spatial patch (latent pixels) and image
    pixels per latent pixel."""
    family: str
    patch: int
    px: int

    @property
    def per_call(self) -> int | None:
        """The most tiles one model call can take (None: any)."""
        return 1 if self.family in ROPE_OPTION_FAMILIES else None

    @property
    def ndims(self) -> tuple:
        return (4, 5) if self.family in VIDEO_FAMILIES else (4,)


def spatial_patch(family: str, dm) -> int:
    if family == "SD3":
        ps = dm.x_embedder.patch_size
    else:
        ps = getattr(dm, "patch_size", 1)
    if isinstance(ps, (tuple, list)):
        ps = ps[-1]
    return int(ps)


def latent_px(model) -> int:
    """Image pixels per latent pixel: the latent format's ratio where the host has it (newer
    ComfyUI), else 16 for the Flux.2 and Wan 2.2 VAEs and 8 for the others (0.3.75)."""
    fmt = getattr(model, "latent_format", None)
    r = getattr(fmt, "spacial_downscale_ratio", None)
    if r:
        return int(r)
    return 16 if type(fmt).__name__ in ("Flux2", "Wan22") else 8


def _is_unet(dm) -> bool:
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    return isinstance(dm, UNetModel)


def tiling_of(model_patcher) -> DitTiling | None:
    """None for a UNet model, the DitTiling of a supported DiT; UnsupportedModelError (naming the
    model and listing the families that tile) for any other model."""
    model = getattr(model_patcher, "model", model_patcher)
    dm = getattr(model, "diffusion_model", None)
    if dm is not None and _is_unet(dm):
        return None
    cls = type(dm) if dm is not None else type(model)
    try:
        fam = detect_family(model_patcher)
    except UnsupportedModelError:
        fam = None
    if fam not in TILED_DIT_FAMILIES:
        what = f"{fam} ({cls.__module__}.{cls.__name__})" if fam else f"{cls.__module__}.{cls.__name__}"
        raise UnsupportedModelError(
            f"model: tiled diffusion cannot give the tiles of {what} their positions in the canvas; it tiles "
            f"{families_text()}: remove the Tiled Diffusion node or use one of those models")
    return DitTiling(fam, spatial_patch(fam, dm), latent_px(model))


# --------------------------------------------------------------------------------------------
# per tile: transformer_options of one tile call

def _replace_dit(to: dict, patches: dict) -> None:
    """to["patches_replace"]["dit"] with `patches` added, as new dicts (the call's own are shared)."""
    pr = dict(to.get("patches_replace") or {})
    dit = dict(pr.get("dit") or {})
    for key, make in patches.items():
        dit[key] = make(dit.get(key))
    pr["dit"] = dit
    to["patches_replace"] = pr


class _PeSwap:
    """A dit block replace patch that hands the block (or the patch it replaces) another `pe`."""

    def __init__(self, table, prev):
        self.table, self.prev = table, prev

    def __call__(self, args, extra):
        args = dict(args)
        args["pe"] = self.table(args["pe"])
        if self.prev is not None:
            return self.prev(args, extra)
        return extra["original_block"](args)


class _ImgShift:
    """A dit block replace patch that adds `delta(img)` to the image stream before the block."""

    def __init__(self, delta, prev):
        self.delta, self.prev = delta, prev

    def __call__(self, args, extra):
        args = dict(args)
        args["img"] = self.delta(args["img"])
        if self.prev is not None:
            return self.prev(args, extra)
        return extra["original_block"](args)


def _block_keys(family: str, dm) -> list:
    if family == "Chroma":
        return ([("double_block", i) for i in range(len(dm.double_blocks))]
                + [("single_block", i) for i in range(len(dm.single_blocks))])
    return [("double_block", i) for i in range(len(dm.transformer_blocks))]        # Qwen-Image


def _rope_ids(family: str, pieces, B: int, canvas, patch: int, text_len: int, device,
              ids_dtype=torch.float32) -> torch.Tensor:
    """(len(pieces) * B, text_len + n_image, 3) ids of the text and the tiles' image tokens as the
    model builds them for the whole canvas (Chroma: text 0, image (0, row, col); Qwen-Image: text
    t0 + i on all axes with t0 = max(W, H) // 2 in patches, image (0, row - H // 2, col - W // 2)).
    Row and column numbers go through `ids_dtype` (the model's compute dtype, which both models
    build them in) as the model's own are rounded."""
    Hp, Wp = canvas[0] // patch, canvas[1] // patch
    rows = []
    for p in pieces:
        h, w = p.rows.size // patch, p.cols.size // patch
        r = (torch.arange(h, dtype=torch.float64, device=device) + p.rows.start // patch).to(ids_dtype).float()
        c = (torch.arange(w, dtype=torch.float64, device=device) + p.cols.start // patch).to(ids_dtype).float()
        img = torch.zeros(h, w, 3, dtype=torch.float32, device=device)
        if family == "Qwen-Image":
            img[:, :, 1] = (r - Hp // 2)[:, None]
            img[:, :, 2] = (c - Wp // 2)[None, :]
            t0 = max(Wp // 2, Hp // 2)
            txt = torch.arange(t0, t0 + text_len, dtype=torch.float32, device=device)[:, None].expand(text_len, 3)
        else:
            img[:, :, 1] = r[:, None]
            img[:, :, 2] = c[None, :]
            txt = torch.zeros(text_len, 3, dtype=torch.float32, device=device)
        ids = torch.cat([txt, img.reshape(h * w, 3)], dim=0)
        rows.append(ids.unsqueeze(0).expand(B, -1, -1))
    return torch.cat(rows, dim=0)


def _pe_table(family: str, dm, pieces, B: int, canvas, patch: int, text_len: int, ids_dtype):
    """The `table(pe)` of one tile call: the model's pe with the rows of the text and image tokens
    replaced by those of the canvas ids (computed once per call)."""
    cache = {}

    def table(pe):
        if "pe" not in cache:
            ids = _rope_ids(family, pieces, B, canvas, patch, text_len, pe.device, ids_dtype)
            new = dm.pe_embedder(ids)                        # (B, 1, N, d, 2, 2) (EmbedND)
            n = ids.shape[1]
            seq = 2 if pe.shape[1] == 1 and pe.ndim == new.ndim else 1      # newer hosts: (B, N, 1, ...)
            if seq == 1:
                new = new.squeeze(1).unsqueeze(2)
            if pe.shape[0] != new.shape[0] or pe.shape[seq] < n:
                raise AttentionControlError(
                    f"tiled diffusion: the {family} RoPE table has shape {tuple(pe.shape)}, not the {new.shape[0]} rows "
                    f"of {n} or more tokens this tile call implies; this ComfyUI version builds {family} positions "
                    f"differently: tile this model with one tile covering the canvas or update the pack")
            new = new.to(dtype=pe.dtype)
            if pe.shape[seq] > n:                           # reference-image tokens keep the model's rows
                new = torch.cat([new, pe.narrow(seq, n, pe.shape[seq] - n)], dim=seq)
            cache["pe"] = new.contiguous()
        return cache["pe"]

    return table


def sd3_axes(dm, canvas, patch: int, wrap: bool) -> tuple[bool, bool]:
    """Whether SD3 tiles get canvas positions along (height, width): the canvas fits the position
    grid along the axis (or the model has no grid) and, for the width, the canvas does not wrap."""
    m = getattr(dm, "pos_embed_max_size", None) if getattr(dm, "pos_embed", None) is not None else None
    fits = [m is None or (n + 1) // patch <= m for n in canvas]
    return fits[0], fits[1] and not wrap


def _sd3_delta(dm, pieces, B: int, canvas, patch: int, axes):
    """The `delta(img)` of one SD3 tile call: img - crop(tile) + the tile's window of the canvas crop."""
    cache = {}

    def delta(img):
        if "d" not in cache:
            rows = []
            for p in pieces:
                h, w = p.rows.size, p.cols.size
                Hv, r0 = (canvas[0], p.rows.start) if axes[0] else (h, 0)
                Wv, c0 = (canvas[1], p.cols.start) if axes[1] else (w, 0)
                full = dm.cropped_pos_embed((Hv, Wv), device=img.device)
                D = full.shape[-1]
                full = full.reshape((Hv + 1) // patch, (Wv + 1) // patch, D)
                r0p, c0p, hp, wp = r0 // patch, c0 // patch, (h + 1) // patch, (w + 1) // patch
                window = full[r0p:r0p + hp, c0p:c0p + wp].reshape(1, hp * wp, D)
                own = dm.cropped_pos_embed((h, w), device=img.device)
                rows.append((own.to(img.dtype), window.to(img.dtype)))
            cache["d"] = (torch.cat([o.expand(B, -1, -1) for o, _ in rows]),
                          torch.cat([wd.expand(B, -1, -1) for _, wd in rows]))
        own, window = cache["d"]
        return (img - own) + window

    return delta


def _shift_rope(to: dict, piece, patch: int) -> None:
    ro = dict(to.get("rope_options") or {})
    ro["shift_y"] = ro.get("shift_y", 0.0) + (piece.rows.start // patch) * ro.get("scale_y", 1.0)
    ro["shift_x"] = ro.get("shift_x", 0.0) + (piece.cols.start // patch) * ro.get("scale_x", 1.0)
    to["rope_options"] = ro


def tile_options(tiling: DitTiling, dm, to: dict, pieces, B: int, canvas, text_len: int | None,
                 sd3_axes_=(True, True), ids_dtype=torch.float32) -> None:
    """Set the canvas positions of `pieces` (one model call, B rows each) in `to`, a per-call copy of
    the call's transformer_options (nested dicts it changes are replaced, never mutated).
    text_len: tokens of the call's context (Chroma, Qwen-Image); sd3_axes_: sd3_axes();
    ids_dtype: the model's compute dtype."""
    fam, patch = tiling.family, tiling.patch
    if fam in ROPE_OPTION_FAMILIES:
        if len(pieces) != 1:
            raise AssertionError("rope_options families take one tile per model call")
        _shift_rope(to, pieces[0], patch)
    elif fam in PE_PATCH_FAMILIES:
        if text_len is None:
            raise AttentionControlError(f"tiled diffusion: a {fam} model call without text conditioning cannot be "
                                        f"positioned per tile")
        table = _pe_table(fam, dm, pieces, B, canvas, patch, text_len, ids_dtype)
        _replace_dit(to, {key: (lambda prev: _PeSwap(table, prev)) for key in _block_keys(fam, dm)})
    elif fam in ABS_EMBED_FAMILIES:
        if any(sd3_axes_):
            delta = _sd3_delta(dm, pieces, B, canvas, patch, sd3_axes_)
            _replace_dit(to, {("double_block", 0): lambda prev: _ImgShift(delta, prev)})


def crop_tokens(t, pieces, B: int, canvas, patch: int):
    """A (B, N, C) token tensor over the canvas's image tokens (a DiT ControlNet residual), cropped
    to each piece and batched piece-major; None where it is not over the canvas's tokens."""
    Hp, Wp = canvas[0] // patch, canvas[1] // patch
    if not (torch.is_tensor(t) and t.ndim == 3 and t.shape[0] == B and t.shape[1] == Hp * Wp):
        return None
    g = t.reshape(B, Hp, Wp, t.shape[-1])
    out = []
    for p in pieces:
        r = g[:, p.rows.start // patch:(p.rows.start + p.rows.size) // patch]
        cols = [(c0 // patch, n // patch) for c0, _l, n in p.cols.parts(canvas[1])]
        r = torch.cat([r[:, :, c0:c0 + n] for c0, n in cols], dim=2)
        out.append(r.reshape(B, -1, t.shape[-1]))
    return torch.cat(out, dim=0)


def batch_dit_control(control, pieces, B: int, canvas, patch: int, fallback):
    """DiT ControlNet residuals ({'input': [...], 'output': [...]}: (B, N_image, C) per block) for
    a batch of pieces: cropped on the token grid; anything else through `fallback` (the UNet path)."""
    if not isinstance(control, dict):
        return control
    out = {}
    for key, lst in control.items():
        if isinstance(lst, (list, tuple)):
            new = []
            for c in lst:
                tok = crop_tokens(c, pieces, B, canvas, patch) if c is not None else None
                new.append(tok if tok is not None else (None if c is None else fallback(c)))
            out[key] = new
        else:
            out[key] = lst
    return out


def fresh_override(to: dict, family: str, dm, xb, context, kwargs=None):
    """When the DiT attention router wraps the model call outside the tiles (attached before the
    tiled node), the call carries one DitOverride for the canvas: give each tile call its own, with
    the tile's geometry and its own call counter. Returns (outer, inner) or None."""
    ov = to.get(OVERRIDE_SLOT)
    if not isinstance(ov, DitOverride):
        return None
    geom = model_call_geometry(family, dm, xb, context, kwargs) if ov.router.controllers else None
    inner = DitOverride(ov.router, ov.prev, ov.run, geom)
    to[OVERRIDE_SLOT] = inner
    return ov, inner
