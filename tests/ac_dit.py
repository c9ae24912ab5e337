"""Tiny random DiT models of each family on the real ComfyUI 0.3.75 classes (DESIGN.md section 8
configs), one shared builder per test session, and the model call the sampler makes."""
from __future__ import annotations

import functools

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.sample
import comfy.supported_models

from devtools.tiny_checkpoint import _fill_random

# DESIGN.md section 8 configs
CONFIGS = {
    "Flux": ("Flux", dict(
        image_model="flux", in_channels=16, out_channels=16, vec_in_dim=16, context_in_dim=32, hidden_size=64,
        mlp_ratio=2.0, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[8, 12, 12], theta=10000, patch_size=2,
        qkv_bias=True, guidance_embed=True)),
    "Flux.2": ("Flux2", dict(
        image_model="flux2", in_channels=128, out_channels=128, vec_in_dim=None, context_in_dim=32, hidden_size=64,
        mlp_ratio=3.0, num_heads=2, depth=1, depth_single_blocks=2, axes_dim=[8, 8, 8, 8], theta=2000, patch_size=1,
        qkv_bias=False, guidance_embed=True, global_modulation=True, mlp_silu_act=True, ops_bias=False,
        default_ref_method="index", ref_index_scale=10.0)),
    "Chroma": ("Chroma", dict(
        image_model="chroma", in_channels=64, out_channels=64, context_in_dim=32, hidden_size=64, mlp_ratio=2.0,
        num_heads=2, depth=1, depth_single_blocks=2, axes_dim=[8, 12, 12], theta=10000, patch_size=2, qkv_bias=True,
        in_dim=64, out_dim=64, hidden_dim=32, n_layers=1)),
    "SD3": ("SD3", dict(
        in_channels=16, out_channels=16, patch_size=2, depth=2, adm_in_channels=32, pos_embed_scaling_factor=None,
        pos_embed_max_size=16, context_embedder_config={"target": "torch.nn.Linear",
                                                        "params": {"in_features": 32, "out_features": 128}},
        num_patches=256, qk_norm=None)),
    "Wan": ("WAN21_T2V", dict(
        image_model="wan2.1", model_type="t2v", dim=64, ffn_dim=128, num_heads=2, num_layers=2, in_dim=16,
        out_dim=16, text_dim=32, freq_dim=256, patch_size=(1, 2, 2), window_size=(-1, -1), qk_norm=True,
        cross_attn_norm=True, eps=1e-6)),
    "Qwen-Image": ("QwenImage", dict(
        image_model="qwen_image", in_channels=64, out_channels=16, num_layers=2, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(8, 12, 12))),
    "Lumina 2": ("Lumina2", dict(
        image_model="lumina2", patch_size=2, in_channels=16, dim=64, n_layers=2, n_refiner_layers=1, n_heads=2,
        n_kv_heads=2, cap_feat_dim=32, qk_norm=True, axes_dims=[8, 12, 12], axes_lens=[300, 64, 64],
        multiple_of=16)),
}
CONFIGS["Z-Image"] = ("ZImage", dict(CONFIGS["Lumina 2"][1], rope_theta=256.0, ffn_dim_multiplier=8 / 3,
                                     z_image_modulation=True, time_scale=1000.0, dim=256, axes_dims=[32, 48, 48]))
# HunyuanVideo (one class, comfy.ldm.hunyuan_video.model.HunyuanVideo, for v1, 1.5 and HunyuanImage 2.1):
# the text token refiner has 2 blocks whatever the config; 3D patches (1, 2, 2) on video latents
CONFIGS["HunyuanVideo"] = ("HunyuanVideo", dict(
    image_model="hunyuan_video", in_channels=16, out_channels=16, vec_in_dim=16, context_in_dim=32, hidden_size=64,
    mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=2, axes_dim=[8, 12, 12], theta=256, patch_size=[1, 2, 2],
    qkv_bias=True, guidance_embed=True, byt5=False, meanflow=False, use_cond_type_embedding=False,
    vision_in_dim=None))
# 1.5: no CLIP vector, cond-type embeddings, a vision-state projection (real: 1152-dim SigLIP states)
CONFIGS["HunyuanVideo 1.5"] = ("HunyuanVideo15", dict(
    CONFIGS["HunyuanVideo"][1], vec_in_dim=None, guidance_embed=False, use_cond_type_embedding=True,
    vision_in_dim=16))
# HunyuanImage 2.1: 2D patches on image latents (real: patch 1 on a 64-channel latent)
CONFIGS["HunyuanImage 2.1"] = ("HunyuanImage21", dict(
    CONFIGS["HunyuanVideo"][1], in_channels=64, out_channels=64, vec_in_dim=None, patch_size=[1, 1],
    axes_dim=[16, 16]))
# HiDream: caption_channels = [T5 width, Llama width]; one Llama layer per block (llama_layers, indices
# into the conditioning_llama3 layers), MoE feed-forwards (2 routed experts, 1 active)
CONFIGS["HiDream"] = ("HiDream", dict(
    image_model="hidream", patch_size=2, in_channels=16, out_channels=16, num_layers=1, num_single_layers=2,
    attention_head_dim=32, num_attention_heads=2, caption_channels=[32, 32], text_emb_dim=32, num_routed_experts=2,
    num_activated_experts=1, axes_dims_rope=[8, 12, 12], max_resolution=[16, 16], llama_layers=[0, 1, 1]))

