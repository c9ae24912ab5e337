"""End to end: the real ComfyUI 0.3.75 server (main.py) with this pack, over HTTP, on loopback.

One server for the session (tests/ac_server.py). Every example workflow runs with the demo's model
substitution and a few sampler steps; a bad input comes back as ComfyUI's execution error with our
message, and the server then runs the next prompt fine.
"""
import os

import pytest

from ac_server import RUN_TIMEOUT, comfy_server  # noqa: F401  (fixture)
from devtools.demo import example_workflows, missing_model_files, workflow_name
from devtools.server import execution_error_message
from devtools.workflow import nodes_of_type

WORKFLOWS = example_workflows()
CAPTURE = os.path.join(os.path.dirname(WORKFLOWS[0]) if WORKFLOWS else "", "capture_attention.json")


def test_pack_nodes_are_served(comfy_server):
    nodes = comfy_server.server.pack_nodes()
    assert "AttnCtl_CaptureAttention" in nodes and "AttnCtl_AttentionHeatmap" in nodes


@pytest.mark.parametrize("path", WORKFLOWS, ids=[workflow_name(p) for p in WORKFLOWS])
def test_example_workflow_runs_and_writes_images(comfy_server, path):
    srv = comfy_server.server
    api = comfy_server.prompt(path)
    missing = missing_model_files(api, srv.object_info)
    if missing:                   # e.g. video_p2p_wan: Wan weights (the demo skips it the same way)
        pytest.skip(f"needs model files: {missing}")
    entry = srv.run(api, timeout=RUN_TIMEOUT)
    images = srv.output_images(entry)
    assert images, f"{workflow_name(path)} wrote no images: {entry.get('outputs')}"
    for p in images:
        assert os.path.getsize(p) > 0, p
    # every SaveImage node produced something
    saves = nodes_of_type(api, "SaveImage")
    assert set(saves) <= set(entry["outputs"]), (saves, list(entry["outputs"]))


def test_bad_input_is_an_execution_error_and_the_server_keeps_running(comfy_server):
    srv = comfy_server.server
    api = comfy_server.prompt(CAPTURE)
    (cap,) = nodes_of_type(api, "AttnCtl_CaptureAttention")
    api[cap]["inputs"]["words"] = "giraffe"
    entry = srv.run(api, timeout=RUN_TIMEOUT, check=False)
    status = entry["status"]
    assert status["status_str"] == "error"
    msg = execution_error_message(entry)
    assert "AttnCtl_CaptureAttention" in msg and "is not in the prompt" in msg and "giraffe" in msg, msg

    good = comfy_server.prompt(CAPTURE, steps=2)
    for k in nodes_of_type(good, "KSampler"):
        good[k]["inputs"]["seed"] = 7          # a new prompt, not served from the cache
    entry = srv.run(good, timeout=RUN_TIMEOUT)
    assert entry["status"]["status_str"] == "success"
    assert srv.output_images(entry)
