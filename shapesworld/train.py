"""Train the shapes-world UNet.

    python -m shapesworld.train --out shapesworld/weights/shapes_world.safetensors [--steps N]

Deterministic for a given --seed and step count (fixed torch seed, per-step numpy generators).
CPU, fp32 by default (--bf16 for autocast on CPUs with native bf16), up to 2 threads (the faster of
1 and 2 is kept). Text-encoder outputs for every caption (and "") are computed once.

Recipe (one phase): v-prediction with the plain v MSE (on the epsilon scale this weights step t by
1 + sigma_t^2, so the high-noise steps that decide colour, layout and background count, and the
network never has to amplify an epsilon error by sigma to get the image), timesteps drawn half
uniform and half logit-normal (mid-noise steps, where shapes form, are seen twice as often), AdamW
peak lr 1e-3 with warmup and cosine decay to 0, grad clip 1, EMA 0.998 (the EMA weights are saved,
fp16, with the prediction type in the metadata). Periodic EMA checkpoints go to --ckpt-dir.

Token grounding (--ground, weight 0.1): the loss adds TokenCompose's token term (Wang et al. 2024,
"TokenCompose: Text-to-Image Diffusion with Token-level Supervision"): for every object of the
caption, its colour word and its shape word should put their cross-attention mass on the object,
(1 - mass inside the object mask / total mass)^2 on every cross-attention layer (masks
area-averaged to the layer), averaged. The data generator knows every object's mask, so the model
learns the word-localised cross-attention that large text-to-image models show (DAAM), which the
attention techniques of the pack rely on; a plain denoising loss on this small a budget did not get
there (colour-word pointing 39 %). Cross-attention runs explicitly in training (HW x 77 is small);
self-attention keeps the fused SDPA kernel.
"""
from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import sys
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

logger = logging.getLogger("shapesworld.train")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output .safetensors (EMA weights, fp16)")
    p.add_argument("--steps", type=int, default=2600, help="total optimizer steps (fixed: the LR schedule depends on it)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--p-uncond", type=float, default=0.1, help="fraction of empty captions")
    p.add_argument("--p-logit-normal", type=float, default=0.5,
                   help="fraction of timesteps drawn logit-normal(0, 1) instead of uniform")
    p.add_argument("--stop-at", type=int, default=0,
                   help="stop after this many steps (the LR schedule still spans --steps) and save the EMA weights")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=2, help="max torch threads; the run probes 1..max and keeps the faster")
    p.add_argument("--ckpt-dir", default="/tmp/shapes_ckpt", help="periodic EMA checkpoints")
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--emb-cache", default="/tmp/shapes_caption_emb.pt", help="cache of the caption embeddings ('' = none)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (fast only on CPUs with native bf16: AVX512-BF16/AMX)")
    p.add_argument("--ground", type=float, default=0.1,
                   help="weight of the token-grounding loss on the cross-attention maps (0 = off)")
    return p.parse_args(argv)


def save_weights(state: dict, path: str, metadata: dict):
    """A state dict as fp16 safetensors (written to a temporary file, then renamed)."""
    import safetensors.torch
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in state.items()}
    tmp = path + ".tmp"
    safetensors.torch.save_file(sd, tmp, metadata={"format": "pt", **{k: str(v) for k, v in metadata.items()}})
    os.replace(tmp, path)


def save_unet(state: dict, path: str, step: int, recipe: str = ""):
    save_weights(state, path, {"model": "shapes_world", "step": step, "prediction": "v", "recipe": recipe})


class GroundingMaps:
    """attn2 replace patch for training: explicit cross-attention (softmax(QK^T / sqrt(d)) V: the
    HW x 77 matrix is small) that keeps the head-averaged probabilities of every call for the
    grounding loss. Self-attention keeps the host's SDPA (32x32 maps: the fused kernel is faster)."""

    def __init__(self):
        self.maps = []

    def __call__(self, q, k, v, extra):
        h = extra["n_heads"]
        b, n, c = q.shape
        d = c // h
        qh = q.view(b, n, h, d).transpose(1, 2)
        kh = k.view(b, -1, h, d).transpose(1, 2)
        vh = v.view(b, -1, h, d).transpose(1, 2)
        p = torch.softmax(torch.matmul(qh, kh.transpose(-1, -2)) * d ** -0.5, dim=-1)   # (b, h, n, 77)
        self.maps.append(p.mean(1))
        return torch.matmul(p, vh).transpose(1, 2).reshape(b, n, c)


