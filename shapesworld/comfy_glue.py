"""ComfyUI glue for the shapes-world model: MODEL, CLIP and VAE objects that stock nodes accept.

- UNet: ComfyUI's own ``UNetModel`` through a ``supported_models_base.BASE`` config (v-prediction, SD1.5
  sampling settings: scaled-linear betas 0.00085..0.012, 1000 steps). Spatial transformers at
  16x16, 8x8 (and the middle block, 8x8) for a 32x32 latent.
- Latent: 4 channels = RGB in [-1, 1] plus a zero 4th channel, one latent pixel per image pixel
  at the model level; the VAE object upsamples x8 (nearest) so that 256x256 images <-> 32x32 latents.
- Text encoder: ComfyUI's SD1 CLIP (``SD1ClipModel`` + ``SD1Tokenizer`` in ``comfy.sd.CLIP``) with
  frozen random weights drawn from a fixed seed at load time (never downloaded, never shipped).

DiT world (issue 17): ComfyUI's own Flux transformer (``comfy.ldm.flux.model.Flux`` inside
``comfy.model_base.Flux``) through ``ShapesWorldDiTConfig``: rectified flow (``ModelType.FLOW``), joint
attention in double and single blocks, RoPE, no guidance embedding (ordinary CFG), the same latent,
CLIP (context (B, 77, 768) -> ``txt_in``; pooled output (B, 768) -> ``vector_in`` through
``encode_adm``) and VAE as the UNet world.

Public API: ``load_shapes_world(weights_path=None) -> (model_patcher, clip, vae)``,
``load_shapes_world_dit(weights_path=None) -> (model_patcher, clip, vae)``,
``build_unet_model(seed=None)``, ``build_dit_model(seed=None)``, ``build_clip()``, ``latent_to_rgb``,
``rgb_to_latent``.
"""
from __future__ import annotations

import logging
import os

import torch

import comfy.latent_formats
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models_base

logger = logging.getLogger(__name__)

DEFAULT_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "shapes_world.safetensors")
DEFAULT_DIT_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights",
                                   "shapes_world_dit.safetensors")

CLIP_SEED = 20240917
CLIP_LAYERS = 4
CLIP_TOKEN_STD = 1.0
CLIP_POSITION_STD = 0.2
CLIP_LINEAR_STD = 0.02

UNET_CONFIG = {
    "use_checkpoint": False,
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "num_res_blocks": [1, 1, 1],
    "channel_mult": [1, 2, 2],
    # input blocks per level (32, 16, 8): attention at 16 and 8
    "transformer_depth": [0, 1, 1],
    "transformer_depth_middle": 1,
    # ComfyUI pops this list from the end for output blocks 0, 1, ... (deepest level first): output
    # blocks 0-1 (8x8) get 0, 2-3 (16x16) and 4-5 (32x32) get one transformer each
    "transformer_depth_output": [1, 1, 1, 1, 0, 0],
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "use_linear_in_transformer": True,
    "context_dim": 768,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}


# --------------------------------------------------------------------------------------------
# latent format and pixel <-> latent maps (32x32 level, no upscale)

class ShapesWorldLatent(comfy.latent_formats.LatentFormat):
    scale_factor = 1.0
    latent_channels = 4

    def __init__(self):
        # latent = 2 * rgb - 1 on channels 0-2, so rgb = 0.5 * latent + 0.5
        self.latent_rgb_factors = [
            [0.5, 0.0, 0.0],
            [0.0, 0.5, 0.0],
            [0.0, 0.0, 0.5],
            [0.0, 0.0, 0.0],
        ]
        self.latent_rgb_factors_bias = [0.5, 0.5, 0.5]


