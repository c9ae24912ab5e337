"""Train the shapes-world DiT (ComfyUI's Flux transformer, rectified flow).

    python -m shapesworld.train_dit --out shapesworld/weights/shapes_world_dit.safetensors [--steps N]

Deterministic for a given --seed and step count (fixed torch seed, per-step numpy generators; the
data, caption embeddings, EMA, LR schedule and thread probing are train.py's). CPU, fp32.

Recipe: rectified flow as SD3 / Flux (ComfyUI ``ModelType.FLOW``): x_t = (1 - s) x0 + s noise, the
model predicts the velocity noise - x0 (ComfyUI's CONST sampling: denoised = x_t - s v), MSE on it;
s drawn logit-normal(0, 1) (SD3's default) for --p-logit-normal of the batch, uniform for the rest
(the near-pure-noise steps that decide colour and layout are rare under logit-normal alone). The
model's timestep input is s itself (multiplier 1). 10 % empty captions (CFG), AdamW with warmup and
cosine decay, grad clip 1, EMA (saved, fp16, with the shift in the metadata).

Token grounding (--ground): TokenCompose's token term as train.py applies it to the UNet's
cross-attention, here on the JOINT attention of every double and single block: for every object of
the caption, its colour word's and its shape word's image-query x text-key probabilities (softmax over
all 77 text and 256 image keys, mean over heads) should lie on the object mask, area-averaged to
the 16x16 token grid. The attention runs explicitly in training (333 tokens) through
``transformer_options["optimized_attention_override"]`` (``JointAttentionMaps``), so the loss's
gradients flow through the host's own blocks.

ComfyUI's Flux blocks add their residuals in place (``x += ...``) after a LayerNorm has saved x for
backward, which autograd refuses; the training forward runs under a saved-tensor hook that stores a
copy of every saved tensor (``torch.autograd.graph.saved_tensors_hooks``), so backward sees the
values of the forward and the host's code runs unchanged.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

logger = logging.getLogger("shapesworld.train_dit")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output .safetensors (EMA weights, fp16)")
    p.add_argument("--steps", type=int, default=1000, help="total optimizer steps (fixed: the LR schedule depends on it)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--p-uncond", type=float, default=0.1, help="fraction of empty captions")
    p.add_argument("--p-logit-normal", type=float, default=0.8,
                   help="fraction of noise levels drawn logit-normal(0, 1) instead of uniform")
    p.add_argument("--shift", type=float, default=None,
                   help="sampling shift recorded in the weights (default comfy_glue.DIT_SHIFT)")
    p.add_argument("--stop-at", type=int, default=0,
                   help="stop after this many steps (the LR schedule still spans --steps) and save the EMA weights")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=2, help="max torch threads; the run probes 1..max and keeps the faster")
    p.add_argument("--ckpt-dir", default="/tmp/shapes_dit_ckpt", help="periodic EMA checkpoints")
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--emb-cache", default="/tmp/shapes_caption_emb.pt", help="cache of the caption embeddings ('' = none)")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--ground", type=float, default=0.1,
                   help="weight of the token-grounding loss on the joint attention maps (0 = off)")
    return p.parse_args(argv)


def _mask4(mask: torch.Tensor) -> torch.Tensor:
    """ComfyUI's attention mask ((N, N), (B, N, N) or (B, H, N, N)) broadcastable to (B, H, N, N)."""
    m = mask
    if m.ndim == 2:
        m = m.unsqueeze(0)
    if m.ndim == 3:
        m = m.unsqueeze(1)
    return m


def joint_probabilities(q: torch.Tensor, k: torch.Tensor, mask=None) -> torch.Tensor:
    """Explicit softmax(q k^T / sqrt(D)) of (B, H, N, D) q / k over ALL keys: (B, H, Nq, Nk).
    ``mask`` as ComfyUI's attention takes it (bool: keep where True; float: added to the scores)."""
    s = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        m = _mask4(mask)
        s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.to(s.dtype)
    return torch.softmax(s, dim=-1)


def joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None):
    """Explicit attention of (B, H, N, D) q / k / v: (output (B, N, H * D), probabilities (B, H, N, N))."""
    b, h, n, d = q.shape
    p = joint_probabilities(q, k, mask)
    out = torch.matmul(p, v).transpose(1, 2).reshape(b, n, h * d)
    return out, p


