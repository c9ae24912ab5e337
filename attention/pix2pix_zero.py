"""Pix2Pix-Zero (Parmar et al. 2023, "Zero-shot Image-to-Image Translation"): edit directions in the
text-embedding space and cross-attention guidance.

Edit direction: the mean text embedding (the whole token sequence, padding included, as the paper)
of many target sentences minus that of many source sentences; adding it to a caption's embedding
moves the caption toward the target concept ("cat" -> "dog") without naming the rest of the image.

Cross-attention guidance keeps the edit's structure: a batch [reference, edit...] samples the
caption and the caption plus the direction from one noise; before each guided step the edit
items' latents are moved by one gradient step on

    L_j = sum_layers mean_heads sum_{p, k} (A_j[p, k] - A_0[p, k])^2

where A_j are the cond-row cross-attention probabilities of item j at the current latent and A_0
those of the reference item at the same step (held fixed). The reference code stores A_0 from a
separate reference pass; here the reference item is in the batch, so its maps at this step come
from a positive-only forward of the reference item without gradients just before the edit items'
forward; nothing is stored across steps. Memory: the reference's activations are never held for a
backward (its maps of the guided layers are, for one step), and each guided layer of the edit pass
is checkpointed, so the backward recomputes its maps instead of holding them. The reference's own
latent gets a zero gradient, so it samples exactly what
the caption alone samples.

Step size: the reference code moves the VP latent x_t = sqrt(abar) x0 + sqrt(1 - abar) eps by
-lr grad_{x_t} L (lr 0.1 real images, 0.15 generated). ComfyUI's latent is x = x_t / sqrt(abar), so
the same move is x <- x - lr (1 + sigma^2) grad_x L. It is handed to the sampler as layout guidance
hands its move (`layout.guided_prediction`): exact for first-order samplers, a classifier-guidance
form change of the denoised prediction for the others."""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from .core import AttentionControlError, Controller, LayerSelector, Run, StopForward, select_sites
from .grad import WeightReferences
from .layout import cross_probs, guided_prediction, probs_output, step_carry
from .validate import check_finite, check_range

GUIDANCE_REAL = 0.1          # the reference code's cross-attention guidance step, real (inverted) images
GUIDANCE_GENERATED = 0.15    # ... generated images

# sentence templates for a word or short phrase (the paper generates ~1000 sentences per concept with a
# language model; these are fixed, varied contexts so that the mean keeps the concept and cancels the rest)
TEMPLATES = (
    "a photo of a {}", "a picture of a {}", "a painting of a {}", "a drawing of a {}", "a close-up photo of a {}",
    "a {} in the garden", "a {} on the street", "a {} in a room", "a {} on a table", "a {} in the snow",
    "a {} on the beach", "a {} in the forest", "a small {}", "a large {}", "a {} on a white background",
    "a bright photo of a {}", "a dark photo of a {}", "a blurry photo of a {}", "a cropped photo of a {}",
    "a {} in the city", "an image of a {}", "a rendering of a {}", "a sketch of a {}", "a {} at night",
)


def sentences(lines: list[str], templates: bool) -> list[str]:
    """Each line as a sentence, or (templates) each line put into every template."""
    if not templates:
        return list(lines)
    return [t.format(x) for x in lines for t in TEMPLATES]


def edit_direction(source: list[torch.Tensor], target: list[torch.Tensor]) -> torch.Tensor:
    """mean(target) - mean(source) of (1, L, D) embeddings (float32, computed in float64) -> (1, L, D)."""
    if not source or not target:
        raise AttentionControlError("edit direction: give at least one source and one target sentence")
    shapes = {tuple(t.shape[1:]) for t in source + target}
    if len(shapes) != 1:
        raise AttentionControlError(f"edit direction: the sentences encode to different shapes {sorted(shapes)}; keep "
                                    "each sentence under 75 tokens")
    mean = lambda ts: torch.cat([t.double() for t in ts]).mean(0, keepdim=True)
    return (mean(target) - mean(source)).float()


def add_direction(conditioning: list, direction: torch.Tensor, strength: float, rows=None,
                  input_name: str = "direction") -> list:
    """The conditioning with strength * direction added to each entry's embedding (rows: the batch rows
    to edit, None = all); the input is left as it is."""
    out = []
    for emb, extra in conditioning:
        if tuple(emb.shape[1:]) != tuple(direction.shape[1:]):
            raise AttentionControlError(
                f"{input_name}: the direction is {tuple(direction.shape[1:])} (tokens, width), the conditioning "
                f"{tuple(emb.shape[1:])}; build the direction with the CLIP of this model, from sentences as long "
                f"as the caption (under 75 tokens each)")
        d = (strength * direction).to(emb.device, emb.dtype)
        e = emb.clone()
        if rows is None:
            e = e + d
        else:
            e[rows] = e[rows] + d
        out.append([e, dict(extra)])
    return out


def attention_gap(probs: torch.Tensor, ref: torch.Tensor, items: int) -> torch.Tensor:
    """Per latent item j: mean_heads sum_{p,k} (A_j - A_ref)^2 with A_ref held fixed.
    probs (R, heads, N, K), R = items x r rows; ref (r, heads, N, K). -> (items,)."""
    p = probs.reshape(items, -1, *probs.shape[1:])                    # (items, r, h, N, K)
    return ((p - ref.detach()[None]) ** 2).sum((-1, -2)).mean(2).sum(1)


