"""Expert denoisers (AttnCtl_ExpertDenoisers): each step reaches the expert its sigma names, identical experts =
the single model bit for bit (first- and multistep samplers), each expert keeps its own patches, nothing left
on the models, named errors."""
import pytest
import torch

import ac_models as M
from attention_control.attention.core import AttentionControlError
from attention_control.nodes.experts import experts_model
from attention_control.nodes.experts import ExpertDenoisers


def _res(out):
    return out.result if hasattr(out, "result") else out


@pytest.fixture(scope="module")
def other():
    return M.tiny_sd15(seed=2)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "uni_pc"])
def test_identical_experts_are_the_single_model_bit_for_bit(sd15, sampler):
    pos, neg, lat = M.cond(), M.cond(seed=1), M.latent(2, 16, 16)
    plain = M.ksample(sd15, pos, neg, lat, steps=6, sampler=sampler)
    m, sw = experts_model(sd15, [sd15.clone()], [0.5])
    assert torch.equal(M.ksample(m, pos, neg, lat, steps=6, sampler=sampler), plain)
    assert {k for k, _s in sw.calls} == {0, 1}
    assert torch.equal(M.ksample(sd15, pos, neg, lat, steps=6, sampler=sampler), plain)     # nothing left behind


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_each_step_reaches_the_expert_its_sigma_names(sd15, other, sampler):
    pos, neg, lat = M.cond(), M.cond(seed=1), M.latent(1, 16, 16)
    m, sw = experts_model(sd15, [other], [0.4])
    out = M.ksample(m, pos, neg, lat, steps=8, sampler=sampler)
    bound = float(sd15.model.model_sampling.percent_to_sigma(0.4))
    assert sw.calls and all(k == (1 if s <= bound else 0) for k, s in sw.calls), sw.calls
    assert {k for k, _s in sw.calls} == {0, 1}
    a = M.ksample(sd15, pos, neg, lat, steps=8, sampler=sampler)
    b = M.ksample(other, pos, neg, lat, steps=8, sampler=sampler)
    assert torch.isfinite(out).all() and not torch.equal(out, a) and not torch.equal(out, b)
    # the same steps run through the experts one after the other in two runs (KSamplerAdvanced's way):
    # with euler, identical to splitting the schedule by hand at the first step at or below the bound
    if sampler == "euler":
        import nodes
        n_first = sum(1 for k, _s in sw.calls if k == 0)
        first = nodes.common_ksampler(sd15, 0, 8, 5.0, "euler", "normal", pos, neg, lat, start_step=0,
                                      last_step=n_first, force_full_denoise=False)[0]
        second = nodes.common_ksampler(other, 0, 8, 5.0, "euler", "normal", pos, neg, first, disable_noise=True,
                                       start_step=n_first, last_step=8, force_full_denoise=True)[0]
        torch.testing.assert_close(out, second["samples"], rtol=1e-5, atol=1e-5)


def test_each_expert_keeps_its_own_patches(sd15, other):
    """Capture Attention on the second expert fills its maps from that expert's steps only; FreeU on the first
    changes only the first expert's steps."""
    from attention_control.nodes.capture import CaptureAttention
    import comfy_extras.nodes_freelunch as fl
    clip = M.random_clip_l()
    pos = M.encode(clip, "a red circle") if hasattr(M, "encode") else \
        clip.encode_from_tokens_scheduled(clip.tokenize("a red circle"))
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    lat = M.latent(1, 16, 16)
    cap, handle = _res(CaptureAttention.execute(other, clip, "a red circle", "circle", "all", 0.0, 1.0, False))
    m, sw = experts_model(sd15, [cap], [0.5])
    M.ksample(m, pos, neg, lat, steps=6)
    n_second = sum(1 for k, _s in sw.calls if k == 1)
    assert handle.maps is not None and float(handle.maps.abs().sum()) > 0 and n_second > 0
    free = fl.FreeU_V2().patch(sd15, 1.3, 1.4, 0.9, 0.2)[0]
    base, _ = experts_model(sd15, [other], [0.5])
    freed, _ = experts_model(free, [other], [0.5])
    assert not torch.equal(M.ksample(base, pos, neg, lat, steps=6), M.ksample(freed, pos, neg, lat, steps=6))


def test_named_errors(sd15, sdxl):
    with pytest.raises(AttentionControlError, match="model_2: a SDXL model"):
        experts_model(sd15, [sdxl], [0.5])
    with pytest.raises(AttentionControlError, match="switch: expert 2 starts at 1"):
        experts_model(sd15, [sd15.clone()], [1.0])
    from attention_control.nodes.layout import Boxes, LayoutGuidance
    clip = M.random_clip_l()
    bx = _res(Boxes.execute("circle: 0,0,0.5,0.5", "fraction", 64, 64))[0]
    guided, _pos = _res(LayoutGuidance.execute(sd15, clip, "a red circle", bx, "backward", 30.0, 1, 0.0, 0.5, 0.5,
                                               "auto", "none"))
    with pytest.raises(AttentionControlError, match="model_2: this expert carries whole-step wrappers"):
        experts_model(sd15, [guided], [0.5])
    experts_model(guided, [sd15.clone()], [0.5])          # on the first expert it is fine
    assert "switch" in ExpertDenoisers.validate_inputs(switch=float("nan"))
    assert ExpertDenoisers.validate_inputs(switch=0.5) is True
