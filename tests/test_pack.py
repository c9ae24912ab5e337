"""The pack as ComfyUI loads it: V3 registration, ids, tooltips, help pages, version gate."""
import asyncio
import importlib.util
import logging
import os
import sys
import types

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _nodes(pack):
    ext = asyncio.run(pack.comfy_entrypoint())
    return asyncio.run(ext.get_node_list())


def test_nodes_register_with_ids_categories_tooltips_and_docs(pack):
    nodes = _nodes(pack)
    assert nodes
    for cls in nodes:
        schema = cls.define_schema()
        assert schema.node_id.startswith("AttnCtl_")
        assert schema.category.startswith("attention_control/")
        assert os.path.exists(os.path.join(REPO, "web", "docs", f"{schema.node_id}.md")), schema.node_id
        for inp in schema.inputs:
            assert inp.tooltip, f"{schema.node_id}.{inp.id} has no tooltip"
        assert "AttnCtl" not in str(getattr(pack, "NODE_CLASS_MAPPINGS", "")), "V3 only"
    assert not hasattr(pack, "NODE_CLASS_MAPPINGS"), "NODE_CLASS_MAPPINGS would disable comfy_entrypoint"


def test_older_comfyui_logs_one_line_and_loads_no_nodes(caplog):
    fake = types.ModuleType("comfyui_version")
    fake.__version__ = "0.3.40"
    saved = sys.modules.get("comfyui_version")
    sys.modules["comfyui_version"] = fake
    try:
        spec = importlib.util.spec_from_file_location("attnctl_old_host", os.path.join(REPO, "__init__.py"),
                                                      submodule_search_locations=[REPO])
        mod = importlib.util.module_from_spec(spec)
        with caplog.at_level(logging.ERROR, logger="attention_control"):
            spec.loader.exec_module(mod)
        lines = [r.getMessage() for r in caplog.records if r.name == "attention_control"]
        assert len(lines) == 1 and "needs ComfyUI >= 0.3.75 (found 0.3.40)" in lines[0]
        assert _nodes(mod) == []
    finally:
        if saved is not None:
            sys.modules["comfyui_version"] = saved
        else:
            sys.modules.pop("comfyui_version", None)


def test_pyproject_declares_what_is_tested():
    import tomllib
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        meta = tomllib.load(f)
    assert meta["project"]["name"] == "attention-control"
    assert meta["tool"]["comfy"]["requires-comfyui"] == ">=0.3.75"
    import comfyui_version
    assert comfyui_version.__version__ == "0.3.75"
    assert "torch" not in " ".join(meta["project"]["dependencies"])
