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


# the words issue 22 asks the node search to know, each on at least one node
ISSUE_WORDS = ["p2p", "prompt2prompt", "word swap", "panorama", "360", "tiled", "multidiffusion", "regional",
               "region prompt", "attention couple", "daam", "heatmap", "cross attention", "layout", "boxes",
               "masactrl", "inversion", "collage", "time", "svdiff", "pix2pix-zero", "sketch", "ediff-i",
               "segment", "expert denoisers", "prompt switch"]


def test_every_node_has_search_aliases_and_help_pages_carry_them(pack):
    from attention_control.nodes.aliases import ALIASES, schema_takes_aliases
    from devtools import help_pages
    ids = {cls.define_schema().node_id for cls in _nodes(pack)}
    assert ids == set(ALIASES), (ids ^ set(ALIASES))
    words = {w for v in ALIASES.values() for w in v}
    assert not [w for w in ISSUE_WORDS if w not in words]
    assert all(v and len(v) == len(set(v)) for v in ALIASES.values())
    # ComfyUI 0.3.75's Schema has no search_aliases: the nodes register unchanged
    assert not schema_takes_aliases()
    assert not any(cls.__dict__.get("_attnctl_aliased") for cls in _nodes(pack))
    # each page's generated block (demo picture, aliases) and the copied pictures are current
    assert help_pages.main(["--check"]) == 0, "run python -m devtools.help_pages"
    for node, example in help_pages.examples_by_node().items():
        with open(os.path.join(REPO, "web", "docs", f"{node}.md")) as f:
            assert f"images/{example}.jpg" in f.read(), node
        with open(os.path.join(REPO, "example_workflows", f"{example}.jpg"), "rb") as a, \
                open(os.path.join(REPO, "web", "docs", "images", f"{example}.jpg"), "rb") as b:
            assert a.read() == b.read(), example
