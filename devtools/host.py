"""Bring the real ComfyUI 0.3.75 test host into this Python process.

`setup_comfy()` puts the ComfyUI tree of the test-host venv on sys.path, forces CPU, optionally
selects PyTorch SDPA attention, and returns the ComfyUI root. `import_pack()` imports this repo as
the package `attention_control` (the way ComfyUI imports a custom node folder), whatever the clone's
folder is called.
"""
from __future__ import annotations

import importlib.util
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_NAME = "attention_control"


def comfy_root() -> str:
    root = os.environ.get("COMFYUI_ROOT")
    if root:
        return root
    venv = os.path.dirname(os.path.dirname(sys.executable))
    path_file = os.path.join(venv, "comfyui_path")
    if os.path.exists(path_file):
        with open(path_file) as f:
            return f.read().strip()
    raise RuntimeError("ComfyUI test host not found: run through `make test` (scripts/host.sh builds it)")


def setup_comfy(pytorch_attention: bool | None = None) -> str:
    root = comfy_root()
    if root not in sys.path:
        sys.path.insert(0, root)
    if pytorch_attention is None:
        pytorch_attention = os.environ.get("ATTNCTL_PYTORCH_ATTENTION", "") == "1"
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    if pytorch_attention:
        comfy.cli_args.args.use_pytorch_cross_attention = True
    import comfy.model_management  # noqa: F401  (after args)
    return root


def import_pack():
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    setup_comfy()
    spec = importlib.util.spec_from_file_location(
        PACK_NAME, os.path.join(REPO, "__init__.py"), submodule_search_locations=[REPO])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = mod
    spec.loader.exec_module(mod)
    return mod
