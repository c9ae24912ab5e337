"""Nodes: AttnCtl_TrainSpectralShifts (SVDiff), AttnCtl_SaveSpectralShifts, AttnCtl_LoadSpectralShifts.

Training follows core's Train LoRA node (comfy_extras/nodes_train.py): a Sampler run by a Guider_Basic so that
ComfyUI loads the model and prepares the conditioning, x0-prediction MSE at a uniformly drawn noise level per
image, weight wrappers (ModelPatcher.add_weight_wrapper) carrying the trainable parameters, a LOSS_MAP output
that core's Loss Graph node plots. The trained shifts are applied to the output MODEL as weight patches."""
from __future__ import annotations

import contextlib
import json
import logging
import re
from dataclasses import dataclass

import torch
from comfy_api.latest import io

import comfy.model_management
import comfy.samplers
import comfy.utils
import comfy.weight_adapter.base as wa_base

from ..attention.core import AttentionControlError
from ..attention.dit_router import is_dit
from ..attention.grad import WeightReferences
from ..attention.router import attach
from ..attention.svdiff import SpectralShift, spectral_delta, svd_of
from ..attention.unmix import LEFT, RIGHT, DitUnmixController, UnmixController, UnmixPlan
from ..attention.validate import check_finite
from . import weight_files
from .common import CATEGORY, check_widgets, resolve_words, validation_result

log = logging.getLogger("attention_control.svdiff")

ShiftsType = io.Custom("ATTNCTL_SPECTRAL_SHIFTS")
CutMixType = io.Custom("ATTNCTL_CUT_MIX")
LossMapType = io.Custom("LOSS_MAP")              # core's type: its Loss Graph node plots it
FOLDER = "spectral_shifts"
FORMAT = "attention_control.svdiff/1"
SUFFIX = ".delta"
UNMIX_WEIGHT = 1.0


# --------------------------------------------------------------------------------------------
# which weights, and their SVDs

def shift_targets(model) -> dict[str, torch.Tensor]:
    """{module name: weight} of every weight matrix of the diffusion model that ComfyUI can wrap (linear and
    conv layers, 2-D or more; conv kernels count as (c_out, c_in k k))."""
    out = {}
    for name, mod in model.model.named_modules():
        w = getattr(mod, "weight", None)
        if name.startswith("diffusion_model.") and hasattr(mod, "weight_function") and w is not None and w.dim() >= 2:
            out[name] = w
    if not out:
        raise AttentionControlError("model: it has no weight matrices ComfyUI can wrap; SVDiff cannot train it")
    return out


_SVD_CACHE: dict = {}
_SVD_CACHE_LIMIT = 1 << 31            # bytes of cached factors


def _fingerprint(w: torch.Tensor) -> tuple:
    """Shape and three sums of the values (the same for a weight and its float32 copy)."""
    flat = w.detach().reshape(-1).double()
    return tuple(w.shape), float(flat.sum()), float(flat[:16].sum()), float((flat * flat).sum())


def cached_svd(key: str, w: torch.Tensor):
    """svd_of(w), kept while the cache holds under 2 GiB (keyed by the weight's name and content)."""
    k = (key, _fingerprint(w))
    hit = _SVD_CACHE.get(k)
    if hit is not None:
        return hit
    f = svd_of(w)
    size = sum(t.nelement() * t.element_size() for t in f)
    used = sum(sum(t.nelement() * t.element_size() for t in v) for v in _SVD_CACHE.values())
    while _SVD_CACHE and used + size > _SVD_CACHE_LIMIT:
        old = _SVD_CACHE.pop(next(iter(_SVD_CACHE)))
        used -= sum(t.nelement() * t.element_size() for t in old)
    if size <= _SVD_CACHE_LIMIT:
        _SVD_CACHE[k] = f
    return f


# --------------------------------------------------------------------------------------------
# applying shifts

