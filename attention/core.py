"""Pure-torch core of the attention router: sites, layer selection, per-run state, controllers.

The ComfyUI glue (discovering sites, installing patches, the run wrapper) is in `router.py`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_FAMILIES = "SD1.x, SD2.x and SDXL (UNet models with SpatialTransformer attention)"


class AttentionControlError(ValueError):
    """A configuration error the user can fix; the message names the input and the fix."""


class UnsupportedModelError(AttentionControlError):
    pass


# --------------------------------------------------------------------------------------------
# sites

@dataclass(frozen=True)
class Site:
    """One attention call site: an attn1 (self) or attn2 (cross) of one transformer block."""
    kind: str                  # "self" or "cross"
    block: tuple               # ComfyUI block, e.g. ("input", 7), ("middle", 0), ("output", 3)
    index: int                 # transformer block index inside that SpatialTransformer
    order: int                 # global order of the transformer block in the forward pass
    part: str                  # "down", "mid" or "up"
    ds: int                    # spatial downscale factor relative to the latent
    heads: int
    dim_head: int

    @property
    def key(self) -> tuple:
        return (self.block[0], self.block[1], self.index)

    @property
    def attn(self) -> str:
        return "attn1" if self.kind == "self" else "attn2"

    def label(self, latent_hw=None) -> str:
        res = f"1/{self.ds}" if latent_hw is None else f"{latent_hw[0] // self.ds}x{latent_hw[1] // self.ds}"
        return f"{self.part} {self.block[0]}{self.block[1]}.{self.index} {self.kind} {res}"


# --------------------------------------------------------------------------------------------
# layer selection

@dataclass(frozen=True)
class LayerSelector:
    """Which layers a controller acts on: parts (down/mid/up), map sides at the sampled size, and
    downscale factors. Empty sets mean "any". Text form: comma-separated `all`, `down`, `mid`,
    `up`, integers (attention-map side at the sampled latent size, e.g. 16 for SD1.5's 16x16 layers
    at 512 px) or `1/N` (downscale factor relative to the latent); plain terms combine (AND across
    kinds, OR within a kind). A term `part@side` or `part@1/N` (e.g. `up@1/4`, the form the
    error messages list) is its own alternative: `mid, up@1/4` = the middle block OR the up
    blocks at 1/4."""
    parts: frozenset = frozenset()
    sides: frozenset = frozenset()
    ds: frozenset = frozenset()
    text: str = "all"
    clauses: tuple = ()          # alternatives from part@res terms
    plain: bool = True           # whether the plain terms (or `all`) form an alternative too

    @classmethod
    def parse(cls, text: str, input_name: str = "layers") -> "LayerSelector":
        parts, sides, ds = set(), set(), set()
        clauses = []
        plain = False

        def bad(term):
            return AttentionControlError(
                f"{input_name}: '{term.strip()}' is not a layer term; use all, down, mid, up, a map side "
                "such as 16, a downscale factor such as 1/4, or part@resolution such as up@1/4 (comma-separated)")

        def add_term(t, parts, sides, ds, term):
            if t in ("down", "input"):
                parts.add("down")
            elif t in ("mid", "middle"):
                parts.add("mid")
            elif t in ("up", "output"):
                parts.add("up")
            elif t.isdigit():
                sides.add(int(t))
            elif t.startswith("1/") and t[2:].isdigit():
                ds.add(int(t[2:]))
            else:
                raise bad(term)

        for term in (text or "all").replace(";", ",").split(","):
            t = term.strip().lower()
            if not t:
                continue
            if "@" in t:
                a, _, b = t.partition("@")
                cp, cs, cd = set(), set(), set()
                if a.strip() not in ("down", "input", "mid", "middle", "up", "output") or not b.strip():
                    raise bad(term)
                add_term(a.strip(), cp, cs, cd, term)
                if b.strip() != "all":
                    add_term(b.strip(), cp, cs, cd, term)
                clauses.append(cls(frozenset(cp), frozenset(cs), frozenset(cd), term.strip()))
                continue
            plain = True
            if t == "all":
                continue
            add_term(t, parts, sides, ds, term)
        if not clauses:
            plain = True
        return cls(frozenset(parts), frozenset(sides), frozenset(ds), text or "all", tuple(clauses), plain)

    def _own_static(self, site: Site) -> bool:
        return (not self.parts or site.part in self.parts) and (not self.ds or site.ds in self.ds)

    def _own_match(self, site: Site, latent_hw) -> bool:
        if not self._own_static(site):
            return False
        if self.sides:
            h, w = latent_hw[0] // site.ds, latent_hw[1] // site.ds
            return h in self.sides or w in self.sides
        return True

    def static_match(self, site: Site) -> bool:
        return (self.plain and self._own_static(site)) or any(c._own_static(site) for c in self.clauses)

    def match(self, site: Site, latent_hw) -> bool:
        return (self.plain and self._own_match(site, latent_hw)) or any(c._own_match(site, latent_hw) for c in self.clauses)


def describe_sites(sites, kind: str | None = None, latent_hw=None) -> str:
    seen = []
    for s in sites:
        if kind and s.kind != kind:
            continue
        res = f"1/{s.ds}" if latent_hw is None else f"{latent_hw[0] // s.ds}"
        lab = f"{s.part}@{res}"
        if lab not in seen:
            seen.append(lab)
    return ", ".join(seen)


def select_sites(sites, selector: LayerSelector, kind: str, latent_hw=None, input_name="layers") -> list[Site]:
    """Sites of `kind` chosen by `selector`; an empty choice is an error naming what exists."""
    if latent_hw is None:
        chosen = [s for s in sites if s.kind == kind and selector.static_match(s)]
    else:
        chosen = [s for s in sites if s.kind == kind and selector.match(s, latent_hw)]
    if not chosen:
        where = "" if latent_hw is None else f" at a {latent_hw[0]}x{latent_hw[1]} latent"
        raise AttentionControlError(
            f"{input_name}: '{selector.text}' selects no {kind}-attention layer{where}. "
            f"This model has: {describe_sites(sites, kind, latent_hw)} (part@map side).")
    return chosen


def sites_or_coarsest(sites, selector: LayerSelector, latent_hw, kind: str = "cross") -> list[Site]:
    """Sites of `kind` that `selector` picks at this latent size; when it picks none (a model
    without layers at that resolution), the coarsest layers of that kind play their role."""
    of_kind = [s for s in sites if s.kind == kind]
    chosen = [s for s in of_kind if selector.match(s, latent_hw)]
    if not chosen and of_kind:
        coarsest = max(s.ds for s in of_kind)
        chosen = [s for s in of_kind if s.ds == coarsest]
    return chosen


# --------------------------------------------------------------------------------------------
# per-run state and per-call view

class Run:
    """State of one sampling run; created at OUTER_SAMPLE, dropped when it returns."""

    def __init__(self, router: "Router", latent_shape, sample_sigmas: torch.Tensor, conds=None):
        self.router = router
        self.latent_shape = tuple(latent_shape)
        self.latent_hw = tuple(latent_shape[-2:])
        self.batch = int(latent_shape[0])
        self.sigmas = [float(s) for s in sample_sigmas.flatten().cpu()]
        self.n_steps = max(len(self.sigmas) - 1, 1)
        self.conds = conds or {}
        self.fired: dict = {}          # (kind, key) -> number of routed calls
        self.scratch: dict = {}        # controller id -> per-run data
        self.stacks: dict = {}         # (kind, key) -> controllers acting at this run's size
        self.patches: dict = {}        # (kind, key, id(inner)) -> the router's patch over that inner patch
        self.skipped: set = set()      # (controller name, site key) already logged as standing aside
        self.active_sites: tuple = ()  # sites where some controller acts in this run (set by Router.begin_run)
        self._sig_obj = None
        self._sig_step = (0, 0.0)
        self.noise = None              # the initial noise of the run (latent shape), set by the router
        self.seed = None               # the sampler's seed, when it gives one

    def __deepcopy__(self, memo):
        return self

    def data(self, controller) -> dict:
        return self.scratch.setdefault(id(controller), {})

    def step_of(self, sigmas) -> tuple[int, float]:
        """(step index, sigma) of a model call: the schedule interval that contains its sigma, so
        samplers that evaluate between schedule points (heun, dpmpp_sde, ...) map to their step."""
        if sigmas is self._sig_obj:
            return self._sig_step
        sig = float(sigmas.flatten()[0]) if torch.is_tensor(sigmas) else float(sigmas)
        n_ge = sum(1 for s in self.sigmas[:-1] if s >= sig * (1 - 1e-5) - 1e-8)
        step = min(max(n_ge - 1, 0), self.n_steps - 1)
        self._sig_obj, self._sig_step = sigmas, (step, sig)
        return self._sig_step


def sample_in_run(router, to: dict, run_key: str, executor, noise, latent_image, sampler, sigmas, args, kwargs):
    """The OUTER_SAMPLE body of both routers: a Run for this sampling run in `to[run_key]` (the
    guider's transformer_options), controllers' begin_run before the first step (configuration
    errors surface there) and end_run after it, even on error; nothing of the run stays behind."""
    guider = executor.class_obj
    run = Run(router, noise.shape, sigmas, getattr(guider, "conds", None))
    run.noise = noise                 # the run's initial noise (controllers that re-noise latents use it)
    run.seed = args[3] if len(args) > 3 else kwargs.get("seed")
    router.begin_run(run)
    to[run_key] = run
    ok = False
    try:
        out = executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        ok = True
        return out
    finally:
        to.pop(run_key, None)
        router.end_run(run, ok)
        run.scratch.clear()


def chain_model_controllers(ctrls, apply, x, t, run: Run, options: dict):
    """One model call through the whole-model-call controllers `ctrls` (the last one outermost),
    each given `apply(x)` for the rest; `apply` runs the model."""
    cou = list(options.get("cond_or_uncond", [0]))

    def run_from(i):
        if i < 0:
            return apply
        below = run_from(i - 1)
        return lambda x_: ctrls[i].apply_model(below, x_, t, run, cou, options)

    return run_from(len(ctrls) - 1)(x)


def require_prompt_length(run: Run, prompt_len: int, node: str) -> None:
    """The positive conditioning of the run must come from the node's prompt (same token count)."""
    for c in run.conds.get("positive", []) or []:
        ca = c.get("cross_attn") if isinstance(c, dict) else None
        if ca is not None and ca.shape[1] != prompt_len:
            raise AttentionControlError(
                f"prompt: the {node} node's prompt has {prompt_len} tokens but the positive conditioning has "
                f"{ca.shape[1]}; use the node's conditioning output, or encode the same prompt text")


class Call:
    """What a controller knows about one attention call.

    Rows of q/k/v are laid out (chunk, item, fold): one chunk per entry of cond_or_uncond, `batch`
    latent items per chunk, and `fold` rows per item where another patch folded spatial tiles into
    the batch (core HyperTile: each item's queries split into `fold` tiles of `tokens` tokens; its keys
    and values keep one row per item, `kv_fold` == 1, and the host's attention reads them in row
    bands). `plain` says the call has the layer's own layout (one row per item, h*w tokens), which
    controllers that read spatial maps need."""
    __slots__ = ("site", "run", "extra", "step", "sigma", "h", "w", "cond_or_uncond", "batch", "attention",
                 "guidance", "fold", "kv_fold", "tokens", "plain")

    def __init__(self, site: Site, run: Run, extra: dict, n_rows: int, attention=None, guidance=None,
                 n_tokens: int | None = None, n_kv_rows: int | None = None):
        self.site = site
        # the state of the guidance pass this call belongs to (None in a normal sampling forward)
        self.guidance = guidance
        # attention(q, k, v) -> output: the host's fused attention for rows of any batch size
        self.attention = attention
        self.run = run
        self.extra = extra
        self.step, self.sigma = run.step_of(extra.get("sigmas"))
        shp = extra.get("activations_shape")
        if shp is not None:
            self.h, self.w = int(shp[-2]), int(shp[-1])
        else:
            self.h, self.w = run.latent_hw[0] // site.ds, run.latent_hw[1] // site.ds
        self.cond_or_uncond = list(extra.get("cond_or_uncond", [0]))
        self.batch, self.fold = row_layout(len(self.cond_or_uncond), n_rows, run.batch)
        kv_batch, self.kv_fold = (self.batch, self.fold) if n_kv_rows is None else \
            row_layout(len(self.cond_or_uncond), n_kv_rows, run.batch)
        if kv_batch != self.batch:
            self.kv_fold = 0                  # keys laid out unlike the queries: no row mapping
        self.tokens = n_tokens
        self.plain = self.fold == 1 and self.kv_fold == 1 and (n_tokens is None or n_tokens == self.h * self.w)

    def chunk(self, j: int) -> slice:
        """Rows of the j-th chunk of the batch (one chunk per entry of cond_or_uncond)."""
        n = self.batch * self.fold
        return slice(j * n, (j + 1) * n)

    def rows(self, j: int, i: int) -> list[int]:
        """Query rows of latent item i in chunk j (`fold` rows; one unless a patch folded tiles into the batch)."""
        r = (j * self.batch + i) * self.fold
        return list(range(r, r + self.fold))

    def kv_rows(self, j: int, i: int) -> list[int]:
        """Key / value rows of latent item i in chunk j."""
        r = (j * self.batch + i) * self.kv_fold
        return list(range(r, r + self.kv_fold))

    def cond_chunks(self) -> list[int]:
        return [j for j, c in enumerate(self.cond_or_uncond) if c == 0]

    def uncond_chunks(self) -> list[int]:
        return [j for j, c in enumerate(self.cond_or_uncond) if c == 1]

    def cond_rows(self) -> torch.Tensor:
        n = self.batch * self.fold
        idx = [r for j in self.cond_chunks() for r in range(j * n, (j + 1) * n)]
        return torch.tensor(idx, dtype=torch.long)

    def describe_layout(self) -> str:
        kv = "" if self.kv_fold == self.fold else f", keys {self.kv_fold or 'unmatched'} row(s) per item"
        return (f"{self.fold} rows per item, {self.tokens} tokens per row for a {self.h}x{self.w} layer{kv}"
                if self.tokens is not None else f"{self.fold} rows per item{kv}")


def row_layout(n_chunks: int, n_rows: int, latent_batch: int) -> tuple[int, int]:
    """(items per chunk, rows per item) of an attention call with n_rows rows. The latent batch of the
    run gives the items; a whole multiple of chunks x items means another patch folded tiles into the
    rows (HyperTile puts the tiles of each item next to each other)."""
    n_chunks = max(n_chunks, 1)
    per = n_chunks * latent_batch
    if latent_batch > 0 and n_rows >= per and n_rows % per == 0:
        return latent_batch, n_rows // per
    return n_rows // n_chunks, 1


# --------------------------------------------------------------------------------------------
# controllers

class Controller:
    """Base class of everything that acts on attention calls.

    Subclasses set `kinds` ({"self"}, {"cross"} or both) and `selector`, and override `attend`.
    `q, k, v` of a call are that call's own projections: a controller may overwrite rows in place
    before handing them on, and must not read them after calling `nxt`.
    `begin_run` validates against the run (latent size, conditioning) before the first step and
    raises AttentionControlError on a bad configuration; `end_run` publishes results.
    """
    kinds: frozenset = frozenset({"cross"})
    selector: LayerSelector = LayerSelector()
    name = "controller"
    # controllers that also act on whole model calls (latent blending, ...) set this and override
    # apply_model(self, apply, x, sigma, run, cond_or_uncond, options) -> denoised (options: the
    # call's transformer_options: uuids of the cond chunks, tile pieces, ...)
    wraps_model = False
    # controllers that act on the guided prediction of a whole step (gradient guidance) set this
    # and override guide(self, predict, x, sigma, run, passes) -> denoised
    wraps_guider = False

    def __deepcopy__(self, memo):
        return self

    def validate_sites(self, sites) -> None:
        for kind in self.kinds:
            select_sites(sites, self.selector, kind, input_name=f"{self.name} layers")

    def wants(self, site: Site) -> bool:
        """Static choice (install time): a superset of the sites acted on in any run."""
        return site.kind in self.kinds and self.selector.static_match(site)

    def wants_at(self, site: Site, latent_hw) -> bool:
        """Choice for one run, once the latent size is known (map sides)."""
        return site.kind in self.kinds and self.selector.match(site, latent_hw)

    def begin_run(self, run: Run) -> None:
        for kind in self.kinds:
            select_sites(run.router.sites, self.selector, kind, run.latent_hw, input_name=f"{self.name} layers")

    def end_run(self, run: Run, ok: bool) -> None:
        pass

    def attend(self, q, k, v, call: Call, nxt):
        return nxt(q, k, v)

    def handles(self, call: Call) -> bool:
        """Whether this controller can act on `call`'s row and token layout. By default only on the
        layer's own layout (`call.plain`); the router passes other calls on (the host's or the inner
        patch's attention) and logs that once per run. Controllers that only move whole rows between
        items override this and use `call.rows`."""
        return call.plain

    def apply_model(self, apply, x, sigma, run: Run, cond_or_uncond, options=None):
        return apply(x)

    def guide(self, predict, x, sigma, run: Run, passes):
        """predict(x) -> the step's denoised prediction (CFG and every other controller included);
        passes.cond_pass(x, state) runs a positive-only forward in which only this controller's
        attend sees the calls (with `call.guidance` = state) and may stop it with StopForward."""
        return predict(x)


class StopForward(Exception):
    """Raised by a controller inside a guidance pass once it has what it needs (skips the rest
    of the UNet forward)."""


class Router:
    """An immutable stack of controllers over the sites of one model."""

    def __init__(self, sites: tuple, controllers: tuple = ()):
        self.sites = sites
        self.controllers = tuple(controllers)
        self._stacks = {(s.kind, s.key): tuple(c for c in self.controllers if c.wants(s)) for s in sites}

    def __deepcopy__(self, memo):
        return self

    def stack(self, site: Site) -> tuple:
        return self._stacks.get((site.kind, site.key), ())

    def begin_run(self, run: Run) -> None:
        for c in self.controllers:
            c.begin_run(run)
        run.stacks = {key: tuple(c for c in st if c.wants_at(site, run.latent_hw))
                      for site in self.sites for key, st in [((site.kind, site.key), self.stack(site))]}
        run.active_sites = tuple(s for s in self.sites if run.stacks.get((s.kind, s.key)))

    def end_run(self, run: Run, ok: bool) -> None:
        for c in self.controllers:
            c.end_run(run, ok)