class JointAttentionMaps:
    """``optimized_attention_override`` for training. Every joint attention call (Flux: (B, H, N, D),
    ``skip_reshape``, text tokens first) runs the host's attention for its output and, for the grounded
    words, computes their image-query x text-key probabilities of the joint softmax, mean over heads,
    with gradients: (B, N_img, W) per call in ``maps``, W = the words of ``columns``.

    ``columns`` (B, W) are the text-key columns per item. A word's probability at query i is the
    attention output of a value matrix that is 1 on that word's key column and 0 elsewhere, so one
    fused SDPA call (its backward too) gives all W words exactly, without forming the (N x N)
    probabilities; the indicator values are padded to the head dim (torch's fused kernels need q and
    v of one width). With ``columns`` None every text column is kept (W = N_txt) by the explicit
    softmax of ``joint_attention``."""

    def __init__(self, n_txt: int):
        self.n_txt = n_txt
        self.columns = None
        self.maps = []

    def __call__(self, func, q, k, v, heads, *args, mask=None, skip_reshape=False, **kwargs):
        if not skip_reshape or q.ndim != 4:
            raise RuntimeError("JointAttentionMaps expects Flux's (B, H, N, D) attention calls")
        if self.columns is None:
            out, p = joint_attention(q, k, v, mask)
            self.maps.append(p[:, :, self.n_txt:, :self.n_txt].mean(1))
            return out
        out = func(q, k, v, heads, *args, mask=mask, skip_reshape=skip_reshape, **kwargs)
        b, h, n, d = q.shape
        w = self.columns.shape[1]
        if w > d:
            raise ValueError(f"at most {d} grounded words per item, got {w}")
        # ind[i, 0, columns[i, j], j] = 1: value channel j carries word j of item i
        ind = torch.zeros(b, 1, n, d, dtype=q.dtype, device=q.device)
        rows = torch.arange(b, device=q.device).view(b, 1).expand(b, w)
        ind[rows, 0, self.columns.to(q.device), torch.arange(w, device=q.device).view(1, w).expand(b, w)] = 1.0
        am = None
        if mask is not None:
            am = _mask4(mask)
            if am.shape[-2] == n:
                am = am[..., self.n_txt:, :]
        mass = torch.nn.functional.scaled_dot_product_attention(q[:, :, self.n_txt:], k, ind.expand(b, h, n, d),
                                                                attn_mask=am)
        self.maps.append(mass[..., :w].mean(1))
        return out


def _clone_saved(t: torch.Tensor) -> torch.Tensor:
    return t.clone()


def _unpack_saved(t: torch.Tensor) -> torch.Tensor:
    return t


def training_forward(dm, x, sigma, context, pooled, transformer_options):
    """The host's Flux forward with copies of the saved tensors (its blocks add residuals in place)."""
    with torch.autograd.graph.saved_tensors_hooks(_clone_saved, _unpack_saved):
        return dm(x, sigma, context, y=pooled, transformer_options=transformer_options)


