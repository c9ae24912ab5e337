"""devtools.workflow: UI-format workflow -> API prompt, on object_info-shaped node definitions."""
import json
import os

import pytest

from devtools.workflow import WorkflowError, ui_to_api

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Shaped like GET /object_info of ComfyUI 0.3.75 (only the keys the converter reads).
OBJECT_INFO = {
    "CheckpointLoaderSimple": {
        "input": {"required": {"ckpt_name": [["a.safetensors", "b.safetensors"], {}]}},
        "input_order": {"required": ["ckpt_name"]},
        "output": ["MODEL", "CLIP", "VAE"]},
    "CLIPTextEncode": {
        "input": {"required": {"text": ["STRING", {"multiline": True}], "clip": ["CLIP"]}},
        "input_order": {"required": ["text", "clip"]}, "output": ["CONDITIONING"]},
    "KSampler": {
        "input": {"required": {
            "model": ["MODEL"], "seed": ["INT", {"default": 0, "control_after_generate": True}],
            "steps": ["INT", {"default": 20}], "cfg": ["FLOAT", {"default": 8.0}],
            "sampler_name": [["euler", "dpmpp_2m"]], "scheduler": [["normal", "karras"]],
            "positive": ["CONDITIONING"], "negative": ["CONDITIONING"], "latent_image": ["LATENT"],
            "denoise": ["FLOAT", {"default": 1.0}]}},
        "input_order": {"required": ["model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive",
                                     "negative", "latent_image", "denoise"]},
        "output": ["LATENT"]},
    "EmptyLatentImage": {
        "input": {"required": {"width": ["INT", {"default": 512}], "height": ["INT", {"default": 512}],
                               "batch_size": ["INT", {"default": 1}]}},
        "input_order": {"required": ["width", "height", "batch_size"]}, "output": ["LATENT"]},
    "VAEDecode": {"input": {"required": {"samples": ["LATENT"], "vae": ["VAE"]}},
                  "input_order": {"required": ["samples", "vae"]}, "output": ["IMAGE"]},
    "SaveImage": {"input": {"required": {"images": ["IMAGE"], "filename_prefix": ["STRING", {"default": "ComfyUI"}]},
                            "hidden": {"prompt": "PROMPT"}},
                  "input_order": {"required": ["images", "filename_prefix"], "hidden": ["prompt"]}, "output": []},
    "LoadImage": {"input": {"required": {"image": [["x.png"], {"image_upload": True}]}},
                  "input_order": {"required": ["image"]}, "output": ["IMAGE", "MASK"]},
    "Heat": {  # a V3-style node: optional sockets, a forceInput value, optional widgets
        "input": {"required": {"maps": ["ATTN_MAPS"], "scale": ["FLOAT", {"forceInput": True}]},
                  "optional": {"image": ["IMAGE"], "alpha": ["FLOAT", {"default": 0.6}],
                               "mode": ["COMBO", {"options": ["a", "b"], "default": "a"}]}},
        "input_order": {"required": ["maps", "scale"], "optional": ["image", "alpha", "mode"]},
        "output": ["IMAGE"]},
}


def _node(id, type, inputs=(), widgets=None, mode=0, outputs=()):
    return {"id": id, "type": type, "mode": mode, "inputs": list(inputs), "outputs": list(outputs),
            "widgets_values": widgets}


def _in(name, typ, link, widget=False):
    d = {"name": name, "type": typ, "link": link}
    if widget:
        d["widget"] = {"name": name}
    return d


def _base_workflow():
    links = [[1, 1, 0, 5, 0, "MODEL"], [2, 1, 1, 2, 0, "CLIP"], [3, 1, 1, 3, 0, "CLIP"],
             [4, 2, 0, 5, 1, "CONDITIONING"], [5, 3, 0, 5, 2, "CONDITIONING"], [6, 4, 0, 5, 3, "LATENT"],
             [7, 5, 0, 6, 0, "LATENT"], [8, 1, 2, 6, 1, "VAE"], [9, 6, 0, 7, 0, "IMAGE"]]
    nodes = [
        _node(1, "CheckpointLoaderSimple", widgets=["b.safetensors"]),
        _node(2, "CLIPTextEncode", [_in("clip", "CLIP", 2)], ["a red circle"]),
        _node(3, "CLIPTextEncode", [_in("clip", "CLIP", 3)], [""]),
        _node(4, "EmptyLatentImage", widgets=[256, 128, 2]),
        _node(5, "KSampler", [_in("model", "MODEL", 1), _in("positive", "CONDITIONING", 4),
                              _in("negative", "CONDITIONING", 5), _in("latent_image", "LATENT", 6)],
              [42, "randomize", 20, 7.5, "dpmpp_2m", "karras", 0.9]),
        _node(6, "VAEDecode", [_in("samples", "LATENT", 7), _in("vae", "VAE", 8)], []),
        _node(7, "SaveImage", [_in("images", "IMAGE", 9)], ["pfx"]),
        {"id": 8, "type": "Note", "mode": 0, "inputs": [], "outputs": [], "widgets_values": ["hello"]},
    ]
    return {"nodes": nodes, "links": links, "version": 0.4}


