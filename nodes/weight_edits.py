"""Nodes: AttnCtl_EditAssumption (TIME), AttnCtl_SaveAssumptionEdit, AttnCtl_LoadAssumptionEdit.

The edit is a weight patch on the model's K and V cross-attention projections (ModelPatcher patches, the
way LoRAs apply: the weights are never changed in place, strength 0 adds nothing, the unpatched MODEL
upstream is untouched)."""
from __future__ import annotations

import json
import logging
import os
import time

import torch
from comfy_api.latest import io

import comfy.weight_adapter.base as wa_base

from ..attention.core import AttentionControlError, UnsupportedModelError
from ..attention.dit_router import is_dit
from ..attention.router import model_family
from ..attention.time_edit import AlignmentError, TimeEdit, align_positions, augmented, time_edit
from ..attention.validate import check_finite
from . import weight_files
from .common import CATEGORY, check_widgets, sd_tokenizer, validation_result
from .dit_tokens import is_dit_clip

log = logging.getLogger("attention_control.time")

EditType = io.Custom("ATTNCTL_ASSUMPTION_EDIT")
FOLDER = "attention_edits"
FORMAT = "attention_control.time/1"
L = 77


# --------------------------------------------------------------------------------------------
# prompts -> aligned embeddings

def prompt_lines(text: str) -> list[str]:
    return [ln.strip() for ln in (text or "").splitlines() if ln.strip()]


def check_prompt_lines(sources: str, destinations: str) -> tuple[list[str], list[str]]:
    src, dst = prompt_lines(sources), prompt_lines(destinations)
    if not src:
        raise AttentionControlError("source_prompts: give at least one prompt (one per line), e.g. 'a pack of roses'")
    if len(src) != len(dst):
        raise AttentionControlError(
            f"destination_prompts: {len(dst)} line(s) for {len(src)} source line(s); give one destination per "
            f"source line (line 1 edits into line 1 ...), e.g. 'a pack of roses' -> 'a pack of blue roses'")
    return src, dst


class _Tokens:
    """A prompt's single-chunk token ids, start token to end token, for the alignment."""

    def __init__(self, clip, text: str, role: str):
        toks = clip.tokenize(text)
        key = "l" if "l" in toks else next(iter(toks))
        chunks = toks[key]
        if len(chunks) != 1:
            raise AttentionControlError(f"{role}: '{text[:40]}...' is longer than 75 tokens; TIME edits prompts "
                                        "of one chunk")
        ids = [t[0] for t in chunks[0]]
        if not all(isinstance(t, int) for t in ids):
            raise AttentionControlError(f"{role}: '{text}' uses a textual-inversion embedding; TIME aligns "
                                        "prompts by their token ids, write the words instead")
        eos = getattr(sd_tokenizer(clip), "end_token", None)
        end = ids.index(eos, 1) if eos in ids[1:] else len(ids) - 1
        self.ids = ids[:end + 1]
        for other, och in toks.items():       # SDXL: CLIP-G must put every word at the same positions
            if other != key and [t[0] for t in och[0]][1:end] != self.ids[1:end]:
                raise AttentionControlError(f"{role}: the text encoders tokenize '{text}' differently; TIME "
                                            "cannot align its words")


def _embed_all(clip, texts: list[str]) -> list[torch.Tensor]:
    """The (77, d) embedding of each single-chunk prompt, from one batched text-encoder call (ComfyUI encodes
    the chunks of a token list as one batch and concatenates them, each chunk on its own)."""
    toks = [clip.tokenize(t) for t in texts]
    merged = {k: [ch for tk in toks for ch in tk[k]] for k in toks[0]}
    cond = clip.encode_from_tokens(merged)
    if cond.dim() != 3 or cond.shape[1] != L * len(texts):
        raise AttentionControlError(f"clip: {len(texts)} prompts encode to {tuple(cond.shape)}; TIME needs one "
                                    f"{L}-token chunk per prompt (SD1.x / SD2.x / SDXL text encoders)")
    return list(cond[0].float().split(L))


def _fold(text: str) -> str:
    t = text.replace("\u2581", " ").strip().lower()
    return "a" if t == "an" else t


