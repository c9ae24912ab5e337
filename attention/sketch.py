"""Sketch-guided text-to-image (Voynov, Aberman, Cohen-Or 2022, "Sketch-Guided Text-to-Image Diffusion
Models"). Pure torch.

Latent guidance predictor (LGP): a per-pixel MLP (Linear -> ReLU -> BatchNorm, widths 512 / 256 / 128 / 64,
then a Linear to the output) over the channel-concatenated features of several UNet layers, each resized
(bilinear) to the latent size, plus a sinusoidal encoding of the noise level. It predicts an edge map at the
latent size. The diffusion model stays frozen; the LGP is trained with an MSE loss on (image, edge map) pairs
noised at random levels.

Choices of this implementation (the paper's where it is explicit):
- Features: the value projection of every self-attention (attn1) of the first transformer block of each
  SpatialTransformer the layer selector picks. The router hands these calls to the controller, so nothing is
  monkeypatched; v = W_v LayerNorm(h) is a per-pixel linear image of the block's hidden state (the residual
  stream), which is what the paper's block activations carry. Values, not queries: the patches that refold a
  self-attention's tokens (core HyperTile tiles the queries, ToMe merges them) leave the values whole, so the
  features read the same under them (on the shapes world values and queries guide equally well: edge IoU
  0.44 both; keys 0.37). One layer per SpatialTransformer keeps SDXL's 10-deep transformers from
  multiplying the width.
- Edge space: the edge image (lines bright on dark, values in [0, 1]) max-pooled to the latent grid, one
  channel; the paper predicts the VAE encoding of the edge image instead. Max-pooling needs no VAE, keeps a
  one-pixel line at every latent cell it crosses, and works for any latent format (the predictor is trained on
  the same pooling, so the two spaces are equivalent up to what a VAE adds).
- Noise level: the encoding is of log(sigma) (sin / cos at 8 octaves), the same for every scheduler. Training
  draws the level uniformly over the model's timesteps (sigma = percent_to_sigma(u), u ~ U(0, 1)).
- Guidance (paper, eq. 4): with L = ||LGP(features(x_t), sigma) - E(sketch)||^2 per item, the step's result is
  moved by  -alpha * ||x_t - x_{t-1}|| / ||grad_{x_t} L|| * grad_{x_t} L. Handed to the sampler in denoised
  form: for the step sigma_i -> sigma_{i+1} of a first-order sampler ||x_t - x_{t-1}|| = (sigma_i -
  sigma_{i+1}) / sigma_i * ||x - D|| and the move of x_{t-1} by delta is D' = D + sigma_i / (sigma_i -
  sigma_{i+1}) * delta, so

      D' = D - alpha * ||x - D|| * grad / ||grad||          (per latent item)

  (exact for Euler / DDIM; for other samplers a classifier-guidance-form change of D in the same direction).
  It is invariant to the scale of the latent (ComfyUI's x = x_t / sqrt(abar)), since the gradient is normalised.
  One prediction and one positive-only forward to the last feature layer with its backward per guided step.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .core import AttentionControlError, Controller, LayerSelector, Run, StopForward, select_sites
from .grad import WeightReferences
from .validate import check_finite, check_range

WIDTHS = (512, 256, 128, 64)         # the paper's MLP
PE_OCTAVES = 8                       # sin / cos of log(sigma) at 2^0 .. 2^7 -> 16 numbers
AUTO = "auto"                        # UNets: every SpatialTransformer; DiTs: four blocks (attention/dit_sketch.py)
DEFAULT_LAYERS = AUTO
GRAD_CHUNK = 512                     # pixels per chunk of the predictor's gradient in guidance
DEFAULT_STRENGTH = 1.6
FORMAT = "attention_control.sketch_lgp/1"


# --------------------------------------------------------------------------------------------
# edges

def grayscale(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] -> (B, 1, H, W): the mean of the first three channels (alpha dropped)."""
    return images[:, :3].float().mean(1, keepdim=True)


def sobel_edges(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) images in [0, 1] -> (B, 1, H, W) Sobel gradient magnitude of the grey image, scaled so each
    image's strongest edge is 1 (a flat image gives zeros)."""
    g = grayscale(images)
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=g.device)
    k = torch.stack([kx, kx.t()])[:, None]                                    # (2, 1, 3, 3)
    d = F.conv2d(F.pad(g, (1, 1, 1, 1), mode="replicate"), k)
    mag = d.pow(2).sum(1, keepdim=True).sqrt()
    peak = mag.flatten(1).amax(1).clamp_min(1e-6)[:, None, None, None]
    return (mag / peak).clamp(0.0, 1.0)


