"""Nodes: AttnCtl_TrainSketchPredictor, AttnCtl_SaveSketchPredictor, AttnCtl_LoadSketchPredictor and
AttnCtl_SketchGuidance (Voynov et al. 2022, sketch-guided text-to-image; attention/sketch.py).

Training runs as core's Train LoRA node and the SVDiff trainer do: a Sampler run by a Guider_Basic (ComfyUI
loads the model and prepares the conditioning), the seed's generator drawing images, noise levels and noise,
a progress bar, interruptible, a LOSS_MAP output. The UNet is frozen: its features come from positive-only
forwards through the router (no gradients), only the predictor learns."""
from __future__ import annotations

import json
import logging

import torch
from comfy_api.latest import io

import comfy.model_management
import comfy.samplers
import comfy.utils

from ..attention import sketch as SK
from ..attention.core import AttentionControlError
from ..attention.dit_layers import check_layer_text
from ..attention.dit_router import DIT_GUIDE_KEY, is_dit
from ..attention.dit_sketch import DitSketchFeatures, DitSketchGuidance
from ..attention.router import GUIDE_KEY, GuidancePasses, attach
from ..attention.validate import check_finite
from . import weight_files
from .common import CATEGORY, check_widgets, validation_result

log = logging.getLogger("attention_control.sketch")

PredictorType = io.Custom("ATTNCTL_SKETCH_PREDICTOR")
LossMapType = io.Custom("LOSS_MAP")              # core's type: its Loss Graph node plots it
FOLDER = "sketch_predictors"
PIXELS = 4096                 # pixels of each training step's batch that the loss is taken on


def _images(images, name: str) -> torch.Tensor:
    """IMAGE (B, H, W, C) -> (B, C, H, W) float, checked."""
    if not torch.is_tensor(images) or images.dim() != 4 or images.shape[0] == 0 or images.shape[-1] < 1:
        raise AttentionControlError(f"{name}: give an IMAGE batch (Load Image), got "
                                    f"{tuple(images.shape) if torch.is_tensor(images) else type(images).__name__}")
    check_finite(name, images, "load the image again")
    return images.float().permute(0, 3, 1, 2)


def _features_controller(model, layers: str):
    """The feature reader of the model's host: DiT blocks' image-token values, or the UNet's self-attention."""
    if is_dit(model):
        return DitSketchFeatures(layers or SK.AUTO)
    return SK.SketchFeatures(SK.unet_selector(layers or SK.AUTO, "layers"))


def check_layers_text(text) -> None:
    """Widget-time check: `auto`, or a layer choice of either syntax (the model is not known yet)."""
    if text is not None and (text or SK.AUTO).strip().lower() != SK.AUTO:
        check_layer_text(text, "layers")


# --------------------------------------------------------------------------------------------
# training

class _LGPSampler(comfy.samplers.Sampler):
    """The training loop: per step `batch` images drawn with the seed's generator, noise level
    percent_to_sigma(u), u ~ U(0, 1) per image, features of the noised latents (positive-only forward, no
    gradients), one AdamW step of the predictor on the MSE to the latent edge maps. Items run in groups of
    one caption each (ComfyUI applies every conditioning of a list to every batch item)."""

    def __init__(self, ctrl, keys, targets, caption_of, steps, lr, batch, seed, losses, guide_key):
        self.ctrl, self.keys, self.targets, self.caption_of = ctrl, list(keys), targets, caption_of
        self.guide_key = guide_key
        self.pixels = PIXELS
        self.steps, self.lr, self.batch, self.seed, self.losses = steps, lr, batch, seed, losses
        self.predictor = None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        ms = model_wrap.inner_model.model_sampling
        mo = extra_args.get("model_options", {})
        conds = list(model_wrap.conds["positive"])
        n = latent_image.shape[0]
        g = torch.Generator().manual_seed(self.seed)
        opt = None
        pbar = comfy.utils.ProgressBar(self.steps)
        try:
            for _step in range(self.steps):
                comfy.model_management.throw_exception_if_processing_interrupted()
                idx = torch.randperm(n, generator=g)[: self.batch].tolist()
                x0 = latent_image[idx].float()
                eps = torch.randn(x0.shape, generator=g).to(x0)
                sig = torch.tensor([float(ms.percent_to_sigma(float(torch.rand(1, generator=g)))) for _ in idx]).to(x0)
                xt = ms.noise_scaling(sig, eps, x0, False)
                feats = [None] * len(idx)
                batched = _batched_cond(conds, [self.caption_of[i] for i in idx])
                groups = {None: list(range(len(idx)))} if batched is not None else {}
                if batched is None:
                    for j, i in enumerate(idx):
                        groups.setdefault(self.caption_of[i], []).append(j)
                for c, rows in groups.items():
                    model_wrap.conds["positive"] = [batched if c is None else conds[c]]
                    passes = GuidancePasses(model_wrap, sig[rows], mo, self.guide_key)
                    with torch.no_grad():
                        f = self.ctrl.features_at(xt[rows], self.keys, passes, len(rows))
                    per = f.shape[0] // len(rows)          # video DiTs: frames per item
                    for j, r in enumerate(rows):
                        feats[r] = f[j * per:(j + 1) * per]
                if opt is None:                            # the feature widths are known after the first pass
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(self.seed)       # the initial weights (the global generator is kept)
                        table = [(*k, c) for k, c in zip(self.keys, self.ctrl.last_channels)]
                        self.predictor = SK.EdgePredictor(table).to(latent_image.device)
                    opt = torch.optim.AdamW(self.predictor.parameters(), lr=self.lr, weight_decay=0.0)
                per = feats[0].shape[0]
                tg = self.targets[idx].to(x0)
                tg = tg.repeat_interleave(per, 0) if per > 1 else tg
                loss = SK.train_step(self.predictor, opt, torch.cat(feats), sig.repeat_interleave(per), tg,
                                     self.pixels, g)
                self.losses.append(loss)
                pbar.update(1)
        finally:
            model_wrap.conds["positive"] = conds
        return torch.zeros_like(latent_image)


