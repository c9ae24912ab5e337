"""Word segmentation of real images from the diffusion model's own attention (issue 21).

DAAM (Tang et al. 2023) on a real image: encode it, noise it to one level, run the model on the
prompt and read each word's cross-attention mass (attention/capture.py, attention/dit_capture.py).
Training-free diffusion segmenters (DiffSegmenter-style) then refine the word maps with the
model's SELF-attention: a pixel takes the map value of the pixels it attends to,

    M <- S M,   S = softmax(Q K^T / sqrt(d)) of a self-attention layer, mean over heads,

repeated `iters` times per layer and averaged over the chosen layers (each layer at its own
resolution, resized back to the map's). Pixels of one object attend to each other, so the map fills
the object and stops at its outline.

Never materialised: S. `S M` is an attention call whose values are the maps (`head_mean_apply`):
one fused SDPA call per head group and query chunk; the maps' W columns are padded to the head
width so that the fused kernels apply (as in dit_capture.joint_word_maps).

On DiTs the image tokens' self-attention is the image-query x image-key part of joint attention
(Flux, SD3, Qwen-Image, Lumina 2 ...) or the image self-attention (Wan); the softmax there runs over
the image keys (the text keys' share is left out and the rest renormalised).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .core import AttentionControlError, Controller, LayerSelector, Run, select_sites
from .dit_router import DitCall, DitController
from .maps import MapAccumulator, normalize, resize, split_heads, to_grid

__all__ = ["head_mean_apply", "propagate", "SelfPropagation", "DitSelfPropagation", "PropagatedMaps",
           "word_masks", "check_segment_config"]

CHUNK_BUDGET = 64 * 1024 * 1024          # score elements per SDPA call, were a backend to form them
DIT_STREAMS = frozenset({"joint", "image_self"})


def check_segment_config(noise_level: float, samples: int, refine: int, threshold: float) -> None:
    """The checks of a segmentation's numbers (False for NaN too)."""
    if not 0.0 <= noise_level <= 1.0:
        raise AttentionControlError(f"noise_level: need 0 <= noise_level <= 1, got {noise_level}")
    if int(samples) < 1:
        raise AttentionControlError(f"samples: need at least one noise sample, got {samples}")
    if int(refine) < 0:
        raise AttentionControlError(f"refine: need 0 (off) or more propagation steps, got {refine}")
    if not 0.0 <= threshold <= 1.0:
        raise AttentionControlError(f"threshold: need 0 <= threshold <= 1, got {threshold}")


