"""Attention-map capture (DAAM-style: Tang et al. 2022, "What the DAAM: Interpreting Stable
Diffusion Using Cross Attention"): per-word cross-attention maps, aggregated over the selected
layers, heads and steps, on the conditional rows only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .core import AttentionControlError, Controller, LayerSelector, Run, select_sites
from .maps import MapAccumulator, to_grid, token_columns, word_maps


@dataclass
class WordSpec:
    label: str
    positions: list[int]            # global token positions in the prompt


class AttentionMaps:
    """The ATTN_MAPS handle: filled by the capture controller when a sampling run ends."""

    def __init__(self, words: list[str]):
        self.words = list(words)
        self.maps: torch.Tensor | None = None          # (B, W, H, W) mean over layers/heads/steps
        self.step_maps: list[tuple[int, torch.Tensor]] = []
        self.latent_hw: tuple | None = None
        self.layers: list[str] = []
        self.fired: dict = {}
        self.runs = 0
        self.frames = 1            # latent frames per item (video DiTs: maps are frames x items rows)

    def __deepcopy__(self, memo):
        return self

    def publish(self, maps, step_maps, latent_hw, layers, fired, frames: int = 1) -> None:
        self.maps = maps
        self.frames = int(frames)
        self.step_maps = step_maps
        self.latent_hw = tuple(latent_hw)
        self.layers = list(layers)
        self.fired = dict(fired)
        self.runs += 1

    def require(self) -> torch.Tensor:
        if self.maps is None:
            if self.runs:
                raise AttentionControlError(
                    "attn_maps: no maps were captured: the last sampling run with the capture node's MODEL ran no "
                    "step inside start_percent..end_percent at the captured layers (denoise 0, a start step at or "
                    "past the last step, or a window that holds no step); sample at least one step inside the window")
            raise AttentionControlError(
                "attn_maps: no maps were captured yet: no sampling step ran with the capture node's MODEL. Sample "
                "that MODEL with denoise > 0 and at least one step (at denoise 0 the sampler returns the latent "
                "without calling the model), and feed that sampler's output into this node so it runs after "
                "sampling.")
        return self.maps


def check_capture_config(words, start: float, end: float) -> None:
    """The checks of a capture configuration (UNet and DiT controllers); False for NaN too."""
    if not words:
        raise AttentionControlError("words: give at least one word of the prompt (comma-separated)")
    if not 0.0 <= start < end <= 1.0:
        raise AttentionControlError(
            f"start_percent/end_percent: need 0 <= start < end <= 1, got {start} and {end}")


class CaptureController(Controller):
    name = "capture"
    kinds = frozenset({"cross"})

    def __init__(self, words: list[WordSpec], prompt_len: int, handle: AttentionMaps,
                 selector: LayerSelector, start: float = 0.0, end: float = 1.0, keep_steps: bool = False):
        check_capture_config(words, start, end)
        self.words = words
        self.prompt_len = prompt_len
        self.handle = handle
        self.selector = selector
        self.start, self.end = start, end
        self.keep_steps = keep_steps

    def begin_run(self, run: Run) -> None:
        sites = select_sites(run.router.sites, self.selector, "cross", run.latent_hw, input_name="layers")
        for name in ("positive", "negative"):
            for c in run.conds.get(name, []) or []:
                ca = c.get("cross_attn") if isinstance(c, dict) else None
                if ca is not None and ca.shape[1] % self.prompt_len != 0:
                    raise AttentionControlError(
                        f"prompt: the capture node's prompt has {self.prompt_len} tokens but the {name} "
                        f"conditioning has {ca.shape[1]}; connect the same prompt text to the capture node "
                        "and to the CLIPTextEncode that feeds the sampler")
        ds_min = min(s.ds for s in sites)
        size = (run.latent_hw[0] // ds_min, run.latent_hw[1] // ds_min)
        d = run.data(self)
        d["keys"] = {s.key for s in sites}
        d["labels"] = [s.label(run.latent_hw) for s in sites]
        d["acc"] = MapAccumulator(size, keep_steps=self.keep_steps)
        d["cols"] = {}

    def attend(self, q, k, v, call, nxt):
        d = call.run.data(self)
        n = call.run.n_steps
        if call.site.key in d["keys"] and self.start * n <= call.step < self.end * n:
            chunks = call.cond_chunks()
            if chunks:
                kl = k.shape[1]
                cols = d["cols"].get(kl)
                if cols is None:
                    cols = [token_columns(w.positions, self.prompt_len, kl) for w in self.words]
                    d["cols"][kl] = cols
                rows = call.cond_rows().to(q.device)
                m = word_maps(q.index_select(0, rows), k.index_select(0, rows), call.site.heads, cols)
                m = m.view(len(chunks), call.batch, *m.shape[1:]).mean(0)
                d["acc"].add(to_grid(m, call.h, call.w), call.step)
        return nxt(q, k, v)

    def end_run(self, run: Run, ok: bool) -> None:
        d = run.data(self)
        if not ok or "acc" not in d:
            return
        acc = d["acc"]
        fired = {k: v for k, v in run.fired.items() if k[0] == "cross" and k[1] in d["keys"]}
        self.handle.publish(acc.mean(), acc.step_means(), run.latent_hw, d["labels"], fired)