def dit_align_rows(sctx, dctx) -> list[int]:
    """For every row of the source's context (a DiT text encoder's, nodes/dit_tokens.DitContext), the
    destination row it aligns to: per text-encoder part, template rows before the prompt by their offset,
    the prompt's tokens found in order in the destination's (as TIME's reference: each after the previous
    match; "an" counts as "a"), the rows after the prompt (end token, template end, padding) following on
    from the row after the destination's prompt, capped at the part's last row. Rows are cond rows (Flux.2's
    in-model front padding excluded). Raises AlignmentError (token = the shown text of the missing token)."""
    s_pad, d_pad = sctx.length - sctx.cond_length, dctx.length - dctx.cond_length
    out = list(range(sctx.length))
    for sp, dp in zip(sctx.parts, dctx.parts):
        s_end, d_end = sp.offset + sp.length, dp.offset + dp.length
        s_rows, d_rows = [p for p, _ in sp.tokens], [p for p, _ in dp.tokens]
        if not s_rows:
            continue
        for r in range(sp.offset, s_rows[0]):
            out[r] = min(dp.offset + (r - sp.offset), d_end - 1)
        j = 0
        for r, shown in sp.tokens:
            while j < len(dp.tokens) and _fold(dp.tokens[j][1]) != _fold(shown):
                j += 1
            if j >= len(dp.tokens):
                raise AlignmentError(r, shown)
            out[r] = dp.tokens[j][0]
            j += 1
        nxt = (d_rows[-1] if d_rows else dp.offset - 1) + 1
        for k, r in enumerate(range(s_rows[-1] + 1, s_end)):
            out[r] = min(nxt + k, d_end - 1)
    rows = [r - d_pad for r in out[s_pad:]]
    if any(r < 0 for r in rows):
        raise AlignmentError(0, "(front padding)")
    return rows


def dit_aligned_embeddings(clip, sources: list[str], destinations: list[str], augment: bool):
    """(C, C*) for a DiT family's text encoder: the source prompts' context rows and the destination rows
    aligned to them (dit_align_rows); prompts of any length, one encode each."""
    from .dit_tokens import dit_context
    cs, cstars = [], []
    for line, (s, t) in enumerate(zip(sources, destinations), start=1):
        for sv, tv in zip(*(augmented(p) if augment else [p] for p in (s, t))):
            try:
                sctx, dctx = dit_context(clip, sv), dit_context(clip, tv)
            except UnsupportedModelError as e:
                raise UnsupportedModelError("clip: " + str(e).split(": ", 1)[-1]) from None
            try:
                rows = dit_align_rows(sctx, dctx)
            except AlignmentError as e:
                raise AttentionControlError(
                    f"destination_prompts line {line}: the source's token '{e.token}' (row {e.position} of "
                    f"'{sv}') is not in '{tv}' in the same order; TIME adds words to the source prompt (keep "
                    f"every source word, in order: 'a circle' -> 'a red circle')") from None
            c = clip.encode_from_tokens(clip.tokenize(sv))[0].float()
            cstar = clip.encode_from_tokens(clip.tokenize(tv))[0].float()
            if c.shape[0] != sctx.cond_length or cstar.shape[0] != dctx.cond_length:
                raise AttentionControlError(f"clip: '{sv[:40]}' encodes to {c.shape[0]} rows, not the "
                                            f"{sctx.cond_length} its tokens give; TIME cannot align them")
            cs.append(c)
            cstars.append(cstar[rows])
    c, cstar = torch.cat(cs), torch.cat(cstars)
    check_finite("clip", c, "the text encoder returned NaN / inf; check the CLIP model")
    check_finite("clip", cstar, "the text encoder returned NaN / inf; check the CLIP model")
    return c, cstar