def head_mean_apply(q: torch.Tensor, k: torch.Tensor, values: torch.Tensor,
                    chunk_budget: int = CHUNK_BUDGET) -> torch.Tensor:
    """mean over heads of softmax(q_h k_h^T / sqrt(d)) @ values.

    q: (B, H, N, D), k: (B, H, K, D), values: (B, K, C) -> float32 (B, C, N). The C value columns go
    in groups of D (the fused kernels need v as wide as q), queries in chunks of at most
    `chunk_budget` score elements (B x H x chunk x K)."""
    b, h, n, d = q.shape
    kk = k.shape[2]
    if values.shape[:2] != (b, kk):
        raise ValueError(f"values {tuple(values.shape)} do not fit keys {tuple(k.shape)}")
    qf, kf = q.float(), k.float()
    c = values.shape[2]
    out = torch.zeros(b, c, n, dtype=torch.float32, device=q.device)
    step = max(1, min(n, chunk_budget // max(b * h * kk, 1)))
    for c0 in range(0, c, d):
        group = values[:, :, c0:c0 + d].float()
        g = group.shape[2]
        if g < d:
            group = F.pad(group, (0, d - g))
        v = group[:, None].expand(b, h, kk, d)
        for a in range(0, n, step):
            z = min(a + step, n)
            o = F.scaled_dot_product_attention(qf[:, :, a:z], kf, v)              # (B, H, c, D)
            out[:, c0:c0 + g, a:z] = o[..., :g].mean(dim=1).transpose(1, 2)
    return out


def propagate(q: torch.Tensor, k: torch.Tensor, maps: torch.Tensor, iters: int,
              chunk_budget: int = CHUNK_BUDGET) -> torch.Tensor:
    """maps (B, C, N) of the N self-attention tokens -> S^iters maps, S the head-mean attention of
    (q, k) (B, H, N, D)."""
    m = maps.float()
    for _ in range(int(iters)):
        m = head_mean_apply(q, k, m.transpose(1, 2), chunk_budget)
    return m


class PropagatedMaps:
    """Result of one propagation run: (B*frames, W, h, w) refined maps (None until a run ends)."""

    def __init__(self):
        self.maps: torch.Tensor | None = None
        self.layers: list[str] = []

    def __deepcopy__(self, memo):
        return self


class SelfPropagation(Controller):
    """UNets: propagates fixed word maps through the chosen self-attention layers of each step's cond
    rows (changes nothing: the call goes on to the host's attention). selector None (`auto`): the
    self-attention layers at the finest resolution (measured on the shapes world: coarser layers'
    self-attention spreads the maps across objects; mask IoU 0.88 finest only vs 0.62 all, refine 1)."""
    name = "segment refine"
    kinds = frozenset({"self"})

    def __init__(self, maps: torch.Tensor, iters: int, holder: PropagatedMaps,
                 selector: LayerSelector | None = None, chunk_budget: int = CHUNK_BUDGET):
        if maps.ndim != 4:
            raise ValueError("maps: need (batch, words, h, w)")
        self.maps = maps.float()
        self.iters = int(iters)
        self.holder = holder
        self.auto = selector is None       # auto: the self-attention layers at the finest resolution
        self.selector = LayerSelector() if selector is None else selector
        self.chunk_budget = chunk_budget

    def begin_run(self, run: Run) -> None:
        sites = select_sites(run.router.sites, self.selector, "self", run.latent_hw, input_name="refine_layers")
        if self.auto:
            finest = min(s.ds for s in sites)
            sites = [s for s in sites if s.ds == finest]
        if run.batch != self.maps.shape[0]:
            raise AttentionControlError(
                f"image: the refinement run has {run.batch} latents but the maps were captured on "
                f"{self.maps.shape[0]}; segment one batch at a time")
        d = run.data(self)
        d["keys"] = {s.key for s in sites}
        d["labels"] = [s.label(run.latent_hw) for s in sites]
        d["acc"] = MapAccumulator(tuple(self.maps.shape[-2:]))

    def attend(self, q, k, v, call, nxt):
        d = call.run.data(self)
        if call.site.key in d.get("keys", ()) and call.cond_chunks():
            rows = call.cond_rows().to(q.device)
            heads = call.site.heads
            qh = split_heads(q.index_select(0, rows), heads)
            kh = split_heads(k.index_select(0, rows), heads)
            n_chunks = len(call.cond_chunks())
            m = resize(self.maps.to(q.device), (call.h, call.w)).flatten(2)             # (B, W, N)
            m = m.repeat(n_chunks, 1, 1)
            out = propagate(qh, kh, m, self.iters, self.chunk_budget)
            out = out.view(n_chunks, call.batch, *out.shape[1:]).mean(0)
            d["acc"].add(to_grid(out, call.h, call.w), call.step)
        return nxt(q, k, v)

    def end_run(self, run: Run, ok: bool) -> None:
        d = run.data(self)
        if ok and "acc" in d:
            self.holder.maps = d["acc"].mean()
            self.holder.layers = list(d["labels"])


class DitSelfPropagation(DitController):
    """DiTs: propagates fixed word maps ((B*frames, W, h, w) on the image-token grid) through the
    image-query x image-key attention of the chosen blocks (joint or image self-attention)."""
    name = "segment refine"
    streams = DIT_STREAMS
    observer = True

    def __init__(self, maps: torch.Tensor, iters: int, holder: PropagatedMaps, selector=None,
                 frames: int = 1, chunk_budget: int = CHUNK_BUDGET):
        if maps.ndim != 4:
            raise ValueError("maps: need (batch * frames, words, h, w)")
        self.maps = maps.float()
        self.iters = int(iters)
        self.holder = holder
        self.selector = selector
        self.frames = max(int(frames), 1)
        self.chunk_budget = chunk_budget

    def begin_run(self, run) -> None:
        d = run.data(self)
        d["acc"] = None
        d["labels"] = []

    def attend(self, call: DitCall):
        run = call.run
        if run is None:
            return None
        chunks = call.cond_chunks()
        if not chunks or call.q_image is None or call.k_image is None or call.grid is None:
            return None
        d = run.data(self)
        f, gh, gw = call.grid
        b = call.batch
        if f != self.frames or self.maps.shape[0] != b * f:
            raise AttentionControlError(
                f"image: the refinement run has {b} item(s) x {f} frame(s) but the maps were captured on "
                f"{self.maps.shape[0]} rows; segment one batch at a time")
        rows = torch.tensor(call.cond_rows(), device=call.q.device)
        q = call.split_heads(call.q).index_select(0, rows)[:, :, call.q_image]
        k = call.split_heads(call.k).index_select(0, rows)[:, :, call.k_image]
        w = self.maps.shape[1]
        m = resize(self.maps.to(call.q.device), (gh, gw))
        m = m.view(b, f, w, gh, gw).permute(0, 2, 1, 3, 4).reshape(b, w, f * gh * gw)
        m = m.repeat(len(chunks), 1, 1)
        out = propagate(q, k, m, self.iters, self.chunk_budget)
        out = out.view(len(chunks), b, w, f, gh, gw).mean(0).permute(0, 2, 1, 3, 4).reshape(b * f, w, gh, gw)
        if d["acc"] is None:
            d["acc"] = MapAccumulator(tuple(self.maps.shape[-2:]))
        d["acc"].add(out, call.step)
        lab = f"{call.site.block_type}:{call.site.block_index}"
        if lab not in d["labels"]:
            d["labels"].append(lab)
        return None

    def end_run(self, run, ok: bool) -> None:
        d = run.data(self)
        if ok and d.get("acc") is not None:
            self.holder.maps = d["acc"].mean()
            self.holder.layers = list(d["labels"])


def word_masks(maps: torch.Tensor, size: tuple[int, int], threshold: float, soft: bool) -> torch.Tensor:
    """(N, W, h, w) word maps -> (N, W, H, W) masks at `size`: each map min-max normalised, resized
    (bilinear), then kept soft or thresholded to 0 / 1."""
    up = resize(normalize(maps.float()), tuple(size)).clamp(0.0, 1.0)
    return up if soft else (up > threshold).float()
