"""Node: AttnCtl_PromptSwitch (eDiff-I's prompt switching along the schedule, Balaji et al. 2022).

One prompt per line with the part of the schedule it holds, `0.0-0.4: a castle` / `0.4-1.0: a castle made of
candy`; the node encodes each prompt as core's CLIPTextEncode does and gives it core's timestep range
(ConditioningSetTimestepRange's start_percent / end_percent), all in one CONDITIONING. So the mechanism is the
host's own: every sampler honours it, the ranges are the same fractions as core's (of the model's noise
schedule: 0 is the noisiest end), and the pack's attention nodes see ordinary conditioning entries.

The ranges must follow one another from 0 to 1 without gaps or overlaps: a gap would leave steps with no
prompt (ComfyUI would sample them unconditioned), an overlap would average two prompts, neither what the line
says. A range holds its start and not its end: core's ranges hold both ends, so a step whose noise level falls
exactly on a boundary would average the two prompts, and that happens by construction (the normal scheduler's
10 steps put one exactly at 0.3). Each range but the last therefore ends BOUNDARY_EPS (in fractions) before the
next one starts: the step on the boundary belongs to the later prompt, and the sliver between is below any
step spacing a sampler takes.
"""
from __future__ import annotations

import math
import re

import node_helpers
from comfy_api.latest import io

from ..attention.core import AttentionControlError
from .common import CATEGORY

_LINE = re.compile(r"^\s*([^:]*?)\s*-\s*([^:]*?)\s*:(.*)$")
BOUNDARY_EPS = 1e-6
EXAMPLE = "0.0-0.4: a castle\n0.4-1.0: a castle made of candy"


def parse_schedule(text: str, input_name: str = "schedule") -> list[tuple[float, float, str]]:
    """[(start, end, prompt)] of the lines `a-b: prompt` (blank lines skipped), checked: numbers in [0, 1],
    start < end, the first from 0, each from where the previous ended, the last to 1."""
    out = []
    for n, raw in enumerate((text or "").splitlines(), start=1):
        if not raw.strip():
            continue
        m = _LINE.match(raw)
        if m is None:
            raise AttentionControlError(
                f"{input_name}: line {n} ('{raw.strip()[:60]}') is not 'start-end: prompt'; write each line as "
                f"'0.0-0.4: a castle' (fractions of the schedule, 0 = the noisiest end)")
        nums = []
        for s in (m.group(1), m.group(2)):
            try:
                v = float(s)
            except ValueError:
                v = None
            if v is None or not math.isfinite(v) or not 0.0 <= v <= 1.0:
                raise AttentionControlError(
                    f"{input_name}: line {n}: '{s}' is not a fraction of the schedule; use numbers from 0 to 1")
            nums.append(v)
        a, b = nums
        if a >= b:
            raise AttentionControlError(f"{input_name}: line {n}: the range {a:g}-{b:g} is empty; write the smaller "
                                        f"fraction first")
        out.append((a, b, m.group(3).strip()))
    if not out:
        raise AttentionControlError(f"{input_name}: no prompt lines; write one 'start-end: prompt' per line, e.g. "
                                    f"'{EXAMPLE.splitlines()[0]}'")
    out.sort(key=lambda t: t[0])
    prev = 0.0
    for a, b, _p in out:
        if abs(a - prev) > 1e-9:
            what = "a gap" if a > prev else "an overlap"
            raise AttentionControlError(
                f"{input_name}: {what} at {min(a, prev):g}-{max(a, prev):g}: the ranges must follow one another "
                f"from 0 to 1 (the range after one ending at {prev:g} starts at {prev:g})")
        prev = b
    if abs(prev - 1.0) > 1e-9:
        raise AttentionControlError(f"{input_name}: the last range ends at {prev:g}; the ranges must reach 1 "
                                    f"(the end of the schedule)")
    return out


def encode(clip, prompt: str) -> list:
    """Core's CLIPTextEncode of one prompt."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(prompt))


def schedule_conditioning(clip, text: str) -> list:
    out = []
    for a, b, prompt in parse_schedule(text):
        end = b if b >= 1.0 else b - BOUNDARY_EPS
        out += node_helpers.conditioning_set_values(encode(clip, prompt), {"start_percent": a, "end_percent": end})
    return out


class PromptSwitch(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnCtl_PromptSwitch",
            display_name="Prompt Switching (eDiff-I)",
            category=f"{CATEGORY}/conditioning",
            description="eDiff-I's prompt switching: one prompt per part of the schedule, e.g. the layout from "
                        "'a castle' in the first 40 % (the noisy steps fix the layout) and the content from 'a "
                        "castle made of candy' after. One CONDITIONING built on core's timestep ranges: any "
                        "sampler, and the pack's attention nodes, take it as ordinary conditioning.",
            inputs=[
                io.Clip.Input("clip", tooltip="The text encoder."),
                io.String.Input("schedule", multiline=True, default=EXAMPLE,
                                tooltip="One 'start-end: prompt' per line; fractions of the schedule as in core's "
                                        "ConditioningSetTimestepRange (0 = the noisiest end, 1 = the last step), "
                                        "following one another from 0 to 1."),
            ],
            outputs=[io.Conditioning.Output(display_name="conditioning")],
        )

    @classmethod
    def validate_inputs(cls, schedule=None):
        if schedule is not None:
            try:
                parse_schedule(schedule)
            except AttentionControlError as e:
                return str(e)
        return True

    @classmethod
    def execute(cls, clip, schedule):
        if clip is None:
            raise AttentionControlError("clip: connect a text encoder (the checkpoint's CLIP output)")
        return io.NodeOutput(schedule_conditioning(clip, schedule))


NODES = [PromptSwitch]
