"""Training-free layout control with cross-attention guidance (Chen, Laina, Vedaldi 2023,
"Training-Free Layout Control with Cross-Attention Guidance"; reference code silent-chen/layout-guidance).

Backward guidance: the energy of object k (box B_k, phrase tokens P_k) on the cond-row
cross-attention probabilities A of the selected layers is

    E = 1 / (K L) * sum_layers sum_k mean_{i in P_k} mean_heads (1 - sum_u m_k(u) A[u, i] / sum_u A[u, i])^2

with m_k the box's cell mask on the map: by default the reference's binary mask
`[int(y0 H):int(y1 H), int(x0 W):int(x1 W)]`; optionally each cell's exact covered fraction (so that
boxes off the grid and small boxes at 8x8 count by their area). For the first fraction of the steps the latent is moved, up to `iterations` times
while E > threshold, by  x <- x - sigma^2 * grad_x(strength * E)  (positive-only forward that stops
after the last guided layer), then the ordinary CFG prediction is taken at the moved latent.

In ComfyUI the sampler owns the latent, so the move is handed over in denoised form: for the
step sigma_i -> sigma_{i+1} the controller returns

    D' = D(x_K) + sigma_{i+1} / (sigma_i - sigma_{i+1}) * (x_K - x)

for which a first-order step from x (Euler, DDIM) lands exactly where the paper's step from x_K
lands; for every other sampler it is a classifier-guidance-form change of the denoised prediction
(same direction, sigma^2-scaled), so it works with any k-diffusion sampler.

Forward guidance (no gradients): on the selected layers and guided steps each phrase token's
cond-row attention column is blended toward a smooth window over its box, keeping the column's
mass: A'[:, i] = (1 - lam) A[:, i] + lam * g_k * sum_u A[u, i]. Linear in V, so it is the fused
output plus a rank-|P| correction; no (HW x HW) matrix is involved (cross-attention only).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from .core import (AttentionControlError, Controller, LayerSelector, Run, StopForward, require_prompt_length,
                   select_sites)
from .grad import WeightReferences, autograd_weights
from .maps import split_heads, token_columns
from .validate import check_finite, check_range

DEFAULT_LAYERS = "mid, up@1/4"          # backward guidance: the paper's layers
FORWARD_DEFAULT_LAYERS = "all"           # forward guidance: measured (issue 16 item 2) to need every cross layer


# --------------------------------------------------------------------------------------------
# boxes

@dataclass(frozen=True)
class Box:
    """A phrase bound to a box in fractions of the image: x0 < x1, y0 < y1, all in [0, 1]."""
    phrase: str
    x0: float
    y0: float
    x1: float
    y1: float

    def as_list(self) -> list[float]:
        return [self.x0, self.y0, self.x1, self.y1]


class Boxes(tuple):
    """The BOXES value: a tuple of Box (fractions of the image)."""

    def __deepcopy__(self, memo):
        return self


def _check_box(phrase: str, vals, units: str, width: int, height: int, where: str) -> Box:
    if len(vals) != 4:
        raise AttentionControlError(f"boxes: {where} needs 4 numbers x0,y0,x1,y1, got {len(vals)}")
    try:
        x0, y0, x1, y1 = (float(v) for v in vals)
    except (TypeError, ValueError):
        raise AttentionControlError(f"boxes: {where}: coordinates must be numbers x0,y0,x1,y1") from None
    if any(not math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise AttentionControlError(f"boxes: {where} has a non-finite coordinate")
    if units == "pixels":
        lim = (width, height, width, height)
        if min(x0, y0, x1, y1) < 0 or x0 > width or x1 > width or y0 > height or y1 > height:
            raise AttentionControlError(
                f"boxes: {where} ({x0:g},{y0:g},{x1:g},{y1:g} px) lies outside the {width}x{height} image; "
                "give coordinates inside the image or change width/height")
        x0, y0, x1, y1 = (v / l for v, l in zip((x0, y0, x1, y1), lim))
    elif min(x0, y0, x1, y1) < 0.0 or max(x0, y0, x1, y1) > 1.0:
        raise AttentionControlError(
            f"boxes: {where} ({x0:g},{y0:g},{x1:g},{y1:g}) lies outside the image: fractions must be in [0, 1] "
            "(set units to pixels for pixel coordinates)")
    if not (x1 > x0 and y1 > y0):
        raise AttentionControlError(
            f"boxes: {where} is empty (need x0 < x1 and y0 < y1, got {x0:g},{y0:g},{x1:g},{y1:g}); "
            "boxes are x0,y0,x1,y1 (left, top, right, bottom)")
    if not phrase:
        raise AttentionControlError(f"boxes: {where} has no phrase; write 'phrase: x0,y0,x1,y1'")
    return Box(phrase, x0, y0, x1, y1)


def parse_boxes(text: str, units: str = "fraction", width: int = 512, height: int = 512) -> Boxes:
    """Boxes from the node's text: one `phrase: x0,y0,x1,y1` per line, or the editor's JSON
    `[{"phrase": "cat", "box": [x0, y0, x1, y1]}, ...]` (same units)."""
    if units not in ("fraction", "pixels"):
        raise AttentionControlError(f"units: '{units}' is not fraction or pixels")
    if units == "pixels" and (width <= 0 or height <= 0):
        raise AttentionControlError(f"width/height: need a positive image size for pixel boxes, got {width}x{height}")
    text = (text or "").strip()
    out = []
    if text.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise AttentionControlError(f"boxes: the JSON form does not parse ({e.msg} at character {e.pos})") from None
        if not isinstance(items, list):
            raise AttentionControlError("boxes: the JSON form must be a list of {\"phrase\": ..., \"box\": [x0,y0,x1,y1]}")
        for n, it in enumerate(items):
            if not isinstance(it, dict) or not isinstance(it.get("box"), (list, tuple)):
                raise AttentionControlError(f"boxes: JSON item {n + 1} needs \"phrase\" and \"box\": [x0,y0,x1,y1]")
            out.append(_check_box(str(it.get("phrase", "")).strip(), it["box"], units, width, height,
                                  f"box {n + 1} ('{it.get('phrase', '')}')"))
    else:
        for n, line in enumerate(text.splitlines()):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            phrase, sep, rest = line.rpartition(":")
            if not sep:
                raise AttentionControlError(f"boxes: line {n + 1} '{line}' needs the form 'phrase: x0,y0,x1,y1'")
            try:
                vals = [float(v) for v in rest.replace(" ", ",").split(",") if v.strip()]
            except ValueError:
                raise AttentionControlError(f"boxes: line {n + 1} '{line}': coordinates must be numbers") from None
            out.append(_check_box(phrase.strip(), vals, units, width, height, f"line {n + 1} ('{phrase.strip()}')"))
    if not out:
        raise AttentionControlError("boxes: no box given; write one 'phrase: x0,y0,x1,y1' per line")
    return Boxes(out)


def box_coverage(box: Box, h: int, w: int, device=None) -> torch.Tensor:
    """(h, w) fraction of each map cell covered by the box (exact area overlap)."""
    def axis(a0, a1, n):
        edges = torch.arange(n + 1, dtype=torch.float32, device=device) / n
        lo = torch.clamp(edges[:-1], min=a0)
        hi = torch.clamp(edges[1:], max=a1)
        return (hi - lo).clamp_min(0.0) * n
    return axis(box.y0, box.y1, h)[:, None] * axis(box.x0, box.x1, w)[None, :]


BOX_CELLS = ("reference", "fraction")


def box_cells(box: Box, h: int, w: int, device=None) -> torch.Tensor:
    """(h, w) binary cell mask of the reference code: rows int(y0 h) .. int(y1 h) - 1, columns
    int(x0 w) .. int(x1 w) - 1. Truncation: a low edge inside a cell takes that cell, a high edge
    inside a cell leaves it out."""
    m = torch.zeros(h, w, device=device)
    m[int(box.y0 * h):int(box.y1 * h), int(box.x0 * w):int(box.x1 * w)] = 1.0
    return m


def box_window(box: Box, h: int, w: int, device=None) -> torch.Tensor:
    """(h, w) smooth window over the box (logistic edges, softness 1/8 of the box side, at least
    half a cell), normalised to sum 1: where forward guidance moves a phrase's attention."""
    def axis(a0, a1, n):
        c = (torch.arange(n, dtype=torch.float32, device=device) + 0.5) / n
        tau = max((a1 - a0) / 8.0, 0.5 / n)
        return torch.sigmoid((c - a0) / tau) * torch.sigmoid((a1 - c) / tau)
    g = axis(box.y0, box.y1, h)[:, None] * axis(box.x0, box.x1, w)[None, :]
    return g / g.sum().clamp_min(1e-12)


