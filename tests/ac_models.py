"""Tiny random models on the real ComfyUI classes, from fixed seeds (no weights are downloaded)."""
from __future__ import annotations

import functools

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.supported_models
import comfy.sd
import comfy.sd1_clip


from devtools.tiny_checkpoint import _fill_random  # noqa: E402  (one deterministic fill for every fixture)


def _patcher(model):
    dev = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=dev, offload_device=torch.device("cpu"))


SD15_TINY = dict(
    use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False,
    adm_in_channels=None, in_channels=4, out_channels=4, model_channels=32,
    num_res_blocks=[1, 1, 1], channel_mult=[1, 2, 2],
    transformer_depth=[1, 1, 1], transformer_depth_output=[1, 1, 1, 1, 1, 1], transformer_depth_middle=1,
    use_linear_in_transformer=False, context_dim=768,
    use_temporal_resblock=False, use_temporal_attention=False,
)


def tiny_sd15(seed: int = 1234, **overrides):
    """SD1.5-shaped UNet: attention at latent/1, /2, /4 and the middle; 8 heads of 4-8 dims."""
    cfg = dict(SD15_TINY, **overrides)
    mc = comfy.supported_models.SD15(cfg)
    model = mc.get_model({})
    _fill_random(model, seed)
    model.eval()
    return _patcher(model)


SDXL_TINY = dict(
    use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False,
    num_classes="sequential", adm_in_channels=2816, in_channels=4, out_channels=4, model_channels=32,
    num_res_blocks=[1, 1, 1], channel_mult=[1, 2, 2],
    transformer_depth=[0, 2, 2], transformer_depth_output=[0, 0, 2, 2, 2, 2], transformer_depth_middle=2,
    use_linear_in_transformer=True, context_dim=2048,
    use_temporal_resblock=False, use_temporal_attention=False,
)


def tiny_sdxl(seed: int = 4321):
    """SDXL-shaped UNet: no attention at full latent resolution, depth-2 transformers, ADM input."""
    mc = comfy.supported_models.SDXL(dict(SDXL_TINY))
    mc.unet_config["num_head_channels"] = 16
    model = mc.get_model({})
    _fill_random(model, seed)
    model.eval()
    return _patcher(model)


@functools.lru_cache(maxsize=1)
def _clip_l_state(seed: int):
    clip_model = comfy.sd1_clip.SD1ClipModel(device="cpu")
    _fill_random(clip_model, seed)
    return clip_model.state_dict()


def random_clip_l(seed: int = 7):
    """ComfyUI's CLIP (SD1 CLIP-L text encoder, real tokenizer) with random weights."""
    class _Target:
        params = {}
        clip = comfy.sd1_clip.SD1ClipModel
        tokenizer = comfy.sd1_clip.SD1Tokenizer

    clip = comfy.sd.CLIP(_Target(), embedding_directory=None, model_options={"dtype": torch.float32})
    missing, unexpected = clip.cond_stage_model.load_state_dict(_clip_l_state(seed), strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    return clip


def cond(batch: int = 1, seed: int = 0, tokens: int = 77, dim: int = 768, pooled: int | None = None):
    """A CONDITIONING list with a random context (for tests that do not need a text encoder)."""
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(batch, tokens, dim, generator=g)
    extra = {}
    if pooled:
        extra["pooled_output"] = torch.randn(batch, pooled, generator=g)
    return [[ctx, extra]]


def latent(batch: int = 1, h: int = 16, w: int = 16):
    return {"samples": torch.zeros(batch, 4, h, w)}


def ksample(model, positive, negative, lat, seed=0, steps=4, cfg=5.0, sampler="euler", scheduler="normal",
            denoise=1.0):
    import nodes
    return nodes.common_ksampler(model, seed, steps, cfg, sampler, scheduler, positive, negative, lat,
                                 denoise=denoise)[0]["samples"]
