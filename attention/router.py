"""The attention router: the ONE module of the pack that touches ComfyUI's patch plumbing.

One `Router` per patched model. It routes the `attn1` / `attn2` calls of the attention blocks the
model actually has (discovered from the module tree, never hard-coded) to an ordered stack of
controllers (middleware: the controller added last is outermost and receives a `nxt(q, k, v)`
callable that runs the rest of the stack and finally the default).

Composition in any order. The router's replace patches are never stored in the MODEL's
`model_options`: an `APPLY_MODEL` wrapper installs them into the per-call copy of
`transformer_options` of every model call of a run, over whatever replace patch that call carries at
the site, under the three-part key `(block, id, index)` or, where none, the two-part `(block, id)`
(the host's own lookup order). That patch (IPAdapter, attention couple, core SAG installed at node
time, core PAG installed at call time inside a copied `model_options`, another pack's override set
before or after ours) is the innermost default of the stack. So the order in which nodes patched
the MODEL does not matter, and the MODEL stays free of our patches for anyone who inspects it.

The default is ComfyUI's own `optimized_attention` where no such patch exists.

Row layouts: another patch may change the rows or tokens of a call (HyperTile folds spatial tiles
into the batch, ToMe merges tokens). `Call.fold` / `Call.rows` describe the rows; a controller that
cannot act on such a call (it reads spatial maps) stands aside there, with one log line per run.

State:
- the Router sits in `model_options["transformer_options"][ROUTER_KEY]`; `__deepcopy__` returns
  self, so `ModelPatcher.clone()` shares it instead of silently duplicating it. Adding a controller
  builds a *new* Router on the clone, so upstream branches of a graph keep their own stack.
- per-run state (`Run`) is created by an OUTER_SAMPLE wrapper when sampling starts, placed in the
  per-run copy of transformer_options (so every attention call sees it through extra_options), and
  dropped when sampling ends, even on error. Nothing global, nothing leaks into the next run.
"""
from __future__ import annotations

import logging

import torch
import comfy.ldm.modules.attention as comfy_attention
import comfy.patcher_extension as comfy_ext

ROUTER_KEY = "attention_control_router"
RUN_KEY = "attention_control_run"
GUIDE_KEY = "attention_control_guidance"
WRAPPER_KEY = "attention_control"

from .dit_router import DitController, attach_dit, is_dit  # noqa: F401  (one router interface)
from .core import (SUPPORTED_FAMILIES, AttentionControlError, Call, Controller, Router, Run, Site, StopForward,
                   chain_model_controllers, sample_in_run,
                   UnsupportedModelError)

log = logging.getLogger("attention_control")

__all__ = ["attach", "get_router", "discover_sites", "AttentionControlError", "UnsupportedModelError",
           "Controller", "ROUTER_KEY", "RUN_KEY"]


def _is_spatial_transformer(m) -> bool:
    return hasattr(m, "transformer_blocks") and hasattr(m, "proj_in")


def model_family(model_patcher) -> str:
    cfg = getattr(model_patcher.model, "model_config", None)
    return type(cfg).__name__ if cfg is not None else type(model_patcher.model).__name__


def discover_sites(model_patcher) -> tuple[Site, ...]:
    """All attention sites of a UNet model, in forward order, with their downscale factor."""
    dm = getattr(model_patcher.model, "diffusion_model", None)
    if dm is None or not all(hasattr(dm, a) for a in ("input_blocks", "middle_block", "output_blocks")):
        if is_dit(model_patcher):
            raise UnsupportedModelError(
                f"model: {model_family(model_patcher)} is a transformer (DiT) model; this node works on "
                f"{SUPPORTED_FAMILIES} so far (editing on DiT models is planned). On DiT models the capture, "
                "region prompt, paint-with-words and tiled sampling nodes work.")
        raise UnsupportedModelError(
            f"model: {model_family(model_patcher)} is not supported yet. Attention Control supports "
            f"{SUPPORTED_FAMILIES} and the DiT families of the capture node; connect a model of one of those "
            "families.")
    sites: list[Site] = []
    order = 0
    ds = 1

    def add(block, st, part, ds):
        nonlocal order
        for j, tb in enumerate(st.transformer_blocks):
            for kind, attn in (("self", tb.attn1), ("cross", getattr(tb, "attn2", None))):
                if attn is None:
                    continue
                sites.append(Site(kind, block, j, order, part, ds, attn.heads, attn.dim_head))
            order += 1

    for i, blk in enumerate(dm.input_blocks):
        for layer in blk:
            if _is_spatial_transformer(layer):
                add(("input", i), layer, "down", ds)
        if any(type(layer).__name__ == "Downsample" for layer in blk):
            ds *= 2
    for layer in dm.middle_block:
        if _is_spatial_transformer(layer):
            add(("middle", 0), layer, "mid", ds)
    for i, blk in enumerate(dm.output_blocks):
        for layer in blk:
            if _is_spatial_transformer(layer):
                add(("output", i), layer, "up", ds)
        if any(type(layer).__name__ == "Upsample" for layer in blk):
            ds //= 2
    if not sites:
        raise UnsupportedModelError(
            f"model: {model_family(model_patcher)} has no cross-attention transformer blocks; "
            f"Attention Control supports {SUPPORTED_FAMILIES}.")
    return tuple(sites)


