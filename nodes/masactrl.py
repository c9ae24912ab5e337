"""Nodes: AttnCtl_MasaCtrl."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..attention.core import AttentionControlError
from ..attention.dit_masactrl import DitMasaCtrlController
from ..attention.dit_router import is_dit
from ..attention.masactrl import MaskSpec, MasaCtrlController
from ..attention.router import attach
from ..attention.validate import check_mask
from .common import check_widgets, validation_result
from .p2p import _Prompt, check_edit_latent, edit_batch


def check_masactrl_widgets(values: dict) -> None:
    """The checks that follow from MasaCtrl's widget values alone (validate_inputs)."""
    s = values.get("start_step")
    if s is not None and s >= 1 and float(s) != int(s):
        raise AttentionControlError(f"start_step: {s:g} is neither a step count (a whole number >= 1) nor a fraction "
                                    f"of the steps (< 1); use {int(s)} or {int(s) + 1}")
    tp = values.get("target_prompts")
    if tp is not None and not tp.strip():
        raise AttentionControlError("target_prompts: give one target prompt per line")
    words = (values.get("mask_source_word") or "").strip() or (values.get("mask_target_word") or "").strip()
    if values.get("mode") == "union" and words:
        raise AttentionControlError("mode: union does not combine with mask guidance (mask_source_word / "
                                    "mask_target_word); use mode mutual with masks, or clear the mask words")


