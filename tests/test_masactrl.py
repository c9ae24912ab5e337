"""MasaCtrl: off beyond the last step, exactly the selected layers and steps read the source K/V,
source untouched, masks, union, errors, SDXL."""
import pytest
import torch

import ac_models as M
from attention_control.attention import core
from attention_control.attention.core import AttentionControlError
from attention_control.attention.masactrl import MaskSpec, MasaCtrlController, default_start_layer
from attention_control.attention.router import attach, get_router
from attention_control.nodes.masactrl import MasaCtrl

SRC, TGT = "a red circle on the left", "a red circle on the right"


def _res(out):
    return out.result if hasattr(out, "result") else out


def node(model, clip, start=1.0, layer=-1, mode="mutual", sw="", tw="", thr=0.1, sm=None, tm=None, targets=TGT):
    return _res(MasaCtrl.execute(model, clip, M.latent(1, 16, 16), SRC, targets, "", start, layer, mode, sw, tw, thr,
                                 sm, tm))


class Spy(core.Controller):
    """Records, for every self-attention call it sees, whether the target rows carry the source K/V."""
    name = "spy"
    kinds = frozenset({"self"})

    def __init__(self):
        self.seen = []

    def attend(self, q, k, v, call, nxt):
        B = call.batch
        same = all(torch.equal(k[j * B + 1], k[j * B]) and torch.equal(v[j * B + 1], v[j * B])
                   for j in range(len(call.cond_or_uncond)))
        self.seen.append((call.step, call.site.order, same))
        return nxt(q, k, v)


@pytest.fixture(scope="module")
def plain(sd15, clip_l):
    m, pos, neg, lat = node(sd15, clip_l, start=10_000)
    return pos, neg, lat, M.ksample(sd15, pos, neg, lat, steps=4)


def test_start_at_or_beyond_last_step_is_an_error_at_sampling_start(sd15, clip_l, plain):
    """Issue 15: a start step the run never reaches used to be a silent no-op (bit-identical output)."""
    pos, neg, lat, ref = plain
    m, *_ = node(sd15, clip_l, start=4)          # 4 steps: S = 4 is after the last step
    with pytest.raises(AttentionControlError, match="start_step: 4 starts at step 4, but this run has 4 sampling"):
        M.ksample(m, pos, neg, lat, steps=4)
    m, *_ = node(sd15, clip_l, start=3)          # the last step: acts, source item untouched
    out = M.ksample(m, pos, neg, lat, steps=4)
    assert torch.equal(out[:1], ref[:1]) and not torch.equal(out, ref)


def test_exactly_the_selected_layers_and_steps_use_source_kv(sd15, clip_l, plain):
    pos, neg, lat, _ = plain
    lat = dict(lat, batch_index=[0, 1])       # different noise: target rows differ from the first block on
    ref = M.ksample(sd15, pos, neg, lat, steps=4)
    spy = Spy()
    spied = attach(sd15, spy)
    ctrl = MasaCtrlController(start_step=2, start_layer=4)
    m = attach(spied, ctrl)
    out = M.ksample(m, pos, neg, lat, steps=4)
    assert not torch.equal(out, ref)
    orders = sorted({o for _, o, _ in spy.seen})
    assert len(orders) == 10                        # tiny SD1.5: 10 transformer blocks
    for step, order, same in spy.seen:
        assert same == (step >= 2 and order >= 4), (step, order)
    hits = sum(1 for *_, same in spy.seen if same)
    assert hits == 2 * 6                            # steps 2, 3 x blocks 4..9 (one batched call each)
    # the source item is untouched
    assert torch.equal(out[0], ref[0])


def test_fraction_start_and_auto_layer(sd15, clip_l):
    sites = get_router(attach(sd15, MasaCtrlController())).sites
    assert default_start_layer(sites) == 6          # tiny SD1.5: the decoder's two finest levels start at block 6
    m, *_ = node(sd15, clip_l, start=0.5)
    ctrl = get_router(m).controllers[-1]
    assert ctrl.start_step == 0.5 and ctrl._layer == 6


