"""Node AttnCtl_ExpertDenoisers and its step dispatch: ensemble of expert denoisers (eDiff-I; the same split as Wan 2.2's high-noise / low-noise experts and SDXL
base -> refiner) inside ONE sampler run.

ComfyUI has no per-call model switch: a sampling run holds one guider whose inner model (loaded once by
prepare_sampling) answers every step. The closest clean form through the public extension points: the MODEL of
this node is a clone of the first (high-noise) expert with a PREDICT_NOISE wrapper (one call per sampler step,
the CFG combination included). For a step whose sigma lies in another expert's part of the schedule the wrapper
asks ComfyUI's model management to load that expert (load_models_gpu: it offloads what no longer fits), makes it
the current patcher of its model (pre_run; cleanup after), and runs core's own sampling_function on it with the
expert's own model_options (its transformer patches, wrappers and weight patches: LoRAs, the pack's attention
nodes). The sampler sees one continuous schedule, so multistep samplers work across the switch.

The guider's conditioning was prepared for the first expert (process_conds); the experts must therefore be of
one model family and latent format (Wan 2.2's two experts, eDiff-I-style specialised copies, two fine-tunes of
one base). The node refuses others by name.
"""
from __future__ import annotations

from comfy_api.latest import io

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension as pe

from ..attention import dit_router as DR
from ..attention import router as UR
from ..attention.core import AttentionControlError, Run
from .common import CATEGORY, check_widgets, validation_result

WRAPPER_KEY = "attention_control_experts"
# the pack's routers: (router key, run key, wrapper key) in transformer_options / the MODEL's wrappers
ROUTERS = ((UR.ROUTER_KEY, UR.RUN_KEY, UR.WRAPPER_KEY), (DR.DIT_ROUTER_KEY, DR.DIT_RUN_KEY, DR.WRAPPER_KEY))


def _family(model_patcher) -> tuple:
    m = model_patcher.model
    return type(m).__name__, type(m.latent_format).__name__, m.model_type.name


