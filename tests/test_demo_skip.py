"""The demo's rule for workflows with their own model loaders (video_p2p_wan): a loader input naming a
file the server does not offer marks the workflow as skipped; --models DIR becomes ComfyUI's
extra_model_paths config."""
import json
import os

from devtools.demo import extra_model_paths, missing_model_files

HERE = os.path.dirname(os.path.abspath(__file__))
OBJECT_INFO = {
    "UNETLoader": {"category": "advanced/loaders",
                   "input": {"required": {"unet_name": [["a.safetensors"]], "weight_dtype": [["default", "fp8_e4m3fn"]]}}},
    "VAELoader": {"category": "loaders", "input": {"required": {"vae_name": ["COMBO", {"options": ["v.safetensors"]}]}}},
    "LoadImage": {"category": "image", "input": {"required": {"image": [["x.png"]]}}},
}


def _api(unet, vae, image="elsewhere.png"):
    return {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
            "2": {"class_type": "VAELoader", "inputs": {"vae_name": vae}},
            "3": {"class_type": "LoadImage", "inputs": {"image": image}},        # not a loader category
            "4": {"class_type": "KSampler", "inputs": {"model": ["1", 0]}}}      # unknown to this object_info


def test_missing_loader_files_are_named_and_present_ones_pass():
    assert missing_model_files(_api("a.safetensors", "v.safetensors"), OBJECT_INFO) == []
    assert missing_model_files(_api("wan.safetensors", "v.safetensors"), OBJECT_INFO) == [
        "UNETLoader.unet_name = wan.safetensors"]
    assert missing_model_files(_api("a.safetensors", "wan_vae.safetensors"), OBJECT_INFO) == [
        "VAELoader.vae_name = wan_vae.safetensors"]


def test_the_wan_example_names_the_wan_files():
    with open(os.path.join(os.path.dirname(HERE), "example_workflows", "video_p2p_wan.json")) as f:
        wf = json.load(f)
    types = {n["type"] for n in wf["nodes"]}
    assert {"UNETLoader", "CLIPLoader", "VAELoader", "AttnCtl_PromptToPrompt", "KSampler"} <= types
    unet = next(n for n in wf["nodes"] if n["type"] == "UNETLoader")
    assert unet["widgets_values"][0].startswith("wan2.1_t2v")


def test_models_dir_becomes_an_extra_model_paths_config(tmp_path):
    path = extra_model_paths(str(tmp_path / "my models"), str(tmp_path))
    text = open(path).read()
    assert text.startswith("attnctl_demo:\n")
    assert f"    base_path: {json.dumps(str(tmp_path / 'my models'))}\n" in text
    for sub in ("diffusion_models", "text_encoders", "vae", "checkpoints"):
        assert f"    {sub}: {sub}\n" in text