def rgb_to_latent(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, h, w) RGB in [0, 1] -> (B, 4, h, w) latent (RGB in [-1, 1] plus a zero channel)."""
    rgb = rgb.float()
    zero = torch.zeros_like(rgb[:, :1])
    return torch.cat([rgb * 2.0 - 1.0, zero], dim=1)


def latent_to_rgb(latent: torch.Tensor) -> torch.Tensor:
    """(B, 4, h, w) latent -> (B, 3, h, w) RGB in [0, 1]."""
    return (latent[:, :3].float() * 0.5 + 0.5).clamp(0.0, 1.0)


class ShapesWorldConfig(comfy.supported_models_base.BASE):
    unet_config = dict(UNET_CONFIG)
    unet_extra_config = {"num_heads": -1, "num_head_channels": 32}
    latent_format = ShapesWorldLatent
    sampling_settings = {"beta_schedule": "linear", "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000}
    memory_usage_factor = 1.0
    supported_inference_dtypes = [torch.float32]
    prediction = "v"

    def model_type(self, state_dict, prefix=""):
        import comfy.model_base
        return comfy.model_base.ModelType.V_PREDICTION if self.prediction == "v" else comfy.model_base.ModelType.EPS


PREDICTIONS = ("v", "eps")


def _model_config(prediction: str = "v") -> ShapesWorldConfig:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    cfg = ShapesWorldConfig(dict(UNET_CONFIG))
    cfg.prediction = prediction
    cfg.set_inference_dtype(torch.float32, None)
    return cfg


def _init_unet_weights(unet: torch.nn.Module, seed: int) -> None:
    """ComfyUI's ops skip weight init: give every layer PyTorch's default init, deterministically."""
    g_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for m in unet.modules():
            for base in (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm):
                if isinstance(m, base):
                    base.reset_parameters(m)
                    break
        # zero the last conv so the network starts by predicting 0 (as the original zero_module)
        last = unet.out[-1]
        torch.nn.init.zeros_(last.weight)
        torch.nn.init.zeros_(last.bias)
    finally:
        torch.random.set_rng_state(g_state)


def build_unet_model(seed: int | None = None, prediction: str = "v"):
    """A ``comfy.model_base.BaseModel`` (v-prediction by default, or EPS) with the shapes-world
    UNet on the CPU, fp32.

    With ``seed`` the weights get a deterministic default init (for training); without it the
    weights are left to be loaded.
    """
    cfg = _model_config(prediction)
    model = cfg.get_model({}, device=torch.device("cpu"))
    model.diffusion_model.to(torch.float32)
    if seed is not None:
        _init_unet_weights(model.diffusion_model, seed)
    return model


def unet_state_dict(model) -> dict:
    return {k: v.detach().clone() for k, v in model.diffusion_model.state_dict().items()}


def weights_prediction(weights_path: str) -> str:
    """The prediction type recorded in a weights file's metadata ("eps" for files without one)."""
    import safetensors
    with safetensors.safe_open(weights_path, framework="pt") as f:
        meta = f.metadata() or {}
    return meta.get("prediction", "eps")


def load_unet_weights(model, weights_path: str) -> None:
    import safetensors.torch
    sd = safetensors.torch.load_file(weights_path)
    sd = {k[len("diffusion_model."):] if k.startswith("diffusion_model.") else k: v.float() for k, v in sd.items()}
    model.diffusion_model.load_state_dict(sd, strict=True)


# --------------------------------------------------------------------------------------------
# DiT world: ComfyUI's Flux transformer, rectified flow

# FluxParams of comfy.ldm.flux.model.Flux. in_channels / out_channels are LATENT channels: the model
# patchifies 2x2 itself (img_in takes 4 * 2 * 2 = 16 features), so a 32x32 latent is 16x16 = 256
# image tokens after the 77 text tokens. Head dim 128 / 4 = 32 = sum(axes_dim): RoPE axes (index,
# row, column); text ids are all 0. theta 256 spreads the six row / column frequencies over a
# 16-token grid (10000 leaves four of them nearly constant there).
DIT_CONFIG = {
    "image_model": "flux",
    "in_channels": 4,
    "out_channels": 4,
    "patch_size": 2,
    "vec_in_dim": 768,
    "context_in_dim": 768,
    "hidden_size": 128,
    "mlp_ratio": 4.0,
    "num_heads": 4,
    "depth": 2,
    "depth_single_blocks": 4,
    "axes_dim": [8, 12, 12],
    "theta": 256,
    "qkv_bias": True,
    "guidance_embed": False,
}
# ModelSamplingDiscreteFlow: sigma(t) = shift t / (1 + (shift - 1) t); the model sees timestep = sigma
# (multiplier 1, as Flux schnell: Flux's timestep_embedding multiplies by 1000 itself)
DIT_SHIFT = 1.0


class ShapesWorldDiTConfig(comfy.supported_models_base.BASE):
    unet_config = dict(DIT_CONFIG)
    unet_extra_config = {}
    latent_format = ShapesWorldLatent
    sampling_settings = {"shift": DIT_SHIFT, "multiplier": 1.0}
    memory_usage_factor = 1.0
    supported_inference_dtypes = [torch.float32]

    def model_type(self, state_dict, prefix=""):
        import comfy.model_base
        return comfy.model_base.ModelType.FLOW

    def get_model(self, state_dict, prefix="", device=None):
        import comfy.model_base
        return comfy.model_base.Flux(self, model_type=comfy.model_base.ModelType.FLOW, device=device)


