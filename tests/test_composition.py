"""Composition matrix (issue 15, item 4): every foreign attention / model patch applied before AND
after every pack node that patches a MODEL, on the real ComfyUI classes (tiny random SD1.5 UNet,
random CLIP-L, 2 steps, 16x16 latents, in-process).

Foreign patches (the real nodes of comfy_extras where ComfyUI has one):
  sag        SelfAttentionGuidance: attn1 replace at ("middle", 0, 0) (node time) + post-CFG pass
  pag        PerturbedAttentionGuidance: attn1 replace at ("middle", 0) inside a copied model_options
             (call time) + post-CFG pass
  freeu      FreeU, freeu_v2 FreeU_V2: output-block patch
  hypertile  HyperTile: attn1 patch that folds spatial tiles into the batch rows
  tome       TomePatchModel: attn1 patch that merges tokens
  lora       a random low-rank LoRA (fixed seed) on attention weights, through the real LoRA loader
             (comfy.sd.load_lora_for_models -> ModelPatcher.add_patches)
  ipadapter  an IPAdapter-style attn2 replace at every attn2 key: attention + a term from fixed image
             tokens, counting its calls and the keys it was called at

How "the foreign patch fires" is observed (spies that call the node's own function unchanged):
  sag        the node's attn1 replace is wrapped at its key: it ran on uncond rows, and its post-CFG
             function ran
  pag        the node's `perturbed_attention` closure cell is wrapped: the perturbed self-attention
             itself ran (not just the post-CFG function)
  freeu(_v2) the node's output-block patch is wrapped: it scaled the backbone features at least once
  hypertile  the node's attn1 patch is wrapped: it returned more rows than it got (it tiled)
  tome       the node's attn1 patch is wrapped: it returned fewer tokens than it got (it merged)
  lora       forward pre-hooks on the patched Linear modules: they ran with weights that differ from
             the base weights (the LoRA was applied while the model ran)
  ipadapter  its own call counter, and the set of attn2 keys it was called at == every attn2 key

Per cell (foreign, pack, order) the test asserts:
  fires       the foreign patch fires in the combined run (as above)
  effect      the combined output differs from the pack-only output
  pack effect the combined output differs from the foreign-only output (capture: its maps were filled
              in the combined run, and the image equals the foreign-only image, as capture never
              changes an image)
  identical   (foreign first: the pack node was applied to the foreign-only model) that model sampled
              again after the combined run equals its first output bit for bit (removing the pack node
              gives the foreign-only output); pack first does not touch it ("-")
and, at the end, that the plain model still gives the plain baseline bit for bit (no leak).

Also: the router reaches every site at every step under each foreign patch in both orders (a
passthrough controller, output bit-identical to the foreign-only run), and capture + P2P +
paint-with-words + tiled stacked on one MODEL in three orders.

The module writes out/composition_matrix.md (pairs x orders: fires / effect / pack effect /
bit-identical) when it finishes.
"""
from __future__ import annotations

import logging
import os
import time

import pytest
import torch

import ac_models as M
import comfy.ldm.modules.attention as comfy_attention
import comfy.sd
import nodes
from comfy_extras import nodes_freelunch, nodes_hypertile, nodes_pag, nodes_sag, nodes_tomesd
from attention_control.attention import core
from attention_control.attention.router import attach, discover_sites
from attention_control.nodes.capture import CaptureAttention
from attention_control.nodes.collage import CollageLayer, CollageLayers
from attention_control.nodes.layout import Boxes, LayoutGuidance
from attention_control.nodes.masactrl import MasaCtrl
from attention_control.nodes.p2p import PromptToPrompt
from attention_control.nodes.pix2pix_zero import EditDirectionNode, Pix2PixZero
from attention_control.nodes.weight_edits import EditAssumption
from attention_control.nodes.sketch import SketchGuidance, train_predictor
from attention_control.nodes.regions import PaintWithWords, RegionConditioning, RegionPrompt
from attention_control.nodes.tiled import TiledDiffusion
from attention_control.shapesworld.comfy_glue import ShapesWorldVAE

log = logging.getLogger("attention_control.tests.composition")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MATRIX_PATH = os.path.join(REPO, "out", "composition_matrix.md")