class SpectralShiftPatch(wa_base.WeightAdapterBase):
    """One weight's spectral shift as a ModelPatcher weight patch: W <- W + U diag(relu(s + scale d) - s) V^T,
    with (U, s, V^T) the SVD of the weight as patched before it (the model's own weight when this comes first,
    the paper's form). ComfyUI's patch strength is the paper's scale (inside the relu)."""
    name = "attnctl_svdiff"

    def __init__(self, shift: torch.Tensor):
        self.shift = shift
        self.loaded_keys = set()
        self.weights = []

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        if strength == 0.0:
            return weight
        u, s, vh = cached_svd(key, weight)
        if s.shape != self.shift.shape:
            log.warning("SVDiff: %s has %d singular values, the shift %d; left unchanged", key, s.numel(),
                        self.shift.numel())
            return weight
        dev = weight.device
        delta = spectral_delta(u.to(dev), s.to(dev), vh.to(dev), self.shift.to(dev, torch.float32), strength)
        weight += function(delta.reshape(weight.shape)).type(weight.dtype)
        return weight


def apply_shifts(model, shifts: dict, scale: float, source: str = "shifts"):
    """A clone of `model` with every shift patched in at `scale` (0: a plain clone). Shifts must fit the
    model's weights (names and singular-value counts); errors name `source`."""
    m = model.clone()
    if scale == 0.0:
        return m
    targets = shift_targets(model)
    patches = {}
    for name, shift in shifts.items():
        w = targets.get(name)
        if w is None:
            raise AttentionControlError(f"{source}: the shifts name '{name}', which this model does not have; "
                                        f"use shifts trained on this model family")
        n = min(w.shape[0], w[0].numel())
        if shift.dim() != 1 or shift.numel() != n:
            raise AttentionControlError(f"{source}: '{name}' has {shift.numel()} shifts, its weight {n} singular "
                                        f"values; use shifts trained on this model")
        patches[f"{name}.weight"] = SpectralShiftPatch(shift.detach().float().cpu())
    added = m.add_patches(patches, scale)
    if len(added) != len(patches):
        raise AttentionControlError(f"{source}: {len(patches) - len(added)} weights are not in the model's state dict")
    return m


# --------------------------------------------------------------------------------------------
# training

class _Fresh(torch.nn.Module):
    """A weight wrapper that hands the layer a copy made outside inference mode (ComfyUI loads weights as
    inference tensors, which autograd cannot save for the backward pass through norms and biases)."""

    def __call__(self, w):
        return w.clone()

    def passive_memory_usage(self):
        return 0

    def move_to(self, device):
        return 0


