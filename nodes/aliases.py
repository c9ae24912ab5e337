"""Search aliases: the words users type for each node (issue 22). One table, read by `all_nodes()`:
on a ComfyUI whose node Schema has `search_aliases` (and a front end that searches them) they are
declared there; the help pages list them under "Found as" (tests/test_pack.py keeps both in step)."""
from __future__ import annotations

import dataclasses

_P2P = ["p2p", "prompt2prompt", "prompt to prompt", "word swap", "attention replace", "attention reweight",
        "refine", "local blend", "cross attention edit"]
_REGIONS = ["regional", "region prompt", "attention couple", "regional prompting", "area prompt", "mask prompt",
            "multi prompt", "boxes"]
_TILED = ["panorama", "360", "tiled", "tile", "multidiffusion", "mixture of diffusers", "diffcollage",
          "seamless", "large image"]
_INVERSION = ["inversion", "ddim inversion", "real image edit", "invert", "reconstruct"]
_MAPS = ["daam", "heatmap", "heat map", "cross attention", "attention map", "word map", "attention visualise"]
_LAYOUT = ["layout", "boxes", "bounding box", "box guidance", "layout guidance", "gligen-free", "box energy"]
_WEIGHTS = ["weight edit", "concept edit", "closed form"]

ALIASES: dict[str, list[str]] = {
    "AttnCtl_CaptureAttention": _MAPS + ["capture"],
    "AttnCtl_AttentionHeatmap": _MAPS + ["mask from words"],
    "AttnCtl_SegmentWords": ["segment", "segmentation", "word mask", "text to mask", "daam", "heatmap",
                             "cross attention", "diffsegmenter", "vpd", "mask from words"],
    "AttnCtl_PromptToPrompt": _P2P,
    "AttnCtl_DDIMInversion": _INVERSION + ["pix2pix-zero"],
    "AttnCtl_NullTextInversion": _INVERSION + ["null text", "null-text inversion"],
    "AttnCtl_FlowInversion": _INVERSION + ["flux inversion", "rectified flow", "rf inversion"],
    "AttnCtl_RFInversionGuidance": _INVERSION + ["rf-inversion", "rectified flow", "flux edit"],
    "AttnCtl_ReplaySource": _INVERSION + ["p2p", "masactrl", "source replay"],
    "AttnCtl_Boxes": _LAYOUT + ["box editor", "regional", "region prompt", "paint with words"],
    "AttnCtl_BoxesToMask": ["boxes", "box mask", "mask from boxes", "regional", "region prompt"],
    "AttnCtl_LayoutGuidance": _LAYOUT + ["attention refocusing", "boxdiff"],
    "AttnCtl_MasaCtrl": ["masactrl", "mutual self-attention", "consistent character", "pose edit",
                         "appearance transfer", "self attention"],
    "AttnCtl_SharedNoise": ["masactrl", "same noise", "p2p", "batch noise"],
    "AttnCtl_TiledDiffusion": _TILED,
    "AttnCtl_RegionPrompt": _REGIONS,
    "AttnCtl_RegionConditioning": _REGIONS,
    "AttnCtl_PaintWithWords": ["paint with words", "ediff-i", "regional", "region prompt", "attention couple",
                               "boxes", "mask prompt"],
    "AttnCtl_CollageLayer": ["collage", "collage diffusion", "layers", "rgba layer", "compose"],
    "AttnCtl_CollageLayers": ["collage", "collage diffusion", "layers", "harmonise", "compose"],
    "AttnCtl_EditAssumption": ["time", "text-to-image model editing", "assumption edit"] + _WEIGHTS,
    "AttnCtl_SaveAssumptionEdit": ["time", "save edit", "assumption edit"],
    "AttnCtl_LoadAssumptionEdit": ["time", "load edit", "assumption edit"],
    "AttnCtl_TrainSpectralShifts": ["svdiff", "spectral shifts", "personalise", "personalize", "dreambooth",
                                    "train", "lora alternative"],
    "AttnCtl_CutMixUnmix": ["svdiff", "cut-mix-unmix", "multi subject", "personalise"],
    "AttnCtl_SaveSpectralShifts": ["svdiff", "spectral shifts", "save"],
    "AttnCtl_LoadSpectralShifts": ["svdiff", "spectral shifts", "load"],
    "AttnCtl_ApplySpectralShifts": ["svdiff", "spectral shifts", "apply"],
    "AttnCtl_EditDirection": ["pix2pix-zero", "pix2pix zero", "edit direction", "text direction"],
    "AttnCtl_SaveEditDirection": ["pix2pix-zero", "edit direction", "save"],
    "AttnCtl_LoadEditDirection": ["pix2pix-zero", "edit direction", "load"],
    "AttnCtl_AddEditDirection": ["pix2pix-zero", "edit direction", "prompt arithmetic"],
    "AttnCtl_Pix2PixZero": ["pix2pix-zero", "pix2pix zero", "zero-shot image translation", "cross attention guidance",
                            "real image edit"],
    "AttnCtl_TrainSketchPredictor": ["sketch", "sketch guidance", "edge predictor", "lgp", "scribble"],
    "AttnCtl_SaveSketchPredictor": ["sketch", "edge predictor", "save"],
    "AttnCtl_LoadSketchPredictor": ["sketch", "edge predictor", "load"],
    "AttnCtl_SketchGuidance": ["sketch", "sketch guidance", "scribble", "outline", "edges", "controlnet-free"],
    "AttnCtl_PromptSwitch": ["prompt switch", "prompt switching", "ediff-i", "prompt schedule", "prompt editing",
                             "timestep range"],
    "AttnCtl_ExpertDenoisers": ["expert denoisers", "ediff-i", "ensemble", "refiner", "high noise", "low noise",
                                "wan 2.2", "model switch"],
    "AttnCtl_ShapesWorldLoader": ["shapes world", "demo model", "tiny model"],
    "AttnCtl_ShapesWorldDiTLoader": ["shapes world", "demo model", "tiny dit", "flux-class"],
}


def schema_takes_aliases() -> bool:
    """Whether this ComfyUI's node Schema declares `search_aliases` (0.3.75's does not)."""
    from comfy_api.latest import io
    return any(f.name == "search_aliases" for f in dataclasses.fields(io.Schema))


def with_aliases(cls):
    """`cls` whose schema carries its aliases, where the host's Schema takes them."""
    if cls.__dict__.get("_attnctl_aliased") or not schema_takes_aliases():
        return cls
    words = ALIASES.get(cls.define_schema().node_id)
    if not words:
        return cls
    base = cls.define_schema.__func__

    def define_schema(c):
        s = base(c)
        s.search_aliases = list(dict.fromkeys([*(getattr(s, "search_aliases", None) or []), *words]))
        return s
    cls.define_schema = classmethod(define_schema)
    cls._attnctl_aliased = True
    return cls