def test_all_ones_mask_equals_unmasked(sd15, clip_l, plain):
    pos, neg, lat, _ = plain
    m0, *_ = node(sd15, clip_l, start=1)
    ones = torch.ones(1, 16, 16)
    m1, *_ = node(sd15, clip_l, start=1, sm=ones, tm=ones)
    assert torch.equal(M.ksample(m0, pos, neg, lat, steps=4), M.ksample(m1, pos, neg, lat, steps=4))


def test_masks_change_the_edit_and_word_masks_run(sd15, clip_l, plain):
    pos, neg, lat, _ = plain
    m0, *_ = node(sd15, clip_l, start=1)
    half = torch.zeros(1, 128, 128)
    half[:, :, :64] = 1
    m1, *_ = node(sd15, clip_l, start=1, sm=half)
    a, b = M.ksample(m0, pos, neg, lat, steps=4), M.ksample(m1, pos, neg, lat, steps=4)
    assert not torch.equal(a, b) and torch.equal(a[0], b[0])
    m2, *_ = node(sd15, clip_l, start=1, sw="circle")
    c = M.ksample(m2, pos, neg, lat, steps=4)
    ctrl = get_router(m2).controllers[-1]
    assert ctrl.last_masks is not None and ctrl.last_masks.shape[0] == 2
    assert torch.isfinite(c).all() and torch.equal(c[0], a[0])


def test_union_mode(sd15, clip_l, plain):
    pos, neg, lat, ref = plain
    mu, *_ = node(sd15, clip_l, start=1)
    un, *_ = node(sd15, clip_l, start=1, mode="union")
    a, b = M.ksample(mu, pos, neg, lat, steps=4), M.ksample(un, pos, neg, lat, steps=4)
    assert not torch.equal(a[1], b[1]) and not torch.equal(b[1], ref[1]) and torch.equal(b[0], ref[0])


def test_errors(sd15, clip_l, plain):
    pos, neg, _, _ = plain
    m, *_ = node(sd15, clip_l)
    with pytest.raises(AttentionControlError, match="latent: MasaCtrl needs a batch of the source"):
        M.ksample(m, [[pos[0][0][:1], {}]], [[neg[0][0][:1], {}]], M.latent(1, 16, 16), steps=2)
    with pytest.raises(AttentionControlError, match="start_layer: 50 but this model has 10"):
        node(sd15, clip_l, layer=50)
    with pytest.raises(AttentionControlError, match="source_mask: the mask covers nothing"):
        node(sd15, clip_l, sm=torch.zeros(1, 8, 8))
    with pytest.raises(AttentionControlError, match="mask_source_word: 'dog' is not in the prompt"):
        node(sd15, clip_l, sw="dog")
    with pytest.raises(AttentionControlError, match="target_prompts"):
        node(sd15, clip_l, targets="")
    with pytest.raises(AttentionControlError, match="union does not combine"):
        MasaCtrlController(mode="union", mask=MaskSpec(masks=torch.ones(2, 4, 4)))


def test_sdxl_shaped_model(sdxl):
    m = attach(sdxl, MasaCtrlController(start_step=1))
    pos = M.cond(2, seed=1, dim=2048, pooled=1280)
    neg = M.cond(2, seed=2, dim=2048, pooled=1280)
    lat = {"samples": torch.zeros(2, 4, 16, 16), "batch_index": [0, 0]}
    ref = M.ksample(sdxl, pos, neg, lat, steps=3)
    out = M.ksample(m, pos, neg, lat, steps=3)
    assert torch.equal(out[0], ref[0]) and not torch.equal(out[1], ref[1])


def test_user_masks_are_resized_as_the_reference():
    """Nearest-neighbour sampling (the reference's F.interpolate default), not bilinear + threshold.
    Hand case: an 8-wide mask with columns 1-2 painted, at a 4-wide layer: nearest samples columns
    0, 2, 4, 6 -> output column 1 is foreground; bilinear averages (0,1) and (2,3) -> 0.5 -> nothing."""
    from attention_control.attention.masactrl import resize_user_mask
    m = torch.zeros(1, 8, 8)
    m[:, :, 1:3] = 1
    out = resize_user_mask(m, 4, 4)
    want = torch.zeros(1, 4, 4)
    want[:, :, 1] = 1
    assert torch.equal(out, want)
    soft = torch.full((1, 4, 4), 0.6)
    assert torch.equal(resize_user_mask(soft, 2, 2), torch.ones(1, 2, 2))