def _fresh_conds(x):
    """The conditioning with every tensor cloned outside inference mode (autograd saves the context for the
    projections' weight gradients), as core's trainer does."""
    if torch.is_tensor(x):
        return x.clone()
    if isinstance(x, dict):
        return {k: _fresh_conds(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_fresh_conds(v) for v in x]
    if isinstance(x, tuple):
        return tuple(_fresh_conds(v) for v in x)
    if hasattr(x, "cond") and torch.is_tensor(getattr(x, "cond")):     # comfy.conds.CONDRegular and kin
        import copy
        y = copy.copy(x)
        y.cond = x.cond.clone()
        return y
    return x


@dataclass
class CutMix:
    """Cut-Mix-Unmix (SVDiff section 3.2): a second subject's images and caption, the mixed captions
    (caption conditioning, prompt length, [(token positions, half) of word_a, of word_b], whether
    word_a's subject is on the left), the share of training samples that are mixes and the unmix
    weight."""
    latents: torch.Tensor
    positive: list
    mixes: list
    fraction: float
    weight: float

    def __deepcopy__(self, memo):
        return self


def _cut_mix(a: torch.Tensor, b: torch.Tensor, a_left: bool) -> torch.Tensor:
    """The left half of one latent joined to the right half of the other (split at width // 2)."""
    cut = a.shape[-1] // 2
    left, right = (a, b) if a_left else (b, a)
    return torch.cat([left[..., :cut], right[..., cut:]], dim=-1)


class _ShiftSampler(comfy.samplers.Sampler):
    """The training loop, run by a Guider_Basic as core's TrainSampler is: per step, `batch` images drawn with
    the seed's generator, noise level percent_to_sigma(u), u ~ U(0, 1), x0-prediction MSE, AdamW on the shifts.
    Items are run in groups of one caption each (ComfyUI applies every conditioning of a list to every batch
    item and averages them). With Cut-Mix, each drawn item is replaced by a mix with probability
    `cut_mix.fraction` and the unmix term is added with its weight."""

    def __init__(self, params, lr, steps, batch, seed, losses, n_a=0, cut_mix=None, plan=None):
        self.params, self.steps, self.batch, self.seed, self.losses = params, steps, batch, seed, losses
        self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        self.n_a, self.cut_mix, self.plan = n_a, cut_mix, plan
        self.unmix: list[float] = []

    def _draw(self, g, latent_image):
        """-> (x0 of the step's items, the conditioning index of each)."""
        n = latent_image.shape[0]
        idx = torch.randperm(n, generator=g)[: self.batch].tolist()
        cm = self.cut_mix
        if cm is None:
            return latent_image[idx], idx
        xs, ci = [], []
        n_b = n - self.n_a
        for i in idx:
            if float(torch.rand(1, generator=g)) < cm.fraction:
                ia = int(torch.randint(self.n_a, (1,), generator=g))
                ib = self.n_a + int(torch.randint(n_b, (1,), generator=g))
                m = int(torch.randint(len(cm.mixes), (1,), generator=g))
                xs.append(_cut_mix(latent_image[ia], latent_image[ib], cm.mixes[m][3]))
                ci.append(n + m)
            else:
                xs.append(latent_image[i])
                ci.append(i)
        return torch.stack(xs), ci

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        ms = model_wrap.inner_model.model_sampling
        conds = _fresh_conds(list(model_wrap.conds["positive"]))
        n = latent_image.shape[0]
        g = torch.Generator().manual_seed(self.seed)
        pbar = comfy.utils.ProgressBar(self.steps)
        for _step in range(self.steps):
            comfy.model_management.throw_exception_if_processing_interrupted()
            x0, ci = self._draw(g, latent_image)
            eps = torch.randn(x0.shape, generator=g).to(x0)
            sig = torch.tensor([float(ms.percent_to_sigma(float(torch.rand(1, generator=g)))) for _ in ci]).to(x0)
            xt = ms.noise_scaling(sig, eps, x0, False)
            target = ms.noise_scaling(torch.zeros_like(sig), torch.zeros_like(eps), x0, False)
            sse, unmix, n_mixed = 0.0, 0.0, 0
            for c in dict.fromkeys(ci):
                rows = [j for j, cj in enumerate(ci) if cj == c]
                model_wrap.conds["positive"] = [conds[c]]
                mix = self.cut_mix.mixes[c - n] if c >= n else None
                if mix is not None:
                    self.plan.start(mix[1], mix[2])
                try:
                    pred = model_wrap(xt[rows], sig[rows], **extra_args)
                finally:
                    u = self.plan.stop() if mix is not None else None
                sse = sse + ((pred.float() - target[rows].float()) ** 2).sum()
                if u is not None:
                    unmix, n_mixed = unmix + u * len(rows), n_mixed + len(rows)
            loss = sse / target.numel()
            if n_mixed:
                unmix = unmix / n_mixed
                loss = loss + self.cut_mix.weight * unmix
                self.unmix.append(float(unmix.detach()))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.losses.append(float(loss.detach()))
            pbar.update(1)
        model_wrap.conds["positive"] = conds
        return torch.zeros_like(latent_image)


def _per_image(positive: list, n: int, name: str) -> list:
    if len(positive) == 1 and n > 1:
        return positive * n
    if len(positive) != n:
        raise AttentionControlError(f"{name}: {len(positive)} conditionings for {n} latents; give one for all "
                                    f"(a prompt with the rare token) or one per image")
    return list(positive)


def train_shifts(model, latents: torch.Tensor, positive: list, steps: int, lr: float, batch: int, seed: int,
                 cut_mix: CutMix | None = None):
    """Trained shifts {module name: (k,) float32}, the per-step losses and (with Cut-Mix) the per-step unmix
    terms."""
    import comfy_extras.nodes_custom_sampler as cs
    n = latents.shape[0]
    positive = _per_image(positive, n, "positive")
    lat = latents.float()
    plan = None
    if cut_mix is not None:
        lb = cut_mix.latents
        if tuple(lb.shape[1:]) != tuple(latents.shape[1:]):
            raise AttentionControlError(f"latents_b: the second subject's latents are {tuple(lb.shape[1:])}, the "
                                        f"first's {tuple(latents.shape[1:])}; encode both at the same size")
        positive = positive + _per_image(cut_mix.positive, lb.shape[0], "positive_b") + \
            [m[0] for m in cut_mix.mixes]
        lat = torch.cat([lat, lb.float()])
    mp = model.clone()
    if cut_mix is not None:
        plan = UnmixPlan()
        mp = attach(mp, (DitUnmixController if is_dit(mp) else UnmixController)(plan))
    # load it first: the shared weights then are this MODEL's (its own patches, e.g. a LoRA, applied), not those
    # of another clone of the same checkpoint that was loaded last
    comfy.model_management.load_models_gpu([mp])
    targets = shift_targets(mp)
    losses: list[float] = []
    with torch.inference_mode(False), torch.enable_grad():
        shifts = {}
        for name, w in targets.items():
            mod = SpectralShift(w, cached_svd(f"{name}.weight", w))
            shifts[name] = mod
            mp.add_weight_wrapper(f"{name}.weight", mod)
        for name, mod in mp.model.named_modules():
            if not name.startswith("diffusion_model.") or not hasattr(mod, "weight_function"):
                continue
            if getattr(mod, "weight", None) is not None and name not in targets:
                mp.add_weight_wrapper(f"{name}.weight", _Fresh())
            if getattr(mod, "bias", None) is not None:
                mp.add_weight_wrapper(f"{name}.bias", _Fresh())
        mp.model.requires_grad_(False)
        params = [m.shift for m in shifts.values()]
        for p in params:
            p.requires_grad_(True)
        sampler = _ShiftSampler(params, lr, steps, batch, seed, losses, n, cut_mix, plan)
        guider = cs.Guider_Basic(mp)
        guider.set_conds(positive)
        lat = lat.clone()
        # Flux / Chroma blocks add into their residual stream in place after normalising it (`img += ...`):
        # their norms get a copy of the input (attention/grad.py), which autograd then saves
        norms = WeightReferences(norm_input_copies=True) if is_dit(mp) else contextlib.nullcontext()
        with norms:
            guider.sample(torch.zeros_like(lat), lat, sampler, torch.arange(lat.shape[0], dtype=torch.float32),
                          seed=seed)
        out = {name: m.shift.detach().float().cpu().clone() for name, m in shifts.items()}
    comfy.model_management.soft_empty_cache()
    return out, losses, sampler.unmix


# --------------------------------------------------------------------------------------------
# files

def shift_files() -> list[str]:
    return weight_files.listed(FOLDER)


def save_shifts(shifts: dict, path: str, meta: dict | None = None) -> None:
    import safetensors.torch
    tensors = {f"{k}{SUFFIX}": v.contiguous() for k, v in shifts.items()}
    safetensors.torch.save_file(tensors, path, metadata={"format": FORMAT, "info": json.dumps(meta or {})})


def load_shifts(path: str, name: str) -> dict:
    import safetensors
    with safetensors.safe_open(path, framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != FORMAT or not tensors or not all(k.endswith(SUFFIX) for k in tensors):
        raise AttentionControlError(f"shifts_name: '{name}' is not a spectral-shift file saved by Save Spectral "
                                    f"Shifts (format '{meta.get('format')}', keys {sorted(tensors)[:3]})")
    out = {}
    for k, v in tensors.items():
        check_finite("shifts_name", v, f"'{name}' is damaged ({k}); save the shifts again")
        out[k[: -len(SUFFIX)]] = v.float()
    return out


# --------------------------------------------------------------------------------------------
# nodes

class TrainSpectralShifts(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnCtl_TrainSpectralShifts",
            display_name="Train Spectral Shifts (SVDiff)",
            category=f"{CATEGORY}/weights",
            description="SVDiff (Han et al. 2023): personalises the model on a few images by learning only a shift "
                        "of the singular values of every weight matrix (W = U diag(relu(s + d)) V^T): a file about "
                        "1.7 MB for SD1.5, far smaller than a LoRA of the same layers. Caption the images with a rare "
                        "token ('a photo of sks dog'). The output MODEL has the shifts applied as weight patches.",
            inputs=[
                io.Model.Input("model", tooltip="The model to personalise."),
                io.Latent.Input("latents", tooltip="The training images, VAE-encoded, as one batch (4-8 images)."),
                io.Conditioning.Input("positive", tooltip="Their caption with the rare token (one for all, or a "
                                                          "batch of one per image)."),
                io.Int.Input("steps", default=500, min=1, max=100000, tooltip="Optimiser steps."),
                io.Float.Input("learning_rate", default=0.001, min=1e-6, max=1.0, step=0.0001,
                               tooltip="AdamW learning rate of the shifts (paper: 1e-3)."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Images per step."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Draws the images, noise levels and noise of every step: the same seed "
                                     "trains the same shifts."),
                CutMixType.Input("cut_mix", optional=True,
                                 tooltip="Cut-Mix-Unmix (Cut-Mix-Unmix node): also train on left/right mixes with "
                                         "a second subject, so that prompts can name both."),
            ],
            outputs=[io.Model.Output(display_name="MODEL"), ShiftsType.Output(display_name="shifts"),
                     LossMapType.Output(display_name="loss_map")],
        )

    @classmethod
    def validate_inputs(cls, steps=None, learning_rate=None, batch_size=None, seed=None):
        return validation_result(cls, locals())

    @classmethod
    def execute(cls, model, latents, positive, steps, learning_rate, batch_size, seed, cut_mix=None):
        check_widgets(cls, locals())
        lat = _training_latents(latents, "latents")
        if not positive:
            raise AttentionControlError("positive: connect the images' caption (a prompt with a rare token)")
        shifts, losses, unmix = train_shifts(model, lat, positive, steps, learning_rate, batch_size, seed, cut_mix)
        log.info("SVDiff: %d weights, %d shifts, loss %.4f -> %.4f over %d steps", len(shifts),
                 sum(v.numel() for v in shifts.values()), losses[0], losses[-1], steps)
        loss_map = {"loss": losses}
        if cut_mix is not None:
            loss_map["unmix"] = unmix
        return io.NodeOutput(apply_shifts(model, shifts, 1.0), shifts, loss_map)


def _training_latents(latents, name: str) -> torch.Tensor:
    lat = latents.get("samples") if isinstance(latents, dict) else None
    if not torch.is_tensor(lat) or lat.dim() < 4 or lat.shape[0] == 0:
        raise AttentionControlError(f"{name}: give at least one image (a LATENT batch from VAEEncode); "
                                    f"got {tuple(lat.shape) if torch.is_tensor(lat) else type(lat).__name__}")
    check_finite(name, lat, "re-encode the images with VAEEncode")
    return lat


_SIDES = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def _swap_sides(text: str) -> str:
    def sub(m):
        w = m.group(0)
        o = {"left": "right", "right": "left"}[w.lower()]
        return o.capitalize() if w[0].isupper() else o
    return _SIDES.sub(sub, text)


def _check_words(word_a, word_b) -> None:
    """The two rare tokens: each one word, not the same (None: not given yet, as in validate_inputs)."""
    for name, w in (("word_a", word_a), ("word_b", word_b)):
        if w is not None and (not w.strip() or "," in w):
            raise AttentionControlError(f"{name}: give the subject's rare token (one word of mix_prompt)")
    if word_a is not None and word_b is not None and word_a.strip().lower() == word_b.strip().lower():
        raise AttentionControlError("word_b: it is the same word as word_a; give each subject its own token")


def build_cut_mix(clip, latents_b, positive_b, mix_prompt: str, word_a: str, word_b: str, fraction: float,
                  weight: float) -> CutMix:
    """The CutMix of the node: the mixed caption encoded (and its left/right swap when it names both sides)
    with the positions of the two words in each; errors name the input."""
    lb = _training_latents(latents_b, "latents_b")
    if not positive_b:
        raise AttentionControlError("positive_b: connect the second subject's caption (with its rare token)")
    text = (mix_prompt or "").strip()
    if not text:
        raise AttentionControlError("mix_prompt: describe both subjects, e.g. 'a sks dog on the left and a zwx "
                                    "cat on the right'")
    _check_words(word_a or "", word_b or "")
    lower = {m.group(0).lower() for m in _SIDES.finditer(text)}
    variants = [(text, True)] + ([(_swap_sides(text), False)] if lower == {"left", "right"} else [])
    mixes = []
    for t, a_left in variants:
        pa, plen = resolve_words(clip, t, word_a.strip(), input_name="word_a")
        pb, _ = resolve_words(clip, t, word_b.strip(), input_name="word_b")
        cond = clip.encode_from_tokens_scheduled(clip.tokenize(t))
        if len(cond) != 1:
            raise AttentionControlError(f"clip: the mix prompt encodes to {len(cond)} conditionings (scheduled "
                                        f"hooks on the CLIP); train without hooks")
        objects = [(list(pa[0].positions), LEFT if a_left else RIGHT), (list(pb[0].positions), RIGHT if a_left else LEFT)]
        mixes.append((cond[0], plen, objects, a_left))
    return CutMix(lb, list(positive_b), mixes, float(fraction), float(weight))


class CutMixUnmix(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnCtl_CutMixUnmix",
            display_name="Cut-Mix-Unmix (SVDiff)",
            category=f"{CATEGORY}/weights",
            description="SVDiff's augmentation for two subjects: training samples that join one subject's image "
                        "(left half) with the other's (right half), captioned with both rare tokens, and the unmix "
                        "regularisation that keeps each token's cross-attention on its own half. Connect it to "
                        "Train Spectral Shifts (cut_mix); its latents / positive are the first subject.",
            inputs=[
                io.Clip.Input("clip", tooltip="Encodes the mixed caption (the CLIP of the model you train)."),
                io.Latent.Input("latents_b", tooltip="The second subject's training images (same size as the "
                                                      "first's)."),
                io.Conditioning.Input("positive_b", tooltip="The second subject's caption, with its rare token."),
                io.String.Input("mix_prompt", multiline=True,
                                default="a sks square on the left and a zwx circle on the right",
                                tooltip="Caption of a mix: word_a's subject on the left, word_b's on the right. When "
                                        "it names both 'left' and 'right', half the mixes swap the halves and the "
                                        "caption's sides."),
                io.String.Input("word_a", default="sks", tooltip="The first subject's rare token in mix_prompt."),
                io.String.Input("word_b", default="zwx", tooltip="The second subject's rare token in mix_prompt."),
                io.Float.Input("mix_fraction", default=0.5, min=0.0, max=1.0, step=0.05,
                               tooltip="Share of the training samples that are mixes."),
                io.Float.Input("unmix_weight", default=UNMIX_WEIGHT, min=0.0, max=100.0, step=0.01,
                               tooltip="Weight of the unmix term (the squared share of each token's attention on "
                                       "the other half); 0: Cut-Mix alone."),
            ],
            outputs=[CutMixType.Output(display_name="cut_mix")],
        )

    @classmethod
    def validate_inputs(cls, mix_prompt=None, word_a=None, word_b=None, mix_fraction=None, unmix_weight=None):
        def extra(v):
            _check_words(v.get("word_a"), v.get("word_b"))
            if v.get("mix_prompt") is not None and not v["mix_prompt"].strip():
                raise AttentionControlError("mix_prompt: describe both subjects")
        return validation_result(cls, locals(), extra)

    @classmethod
    def execute(cls, clip, latents_b, positive_b, mix_prompt, word_a, word_b, mix_fraction, unmix_weight):
        check_widgets(cls, locals())
        return io.NodeOutput(build_cut_mix(clip, latents_b, positive_b, mix_prompt, word_a, word_b, mix_fraction,
                                           unmix_weight))


class SaveSpectralShifts(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnCtl_SaveSpectralShifts",
            display_name="Save Spectral Shifts (SVDiff)",
            category=f"{CATEGORY}/weights",
            description="Writes trained spectral shifts to output/spectral_shifts/ (safetensors, one '<module>.delta' "
                        "vector per weight matrix); Load Spectral Shifts lists them.",
            inputs=[ShiftsType.Input("shifts", tooltip="The shifts output of Train Spectral Shifts."),
                    io.String.Input("filename_prefix", default="spectral_shifts/svdiff",
                                    tooltip="Path under the output folder, without the extension.")],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, shifts, filename_prefix):
        path = weight_files.save_path(filename_prefix, "spectral_shifts/svdiff")
        save_shifts(shifts, path)
        log.info("SVDiff shifts saved: %s (%d weights)", path, len(shifts))
        return io.NodeOutput()


class LoadSpectralShifts(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnCtl_LoadSpectralShifts",
            display_name="Load Spectral Shifts (SVDiff)",
            category=f"{CATEGORY}/weights",
            description="Applies saved spectral shifts to a model as weight patches: W + U diag(relu(s + scale d) - "
                        "s) V^T per weight matrix. Scale 0 is the model unchanged; it chains with LoRAs.",
            inputs=[
                io.Model.Input("model", tooltip="The model the shifts were trained on (or the same family)."),
                io.Combo.Input("shifts_name", options=shift_files(),
                               tooltip="A file from models/spectral_shifts/ or output/spectral_shifts/."),
                io.Float.Input("scale", default=1.0, min=-4.0, max=4.0, step=0.05,
                               tooltip="The paper's scale of the shifts (inside the relu); 0: the model unchanged."),
            ],
            outputs=[io.Model.Output(display_name="MODEL"), ShiftsType.Output(display_name="shifts")],
        )

    @classmethod
    def validate_inputs(cls, shifts_name=None, scale=None):
        return validation_result(cls, locals())

    @classmethod
    def execute(cls, model, shifts_name, scale):
        check_widgets(cls, locals())
        path = weight_files.find(FOLDER, shifts_name, "shifts_name")
        shifts = load_shifts(path, shifts_name)
        return io.NodeOutput(apply_shifts(model, shifts, scale, "shifts_name"), shifts)


class ApplySpectralShifts(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnCtl_ApplySpectralShifts",
            display_name="Apply Spectral Shifts (SVDiff)",
            category=f"{CATEGORY}/weights",
            description="Applies connected spectral shifts (from Train or Load Spectral Shifts) to a model at a "
                        "scale, as core's Load LoRA Model applies a trained LoRA: try scales of freshly trained "
                        "shifts without saving them, or put one subject's shifts on another model of the family.",
            inputs=[
                io.Model.Input("model", tooltip="The model the shifts were trained on (or the same family)."),
                ShiftsType.Input("shifts", tooltip="The shifts output of Train or Load Spectral Shifts."),
                io.Float.Input("scale", default=1.0, min=-4.0, max=4.0, step=0.05,
                               tooltip="The paper's scale of the shifts (inside the relu); 0: the model unchanged."),
            ],
            outputs=[io.Model.Output(display_name="MODEL")],
        )

    @classmethod
    def validate_inputs(cls, scale=None):
        return validation_result(cls, locals())

    @classmethod
    def execute(cls, model, shifts, scale):
        check_widgets(cls, locals())
        if not isinstance(shifts, dict) or not shifts:
            raise AttentionControlError("shifts: connect the shifts output of Train or Load Spectral Shifts")
        for k, v in shifts.items():
            check_finite("shifts", v, f"the shifts of '{k}' are damaged; train or load them again")
        return io.NodeOutput(apply_shifts(model, shifts, scale, "shifts"))


NODES = [TrainSpectralShifts, CutMixUnmix, SaveSpectralShifts, LoadSpectralShifts, ApplySpectralShifts]
