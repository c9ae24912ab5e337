"""A tiny random SD1.5 checkpoint that the stock CheckpointLoaderSimple detects as SD1.5.

No weights can be downloaded, so the server tests and the demo load this file instead of a real
model. It is written once per machine (cached under ${XDG_CACHE_HOME:-$HOME/.cache}/attention-control/)
from a fixed seed, so every run sees the same bytes:

- UNet: model_channels 320 and context_dim 768 (what SD1.5 detection keys on), but one level
  (channel_mult [1]) with one res block and a depth-1 transformer: about 21M parameters, attention at
  the latent resolution (input 1, middle, output 0 and 1).
- Text encoder: the full CLIP-L (123M; its size is fixed), random.
- VAE: SD's AutoencoderKL layout (ch 128, ch_mult 1,2,4,4), random.

All weights are stored as fp16. Usage: `python -m devtools.tiny_checkpoint [--verify]` prints the path.
"""
from __future__ import annotations

import argparse
import fcntl
import logging
import os
import sys

VERSION = 1
SEED = 20240615
FILENAME = f"attnctl_tiny_sd15_v{VERSION}.safetensors"

log = logging.getLogger("attention_control.devtools.tiny_checkpoint")

UNET_CONFIG = dict(
    use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False,
    adm_in_channels=None, in_channels=4, out_channels=4, model_channels=320,
    num_res_blocks=[1], channel_mult=[1],
    transformer_depth=[1], transformer_depth_output=[1, 1], transformer_depth_middle=1,
    use_linear_in_transformer=False, context_dim=768,
    use_temporal_resblock=False, use_temporal_attention=False,
)

VAE_CONFIG = {'double_z': True, 'z_channels': 4, 'resolution': 256, 'in_channels': 3, 'out_ch': 3, 'ch': 128,
              'ch_mult': [1, 2, 4, 4], 'num_res_blocks': 2, 'attn_resolutions': [], 'dropout': 0.0}


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "attention-control")


def default_path() -> str:
    return os.path.join(cache_dir(), FILENAME)


def _fill_random(module, seed: int) -> None:
    """Deterministic fill: parameters in name order from one generator (ComfyUI's ops skip init)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda t: t[0]):
            if p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 / fan_in ** 0.5))
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))


def build_state_dict(seed: int = SEED) -> dict:
    """The checkpoint's state dict (original SD key layout: model.diffusion_model., cond_stage_model.,
    first_stage_model.), fp16."""
    from devtools.host import setup_comfy
    setup_comfy()
    import torch
    import comfy.sd1_clip
    import comfy.supported_models
    from comfy.ldm.models.autoencoder import AutoencoderKL

    mc = comfy.supported_models.SD15(dict(UNET_CONFIG))
    model = mc.get_model({})
    _fill_random(model.diffusion_model, seed)

    clip = comfy.sd1_clip.SD1ClipModel(device="cpu")
    _fill_random(clip, seed + 1)
    clip_sd = clip.state_dict()

    vae = AutoencoderKL(ddconfig=dict(VAE_CONFIG), embed_dim=4)
    _fill_random(vae, seed + 2)
    vae_sd = vae.state_dict()

    sd = model.state_dict_for_saving(clip_sd, vae_sd)
    out = {}
    for k, t in sd.items():
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach()
        if t.is_floating_point() and not k.endswith("position_ids"):
            t = t.to(torch.float16)
        out[k] = t.contiguous()
    return out


def ensure_checkpoint(path: str | None = None) -> str:
    """Writes the checkpoint once (atomically, under a lock) and returns its path."""
    path = path or default_path()
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(path):
            return path
        log.info("writing tiny SD1.5 checkpoint to %s (one time per machine)", path)
        from safetensors.torch import save_file
        sd = build_state_dict()
        tmp = path + f".tmp{os.getpid()}"
        save_file(sd, tmp, metadata={"attention_control": f"tiny random SD1.5 v{VERSION} seed {SEED}"})
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    return path


def verify(path: str, steps: int = 1, latent: int = 32) -> dict:
    """Loads `path` with ComfyUI's own checkpoint loader, checks it is SD1.5, and samples `steps` steps
    on a latent x latent latent and decodes an 8 x 8 crop of it (64 x 64 pixels). Returns facts for the caller to assert on."""
    from devtools.host import setup_comfy
    setup_comfy()
    import torch
    import comfy.sample
    import comfy.sd
    import comfy.supported_models
    import comfy.utils

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        path, output_vae=True, output_clip=True, embedding_directory=None)
    cfg = model.model.model_config
    tokens = clip.tokenize("a red circle and a blue square")
    cond = clip.encode_from_tokens_scheduled(tokens)
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    lat = torch.zeros(1, 4, latent, latent)
    noise = comfy.sample.prepare_noise(lat, 0)
    samples = comfy.sample.sample(model, noise, steps, 7.0, "euler", "normal", cond, neg, lat,
                                  denoise=1.0, disable_pbar=True, seed=0)
    image = vae.decode(samples[..., :8, :8])      # the VAE works; a small crop keeps this quick
    return {
        "model_config": type(cfg).__name__,
        "is_sd15": type(cfg) is comfy.supported_models.SD15,
        "clip": type(clip.cond_stage_model).__name__,
        "samples_shape": tuple(samples.shape),
        "samples_finite": bool(torch.isfinite(samples).all()),
        "image_shape": tuple(image.shape),
        "image_finite": bool(torch.isfinite(image).all()),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--path", default=None)
    ap.add_argument("--verify", action="store_true", help="load it with ComfyUI and sample one step")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    path = ensure_checkpoint(a.path)
    if a.verify:
        facts = verify(path)
        print(facts, file=sys.stderr)
        if not (facts["is_sd15"] and facts["samples_finite"] and facts["image_finite"]):
            return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
