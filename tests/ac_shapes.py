"""The shipped shapes-world models (the UNet and the Flux-class DiT), loaded once per test session, and
sampling helpers."""
from __future__ import annotations

import functools
import os

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = os.environ.get("ATTNCTL_SHAPES_WEIGHTS") or os.path.join(REPO, "shapesworld", "weights",
                                                                   "shapes_world.safetensors")
DIT_WEIGHTS = os.environ.get("ATTNCTL_SHAPES_DIT_WEIGHTS") or os.path.join(REPO, "shapesworld", "weights",
                                                                           "shapes_world_dit.safetensors")
STEPS, CFG, SAMPLER = 20, 6.0, "euler"
DIT_CFG = 5.0                      # shapesworld.evaluate_model.DIT_CFG


@functools.lru_cache(maxsize=1)
def load():
    from attention_control.shapesworld.comfy_glue import load_shapes_world
    return load_shapes_world(WEIGHTS)


@functools.lru_cache(maxsize=1)
def load_dit():
    """(model_patcher, clip, vae) of the shapes-world DiT (ComfyUI's Flux class, rectified flow); tests
    clone the MODEL, never patch it in place."""
    from attention_control.shapesworld.comfy_glue import load_shapes_world_dit
    return load_shapes_world_dit(DIT_WEIGHTS)


def encode(clip, texts):
    from attention_control.nodes.p2p import encode_batch
    return encode_batch(clip, texts)


def sample(model, positive, negative, latent, seed=0, steps=STEPS, cfg=CFG, sampler=SAMPLER):
    import ac_models as M
    return M.ksample(model, positive, negative, latent, seed=seed, steps=steps, cfg=cfg, sampler=sampler)


def to_rgb(latent_samples):
    from attention_control.shapesworld.comfy_glue import latent_to_rgb
    return latent_to_rgb(latent_samples)            # (B, 3, 32, 32) in [0, 1]