STEPS, CFG, SEED = 2, 5.0, 0
LAT = (16, 16)

FOREIGN = ["sag", "pag", "freeu", "freeu_v2", "hypertile", "tome", "lora", "ipadapter"]
PACKS = ["capture", "p2p", "layout", "masactrl", "paint", "regions", "collage", "tiled", "time", "p2pzero", "sketch"]
ORDERS = ["foreign_first", "pack_first"]
CELLS = [(f, p, o) for f in FOREIGN for p in PACKS for o in ORDERS]

RESULTS: dict = {}          # (foreign, pack, order) -> {"fires", "effect", "pack", "identical", "error"}
COVERAGE: dict = {}         # (foreign, order) -> {"sites", "fires", "identical", "error"}
STACKS: dict = {}           # order label -> {"capture", "removed", "error"}
TIMES: dict = {"start": time.time()}


def _res(out):
    return out.result if hasattr(out, "result") else out


def sample(model, pos, neg, latent):
    return M.ksample(model, pos, neg, latent, seed=SEED, steps=STEPS, cfg=CFG)


def encode(clip, text):
    return nodes.CLIPTextEncode().encode(clip, text)[0]


# ============================================================================ foreign patches

class Probe:
    """What one application of a foreign patch did during a run (filled by its spies)."""

    def __init__(self, name: str):
        self.name = name
        self.calls = 0          # calls of the spied function
        self.acted = 0          # calls in which it did its thing (tiled, merged, scaled, ...)
        self.post = 0           # post-CFG calls (SAG)
        self.sites = set()      # attention keys it was called at (IPAdapter-style)
        self.want_sites = None  # keys it must reach (IPAdapter-style: every attn2 key)
        self._lora0 = None

    def __deepcopy__(self, memo):     # ModelPatcher.clone() deep-copies model_options
        return self

    def reset(self):
        self.calls = self.acted = self.post = 0
        self.sites = set()
        self._lora0 = dict(LORA_HITS)

    def fired(self) -> bool:
        if self.name == "lora":
            return LORA_HITS["patched"] - self._lora0["patched"] > 0
        if self.name == "sag":
            return self.acted > 0 and self.post > 0
        if self.name == "ipadapter":
            return self.calls > 0 and self.sites == self.want_sites
        return self.acted > 0

    def describe(self) -> str:
        if self.name == "lora":
            return f"lora: {LORA_HITS['patched'] - self._lora0['patched']} patched forward calls"
        missing = sorted(self.want_sites - self.sites) if self.want_sites else []
        return f"{self.name}: calls {self.calls}, acted {self.acted}, post-cfg {self.post}, missing keys {missing}"


class CountingPatch:
    """Wraps a foreign node's replace patch at its own key: calls it unchanged and counts."""

    def __init__(self, fn, probe: Probe):
        self.fn, self.probe = fn, probe

    def __deepcopy__(self, memo):
        return self

    def __call__(self, q, k, v, extra_options):
        self.probe.calls += 1
        if 1 in extra_options.get("cond_or_uncond", []):
            self.probe.acted += 1                      # SAG records its map from the uncond rows
        return self.fn(q, k, v, extra_options)