def default_attention(q, k, v, extra: dict, inner=None):
    """What the block would have computed without us: a pre-existing patch, or ComfyUI's own."""
    if inner is not None:
        return inner(q, k, v, extra)
    return comfy_attention.optimized_attention(
        q, k, v, extra["n_heads"], attn_precision=extra.get("attn_precision"), transformer_options=extra)


class _Default:
    """The innermost `nxt` of a stack: the pre-existing patch or the host's attention. `bare` says
    that it is the host's own row-independent attention, so a controller may hand it a subset of
    the rows (e.g. only the rows it does not compute itself)."""
    __slots__ = ("extra", "inner", "bare")

    def __init__(self, extra: dict, inner):
        self.extra, self.inner, self.bare = extra, inner, inner is None

    def __call__(self, q, k, v):
        return default_attention(q, k, v, self.extra, self.inner)


class RouterPatch:
    """The callable the router installs in a model call's patches_replace; stateless apart from its
    site and the patch it found there (`inner`, called as the innermost default)."""

    def __init__(self, site: Site, inner=None):
        self.site = site
        self.inner = inner

    def __deepcopy__(self, memo):
        return self

    def __call__(self, q, k, v, extra_options):
        router = extra_options.get(ROUTER_KEY)
        run = extra_options.get(RUN_KEY)
        inner = self.inner
        if router is None or run is None:
            return default_attention(q, k, v, extra_options, inner)
        stack = run.stacks.get((self.site.kind, self.site.key))
        guidance = extra_options.get(GUIDE_KEY)
        if guidance is not None and stack:
            # a guidance pass belongs to one controller: the others neither act nor record
            stack = tuple(c for c in stack if c is guidance.controller)
        out = self._attend(q, k, v, extra_options, run, stack, guidance) if stack else \
            default_attention(q, k, v, extra_options, inner)
        if self.site.kind == "self" and inner is None and guidance is None:
            release_projections(out, k, v)
        return out

    def _attend(self, q, k, v, extra_options, run, stack, guidance):
        inner = self.inner
        key = (self.site.kind, self.site.key)
        run.fired[key] = run.fired.get(key, 0) + 1
        site = self.site

        def fused(q_, k_, v_):
            return comfy_attention.optimized_attention(q_, k_, v_, site.heads, attn_precision=extra_options.get("attn_precision"),
                                                       transformer_options=extra_options)

        call = Call(site, run, extra_options, q.shape[0], fused, guidance, n_tokens=q.shape[1], n_kv_rows=k.shape[0])
        if not call.plain:
            stack = self._layout_stack(stack, call, run)
            if not stack:
                return default_attention(q, k, v, extra_options, inner)

        def run_from(i):
            if i < 0:
                return _Default(extra_options, inner)
            ctrl = stack[i]
            below = run_from(i - 1)
            return lambda q_, k_, v_: ctrl.attend(q_, k_, v_, call, below)

        return run_from(len(stack) - 1)(q, k, v)

    def _layout_stack(self, stack, call, run):
        """The controllers that can act on a call whose rows or tokens another patch changed; the
        others stand aside at this site, said once per run."""
        kept = []
        for c in stack:
            if c.handles(call):
                kept.append(c)
                continue
            tag = (c.name, self.site.kind, self.site.key)
            if tag not in run.skipped:
                run.skipped.add(tag)
                log.warning("attention_control: %s stands aside at %s: another patch on the MODEL changed this "
                            "layer's attention layout (%s; e.g. HyperTile or ToMe); move that patch off these "
                            "layers for the full effect", c.name, self.site.label(), call.describe_layout())
        return tuple(kept)


