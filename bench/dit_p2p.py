"""dit_p2p_time_ratio, dit_p2p_peak_mem_ratio (issue 18): Prompt-to-Prompt on DiT joint attention.

Model: the tiny random Flux-shaped DiT of bench/dit_capture.py (ComfyUI's Flux class, hidden 128, 4
heads, 2 double + 2 single blocks, patch 2, guidance-distilled: cfg 1, one cond chunk per step), a
64x64 latent (1024 image tokens), a 256-token context. Batch [source, target] from shared noise; the
target's context is the source's with one token replaced (token 1), the edit a replace (word swap of
that token) with cross window 0-0.8 and self window 0.4 on every block (the UNet bench's settings:
bench/p2p.py). The baseline samples the same batch and conditioning without control.

- time: euler, 10 steps (steps 0-7 in the cross window, 0-3 in the self window), CPU time of the
  edited run over the plain run, ABBA-interleaved (bench/common.py).
- memory: extra peak RSS of a 4-step run above the loaded-model baseline (after a 1-step warm-up on
  the same shapes), edited vs plain, each in a fresh process.
"""
from __future__ import annotations


from bench import common
from bench.dit_capture import CTX, DIT_CTX, _model_and_conds, child_main

CROSS_END, SELF_FRACTION = 0.8, 0.4
SWAP = 1           # the context token the target prompt replaces


def batch2():
    """(ac_dit, model, pos, latent, noise) for a [source, target] batch: the target's context is the
    source's with token SWAP replaced; one noise for both items."""
    import torch
    M, model, pos, latent, noise = _model_and_conds()
    src = pos[0][0]
    tgt = src.clone()
    tgt[:, SWAP] = torch.randn(src.shape[-1], generator=torch.Generator().manual_seed(2))
    pos2 = [[torch.cat([src, tgt]), dict(pos[0][1])]]
    return M, model, pos2, latent.repeat(2, 1, 1, 1), noise.repeat(2, 1, 1, 1)


def _sample(M, model, pos, latent, noise, steps):
    return M.sample(model, noise, pos, pos, latent, steps=steps, cfg=1.0)


def p2p_model(model):
    from attention_control.attention.dit_p2p import DitP2PController
    from attention_control.attention.p2p import TargetEdit, replace_mapper
    from attention_control.attention.router import attach
    import torch
    words = [(1, [0], [1]), (2, [SWAP], [2]), (3, [2], [3])]
    swapped = [(1, [0], [1]), (2, [SWAP], [9]), (3, [2], [3])]
    edit = TargetEdit(replace_mapper(words, swapped, CTX), torch.ones(CTX), torch.ones(CTX))
    return attach(model, DitP2PController([edit], CTX, 0.0, CROSS_END, SELF_FRACTION))


def time_case(backend: str, steps: int, pairs: int) -> dict:
    impl = common.setup(backend)
    M, model, pos, latent, noise = batch2()
    edit = p2p_model(model)
    res = common.interleaved_ratio(lambda: _sample(M, model, pos, latent, noise, steps),
                                   lambda: _sample(M, edit, pos, latent, noise, steps), pairs=pairs)
    res["attention"] = impl
    return res


def mem_case(backend: str, steps: int, which: str) -> dict:
    common.setup(backend)
    common.pin_threads()
    M, model, pos, latent, noise = batch2()
    m = model if which == "plain" else p2p_model(model)
    _sample(M, m, pos, latent, noise, 1)               # load and warm the allocator on the same shapes
    base = common.reset_peak()
    _sample(M, m, pos, latent, noise, steps)
    return {"extra_mb": (common.peak_kb() - base) / 1024.0}


def collect(quick: bool = False) -> dict:
    steps, mem_steps = 10, 4
    out = {}
    env = common.MEM_ENV
    reps = 1 if quick else 2
    for backend in common.BACKENDS:
        r = common.run_child("bench.dit_p2p", "time", backend, str(steps), "2" if quick else str(common.PAIRS))
        mem = {w: min(common.run_child("bench.dit_p2p", "mem", backend, str(mem_steps), w, env_extra=env)["extra_mb"]
                      for _ in range(reps)) for w in ("plain", "p2p")}
        settings = (f"{DIT_CTX}, batch [source, target], replace edit (1 token swapped), "
                    f"cross 0-{CROSS_END}, self {SELF_FRACTION}, all blocks, cfg 1, attention={r['attention']}")
        out[f"dit_p2p_time_ratio[{backend}]"] = common.time_figure(
            r, 1.15, settings + f", {steps} euler steps vs plain sampling of the same batch, CPU time")
        out[f"dit_p2p_peak_mem_ratio[{backend}]"] = {
            "value": round(mem["p2p"] / max(mem["plain"], 1e-6), 4), "target": 1.10, "unit": "x",
            "settings": settings + f", {mem_steps} steps, extra peak RSS above the loaded model: P2P "
                                   f"{mem['p2p']:.1f} MB / plain {mem['plain']:.1f} MB, fresh processes, min of "
                                   f"{reps}, {env}"}
    return common.add_worst(out, ["dit_p2p_time_ratio", "dit_p2p_peak_mem_ratio"])


if __name__ == "__main__":
    child_main(time_case, mem_case, "p2p")