def test_basic_graph_widgets_links_and_seed_control():
    api = ui_to_api(_base_workflow(), OBJECT_INFO)
    assert set(api) == {"1", "2", "3", "4", "5", "6", "7"}           # the Note is dropped
    assert api["1"] == {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "b.safetensors"}}
    assert api["2"]["inputs"] == {"text": "a red circle", "clip": ["1", 1]}
    assert api["4"]["inputs"] == {"width": 256, "height": 128, "batch_size": 2}
    # seed is followed by its control_after_generate value, which is skipped
    assert api["5"]["inputs"] == {"model": ["1", 0], "seed": 42, "steps": 20, "cfg": 7.5,
                                  "sampler_name": "dpmpp_2m", "scheduler": "karras", "positive": ["2", 0],
                                  "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 0.9}
    assert api["6"]["inputs"] == {"samples": ["5", 0], "vae": ["1", 2]}
    assert api["7"]["inputs"] == {"images": ["6", 0], "filename_prefix": "pfx"}


def test_linked_widget_keeps_its_slot_and_link_wins():
    wf = _base_workflow()
    # 'steps' converted to an input and linked (the converter does not check types): its widget value
    # still occupies a slot in widgets_values, the link replaces it, the later widgets stay aligned.
    wf["links"].append([10, 4, 0, 5, 4, "INT"])
    ks = next(n for n in wf["nodes"] if n["id"] == 5)
    ks["inputs"].append(_in("steps", "INT", 10, widget=True))
    api = ui_to_api(wf, OBJECT_INFO)
    assert api["5"]["inputs"]["steps"] == ["4", 0]
    assert api["5"]["inputs"]["cfg"] == 7.5 and api["5"]["inputs"]["denoise"] == 0.9


def test_optional_sockets_forceinput_upload_and_defaults():
    links = [[1, 1, 0, 2, 0, "IMAGE"], [2, 3, 0, 2, 1, "FLOAT"], [3, 1, 0, 2, 2, "IMAGE"]]
    nodes = [_node(1, "LoadImage", widgets=["x.png", "image"]),
             _node(3, "EmptyLatentImage", widgets=[1, 2, 3]),
             _node(2, "Heat", [_in("maps", "ATTN_MAPS", 1), _in("scale", "FLOAT", 2), _in("image", "IMAGE", 3)],
                   [0.25])]                                       # 'mode' missing: its default is used
    api = ui_to_api({"nodes": nodes, "links": links}, OBJECT_INFO)
    assert api["1"]["inputs"] == {"image": "x.png"}
    assert api["2"]["inputs"] == {"maps": ["1", 0], "scale": ["3", 0], "image": ["1", 0], "alpha": 0.25,
                                  "mode": "a"}


def test_reroute_muted_and_bypassed_nodes():
    wf = _base_workflow()
    # the VAE goes through a Reroute; a second SaveImage is muted
    wf["nodes"].append({"id": 9, "type": "Reroute", "mode": 0, "inputs": [_in("", "*", 8)], "outputs": []})
    wf["links"] = [l for l in wf["links"] if l[0] != 8] + [[8, 1, 2, 9, 0, "VAE"], [11, 9, 0, 6, 1, "VAE"]]
    next(n for n in wf["nodes"] if n["id"] == 6)["inputs"][1]["link"] = 11
    wf["nodes"].append(_node(10, "SaveImage", [_in("images", "IMAGE", 12)], ["muted"], mode=2))
    wf["links"].append([12, 6, 0, 10, 0, "IMAGE"])
    api = ui_to_api(wf, OBJECT_INFO)
    assert api["6"]["inputs"]["vae"] == ["1", 2]
    assert "9" not in api and "10" not in api


def test_unknown_node_type_is_a_clear_error():
    wf = _base_workflow()
    wf["nodes"][0]["type"] = "NoSuchNode"
    with pytest.raises(WorkflowError, match="NoSuchNode"):
        ui_to_api(wf, OBJECT_INFO)


def test_example_workflows_are_ui_format():
    folder = os.path.join(REPO, "example_workflows")
    files = sorted(f for f in os.listdir(folder) if f.endswith(".json"))
    assert files
    for f in files:
        with open(os.path.join(folder, f)) as fh:
            wf = json.load(fh)
        assert wf.get("version") == 0.4 and wf["nodes"] and wf["links"], f
        ids = {n["id"] for n in wf["nodes"]}
        for lid, a, a_slot, b, b_slot, typ in wf["links"]:
            assert a in ids and b in ids, (f, lid)
            tgt = next(n for n in wf["nodes"] if n["id"] == b)
            assert tgt["inputs"][b_slot]["link"] == lid, (f, lid)
            src = next(n for n in wf["nodes"] if n["id"] == a)
            assert lid in src["outputs"][a_slot]["links"], (f, lid)
        assert os.path.exists(os.path.join(folder, f[:-5] + ".jpg")), f"{f}: thumbnail missing"