def aligned_embeddings(clip, sources: list[str], destinations: list[str], augment: bool):
    """(C, C*) as (N, d) rows: every position of every source prompt (and its templates) and the embedding
    of the destination position it aligns to (the reference's rule; "an" counts as "a")."""
    a_id = _Tokens(clip, "a", "clip").ids[1]
    an_id = _Tokens(clip, "an", "clip").ids[1]

    def same(x, y):
        return (a_id if x == an_id else x) == (a_id if y == an_id else y)

    decode_vocab = getattr(sd_tokenizer(clip), "inv_vocab", None) or {}
    pairs, aligned = [], []
    for line, (s, t) in enumerate(zip(sources, destinations), start=1):
        for sv, tv in zip(*(augmented(p) if augment else [p] for p in (s, t))):
            st = _Tokens(clip, sv, f"source_prompts line {line}")
            dt = _Tokens(clip, tv, f"destination_prompts line {line}")
            try:
                pos = align_positions(st.ids, dt.ids, L, same)
            except AlignmentError as e:
                word = str(decode_vocab.get(e.token, e.token)).replace("</w>", "")
                raise AttentionControlError(
                    f"destination_prompts line {line}: the source's word '{word}' (token {e.position} of '{sv}') "
                    f"is not in '{tv}' in the same order; TIME adds words to the source prompt (keep every "
                    f"source word, in order: 'a circle' -> 'a red circle')") from None
            pairs += [sv, tv]
            aligned.append(pos)
    emb = _embed_all(clip, pairs)
    c = torch.cat(emb[0::2])
    cstar = torch.cat([e[pos] for e, pos in zip(emb[1::2], aligned)])
    check_finite("clip", c, "the text encoder returned NaN / inf; check the CLIP model")
    check_finite("clip", cstar, "the text encoder returned NaN / inf; check the CLIP model")
    return c, cstar


# --------------------------------------------------------------------------------------------
# the weight patch

class AssumptionEditPatch(wa_base.WeightAdapterBase):
    """One TIME edit as a ModelPatcher weight patch: W <- W + strength * W up down on the weight as patched
    before it (a LoRA added earlier is edited too, as if TIME had been derived on the LoRA'd model)."""
    name = "attnctl_time"

    def __init__(self, edit: TimeEdit):
        self.edit = edit
        self.loaded_keys = set()
        self.weights = []

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        if strength == 0.0:
            return weight
        if weight.dim() != 2 or weight.shape[1] != self.edit.context_dim:
            log.warning("TIME edit: %s has shape %s, not (out, %d); left unedited", key, tuple(weight.shape),
                        self.edit.context_dim)
            return weight
        diff = self.edit.delta(weight.to(intermediate_dtype))
        weight += function(strength * diff).type(weight.dtype)
        return weight


# a DiT's text-entry projections: (norm applied to each context row first, or None; the linear(s)), tried in
# order; the first whose linears exist and take the context width is the edit's target. Every one is a linear
# map of the text encoder's rows (HunyuanVideo's c_embedder of their mean), so W' = W M carries over.
DIT_ENTRIES = (
    ("txt_norm", ("txt_in",)),                                          # Qwen-Image
    ("cap_embedder.0", ("cap_embedder.1",)),                            # Lumina 2, Z-Image
    (None, ("txt_in.input_embedder", "txt_in.c_embedder.in_layer")),    # HunyuanVideo / 1.5 / Image 2.1
    (None, ("txt_in",)),                                                # Flux, Flux.2, Chroma
    (None, ("context_embedder",)),                                      # SD3 / 3.5
    (None, ("text_embedding.0",)),                                      # Wan
)


def _module(dm, name):
    try:
        return dm.get_submodule(name)
    except AttributeError:
        return None


def _linear(dm, name):
    mod = _module(dm, name)
    w = getattr(mod, "weight", None)
    return mod if isinstance(mod, torch.nn.Linear) or (w is not None and w.dim() == 2 and hasattr(mod, "in_features")) \
        else None