def _batched_cond(conds: list, which: list):
    """One prepared conditioning whose batch rows are the captions `which` (indices into `conds`), so that one
    forward runs every item with its own caption (ComfyUI uses a conditioning of batch B on a latent of batch B
    row by row); None when the captions' model inputs cannot be stacked (then items run per caption)."""
    if len(set(which)) == 1:
        return conds[which[0]]
    base = conds[which[0]]
    mc = {}
    for k, v in base.get("model_conds", {}).items():
        parts = [conds[i].get("model_conds", {}).get(k) for i in which]
        ts = [getattr(p, "cond", None) for p in parts]
        if not all(torch.is_tensor(t) and t.shape[0] == 1 and t.shape[1:] == ts[0].shape[1:] for t in ts) or \
                not hasattr(v, "_copy_with"):
            return None
        mc[k] = v._copy_with(torch.cat(ts))
    if any(conds[i].get("area") is not None or conds[i].get("mask") is not None for i in which):
        return None
    out = dict(base)
    out["model_conds"] = mc
    return out


def _per_image(positive: list, n: int) -> tuple[list, list]:
    """(conditionings, index of each image's): one for all, or one per image."""
    if len(positive) == 1 and n > 1 and torch.is_tensor(positive[0][0]) and positive[0][0].shape[0] == n:
        emb, extra = positive[0]                 # one prompt per image in one batch (as ComfyUI samples it)
        rows = lambda i: {k: (v[i:i + 1] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n else v)
                          for k, v in extra.items()}
        return [[emb[i:i + 1], rows(i)] for i in range(n)], list(range(n))
    if len(positive) == 1:
        return list(positive), [0] * n
    if len(positive) != n:
        raise AttentionControlError(f"positive: {len(positive)} conditionings for {n} images; give one for all (a "
                                    f"caption of the kind of images) or one per image")
    return list(positive), list(range(n))


def train_predictor(model, latents: torch.Tensor, edges: torch.Tensor, positive: list, steps: int, lr: float,
                    batch: int, seed: int, layers: str = SK.DEFAULT_LAYERS):
    """(trained EdgePredictor in eval mode, per-step losses). latents: the VAE-encoded images (B, C, h, w);
    edges: their edge maps (B, 1, H, W), H a whole multiple of h."""
    import comfy_extras.nodes_custom_sampler as cs
    ctrl = _features_controller(model, layers)
    mp = attach(model, ctrl)
    keys = ctrl.feature_keys(mp, latents.shape[-2:])
    targets = SK.edges_to_latent(edges.float(), latents.shape[-2:], "edges")
    conds, caption_of = _per_image(positive, latents.shape[0])
    losses: list[float] = []
    sampler = _LGPSampler(ctrl, keys, targets, caption_of, steps, lr, batch, seed, losses,
                          DIT_GUIDE_KEY if is_dit(model) else GUIDE_KEY)
    with torch.inference_mode(False), torch.enable_grad():
        guider = cs.Guider_Basic(mp)
        guider.set_conds(conds)
        lat = latents.float().clone()
        guider.sample(torch.zeros_like(lat), lat, sampler, torch.arange(lat.shape[0] + 1, dtype=torch.float32),
                      seed=seed)
        p = sampler.predictor.train(False).cpu()
    comfy.model_management.soft_empty_cache()
    return p, losses


