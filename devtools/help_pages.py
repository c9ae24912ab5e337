"""Keeps the generated block of each help page (web/docs/<NodeId>.md) in step: a picture from the demo
(the thumbnail of the example workflow that shows the node, copied to web/docs/images/ where the front
end serves it beside the page) and the node's search aliases (nodes/aliases.py), which it also writes to
web/js/aliases.json for the front end's Attention Control sidebar tab (web/js/node_finder.js).

    python -m devtools.help_pages          # rewrite the blocks and copy the pictures
    python -m devtools.help_pages --check  # exit 1 if a page or a picture is out of date

The block sits right under the page's title, between the two marker comments."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(REPO, "web", "docs")
IMAGES = os.path.join(DOCS, "images")
EXAMPLES = os.path.join(REPO, "example_workflows")
ALIASES_JSON = os.path.join(REPO, "web", "js", "aliases.json")
BEGIN, END = "<!-- generated: devtools/help_pages.py -->", "<!-- /generated -->"

# the example that shows a node best, where it appears in several
PREFERRED = {
    "AttnCtl_PromptToPrompt": "p2p_replace", "AttnCtl_DDIMInversion": "inversion_p2p_edit",
    "AttnCtl_ReplaySource": "inversion_p2p_edit", "AttnCtl_Boxes": "layout_guidance",
    "AttnCtl_RegionPrompt": "region_prompts", "AttnCtl_RegionConditioning": "region_prompts",
    "AttnCtl_CaptureAttention": "capture_attention", "AttnCtl_AttentionHeatmap": "capture_attention",
    "AttnCtl_SketchGuidance": "sketch_guidance", "AttnCtl_TrainSketchPredictor": "sketch_guidance",
    "AttnCtl_SaveSketchPredictor": "sketch_guidance", "AttnCtl_SegmentWords": "segment_words",
    "AttnCtl_ShapesWorldDiTLoader": "p2p_dit", "AttnCtl_NullTextInversion": "null_text_edit",
    "AttnCtl_RFInversionGuidance": "rf_inversion_dit", "AttnCtl_ExpertDenoisers": "expert_denoisers",
    "AttnCtl_FlowInversion": "real_image_edit_dit", "AttnCtl_ApplySpectralShifts": "svdiff_personalise",
    "AttnCtl_TrainSpectralShifts": "svdiff_personalise", "AttnCtl_TiledDiffusion": "tiled_diffusion",
}

# nodes no example shows: the example of the technique they belong to, and what the picture is to them
RELATED = {
    "AttnCtl_LoadSpectralShifts": ("svdiff_personalise", "the example that trains and saves the shifts this node loads"),
    "AttnCtl_LoadAssumptionEdit": ("time_edit", "the example that makes and saves the edit this node loads"),
    "AttnCtl_LoadEditDirection": ("pix2pix_zero_real", "the example that builds and saves the direction this node loads"),
    "AttnCtl_LoadSketchPredictor": ("sketch_guidance", "the example that trains and saves the predictor this node loads"),
    "AttnCtl_SharedNoise": ("masactrl", "a MasaCtrl example; with SamplerCustomAdvanced this node gives its batch the one noise"),
}


def examples_by_node() -> dict[str, str]:
    """node id -> the example workflow that shows it (PREFERRED, else the first UNet one, else any)."""
    uses: dict[str, list[str]] = {}
    for f in sorted(os.listdir(EXAMPLES)):
        if not f.endswith(".json") or not os.path.exists(os.path.join(EXAMPLES, f[:-5] + ".jpg")):
            continue
        with open(os.path.join(EXAMPLES, f)) as fh:
            types = {n["type"] for n in json.load(fh)["nodes"]}
        for t in types:
            if t.startswith("AttnCtl_"):
                uses.setdefault(t, []).append(f[:-5])
    out = {}
    for node, names in uses.items():
        pick = PREFERRED.get(node)
        if pick not in names:
            plain = [n for n in names if "dit" not in n and "wan" not in n]
            pick = (plain or names)[0]
        out[node] = pick
    # the demo runs the UNet examples on the shapes-world checkpoint through this loader
    out.setdefault("AttnCtl_ShapesWorldLoader", "capture_attention")
    for node, (example, _why) in RELATED.items():
        out.setdefault(node, example)
    return out


def block(node_id: str, example: str | None, aliases: list[str]) -> str:
    lines = [BEGIN]
    if example:
        why = RELATED.get(node_id, (None, ""))[1] if example == RELATED.get(node_id, (None,))[0] else ""
        lines += [f"![The demo output of the example workflow {example}](images/{example}.jpg)", "",
                  f"*From the example workflow `{example}` (example_workflows/{example}.json, `make demo`)"
                  + (f": {why}" if why else "") + ".*", ""]
    if aliases:
        lines += ["Search words (type them in the Attention Control sidebar tab; a ComfyUI whose node search reads "
                  "aliases finds the node by them too): " + ", ".join(aliases) + "."]
    lines.append(END)
    return "\n".join(lines) + "\n"


def render(text: str, node_id: str, example: str | None, aliases: list[str]) -> str:
    """The page with its generated block (replaced, or put after the title line)."""
    new = block(node_id, example, aliases)
    if BEGIN in text:
        return re.sub(re.escape(BEGIN) + r".*?" + re.escape(END) + r"\n", lambda _m: new, text, count=1, flags=re.S)
    head, _, rest = text.partition("\n")
    return head + "\n\n" + new + rest if rest.startswith("\n") else head + "\n\n" + new + "\n" + rest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args(argv)
    aliases = _aliases()
    stale = []
    pics = examples_by_node()
    os.makedirs(IMAGES, exist_ok=True)
    for f in sorted(os.listdir(DOCS)):
        if not f.endswith(".md"):
            continue
        node = f[:-3]
        path = os.path.join(DOCS, f)
        with open(path) as fh:
            text = fh.read()
        new = render(text, node, pics.get(node), aliases.get(node, []))
        if new != text:
            stale.append(f)
            if not a.check:
                with open(path, "w") as fh:
                    fh.write(new)
    for ex in sorted(set(pics.values())):
        src, dst = os.path.join(EXAMPLES, ex + ".jpg"), os.path.join(IMAGES, ex + ".jpg")
        with open(src, "rb") as fh:
            data = fh.read()
        if not os.path.exists(dst) or open(dst, "rb").read() != data:
            stale.append(f"images/{ex}.jpg")
            if not a.check:
                with open(dst, "wb") as fh:
                    fh.write(data)
    for f in sorted(os.listdir(IMAGES)):
        if f[:-4] not in set(pics.values()):
            stale.append(f"images/{f} (no page shows it)")
            if not a.check:
                os.remove(os.path.join(IMAGES, f))
    text = json.dumps(aliases, indent=1, sort_keys=True) + "\n"
    if not os.path.exists(ALIASES_JSON) or open(ALIASES_JSON).read() != text:
        stale.append("web/js/aliases.json")
        if not a.check:
            with open(ALIASES_JSON, "w") as fh:
                fh.write(text)
    if stale:
        sys.stdout.write(("out of date: " if a.check else "updated: ") + ", ".join(stale) + "\n")
    return 1 if (a.check and stale) else 0


def _aliases() -> dict:
    """nodes/aliases.py's table, loaded from its file (the module imports ComfyUI only when asked)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("attnctl_aliases", os.path.join(REPO, "nodes", "aliases.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.ALIASES


if __name__ == "__main__":
    sys.exit(main())