def edit_targets(model, context_dim: int, source: str = "clip"):
    """(state-dict keys, input norm module or None) of the projections a TIME edit changes: the K and V of
    every UNet cross-attention (attn2.to_k / to_v), or a DiT's text-entry projection(s) (DIT_ENTRIES).
    Errors name `source` (the input whose width does not fit) or the model (no such projections)."""
    dm = model.get_model_object("diffusion_model")
    widths = set()
    if is_dit(model):
        for norm, names in DIT_ENTRIES:
            mods = [_linear(dm, n) for n in names]
            if not all(m is not None for m in mods) or (norm is not None and _module(dm, norm) is None):
                continue
            widths.update(m.weight.shape[1] for m in mods)
            if all(m.weight.shape[1] == context_dim for m in mods):
                return [f"diffusion_model.{n}.weight" for n in names], (dm.get_submodule(norm) if norm else None)
            break
        else:
            raise UnsupportedModelError(
                f"model: {model_family(model)} has no text-entry projection TIME can edit (supported: SD1.x / SD2.x "
                f"/ SDXL, Flux, Flux.2, Chroma, SD3, Qwen-Image, Wan, Lumina 2, Z-Image, HunyuanVideo)")
        keys = []
    else:
        keys = []
        for name, mod in dm.named_modules():
            if name.endswith(("attn2.to_k", "attn2.to_v")) and hasattr(mod, "weight") and mod.weight.dim() == 2:
                widths.add(mod.weight.shape[1])
                if mod.weight.shape[1] == context_dim:
                    keys.append(f"diffusion_model.{name}.weight")
        if not widths:
            raise UnsupportedModelError(
                f"model: {model_family(model)} has no cross-attention (attn2) K / V projections; TIME edits the "
                f"UNet families (SD1.x, SD2.x, SDXL) and the DiT families' text-entry projections")
    if not keys:
        takes = ", ".join(map(str, sorted(widths)))
        if source == "clip":
            raise AttentionControlError(f"clip: gives {context_dim}-wide embeddings but this model's text "
                                        f"projections take {takes}; connect the checkpoint's own CLIP")
        raise AttentionControlError(f"{source}: the edit was made for {context_dim}-wide text embeddings but this "
                                    f"model's text projections take {takes}; use an edit made with this model's CLIP")
    return keys, None


def projection_keys(model, context_dim: int, source: str = "clip") -> list[str]:
    return edit_targets(model, context_dim, source)[0]


def apply_edit(model, edit: TimeEdit, strength: float, source: str = "clip"):
    """A clone of `model` with the edit patched onto every K / V projection at `strength` (0: a plain clone).
    `source` is the input named when the edit's width does not fit the model."""
    keys, norm = edit_targets(model, edit.context_dim, source)
    want = "normed" if norm is not None else "raw"
    if edit.meta.get("input", "raw") != want:
        raise AttentionControlError(
            f"{source}: this edit was fitted to {edit.meta.get('input', 'raw')} text embeddings, but this model's "
            f"text projection takes {want} ones (Qwen-Image, Lumina 2 and Z-Image normalise each row first); "
            f"derive the edit on this model with Edit Assumption (TIME)")
    m = model.clone()
    if strength == 0.0:
        return m
    patch = AssumptionEditPatch(edit)
    added = m.add_patches({k: patch for k in keys}, strength)
    if len(added) != len(keys):
        missing = sorted(set(keys) - set(added))
        raise AttentionControlError(f"model: {len(missing)} projection weight(s) are not in the model's state "
                                    f"dict (first: {missing[0]}); the model cannot take a TIME edit")
    return m


def fit_edit(model, c: torch.Tensor, cstar: torch.Tensor, lam: float, meta: dict) -> TimeEdit:
    """The closed form for `model`'s edit targets: on the aligned embeddings themselves, or, where the model
    normalises each context row before its text projection (Qwen-Image, Lumina 2, Z-Image), on the normalised
    rows (the projection's actual inputs), with that model's norm."""
    _keys, norm = edit_targets(model, c.shape[1])
    meta = dict(meta, input="raw")
    if norm is not None:
        w = next(norm.parameters(), None)
        dt, dev = (w.dtype, w.device) if w is not None else (torch.float32, torch.device("cpu"))
        with torch.no_grad():
            c, cstar = (norm(x.to(dev, dt)).float().cpu() for x in (c, cstar))
        meta["input"] = "normed"
    return time_edit(c, cstar, lam, meta=meta)


