"""DiT layer selection text (attention/dit_layers.py, issue 17): every form on Flux-dev-shaped and
Lumina-shaped block lists, the depth-fraction rule, and the errors that name the input."""
import pytest

from attention_control.attention.core import AttentionControlError
from attention_control.attention.dit_layers import DitLayerSelector, describe_blocks

FLUX_DEV = [("double", i) for i in range(19)] + [("single", i) for i in range(38)]
LUMINA = ([("context_refiner", i) for i in range(2)] + [("noise_refiner", i) for i in range(2)]
          + [("layer", i) for i in range(26)])
WAN_CALLS = [("block", i) for i in range(4) for _ in range(2)]            # self + cross per block


def sel(text, blocks):
    return DitLayerSelector.parse(text).select(blocks)


def test_all_types_and_ranges():
    assert sel("all", FLUX_DEV) == FLUX_DEV
    assert sel("", FLUX_DEV) == FLUX_DEV
    assert sel("double", FLUX_DEV) == FLUX_DEV[:19]
    assert sel("single", FLUX_DEV) == FLUX_DEV[19:]
    assert sel("double:0-9", FLUX_DEV) == [("double", i) for i in range(10)]
    assert sel("single:5", FLUX_DEV) == [("single", 5)]
    assert sel("double:18, single:0-1", FLUX_DEV) == [("double", 18), ("single", 0), ("single", 1)]
    assert sel("refiner", LUMINA) == LUMINA[:4]
    assert sel("noise_refiner:1, layer:25", LUMINA) == [("noise_refiner", 1), ("layer", 25)]
    assert sel("block:1-2", WAN_CALLS) == [("block", 1), ("block", 2)]       # one entry per block


def test_depth_fractions_use_block_centres_and_skip_refiners():
    # 57 main blocks: block k is in [a, b) when (k + 0.5) / 57 is (k = 28 is the centre 0.5: second half)
    half = sel("0.5-1.0", FLUX_DEV)
    assert half == FLUX_DEV[28:]
    assert sel("0.0-0.5", FLUX_DEV) == FLUX_DEV[:28]
    assert len(half) + len(sel("0.0-0.5", FLUX_DEV)) == len(FLUX_DEV)
    # Lumina: 26 main layers, the refiners are outside the depth
    assert sel("0.5-1.0", LUMINA) == [("layer", i) for i in range(13, 26)]
    assert sel("0.0-1.0", LUMINA) == LUMINA[4:]


@pytest.mark.parametrize("text, words", [
    ("doubles", ["'doubles'", "double:0-9"]),
    ("double:a-b", ["whole numbers"]),
    ("double:9-2", ["empty", "smaller index first"]),
    ("triple:0-2", ["unknown block type 'triple'"]),
    ("0.5-1.5", ["0 <= a <= b <= 1"]),
    ("0.8-0.2", ["0 <= a <= b <= 1"]),
    ("nan-0.5", ["'nan-0.5'"]),
])
def test_syntax_errors_name_the_input_and_the_forms(text, words):
    with pytest.raises(AttentionControlError) as e:
        DitLayerSelector.parse(text, "dit_layers")
    msg = str(e.value)
    assert msg.startswith("dit_layers: ")
    for w in words:
        assert w in msg, msg


def test_a_choice_that_matches_nothing_lists_what_the_model_has():
    with pytest.raises(AttentionControlError) as e:
        sel("single", LUMINA)
    msg = str(e.value)
    assert "matches no block" in msg and "context_refiner:0-1, noise_refiner:0-1, layer:0-25" in msg, msg
    with pytest.raises(AttentionControlError) as e:
        sel("double:20-30", FLUX_DEV)
    assert "double:0-18, single:0-37" in str(e.value)


def test_describe_blocks_marks_gaps():
    assert describe_blocks([("double", 0), ("double", 2)]) == "double:0-2 (with gaps)"
    assert describe_blocks([]) == "no attention blocks"


@pytest.mark.parametrize("family", ["Flux", "Lumina2"])
def test_selection_on_a_real_model_schedule(family):
    """The blocks of a tiny real model's call schedule (the router's), selected by text."""
    from test_dit_router import CONFIGS, build
    from attention_control.attention.dit_router import attach_dit, get_dit_router
    key = "Lumina 2" if family == "Lumina2" else family
    m = attach_dit(build(*CONFIGS[key]))
    blocks = [(t, i) for t, i, _stream in get_dit_router(m).schedule]
    if family == "Flux":                       # depth 2 double + 2 single blocks
        assert sel("single", blocks) == [("single", 0), ("single", 1)]
        assert sel("0.5-1.0", blocks) == [("single", 0), ("single", 1)]
    else:                                      # 1 text refiner, 1 image refiner, 2 joint layers
        assert sel("refiner", blocks) == [("context_refiner", 0), ("noise_refiner", 0)]
        assert sel("0.5-1.0", blocks) == [("layer", 1)]
