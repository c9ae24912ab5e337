"""The real ComfyUI server for e2e tests: one per test session (devtools.server), with this pack."""
from __future__ import annotations

import pytest

from devtools.demo import build_prompt, choose_model
from devtools.server import ComfyServer

E2E_STEPS = 3            # sampler steps in e2e runs (the example files say 20)
RUN_TIMEOUT = 180.0      # seconds per prompt
E2E_SIZE = 128           # EmptyLatentImage width/height in e2e runs (the example files say 256 or more)


class E2E:
    """A started server plus the model substitution the demo uses."""

    def __init__(self, server: ComfyServer, model: dict):
        self.server = server
        self.model = model

    def prompt(self, path: str, steps: int = E2E_STEPS, size: int | None = E2E_SIZE) -> dict:
        api = build_prompt(path, self.server.object_info, self.model, steps)
        if size:
            for node in api.values():
                if node["class_type"] == "EmptyLatentImage":
                    node["inputs"]["width"] = node["inputs"]["height"] = size
        return api


@pytest.fixture(scope="session")
def comfy_server():
    server = ComfyServer()
    server.start()
    try:
        yield E2E(server, choose_model(server))
    finally:
        server.cleanup()
