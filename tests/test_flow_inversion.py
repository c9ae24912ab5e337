"""Rectified-flow inversion (plain and RF-Inversion's controlled form) through ComfyUI's sampler
machinery on tiny Flux / SD3 / Wan models, and source replay of its trajectory on a DiT."""
import pytest
import torch

import comfy.sample
import comfy_extras.nodes_custom_sampler as cs
from ac_dit import SAMPLE_CONDS, TXT, tiny
from attention_control.attention.core import AttentionControlError
from attention_control.attention.flow_inversion_glue import flow_invert
from attention_control.nodes.inversion import (DDIMInversion, FlowInversion, NullTextInversion, ReplaySource,
                                              RFInversionGuidance)
from attention_control.samplers.flow_inversion import controlled_denoised, flow_inversion_sampler, step_gammas

FAMS = ("Flux", "SD3", "Wan")


def _res(out):
    return out.result if hasattr(out, "result") else out


def _pos(family, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, TXT, 32, generator=g), SAMPLE_CONDS[family](g)]]


def _image(family, seed=3):
    """A smooth-ish 'image' latent of the family's shape (4-D, or Wan's 5-D video latent)."""
    shape = tiny(family).x.shape
    g = torch.Generator().manual_seed(seed)
    flat = torch.randn(shape[0] * shape[1] * (shape[2] if len(shape) == 5 else 1), 1, 2 * shape[-2],
                       2 * shape[-1], generator=g)
    return {"samples": torch.nn.functional.avg_pool2d(flat, 2).view(shape)}


def _sample_back(model, pos, inv, noise, steps, scheduler="simple", cfg=1.0, neg=None, callback=None):
    """ComfyUI's sampling from the inverted noise (as SamplerCustomAdvanced does with the noise output)."""
    with torch.inference_mode():
        return comfy.sample.sample(model, noise.generate_noise(inv), steps, cfg, "euler", scheduler, pos,
                                   neg if neg is not None else pos, inv["samples"], callback=callback,
                                   disable_pbar=True, seed=0)


@pytest.mark.parametrize("family", FAMS)
def test_inversion_reconstructs_and_tightens_with_steps(family):
    t, pos, lat = tiny(family), _pos(family), _image(family)
    x0 = lat["samples"]
    errs = {}
    for steps in (4, 16):
        inv, traj, noise = _res(FlowInversion.execute(t.patcher, pos, lat, steps, "simple", 0.0, 0))
        assert len(traj.latents) == steps + 1 and traj.sigmas[0] == 0.0 and traj.sigmas[-1] == 1.0
        assert torch.allclose(traj.latents[0], t.patcher.model.process_latent_in(x0), atol=1e-6)   # model space
        assert torch.equal(noise.generate_noise(inv), traj.latents[-1])
        rec = _sample_back(t.patcher, pos, inv, noise, steps)
        errs[steps] = float((rec - x0).norm() / x0.norm())
    # first order: 4x the steps cuts the error 3-4x. Measured on the random tiny models (relative to the
    # latent's norm): Flux 1.53 -> 0.50, SD3 0.135 -> 0.036, Wan 0.92 -> 0.33; sampling from the seed's
    # noise instead of the inverted one is off by more than the latent's norm
    bound = {"Flux": 0.65, "SD3": 0.06, "Wan": 0.45}[family]
    assert errs[16] < bound and errs[16] < 0.45 * errs[4], errs


def test_sampler_custom_advanced_with_the_noise_output_reconstructs():
    """The documented wiring; and why a LATENT alone with the noise off cannot work on a flow model."""
    t, pos, lat = tiny("SD3"), _pos("SD3"), _image("SD3")
    steps = 8
    inv, traj, noise = _res(FlowInversion.execute(t.patcher, pos, lat, steps, "simple", 0.0, 0))
    guider = _res(cs.CFGGuider.execute(t.patcher, pos, pos, 1.0))[0]
    sampler = _res(cs.KSamplerSelect.execute("euler"))[0]
    sigmas = _res(cs.BasicScheduler.execute(t.patcher, "simple", steps, 1.0))[0]
    with torch.inference_mode():
        out = _res(cs.SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, inv))[0]["samples"]
    ref = _sample_back(t.patcher, pos, inv, noise, steps)
    assert torch.allclose(out, ref, atol=1e-5)
    assert float((out - lat["samples"]).norm() / lat["samples"].norm()) < 0.1          # measured 0.066
    ms = t.patcher.get_model_object("model_sampling")
    start = ms.noise_scaling(sigmas[:1], torch.zeros_like(inv["samples"]), inv["samples"])
    assert float(sigmas[0]) == 1.0 and not start.any()          # add_noise off: CONST starts from zeros