LINES = ("auto", "dark on light", "light on dark")


def sketch_edges(images: torch.Tensor, lines: str = "auto") -> torch.Tensor:
    """A sketch (B, C, H, W) in [0, 1] -> (B, 1, H, W) edge map, lines bright on dark. `auto`: an image whose
    mean is above 0.5 (a light background) is inverted."""
    if lines not in LINES:
        raise AttentionControlError(f"lines: '{lines}' is not one of {', '.join(LINES)}")
    g = grayscale(images).clamp(0.0, 1.0)
    if lines == "dark on light":
        return 1.0 - g
    if lines == "light on dark":
        return g
    light = (g.flatten(1).mean(1) > 0.5)[:, None, None, None]
    return torch.where(light, 1.0 - g, g)


def edges_to_latent(edges: torch.Tensor, latent_hw, input_name: str = "sketch") -> torch.Tensor:
    """(B, 1, H, W) edge map -> (B, 1, h, w) at the latent grid by max-pooling H / h x W / w cells. The image
    must be a whole multiple of the latent, the same in both directions (the image size of the latent, or the
    latent size itself)."""
    h, w = int(latent_hw[0]), int(latent_hw[1])
    H, W = edges.shape[-2:]
    if H % h or W % w or H // h != W // w:
        raise AttentionControlError(
            f"{input_name}: the image is {W}x{H} px, which does not fit the {w}x{h} latent being sampled; give the "
            f"sketch at the image's size ({w * 8}x{h * 8} for an 8x VAE) or at any whole multiple of {w}x{h}")
    f = H // h
    return edges if f == 1 else F.max_pool2d(edges, f)


def check_sketch(edges: torch.Tensor, input_name: str = "sketch") -> torch.Tensor:
    """A finite, non-empty edge map (B, 1, H, W)."""
    check_finite(input_name, edges, "draw the sketch again (values must be numbers in [0, 1])")
    empty = [i for i in range(edges.shape[0]) if float(edges[i].amax()) < 0.05]
    if empty:
        raise AttentionControlError(
            f"{input_name}: image {empty[0]} of the batch has no lines (its edge map is empty); draw the outline "
            f"(dark lines on a light background, or set lines to 'light on dark')")
    return edges


# --------------------------------------------------------------------------------------------
# the predictor

def noise_encoding(sigma: torch.Tensor, octaves: int = PE_OCTAVES) -> torch.Tensor:
    """(B,) noise levels -> (B, 2 * octaves): sin / cos of log(sigma) * 2^k."""
    s = torch.log(sigma.float().clamp_min(1e-5))[:, None]
    f = (2.0 ** torch.arange(octaves, dtype=torch.float32, device=s.device))[None] * (math.pi / 4.0)
    return torch.cat([torch.sin(s * f), torch.cos(s * f)], dim=1)