def grounding_targets(objs_list, caps, positions, idx) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per item and object: the colour and shape words' token columns (B, 2, 2), a validity flag
    (B, 2) (object present, caption not dropped) and the object masks (B, 2, 32, 32)."""
    from .data import SIZE
    b = len(caps)
    cols = torch.zeros(b, 2, 2, dtype=torch.long)
    valid = torch.zeros(b, 2)
    masks = torch.zeros(b, 2, SIZE, SIZE)
    for i, (objs, cap) in enumerate(zip(objs_list, caps)):
        if idx[i] == 0:
            continue                                   # empty caption: nothing to ground
        for j, (o, (cpos, spos)) in enumerate(zip(objs, positions[cap])):
            cols[i, j, 0], cols[i, j, 1] = cpos, spos
            valid[i, j] = 1.0
            masks[i, j] = torch.from_numpy(o["mask"].astype("float32"))
    return cols, valid, masks


def grounding_loss(maps: list, cols: torch.Tensor, valid: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """TokenCompose-style token loss (Wang et al. 2024): for each object's colour and shape word,
    (1 - attention mass inside the object / total mass)^2 on every cross-attention layer, masks
    area-averaged to the layer; mean over layers, objects and the two words."""
    b, k = valid.shape
    total = torch.zeros(())
    for p in maps:                                              # (b, n, 77)
        n = p.shape[1]
        side = int(round(n ** 0.5))
        m = torch.nn.functional.adaptive_avg_pool2d(masks, (side, side)).reshape(b, k, 1, n)  # (b, k, 1, n)
        a = p.transpose(1, 2).gather(1, cols.reshape(b, k * 2, 1).expand(b, k * 2, n)).reshape(b, k, 2, n)
        frac = (a * m).sum(-1) / a.sum(-1).clamp_min(1e-8)       # (b, k, 2)
        total = total + (((1.0 - frac) ** 2).mean(-1) * valid).sum() / valid.sum().clamp_min(1.0)
    return total / max(len(maps), 1)


def caption_positions(captions) -> dict:
    """caption -> [(colour token, shape token)] per object, in caption order (SD1 tokenizer)."""
    import comfy.sd1_clip
    from .evaluate_model import word_token_positions
    from .data import COLOURS, SHAPES
    tok = comfy.sd1_clip.SDTokenizer().tokenizer
    out = {}
    for cap in captions:
        pos = word_token_positions(tok, cap)
        seen: dict = {}
        words = cap.split()
        pairs = []
        for i in range(len(words) - 1):
            if words[i] in COLOURS and words[i + 1] in SHAPES:
                c, s = words[i], words[i + 1]
                kc, ks = seen.get(c, 0), seen.get(s, 0)
                seen[c], seen[s] = kc + 1, ks + 1
                pairs.append((pos[c][kc], pos[s][ks]))
        out[cap] = pairs
    return out


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, step: int, decay: float) -> None:
    """EMA with warm-up: decay min(decay, (1 + step) / (10 + step))."""
    with torch.no_grad():
        d = min(decay, (1.0 + step) / (10.0 + step))
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.mul_(d).add_(pm.detach(), alpha=1.0 - d)


def caption_cache_key() -> dict:
    """What the caption-embedding cache depends on: the captions and the CLIP's seed and shape."""
    from . import comfy_glue, data
    return {"captions": [""] + data.all_captions(),
            "clip": [comfy_glue.CLIP_SEED, comfy_glue.CLIP_LAYERS, comfy_glue.CLIP_TOKEN_STD,
                     comfy_glue.CLIP_POSITION_STD, comfy_glue.CLIP_LINEAR_STD]}