@pytest.mark.parametrize("family", ("Flux", "SD3"))
def test_gamma_zero_is_the_plain_inversion_and_gamma_one_lands_on_y1(family):
    t, pos, lat = tiny(family), _pos(family), _image(family)
    steps = 6
    plain, traj, _ = flow_invert(t.patcher, pos, lat, steps, "simple")
    g0, traj0, _ = _res(FlowInversion.execute(t.patcher, pos, lat, steps, "simple", 0.0, 123))
    assert torch.equal(g0["samples"], plain["samples"])
    assert all(torch.equal(a, b) for a, b in zip(traj.latents, traj0.latents))
    # the controlled steps from step 3 on: steps before are the plain ones, bit for bit
    _, traj_c, _ = flow_invert(t.patcher, pos, lat, steps, "simple", 0.5, 7, gamma_steps=(3, None))
    assert all(torch.equal(a, b) for a, b in zip(traj.latents[:4], traj_c.latents[:4]))
    assert not torch.equal(traj.latents[4], traj_c.latents[4])
    # gamma 1 on every step: (y1 - x) shrinks by (1 - s_{k+1}) / (1 - s_k) per step, 0 at sigma 1
    inv1, traj1, noise1 = _res(FlowInversion.execute(t.patcher, pos, lat, steps, "simple", 1.0, 7))
    y1 = comfy.sample.prepare_noise(lat["samples"], 7)
    assert float((traj1.latents[-1] - y1).abs().max()) < 1e-5
    # gamma 0.5 lies between: closer to y1 than the plain inversion
    _, traj_h, _ = _res(FlowInversion.execute(t.patcher, pos, lat, steps, "simple", 0.5, 7))
    assert (traj_h.latents[-1] - y1).norm() < 0.75 * (traj.latents[-1] - y1).norm()


