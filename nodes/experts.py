"""Node: AttnCtl_ExpertDenoisers (eDiff-I's ensemble of expert denoisers; attention/experts.py)."""
from __future__ import annotations

from comfy_api.latest import io

from ..attention.experts import experts_model
from .common import CATEGORY, check_widgets, validation_result


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
