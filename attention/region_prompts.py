"""Region prompts: MultiDiffusion's region-based generation with bootstrapping (Bar-Tal, Yariv,
Lipman, Dekel 2023, "MultiDiffusion: Fusing Diffusion Paths for Controlled Image Generation",
section 4.2; reference code omerbt/MultiDiffusion, region_based.py).

Each region i has a prompt and a weight map W_i (mask x strength); the background prompt gets
W_0 = max(0, 1 - sum_i mask_i). Every step the regions' predictions are averaged per pixel,

    D(x) = sum_i W_i D_i(x) / sum_i W_i ,

which is exactly how ComfyUI's own `calc_cond_batch` combines masked conditioning entries (each
entry's output weighted by its mask and strength, divided by the summed weights): the node emits
one masked CONDITIONING entry per region (plus the background) and lets the host average them.
With a first-order sampler step (Euler, DDIM) this is the paper's closed form: the stepped latents
averaged with the weights W_i.

What the host cannot do is the paper's *bootstrapping*: for the first fraction of the steps (20 of
50 by default) each foreground region sees, outside its mask, a random constant colour noised to
the current level, so that the region's prompt must put its object inside the mask:

    x_i = x * m_i + noise_scaling(sigma, n, c) * (1 - m_i)

with n the run's initial noise and c a constant-colour latent drawn from a pool of random colours
(one pool per run, one draw per step and region). As in the paper, each region's classifier-free
guidance is taken at its own bootstrapped latent (its prompt and the negative, both at x_i), so in
the bootstrap steps `RegionController` computes the step's prediction itself through the guider
(PREDICT_NOISE wrapper: the host's `sampling_function` per region, the host's conditioning weights
for the average); the other steps are the host's own. Tiled Diffusion composes underneath (each
of those model calls is tiled).

Masks: any size, pixel or latent space, soft or binary; each is resized to the latent (area
average when shrinking, bilinear when growing) when sampling starts, boxes are rasterised there
exactly (area coverage). A region whose mask covers nothing at the latent size is an error; pixels
that no region covers go to the background prompt; overlapping regions are averaged by weight.
Pure torch: the host-specific pieces (noise scaling, colour -> latent) are passed in.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .core import AttentionControlError, Controller, Run
from .layout import Box, box_coverage
from .regions import mask_at

# key of a region's conditioning entries: RegionTag
REGION_KEY = "attention_control_region"
# constant backgrounds of bootstrapping: random RGB colours (the paper) or random grey levels
BOOTSTRAP_COLOURS = ("random", "grey")


@dataclass(frozen=True, eq=False)
class Region:
    """One region prompt: a mask (H, W) of any size and/or boxes (fractions), and a strength. A
    video region on a DiT model may carry one mask per frame, (F, H, W) (`dit_regions`)."""
    prompt: str
    mask: torch.Tensor | None = None
    boxes: tuple[Box, ...] = ()
    strength: float = 1.0

    def describe(self) -> str:
        p = self.prompt if len(self.prompt) <= 40 else self.prompt[:37] + "..."
        return f"'{p}'"

    def mask_at(self, h: int, w: int) -> torch.Tensor:
        """(h, w) weight map in [0, 1] at a latent size: the mask resized and/or the boxes' exact
        area coverage (their union, with the mask: the maximum)."""
        out = torch.zeros(h, w)
        if self.mask is not None:
            out = torch.maximum(out, mask_at(self.mask.float(), h, w).reshape(h, w).clamp(0.0, 1.0))
        for b in self.boxes:
            out = torch.maximum(out, box_coverage(b, h, w))
        return out


class Regions(tuple):
    """The REGIONS value: a tuple of Region, in the order they were added."""

    def __deepcopy__(self, memo):
        return self


@dataclass(frozen=True)
class RegionTag:
    """Marks a conditioning entry as region `index` (0 = background) of the node `owner`."""
    owner: int
    index: int
    label: str = ""


def check_region(region: Region, where: str) -> Region:
    if not region.prompt.strip():
        raise AttentionControlError(f"{where}: the region has no prompt; write what the region should show")
    if region.mask is None and not region.boxes:
        raise AttentionControlError(f"{where}: connect a MASK or BOXES for the region {region.describe()}")
    if region.mask is not None:
        m = region.mask
        if m.ndim not in (2, 3) or (m.ndim == 3 and m.shape[0] < 1):
            raise AttentionControlError(f"{where}: the mask must be one (H, W) mask (or (F, H, W), one per frame "
                                        f"of a video), got shape {tuple(m.shape)}")
        if not torch.isfinite(m).all():
            raise AttentionControlError(f"{where}: the mask of {region.describe()} has non-finite values")
        if float(m.max()) <= 0.0 and not region.boxes:
            raise AttentionControlError(
                f"{where}: the mask of region {region.describe()} covers nothing (all zero); paint the region "
                "or remove it")
    if not (0.0 <= region.strength < float("inf")):                 # NaN fails too
        raise AttentionControlError(f"{where}: strength must be a finite number >= 0, got {region.strength}")
    return region


def region_weights(regions, h: int, w: int, background: bool = True) -> tuple[list[torch.Tensor], torch.Tensor]:
    """([(h, w) mask of each region], (h, w) background mask = max(0, 1 - sum of the masks)).
    Raises for a region that covers nothing at this size."""
    masks = []
    for i, r in enumerate(regions):
        m = r.mask_at(h, w)
        if float(m.max()) <= 0.0:
            raise AttentionControlError(
                f"regions: region {i + 1} {r.describe()} covers no latent pixel at this {h}x{w} latent "
                f"({8 * h}x{8 * w} px for an 8x VAE); enlarge its mask or box")
        masks.append(m)
    total = torch.stack(masks).sum(0) if masks else torch.zeros(h, w)
    bg = (1.0 - total).clamp(0.0, 1.0) if background else torch.zeros(h, w)
    return masks, bg


def bootstrap_latent(x: torch.Tensor, sigma: torch.Tensor, keep: torch.Tensor, colour: torch.Tensor,
                     noise: torch.Tensor, noise_scaling) -> torch.Tensor:
    """x * keep + noise_scaling(sigma, noise, colour) * (1 - keep), row by row: keep (R, 1, H, W) in
    [0, 1] (1 = the row's own latent), colour (R, C) constant latents, noise (R, C, H, W) (or
    (R, C, T, H, W) for video latents, keep broadcast over frames), sigma (R,).
    Rows with keep == 1 come back bit-identical."""
    keep = keep.to(device=x.device, dtype=x.dtype)
    c = colour.to(device=x.device, dtype=x.dtype)
    c = c.reshape(tuple(c.shape) + (1,) * (x.ndim - 2)).expand_as(x)      # (R, C, [T,] H, W): video latents too
    bg = noise_scaling(sigma.to(x), noise.to(device=x.device, dtype=x.dtype), c)
    return x * keep + bg * (1.0 - keep)


class RegionController(Controller):
    """Bootstrapping of MultiDiffusion's region-based generation (the averaging itself is the host's
    masked conditioning; in the bootstrap steps the controller computes the step's prediction)."""
    name = "region prompts"
    kinds = frozenset()
    wraps_guider = True

    def __init__(self, regions, bootstrap: float, to_latent, noise_scaling, background: bool = True,
                 colours: str = "random"):
        if not regions:
            raise AttentionControlError("regions: connect at least one Region Prompt")
        if not 0.0 <= bootstrap <= 1.0:
            raise AttentionControlError(f"bootstrap: a fraction of the steps in [0, 1], got {bootstrap}")
        if colours not in BOOTSTRAP_COLOURS:
            raise AttentionControlError(f"bootstrap_colours: '{colours}' is not one of {', '.join(BOOTSTRAP_COLOURS)}")
        self.colours = colours
        self.regions = tuple(regions)
        self.owner = id(self)           # tags the node's conditioning entries
        self.bootstrap = float(bootstrap)
        self.to_latent = to_latent            # (K, 3) RGB in [0, 1] -> (K, C) latents in the sampler's space
        self.noise_scaling = noise_scaling    # (sigma, noise, latent) -> noised latent (the model's own)
        self.background = background

    def validate_sites(self, sites) -> None:
        return None

    def _entries(self, conds) -> list:
        return [c for c in (conds or []) if isinstance(c, dict) and isinstance(c.get(REGION_KEY), RegionTag)
                and c[REGION_KEY].owner == self.owner]

    def begin_run(self, run: Run) -> None:
        entries = self._entries(run.conds.get("positive"))
        if not entries:
            raise AttentionControlError(
                "positive: the sampler's positive conditioning does not come from this Region Conditioning node; "
                "connect its positive output (it carries the region masks) to the sampler")
        h, w = run.latent_hw
        masks, bg = region_weights(self.regions, h, w, self.background)
        d = run.data(self)
        for c in entries:
            idx = c[REGION_KEY].index
            c["mask"] = (bg if idx == 0 else masks[idx - 1])[None].clone()   # the host keeps a latent-size mask
        if float(bg.max()) <= 0.0:
            # every pixel belongs to a region: the background entry would only cost a model call
            pos = run.conds["positive"]
            pos[:] = [c for c in pos if not (any(c is e for e in entries) and c[REGION_KEY].index == 0)]
        # regions that bootstrapping changes: those with pixels outside their mask
        d["fg"] = [i for i, m in enumerate(masks) if float(m.min()) < 1.0]
        d["masks"] = masks
        n_boot = int(round(self.bootstrap * run.n_steps)) if d["fg"] else 0
        d["n_boot"] = n_boot
        if n_boot:
            g = torch.Generator().manual_seed(int(run.seed or 0) & 0x7FFFFFFF)
            pool = torch.rand(n_boot, 3, generator=g)                          # random RGB colours
            if self.colours == "grey":
                pool = pool[:, :1].expand(n_boot, 3)
            d["colours"] = self.to_latent(pool)                                # (n_boot, C)
            d["pick"] = torch.randint(0, n_boot, (n_boot, len(self.regions)), generator=g)
            noise = run.noise
            if noise is None or not bool(noise.abs().max() > 0):
                # sampling without added noise (e.g. KSamplerAdvanced add_noise off): draw our own
                noise = torch.randn(run.latent_shape, generator=g)
            d["noise"] = noise

    def guide(self, predict, x, sigma, run: Run, passes):
        """In a bootstrap step, MultiDiffusion's prediction: every foreground region's CFG prediction
        (its prompt and the negative) at its bootstrapped latent, the other entries' (background,
        any other conditioning) at the real latent, averaged per pixel with the host's weights."""
        d = run.data(self)
        step, _ = run.step_of(sigma)
        if step >= d.get("n_boot", 0):
            return predict(x)
        positive = passes.guider.conds.get("positive") or []
        groups = {i: [] for i in d["fg"]}
        rest = []
        for c in positive:
            tag = c.get(REGION_KEY) if isinstance(c, dict) else None
            if isinstance(tag, RegionTag) and tag.owner == self.owner and tag.index - 1 in groups:
                groups[tag.index - 1].append(c)
            else:
                rest.append(c)
        sig = sigma.reshape(-1)[:1].expand(x.shape[0])
        num, den = None, None
        jobs = [(rest, x)] if rest else []
        for i, entries in groups.items():
            if not entries:
                continue
            keep = d["masks"][i][None, None]
            colour = d["colours"][int(d["pick"][step, i])][None].expand(x.shape[0], -1)
            jobs.append((entries, bootstrap_latent(x, sig, keep, colour, d["noise"], self.noise_scaling)))
        for entries, xi in jobs:
            w = passes.cond_weight(entries, x)
            pred = passes.cfg_prediction(entries, xi)
            num = pred * w if num is None else num + pred * w
            den = w if den is None else den + w
        return num / den.clamp_min(1e-37)


def linear_rgb_to_latent(rgb: torch.Tensor, factors, bias=None) -> torch.Tensor:
    """(K, 3) RGB in [0, 1] -> (K, C) latents through the least-squares inverse of a linear latent
    preview map rgb = latent @ factors + bias (factors (C, 3): ComfyUI's latent_rgb_factors)."""
    f = torch.as_tensor(factors, dtype=torch.float32)
    b = torch.zeros(3) if bias is None else torch.as_tensor(bias, dtype=torch.float32)
    return (rgb.float() - b) @ torch.linalg.pinv(f)