class IPAdapterStyle:
    """An attn2 replace in the manner of IPAdapter: the text attention plus `scale` x attention to a
    few fixed 'image tokens' (random, fixed seed, one set per width). Counts its calls and keys."""

    def __init__(self, probe: Probe, scale: float = 0.6, n_tokens: int = 4, seed: int = 11):
        self.probe, self.scale, self.n_tokens, self.seed = probe, scale, n_tokens, seed
        self._kv = {}

    def __deepcopy__(self, memo):
        return self

    def _tokens(self, dim, like):
        if dim not in self._kv:
            g = torch.Generator().manual_seed(self.seed * 1000 + dim)
            self._kv[dim] = (torch.randn(1, self.n_tokens, dim, generator=g),
                             torch.randn(1, self.n_tokens, dim, generator=g))
        k, v = self._kv[dim]
        return (k.to(like).expand(like.shape[0], -1, -1).contiguous(),
                v.to(like).expand(like.shape[0], -1, -1).contiguous())

    def __call__(self, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        block = extra_options.get("block")
        self.probe.calls += 1
        self.probe.acted += 1
        if block is not None:
            self.probe.sites.add((block[0], block[1], extra_options.get("block_index", 0)))
        prec = extra_options.get("attn_precision")
        out = comfy_attention.optimized_attention(q, k, v, heads, attn_precision=prec)
        ki, vi = self._tokens(q.shape[-1], q)
        return out + self.scale * comfy_attention.optimized_attention(q, ki, vi, heads, attn_precision=prec)


LORA_HITS = {"calls": 0, "patched": 0}


class LoraContext:
    """A random LoRA (fixed seed) on attention weights of the tiny UNet, and forward pre-hooks that
    tell whether those modules run with the patched weights."""

    def __init__(self, model_patcher, rank: int = 2, seed: int = 5):
        dm = model_patcher.model.diffusion_model
        g = torch.Generator().manual_seed(seed)
        self.sd = {}
        self.base = {}
        self.handles = []
        for name, mod in dm.named_modules():
            if not (name.endswith("attn1.to_q") or name.endswith("attn2.to_v")):
                continue
            w = mod.weight
            out_f, in_f = w.shape
            key = f"diffusion_model.{name}"
            self.sd[f"{key}.lora_up.weight"] = torch.randn(out_f, rank, generator=g) * 0.5
            self.sd[f"{key}.lora_down.weight"] = torch.randn(rank, in_f, generator=g) / in_f ** 0.5
            self.base[name] = w.detach().clone()
            self.handles.append(mod.register_forward_pre_hook(self._hook(name)))
        assert self.base, "the tiny UNet has no attention weights to patch"

    def _hook(self, name):
        base = self.base[name]

        def hook(mod, args):
            LORA_HITS["calls"] += 1
            if not torch.equal(mod.weight.detach().to(base), base):
                LORA_HITS["patched"] += 1
        return hook

    def weights_are_base(self, model_patcher) -> bool:
        dm = model_patcher.model.diffusion_model
        return all(torch.equal(dict(dm.named_modules())[n].weight.detach(), w) for n, w in self.base.items())

    def close(self):
        for h in self.handles:
            h.remove()


def _spy_closure(fn, name: str, make):
    """Replace the free variable `name` of closure `fn` by make(old) (the node's own function, wrapped)."""
    names = fn.__code__.co_freevars
    assert name in names, f"ComfyUI changed: {fn.__qualname__} has no free variable {name} ({names})"
    cell = fn.__closure__[names.index(name)]
    cell.cell_contents = make(cell.cell_contents)


def _wrap_last(lst: list, make):
    lst[-1] = make(lst[-1])


def apply_foreign(name: str, model, ctx):
    """(the model patched by the foreign node, the probe of this application)."""
    probe = Probe(name)
    if name == "sag":
        m = _res(nodes_sag.SelfAttentionGuidance.execute(model, 0.8, 2.0))[0]
        table = m.model_options["transformer_options"]["patches_replace"]["attn1"]
        table[("middle", 0, 0)] = CountingPatch(table[("middle", 0, 0)], probe)

        def post(fn):
            def counted(args):
                probe.post += 1
                return fn(args)
            return counted
        _wrap_last(m.model_options["sampler_post_cfg_function"], post)
    elif name == "pag":
        m = _res(nodes_pag.PerturbedAttentionGuidance.execute(model, 3.0))[0]

        def perturbed(fn):
            def counted(q, k, v, extra_options, mask=None):
                probe.calls += 1
                probe.acted += 1
                return fn(q, k, v, extra_options, mask=mask)
            return counted
        _spy_closure(m.model_options["sampler_post_cfg_function"][-1], "perturbed_attention", perturbed)
    elif name in ("freeu", "freeu_v2"):
        cls = nodes_freelunch.FreeU if name == "freeu" else nodes_freelunch.FreeU_V2
        args = (1.1, 1.2, 0.9, 0.2) if name == "freeu" else (1.3, 1.4, 0.9, 0.2)
        m = cls().patch(model, *args)[0]

        def spy(fn):
            def counted(h, hsp, transformer_options):
                before = h.clone()
                h2, hsp2 = fn(h, hsp, transformer_options)
                probe.calls += 1
                if not torch.equal(h2, before):
                    probe.acted += 1
                return h2, hsp2
            return counted
        _wrap_last(m.model_options["transformer_options"]["patches"]["output_block_patch"], spy)
    elif name in ("hypertile", "tome"):
        if name == "hypertile":
            # tile 64 px = 8 latent px: a 16x16 layer splits 2x2 (swap_size 1: no random choice)
            m = _res(nodes_hypertile.HyperTile.execute(model, 64, 1, 0, False))[0]
            did = lambda before, after: after[0] > before[0]           # noqa: E731  (tiles folded into rows)
        else:
            m = _res(nodes_tomesd.TomePatchModel.execute(model, 0.5))[0]
            did = lambda before, after: after[1] < before[1]           # noqa: E731  (tokens merged)

        def spy(fn):
            def counted(q, k, v, extra_options):
                shape = tuple(q.shape)
                q2, k2, v2 = fn(q, k, v, extra_options)
                probe.calls += 1
                if did(shape, tuple(q2.shape)):
                    probe.acted += 1
                return q2, k2, v2
            return counted
        _wrap_last(m.model_options["transformer_options"]["patches"]["attn1_patch"], spy)
    elif name == "lora":
        m, _ = comfy.sd.load_lora_for_models(model, None, ctx.lora.sd, 1.0, 0.0)
        assert len(m.patches) >= len(ctx.lora.base), "the LoRA loader did not patch the attention weights"
    elif name == "ipadapter":
        m = model.clone()
        ip = IPAdapterStyle(probe)
        probe.want_sites = {s.key for s in ctx.sites if s.kind == "cross"}
        for s in ctx.sites:
            if s.kind == "cross":
                m.set_model_attn2_replace(ip, s.block[0], s.block[1], s.index)
    else:
        raise KeyError(name)
    probe.reset()
    return m, probe


# ============================================================================ pack nodes

PROMPT = "a red circle and a blue square"
SRC, TGT = "a red circle on grey", "a blue circle on grey"


class PackRun:
    """A pack node applied to a model: the patched model and what to sample it with."""

    def __init__(self, name, model, pos, neg, latent, handle=None):
        self.name, self.model, self.pos, self.neg, self.latent, self.handle = name, model, pos, neg, latent, handle

    def sample(self, model=None):
        return sample(self.model if model is None else model, self.pos, self.neg, self.latent)

    def maps_filled(self) -> bool:
        h = self.handle
        return h is not None and h.runs == 1 and h.maps is not None and bool(torch.isfinite(h.maps).all()) \
            and float(h.maps.abs().sum()) > 0


def _half_mask(h=64, w=64):
    m = torch.zeros(h, w)
    m[:, : w // 2] = 1.0
    return m


def _disc(size, cx=0.3, cy=0.3, r=0.18):
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return (((yy - size * cy) ** 2 + (xx - size * cx) ** 2) <= (size * r) ** 2).float()


def _boxes(text):
    return _res(Boxes.execute(text, "fraction", 64, 64))[0]


def build_pack(name: str, model, clip) -> PackRun:
    lat = M.latent(1, *LAT)
    if name == "capture":
        m, handle = _res(CaptureAttention.execute(model, clip, PROMPT, "red, square", "all", 0.0, 1.0, False))
        return PackRun(name, m, encode(clip, PROMPT), encode(clip, ""), lat, handle)
    if name == "p2p":
        m, pos, neg, lt = _res(PromptToPrompt.execute(model, clip, lat, SRC, TGT, "replace", "", 0.8, "", 0.5,
                                                      "", "", 0.3, 0.0, ""))
        return PackRun(name, m, pos, neg, lt)
    if name == "layout":
        m, pos = _res(LayoutGuidance.execute(model, clip, PROMPT, _boxes("red circle: 0,0,0.5,0.5"), "backward",
                                             30.0, 1, 0.0, 0.5, 0.5, "auto", "none"))
        return PackRun(name, m, pos, encode(clip, ""), lat)
    if name == "masactrl":
        m, pos, neg, lt = _res(MasaCtrl.execute(model, clip, lat, "a red circle on the left",
                                                "a red circle on the right", "", 1.0, -1, "mutual", "", "", 0.1))
        return PackRun(name, m, pos, neg, lt)
    if name == "paint":
        m, pos = _res(PaintWithWords.execute(model, clip, PROMPT, "ediff-i", 0.5, "", 1.0, 1.0, "all", 1.0,
                                             _boxes("red circle: 0,0,0.5,1"), None, ""))
        return PackRun(name, m, pos, encode(clip, ""), lat)
    if name == "regions":
        regs = _res(RegionPrompt.execute("a red circle", 1.0, None, _half_mask(), None))[0]
        m, pos = _res(RegionConditioning.execute(model, clip, regs, "grey wall", 0.5, "random"))
        return PackRun(name, m, pos, encode(clip, ""), lat)
    if name == "collage":
        size = LAT[0] * 8
        bg = torch.full((1, size, size, 3), 0.9)
        red = torch.zeros(1, size, size, 3)
        red[..., 0], red[..., 1], red[..., 2] = 0.9, 0.1, 0.1
        ls = _res(CollageLayer.execute(bg, "", 0.6, "opacity (1 = layer)"))[0]
        ls = _res(CollageLayer.execute(red, "a red circle", 0.6, "transparency (LoadImage's MASK)", ls,
                                       1.0 - _disc(size)[None]))[0]
        m, pos, lt, _masks, _comp = _res(CollageLayers.execute(model, clip, ShapesWorldVAE(), ls, 1.0, 1.0, 0, 0.0))
        return PackRun(name, m, pos, encode(clip, ""), lt)
    if name == "tiled":
        # 16x16 canvas, tiles 16 x 12 latent px with 8 px overlap: two tiles side by side, one call
        m = _res(TiledDiffusion.execute(model, 96, 128, 64, "multidiffusion", 2, False, "per tile"))[0]
        return PackRun(name, m, encode(clip, PROMPT), encode(clip, ""), lat)
    if name == "time":
        # a weight patch on every cross-attention K / V (TIME), sampled with a prompt holding the edited words
        m, _edit = _res(EditAssumption.execute(model, clip, "a blue square", "a big blue square", 0.1, True, 1.0))
        return PackRun(name, m, encode(clip, PROMPT), encode(clip, ""), lat)
    if name == "p2pzero":
        # a [reference, edit] batch, red -> blue direction, one cross-attention guidance step per step
        d = _res(EditDirectionNode.execute(clip, SRC, TGT, False))[0]
        m, pos, neg, lt = _res(Pix2PixZero.execute(model, clip, lat, SRC, d, 1.0, 0.15, 1.0, "all", ""))
        return PackRun(name, m, pos, neg, lt)
    if name == "sketch":
        # a predictor trained a few steps on the plain model (cached), an outline to follow
        size = LAT[0] * 8
        sk = torch.ones(1, size, size, 3)
        sk[:, size // 4:3 * size // 4, size // 4] = sk[:, size // 4, size // 4:3 * size // 4] = 0.0
        m = _res(SketchGuidance.execute(model, _sketch_predictor(model, clip), sk, 4.0, 0.0, 1.0, "auto"))[0]
        return PackRun(name, m, encode(clip, PROMPT), encode(clip, ""), lat)
    raise KeyError(name)


_PREDICTOR = {}


def _sketch_predictor(model, clip):
    """Trained once, on the first model it is asked for (the plain model: pack_only runs first)."""
    if "p" not in _PREDICTOR:
        from attention_control.attention.sketch import sobel_edges
        g = torch.Generator().manual_seed(0)
        imgs = torch.rand(2, 3, LAT[0], LAT[1], generator=g)
        with torch.inference_mode():
            _PREDICTOR["p"] = train_predictor(model, torch.randn(2, 4, *LAT, generator=g),
                                              sobel_edges(imgs), encode(clip, PROMPT), 3, 3e-3, 2, 0)[0]
    return _PREDICTOR["p"]



# ============================================================================ shared state

class Ctx:
    def __init__(self, base, clip):
        self.base, self.clip = base, clip
        self.sites = discover_sites(base)
        self.lora = LoraContext(base)
        self.plain_pos, self.plain_neg = encode(clip, PROMPT), encode(clip, "")
        self.options_before = repr(base.model_options)
        self.plain = sample(base, self.plain_pos, self.plain_neg, M.latent(1, *LAT))
        self._pack = {}
        self._foreign = {}

    def pack_only(self, pack):
        if pack not in self._pack:
            p = build_pack(pack, self.base, self.clip)
            out = p.sample()
            self._pack[pack] = (p, out)
        return self._pack[pack]

    def foreign_only(self, foreign, pack):
        key = (foreign, pack)
        if key not in self._foreign:
            p, _ = self.pack_only(pack)
            m, probe = apply_foreign(foreign, self.base, self)
            probe.reset()
            out = p.sample(m)
            assert probe.fired(), f"{foreign} alone did not fire ({probe.describe()})"
            self._foreign[key] = (m, probe, out)
        return self._foreign[key]


def _mark(v):
    return {True: "yes", False: "**NO**", None: "-"}.get(v, str(v))


def _cells(results: dict, key: tuple, fields) -> list[str]:
    """One table cell per order: the marks of `fields` of results[key + (order,)]."""
    cells = []
    for o in ORDERS:
        r = results.get(key + (o,))
        if r is None:
            cells.append("not run")
            continue
        s = " / ".join(_mark(r.get(k)) for k in fields)
        if r.get("error"):
            s += f" (error: {r['error']})"
        cells.append(s)
    return cells


def write_matrix():
    lines = ["# Composition matrix (issue 15 item 4)", "",
             f"tests/test_composition.py on the tiny random SD1.5 UNet, {STEPS} steps, "
             f"{LAT[0]}x{LAT[1]} latent, cfg {CFG}; ComfyUI's own SAG / PAG / FreeU / FreeU_V2 / HyperTile / "
             "ToMe nodes, a LoRA through the LoRA loader (add_patches), an IPAdapter-style attn2 replace.", "",
             "Each cell: fires / effect / pack effect / bit-identical (`yes` or **NO**; `-` = not reached).", "",
             "- fires: the foreign patch fired in the combined run",
             "- effect: combined output != pack-only output",
             "- pack effect: combined output != foreign-only output (capture: maps filled and image == foreign-only)",
             "- bit-identical: the foreign-only model, sampled again after the combined run, == its first output",
             "", "| foreign | pack | foreign first | pack first |", "|---|---|---|---|"]
    for f in FOREIGN:
        for p in PACKS:
            cells = _cells(RESULTS, (f, p), ("fires", "effect", "pack", "identical"))
            lines.append(f"| {f} | {p} | {cells[0]} | {cells[1]} |")
    if COVERAGE:
        lines += ["", "## Router reaches every site under each foreign patch (passthrough controller)", "",
                  "Each cell: every site every step / foreign fires / output == foreign-only bit for bit.", "",
                  "| foreign | foreign first | pack first |", "|---|---|---|"]
        for f in FOREIGN:
            cells = _cells(COVERAGE, (f,), ("sites", "fires", "identical"))
            lines.append(f"| {f} | {cells[0]} | {cells[1]} |")
    if STACKS:
        lines += ["", "## Stacks: capture + P2P + paint-with-words + tiled on one MODEL", "",
                  "| order | capture filled | output with one node removed |", "|---|---|---|"]
        for label, r in STACKS.items():
            rem = ", ".join(f"-{k}: {v}" for k, v in r.get("removed", {}).items())
            err = f" (error: {r['error']})" if r.get("error") else ""
            lines.append(f"| {label} | {_mark(r.get('capture'))} | {rem}{err} |")
    if "leak" in TIMES:
        lines += ["", f"Plain model after all runs == plain baseline: {_mark(TIMES['leak'])}"]
    n = len(RESULTS)
    ok = sum(1 for r in RESULTS.values() if all(r.get(k) for k in ("fires", "effect", "pack"))
             and r.get("identical") is not False)
    lines += ["", f"{ok} of {n} cells pass; module time {time.time() - TIMES['start']:.0f} s.", ""]
    os.makedirs(os.path.dirname(MATRIX_PATH), exist_ok=True)
    with open(MATRIX_PATH, "w") as f:
        f.write("\n".join(lines))
    log.info("composition matrix written to %s (%d of %d cells pass)", MATRIX_PATH, ok, n)


@pytest.fixture(scope="module")
def ctx(sd15, clip_l):
    # one thread for this module's tiny tensors: on 2 shared cores a second OpenMP thread spins against
    # the other processes and costs more than it gives (restored afterwards)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        c = Ctx(sd15, clip_l)
        yield c
        c.lora.close()
    finally:
        torch.set_num_threads(threads)
        write_matrix()


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


# ============================================================================ the matrix

@pytest.mark.parametrize("foreign,pack,order", CELLS, ids=[f"{f}-{p}-{o}" for f, p, o in CELLS])
def test_cell(ctx, foreign, pack, order):
    rec = RESULTS.setdefault((foreign, pack, order), {})
    try:
        pack_run, pack_out = ctx.pack_only(pack)
        f_model, f_probe, f_out = ctx.foreign_only(foreign, pack)
        if order == "foreign_first":
            combined = build_pack(pack, f_model, ctx.clip)
            model, probe = combined.model, f_probe
        else:
            combined = build_pack(pack, ctx.base, ctx.clip)
            model, probe = apply_foreign(foreign, combined.model, ctx)
        probe.reset()
        out = combined.sample(model)
        rec["fires"] = probe.fired()
        fires_how = probe.describe()
        rec["effect"] = not torch.equal(out, pack_out)
        if pack == "capture":
            rec["pack"] = combined.maps_filled() and torch.equal(out, f_out)
        else:
            rec["pack"] = not torch.equal(out, f_out)
        if order == "foreign_first":          # the pack node was given f_model: did it change it?
            f_probe.reset()
            again = pack_run.sample(f_model)
            rec["identical"] = torch.equal(again, f_out)
        else:                                 # f_model took no part in the combined run (its own patches:
            rec["identical"] = None           # the coverage test checks them bit for bit, both orders)
    except Exception as e:
        rec["error"] = _err(e)
        raise
    assert rec["fires"], f"{foreign} did not fire with {pack} ({order}): {fires_how}"
    assert rec["effect"], f"{foreign}'s effect is missing: {pack} + {foreign} ({order}) == {pack} alone"
    if pack == "capture":
        assert combined.maps_filled(), f"capture did not fill its maps under {foreign} ({order})"
        assert torch.equal(out, f_out), f"capture changed the image under {foreign} ({order})"
    assert rec["pack"], f"{pack}'s effect is missing: {pack} + {foreign} ({order}) == {foreign} alone"
    assert rec["identical"] is not False, f"{foreign} alone changed after sampling {pack} + {foreign} ({order})"


# ============================================================================ router coverage

class SiteSpy(core.Controller):
    """A passthrough controller on every site: records (kind, key, step) of each call it is handed."""
    name = "composition spy"
    kinds = frozenset({"self", "cross"})

    def __init__(self):
        self.seen = set()

    def handles(self, call):          # any row layout: it only looks
        return True

    def attend(self, q, k, v, call, nxt):
        self.seen.add((call.site.kind, call.site.key, call.step))
        return nxt(q, k, v)


@pytest.mark.parametrize("foreign,order", [(f, o) for f in FOREIGN for o in ORDERS],
                         ids=[f"{f}-{o}" for f in FOREIGN for o in ORDERS])
def test_router_reaches_every_site(ctx, foreign, order):
    """Item 1/2: whatever the order, the router acts at every site (its stack runs, the foreign patch
    inside it), and a passthrough stack leaves the foreign-only output bit for bit."""
    rec = COVERAGE.setdefault((foreign, order), {})
    pos, neg, lat = ctx.plain_pos, ctx.plain_neg, M.latent(1, *LAT)
    try:
        f_model, f_probe = apply_foreign(foreign, ctx.base, ctx)
        ref = sample(f_model, pos, neg, lat)
        spy = SiteSpy()
        if order == "foreign_first":
            model, probe = attach(f_model, spy), f_probe
        else:
            model, probe = apply_foreign(foreign, attach(ctx.base, spy), ctx)
        probe.reset()
        out = sample(model, pos, neg, lat)
        want = {(s.kind, s.key, st) for s in ctx.sites for st in range(STEPS)}
        missing = sorted(want - spy.seen)
        rec["sites"] = not missing
        rec["fires"] = probe.fired()
        rec["identical"] = torch.equal(out, ref)
    except Exception as e:
        rec["error"] = _err(e)
        raise
    assert not missing, f"the router never ran at {missing[:6]} ({len(missing)} of {len(want)}) under {foreign}"
    assert rec["fires"], f"{foreign} did not fire under the router ({order}): {probe.describe()}"
    assert rec["identical"], f"a passthrough router changed {foreign}'s output ({order})"


# ============================================================================ stacks of pack nodes

STACK_ORDERS = {
    "capture>p2p>paint>tiled": ["capture", "p2p", "paint", "tiled"],
    "tiled>paint>p2p>capture": ["tiled", "paint", "p2p", "capture"],
    "p2p>tiled>capture>paint": ["p2p", "tiled", "capture", "paint"],
}


def _stack(ctx, order):
    """The nodes of `order` applied to one MODEL in that order; P2P's batch (source + target from one
    noise) is what every stack samples; capture and paint use the source prompt."""
    clip = ctx.clip
    lat = M.latent(1, *LAT)
    _, pos, neg, lt = _res(PromptToPrompt.execute(ctx.base, clip, lat, SRC, TGT, "replace", "", 0.8, "", 0.5,
                                                  "", "", 0.3, 0.0, ""))
    m, handle = ctx.base, None
    for node in order:
        if node == "capture":
            m, handle = _res(CaptureAttention.execute(m, clip, SRC, "circle, grey", "all", 0.0, 1.0, False))
        elif node == "p2p":
            m = _res(PromptToPrompt.execute(m, clip, lat, SRC, TGT, "replace", "", 0.8, "", 0.5,
                                            "", "", 0.3, 0.0, ""))[0]
        elif node == "paint":
            m = _res(PaintWithWords.execute(m, clip, SRC, "ediff-i", 0.5, "", 1.0, 1.0, "all", 1.0,
                                            _boxes("circle: 0,0,0.5,1"), None, ""))[0]
        elif node == "tiled":
            m = _res(TiledDiffusion.execute(m, 96, 128, 64, "multidiffusion", 2, False, "per tile"))[0]
    return PackRun("stack", m, pos, neg, lt, handle)


@pytest.mark.parametrize("label", list(STACK_ORDERS), ids=list(STACK_ORDERS))
def test_stack_of_pack_nodes(ctx, label):
    order = STACK_ORDERS[label]
    rec = STACKS.setdefault(label, {"removed": {}})
    try:
        full = _stack(ctx, order)
        out = full.sample()
        rec["capture"] = full.maps_filled()
        for node in order:
            rest = [n for n in order if n != node]
            part = _stack(ctx, rest)
            o = part.sample()
            if node == "capture":
                rec["removed"][node] = "== (capture keeps the image)" if torch.equal(o, out) else "**differs**"
            else:
                rec["removed"][node] = "differs" if not torch.equal(o, out) else "**==** (no effect)"
    except Exception as e:
        rec["error"] = _err(e)
        raise
    assert rec["capture"], f"capture did not fill its maps in the stack {label}"
    for node, v in rec["removed"].items():
        if node == "capture":
            assert v.startswith("=="), f"capture changed the image of the stack {label}"
        else:
            assert v == "differs", f"{node} has no effect in the stack {label}"


# ============================================================================ no leak (runs last)

def test_zz_plain_model_after_all_runs_is_the_plain_baseline(ctx):
    out = sample(ctx.base, ctx.plain_pos, ctx.plain_neg, M.latent(1, *LAT))
    TIMES["leak"] = torch.equal(out, ctx.plain) and repr(ctx.base.model_options) == ctx.options_before \
        and ctx.lora.weights_are_base(ctx.base)
    assert repr(ctx.base.model_options) == ctx.options_before, "the input model's model_options changed"
    assert ctx.lora.weights_are_base(ctx.base), "the LoRA weights stayed in the model"
    assert torch.equal(out, ctx.plain), "the plain model no longer gives the plain baseline"
