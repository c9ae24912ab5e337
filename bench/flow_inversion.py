"""rf_inversion_step_time_ratio (issue 18): one step of RF-Inversion's controlled inversion (gamma 0.5,
the trajectory recorded) vs one plain euler sampling step, on the same model, latent and conditioning.

Model: the tiny random Flux-shaped DiT of bench/dit_capture.py (ComfyUI's Flux class, hidden 128, 4
heads, 2 double + 2 single blocks, patch 2, guidance-distilled: cfg 1, one cond row per step), a 64x64
latent (1024 image tokens), a 256-token context. Both sides run the same number of steps through
ComfyUI's CFGGuider, so the ratio of the runs is the ratio of the steps.
"""
from __future__ import annotations


from bench import common
from bench.dit_capture import DIT_CTX, _model_and_conds, child_main

GAMMA = 0.5


def time_case(backend: str, steps: int, pairs: int) -> dict:
    impl = common.setup(backend)
    import torch
    from attention_control.attention.flow_inversion_glue import flow_invert
    M, model, pos, _, noise = _model_and_conds()
    image = {"samples": torch.nn.functional.avg_pool2d(noise.view(16, 1, 64, 64), 3, 1, 1).view(1, 16, 64, 64)}

    def plain():
        M.sample(model, noise, pos, pos, image["samples"], steps=steps, cfg=1.0)

    def invert():
        with torch.inference_mode():
            flow_invert(model, pos, image, steps, "simple", GAMMA, 3)

    res = common.interleaved_ratio(plain, invert, pairs=pairs)
    res["attention"] = impl
    return res


def collect(quick: bool = False) -> dict:
    steps = 4
    out = {}
    for backend in common.BACKENDS:
        r = common.run_child("bench.flow_inversion", "time", backend, str(steps), "2" if quick else str(common.PAIRS))
        out[f"rf_inversion_step_time_ratio[{backend}]"] = common.time_figure(
            r, 1.1, f"RF-Inversion (gamma {GAMMA}, trajectory kept) vs euler sampling, {steps} steps each, cfg 1, "
                    f"{DIT_CTX}, attention={r['attention']}, CPU time")
    return common.add_worst(out, ["rf_inversion_step_time_ratio"])


if __name__ == "__main__":
    child_main(time_case)
