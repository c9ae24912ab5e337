"""dit_masactrl_time_ratio (issue 18): MasaCtrl on DiT joint attention.

Model and batch: the tiny random Flux-shaped DiT and the [source, target] batch of bench/dit_p2p.py
(ComfyUI's Flux class, hidden 128, 4 heads, 2 double + 2 single blocks, 64x64 latent, 256-token
context, shared noise, the target's context one token different), euler, 10 steps, cfg 1. MasaCtrl
as the UNet bench sets it (bench/masactrl.py): start step 4/50 of the steps, the default start block
(depth fraction 1/3: the second double block and the two single blocks here), mutual mode. Baseline: plain sampling of the
same batch and conditioning.
"""
from __future__ import annotations


from bench import common
from bench.dit_capture import DIT_CTX, child_main
from bench.dit_p2p import _sample, batch2

START_STEP = 4 / 50


def masa_model(model):
    from attention_control.attention.dit_masactrl import DitMasaCtrlController
    from attention_control.attention.router import attach
    return attach(model, DitMasaCtrlController(start_step=START_STEP))


def time_case(backend: str, steps: int, pairs: int) -> dict:
    impl = common.setup(backend)
    M, model, pos, latent, noise = batch2()
    masa = masa_model(model)
    res = common.interleaved_ratio(lambda: _sample(M, model, pos, latent, noise, steps),
                                   lambda: _sample(M, masa, pos, latent, noise, steps), pairs=pairs)
    res["attention"] = impl
    return res


def collect(quick: bool = False) -> dict:
    steps = 10
    out = {}
    for backend in common.BACKENDS:
        r = common.run_child("bench.dit_masactrl", "time", backend, str(steps), "2" if quick else str(common.PAIRS))
        out[f"dit_masactrl_time_ratio[{backend}]"] = common.time_figure(
            r, 1.05, f"{DIT_CTX}, batch [source, target], MasaCtrl mutual, start step "
                     f"{START_STEP:g} of the steps, default start block (depth fraction 1/3), {steps} euler steps, "
                     f"cfg 1, vs plain sampling of the same batch, attention={r['attention']}, CPU time")
    return common.add_worst(out, ["dit_masactrl_time_ratio"])


if __name__ == "__main__":
    child_main(time_case)