def derive_edit(clip, source_prompts: str, destination_prompts: str, lam: float, augment: bool,
                model=None) -> TimeEdit:
    """The edit of `source_prompts` into `destination_prompts` (line-paired) from `clip`'s embeddings; with a
    `model`, fitted to that model's text projections' inputs (see fit_edit)."""
    src, dst = check_prompt_lines(source_prompts, destination_prompts)
    t0 = time.perf_counter()
    with torch.no_grad():
        if is_dit_clip(clip):
            c, cstar = dit_aligned_embeddings(clip, src, dst, augment)
        else:
            c, cstar = aligned_embeddings(clip, src, dst, augment)
        meta = {"source_prompts": src, "destination_prompts": dst, "lambda": lam, "augment": augment}
        edit = fit_edit(model, c, cstar, lam, meta) if model is not None else \
            time_edit(c, cstar, lam, meta=dict(meta, input="raw"))
    log.info("TIME edit: %d pair(s), %d positions, rank %d of %d, %.2f s", len(src), c.shape[0], edit.rank,
             edit.context_dim, time.perf_counter() - t0)
    return edit


# --------------------------------------------------------------------------------------------
# files

def edit_files() -> list[str]:
    return weight_files.listed(FOLDER)


def edit_to_tensors(edit: TimeEdit) -> tuple[dict, dict]:
    tensors = {"time.up": edit.up.contiguous()}
    if edit.down is not None:
        tensors["time.down"] = edit.down.contiguous()
    meta = {"format": FORMAT, "context_dim": str(edit.context_dim), "edit": json.dumps(edit.meta)}
    return tensors, meta


def edit_from_tensors(tensors: dict, meta: dict | None, name: str) -> TimeEdit:
    meta = meta or {}
    if meta.get("format") != FORMAT or "time.up" not in tensors:
        raise AttentionControlError(f"edit_name: '{name}' is not a TIME edit saved by Save Assumption Edit "
                                    f"(format '{meta.get('format')}', keys {sorted(tensors)[:4]})")
    d = int(meta["context_dim"])
    up, down = tensors["time.up"].float(), tensors.get("time.down")
    ok = up.dim() == 2 and up.shape[0] == d and (
        (down is None and up.shape[1] == d) or (down is not None and down.dim() == 2 and down.shape == up.shape[::-1]))
    if not ok:
        raise AttentionControlError(f"edit_name: '{name}' holds factors {tuple(up.shape)} / "
                                    f"{None if down is None else tuple(down.shape)} that do not fit width {d}")
    check_finite("edit_name", up, f"'{name}' is damaged; save the edit again")
    if down is not None:
        check_finite("edit_name", down, f"'{name}' is damaged; save the edit again")
        down = down.float()
    try:
        info = json.loads(meta.get("edit", "{}"))
    except ValueError:
        info = {}
    return TimeEdit(d, up, down, info)


def save_edit(edit: TimeEdit, path: str) -> None:
    import safetensors.torch
    tensors, meta = edit_to_tensors(edit)
    safetensors.torch.save_file(tensors, path, metadata=meta)


def load_edit(path: str, name: str | None = None) -> TimeEdit:
    import safetensors
    with safetensors.safe_open(path, framework="pt", device="cpu") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return edit_from_tensors(tensors, meta, name or os.path.basename(path))


# --------------------------------------------------------------------------------------------
# nodes

def _check_lines(values):
    s, d = values.get("source_prompts"), values.get("destination_prompts")
    if isinstance(s, str) and isinstance(d, str):
        check_prompt_lines(s, d)


