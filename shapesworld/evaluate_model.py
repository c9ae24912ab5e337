"""Sample the shapes-world model with ComfyUI's real sampler and measure it.

    python -m shapesworld.evaluate_model --weights PATH --n 64 [--cfg 6 --steps 20 --sampler euler]
    python -m shapesworld.evaluate_model --dit --n 64           # the DiT world (Flux class, rectified flow)

Reports: colour presence %, shape accuracy % (over the caption's objects), and the pointing game on
the 16x16 cross-attention maps (cond rows, summed over the 16x16 layers, heads and steps) for the
colour word and for the shape word of each object that was generated. With --dit the maps are the
joint attention's: image-query x word-key probabilities of the softmax over all text and image keys,
computed explicitly in an ``optimized_attention_override`` (cond rows, mean over heads, summed over
every double and single block and the steps). Captions are drawn from the training distribution
with a fixed seed. Optionally writes a PNG grid of the samples.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
logger = logging.getLogger("shapesworld.evaluate_model")

UNET_CFG = 6.0
DIT_CFG = 5.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=None, help="UNet safetensors (default: shapesworld/weights/shapes_world.safetensors; "
                                                   "with --dit shapesworld/weights/shapes_world_dit.safetensors)")
    p.add_argument("--dit", action="store_true", help="the DiT world (ComfyUI's Flux class): joint-attention maps")
    p.add_argument("--shift", type=float, default=None, help="--dit: sampling shift (default: the weights')")
    p.add_argument("--n", type=int, default=64, help="number of captions / samples")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=None, help=f"CFG scale (default {UNET_CFG:g}; --dit {DIT_CFG:g})")
    p.add_argument("--sampler", default="euler")
    p.add_argument("--scheduler", default="normal")
    p.add_argument("--seed", type=int, default=7, help="caption and noise seed")
    p.add_argument("--batch", type=int, default=16, help="samples per sampler call")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--grid", default="", help="write a PNG grid of the samples here")
    p.add_argument("--json", default="", help="write the figures as JSON here")
    return p.parse_args(argv)


def word_token_positions(tokenizer, caption: str) -> dict:
    """word -> list of token positions in the 77-token sequence (0 is BOS) for the SD1 tokenizer."""
    pos = 1
    out = {}
    for w in caption.split():
        ids = tokenizer(w)["input_ids"][1:-1]
        out.setdefault(w, []).extend(range(pos, pos + len(ids)))
        pos += len(ids)
    return out


class AttnStore:
    """attn2 replace patch: default attention output + accumulation of cond-row probabilities
    on layers with `size` query tokens (16x16 = 256 for a 32x32 latent)."""

    def __init__(self, size: int):
        self.size = size
        self.maps = None  # (B, size, 77)
        self.calls = 0

    def __call__(self, q, k, v, extra_options):
        import comfy.ldm.modules.attention as attn
        heads = extra_options["n_heads"]
        out = attn.optimized_attention(q, k, v, heads)
        if q.shape[1] == self.size:
            cou = extra_options["cond_or_uncond"]
            b = q.shape[0] // len(cou)
            for ci, kind in enumerate(cou):
                if kind != 0:
                    continue
                qc, kc = q[ci * b:(ci + 1) * b], k[ci * b:(ci + 1) * b]
                dh = qc.shape[-1] // heads
                qh = qc.reshape(b, -1, heads, dh).transpose(1, 2).float()
                kh = kc.reshape(b, -1, heads, dh).transpose(1, 2).float()
                p = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(dh), dim=-1).mean(1)  # (b, N, T)
                p = p[..., :77] if p.shape[-1] >= 77 else p
                self.maps = p.clone() if self.maps is None else self.maps + p
                self.calls += 1
        return out


class JointAttnStore:
    """``optimized_attention_override`` for DiT (Flux) models: the host's attention output, plus the
    cond rows' image-query x text-key probabilities of the JOINT softmax (over all text and image
    keys; explicit scores, mean over heads), summed over every call (double and single blocks) and
    step: ``maps`` (B, N_img, N_txt). Flux's calls are (B, H, N, D) with text tokens first."""

    def __init__(self, n_txt: int = 77):
        self.n_txt = n_txt
        self.maps = None
        self.calls = 0

    def __call__(self, func, q, k, v, heads, *args, **kwargs):
        from .train_dit import joint_probabilities
        out = func(q, k, v, heads, *args, **kwargs)
        to = kwargs.get("transformer_options") or {}
        cou = to.get("cond_or_uncond", [0])
        mask = kwargs.get("mask")
        b = q.shape[0] // len(cou)
        for ci, kind in enumerate(cou):
            if kind != 0:
                continue
            rows = slice(ci * b, (ci + 1) * b)
            m = mask
            if m is not None and m.ndim >= 3 and m.shape[0] == q.shape[0]:
                m = m[rows]
            p = joint_probabilities(q[rows].float(), k[rows].float(), m)[:, :, self.n_txt:, :self.n_txt].mean(1)
            self.maps = p.clone() if self.maps is None else self.maps + p
            self.calls += 1
        return out