class ExpertSwitch:
    """experts: [(ModelPatcher, start fraction)] in schedule order, the first from 0. Each step goes to the last
    expert whose start sigma is at or above the step's sigma (fractions as core's timestep ranges)."""

    def __init__(self, experts):
        self.experts = list(experts)
        self.calls: list = []          # (expert index, sigma) of the last run, for tests and logs
        self.runs: dict = {}           # expert index -> {run key: Run} of its routers, during a run

    def outer_sample(self, executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        """The run: a Run of the pack's routers on each later expert (their own OUTER_SAMPLE wrappers never run:
        the sampler runs the first expert), begun before the first step and ended after the last, as the
        routers' own wrappers do for the first expert."""
        guider = executor.class_obj
        self.calls = []
        opened = []
        ok = False
        try:
            for i, (m, _start) in enumerate(self.experts[1:], start=1):
                to = m.model_options.get("transformer_options", {})
                runs = {}
                for rkey, run_key, _w in ROUTERS:
                    router = to.get(rkey)
                    if router is None or not router.controllers:
                        continue
                    run = Run(router, noise.shape, sigmas, getattr(guider, "conds", None))
                    run.noise = noise
                    run.seed = args[3] if len(args) > 3 else kwargs.get("seed")
                    router.begin_run(run)
                    opened.append((router, run))
                    runs[run_key] = run
                self.runs[i] = runs
            out = executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
            ok = True
            return out
        finally:
            self.runs = {}
            for router, run in opened:
                router.end_run(run, ok)
                run.scratch.clear()

    def __deepcopy__(self, memo):
        return self

    def bounds(self, model_sampling) -> list[float]:
        return [float(model_sampling.percent_to_sigma(start)) for _m, start in self.experts]

    def pick(self, sigma: float, bounds) -> int:
        k = 0
        for i, b in enumerate(bounds):
            if i > 0 and sigma <= b:
                k = i
        return k

    def predict_noise(self, executor, x, timestep, model_options={}, seed=None):
        guider = executor.class_obj
        sigma = float(timestep.flatten()[0])
        k = self.pick(sigma, self.bounds(guider.inner_model.model_sampling))
        self.calls.append((k, sigma))
        if k == 0:
            return executor(x, timestep, model_options, seed)
        import comfy.samplers
        expert = self.experts[k][0]
        comfy.model_management.load_models_gpu([expert])
        opts = comfy.model_patcher.create_model_options_clone(expert.model_options)
        to = opts.setdefault("transformer_options", {})
        pe.merge_nested_dicts(to.setdefault("wrappers", {}), expert.wrappers, copy_dict1=False)
        pe.merge_nested_dicts(to.setdefault("callbacks", {}), expert.callbacks, copy_dict1=False)
        for key in ("sample_sigmas",):
            if key in model_options.get("transformer_options", {}):
                to[key] = model_options["transformer_options"][key]
        to.update(self.runs.get(k, {}))
        expert.pre_run()
        try:
            return comfy.samplers.sampling_function(expert.model, x, timestep, guider.conds.get("negative"),
                                                    guider.conds.get("positive"), guider.cfg, model_options=opts,
                                                    seed=seed)
        finally:
            expert.cleanup()
            guider.model_patcher.pre_run()          # the run's own model is the current patcher again


def experts_model(first, others, starts):
    """A clone of `first` whose steps from each start fraction on go to the matching expert of `others`."""
    if len(others) != len(starts):
        raise AttentionControlError("experts: one start fraction per further expert")
    prev = 0.0
    fam = _family(first)
    for i, (m, s) in enumerate(zip(others, starts), start=2):
        if not (prev < s < 1.0):
            raise AttentionControlError(
                f"switch: expert {i} starts at {s:g}; the starts must rise strictly between 0 and 1 "
                f"(fractions of the schedule, 0 = the noisiest end)")
        if _family(m) != fam:
            raise AttentionControlError(
                f"model_{i}: a {_family(m)[0]} model ({_family(m)[2]}, {_family(m)[1]} latents) cannot take steps of "
                f"a {fam[0]} run ({fam[2]}, {fam[1]} latents): the sampler's conditioning and latent are prepared "
                f"for the first expert; use experts of one model family")
        if m.get_all_wrappers(pe.WrappersMP.PREDICT_NOISE):
            raise AttentionControlError(
                f"model_{i}: this expert carries whole-step wrappers (the pack's gradient guidance: layout, sketch, "
                f"Pix2Pix-Zero, or another pack's step wrapper) that only the first expert's steps can run; apply "
                f"them to the first expert's model, or sample this expert in its own run")
        ours = {w for _r, _k, w in ROUTERS}
        foreign = [key for key, ws in m.wrappers.get(pe.WrappersMP.OUTER_SAMPLE, {}).items() if ws and key not in ours]
        if foreign:
            raise AttentionControlError(
                f"model_{i}: this expert carries whole-run wrappers of another pack ({', '.join(map(str, foreign))}) "
                f"that only the first expert's run can run; apply that node to the first expert's model")
        prev = s
    sw = ExpertSwitch([(first, 0.0)] + list(zip(others, starts)))
    m = first.clone()
    m.add_wrapper_with_key(pe.WrappersMP.PREDICT_NOISE, WRAPPER_KEY, sw.predict_noise)
    m.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, sw.outer_sample)
    return m, sw



class ExpertDenoisers(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnCtl_ExpertDenoisers",
            display_name="Expert Denoisers (eDiff-I)",
            category=f"{CATEGORY}/schedule",
            description="eDiff-I's expert denoisers inside one sampler run: the steps up to `switch` (the noisy "
                        "part of the schedule, where the layout forms) go to model, the rest to model_2, as Wan "
                        "2.2's high-noise / low-noise experts. Any sampler node and sampler (multistep ones too) "
                        "sees one schedule; each expert keeps its own patches (LoRAs, attention nodes); ComfyUI's "
                        "model management loads model_2 when its steps begin. Both experts of one model family.",
            inputs=[
                io.Model.Input("model", tooltip="The first expert: the high-noise (early) steps. Its patches, and "
                                                "whole-step guidance nodes, apply to its steps."),
                io.Model.Input("model_2", tooltip="The second expert: the steps from `switch` on (low noise). Its "
                                                  "own patches apply to them."),
                io.Float.Input("switch", default=0.5, min=0.001, max=0.999, step=0.001,
                               tooltip="Where model_2 takes over, as a fraction of the schedule like core's "
                                       "timestep ranges (0 = the noisiest end)."),
            ],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def validate_inputs(cls, switch=None):
        return validation_result(cls, locals())

    @classmethod
    def execute(cls, model, model_2, switch):
        check_widgets(cls, locals())
        m, _switch = experts_model(model, [model_2], [float(switch)])
        return io.NodeOutput(m)


NODES = [ExpertDenoisers]