class TrainSketchPredictor(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnCtl_TrainSketchPredictor",
            display_name="Train Sketch Predictor",
            category=f"{CATEGORY}/guidance",
            description="Sketch-guided text-to-image (Voynov et al. 2022), step 1: trains the latent edge predictor, a "
                        "small per-pixel MLP that reads the model's self-attention features of a noised latent (UNet "
                        "self-attention or DiT image-token values) and its noise level, and predicts the image's "
                        "edge map at the latent size. The model stays frozen. Give images of the kind you will generate; their edges are computed (Sobel) unless "
                        "you connect edge maps. Then use it with Sketch Guidance.",
            inputs=[
                io.Model.Input("model", tooltip="The model (a UNet: SD1.x / SD2.x / SDXL, or a DiT: Flux, SD3, "
                                                "Qwen-Image, Wan, Lumina 2 ...); the predictor is tied to its layers."),
                io.Vae.Input("vae", tooltip="Encodes the training images to latents."),
                io.Image.Input("images", tooltip="Training images, one batch (all the same size; a few dozen or "
                                                 "more)."),
                io.Conditioning.Input("positive", tooltip="Their caption: one for all, or a batch of one per image."),
                io.Int.Input("steps", default=500, min=1, max=100000, tooltip="Optimiser steps."),
                io.Float.Input("learning_rate", default=0.001, min=1e-6, max=1.0, step=0.0001,
                               tooltip="AdamW learning rate of the predictor."),
                io.Int.Input("batch_size", default=4, min=1, max=256, tooltip="Images per step."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Draws the images, noise levels, noise and the initial weights: the same seed "
                                     "trains the same predictor."),
                io.String.Input("layers", default=SK.DEFAULT_LAYERS,
                                tooltip="Which layers feed the predictor. auto: on a UNet every self-attention (the "
                                        "first transformer block of each UNet block), on a DiT four blocks spread "
                                        "over the depth (the image tokens' values). UNets: all, down, mid, up, a "
                                        "map side such as 16, 1/4, or part@resolution such as up@1/4; DiTs: all, a "
                                        "block type, double:0-9, or a depth fraction such as 0.5-1.0."),
                io.Image.Input("edges", optional=True,
                               tooltip="Edge maps of the images (lines bright on dark, same size); computed with a "
                                       "Sobel filter when not connected."),
            ],
            outputs=[PredictorType.Output(display_name="predictor"), LossMapType.Output(display_name="loss_map"),
                     io.Image.Output(display_name="edges")],
        )

    @classmethod
    def validate_inputs(cls, steps=None, learning_rate=None, batch_size=None, seed=None, layers=None):
        def extra(v):
            if v.get("layers") is not None:
                check_layers_text(v["layers"])
        return validation_result(cls, locals(), extra)

    @classmethod
    def execute(cls, model, vae, images, positive, steps, learning_rate, batch_size, seed, layers, edges=None):
        check_widgets(cls, locals())
        imgs = _images(images, "images")
        if not positive:
            raise AttentionControlError("positive: connect the images' caption (CLIPTextEncode)")
        if edges is None:
            e = SK.sobel_edges(imgs)
        else:
            e = SK.grayscale(_images(edges, "edges"))
            if e.shape[0] != imgs.shape[0] or e.shape[-2:] != imgs.shape[-2:]:
                raise AttentionControlError(f"edges: {e.shape[0]} maps of {e.shape[-1]}x{e.shape[-2]} px for "
                                            f"{imgs.shape[0]} images of {imgs.shape[-1]}x{imgs.shape[-2]} px; give one "
                                            f"edge map per image, at the image's size")
        lat = vae.encode(images[:, :, :, :3])
        p, losses = train_predictor(model, lat, e, positive, steps, learning_rate, batch_size, seed, layers)
        log.info("sketch predictor: %d feature channels from %d layers, loss %.4f -> %.4f over %d steps",
                 p.in_channels, len(p.sites), losses[0], losses[-1], steps)
        return io.NodeOutput(p, {"loss": losses}, e.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).contiguous())


# --------------------------------------------------------------------------------------------
# files

def save_predictor(p: SK.EdgePredictor, path: str) -> None:
    import safetensors.torch
    safetensors.torch.save_file(SK.predictor_tensors(p), path,
                                metadata={"format": SK.FORMAT, "config": json.dumps(p.config())})


