"""Nodes: AttnCtl_PromptToPrompt, AttnCtl_SharedNoise."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..attention.core import AttentionControlError
from ..attention.dit_router import is_dit
from ..attention.p2p import LocalBlendSpec, P2PController, TargetEdit, refine_mapper, replace_mapper
from ..attention.router import attach
from ..attention.tokens import TokenError, find_positions, flatten_chunks, parse_word_list, word_token_ids
from ..attention.validate import check_finite, parse_number
from .common import CATEGORY, check_widgets, chunks_of, sd_tokenizer, validation_result
from .dit_tokens import is_dit_clip

L = 77


class _Prompt:
    """One prompt's single-chunk tokenization with word ids."""

    def __init__(self, clip, text: str, role: str):
        toks = clip.tokenize(text, return_word_ids=True)
        key = "l" if "l" in toks else next(iter(toks))
        chunks = toks[key]
        for other, och in toks.items():       # SDXL: CLIP-G must put every word at the same positions
            if other != key and [t[0] for t in och[0]][:_content_end(chunks[0])] != \
                    [t[0] for t in chunks[0]][:_content_end(chunks[0])]:
                raise AttentionControlError(f"{role}: the text encoders tokenize '{text}' differently; "
                                            "Prompt-to-Prompt cannot align its words")
        if len(chunks) != 1:
            raise AttentionControlError(
                f"{role}: '{text[:40]}...' is longer than 75 tokens; Prompt-to-Prompt needs prompts of one chunk")
        self.text = text
        self.triplets = chunks[0]
        st = sd_tokenizer(clip)
        self.bos, self.eos = getattr(st, "start_token", None), getattr(st, "end_token", None)
        self.pad = getattr(st, "pad_token", None)
        self.flat = flatten_chunks(chunks, self.bos, self.eos, self.pad)
        self.clip = clip
        self.groups = self._word_groups(text)
        inv = getattr(st, "inv_vocab", None) or {}
        self.decode = lambda t: inv.get(t, str(t)).replace("</w>", "")
        self.role = role

    def _word_ids(self, word: str) -> list[int]:
        return word_token_ids(chunks_of(self.clip, word), self.bos, self.eos, self.pad)

    def _word_groups(self, text: str):
        """[(word index, positions, token ids)] of the whitespace words of the prompt (weight syntax
        removed), positions counted from 1 after BOS; checked against the prompt's own tokens."""
        import comfy.sd1_clip as sd1
        plain = " ".join(sd1.unescape_important(seg) for seg, _ in sd1.token_weights(sd1.escape_important(text), 1.0))
        groups, pos = [], 1
        for i, w in enumerate(plain.split()):
            ids = self._word_ids(w)
            groups.append((i + 1, list(range(pos, pos + len(ids))), ids))
            pos += len(ids)
        content = [self.flat.ids[p] for p in self.flat.content_positions()]
        if [t for g in groups for t in g[2]] != content:
            raise AttentionControlError(f"{self.role}: could not align the words of '{text}' with its tokens; "
                                        "avoid punctuation glued to words")
        return groups

    def ids_to_eos(self) -> list[int]:
        ids = list(self.flat.ids)
        end = ids.index(self.eos, 1) if self.eos in ids[1:] else len(ids) - 1
        return ids[:end + 1]

    def positions(self, word: str, input_name: str) -> list[int]:
        try:
            return find_positions(self.flat, self._word_ids(word), word, decode=self.decode)
        except TokenError as e:
            raise AttentionControlError(f"{input_name}: {str(e).split(': ', 1)[-1]} (in the {self.role})") from None


def _content_end(chunk) -> int:
    """Index just past the first end token of a chunk (BOS at 0)."""
    ids = [t[0] for t in chunk]
    return ids.index(ids[-1], 1) + 1 if ids[-1] in ids[1:] else len(ids)


def _parse_pairs(text: str, input_name: str, fmt: str):
    """Lines or comma items 'word: value' -> [(word, value string)]."""
    out = []
    for item in text.replace("\n", ";").split(";"):
        item = item.strip()
        if not item:
            continue
        for part in ([item] if item.count(":") == 1 else item.split(",")):
            part = part.strip()
            if not part:
                continue
            if ":" not in part:
                raise AttentionControlError(f"{input_name}: '{part}' needs the form {fmt}")
            w, val = part.rsplit(":", 1)
            out.append((w.strip(), val.strip()))
    return out


