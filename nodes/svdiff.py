"""Nodes: AttnCtl_TrainSpectralShifts (SVDiff), AttnCtl_SaveSpectralShifts, AttnCtl_LoadSpectralShifts.

Training follows core's Train LoRA node (comfy_extras/nodes_train.py): a Sampler run by a Guider_Basic so that
ComfyUI loads the model and prepares the conditioning, x0-prediction MSE at a uniformly drawn noise level per
image, weight wrappers (ModelPatcher.add_weight_wrapper) carrying the trainable parameters, a LOSS_MAP output
that core's Loss Graph node plots. The trained shifts are applied to the output MODEL as weight patches."""
from __future__ import annotations

import json
import logging

import torch
from comfy_api.latest import io

import comfy.model_management
import comfy.samplers
import comfy.utils
import comfy.weight_adapter.base as wa_base

from ..attention.core import AttentionControlError
from ..attention.svdiff import SpectralShift, spectral_delta, svd_of
from ..attention.validate import check_finite
from . import weight_files
from .common import CATEGORY, check_widgets, validation_result

log = logging.getLogger("attention_control.svdiff")

ShiftsType = io.Custom("ATTNCTL_SPECTRAL_SHIFTS")
LossMapType = io.Custom("LOSS_MAP")              # core's type: its Loss Graph node plots it
FOLDER = "spectral_shifts"
FORMAT = "attention_control.svdiff/1"
SUFFIX = ".delta"


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


class _ShiftSampler(comfy.samplers.Sampler):
    """The training loop, run by a Guider_Basic as core's TrainSampler is: per step, `batch` images drawn with
    the seed's generator, noise level percent_to_sigma(u), u ~ U(0, 1), x0-prediction MSE, Adam on the shifts."""

    def __init__(self, params, lr, steps, batch, seed, losses):
        self.params, self.steps, self.batch, self.seed, self.losses = params, steps, batch, seed, losses
        self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        ms = model_wrap.inner_model.model_sampling
        conds = _fresh_conds(list(model_wrap.conds["positive"]))
        n = latent_image.shape[0]
        g = torch.Generator().manual_seed(self.seed)
        pbar = comfy.utils.ProgressBar(self.steps)
        for _step in range(self.steps):
            comfy.model_management.throw_exception_if_processing_interrupted()
            idx = torch.randperm(n, generator=g)[: self.batch].tolist()
            x0 = latent_image[idx]
            eps = torch.randn(x0.shape, generator=g).to(x0)
            sig = torch.tensor([float(ms.percent_to_sigma(float(torch.rand(1, generator=g)))) for _ in idx]).to(x0)
            xt = ms.noise_scaling(sig, eps, x0, False)
            target = ms.noise_scaling(torch.zeros_like(sig), torch.zeros_like(eps), x0, False)
            model_wrap.conds["positive"] = [conds[i] for i in idx]
            pred = model_wrap(xt, sig, **extra_args)
            loss = torch.nn.functional.mse_loss(pred.float(), target.float())
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.losses.append(float(loss.detach()))
            pbar.update(1)
        model_wrap.conds["positive"] = conds
        return torch.zeros_like(latent_image)


def train_shifts(model, latents: torch.Tensor, positive: list, steps: int, lr: float, batch: int, seed: int):
    """Trained shifts {module name: (k,) float32} and the per-step losses."""
    import comfy_extras.nodes_custom_sampler as cs
    n = latents.shape[0]
    if len(positive) == 1 and n > 1:
        positive = positive * n
    if len(positive) != n:
        raise AttentionControlError(f"positive: {len(positive)} conditionings for {n} latents; give one for all "
                                    f"(a prompt with the rare token) or one per image")
    mp = model.clone()
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
        sampler = _ShiftSampler(params, lr, steps, batch, seed, losses)
        guider = cs.Guider_Basic(mp)
        guider.set_conds(positive)
        lat = latents.float().clone()
        guider.sample(torch.zeros_like(lat), lat, sampler, torch.arange(n, dtype=torch.float32), seed=seed)
        out = {name: m.shift.detach().float().cpu().clone() for name, m in shifts.items()}
    comfy.model_management.soft_empty_cache()
    return out, losses


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
            ],
            outputs=[io.Model.Output(display_name="MODEL"), ShiftsType.Output(display_name="shifts"),
                     LossMapType.Output(display_name="loss_map")],
        )

    @classmethod
    def validate_inputs(cls, steps=None, learning_rate=None, batch_size=None, seed=None):
        return validation_result(cls, locals())

    @classmethod
    def execute(cls, model, latents, positive, steps, learning_rate, batch_size, seed):
        check_widgets(cls, locals())
        lat = latents["samples"]
        check_finite("latents", lat, "re-encode the images with VAEEncode")
        if not positive:
            raise AttentionControlError("positive: connect the images' caption (a prompt with a rare token)")
        shifts, losses = train_shifts(model, lat, positive, steps, learning_rate, batch_size, seed)
        log.info("SVDiff: %d weights, %d shifts, loss %.4f -> %.4f over %d steps", len(shifts),
                 sum(v.numel() for v in shifts.values()), losses[0], losses[-1], steps)
        return io.NodeOutput(apply_shifts(model, shifts, 1.0), shifts, {"loss": losses})


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


NODES = [TrainSpectralShifts, SaveSpectralShifts, LoadSpectralShifts]