def _dit_model_config(shift: float | None = None) -> ShapesWorldDiTConfig:
    cfg = ShapesWorldDiTConfig(dict(DIT_CONFIG))
    if shift is not None:
        cfg.sampling_settings["shift"] = float(shift)
    cfg.set_inference_dtype(torch.float32, None)
    return cfg


def _init_dit_weights(dm: torch.nn.Module, seed: int) -> None:
    """ComfyUI's ops skip weight init: PyTorch's default init for every Linear (deterministic), RMSNorm
    scales 1 (they are created with torch.empty), and adaLN-zero as in DiT: every modulation and the
    final layer start at zero, so each block starts as the identity and the model predicts 0."""
    from comfy.ldm.flux.layers import LastLayer, Modulation, RMSNorm
    g_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        with torch.no_grad():
            for m in dm.modules():
                if isinstance(m, torch.nn.Linear):
                    torch.nn.Linear.reset_parameters(m)
                elif isinstance(m, RMSNorm):
                    m.scale.fill_(1.0)
            for m in dm.modules():
                if isinstance(m, Modulation):
                    torch.nn.init.zeros_(m.lin.weight)
                    torch.nn.init.zeros_(m.lin.bias)
                elif isinstance(m, LastLayer):
                    for lin in (m.linear, m.adaLN_modulation[-1]):
                        torch.nn.init.zeros_(lin.weight)
                        torch.nn.init.zeros_(lin.bias)
    finally:
        torch.random.set_rng_state(g_state)


def build_dit_model(seed: int | None = None, shift: float | None = None):
    """A ``comfy.model_base.Flux`` (ModelType.FLOW) around ComfyUI's ``Flux`` transformer with the
    shapes-world DiT config, CPU, fp32. With ``seed`` the weights get a deterministic init (training);
    without it they are left to be loaded."""
    cfg = _dit_model_config(shift)
    model = cfg.get_model({}, device=torch.device("cpu"))
    model.diffusion_model.to(torch.float32)
    if seed is not None:
        _init_dit_weights(model.diffusion_model, seed)
    return model


def weights_metadata(weights_path: str) -> dict:
    import safetensors
    with safetensors.safe_open(weights_path, framework="pt") as f:
        return dict(f.metadata() or {})


def load_shapes_world_dit(weights_path: str | None = None, shift: float | None = None):
    """(model_patcher, clip, vae) for the trained shapes-world DiT: ComfyUI's Flux class, rectified
    flow with ``shift`` or else the shift recorded in the weights (DIT_SHIFT otherwise), stored fp16 and
    loaded fp32; the CLIP and VAE are the UNet world's."""
    path = weights_path or DEFAULT_DIT_WEIGHTS
    if not os.path.exists(path):
        raise FileNotFoundError(f"shapes-world DiT weights not found at {path}: run `make shapes-model-dit`")
    if shift is None:
        meta = weights_metadata(path)
        shift = float(meta["shift"]) if "shift" in meta else None
    model = build_dit_model(seed=None, shift=shift)
    load_unet_weights(model, path)
    patcher = comfy.model_patcher.ModelPatcher(
        model, load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device())
    return patcher, build_clip(), ShapesWorldVAE()


# --------------------------------------------------------------------------------------------
# text encoder: SD1 CLIP with frozen random weights

class ShapesWorldClipModel(comfy.sd1_clip.SD1ClipModel):
    def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
        cfg = {**model_options.get("clip_l_model_config", {}), "num_hidden_layers": CLIP_LAYERS}
        model_options = {**model_options, "clip_l_model_config": cfg}
        super().__init__(device=device, dtype=dtype, model_options=model_options, **kwargs)


