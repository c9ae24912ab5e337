"""dit_layout_iter_mem_ratio, dit_layout_step_time_ratio (issue 18): backward layout guidance on DiTs.

Model: the tiny random Flux-shaped DiT of bench/dit_capture.py (ComfyUI's Flux class, hidden 128, 4
heads, 2 double + 2 single blocks, patch 2, guidance-distilled: cfg 1, one cond row per step), a
64x64 latent (1024 image tokens), a 256-token context, one prompt, euler. Its weights are made
inference tensors, as ComfyUI's loaders leave them, so the way the guidance gets gradients through
them (weight references) is part of what is measured (as bench/layout.py does on the UNet).
Guidance: one box over the left half for context tokens 2-3, the default DiT blocks (all), strength
30, exactly one iteration per guided step (threshold 0, every step guided).

- iter mem: extra peak RSS of a 1-step run with one iteration (the guidance forward to the last
  guided block + its backward, then the step's model call) vs a 1-step plain run, above the
  loaded-model baseline (after a 1-step plain warm-up), fresh processes (the UNet definition);
  dit_layout_iter_mem_ratio_double (report only): the same guiding the double blocks only, so the
  guidance forward stops after the last double block (the low-memory forward).
- step time (report only): CPU time of 4 steps each guided by one iteration over 4 plain steps, i.e.
  the time of a guided step relative to a plain one (unshifted: 1 + the iteration's relative cost).
"""
from __future__ import annotations


from bench import common
from bench.dit_capture import CTX, DIT_CTX, _model_and_conds, child_main

TOKENS = [2, 3]
# report-only variant: guiding the double blocks only (the guidance forward stops after them)
VARIANTS = {"guided": {}, "guided_double": {"layers": "double"}}


def _inference_weights(model):
    """Every parameter and buffer of the model an inference tensor (as ComfyUI loads models)."""
    import torch
    with torch.inference_mode():
        for mod in model.model.modules():
            for store in (mod._parameters, mod._buffers):
                for name, p in list(store.items()):
                    if p is not None:
                        c = p.detach().clone()
                        store[name] = torch.nn.Parameter(c, requires_grad=False) if store is mod._parameters else c
    return model


def _setup():
    M, model, pos, latent, noise = _model_and_conds()
    return M, _inference_weights(model), pos, latent, noise


def guided_model(model, chunk_budget=None, layers=None):
    from attention_control.attention.dit_layers import DitLayerSelector
    from attention_control.attention.dit_layout import DEFAULT_DIT_LAYERS, DitLayoutController
    from attention_control.attention.layout import Box, LayoutObject
    from attention_control.attention.router import attach
    ctrl = DitLayoutController([LayoutObject(Box("x", 0.0, 0.0, 0.5, 1.0), TOKENS)], CTX,
                               DitLayerSelector.parse(layers or DEFAULT_DIT_LAYERS), mode="backward", strength=30.0,
                               iterations=1, threshold=0.0, guided_fraction=1.0, **(
                                   {} if chunk_budget is None else {"chunk_budget": chunk_budget}))
    return attach(model, ctrl), ctrl


def _sample(M, model, pos, latent, noise, steps):
    return M.sample(model, noise, pos, pos, latent, steps=steps, cfg=1.0)


def time_case(backend: str, steps: int, pairs: int) -> dict:
    impl = common.setup(backend)
    M, model, pos, latent, noise = _setup()
    gm, ctrl = guided_model(model)
    res = common.interleaved_ratio(lambda: _sample(M, model, pos, latent, noise, steps),
                                   lambda: _sample(M, gm, pos, latent, noise, steps), pairs=pairs)
    res["attention"] = impl
    res["iterations"] = sum(len(it) for _, it in ctrl.last_energy_log)
    return res


def mem_case(backend: str, steps: int, which: str) -> dict:
    common.setup(backend)
    common.pin_threads()
    M, model, pos, latent, noise = _setup()
    gm, ctrl = guided_model(model, **VARIANTS.get(which, {}))
    m = model if which == "plain" else gm
    _sample(M, model, pos, latent, noise, 1)           # load and warm the allocator on the same shapes
    base = common.reset_peak()
    _sample(M, m, pos, latent, noise, steps)
    res = {"extra_mb": (common.peak_kb() - base) / 1024.0}
    if which != "plain":
        res["iterations"] = sum(len(it) for _, it in ctrl.last_energy_log)
        res["chunk_budget"] = ctrl.chunk_budget
    return res


def collect(quick: bool = False) -> dict:
    steps = 4
    out = {}
    env = common.MEM_ENV
    reps = 1 if quick else 2
    for backend in common.BACKENDS:
        t = common.run_child("bench.dit_layout", "time", backend, str(steps), "2" if quick else str(common.PAIRS))
        runs = {w: [common.run_child("bench.dit_layout", "mem", backend, "1", w, env_extra=env) for _ in range(reps)]
                for w in ("plain", "guided", "guided_double")}
        assert all(r["iterations"] == 1 for w in VARIANTS for r in runs[w]), runs
        mem = {w: min(r["extra_mb"] for r in rs) for w, rs in runs.items()}
        settings = (f"{DIT_CTX}, inference-tensor weights, one box (left half) for tokens "
                    f"{TOKENS[0]}-{TOKENS[-1]}, all blocks, strength 30, cfg 1, attention={t['attention']}")
        out[f"dit_layout_iter_mem_ratio[{backend}]"] = {
            "value": round(mem["guided"] / max(mem["plain"], 1e-6), 4), "target": 2.5, "unit": "x",
            "settings": settings + f", 1-step run with one backward-guidance iteration vs 1-step plain run: extra "
                                   f"peak RSS above the loaded model {mem['guided']:.1f} MB / {mem['plain']:.1f} MB, "
                                   f"fresh processes, min of {reps}, {env}"}
        out[f"dit_layout_iter_mem_ratio_double[{backend}]"] = {
            "value": round(mem["guided_double"] / max(mem["plain"], 1e-6), 4), "target": None, "unit": "x",
            "settings": settings + f", as dit_layout_iter_mem_ratio guiding the double blocks only (the guidance "
                                   f"forward stops after the last one): {mem['guided_double']:.1f} MB"}
        out[f"dit_layout_step_time_ratio[{backend}]"] = common.time_figure(
            t, None, settings + f", {steps} euler steps each guided by one iteration ({t['iterations']} done) vs "
                                f"{steps} plain steps: a guided step over a plain one, CPU time")
    return common.add_worst(out, ["dit_layout_iter_mem_ratio", "dit_layout_iter_mem_ratio_double",
                                  "dit_layout_step_time_ratio"])


if __name__ == "__main__":
    child_main(time_case, mem_case, "guided")
