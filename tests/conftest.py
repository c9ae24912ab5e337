"""Test host: the real ComfyUI 0.3.75 (from the venv built by scripts/host.sh) in-process, CPU."""
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# Appended, never prepended: the repo's `nodes/` and `tests/` must not shadow ComfyUI's `nodes.py`
# and `tests` package (ComfyUI's root goes to the front in setup_comfy()).
for p in (REPO, HERE):
    if p not in sys.path:
        sys.path.append(p)

from devtools.host import import_pack, setup_comfy  # noqa: E402

setup_comfy()
import_pack()


@pytest.fixture(scope="session")
def pack():
    return import_pack()


@pytest.fixture(scope="session")
def sd15():
    import ac_models
    return ac_models.tiny_sd15()


@pytest.fixture(scope="session")
def sdxl():
    import ac_models
    return ac_models.tiny_sdxl()


@pytest.fixture(scope="session")
def clip_l():
    import ac_models
    return ac_models.random_clip_l()