def boxes_to_masks(boxes, height: int, width: int) -> torch.Tensor:
    """(K, height, width) binary masks (pixel centres inside the box)."""
    ys = (torch.arange(height, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) / width
    out = []
    for b in boxes:
        my = (ys >= b.y0) & (ys < b.y1)
        mx = (xs >= b.x0) & (xs < b.x1)
        out.append((my[:, None] & mx[None, :]).float())
    return torch.stack(out)


# --------------------------------------------------------------------------------------------
# energy

def cross_probs(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """Cond-row cross-attention probabilities (B, heads, N, K) (softmax over all keys)."""
    qh, kh = split_heads(q, heads), split_heads(k, heads)
    scale = qh.shape[-1] ** -0.5
    return (torch.matmul(qh.float(), kh.float().transpose(-1, -2)) * scale).softmax(dim=-1)


def layer_energy(probs: torch.Tensor, objects: list[tuple[list[int], torch.Tensor]]) -> torch.Tensor:
    """Sum over objects of mean_{i in P_k} mean_heads (1 - inside_k(i))^2 for one layer.

    probs: (B, heads, N, K); objects: (key columns of the phrase, coverage (N,)). Returns (B,)."""
    total = probs.new_zeros(probs.shape[0])
    for cols, cover in objects:
        a = probs[..., cols]                                          # (B, heads, N, P)
        inside = (a * cover[None, None, :, None]).sum(2) / a.sum(2).clamp_min(1e-12)   # (B, heads, P)
        total = total + ((1.0 - inside) ** 2).mean(1).mean(-1)
    return total


def forward_delta(probs: torch.Tensor, vh: torch.Tensor, objects: list[tuple[list[int], torch.Tensor]],
                  lam: float) -> torch.Tensor:
    """Change of the attention output (B, heads, N, d) when each phrase column i moves to
    (1 - lam) A[:, i] + lam * g_k * sum_u A[u, i]: lam * (g_k (mass_i V_i) - A[:, i] V_i) summed.
    probs (B, heads, N, K), vh (B, heads, K, d), objects: (key columns, window (N,) summing to 1)."""
    delta = vh.new_zeros(vh.shape[0], vh.shape[1], probs.shape[2], vh.shape[3])
    for cols, window in objects:
        a = probs[..., cols]                                                       # (B, h, N, P)
        vp = vh[:, :, cols, :]                                                     # (B, h, P, d)
        mass = a.sum(2, keepdim=True)                                              # (B, h, 1, P)
        delta += window[None, None, :, None] * torch.matmul(mass, vp) - torch.matmul(a, vp)
    return lam * delta


# --------------------------------------------------------------------------------------------
# controller

@dataclass
class LayoutObject:
    box: Box
    positions: list[int]            # token positions of the phrase (plus start/end tokens if asked)


def descend(x, sig: float, iterations: int, strength: float, threshold: float, energy_at):
    """The paper's latent update, x <- x - sigma^2 grad_x(strength * E), while E > threshold, at most
    `iterations` times (per latent item: items below the threshold stop moving). `energy_at(xk)` runs
    a guidance forward at xk (which requires grad) and returns the (B,) energy. -> (moved latent,
    the energies seen per iteration)."""
    log = []
    with torch.inference_mode(False), torch.enable_grad():
        xk = x.detach().clone()
        for _ in range(iterations):
            xk.requires_grad_(True)
            energy = energy_at(xk)
            active = (energy.detach() > threshold).to(energy.dtype)
            log.append([float(e) for e in energy.detach()])
            if not bool(active.any()):
                xk = xk.detach()
                break
            grad, = torch.autograd.grad((strength * energy * active).sum(), [xk])
            xk = (xk.detach() - (sig ** 2) * grad.detach()).detach()
        xk = xk.detach()
    return xk, log


def step_carry(run: Run, step: int) -> float:
    """sigma_{i+1} / (sigma_i - sigma_{i+1}) of the step sigma_i -> sigma_{i+1} (0 at the last step):
    how much of a latent move the denoised hand-over must carry (`guided_prediction`)."""
    s_i = run.sigmas[step]
    s_next = run.sigmas[step + 1] if step + 1 < len(run.sigmas) else 0.0
    return s_next / (s_i - s_next) if s_i > s_next else 0.0


def probs_output(probs: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """The attention output (B, N, heads * d) taken from probabilities (B, heads, N, K) already
    computed (so a guidance forward differentiates through the same maps it scored)."""
    vh = split_heads(v, heads)
    out = torch.matmul(probs.to(vh.dtype), vh)
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


def guided_prediction(predict, x, xk, carry: float):
    """The denoised prediction at the moved latent xk, handed over so that a first-order step from
    x lands where the paper's step from xk lands (see the module docstring)."""
    xk_inf = xk.clone()
    shift = xk_inf - x
    den = predict(xk_inf)
    return den + carry * shift if carry else den


class _PassState:
    """One guidance forward: collects the energy of the selected layers (with gradients)."""

    def __init__(self, controller, keys: set, last_key):
        self.controller = controller
        self.keys = keys
        self.last_key = last_key
        self.energy = None            # (B,) sum over layers of layer_energy, per latent item
        self.layers = 0

    def __deepcopy__(self, memo):
        return self


class LayoutConfig:
    """The settings of layout guidance, checked (shared by the UNet and the DiT controllers)."""

    def __init__(self, objects: list[LayoutObject], prompt_len: int, selector,
                 mode: str = "backward", strength: float = 30.0, iterations: int = 5, threshold: float = 0.2,
                 guided_fraction: float = 0.2, forward_strength: float = 0.5, weights: str = "reference",
                 cells: str = "reference", forward_selector=None):
        if not objects:
            raise AttentionControlError("boxes: give at least one box")
        if mode not in ("backward", "forward", "both"):
            raise AttentionControlError(f"mode: '{mode}' is not backward, forward or both")
        # NaN compares False with everything: without these a NaN strength turned guidance off silently
        check_range("strength", strength, 0.0, None, "use a loss scale >= 0 (paper: 30; 0 turns guidance off)")
        check_range("forward_strength", forward_strength, 0.0, 1.0)
        check_range("energy_threshold", threshold, 0.0, None)
        if iterations < 0:
            raise AttentionControlError(f"iterations: {iterations} must be >= 0")
        check_finite("guided_steps", guided_fraction, "give a fraction of the steps in [0, 1]")
        if not 0.0 <= guided_fraction <= 1.0:
            raise AttentionControlError(f"guided_steps: {guided_fraction} is not a fraction in [0, 1]")
        self.objects = objects
        self.prompt_len = prompt_len
        self.selector = selector
        self.forward_selector = forward_selector or selector
        self.mode = mode
        self.strength = float(strength)
        self.iterations = int(iterations)
        self.threshold = float(threshold)
        self.guided_fraction = float(guided_fraction)
        self.forward_strength = float(forward_strength)
        if weights not in ("reference", "copy"):
            raise AttentionControlError(f"weights: '{weights}' is not reference or copy")
        self.weights = weights
        if cells not in BOX_CELLS:
            raise AttentionControlError(f"box_cells: '{cells}' is not one of {', '.join(BOX_CELLS)}")
        self.cells = cells
        self.backward_on = mode in ("backward", "both") and self.strength > 0 and self.iterations > 0
        self.forward_on = mode in ("forward", "both") and self.forward_strength > 0


class LayoutController(LayoutConfig, Controller):
    """Backward (gradient) and forward (attention-bias) layout guidance."""
    name = "layout guidance"
    kinds = frozenset({"cross"})
    wraps_guider = True

    # -- layer choice: backward guidance on `selector`, forward guidance on `forward_selector`
    def _selectors(self):
        return ([self.selector] if self.backward_on or not self.forward_on else []) + \
            ([self.forward_selector] if self.forward_on else [])

    def validate_sites(self, sites) -> None:
        for sel in self._selectors():
            select_sites(sites, sel, "cross", input_name="layers")

    def wants(self, site) -> bool:
        return site.kind == "cross" and any(sel.static_match(site) for sel in self._selectors())

    def wants_at(self, site, latent_hw) -> bool:
        return site.kind == "cross" and any(sel.match(site, latent_hw) for sel in self._selectors())

    # -- run set-up
    def begin_run(self, run: Run) -> None:
        sites = select_sites(run.router.sites, self.selector, "cross", run.latent_hw, input_name="layers")
        fsites = select_sites(run.router.sites, self.forward_selector, "cross", run.latent_hw, input_name="layers")
        require_prompt_length(run, self.prompt_len, "layout")
        d = run.data(self)
        d["keys"] = {s.key for s in sites}
        d["fkeys"] = {s.key for s in fsites}
        d["last"] = max(sites, key=lambda s: s.order)
        d["n_guided"] = int(round(self.guided_fraction * run.n_steps))
        d["cache"] = {}
        d["energy_log"] = []
        d["weights"] = None

    def end_run(self, run: Run, ok: bool) -> None:
        d = run.data(self)
        self._release_weights(d)
        self.last_energy_log = list(d.get("energy_log", []))
        self.last_weight_bytes = int(d.get("weight_bytes", 0))

    def _release_weights(self, d):
        cm = d.get("weights")
        if cm is not None:
            d["weights"] = None
            cm.__exit__(None, None, None)

    def _objects_at(self, d, h: int, w: int, key_len: int, device):
        key = (h, w, key_len, device)
        got = d["cache"].get(key)
        if got is None:
            got = [(token_columns(o.positions, self.prompt_len, key_len),
                    (box_cells if self.cells == "reference" else box_coverage)(o.box, h, w, device).flatten(),
                    box_window(o.box, h, w, device).flatten()) for o in self.objects]
            d["cache"][key] = got
        return got

    def _guided(self, d, step: int) -> bool:
        return step < d["n_guided"]

    # -- attention calls
    def attend(self, q, k, v, call, nxt):
        d = call.run.data(self)
        if not self._guided(d, call.step):
            return nxt(q, k, v)
        state = call.guidance
        if state is not None:
            if call.site.key not in d["keys"]:
                return nxt(q, k, v)
            return self._energy_call(q, k, v, call, d, state)
        if not self.forward_on or call.site.key not in d["fkeys"]:
            return nxt(q, k, v)
        if not call.cond_chunks():
            return nxt(q, k, v)
        rows = call.cond_rows().to(q.device)
        objs = self._objects_at(d, call.h, call.w, k.shape[1], q.device)
        probs = cross_probs(q.index_select(0, rows), k.index_select(0, rows), call.site.heads)
        vh = split_heads(v.index_select(0, rows), call.site.heads).float()
        delta = forward_delta(probs, vh, [(cols, window) for cols, _c, window in objs], self.forward_strength)
        delta = delta.transpose(1, 2).reshape(rows.numel(), probs.shape[2], -1)
        out = nxt(q, k, v).clone()     # q, k, v are not read after nxt
        out.index_add_(0, rows, delta.to(out.dtype))
        return out

    def _energy_call(self, q, k, v, call, d, state: _PassState):
        probs = cross_probs(q, k, call.site.heads)                         # (R, h, N, K), with grad
        objs = [(cols, cover) for cols, cover, _w in self._objects_at(d, call.h, call.w, k.shape[1], q.device)]
        e = layer_energy(probs, objs)                                              # (R,)
        e = e.view(-1, call.batch).sum(0)                                          # per latent item
        state.energy = e if state.energy is None else state.energy + e
        state.layers += 1
        if call.site.key == state.last_key:
            raise StopForward()
        return probs_output(probs, v, call.site.heads)

    # -- whole-step guidance
    def guide(self, predict, x, sigma, run: Run, passes):
        d = run.data(self)
        step, sig = run.step_of(sigma)
        if not self.backward_on or not self._guided(d, step):
            return predict(x)
        last = d["last"]
        n_obj_layers = len(self.objects) * len([s for s in run.router.sites if s.kind == "cross" and s.key in d["keys"]])
        if d["weights"] is None and self.weights == "copy":
            cm = autograd_weights(passes.unet_modules(last))
            d["weight_bytes"] = cm.__enter__()
            d["weights"] = cm
        carry = step_carry(run, step)
        def energy_at(xk):
            state = _PassState(self, d["keys"], last.key)
            if self.weights == "copy":
                passes.cond_pass(xk, state)
            else:
                with WeightReferences():
                    passes.cond_pass(xk, state)
            if state.energy is None:
                raise AttentionControlError(
                    "layout guidance: the guided layers were not reached in the guidance pass "
                    "(the positive conditioning did not run at the full latent size)")
            return state.energy / max(n_obj_layers, 1)                             # (B,)

        xk, log = descend(x, sig, self.iterations, self.strength, self.threshold, energy_at)
        d["energy_log"].append((step, log))
        if step + 1 >= d["n_guided"]:
            self._release_weights(d)
        return guided_prediction(predict, x, xk, carry)