def _float(val: str, input_name: str, word: str, form: str = "word: number") -> float:
    """A finite number from a 'word: value' item; the error shows the item and its form."""
    return parse_number(input_name, val, f"{word}: {val}", form)


REWEIGHT_FORM = "'word: factor' (e.g. 'red: 3, blue: -1')"
WINDOW_FORM = "'word: end' or 'word: start-end' with fractions 0 <= start <= end <= 1 (e.g. 'cat: 0.2-0.6')"


def parse_reweight(text: str) -> list[tuple[str, float]]:
    """'word: factor' items -> [(word, factor)]; malformed items and non-finite factors are errors."""
    return [(w, _float(v, "reweight", w, REWEIGHT_FORM)) for w, v in _parse_pairs(text, "reweight", REWEIGHT_FORM)]


def parse_windows(text: str) -> list[tuple[str, float, float]]:
    """'word: end' / 'word: start-end' items -> [(word, start, end)], checked."""
    out = []
    for word, val in _parse_pairs(text, "word_windows", WINDOW_FORM):
        if not word:
            raise AttentionControlError(f"word_windows: ': {val}' has no word; use the form {WINDOW_FORM}")
        if "-" in val:
            a, b = val.split("-", 1)
            ws, we = _float(a, "word_windows", word, WINDOW_FORM), _float(b, "word_windows", word, WINDOW_FORM)
        else:
            ws, we = 0.0, _float(val, "word_windows", word, WINDOW_FORM)
        if not 0 <= ws <= we <= 1:
            raise AttentionControlError(f"word_windows: '{word}: {val}' needs 0 <= start <= end <= 1; use the form "
                                        f"{WINDOW_FORM}")
        out.append((word, ws, we))
    return out


def check_p2p_widgets(values: dict) -> None:
    """The checks that follow from Prompt-to-Prompt's widget values alone (validate_inputs)."""
    if values.get("reweight") is not None:
        parse_reweight(values["reweight"])
    if values.get("word_windows") is not None:
        parse_windows(values["word_windows"])
    tp, mode = values.get("target_prompts"), values.get("mode")
    if tp is not None and mode in ("replace", "refine") and not tp.strip():
        raise AttentionControlError(f"target_prompts: mode {mode} edits toward target prompts: give one target "
                                    "prompt per line (or use mode reweight to reweight the source prompt)")


def encode_batch(clip, texts):
    conds, pooled = [], []
    for t in texts:
        c, p = clip.encode_from_tokens(clip.tokenize(t), return_pooled=True)
        conds.append(c)
        pooled.append(p)
    lens = {c.shape[1] for c in conds}
    if len(lens) != 1:
        raise AttentionControlError("prompts: the prompts encode to different lengths; keep each under 75 tokens")
    cond = torch.cat(conds, 0)
    extra = {}
    if all(p is not None for p in pooled):
        extra["pooled_output"] = torch.cat(pooled, 0)
    return [[cond, extra]]


def check_edit_latent(latent, node: str) -> None:
    """The latent of an edit node: one item (the node builds the [source, targets] batch), finite."""
    samples = latent["samples"] if isinstance(latent, dict) else None
    if not torch.is_tensor(samples):
        raise AttentionControlError("latent: connect a LATENT (an empty latent or an encoded / inverted image)")
    if samples.shape[0] != 1:
        raise AttentionControlError(
            f"latent: {node} takes one latent item and builds the [source, target...] batch itself, got a batch "
            f"of {samples.shape[0]}; use a batch-1 latent (EmptyLatentImage batch_size 1, or Latent From Batch) "
            "and run one edit per image")
    check_finite("latent", samples, "the latent has NaN or infinite values; re-encode the image or use an empty "
                                    "latent")


def edit_batch(clip, latent: dict, texts: list[str], negative_prompt: str):
    """The batch of an edit [source, target...]: positive (one prompt per item), negative, and the
    latent repeated with one shared noise (batch_index 0 for every item: KSampler / SamplerCustom
    draw the same noise; SamplerCustomAdvanced takes AttnCtl_SharedNoise)."""
    n = len(texts)
    positive = encode_batch(clip, texts)
    negative = encode_batch(clip, [negative_prompt] * n)
    samples = latent["samples"]
    out = dict(latent)
    out["samples"] = samples.repeat(n, *([1] * (samples.dim() - 1)))
    out["batch_index"] = [0] * n
    out.pop("noise_mask", None)
    return positive, negative, out