def load_predictor(path: str, name: str) -> SK.EdgePredictor:
    import safetensors
    with safetensors.safe_open(path, framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != SK.FORMAT:
        raise AttentionControlError(f"predictor_name: '{name}' is not a sketch edge predictor saved by Save Sketch "
                                    f"Predictor (format '{meta.get('format')}')")
    try:
        config = json.loads(meta.get("config") or "")
    except ValueError:
        raise AttentionControlError(f"predictor_name: '{name}' is damaged (no configuration); save it again") from None
    return SK.predictor_from(tensors, config, "predictor_name")


class SaveSketchPredictor(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnCtl_SaveSketchPredictor",
            display_name="Save Sketch Predictor",
            category=f"{CATEGORY}/guidance",
            description="Writes a trained sketch edge predictor to output/sketch_predictors/ (safetensors, a few MB); "
                        "Load Sketch Predictor lists it.",
            inputs=[PredictorType.Input("predictor", tooltip="From Train Sketch Predictor."),
                    io.String.Input("filename_prefix", default="sketch_predictors/lgp",
                                    tooltip="Path under the output folder, without the extension.")],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, predictor, filename_prefix):
        path = weight_files.save_path(filename_prefix, "sketch_predictors/lgp")
        save_predictor(predictor, path)
        log.info("sketch predictor saved: %s", path)
        return io.NodeOutput()


class LoadSketchPredictor(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnCtl_LoadSketchPredictor",
            display_name="Load Sketch Predictor",
            category=f"{CATEGORY}/guidance",
            description="Loads a sketch edge predictor saved by Save Sketch Predictor.",
            inputs=[io.Combo.Input("predictor_name", options=weight_files.listed(FOLDER),
                                   tooltip="A file from models/sketch_predictors/ or output/sketch_predictors/.")],
            outputs=[PredictorType.Output(display_name="predictor")],
        )

    @classmethod
    def execute(cls, predictor_name):
        path = weight_files.find(FOLDER, predictor_name, "predictor_name")
        return io.NodeOutput(load_predictor(path, predictor_name))


# --------------------------------------------------------------------------------------------
# guidance

def build_guidance(model, predictor, sketch, strength: float, start: float, end: float, lines: str = "auto"):
    if not isinstance(predictor, SK.EdgePredictor):
        raise AttentionControlError("predictor: connect Train Sketch Predictor or Load Sketch Predictor")
    edges = SK.check_sketch(SK.sketch_edges(_images(sketch, "sketch"), lines))
    dit = is_dit(model)
    if dit != (len(predictor.sites[0]) == 4 and isinstance(predictor.sites[0][2], str)):
        raise AttentionControlError(
            f"predictor: it was trained on a {'UNet' if dit else 'DiT'} model and this is a "
            f"{'DiT' if dit else 'UNet'} model; train the predictor on this model")
    cls = DitSketchGuidance if dit else SK.SketchGuidance
    return attach(model, cls(predictor, edges, strength, start, end))


class SketchGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnCtl_SketchGuidance",
            display_name="Sketch Guidance",
            category=f"{CATEGORY}/guidance",
            description="Sketch-guided text-to-image (Voynov et al. 2022), step 2: over the chosen part of the "
                        "schedule, each step's result is pulled toward latents whose predicted edges match the "
                        "sketch, by the gradient of ||predictor(features(x)) - sketch||^2 scaled to the step's size. "
                        "Works with any sampler; sample at the sketch's size.",
            inputs=[
                io.Model.Input("model", tooltip="The model the predictor was trained on (UNet or DiT)."),
                PredictorType.Input("predictor", tooltip="From Train Sketch Predictor or Load Sketch Predictor."),
                io.Image.Input("sketch", tooltip="The outline to follow, at the image size you sample (or a whole "
                                                 "multiple of the latent): one for all items, or one per item."),
                io.Float.Input("strength", default=SK.DEFAULT_STRENGTH, min=0.0, max=100.0, step=0.05,
                               tooltip="alpha: the move per step relative to the step's own update (paper: about "
                                       "1.6); 0: the model unchanged."),
                io.Float.Input("start", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="First guided step, as a fraction of the schedule."),
                io.Float.Input("end", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Guidance stops at this fraction of the schedule (paper: the first half)."),
                io.Combo.Input("lines", options=list(SK.LINES), default="auto",
                               tooltip="How the sketch draws its lines; auto: a light background means dark lines."),
            ],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def validate_inputs(cls, strength=None, start=None, end=None, lines=None):
        def extra(v):
            if v.get("start") is not None and v.get("end") is not None and v["end"] < v["start"]:
                raise AttentionControlError(f"end: {v['end']:g} is before start {v['start']:g}")
        return validation_result(cls, locals(), extra)

    @classmethod
    def execute(cls, model, predictor, sketch, strength, start, end, lines):
        check_widgets(cls, locals())
        return io.NodeOutput(build_guidance(model, predictor, sketch, strength, start, end, lines))


NODES = [TrainSketchPredictor, SaveSketchPredictor, LoadSketchPredictor, SketchGuidance]