def release_projections(out, *tensors) -> None:
    """Free the storage of a self-attention's K and V once its output is computed.

    ComfyUI's replace path (BasicTransformerBlock: `context_attn1 = to_k(...)`, `value_attn1 =
    to_v(...)`, then the patch) keeps both projections referenced by the block's locals until the
    block returns, i.e. through cross-attention and the feed-forward, where the block peaks; its own
    unpatched path frees them with the attention. The block never reads them again, so we empty the
    tensors it handed us (`set_()`), which restores the unpatched peak (whether or not a controller
    acted at this site in this run). Only when nothing else can
    hold them: our own stack below (controllers keep no K/V beyond a call; another pack's patch
    below us disables this), no autograd, no view, no storage shared with the output."""
    if torch.is_grad_enabled():
        return
    out_ptr = out.untyped_storage().data_ptr()
    for t in tensors:
        if (t._base is not None or t.untyped_storage().data_ptr() == out_ptr
                or (t.is_inference() and not torch.is_inference_mode_enabled())):
            continue
        t.set_()


# --------------------------------------------------------------------------------------------
# installation and run lifecycle

def _outer_sample_wrapper(executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
    to = executor.class_obj.model_options.setdefault("transformer_options", {})
    router = to.get(ROUTER_KEY)
    if router is None:
        return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
    return sample_in_run(router, to, RUN_KEY, executor, noise, latent_image, sampler, sigmas, args, kwargs)


def _route_patches(run: Run, transformer_options: dict) -> dict:
    """transformer_options of one model call with the router's patches over whatever replace patch
    the call carries at each site the run's controllers act on (three-part key first, then the
    two-part `(block, id)` key, as the host looks them up). Nothing shared is mutated."""
    sites = run.active_sites
    if not sites:
        return transformer_options
    pr = transformer_options.get("patches_replace") or {}
    tables = {name: dict(pr.get(name) or {}) for name in ("attn1", "attn2")}
    for site in sites:
        table = tables[site.attn]
        cur = table.get(site.key)
        if isinstance(cur, RouterPatch):          # our own patch from an enclosing call: route its inner
            cur = cur.inner
        if cur is None:
            cur = table.get(site.block)
        tag = (site.kind, site.key, id(cur))
        patch = run.patches.get(tag)
        if patch is None or patch.inner is not cur:
            patch = run.patches[tag] = RouterPatch(site, cur)
        table[site.key] = patch
    new_pr = dict(pr)
    new_pr.update(tables)
    to = dict(transformer_options)
    to["patches_replace"] = new_pr
    return to


def _apply_model_wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                         **kwargs):
    run = transformer_options.get(RUN_KEY)
    router = transformer_options.get(ROUTER_KEY)
    if run is None or router is None or run.router is not router:
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    to = _route_patches(run, transformer_options)
    ctrls = [c for c in router.controllers if c.wraps_model]
    if not ctrls or to.get(GUIDE_KEY) is not None:
        return executor(x, t, c_concat, c_crossattn, control, to, **kwargs)
    return chain_model_controllers(ctrls, lambda x_: executor(x_, t, c_concat, c_crossattn, control, to, **kwargs),
                                   x, t, run, to)


_BLOCK_PATCHES = ("input_block_patch", "input_block_patch_after_skip", "output_block_patch")


class _OutOfPlace:
    """Runs a block patch so that its in-place writes keep the guidance gradient exact while autograd
    records. Core FreeU_V2 computes `h[:, :C/2] = h[:, :C/2] * f(h)`: the product saves the slice it
    then overwrites ("modified by an inplace operation" at backward). The patch gets copies of its
    tensor arguments (the caller's saved tensors stay intact), and every tensor autograd saves inside
    the patch is saved as a copy taken at that moment (saved-tensor hooks), which is the value the
    gradient needs. Only in guidance passes; the copies live until the backward of that pass."""
    __slots__ = ("patch",)

    def __init__(self, patch):
        self.patch = patch

    def __call__(self, *args):
        if not torch.is_grad_enabled():
            return self.patch(*args)
        args = tuple(a.clone() if torch.is_tensor(a) else a for a in args)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
            return self.patch(*args)