class EditAssumption(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnCtl_EditAssumption",
            display_name="Edit Assumption (TIME)",
            category=f"{CATEGORY}/weights",
            description="TIME (Orgad et al. 2023): edits what the model assumes when a prompt leaves something "
                        "out (roses are red -> roses are blue) by a closed-form change of the K and V projections "
                        "of every cross-attention, so that the source prompt's words project like the destination's. "
                        "Applies as a weight patch, like a LoRA: strength 0 is the model unchanged, the MODEL "
                        "upstream stays as it was. SD1.x / SD2.x / SDXL; on DiTs (Flux, SD3, Wan, Qwen-Image ...) "
                        "the text-entry projection.",
            inputs=[
                io.Model.Input("model", tooltip="The model to edit (LoRAs patched before this node are edited too)."),
                io.Clip.Input("clip", tooltip="The model's own text encoder (after CLIP Set Last Layer, if you use "
                                              "one): the edit is computed from its embeddings."),
                io.String.Input("source_prompts", multiline=True, default="a pack of roses",
                                tooltip="What the model sees now, one prompt per line (e.g. 'a pack of roses')."),
                io.String.Input("destination_prompts", multiline=True, default="a pack of blue roses",
                                tooltip="What it should understand instead, one per source line, keeping every "
                                        "source word in order (e.g. 'a pack of blue roses')."),
                io.Float.Input("lambda_", display_name="lambda", default=0.1, min=0.001, max=100.0, step=0.01,
                               tooltip="How strongly the weights hold on to the original (paper: 0.1). Larger: "
                                       "a smaller, more specific edit."),
                io.Boolean.Input("augment", default=True,
                                 tooltip="Also edit 'A photo of ...', 'An image of ...', 'A picture of ...' "
                                         "versions of each pair (paper: on), for an edit that generalises."),
                io.Float.Input("strength", default=1.0, min=-4.0, max=4.0, step=0.05,
                               tooltip="1: the paper's edit; 0: the model unchanged; between: a partial edit."),
            ],
            outputs=[io.Model.Output(display_name="MODEL"), EditType.Output(display_name="edit")],
        )

    @classmethod
    def validate_inputs(cls, source_prompts=None, destination_prompts=None, lambda_=None, strength=None,
                        augment=None):
        return validation_result(cls, locals(), _check_lines)

    @classmethod
    def execute(cls, model, clip, source_prompts, destination_prompts, lambda_, augment, strength):
        check_widgets(cls, locals())
        edit = derive_edit(clip, source_prompts, destination_prompts, lambda_, augment, model)
        return io.NodeOutput(apply_edit(model, edit, strength), edit)


class SaveAssumptionEdit(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnCtl_SaveAssumptionEdit",
            display_name="Save Assumption Edit (TIME)",
            category=f"{CATEGORY}/weights",
            description="Writes a TIME edit to output/attention_edits/ as a small safetensors file (the exact "
                        "low-rank factors, one pair for every projection of the model); Load Assumption Edit lists "
                        "it (models/attention_edits/ and output/attention_edits/).",
            inputs=[
                EditType.Input("edit", tooltip="The edit output of Edit Assumption (TIME)."),
                io.String.Input("filename_prefix", default="attention_edits/time_edit",
                                tooltip="Path under the output folder, without the extension."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, edit, filename_prefix):
        path = weight_files.save_path(filename_prefix, "attention_edits/time_edit")
        save_edit(edit, path)
        log.info("TIME edit saved: %s (rank %d, width %d)", path, edit.rank, edit.context_dim)
        return io.NodeOutput()


class LoadAssumptionEdit(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnCtl_LoadAssumptionEdit",
            display_name="Load Assumption Edit (TIME)",
            category=f"{CATEGORY}/weights",
            description="Applies a saved TIME edit to a model as a weight patch, with a strength (like Load LoRA). "
                        "The edit belongs to the text encoder it was computed with: it applies to any model of "
                        "that family sampled with that CLIP.",
            inputs=[
                io.Model.Input("model", tooltip="The model to edit."),
                io.Combo.Input("edit_name", options=edit_files(),
                               tooltip="A file from models/attention_edits/ or output/attention_edits/."),
                io.Float.Input("strength", default=1.0, min=-4.0, max=4.0, step=0.05,
                               tooltip="1: the edit as saved; 0: the model unchanged."),
            ],
            outputs=[io.Model.Output(display_name="MODEL"), EditType.Output(display_name="edit")],
        )

    @classmethod
    def validate_inputs(cls, edit_name=None, strength=None):
        return validation_result(cls, locals())

    @classmethod
    def execute(cls, model, edit_name, strength):
        check_widgets(cls, locals())
        path = weight_files.find(FOLDER, edit_name, "edit_name")
        edit = load_edit(path, edit_name)
        return io.NodeOutput(apply_edit(model, edit, strength, "edit_name"), edit)


NODES = [EditAssumption, SaveAssumptionEdit, LoadAssumptionEdit]