def build_p2p(model, clip, source_prompt, target_prompts, mode, reweight, cross_replace, word_windows,
              self_replace, blend_source_words, blend_target_words, blend_threshold, blend_start):
    dit = is_dit(model)
    if dit and is_dit_clip(clip):             # Flux, SD3, Wan, ...: joint attention (nodes/dit_p2p.py)
        from .dit_p2p import build_dit_p2p
        return build_dit_p2p(model, clip, source_prompt, target_prompts, mode, reweight, cross_replace,
                             word_windows, self_replace, blend_source_words, blend_target_words, blend_threshold,
                             blend_start)
    targets, blend, tgt_texts = _clip_edits(clip, source_prompt, target_prompts, mode, reweight, word_windows,
                                            blend_source_words, blend_target_words, blend_threshold, blend_start)
    if dit:                                   # a DiT with an SD CLIP text encoder (the shapes-world DiT)
        from ..attention.dit_p2p import DitP2PController
        ctrl = DitP2PController(targets, L, 0.0, cross_replace, self_replace, blend=blend, cond_len=L)
    else:
        ctrl = P2PController(targets, 0.0, cross_replace, self_replace, blend=blend, prompt_len=L)
    return attach(model, ctrl), [source_prompt] + tgt_texts


def _clip_edits(clip, source_prompt, target_prompts, mode, reweight, word_windows, blend_source_words,
                blend_target_words, blend_threshold, blend_start):
    """The targets' edits (mappers, weights, windows) and local blend for an SD CLIP text encoder."""
    src = _Prompt(clip, source_prompt, "source_prompt")
    tgt_texts = [t.strip() for t in target_prompts.splitlines() if t.strip()]
    if mode == "reweight" and not tgt_texts:
        tgt_texts = [source_prompt]
    if not tgt_texts:
        raise AttentionControlError("target_prompts: give one target prompt per line")
    targets, tgt_prompts = [], []
    for i, text in enumerate(tgt_texts):
        tp = _Prompt(clip, text, f"target prompt {i + 1}")
        tgt_prompts.append(tp)
        if mode == "replace":
            try:
                mapper = replace_mapper(src.groups, tp.groups, L)
            except AttentionControlError as e:
                raise AttentionControlError(f"target_prompts (line {i + 1}): {str(e).split(': ', 1)[-1]}") from None
            alpha = torch.ones(L)
        elif mode == "refine":
            mapper, alpha = refine_mapper(src.ids_to_eos(), tp.ids_to_eos(), L)
        elif mode == "reweight":
            mapper, alpha = torch.eye(L), torch.ones(L)
            if [g[2] for g in tp.groups] != [g[2] for g in src.groups]:
                raise AttentionControlError(
                    f"target_prompts (line {i + 1}): reweight keeps the source prompt; leave target_prompts "
                    "empty or use mode replace/refine with reweight words on top")
        else:
            raise AttentionControlError(f"mode: '{mode}' is not one of replace, refine, reweight")
        weights = torch.ones(L)
        for word, f in parse_reweight(reweight):
            weights[tp.positions(word, "reweight")] = f
        windows = [(tp.positions(word, "word_windows"), ws, we) for word, ws, we in parse_windows(word_windows)]
        targets.append(TargetEdit(mapper, alpha, weights, windows))
    blend = None
    if blend_source_words.strip() or blend_target_words.strip():
        sw = parse_word_list(blend_source_words)
        tw = parse_word_list(blend_target_words) or sw
        if not sw:
            sw = tw
        src_pos = sorted({p for w in sw for p in src.positions(w, "blend_source_words")})
        tgt_pos = [sorted({p for w in tw for p in tp.positions(w, "blend_target_words")}) for tp in tgt_prompts]
        blend = LocalBlendSpec(src_pos, tgt_pos, threshold=blend_threshold, start=blend_start)
    return targets, blend, tgt_texts


class PromptToPrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnCtl_PromptToPrompt",
            display_name="Prompt-to-Prompt",
            category=f"{CATEGORY}/editing",
            description="Edits an image by editing its prompt (Hertz et al. 2022): the source and each target are "
                        "sampled in one batch from the same noise, and the targets take the source's attention "
                        "maps. Sample the MODEL with the positive, negative and latent outputs of this node; "
                        "item 0 of the result is the source, items 1.. the targets.",
            inputs=[
                io.Model.Input("model", tooltip="Model to edit with (cloned; the input stays unpatched)."),
                io.Clip.Input("clip", tooltip="The CLIP of the model: encodes the prompts and aligns their tokens."),
                io.Latent.Input("latent", tooltip="Empty or starting latent (batch 1): repeated for the source and "
                                                  "the targets with shared noise."),
                io.String.Input("source_prompt", multiline=True, default="",
                                tooltip="The prompt of the original image."),
                io.String.Input("target_prompts", multiline=True, default="",
                                tooltip="One edited prompt per line (replace: same word count, words swapped; "
                                        "refine: words added or removed; reweight: leave empty)."),
                io.Combo.Input("mode", options=["replace", "refine", "reweight"], default="replace",
                               tooltip="replace: word swap; refine: aligned added words; reweight: scale the "
                                       "attention to words of the source prompt."),
                io.String.Input("reweight", default="",
                                tooltip="'word: factor' items (comma or newline separated), applied on top of the "
                                        "mode; negative factors are allowed (e.g. 'red: 3, blue: -1')."),
                io.Float.Input("cross_replace", default=0.8, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps during which the targets take the source's "
                                       "cross-attention maps."),
                io.String.Input("word_windows", default="",
                                tooltip="Per-word cross windows in the target: 'word: end' or 'word: start-end' "
                                        "fractions (override cross_replace for those words)."),
                io.Float.Input("self_replace", default=0.4, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps during which the targets take the source's "
                                       "self-attention maps (coarse layers: 1/4 of the latent and below)."),
                io.String.Input("blend_source_words", default="",
                                tooltip="Local blend: words of the source whose region may change (empty: off)."),
                io.String.Input("blend_target_words", default="",
                                tooltip="Local blend: words of the targets whose region may change (default: the "
                                        "source words)."),
                io.Float.Input("blend_threshold", default=0.3, min=0.0, max=1.0, step=0.01,
                               tooltip="Local blend mask threshold on the normalised attention."),
                io.Float.Input("blend_start", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps after which local blending starts (0.2 for "
                                       "inverted real images)."),
                io.String.Input("negative_prompt", multiline=True, default="",
                                tooltip="Negative prompt, shared by the source and the targets."),
            ],
            outputs=[io.Model.Output(display_name="model"), io.Conditioning.Output(display_name="positive"),
                     io.Conditioning.Output(display_name="negative"), io.Latent.Output(display_name="latent")],
        )

    @classmethod
    def validate_inputs(cls, target_prompts=None, mode=None, reweight=None, cross_replace=None, word_windows=None,
                        self_replace=None, blend_threshold=None, blend_start=None):
        return validation_result(cls, locals(), check_p2p_widgets)

    @classmethod
    def execute(cls, model, clip, latent, source_prompt, target_prompts, mode, reweight, cross_replace,
                word_windows, self_replace, blend_source_words, blend_target_words, blend_threshold, blend_start,
                negative_prompt):
        check_widgets(cls, locals())
        check_p2p_widgets(locals())
        check_edit_latent(latent, "Prompt-to-Prompt")
        m, texts = build_p2p(model, clip, source_prompt, target_prompts, mode, reweight, cross_replace, word_windows,
                             self_replace, blend_source_words, blend_target_words, blend_threshold, blend_start)
        return io.NodeOutput(m, *edit_batch(clip, latent, texts, negative_prompt))


class _SharedNoise:
    def __init__(self, seed):
        self.seed = seed

    def generate_noise(self, input_latent):
        samples = input_latent["samples"]
        g = torch.Generator(device="cpu").manual_seed(self.seed)
        one = torch.randn(samples[:1].shape, dtype=torch.float32, layout=samples.layout, generator=g, device="cpu")
        return one.repeat(samples.shape[0], *([1] * (samples.dim() - 1)))


class SharedNoise(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnCtl_SharedNoise",
            display_name="Shared Noise",
            category=f"{CATEGORY}/editing",
            description="NOISE for SamplerCustomAdvanced that gives every batch item the same initial noise "
                        "(source and targets of an edit).",
            inputs=[io.Int.Input("noise_seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                                 tooltip="Seed of the one noise image shared by the whole batch.")],
            outputs=[io.Noise.Output(display_name="noise")],
        )

    @classmethod
    def execute(cls, noise_seed):
        return io.NodeOutput(_SharedNoise(noise_seed))


NODES = [PromptToPrompt, SharedNoise]