def caption_table(emb_cache: str, pooled: bool = False):
    """Text-encoder outputs of every caption of the world, once: (captions, caption -> row, table
    (1 + n, 77, 768) with row 0 = "") and, with ``pooled``, the pooled outputs (1 + n, 768) too.
    Cached in ``emb_cache`` ('' = no cache) under a key of the captions and the CLIP's seed / shape."""
    from . import comfy_glue, data
    captions = data.all_captions()
    index = {c: i + 1 for i, c in enumerate(captions)}
    key = caption_cache_key()
    cached = None
    if emb_cache and os.path.exists(emb_cache):
        cached = torch.load(emb_cache)
        if cached.get("key") != key or (pooled and "pooled" not in cached):
            cached = None
    if cached is None:
        clip = comfy_glue.build_clip()
        with torch.no_grad():
            outs = [clip.encode_from_tokens(clip.tokenize(c), return_pooled=True) for c in [""] + captions]
        cached = {"key": key, "table": torch.stack([c.float()[0] for c, _ in outs]),
                  "pooled": torch.stack([p.float()[0] for _, p in outs])}
        del clip
        if emb_cache:
            torch.save(cached, emb_cache)
    if pooled:
        return captions, index, cached["table"], cached["pooled"]
    return captions, index, cached["table"]