def sample_sigmas(rng: np.random.Generator, n: int, p_logit_normal: float) -> torch.Tensor:
    """Noise levels s in (0, 1): logit-normal(0, 1) for a fraction p_logit_normal, uniform otherwise."""
    ln = 1.0 / (1.0 + np.exp(-rng.standard_normal(n)))
    uni = rng.random(n)
    s = np.where(rng.random(n) < p_logit_normal, ln, uni)
    return torch.from_numpy(np.clip(s, 1e-4, 1.0).astype(np.float32))


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    from devtools.host import setup_comfy
    setup_comfy(pytorch_attention=True)
    from . import comfy_glue, data
    from .train import (ThreadProbe, caption_positions, caption_table, ema_update, grounding_loss,
                        grounding_targets, lr_at, save_weights)

    shift = comfy_glue.DIT_SHIFT if args.shift is None else args.shift
    torch.manual_seed(args.seed)
    model = comfy_glue.build_dit_model(seed=args.seed, shift=shift)
    dm = model.diffusion_model
    dm.train()
    for p in dm.parameters():
        p.requires_grad_(True)
    ema = copy.deepcopy(dm).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    n_params = sum(p.numel() for p in dm.parameters())
    logger.info("Flux parameters: %d (%d double + %d single blocks, hidden %d, %d heads)", n_params,
                len(dm.double_blocks), len(dm.single_blocks), dm.hidden_size, dm.num_heads)

    t0 = time.time()
    captions, index, table, pooled_table = caption_table(args.emb_cache, pooled=True)
    logger.info("encoded %d captions in %.1fs", table.shape[0], time.time() - t0)
    n_txt = table.shape[1]

    recipe = (f"rectified flow (velocity), logit-normal {args.p_logit_normal:g}, batch {args.batch}, lr {args.lr:g} "
              f"cosine over {args.steps} steps, EMA {args.ema:g}, token grounding {args.ground:g} on joint attention, "
              f"seed {args.seed}")
    positions = caption_positions(captions)
    grounder = JointAttentionMaps(n_txt)
    transformer_options = {"optimized_attention_override": grounder} if args.ground > 0 else {}

    opt = torch.optim.AdamW(dm.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=0.01)
    threads = ThreadProbe(args.threads)

    def save(path, step):
        save_weights(ema.state_dict(), path, {"model": "shapes_world_dit", "family": "flux", "step": step,
                                              "prediction": "flow", "shift": shift, "params": n_params,
                                              "recipe": recipe})

    t_start = time.time()
    run_loss = run_g = None
    last = min(args.steps, args.stop_at) if args.stop_at else args.steps
    for step in range(last):
        ts = time.time()
        rng = np.random.default_rng([args.seed, step])
        imgs, caps, objs = data.sample_batch(rng, args.batch)
        idx = np.array([index[c] for c in caps])
        idx[rng.random(args.batch) < args.p_uncond] = 0
        x0 = comfy_glue.rgb_to_latent(torch.from_numpy(imgs))
        tidx = torch.from_numpy(idx)
        ctx, pooled = table[tidx], pooled_table[tidx]
        sigma = sample_sigmas(rng, args.batch, args.p_logit_normal)
        noise = torch.from_numpy(rng.standard_normal(x0.shape).astype(np.float32))
        s = sigma.view(-1, 1, 1, 1)
        xt = (1.0 - s) * x0 + s * noise
        target = noise - x0                   # CONST: denoised = x_t - sigma * v = x0 for this output

        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        grounder.maps = []
        if args.ground > 0:
            # the override keeps the colour and shape words of each object: columns (B, 4); the loss
            # then reads map column 2 * object + word
            cols, valid, masks = grounding_targets(objs, caps, positions, idx)
            grounder.columns = cols.reshape(args.batch, -1)
            local = torch.arange(cols.shape[1] * cols.shape[2]).view(1, *cols.shape[1:]).expand_as(cols)
        pred = training_forward(dm, xt, sigma, ctx, pooled, transformer_options)
        per = ((pred.float() - target) ** 2).mean(dim=(1, 2, 3))
        loss = per.mean()
        g_loss = None
        if args.ground > 0:
            if len(grounder.maps) != len(dm.double_blocks) + len(dm.single_blocks):
                raise RuntimeError(f"attention override saw {len(grounder.maps)} calls")
            g_loss = grounding_loss(grounder.maps, local, valid, masks)
            loss = loss + args.ground * g_loss
        grounder.maps = []
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dm.parameters(), 1.0)
        opt.step()
        ema_update(ema, dm, step, args.ema)
        threads.step_done(step, time.time() - ts)

        lv = float(per.detach().mean())
        run_loss = lv if run_loss is None else 0.98 * run_loss + 0.02 * lv
        if g_loss is not None:
            gv = float(g_loss.detach())
            run_g = gv if run_g is None else 0.98 * run_g + 0.02 * gv
        if (step + 1) % args.log_every == 0 or step == 0:
            el = time.time() - t_start
            logger.info("step %d/%d mse %.4f (avg %.4f) ground %s lr %.2e  %.2fs/step  elapsed %.1fmin  eta %.1fmin  "
                        "threads %d %s", step + 1, args.steps, lv, run_loss,
                        "-" if run_g is None else f"{run_g:.4f}", opt.param_groups[0]["lr"], el / (step + 1), el / 60,
                        el / (step + 1) * (last - step - 1) / 60, threads.current, threads.summary())
        if args.ckpt_every and (step + 1) % args.ckpt_every == 0 and step + 1 < last:
            path = os.path.join(args.ckpt_dir, f"ema_step{step + 1:05d}.safetensors")
            save(path, step + 1)
            logger.info("checkpoint %s", path)

    save(args.out, last)
    logger.info("done: %d steps in %.1f min -> %s", last, (time.time() - t_start) / 60, args.out)


if __name__ == "__main__":
    main()