class EdgePredictor(torch.nn.Module):
    """The LGP. `sites`: [(block name, block id, index, channels)] of the feature layers in forward order;
    `out_channels`: channels of the predicted edge map (1)."""

    def __init__(self, sites, out_channels: int = 1, widths=WIDTHS, octaves: int = PE_OCTAVES):
        super().__init__()
        self.sites = [tuple(s) for s in sites]
        self.in_channels = sum(int(s[3]) for s in self.sites)
        self.out_channels = int(out_channels)
        self.widths = tuple(int(w) for w in widths)
        self.octaves = int(octaves)
        layers, c = [], self.in_channels + 2 * self.octaves
        for wd in self.widths:
            layers += [torch.nn.Linear(c, wd), torch.nn.ReLU(), torch.nn.BatchNorm1d(wd)]
            c = wd
        layers.append(torch.nn.Linear(c, self.out_channels))
        self.mlp = torch.nn.Sequential(*layers)

    def __deepcopy__(self, memo):
        return self

    @property
    def keys(self) -> list[tuple]:
        return [tuple(s[:3]) for s in self.sites]

    def config(self) -> dict:
        return {"sites": [list(s) for s in self.sites], "out_channels": self.out_channels,
                "widths": list(self.widths), "octaves": self.octaves}

    def rows(self, features: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The MLP's input rows (B H W, C + 2 octaves): each pixel's features and its item's noise encoding."""
        b, c, h, w = features.shape
        if c != self.in_channels:
            raise AttentionControlError(f"predictor: it takes {self.in_channels} feature channels, got {c}")
        pe = noise_encoding(sigma.to(features.device).expand(b), self.octaves).to(features.dtype)
        x = torch.cat([features, pe[:, :, None, None].expand(b, pe.shape[1], h, w)], dim=1)
        return x.permute(0, 2, 3, 1).reshape(b * h * w, -1)

    def forward(self, features: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """features (B, C, H, W) (C = in_channels), sigma (B,) -> (B, out_channels, H, W)."""
        b, _c, h, w = features.shape
        y = self.mlp(self.rows(features, sigma))
        return y.reshape(b, h, w, self.out_channels).permute(0, 3, 1, 2)

    def loss_grad(self, maps: list, size, sigma: torch.Tensor, target: torch.Tensor,
                  chunk: int = GRAD_CHUNK) -> tuple[torch.Tensor, list]:
        """(per-item loss (B,), its gradients with respect to each map) of
        L_b = sum_pixels ||LGP(upsampled(maps, size), sigma) - target||^2, by chunks of `chunk` pixels of one
        item: the MLP's activations of one chunk at a time, and the resized feature map never whole (each
        chunk resizes one map at a time and keeps its own pixels). Eval mode: every pixel is independent, so
        this equals the whole-batch autograd. maps: (B, C_k, h_k, w_k) (no graph needed); target
        broadcastable to (B, out_channels) + size."""
        h, w = (int(v) for v in size)
        b = maps[0].shape[0]
        step = max(1, int(chunk))
        t = target.float().to(maps[0].device).expand(b, self.out_channels, h, w).flatten(2)
        pe = noise_encoding(sigma.to(maps[0].device).expand(b), self.octaves)
        loss = torch.zeros(b, dtype=torch.float32, device=maps[0].device)
        grads = [torch.zeros_like(m, dtype=torch.float32) for m in maps]
        with torch.enable_grad():
            for i in range(b):
                leaves = [m[i:i + 1].detach().float().requires_grad_(True) for m in maps]
                for a in range(0, h * w, step):
                    z = min(a + step, h * w)
                    cols = [(lf if tuple(lf.shape[-2:]) == (h, w) else
                             F.interpolate(lf, size=(h, w), mode="bilinear", align_corners=False)).flatten(2)[0, :, a:z]
                            for lf in leaves]
                    xc = torch.cat(cols + [pe[i:i + 1].t().expand(-1, z - a)], dim=0).t()     # (n, C + PE)
                    per = ((self.mlp(xc).float() - t[i, :, a:z].t()) ** 2).sum()
                    gs = torch.autograd.grad(per, leaves)
                    for k, g in enumerate(gs):
                        grads[k][i:i + 1] += g
                    loss[i] += per.detach()
        return loss, grads

    def copy(self) -> "EdgePredictor":
        """A copy with normal (not inference) tensors, in eval mode (call under inference_mode(False))."""
        m = EdgePredictor(self.sites, self.out_channels, self.widths, self.octaves)
        m.load_state_dict({k: v.detach().clone() for k, v in self.state_dict().items()})
        return m.to(next(self.parameters()).device).train(False).requires_grad_(False)


def predictor_tensors(p: EdgePredictor) -> dict:
    return {k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.detach().cpu().contiguous()
            for k, v in p.state_dict().items()}


def predictor_from(tensors: dict, config: dict, input_name: str = "predictor") -> EdgePredictor:
    try:
        p = EdgePredictor([tuple(s) for s in config["sites"]], config["out_channels"], config["widths"],
                          config["octaves"])
        p.load_state_dict(tensors)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise AttentionControlError(f"{input_name}: the file is not a sketch edge predictor of this pack "
                                    f"({type(e).__name__}); train and save it again") from None
    for k, v in tensors.items():
        check_finite(input_name, v, f"the predictor is damaged ({k}); train it again")
    return p.train(False)


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((pred.float() - target.float()) ** 2).mean()


def train_step(predictor: EdgePredictor, opt, features, sigma, target, pixels: int = 0, generator=None) -> float:
    """One optimiser step of the MSE between the predicted and the true latent edge maps; `pixels` > 0: on that
    many pixels of the batch drawn at random (the MLP is per pixel, so this is an unbiased estimate of the loss
    at a fraction of the cost)."""
    predictor.train()
    x = predictor.rows(features, sigma)
    y = target.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
    if 0 < pixels < x.shape[0]:
        pick = torch.randperm(x.shape[0], generator=generator)[:pixels].to(x.device)
        x, y = x[pick], y[pick]
    loss = mse(predictor.mlp(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


# --------------------------------------------------------------------------------------------
# features through the router

def unet_selector(text: str, input_name: str = "layers") -> LayerSelector:
    """The UNet layer choice: `auto` is `all` (the first transformer block of every SpatialTransformer)."""
    text = (text or AUTO).strip()
    return LayerSelector.parse("all" if text.lower() == AUTO else text, input_name)


def feature_sites(sites, selector: LayerSelector, latent_hw=None, input_name: str = "layers"):
    """The self-attention sites of the first transformer block of each SpatialTransformer that the selector
    picks, in forward order."""
    chosen = select_sites(sites, selector, "self", latent_hw, input_name=input_name)
    return sorted([s for s in chosen if s.index == 0], key=lambda s: s.order)


def upsampled(maps: list, size) -> torch.Tensor:
    """Feature maps (items, C_k, h_k, w_k) resized (bilinear) to `size` and concatenated on channels."""
    size = tuple(int(v) for v in size)
    return torch.cat([m if tuple(m.shape[-2:]) == size else
                      F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps], dim=1)


class FeaturePass:
    """One feature forward: collects the value features of `keys`, stops after the last one."""

    def __init__(self, controller, keys: list, latent_hw):
        self.controller = controller
        self.keys = list(keys)
        self.wanted = set(self.keys)
        self.last_key = self.keys[-1]
        self.latent_hw = tuple(latent_hw)
        self.frames = 1                   # video DiTs: frames per item (each frame is a predictor item)
        self.feats: dict = {}

    def __deepcopy__(self, memo):
        return self

    def add(self, key, feat: torch.Tensor) -> None:
        """A feature map of the layer `key` at its own resolution (items, C, h, w)."""
        prev = self.feats.get(key)
        self.feats[key] = feat.float() if prev is None else torch.cat([prev, feat.float()])

    def maps(self, batch: int) -> list[torch.Tensor]:
        """The feature maps of `keys` at their own resolutions, (batch x frames, C_k, h_k, w_k) each."""
        missing = [k for k in self.keys if k not in self.feats]
        if missing:
            raise AttentionControlError(
                f"sketch guidance: the feature layers {missing[:3]} were not reached in the feature pass (another "
                f"patch on the MODEL changed their layout, or the positive conditioning did not run at the full "
                f"latent size)")
        items = batch * self.frames
        out = []
        for k in self.keys:
            f = self.feats[k]
            if f.shape[0] != items:
                f = f.reshape(-1, items, *f.shape[1:]).mean(0)       # several cond chunks: their mean
            out.append(f)
        return out

    def features(self, batch: int) -> torch.Tensor:
        """The predictor's input: every map resized (bilinear) to the latent grid, channels concatenated."""
        return upsampled(self.maps(batch), self.latent_hw)

    def channels(self) -> list[int]:
        return [int(self.feats[k].shape[1]) for k in self.keys]


class SketchFeatures(Controller):
    """Hands the value features of the chosen self-attention layers to a FeaturePass (only in passes whose
    state is one of its own; every other call passes through untouched)."""
    name = "sketch features"
    kinds = frozenset({"self"})

    def __init__(self, selector: LayerSelector | None = None):
        self.selector = selector or unet_selector(DEFAULT_LAYERS)

    def feature_keys(self, model_patcher, latent_hw=None) -> list[tuple]:
        from .router import get_router
        return [s.key for s in feature_sites(get_router(model_patcher).sites, self.selector, latent_hw)]

    def validate_sites(self, sites) -> None:
        feature_sites(sites, self.selector)

    def wants(self, site) -> bool:
        return site.kind == "self" and site.index == 0 and self.selector.static_match(site)

    def wants_at(self, site, latent_hw) -> bool:
        return site.kind == "self" and site.index == 0 and self.selector.match(site, latent_hw)

    def begin_run(self, run: Run) -> None:
        feature_sites(run.router.sites, self.selector, run.latent_hw)

    def handles(self, call) -> bool:
        """Any query layout whose keys and values keep one row per item (HyperTile, ToMe): the features are the
        values."""
        return call.kv_fold == 1

    def attend(self, q, k, v, call, nxt):
        state = call.guidance
        if not isinstance(state, FeaturePass) or call.site.key not in state.wanted:
            return nxt(q, k, v)
        b, n, c = v.shape
        if n != call.h * call.w:
            raise AttentionControlError(
                f"sketch guidance: the self-attention values at {call.site.key} hold {n} tokens, not the {call.h}x"
                f"{call.w} map of the layer (another patch on the MODEL changed them); the predictor cannot read "
                f"this layer: move that patch off it or train the predictor on other layers")
        state.add(call.site.key, v.reshape(b, call.h, call.w, c).permute(0, 3, 1, 2))
        if call.site.key == state.last_key:
            raise StopForward()
        return nxt(q, k, v)

    weight_references = {}

    def features_at(self, x, keys, passes, batch: int, maps: bool = False):
        """(B, C, h, w) features of the positive conditioning at latent x on the latent grid (gradients as
        enabled by the caller); maps: the list of the layers' maps at their own resolutions instead."""
        state = FeaturePass(self, keys, x.shape[-2:])
        with WeightReferences(**self.weight_references):
            passes.cond_pass(x, state)
        self.last_channels = state.channels()
        return state.maps(batch) if maps else state.features(batch)


def site_table(sites, keys) -> list[tuple]:
    """[(block, id, index, channels)] of the feature sites `keys` (channels = heads x dim_head)."""
    by_key = {s.key: s for s in sites if s.kind == "self"}
    return [(*k, by_key[k].heads * by_key[k].dim_head) for k in keys]


# --------------------------------------------------------------------------------------------
# guidance

def guided_denoised(den: torch.Tensor, x: torch.Tensor, grad: torch.Tensor, alpha: float) -> torch.Tensor:
    """D' = D - alpha * ||x - D|| * grad / ||grad|| per latent item (see the module docstring)."""
    dims = tuple(range(1, x.dim()))
    upd = (x.float() - den.float()).pow(2).sum(dims, keepdim=True).sqrt()
    gn = grad.float().pow(2).sum(dims, keepdim=True).sqrt()
    move = torch.where(gn > 0, alpha * upd / gn.clamp_min(1e-20), torch.zeros_like(gn)) * grad.float()
    return (den.float() - move).to(den.dtype)


class GuidanceMixin:
    """What sketch guidance does on either host (the UNet's SketchGuidance below, attention/dit_sketch.py's
    DitSketchGuidance): the host class supplies `features_at(x, keys, passes, batch)` (features of the
    positive conditioning at x on the latent grid, (batch x frames, C, h, w)) and `validate...` of the
    predictor's layers."""

    def init_guidance(self, predictor: EdgePredictor, edges: torch.Tensor, strength: float = DEFAULT_STRENGTH,
                      start: float = 0.0, end: float = 0.5) -> None:
        check_range("strength", strength, 0.0, None, f"use a step scale >= 0 (paper: about {DEFAULT_STRENGTH}; "
                                                     f"0 turns guidance off)")
        check_range("start", start, 0.0, 1.0)
        check_range("end", end, 0.0, 1.0)
        if end < start:
            raise AttentionControlError(f"end: {end:g} is before start {start:g}; guide the steps from start to end "
                                        "(fractions of the schedule)")
        check_sketch(edges)
        self.predictor = predictor
        self.keys = predictor.keys
        self.key_set = frozenset(self.keys)
        self.edges = edges.float()
        self.strength = float(strength)
        self.start, self.end = float(start), float(end)
        self.grad_chunk = GRAD_CHUNK
        self.last_loss_log: list = []

    def begin_run(self, run: Run) -> None:
        target = edges_to_latent(self.edges, run.latent_hw)
        if target.shape[0] not in (1, run.batch):
            raise AttentionControlError(
                f"sketch: {target.shape[0]} sketches for a latent batch of {run.batch}; give one sketch for all or "
                f"one per latent item")
        d = run.data(self)
        d["target"] = target
        d["range"] = (int(round(self.start * run.n_steps)), int(round(self.end * run.n_steps)))
        d["log"] = []
        d["lgp"] = None

    def end_run(self, run: Run, ok: bool) -> None:
        d = run.data(self)
        self.last_loss_log = list(d.get("log", []))
        d["lgp"] = None

    def _lgp(self, d, device):
        if d["lgp"] is None:
            with torch.inference_mode(False):
                d["lgp"] = self.predictor.copy().to(device)
        return d["lgp"]

    def _target(self, d, n_items: int, frames: int, like: torch.Tensor) -> torch.Tensor:
        """The latent edge map of each predictor item (latent item x frame)."""
        t = d["target"].to(like.device, like.dtype)
        if t.shape[0] > 1 and frames > 1:
            t = t.repeat_interleave(frames, 0)
        return t.expand(n_items, *t.shape[1:])

    def loss_at(self, xk, sig: float, run: Run, passes, d) -> torch.Tensor:
        """(B,) ||LGP(features(xk)) - target||^2 per latent item (every frame of a video item summed), with
        the whole graph (the reference for `loss_and_grad`)."""
        feats = self.features_at(xk, self.keys, passes, xk.shape[0])
        n = feats.shape[0]
        lgp = self._lgp(d, xk.device)
        pred = lgp(feats, torch.full((n,), sig, device=xk.device))
        t = self._target(d, n, n // xk.shape[0], pred)
        return ((pred - t) ** 2).reshape(xk.shape[0], -1).sum(1)

    def loss_and_grad(self, x, sig: float, run: Run, passes, d) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) loss and its gradient with respect to x: the features' graph to x is kept, the predictor's
        activations only one pixel chunk at a time (EdgePredictor.loss_grad), then one backward through the
        model's forward."""
        with torch.inference_mode(False), torch.enable_grad():
            xk = x.detach().clone().requires_grad_(True)
            maps = self.features_at(xk, self.keys, passes, xk.shape[0], maps=True)
            n = maps[0].shape[0]
            lgp = self._lgp(d, xk.device)
            t = self._target(d, n, n // xk.shape[0], maps[0])
            per, gmaps = lgp.loss_grad(maps, xk.shape[-2:], torch.full((n,), sig, device=xk.device), t,
                                       self.grad_chunk)
            grad, = torch.autograd.grad(maps, [xk], grad_outputs=gmaps)
        return per.reshape(xk.shape[0], -1).sum(1), grad.detach()

    def guide(self, predict, x, sigma, run: Run, passes):
        d = run.data(self)
        step, sig = run.step_of(sigma)
        lo, hi = d["range"]
        if self.strength == 0.0 or not lo <= step < hi:
            return predict(x)
        den = predict(x)
        loss, grad = self.loss_and_grad(x, sig, run, passes, d)
        d["log"].append((step, [float(v) for v in loss]))
        return guided_denoised(den, x, grad.to(x.dtype), self.strength)


class SketchGuidance(GuidanceMixin, SketchFeatures):
    """Pulls the predicted edges of each sampled item toward its sketch (see the module docstring)."""
    name = "sketch guidance"
    wraps_guider = True

    def __init__(self, predictor: EdgePredictor, edges: torch.Tensor, strength: float = DEFAULT_STRENGTH,
                 start: float = 0.0, end: float = 0.5):
        SketchFeatures.__init__(self)
        self.init_guidance(predictor, edges, strength, start, end)

    # layers: exactly the predictor's
    def _matches(self, site) -> bool:
        return site.kind == "self" and site.key in self.key_set

    def validate_sites(self, sites) -> None:
        have = {s.key: s.heads * s.dim_head for s in sites if s.kind == "self"}
        for blk, bid, idx, ch in self.predictor.sites:
            if have.get((blk, bid, idx)) != ch:
                raise AttentionControlError(
                    f"predictor: it was trained on a model with a {ch}-channel self-attention at {blk} {bid}.{idx}, "
                    f"which this model does not have ({have.get((blk, bid, idx), 'no such layer')}); train the "
                    f"predictor on this model family")

    def wants(self, site) -> bool:
        return self._matches(site)

    def wants_at(self, site, latent_hw) -> bool:
        return self._matches(site)

    def begin_run(self, run: Run) -> None:
        self.validate_sites(run.router.sites)
        GuidanceMixin.begin_run(self, run)