def test_sampler_function_equals_a_float64_euler_loop():
    """The sampler function on a toy velocity field (a denoiser D = x - sigma v) vs the formula."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(6, 6, generator=g, dtype=torch.float64) * 0.4
    b = torch.randn(6, generator=g, dtype=torch.float64)

    def vel(x, s):
        return torch.tanh(x @ A) * (1.0 + s) + b

    def model(x, sigma):
        s = sigma.view(-1, 1)
        return x - s * vel(x, s)

    x0 = torch.randn(2, 6, generator=g, dtype=torch.float64)
    y1 = torch.randn(2, 6, generator=g, dtype=torch.float64)
    sigmas = torch.tensor([1.0, 0.8, 0.55, 0.3, 0.1, 0.0], dtype=torch.float64)
    asc = sigmas.flip(0).tolist()
    for gammas in ([0.0] * 5, step_gammas(0.6, 5, 1, 4), [1.0] * 5):
        record = []
        out = flow_inversion_sampler(record, gammas, y1)(model, x0.clone(), sigmas)
        x, ref = x0.clone(), [x0.clone()]
        for k in range(5):
            lo, hi = asc[k], asc[k + 1]
            u = vel(x, hi)                                           # v at the next level, current latent
            u = u + gammas[k] * ((y1 - x) / (1.0 - lo) - u)          # RF-Inversion's controlled field
            x = x + (hi - lo) * u
            ref.append(x)
        assert torch.allclose(out, x, rtol=0, atol=1e-12)
        assert [s for s, _ in record] == asc
        assert all(torch.allclose(r, e, rtol=0, atol=1e-12) for (_, r), e in zip(record, ref))
    assert torch.allclose(out, y1, atol=1e-12)                          # gamma 1 everywhere: exactly y1
    assert step_gammas(0.6, 5, 1, 4) == [0.0, 0.6, 0.6, 0.6, 0.0]


def test_controlled_reverse_step_is_the_papers_field():
    """Euler on D + eta (y0 - D) is the paper's controlled reverse step in its time t = 1 - sigma:
    X + (t' - t) [v_t + eta ((y0 - X) / (1 - t) - v_t)], with v_t = dX/dt = -(x - D) / sigma."""
    g = torch.Generator().manual_seed(1)
    x, den, y0 = (torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(3))
    for s, s_next in ((1.0, 0.8), (0.5, 0.3), (0.2, 0.0)):
        for eta in (0.0, 0.3, 0.9, 1.0):
            d2 = controlled_denoised(den, y0, eta)
            euler = x + (s_next - s) * (x - d2) / s
            t, t_next = 1.0 - s, 1.0 - s_next
            v_t = -(x - den) / s
            paper = x + (t_next - t) * (v_t + eta * ((y0 - x) / (1.0 - t) - v_t))
            assert torch.allclose(euler, paper, rtol=0, atol=1e-12)
            if eta == 1.0:
                assert torch.allclose(euler, x + (t_next - t) * (y0 - x) / s, rtol=0, atol=1e-12)


@pytest.mark.parametrize("family", ("Flux", "SD3"))
def test_rf_guidance_reverse_pass(family):
    t, pos, lat = tiny(family), _pos(family), _image(family)
    steps = 8
    x0 = lat["samples"]
    inv, traj, noise = _res(FlowInversion.execute(t.patcher, pos, lat, steps, "simple", 0.5, 3))
    free = _sample_back(t.patcher, pos, inv, noise, steps)
    off = _res(RFInversionGuidance.execute(t.patcher, traj, 0.0, 0, steps))[0]
    assert torch.equal(_sample_back(off, pos, inv, noise, steps), free)              # eta 0: bit for bit
    full = _res(RFInversionGuidance.execute(t.patcher, traj, 1.0, 0, steps))[0]
    assert torch.allclose(_sample_back(full, pos, inv, noise, steps), x0, atol=1e-5)  # eta 1: the image
    part = _res(RFInversionGuidance.execute(t.patcher, traj, 0.9, 0, 2))[0]
    e_free = float((free - x0).norm() / x0.norm())
    e_part = float((_sample_back(part, pos, inv, noise, steps) - x0).norm() / x0.norm())
    # the controlled inversion (gamma 0.5) forgets part of the image; eta 0.9 on the first quarter of
    # the steps brings part of it back (measured on the random tiny Flux: 1.41 vs 1.56 of the latent's
    # norm; such a model has no structure to keep, the bar only checks the direction)
    assert e_part < e_free, (e_part, e_free)


@pytest.mark.parametrize("family", ("Flux", "SD3"))
def test_replay_keeps_the_dit_source_on_the_flow_trajectory(family):
    """A [source, target] batch from the inverted noise at CFG 3: with Replay Source the source row is
    on the trajectory at every step and ends on the image; without it the source drifts."""
    t, lat = tiny(family), _image(family)
    steps = 6
    pos = _pos(family, 0)
    inv, traj, noise = _res(FlowInversion.execute(t.patcher, pos, lat, steps, "simple", 0.0, 0))
    g = torch.Generator().manual_seed(9)
    tgt = [[torch.randn(1, TXT, 32, generator=g), SAMPLE_CONDS[family](g)]]
    pos2 = [[torch.cat([pos[0][0], tgt[0][0]]), {k: (torch.cat([v, tgt[0][1][k]]) if torch.is_tensor(v) else v)
                                                 for k, v in pos[0][1].items()}]]
    neg = _pos(family, 4)
    batch = {"samples": inv["samples"].repeat(2, *([1] * (inv["samples"].ndim - 1)))}
    replay = _res(ReplaySource.execute(t.patcher, traj))[0]
    seen = []
    out = _sample_back(replay, pos2, batch, noise, steps, cfg=3.0, neg=neg,
                       callback=lambda i, den, x, n: seen.append(x[0].clone()))
    assert len(seen) == steps
    for i, x in enumerate(seen):                             # euler's callback: the latent at sigma_i
        ref = traj.latents[steps - i].to(x.dtype)[0]
        assert float((x - ref).abs().max()) < 1e-4 * float(ref.abs().max()) + 1e-5, i
    x0 = lat["samples"][0]
    err = float((out[0] - x0).abs().max())
    assert err < 1e-4 * float(x0.abs().max())
    free = _sample_back(t.patcher, pos2, batch, noise, steps, cfg=3.0, neg=neg)
    assert float((free[0] - x0).abs().max()) > 100 * err
    # no edit controller links the rows here: the replay changes the source row only
    assert torch.equal(out[1], free[1]) and not torch.equal(out[1], out[0])



@pytest.mark.parametrize("family", ("Flux", "SD3"))
def test_p2p_edit_of_an_inverted_image_composes_with_replay_in_either_order(family):
    """Prompt-to-Prompt (DiT router) and Replay Source (a whole-call controller of the UNet router on
    a DiT) on one MODEL, attached in both orders: the same result bit for bit; the source row is the
    image; the target row differs from the target sampled with replay alone (the edit reads the
    replayed source's attention). The size of the edit on real images is
    tests/test_semantic_dit.py's (the tiny random model's attention barely depends on its input)."""
    from attention_control.attention.dit_p2p import DitP2PController
    from attention_control.attention.p2p import TargetEdit, replace_mapper
    from attention_control.attention.router import attach
    t, lat = tiny(family), _image(family)
    steps, pos, neg = 4, _pos(family, 0), _pos(family, 4)
    inv, traj, noise = _res(FlowInversion.execute(t.patcher, pos, lat, steps, "simple", 0.0, 0))
    words = [(i, [i], [i]) for i in range(1, 4)]
    fired = []

    class P2P(DitP2PController):
        def attend(self, call):
            out = super().attend(call)
            fired.append(out is not None)
            return out

    def p2p():
        return P2P([TargetEdit(replace_mapper(words, words, TXT), torch.ones(TXT), torch.ones(TXT))], TXT, 0.0,
                   0.8, 0.4)

    pair = [[torch.cat([pos[0][0]] * 2), {k: (torch.cat([v, v]) if torch.is_tensor(v) else v)
                                          for k, v in pos[0][1].items()}]]
    batch = {"samples": inv["samples"].repeat(2, 1, 1, 1)}
    plain = _sample_back(t.patcher, pair, batch, noise, steps, cfg=3.0, neg=neg)
    first = _res(ReplaySource.execute(attach(t.patcher, p2p()), traj))[0]
    second = attach(_res(ReplaySource.execute(t.patcher, traj))[0], p2p())
    replay = _res(ReplaySource.execute(t.patcher, traj))[0]
    a = _sample_back(first, pair, batch, noise, steps, cfg=3.0, neg=neg)
    assert any(fired)
    b = _sample_back(second, pair, batch, noise, steps, cfg=3.0, neg=neg)
    free = _sample_back(replay, pair, batch, noise, steps, cfg=3.0, neg=neg)
    assert torch.equal(a, b)
    x0 = lat["samples"][0]
    assert float((a[0] - x0).abs().max()) < 1e-4 * float(x0.abs().max())
    assert torch.equal(a[0], free[0]) and not torch.equal(a[1], free[1])
    # the plain model after both runs: nothing leaked
    assert torch.equal(_sample_back(t.patcher, pair, batch, noise, steps, cfg=3.0, neg=neg), plain)

def test_named_errors(sd15):
    import ac_models as M
    t, pos, lat = tiny("Flux"), _pos("Flux"), _image("Flux")
    with pytest.raises(AttentionControlError, match=r"^model: Flow Inversion integrates a rectified-flow ODE.*"
                                                    r"use DDIM Inversion"):
        FlowInversion.execute(sd15, M.cond(1, seed=1), {"samples": torch.zeros(1, 4, 16, 16)}, 4, "normal", 0.0, 0)
    with pytest.raises(AttentionControlError, match=r"^model: DDIM Inversion .*rectified flow.*"
                                                    r"use Flow Inversion \(rectified flow\)"):
        DDIMInversion.execute(t.patcher, pos, lat, 4, "simple")
    with pytest.raises(AttentionControlError, match=r"^model: Null-text Inversion .*use Flow Inversion"):
        NullTextInversion.execute(t.patcher, pos, _pos("Flux", 1), lat, 4, "simple", 5.0, 2)
    with pytest.raises(AttentionControlError, match=r"^latent: Flow Inversion takes one image \(batch 1\)"):
        FlowInversion.execute(t.patcher, pos, {"samples": lat["samples"].repeat(2, 1, 1, 1)}, 4, "simple", 0.0, 0)
    bad = {"samples": lat["samples"].clone()}
    bad["samples"][0, 0, 0, 0] = float("nan")
    with pytest.raises(AttentionControlError, match=r"^latent: "):
        FlowInversion.execute(t.patcher, pos, bad, 4, "simple", 0.0, 0)
    with pytest.raises(AttentionControlError, match=r"^gamma: "):
        FlowInversion.execute(t.patcher, pos, lat, 4, "simple", 1.5, 0)
    assert FlowInversion.validate_inputs(gamma=float("nan")).startswith("gamma: ")
    _, traj, noise = _res(FlowInversion.execute(t.patcher, pos, lat, 2, "simple", 0.0, 0))
    with pytest.raises(AttentionControlError, match=r"^model: RF-Inversion guidance acts on a rectified-flow model"):
        RFInversionGuidance.execute(sd15, traj, 0.9, 0, 2)
    with pytest.raises(AttentionControlError, match=r"^stop_step: 1 is before start_step 2"):
        RFInversionGuidance.execute(t.patcher, traj, 0.9, 2, 1)
    assert RFInversionGuidance.validate_inputs(eta=2.0).startswith("eta: ")
    guided = _res(RFInversionGuidance.execute(t.patcher, traj, 0.9, 0, 2))[0]
    small = {"samples": torch.zeros(1, 16, 8, 8)}
    with pytest.raises(AttentionControlError, match=r"^trajectory: the inversion latent is \(16, 16\)"):
        with torch.inference_mode():
            comfy.sample.sample(guided, torch.zeros(1, 16, 8, 8), 2, 1.0, "euler", "simple", pos, pos,
                                small["samples"], disable_pbar=True, seed=0)
    with pytest.raises(AttentionControlError, match=r"^noise: the inverted noise is .* sample the inverted latent"):
        noise.generate_noise({"samples": torch.zeros(1, 16, 8, 8)})
    assert noise.generate_noise({"samples": torch.zeros(3, 16, 16, 16)}).shape == (3, 16, 16, 16)