def attention_blocks(unet):
    """(block_name, block_id, n_transformer_blocks) for every SpatialTransformer in the UNet."""
    from comfy.ldm.modules.attention import SpatialTransformer
    found = []
    for name, blocks in (("input", unet.input_blocks), ("output", unet.output_blocks)):
        for i, blk in enumerate(blocks):
            for m in blk:
                if isinstance(m, SpatialTransformer):
                    found.append((name, i, len(m.transformer_blocks)))
    for m in unet.middle_block:
        if isinstance(m, SpatialTransformer):
            found.append(("middle", 0, len(m.transformer_blocks)))
    return found


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    from devtools.host import setup_comfy
    setup_comfy()
    import comfy.sample
    from . import comfy_glue, data, evaluate

    cfg = args.cfg if args.cfg is not None else (DIT_CFG if args.dit else UNET_CFG)
    if args.dit:
        model, clip, _vae = comfy_glue.load_shapes_world_dit(args.weights, shift=args.shift)
    else:
        model, clip, _vae = comfy_glue.load_shapes_world(args.weights)
    tok = clip.tokenizer.clip_l.tokenizer
    rng = np.random.default_rng(args.seed)
    captions = []
    while len(captions) < args.n:
        _, cap, _ = data.sample_scene(rng)
        captions.append(cap)

    def encode(texts):
        conds = [clip.encode_from_tokens(clip.tokenize(t), return_pooled=True) for t in texts]
        return torch.cat([c for c, _ in conds]), torch.cat([p for _, p in conds])

    blocks = [] if args.dit else attention_blocks(model.model.diffusion_model)
    images = []
    stats = {"objects": 0, "present": 0, "shape_ok": 0, "point_colour": 0, "point_shape": 0, "pointed": 0,
             "clean_background": 0}
    t0 = time.time()
    for start in range(0, args.n, args.batch):
        caps = captions[start:start + args.batch]
        b = len(caps)
        cond, pooled = encode(caps)
        ucond, upooled = encode([""])
        positive = [[cond, {"pooled_output": pooled}]]
        negative = [[ucond.repeat(b, 1, 1), {"pooled_output": upooled.repeat(b, 1)}]]
        m = model.clone()
        if args.dit:
            store = JointAttnStore(n_txt=cond.shape[1])
            m.model_options["transformer_options"] = dict(m.model_options.get("transformer_options", {}),
                                                          optimized_attention_override=store)
        else:
            store = AttnStore(size=16 * 16)
            for name, bid, depth in blocks:
                for ti in range(depth):
                    m.set_model_attn2_replace(store, name, bid, ti)
        latent = torch.zeros(b, 4, 32, 32)
        noise = comfy.sample.prepare_noise(latent, args.seed + start)
        out = comfy.sample.sample(m, noise, args.steps, cfg, args.sampler, args.scheduler, positive, negative,
                                  latent, disable_pbar=True, seed=args.seed + start)
        rgb = comfy_glue.latent_to_rgb(out)
        if store.calls == 0:
            raise RuntimeError("attention patch never fired" + ("" if args.dit else " on a 16x16 layer"))
        for i, cap in enumerate(caps):
            img = rgb[i]
            images.append(img)
            objs = evaluate.segment_objects(img)
            fg = np.zeros((32, 32), bool)
            for o in objs:
                fg |= o["mask"]
            # clean background: non-object pixels are flat and unsaturated
            a = evaluate.to_hwc(img)
            bgp = a[~fg]
            if bgp.size and float((bgp.max(-1) - bgp.min(-1)).max()) < 0.25 and float(bgp.std(0).max()) < 0.06:
                stats["clean_background"] += 1
            positions = word_token_positions(tok, cap)
            maps = store.maps[i].reshape(16, 16, -1)
            seen = {}
            for ph in evaluate.check_caption(img, cap)["objects"]:
                # k-th occurrence of a word in the caption -> its k-th token position
                kc = seen.get(ph["colour"], 0)
                ks = seen.get(ph["shape"], 0)
                seen[ph["colour"]] = kc + 1
                seen[ph["shape"]] = ks + 1
                stats["objects"] += 1
                stats["present"] += ph["present"]
                stats["shape_ok"] += ph["shape_ok"]
                mine = [o for o in objs if o["colour"] == ph["colour"]]
                if not mine:
                    continue
                mask = mine[0]["mask"]
                stats["pointed"] += 1
                cpos = positions[ph["colour"]][kc]
                spos = positions[ph["shape"]][ks]
                stats["point_colour"] += evaluate.pointing_game(maps[..., cpos], mask)
                stats["point_shape"] += evaluate.pointing_game(maps[..., spos], mask)
        logger.info("%d/%d samples (%.0fs)", start + b, args.n, time.time() - t0)

    res = {
        "weights": args.weights or (comfy_glue.DEFAULT_DIT_WEIGHTS if args.dit else comfy_glue.DEFAULT_WEIGHTS),
        "model": "dit (Flux)" if args.dit else "unet",
        "maps": ("joint attention, image queries x word keys, double + single blocks" if args.dit
                 else "cross-attention, 16x16 layers"),
        "shift": (float(model.model.model_sampling.shift) if args.dit else None),
        "n_samples": args.n, "n_objects": stats["objects"],
        "sampler": args.sampler, "scheduler": args.scheduler, "steps": args.steps, "cfg": cfg,
        "colour_present_pct": 100.0 * stats["present"] / max(1, stats["objects"]),
        "shape_right_pct": 100.0 * stats["shape_ok"] / max(1, stats["objects"]),
        "pointing_colour_pct": 100.0 * stats["point_colour"] / max(1, stats["pointed"]),
        "pointing_shape_pct": 100.0 * stats["point_shape"] / max(1, stats["pointed"]),
        "n_pointed": stats["pointed"],
        "clean_background_pct": 100.0 * stats["clean_background"] / max(1, args.n),
        "seconds": round(time.time() - t0, 1),
    }
    if args.grid:
        from PIL import Image
        k = int(math.ceil(math.sqrt(len(images))))
        grid = np.ones((k * 34, k * 34, 3), np.float32)
        for j, img in enumerate(images):
            y, x = divmod(j, k)
            grid[y * 34 + 1:y * 34 + 33, x * 34 + 1:x * 34 + 33] = evaluate.to_hwc(img)
        Image.fromarray((grid * 255).astype(np.uint8)).resize((k * 34 * 4, k * 34 * 4), 0).save(args.grid)
        with open(os.path.splitext(args.grid)[0] + ".txt", "w") as f:
            f.write("\n".join(captions))
    return res


def main(argv=None):
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    res = run(args)
    text = json.dumps(res, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
