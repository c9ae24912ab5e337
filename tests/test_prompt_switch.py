"""eDiff-I prompt switching (AttnCtl_PromptSwitch): the schedule text, named errors, each model call of a run
sees exactly the prompt its range names (any sampler, multistep ones included), equal prompts = one prompt bit
for bit, and the pack's attention nodes on the switched conditioning."""
import pytest
import torch

import ac_models as M
from attention_control.attention.core import AttentionControlError
from attention_control.nodes import prompt_switch as PS


def _res(out):
    return out.result if hasattr(out, "result") else out


def test_parse_schedule():
    assert PS.parse_schedule("0.0-0.4: a castle\n\n0.4 - 1: a castle made of candy") == [
        (0.0, 0.4, "a castle"), (0.4, 1.0, "a castle made of candy")]
    assert PS.parse_schedule("0.5-1.0: b\n0-0.5: a: with a colon") == [(0.0, 0.5, "a: with a colon"), (0.5, 1.0, "b")]
    assert PS.parse_schedule("0-1:") == [(0.0, 1.0, "")]                  # an empty prompt is a prompt
    bad = {
        "a castle": "schedule: line 1 \\('a castle'\\) is not 'start-end: prompt'",
        "0-0.4: a\n0.5-1: b": "schedule: a gap at 0.4-0.5",
        "0-0.6: a\n0.4-1: b": "schedule: an overlap at 0.4-0.6",
        "0-0.4: a": "schedule: the last range ends at 0.4",
        "0.2-1: a": "schedule: a gap at 0-0.2",
        "0-nan: a": "schedule: line 1: 'nan' is not a fraction",
        "0-1.5: a": "schedule: line 1: '1.5' is not a fraction",
        "0.6-0.2: a": "schedule: line 1: the range 0.6-0.2 is empty",
        "": "schedule: no prompt lines",
    }
    for text, msg in bad.items():
        with pytest.raises(AttentionControlError, match=msg):
            PS.parse_schedule(text)
        assert PS.PromptSwitch.validate_inputs(schedule=text).startswith("schedule:")
    assert PS.PromptSwitch.validate_inputs(schedule=PS.EXAMPLE) is True
    assert PS.PromptSwitch.validate_inputs(schedule=None) is True        # a linked input


class _Spy:
    """A unet function wrapper that records, per model call, the sigma and the cond rows' context."""

    def __init__(self):
        self.calls = []

    def __call__(self, apply, args):
        c = args["c"]["c_crossattn"]
        rows = [i for i, k in enumerate(args["cond_or_uncond"]) if k == 0]
        b = c.shape[0] // len(args["cond_or_uncond"])
        for j in rows:
            self.calls.append((float(args["timestep"][0]), c[j * b:(j + 1) * b].clone()))
        return apply(args["input"], args["timestep"], **args["c"])


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "uni_pc"])
def test_each_call_sees_the_prompt_its_range_names(sd15, clip_l, sampler):
    text = "0.0-0.3: a red circle\n0.3-0.7: a blue square\n0.7-1.0: a green triangle"
    cond = _res(PS.PromptSwitch.execute(clip_l, text))[0]
    eps = PS.BOUNDARY_EPS
    assert [(c[1]["start_percent"], c[1]["end_percent"]) for c in cond] == [(0.0, 0.3 - eps), (0.3, 0.7 - eps),
                                                                             (0.7, 1.0)]
    want = [PS.encode(clip_l, p)[0][0] for p in ("a red circle", "a blue square", "a green triangle")]
    m = sd15.clone()
    spy = _Spy()
    m.set_model_unet_function_wrapper(spy)
    M.ksample(m, cond, PS.encode(clip_l, ""), M.latent(1, 16, 16), steps=10, sampler=sampler)
    ms = sd15.model.model_sampling
    bounds = [float(ms.percent_to_sigma(p)) for p in (0.3, 0.7)]
    assert len(spy.calls) >= 10
    if sampler == "uni_pc":      # it evaluates the model exactly on the 0.3 boundary: the later prompt's step
        assert any(s == bounds[0] for s, _c in spy.calls)
    seen = set()
    for sigma, ctx in spy.calls:
        k = 0 if sigma > bounds[0] else (1 if sigma > bounds[1] else 2)
        assert ctx.shape == want[k].shape and torch.equal(ctx, want[k]), (sigma, k)
        seen.add(k)
    assert seen == {0, 1, 2}


def test_one_range_equals_the_plain_prompt_bit_for_bit(sd15, clip_l):
    pos, neg, lat = PS.encode(clip_l, "a red circle"), PS.encode(clip_l, ""), M.latent(2, 16, 16)
    plain = M.ksample(sd15, pos, neg, lat, steps=4)
    one = _res(PS.PromptSwitch.execute(clip_l, "0-1: a red circle"))[0]
    same = _res(PS.PromptSwitch.execute(clip_l, "0-0.5: a red circle\n0.5-1: a red circle"))[0]
    assert torch.equal(M.ksample(sd15, one, neg, lat, steps=4), plain)
    assert torch.equal(M.ksample(sd15, same, neg, lat, steps=4), plain)
    switched = _res(PS.PromptSwitch.execute(clip_l, "0-0.5: a red circle\n0.5-1: a blue square"))[0]
    assert not torch.equal(M.ksample(sd15, switched, neg, lat, steps=4), plain)


def test_the_packs_attention_nodes_take_the_switched_conditioning(sd15, clip_l):
    """Capture Attention on the first prompt's words fills its maps from a switched run (every entry has the
    prompt length the node checks)."""
    from attention_control.nodes.capture import CaptureAttention
    cond = _res(PS.PromptSwitch.execute(clip_l, "0-0.4: a red circle\n0.4-1: a blue circle"))[0]
    m, handle = _res(CaptureAttention.execute(sd15, clip_l, "a red circle", "circle", "all", 0.0, 1.0, False))
    M.ksample(m, cond, PS.encode(clip_l, ""), M.latent(1, 16, 16), steps=4)
    assert handle.runs == 1 and handle.maps is not None and torch.isfinite(handle.maps).all()
    assert float(handle.maps.abs().sum()) > 0


def test_no_clip_is_a_named_error():
    with pytest.raises(AttentionControlError, match="clip: connect a text encoder"):
        PS.PromptSwitch.execute(None, PS.EXAMPLE)