class MasaCtrl(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnCtl_MasaCtrl",
            display_name="MasaCtrl (mutual self-attention)",
            category="attention_control/editing",
            description="Consistent subjects and non-rigid edits (Cao et al. 2023): the targets are sampled in one "
                        "batch with the source, from the same noise, and from step S on their decoder "
                        "self-attention reads the source's keys and values. Sample the MODEL with this node's "
                        "positive, negative and latent; item 0 is the source.",
            inputs=[
                io.Model.Input("model", tooltip="Model to edit with (cloned; the input stays unpatched)."),
                io.Clip.Input("clip", tooltip="The CLIP of the model: encodes the prompts, finds the mask words."),
                io.Latent.Input("latent", tooltip="Empty latent, or the inverted latent of a real image (then sample "
                                                  "with add_noise off), batch 1: repeated for source and targets."),
                io.String.Input("source_prompt", multiline=True, default="", tooltip="Prompt of the source image."),
                io.String.Input("target_prompts", multiline=True, default="",
                                tooltip="One target prompt per line (e.g. a new pose or position of the subject)."),
                io.String.Input("negative_prompt", multiline=True, default="", tooltip="Shared negative prompt."),
                io.Float.Input("start_step", default=4.0, min=0.0, max=10000.0, step=0.01, round=0.001,
                               tooltip="Step S from which the control acts: a count (>= 1, paper: 4 of 50) or a "
                                       "fraction of the steps (< 1, e.g. 0.08 = 4 of 50, which follows the "
                                       "sampler's step count). A count at or past the run's steps is an error."),
                io.Int.Input("start_layer", default=-1, min=-1, max=200,
                             tooltip="First transformer block L (blocks counted over the whole UNet in forward "
                                     "order; on DiTs the main blocks in forward order, e.g. Flux double then "
                                     "single). -1 = auto: SD1.x 10 (paper), SDXL 54, DiTs the blocks past 1/3 "
                                     "of the depth (Flux: the single blocks; measured)."),
                io.Combo.Input("mode", options=["mutual", "union"], default="mutual",
                               tooltip="mutual: targets attend to the source's keys/values; union: to the source's "
                                       "and their own."),
                io.String.Input("mask_source_word", default="",
                                tooltip="Mask guidance: the subject's word in the source prompt (empty: no mask "
                                        "guidance unless masks are connected)."),
                io.String.Input("mask_target_word", default="",
                                tooltip="The subject's word in the target prompt(s) (default: the source word)."),
                io.Float.Input("mask_threshold", default=0.1, min=0.0, max=1.0, step=0.01,
                               tooltip="Threshold of the min-max normalised word attention (paper: 0.1)."),
                io.Mask.Input("source_mask", optional=True,
                              tooltip="User mask of the source's subject (instead of word masks)."),
                io.Mask.Input("target_mask", optional=True,
                              tooltip="User mask of the target's subject (default: the source mask)."),
            ],
            outputs=[io.Model.Output(display_name="model"), io.Conditioning.Output(display_name="positive"),
                     io.Conditioning.Output(display_name="negative"), io.Latent.Output(display_name="latent")],
        )

    @classmethod
    def validate_inputs(cls, target_prompts=None, start_step=None, start_layer=None, mode=None, mask_source_word=None,
                        mask_target_word=None, mask_threshold=None):
        return validation_result(cls, locals(), check_masactrl_widgets)

    @classmethod
    def execute(cls, model, clip, latent, source_prompt, target_prompts, negative_prompt, start_step, start_layer,
                mode, mask_source_word, mask_target_word, mask_threshold, source_mask=None, target_mask=None):
        check_widgets(cls, locals())
        check_masactrl_widgets(locals())
        check_edit_latent(latent, "MasaCtrl")
        tgt_texts = [t.strip() for t in target_prompts.splitlines() if t.strip()]
        if not source_prompt.strip():
            raise AttentionControlError("source_prompt: give the prompt of the source image")
        if not tgt_texts:
            raise AttentionControlError("target_prompts: give one target prompt per line")
        dit = is_dit(model)
        if dit and (mask_source_word.strip() or mask_target_word.strip()):
            name = "mask_source_word" if mask_source_word.strip() else "mask_target_word"
            raise AttentionControlError(f"{name}: masks from word maps are not available on DiT models; clear the "
                                        "mask words, or connect source_mask / target_mask")
        mask = None
        if source_mask is not None or target_mask is not None:
            fix = "paint the subject (values > 0.5) or disconnect the mask"
            sm = check_mask("source_mask", source_mask, single=True, nonempty=True, threshold=0.5, fix_empty=fix)
            tm = check_mask("target_mask", target_mask, single=True, nonempty=True, threshold=0.5, fix_empty=fix)
            sm = sm if sm is not None else tm
            tm = tm if tm is not None else sm
            if sm.shape != tm.shape:
                tm = torch.nn.functional.interpolate(tm[None].float(), size=sm.shape[-2:], mode="bilinear")[0]
                if float(tm.max()) <= 0.5:
                    raise AttentionControlError(
                        f"target_mask: resized to the source mask's {sm.shape[-2]}x{sm.shape[-1]} it covers nothing; "
                        "give both masks at the same size")
            mask = MaskSpec(masks=torch.cat([sm.float(), tm.float()], 0), threshold=mask_threshold)
        elif mask_source_word.strip() or mask_target_word.strip():
            sw = mask_source_word.strip() or mask_target_word.strip()
            tw = mask_target_word.strip() or sw
            src = _Prompt(clip, source_prompt, "source_prompt")
            tps = [_Prompt(clip, t, f"target prompt {i + 1}") for i, t in enumerate(tgt_texts)]
            mask = MaskSpec(src_positions=src.positions(sw, "mask_source_word"),
                            tgt_positions=[tp.positions(tw, "mask_target_word") for tp in tps],
                            threshold=mask_threshold)
        if dit:
            # DiTs: start_layer is a block index over the main blocks in forward order (-1: depth fraction
            # 1/3, measured: see attention/dit_masactrl.py); given masks only
            ctrl = DitMasaCtrlController(start_step, None if start_layer < 0 else int(start_layer), mode,
                                         None if mask is None else mask.masks)
            m = attach(model, ctrl)
            return io.NodeOutput(m, *edit_batch(clip, latent, [source_prompt] + tgt_texts, negative_prompt))
        ctrl = MasaCtrlController(start_step, None if start_layer < 0 else start_layer, mode, mask)
        m = attach(model, ctrl)
        return io.NodeOutput(m, *edit_batch(clip, latent, [source_prompt] + tgt_texts, negative_prompt))


NODES = [MasaCtrl]