def gap_and_output(q, k, v, heads: int, ref: torch.Tensor, items: int):
    """One guided layer: (the (items,) attention gap of its cond-row maps to `ref`, the layer's output
    taken from the same maps)."""
    probs = cross_probs(q, k, heads)                                          # (R, h, N, K)
    return attention_gap(probs, ref, items), probs_output(probs, v, heads)


class _Pass:
    """One guidance forward: the reference pass records each guided layer's maps (`refs` None), the
    edit pass scores its maps against them."""

    def __init__(self, controller, keys: set, last_key, items: int, refs: dict | None = None):
        self.controller = controller
        self.keys = keys
        self.last_key = last_key
        self.items = items
        self.refs = refs
        self.maps = {} if refs is None else None
        self.loss = None
        self.layers = 0

    def __deepcopy__(self, memo):
        return self


class Pix2PixZeroController(Controller):
    """Cross-attention guidance of the edit items of a [reference, edit...] batch toward the
    reference's maps (see the module docstring)."""
    name = "pix2pix-zero guidance"
    kinds = frozenset({"cross"})
    wraps_guider = True

    def __init__(self, guidance: float, guided_fraction: float = 1.0, selector: LayerSelector | None = None):
        check_range("guidance", guidance, 0.0, None, "use a step size >= 0 (paper: 0.1 real, 0.15 generated images)")
        check_finite("guided_steps", guided_fraction, "give a fraction of the steps in [0, 1]")
        if not 0.0 <= guided_fraction <= 1.0:
            raise AttentionControlError(f"guided_steps: {guided_fraction} is not a fraction in [0, 1]")
        self.guidance = float(guidance)
        self.guided_fraction = float(guided_fraction)
        self.selector = selector or LayerSelector()
        self.last_loss_log: list = []

    def begin_run(self, run: Run) -> None:
        sites = select_sites(run.router.sites, self.selector, "cross", run.latent_hw, input_name="layers")
        if run.batch < 2:
            raise AttentionControlError(
                "pix2pix-zero: the latent has one item; guidance needs the [reference, edit] batch of the "
                "Pix2Pix-Zero node (its latent output, sampled with its positive)")
        d = run.data(self)
        d["keys"] = {s.key for s in sites}
        d["last"] = max(sites, key=lambda s: s.order)
        d["n_guided"] = int(round(self.guided_fraction * run.n_steps))
        d["log"] = []

    def end_run(self, run: Run, ok: bool) -> None:
        self.last_loss_log = list(run.data(self).get("log", []))

    def attend(self, q, k, v, call, nxt):
        state = call.guidance
        if state is None or call.site.key not in state.keys:
            return nxt(q, k, v)
        if state.refs is None:                                          # reference pass: record the maps
            probs = cross_probs(q, k, call.site.heads)
            state.maps[call.site.key] = probs
            out = probs_output(probs, v, call.site.heads)
        else:
            ref = state.refs.get(call.site.key)
            if ref is None:
                raise AttentionControlError(f"pix2pix-zero: layer {call.site.key} ran in the edit pass but not "
                                            "in the reference pass")
            if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
                # checkpointed: the backward recomputes this layer's maps instead of holding them (3 copies
                # of (rows, heads, N, K) otherwise: the softmax, the gap and the output each save one)
                g, out = checkpoint(gap_and_output, q, k, v, call.site.heads, ref, state.items, use_reentrant=False)
            else:
                g, out = gap_and_output(q, k, v, call.site.heads, ref, state.items)
            state.loss = g if state.loss is None else state.loss + g
        state.layers += 1
        if call.site.key == state.last_key:
            raise StopForward()
        return out

    def loss_at(self, xk, run: Run, passes):
        """(B,) attention gap of each item to item 0 (the reference) at latent xk: a positive-only forward
        of the reference without gradients that records its maps of the guided layers, then one of the
        edit items (with gradients when enabled) scored against them. Two passes instead of one over the
        whole batch: the reference's activations are never held for a backward. Item 0's gap is 0."""
        d = run.data(self)
        n = xk.shape[0]
        ref = _Pass(self, d["keys"], d["last"].key, 1)
        with torch.no_grad(), WeightReferences():
            passes.cond_pass(xk[:1].detach(), ref, rows=[0])
        state = _Pass(self, d["keys"], d["last"].key, n - 1, refs=ref.maps)
        with WeightReferences():
            passes.cond_pass(xk[1:], state, rows=list(range(1, n)))
        if state.loss is None or not ref.maps:
            raise AttentionControlError(
                "pix2pix-zero: the guided layers were not reached in the guidance pass (the positive "
                "conditioning did not run at the full latent size)")
        return torch.cat([state.loss.new_zeros(1), state.loss])

    def guide(self, predict, x, sigma, run: Run, passes):
        d = run.data(self)
        step, sig = run.step_of(sigma)
        if self.guidance == 0.0 or step >= d["n_guided"]:
            return predict(x)
        carry = step_carry(run, step)
        with torch.inference_mode(False), torch.enable_grad():
            xk = x.detach().clone().requires_grad_(True)
            loss = self.loss_at(xk, run, passes)
            grad, = torch.autograd.grad(loss.sum(), [xk])
            moved = (xk.detach() - self.guidance * (1.0 + sig ** 2) * grad.detach()).detach()
        d["log"].append((step, [float(v) for v in loss.detach()]))
        return guided_prediction(predict, x, moved, carry)