def _init_clip_weights(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith("logit_scale"):
                continue
            if "token_embedding" in name:
                val = torch.randn(p.shape, generator=g, dtype=torch.float32) * CLIP_TOKEN_STD
            elif "position_embedding" in name:
                val = torch.randn(p.shape, generator=g, dtype=torch.float32) * CLIP_POSITION_STD
            elif "layer_norm" in name or "ln_" in name or "norm" in name.split(".")[-2]:
                val = torch.ones(p.shape) if name.endswith("weight") else torch.zeros(p.shape)
            elif name.endswith("bias"):
                val = torch.zeros(p.shape)
            else:
                val = torch.randn(p.shape, generator=g, dtype=torch.float32) * CLIP_LINEAR_STD
            p.copy_(val.to(p.dtype))


_CLIP_CACHE = {}


def build_clip():
    """A stock ``comfy.sd.CLIP`` (SD1 tokenizer + SD1 CLIP-L shaped encoder, CLIP_LAYERS layers,
    fp32) with frozen random weights from CLIP_SEED. Cached per process; returns a clone."""
    clip = _CLIP_CACHE.get("clip")
    if clip is None:
        target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, ShapesWorldClipModel)
        clip = comfy.sd.CLIP(target, model_options={"dtype": torch.float32,
                                                     "load_device": torch.device("cpu"),
                                                     "offload_device": torch.device("cpu"),
                                                     "initial_device": torch.device("cpu")})
        _init_clip_weights(clip.cond_stage_model, CLIP_SEED)
        _CLIP_CACHE["clip"] = clip
    return clip.clone()


# --------------------------------------------------------------------------------------------
# VAE stand-in: nearest x8 up / area x8 down between IMAGE and the RGB latent

class ShapesWorldVAE:
    """Duck-typed ``comfy.sd.VAE``: decode (B,4,h,w) -> IMAGE (B,8h,8w,3); encode IMAGE -> latent."""

    downscale_ratio = 8
    upscale_ratio = 8
    latent_channels = 4
    latent_dim = 2
    output_channels = 3
    crop_input = True
    first_stage_model = torch.nn.Identity()  # non-None: throw_exception_if_invalid passes
    working_dtypes = [torch.float32]
    disable_offload = True
    not_video = True

    def __init__(self):
        self.device = torch.device("cpu")
        self.vae_dtype = torch.float32
        self.output_device = comfy.model_management.intermediate_device()
        self.patcher = comfy.model_patcher.ModelPatcher(self.first_stage_model, load_device=self.device,
                                                        offload_device=self.device)

    def downscale_index_formula(self):
        return None

    def upscale_index_formula(self):
        return None

    def throw_exception_if_invalid(self):
        return None

    def spacial_compression_decode(self):
        return self.upscale_ratio

    def spacial_compression_encode(self):
        return self.downscale_ratio

    def temporal_compression_decode(self):
        return None

    def temporal_compression_encode(self):
        return None

    def vae_encode_crop_pixels(self, pixels):
        h = (pixels.shape[1] // 8) * 8
        w = (pixels.shape[2] // 8) * 8
        if pixels.shape[1] != h or pixels.shape[2] != w:
            oh = (pixels.shape[1] % 8) // 2
            ow = (pixels.shape[2] % 8) // 2
            pixels = pixels[:, oh:oh + h, ow:ow + w, :]
        return pixels

    def decode(self, samples_in, vae_options={}):
        if samples_in.ndim == 5:  # (B, C, T, h, w): fold time into batch
            samples_in = samples_in.permute(0, 2, 1, 3, 4).reshape(-1, samples_in.shape[1], *samples_in.shape[-2:])
        rgb = latent_to_rgb(samples_in.to(torch.float32))
        rgb = torch.nn.functional.interpolate(rgb, scale_factor=8, mode="nearest")
        return rgb.movedim(1, -1).contiguous().to(self.output_device)

    def decode_tiled(self, samples, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None):
        return self.decode(samples)

    def encode(self, pixel_samples):
        pixels = self.vae_encode_crop_pixels(pixel_samples[..., :3].to(torch.float32))
        rgb = pixels.movedim(-1, 1)
        rgb = torch.nn.functional.avg_pool2d(rgb, 8)
        return rgb_to_latent(rgb).to(self.output_device)

    def encode_tiled(self, pixel_samples, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None):
        return self.encode(pixel_samples)

    def get_sd(self):
        return {}

    def memory_used_decode(self, shape, dtype):
        return 0

    def memory_used_encode(self, shape, dtype):
        return 0


# --------------------------------------------------------------------------------------------

def load_shapes_world(weights_path: str | None = None):
    """(model_patcher, clip, vae) for the trained shapes-world model; the UNet is stored fp16 and
    loaded to fp32 on the CPU (or ComfyUI's torch device through the ModelPatcher)."""
    path = weights_path or DEFAULT_WEIGHTS
    if not os.path.exists(path):
        raise FileNotFoundError(f"shapes-world weights not found at {path}: run `make shapes-model`")
    model = build_unet_model(seed=None, prediction=weights_prediction(path))
    load_unet_weights(model, path)
    patcher = comfy.model_patcher.ModelPatcher(
        model, load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device())
    return patcher, build_clip(), ShapesWorldVAE()