def _grad_safe_block_patches(patches: dict) -> dict:
    out = dict(patches)
    for name in _BLOCK_PATCHES:
        if out.get(name):
            out[name] = [p if isinstance(p, _OutOfPlace) else _OutOfPlace(p) for p in out[name]]
    return out


def _cond_rows(cond: dict, idx: torch.Tensor, batch: int) -> dict:
    """A processed conditioning entry at latent rows `idx` of a `batch`-item step: every per-item
    model input (first dimension `batch`) and a per-item mask taken at those rows; inputs shared by
    all items (first dimension 1) are left to the host's broadcasting."""
    out = dict(cond)
    mc = {}
    for key, val in (cond.get("model_conds") or {}).items():
        t = getattr(val, "cond", None)
        if torch.is_tensor(t) and t.dim() and t.shape[0] == batch and batch > 1 and hasattr(val, "_copy_with"):
            val = val._copy_with(t.index_select(0, idx.to(t.device)))
        mc[key] = val
    out["model_conds"] = mc
    m = cond.get("mask")
    if torch.is_tensor(m) and m.dim() == 3 and m.shape[0] == batch and batch > 1:
        out["mask"] = m.index_select(0, idx.to(m.device))
    return out


class GuidancePasses:
    """What a guiding controller may run inside one step: positive-only forwards of the model, CFG
    predictions with other positive conditioning, and the host's conditioning weights."""

    def __init__(self, guider, timestep, model_options: dict, guide_key: str = GUIDE_KEY):
        self.guider = guider
        self.timestep = timestep
        self.model_options = model_options
        self.guide_key = guide_key            # where the guidance state goes (the UNet or the DiT router's key)

    def cond_pass(self, x, state, rows: list[int] | None = None) -> None:
        """One forward of the positive conditioning at `x` (gradients as enabled by the caller);
        the calls reach only `state.controller`, which reads `call.guidance` (= state) and may end
        the forward early with StopForward. `rows`: the latent items of the step's batch that `x`
        holds (x = those items only); the conditioning and timestep are taken at those rows."""
        import comfy.samplers
        positive = self.guider.conds.get("positive", None)
        timestep = self.timestep
        if rows is not None:
            batch = int(timestep.shape[0]) if torch.is_tensor(timestep) and timestep.dim() else None
            if batch is None or len(rows) != x.shape[0]:
                raise AttentionControlError(f"guidance pass: rows {rows} do not match a latent of {x.shape[0]} items")
            idx = torch.tensor(rows, dtype=torch.long)
            positive = [_cond_rows(c, idx, batch) for c in positive or []]
            timestep = timestep.index_select(0, idx.to(timestep.device))
        mo = dict(self.model_options)
        to = dict(mo.get("transformer_options", {}))
        to[self.guide_key] = state
        patches = to.get("patches")
        if patches:
            to["patches"] = _grad_safe_block_patches(patches)
        mo["transformer_options"] = to
        try:
            comfy.samplers.calc_cond_batch(self.guider.inner_model, [positive], x, timestep, mo)
        except StopForward:
            pass

    def cfg_prediction(self, positive: list, x):
        """The guider's CFG prediction at `x` with `positive` as the positive conditioning (the
        guider's negative, cfg scale and CFG functions as in its own step)."""
        import comfy.samplers
        g = self.guider
        return comfy.samplers.sampling_function(g.inner_model, x, self.timestep, g.conds.get("negative", None),
                                                positive, g.cfg, model_options=self.model_options)

    def cond_weight(self, positive: list, x):
        """The per-pixel weight the host gives `positive` when it averages conditioning entries (the
        sum of their masks x strengths over their areas), shaped like x."""
        import comfy.samplers
        total = torch.zeros_like(x)
        for c in positive or []:
            p = comfy.samplers.get_area_and_mult(c, x, self.timestep)
            if p is None:
                continue
            view = total
            if p.area is not None:
                dims = len(p.area) // 2
                for i in range(dims):
                    view = view.narrow(i + 2, p.area[i + dims], p.area[i])
            view += p.mult
        return total

    def unet_modules(self, last_site: Site | None = None) -> list:
        """The UNet modules a forward runs up to (and including) the block of `last_site`."""
        dm = self.guider.inner_model.diffusion_model
        mods = [getattr(dm, n, None) for n in ("time_embed", "label_emb", "input_blocks", "middle_block")]
        if last_site is None or last_site.block[0] == "output":
            n_out = len(dm.output_blocks) if last_site is None else last_site.block[1] + 1
            mods += list(dm.output_blocks[:n_out])
        if last_site is None:
            mods += [getattr(dm, "out", None)]
        return [m for m in mods if m is not None]