class ThreadProbe:
    """Torch thread count on a shared machine, where 2 threads can be 3x slower than 1: tries each
    count from 1 to ``max_threads`` and keeps the fastest (smoothed step times), re-probing another
    count every ``probe_every`` steps as loads change. Call ``step_done(step, seconds)`` after each step."""

    def __init__(self, max_threads: int, probe_every: int = 100, probe_len: int = 4):
        self.opts = list(range(1, max(1, max_threads) + 1))
        self.time = {n: None for n in self.opts}
        self.current = self.opts[-1]
        self.probe_every, self.probe_len = probe_every, probe_len
        self.probing = False
        torch.set_num_threads(self.current)

    def step_done(self, step: int, dt: float) -> None:
        prev = self.time[self.current]
        # a probe replaces the (possibly stale) figure; otherwise smooth
        self.time[self.current] = dt if (prev is None or self.probing) else 0.7 * prev + 0.3 * dt
        self.probing = False
        if len(self.opts) > 1 and step > 0:
            unknown = [n for n in self.opts if self.time[n] is None]
            if step % self.probe_every == 0 or (unknown and step % self.probe_len == 0):
                # probe another setting now and then: the machine is shared and loads change
                nxt = unknown[0] if unknown else self.opts[(self.opts.index(self.current) + 1) % len(self.opts)]
            else:
                known = {n: v for n, v in self.time.items() if v is not None}
                nxt = min(known, key=known.get)
            if nxt != self.current:
                self.probing = nxt != min((n for n in self.time if self.time[n] is not None),
                                          key=lambda n: self.time[n], default=nxt)
                self.current = nxt
                torch.set_num_threads(nxt)

    def summary(self) -> dict:
        return {n: (round(v, 2) if v else None) for n, v in self.time.items()}


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    from devtools.host import setup_comfy
    setup_comfy(pytorch_attention=True)  # SDPA: supports backward and is fast on CPU
    from . import comfy_glue, data

    torch.manual_seed(args.seed)
    model = comfy_glue.build_unet_model(seed=args.seed, prediction="v")
    unet = model.diffusion_model
    unet.train()
    for p in unet.parameters():
        p.requires_grad_(True)
    ema = copy.deepcopy(unet).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    logger.info("unet parameters: %d", sum(p.numel() for p in unet.parameters()))

    sigmas = model.model_sampling.sigmas.float()
    alphas_cumprod = 1.0 / (1.0 + sigmas ** 2)  # scaled-linear 0.00085..0.012, 1000 steps
    sqrt_ac = alphas_cumprod.sqrt()
    sqrt_1mac = (1.0 - alphas_cumprod).sqrt()

    # text-encoder outputs for the whole (finite) caption set, once
    t0 = time.time()
    captions, index, table = caption_table(args.emb_cache)  # (1 + n_captions, 77, 768); row 0 is ""
    logger.info("encoded %d captions in %.1fs", table.shape[0], time.time() - t0)

    recipe = (f"v-prediction, batch {args.batch}, lr {args.lr:g} cosine over {args.steps} steps, EMA {args.ema:g}, "
              f"token grounding {args.ground:g}, seed {args.seed}")
    positions = caption_positions(captions)
    grounder = GroundingMaps()
    transformer_options = {}
    if args.ground > 0:
        from .evaluate_model import attention_blocks
        transformer_options = {"patches_replace": {"attn2": {
            (name, bid, ti): grounder for name, bid, depth in attention_blocks(unet) for ti in range(depth)}}}
        logger.info("grounding loss %.3g on %d cross-attention layers", args.ground,
                    len(transformer_options["patches_replace"]["attn2"]))

    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=0.01)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if args.bf16
                else torch.autocast("cpu", enabled=False))

    # thread count: on a shared machine 2 threads can be 3x slower than 1; probe and keep the faster
    threads = ThreadProbe(args.threads)

    first = 0
    t_start = time.time()
    run_loss = None
    run_g = None
    last = min(args.steps, args.stop_at) if args.stop_at else args.steps
    for step in range(first, last):
        ts = time.time()
        rng = np.random.default_rng([args.seed, step])
        imgs, caps, objs = data.sample_batch(rng, args.batch)
        idx = np.array([index[c] for c in caps])
        idx[rng.random(args.batch) < args.p_uncond] = 0
        x0 = comfy_glue.rgb_to_latent(torch.from_numpy(imgs))
        ctx = table[torch.from_numpy(idx)]
        t_uni = rng.integers(0, 1000, size=args.batch)
        t_ln = np.clip((1000.0 / (1.0 + np.exp(-rng.standard_normal(args.batch)))).astype(np.int64), 0, 999)
        t = torch.from_numpy(np.where(rng.random(args.batch) < args.p_logit_normal, t_ln, t_uni))
        noise = torch.from_numpy(rng.standard_normal(x0.shape).astype(np.float32))
        a = sqrt_ac[t].view(-1, 1, 1, 1)
        b = sqrt_1mac[t].view(-1, 1, 1, 1)
        xt = a * x0 + b * noise
        target = a * noise - b * x0  # v: ComfyUI's V_PREDICTION denoised = x0 exactly for this output

        lr = lr_at(step, args.steps, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        grounder.maps = []
        with autocast:
            pred = unet(xt, t.float(), context=ctx, transformer_options=transformer_options)
        per = ((pred.float() - target) ** 2).mean(dim=(1, 2, 3))
        loss = per.mean()
        g_loss = None
        if args.ground > 0:
            g_loss = grounding_loss([m.float() for m in grounder.maps], *grounding_targets(objs, caps, positions, idx))
            loss = loss + args.ground * g_loss
        grounder.maps = []
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        ema_update(ema, unet, step, args.ema)
        threads.step_done(step, time.time() - ts)

        lv = float(per.detach().mean())
        run_loss = lv if run_loss is None else 0.98 * run_loss + 0.02 * lv
        if g_loss is not None:
            gv = float(g_loss.detach())
            run_g = gv if run_g is None else 0.98 * run_g + 0.02 * gv
        if (step + 1) % args.log_every == 0 or step == first:
            el = time.time() - t_start
            logger.info("step %d/%d mse %.4f (avg %.4f) ground %s lr %.2e  %.2fs/step  elapsed %.1fmin  eta %.1fmin  "
                        "threads %d %s", step + 1, args.steps, lv, run_loss,
                        "-" if run_g is None else f"{run_g:.4f}", opt.param_groups[0]["lr"],
                        el / (step + 1 - first), el / 60, el / (step + 1 - first) * (args.steps - step - 1) / 60, threads.current,
                        threads.summary())
        if args.ckpt_every and (step + 1) % args.ckpt_every == 0 and step + 1 < last:
            path = os.path.join(args.ckpt_dir, f"ema_step{step + 1:05d}.safetensors")
            save_unet(ema.state_dict(), path, step + 1, recipe)
            logger.info("checkpoint %s", path)

    save_unet(ema.state_dict(), args.out, last, recipe)
    logger.info("done: %d steps in %.1f min -> %s", last, (time.time() - t_start) / 60, args.out)


if __name__ == "__main__":
    main()
