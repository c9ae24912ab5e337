"""Nodes: AttnCtl_DDIMInversion, AttnCtl_NullTextInversion, AttnCtl_FlowInversion, AttnCtl_RFInversionGuidance,
AttnCtl_ReplaySource."""
from __future__ import annotations

import logging

import comfy.samplers
import latent_preview
from comfy_api.latest import io

from ..attention.core import AttentionControlError
from ..attention.replay import ReplayController
from ..attention.router import attach
from ..attention.inversion_glue import ddim_invert, null_text_invert
from ..attention.flow_inversion_glue import flow_invert, is_flow, sampling_name
from ..attention.validate import check_finite
from ..samplers.flow_inversion import RFGuidanceController
from .common import check_widgets, validation_result

log = logging.getLogger("attention_control.inversion")

TrajectoryType = io.Custom("TRAJECTORY")


def _refuse_flow(model, node: str) -> None:
    if is_flow(model):
        raise AttentionControlError(
            f"model: {node} inverts the DDIM path of noise-prediction (eps / v) models, but this model is a "
            f"rectified flow ({sampling_name(model)}: Flux, SD3, Wan ...); use Flow Inversion (rectified flow) "
            f"(AttnCtl_FlowInversion)")


class DDIMInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnCtl_DDIMInversion",
            display_name="DDIM Inversion",
            category="attention_control/editing",
            description="Takes an encoded image up the deterministic DDIM path to noise, for real-image edits "
                        "(Prompt-to-Prompt, MasaCtrl). Sample the output latent with add_noise off "
                        "(KSamplerAdvanced: add_noise disable, or SamplerCustom: add_noise off), the same steps "
                        "and scheduler, sampler euler or ddim; at CFG 1 with this prompt it reconstructs the image.",
            inputs=[
                io.Model.Input("model", tooltip="The model (its patches apply during the inversion too)."),
                io.Conditioning.Input("positive", tooltip="The prompt describing the image (or an empty prompt)."),
                io.Latent.Input("latent", tooltip="The image encoded with VAEEncode."),
                io.Int.Input("steps", default=50, min=1, max=1000, tooltip="Inversion steps; sample with the same."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), default="normal",
                               tooltip="Schedule; sample with the same."),
                io.Float.Input("noise_regularisation", default=0.0, min=0.0, max=1000.0, step=1.0, optional=True,
                               tooltip="Pix2Pix-Zero's noise regularisation: each step's predicted noise is pushed "
                                       "toward white noise (auto-correlation and KL terms, 5 iterations each) with "
                                       "this weight before the step uses it. 0 = plain DDIM inversion; paper: 20 "
                                       "(for Pix2Pix-Zero edits of real images)."),
            ],
            outputs=[io.Latent.Output(display_name="latent"), TrajectoryType.Output(display_name="trajectory")],
        )

    @classmethod
    def validate_inputs(cls, steps=None, scheduler=None, noise_regularisation=None):
        return validation_result(cls, locals())

    @classmethod
    def execute(cls, model, positive, latent, steps, scheduler, noise_regularisation=0.0):
        check_widgets(cls, locals())
        if latent["samples"].shape[0] != 1:
            raise AttentionControlError(
                f"latent: DDIM inversion takes one image (batch 1), got a batch of {latent['samples'].shape[0]}")
        check_finite("latent", latent["samples"], "re-encode the image with VAEEncode")
        _refuse_flow(model, "DDIM Inversion")
        cb = latent_preview.prepare_callback(model, steps)
        out, traj = ddim_invert(model, positive, latent, steps, scheduler, callback=cb,
                                regularisation=float(noise_regularisation))
        return io.NodeOutput(out, traj)


class NullTextInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnCtl_NullTextInversion",
            display_name="Null-text Inversion",
            category="attention_control/editing",
            description="DDIM inversion plus one optimised negative embedding per step (Mokady et al. 2022), so "
                        "that sampling at a normal CFG scale follows the image's inversion trajectory: faithful "
                        "real-image Prompt-to-Prompt edits. Use the negative output in the sampler (add_noise off, "
                        "same steps, scheduler and cfg). Slow by nature: iterations x steps extra forward/backward "
                        "passes.",
            inputs=[
                io.Model.Input("model", tooltip="The model."),
                io.Conditioning.Input("positive", tooltip="The prompt describing the image (the edit's source prompt)."),
                io.Conditioning.Input("negative", tooltip="The starting negative (usually an empty prompt)."),
                io.Latent.Input("latent", tooltip="The image encoded with VAEEncode (batch 1)."),
                io.Int.Input("steps", default=50, min=1, max=1000, tooltip="Steps; sample with the same."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), default="normal",
                               tooltip="Schedule; sample with the same."),
                io.Float.Input("cfg", default=7.5, min=1.0, max=30.0, step=0.1,
                               tooltip="The CFG scale the edit will be sampled with (paper: 7.5). At 1.0 the "
                                       "negative takes no part: the node returns plain DDIM inversion."),
                io.Int.Input("iterations", default=10, min=0, max=100,
                             tooltip="Adam iterations per step at most (paper: 10); early stop at 1e-5 + 2e-5 * step."),
            ],
            outputs=[io.Latent.Output(display_name="latent"), TrajectoryType.Output(display_name="trajectory"),
                     io.Conditioning.Output(display_name="negative")],
        )

    @classmethod
    def validate_inputs(cls, cfg=None, steps=None, iterations=None, scheduler=None):
        return validation_result(cls, locals())

    @classmethod
    def execute(cls, model, positive, negative, latent, steps, scheduler, cfg, iterations):
        check_widgets(cls, locals())
        if latent["samples"].shape[0] != 1:
            raise AttentionControlError(
                f"latent: null-text inversion takes one image (batch 1), got a batch of {latent['samples'].shape[0]}")
        check_finite("latent", latent["samples"], "re-encode the image with VAEEncode")
        if not negative:
            raise AttentionControlError("negative: connect a negative conditioning (e.g. an empty prompt)")
        _refuse_flow(model, "Null-text Inversion")
        cb = latent_preview.prepare_callback(model, steps)
        if cfg <= 1.0:
            # CFG 1 is the positive prediction alone: the negative takes no part, so there is nothing to
            # optimise and the inversion is plain DDIM inversion (which CFG-1 sampling reconstructs)
            log.info("Null-text Inversion: cfg %.2f uses no negative, so there is nothing to optimise; returning "
                     "the plain DDIM inversion and the negative unchanged (sample at cfg 1 to reconstruct)", cfg)
            inv, traj = ddim_invert(model, positive, latent, steps, scheduler, callback=cb)
            return io.NodeOutput(inv, traj, negative)
        inv, traj, neg, _log = null_text_invert(model, positive, negative, latent, steps, scheduler, cfg, iterations,
                                                callback=cb)
        return io.NodeOutput(inv, traj, neg)


class FlowInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnCtl_FlowInversion",
            display_name="Flow Inversion (rectified flow)",
            category="attention_control/editing",
            description="Takes an encoded image up the ODE of a rectified-flow model (Flux, SD3, Wan, Qwen-Image, "
                        "Lumina 2 ...) to the noise that regenerates it, for real-image edits; gamma > 0 is "
                        "RF-Inversion's controlled inversion (Rout et al. 2024) toward the seed's noise. Sample with "
                        "SamplerCustomAdvanced: noise = this node's noise output, latent_image = its latent, sampler "
                        "euler, the same steps and scheduler (BasicScheduler); at CFG 1 with this prompt it "
                        "reconstructs the image. (KSamplerAdvanced with add_noise off cannot start a flow model "
                        "from a latent: at sigma 1 ComfyUI weights the latent by 1 - sigma = 0.)",
            inputs=[
                io.Model.Input("model", tooltip="A rectified-flow model (its patches apply during the inversion too)."),
                io.Conditioning.Input("positive", tooltip="The prompt describing the image (or an empty prompt); "
                                                          "CFG 1 (Flux: the conditioning's guidance applies)."),
                io.Latent.Input("latent", tooltip="The image encoded with VAEEncode (batch 1; a video latent on Wan)."),
                io.Int.Input("steps", default=28, min=1, max=1000, tooltip="Inversion steps; sample with the same."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), default="simple",
                               tooltip="Schedule; sample with the same."),
                io.Float.Input("gamma", default=0.0, min=0.0, max=1.0, step=0.05,
                               tooltip="RF-Inversion controller guidance toward the seed's noise on every step "
                                       "(paper, Flux: 0.5). 0: plain inversion (the most faithful reconstruction); "
                                       "1: the result is the seed's noise exactly (the image is forgotten)."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="Seed of the target noise y1 of the controlled inversion (ComfyUI's noise for "
                                     "this seed); unused at gamma 0."),
            ],
            outputs=[io.Latent.Output(display_name="latent"), TrajectoryType.Output(display_name="trajectory"),
                     io.Noise.Output(display_name="noise")],
        )

    @classmethod
    def validate_inputs(cls, gamma=None, steps=None, scheduler=None, seed=None):
        return validation_result(cls, locals())

    @classmethod
    def execute(cls, model, positive, latent, steps, scheduler, gamma, seed):
        check_widgets(cls, locals())
        if not is_flow(model):
            raise AttentionControlError(
                f"model: Flow Inversion integrates a rectified-flow ODE, but this model predicts noise "
                f"({sampling_name(model)}); use DDIM Inversion (AttnCtl_DDIMInversion) or Null-text Inversion")
        if latent["samples"].shape[0] != 1:
            raise AttentionControlError(
                f"latent: Flow Inversion takes one image (batch 1), got a batch of {latent['samples'].shape[0]}")
        check_finite("latent", latent["samples"], "re-encode the image with VAEEncode")
        cb = latent_preview.prepare_callback(model, steps)
        out, traj, noise = flow_invert(model, positive, latent, steps, scheduler, gamma, seed, callback=cb)
        return io.NodeOutput(out, traj, noise)


class RFInversionGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnCtl_RFInversionGuidance",
            display_name="RF-Inversion Guidance (reverse pass)",
            category="attention_control/editing",
            description="RF-Inversion's controlled reverse ODE (Rout et al. 2024): on sampling steps [start_step, "
                        "stop_step) every prediction is pulled toward the inverted image by eta, so an edit sampled "
                        "from Flow Inversion's noise keeps the image's structure while the later steps follow the "
                        "edit prompt. Sample with euler, the inversion's steps and scheduler.",
            inputs=[
                io.Model.Input("model", tooltip="A rectified-flow model (or an edit model built on one)."),
                TrajectoryType.Input("trajectory", tooltip="The trajectory output of Flow Inversion (its image)."),
                io.Float.Input("eta", default=0.9, min=0.0, max=1.0, step=0.05,
                               tooltip="Controller guidance toward the image (paper, Flux: 0.9-1.0); 0: no effect; "
                                       "1: the prediction is the image."),
                io.Int.Input("start_step", default=0, min=0, max=1000, tooltip="First guided sampling step (paper: 0)."),
                io.Int.Input("stop_step", default=7, min=0, max=1000,
                             tooltip="Guidance stops before this sampling step (paper, Flux: about a quarter of the "
                                     "steps, e.g. 7 of 28); later steps follow the prompt freely."),
            ],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def validate_inputs(cls, eta=None, start_step=None, stop_step=None):
        return validation_result(cls, locals())

    @classmethod
    def execute(cls, model, trajectory, eta, start_step, stop_step):
        check_widgets(cls, locals())
        if not is_flow(model):
            raise AttentionControlError(
                f"model: RF-Inversion guidance acts on a rectified-flow model, but this model predicts noise "
                f"({sampling_name(model)}); use DDIM Inversion with Replay Source Trajectory")
        if stop_step < start_step:
            raise AttentionControlError(
                f"stop_step: {stop_step} is before start_step {start_step}; give stop_step >= start_step")
        return io.NodeOutput(attach(model, RFGuidanceController(trajectory, eta, start_step, stop_step)))


class ReplaySource(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnCtl_ReplaySource",
            display_name="Replay Source Trajectory",
            category="attention_control/editing",
            description="Real-image edits: keeps the source item (item 0) of an edit batch on the image's DDIM "
                        "inversion trajectory at every step, so the targets take the real image's attention.",
            inputs=[
                io.Model.Input("model", tooltip="The edit model (e.g. from Prompt-to-Prompt or MasaCtrl)."),
                TrajectoryType.Input("trajectory", tooltip="The trajectory output of DDIM Inversion."),
            ],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model, trajectory):
        return io.NodeOutput(attach(model, ReplayController(trajectory)))


NODES = [DDIMInversion, NullTextInversion, FlowInversion, RFInversionGuidance, ReplaySource]