def _predict_noise_wrapper(executor, x, timestep, model_options={}, seed=None):
    return guided_predict_noise(executor, x, timestep, model_options, seed, RUN_KEY, ROUTER_KEY, GUIDE_KEY)


def guided_predict_noise(executor, x, timestep, model_options, seed, run_key: str, router_key: str, guide_key: str):
    """The PREDICT_NOISE wrapper of both routers (their keys given): the router's guidance
    controllers (`wraps_guider`, the last one outermost) around one whole step, each given the
    step below it; a guidance pass's own calls (`guide_key` set) go straight to the host."""
    to = model_options.get("transformer_options", {})
    run = to.get(run_key)
    router = to.get(router_key)
    ctrls = [c for c in router.controllers if c.wraps_guider] if (run is not None and router is not None) else []
    if not ctrls or to.get(guide_key) is not None:
        return executor(x, timestep, model_options, seed)
    passes = GuidancePasses(executor.class_obj, timestep, model_options, guide_key=guide_key)

    def run_from(i):
        if i < 0:
            return lambda x_: executor(x_, timestep, model_options, seed)
        below = run_from(i - 1)
        return lambda x_: ctrls[i].guide(below, x_, timestep, run, passes)

    return run_from(len(ctrls) - 1)(x)


def get_router(model_patcher) -> Router | None:
    return model_patcher.model_options.get("transformer_options", {}).get(ROUTER_KEY)


def attach(model_patcher, controller: Controller):
    """Clone `model_patcher` and add `controller` on top of its router stack (creating the router).

    One entry point for both kinds of host: a `DitController` goes to the DiT router
    (`dit_router.attach_dit`: the attention-override slot of transformer models), any other
    controller to the UNet router below.

    The input model is untouched, and so are the clone's patches_replace: the router's patches are
    installed per model call (see `_route_patches`), whatever other patches the MODEL gets before or
    after this node. Raises AttentionControlError / UnsupportedModelError before anything is patched.
    """
    if isinstance(controller, DitController):
        return attach_dit(model_patcher, controller)
    old = get_router(model_patcher)
    sites = old.sites if old is not None and old.sites else None
    if sites is None:
        try:
            sites = discover_sites(model_patcher)
        except UnsupportedModelError:
            if controller.kinds:
                raise
            sites = ()           # a controller of whole model calls only (region bootstrapping): any family
    controller.validate_sites(sites)
    m = model_patcher.clone()
    router = Router(sites, (old.controllers if old is not None else ()) + (controller,))
    to = m.model_options.setdefault("transformer_options", {})
    to[ROUTER_KEY] = router
    if not m.get_wrappers(comfy_ext.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY):
        m.add_wrapper_with_key(comfy_ext.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, _outer_sample_wrapper)
    if not m.get_wrappers(comfy_ext.WrappersMP.APPLY_MODEL, WRAPPER_KEY):
        m.add_wrapper_with_key(comfy_ext.WrappersMP.APPLY_MODEL, WRAPPER_KEY, _apply_model_wrapper)
    if controller.wraps_guider and not m.get_wrappers(comfy_ext.WrappersMP.PREDICT_NOISE, WRAPPER_KEY):
        m.add_wrapper_with_key(comfy_ext.WrappersMP.PREDICT_NOISE, WRAPPER_KEY, _predict_noise_wrapper)
    return m


def comfyui_version() -> str | None:
    try:
        import comfyui_version  # type: ignore
        return comfyui_version.__version__
    except Exception:
        return None