TXT = 7    # text tokens of every test context
LLAMA = 5  # HiDream: Llama tokens per layer (conditioning_llama3 is (B, layers, LLAMA, 32))
LLAMA_LAYERS = 2


def inputs(family: str, g: torch.Generator) -> tuple[torch.Tensor, dict]:
    """(latent x, extra conds as the model's extra_conds would give them) per family."""
    ctx = torch.randn(1, TXT, 32, generator=g)
    if family == "Flux":
        return torch.randn(1, 16, 16, 16, generator=g), dict(c_crossattn=ctx, y=torch.randn(1, 16, generator=g),
                                                            guidance=torch.tensor([3.5]))
    if family == "Flux.2":
        return torch.randn(1, 128, 8, 8, generator=g), dict(c_crossattn=ctx, guidance=torch.tensor([3.5]))
    if family == "Chroma":
        return torch.randn(1, 16, 16, 16, generator=g), dict(c_crossattn=ctx, guidance=torch.tensor([0.0]))
    if family == "SD3":
        return torch.randn(1, 16, 16, 16, generator=g), dict(c_crossattn=ctx, y=torch.randn(1, 32, generator=g))
    if family == "Wan":
        return torch.randn(1, 16, 2, 8, 8, generator=g), dict(c_crossattn=ctx)
    if family == "Qwen-Image":
        return torch.randn(1, 16, 1, 16, 16, generator=g), dict(c_crossattn=ctx)
    if family == "HunyuanVideo":
        return torch.randn(1, 16, 2, 8, 8, generator=g), dict(c_crossattn=ctx, y=torch.randn(1, 16, generator=g),
                                                             guidance=torch.tensor([6.0]))
    if family == "HunyuanVideo 1.5":
        return torch.randn(1, 16, 2, 8, 8, generator=g), dict(c_crossattn=ctx)
    if family == "HunyuanImage 2.1":
        return torch.randn(1, 64, 8, 8, generator=g), dict(c_crossattn=ctx, guidance=torch.tensor([6.0]))
    if family == "HiDream":
        return torch.randn(1, 16, 16, 16, generator=g), dict(
            c_crossattn=ctx, y=torch.randn(1, 32, generator=g),
            encoder_hidden_states_llama3=torch.randn(1, LLAMA_LAYERS, LLAMA, 32, generator=g))
    return torch.randn(1, 16, 16, 16, generator=g), dict(c_crossattn=ctx, num_tokens=TXT)


FAMILIES = tuple(CONFIGS)


def build(cls_name: str, cfg: dict, seed: int = 1717):
    """A tiny random model of `comfy.supported_models.<cls_name>(cfg)`, float32, in a ModelPatcher."""
    mc = getattr(comfy.supported_models, cls_name)(dict(cfg))
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model({})
    _fill_random(model, seed)
    # buffers a checkpoint would fill: SD3's pos_embed is created with torch.empty (uninitialised
    # memory: NaN in some runs); the sampling buffers (model_sampling.sigmas) are computed
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, b in sorted(model.diffusion_model.named_buffers(), key=lambda t: t[0]):
            if b.is_floating_point():
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    model.eval()
    return comfy.model_patcher.ModelPatcher(
        model, load_device=comfy.model_management.get_torch_device(), offload_device=torch.device("cpu"))


class Tiny:
    def __init__(self, family, **config):
        cls_name, cfg = CONFIGS[family]
        self.family = family
        self.patcher = build(cls_name, dict(cfg, **config))
        self.x, self.conds = inputs(family, torch.Generator().manual_seed(5))
        self.baseline = forward(self.patcher, self.x, self.conds)
        assert torch.isfinite(self.baseline).all()


def forward(patcher, x, conds, sigma=0.6):
    """One model call as the sampler makes it: transformer_options from the MODEL's model_options
    (copied, wrappers merged in as prepare_model_patcher does), the per-call keys of calc_cond_batch,
    then BaseModel.apply_model (APPLY_MODEL wrappers, then the diffusion model's forward)."""
    mo = comfy.model_patcher.create_model_options_clone(patcher.model_options)
    to = mo.setdefault("transformer_options", {})
    comfy.patcher_extension.merge_nested_dicts(to.setdefault("wrappers", {}), patcher.wrappers, copy_dict1=False)
    to = comfy.patcher_extension.merge_nested_dicts({}, to, copy_dict1=False)
    sig = torch.tensor([sigma])
    to["cond_or_uncond"] = [0]
    to["uuids"] = [None]
    to["sigmas"] = sig
    with torch.inference_mode():
        return patcher.model.apply_model(x, sig, transformer_options=to, **conds)


SAMPLE_CONDS = {   # positive / negative conditioning extras per family for comfy.sample.sample
    "Flux": lambda g: {"pooled_output": torch.randn(1, 16, generator=g), "guidance": 3.5},
    "SD3": lambda g: {"pooled_output": torch.randn(1, 32, generator=g)},
    "Wan": lambda g: {},
    "Lumina 2": lambda g: {},
}


@functools.lru_cache(maxsize=None)
def tiny(family: str) -> "Tiny":
    """One shared tiny model per family (tests clone it; never patch it in place)."""
    return Tiny(family)


def sample(model, noise, positive, negative, latent, steps=2, cfg=2.5, sampler="euler", seed=11):
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, steps, cfg, sampler, "simple", positive, negative, latent,
                                   disable_pbar=True, seed=seed)
