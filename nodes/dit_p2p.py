"""The Prompt-to-Prompt node on DiT models (issue 18): the prompts' words in the context the
diffusion model receives (nodes/dit_tokens.py), the token mappers of attention/p2p.py per text
encoder part of that context, and attention/dit_p2p.DitP2PController.

Word groups: the whitespace-separated words of each part's prompt text (SD3: its CLIP part and
its T5 part, each mapped on its own), each word's positions those of the tokens that carry its
characters (a lone sentencepiece word-start piece right before it included, as in word lookup),
compared by their text. Refine aligns the tokens of each part by their text; tokens outside the
prompt (template, BOS, EOS, padding) compare by their distance from the prompt's first token
(before it) or last token (after it), so a template suffix and the padding align whatever the
prompts' lengths."""
from __future__ import annotations

import torch

from ..attention.core import AttentionControlError, UnsupportedModelError
from ..attention.dit_p2p import DitP2PController
from ..attention.p2p import LocalBlendSpec, TargetEdit, refine_mapper, replace_mapper
from ..attention.router import attach
from ..attention.tokens import parse_word_list
from .dit_tokens import dit_context, resolve_dit_words


def _word_groups(part) -> list:
    """[(word index, local positions, word text)] of the part's prompt words, in order."""
    lone = {p for p, shown in part.tokens if shown and set(shown) == {"\u2581"}}
    groups, word, pos = [], [], set()

    def close():
        if word and pos:
            ps = set(pos)
            while min(ps) - 1 in lone and not any(min(ps) - 1 in g[1] for g in groups):
                ps.add(min(ps) - 1)
            groups.append((len(groups) + 1, sorted(p - part.offset for p in ps), "".join(word)))
        word.clear()
        pos.clear()

    for c, owners in zip(part.chars, part.owners):
        if c.isspace() or c == "\x00":
            close()
            continue
        word.append(c)
        pos.update(owners)
    close()
    return groups


def _token_keys(part) -> list:
    """One comparison key per local position of the part (see the module docstring)."""
    shown = {p - part.offset: s for p, s in part.tokens}
    if not shown:
        return [("outside", i) for i in range(part.length)]
    first, last = min(shown), max(shown)
    return [shown[i] if i in shown else (("before", first - i) if i < first else ("after", i - last))
            for i in range(part.length)]


def _block_diag(blocks, parts, length) -> torch.Tensor:
    out = torch.zeros(length, length)
    for b, p in zip(blocks, parts):
        out[p.offset:p.offset + p.length, p.offset:p.offset + p.length] = b
    return out


def build_dit_p2p(model, clip, source_prompt, target_prompts, mode, reweight, cross_replace, word_windows,
                  self_replace, blend_source_words, blend_target_words, blend_threshold, blend_start):
    """(MODEL with a DitP2PController, [source, targets...] texts) for a DiT MODEL and its CLIP."""
    from .p2p import parse_reweight, parse_windows
    try:
        src = dit_context(clip, source_prompt)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"clip: {str(e).split(': ', 1)[-1]}; connect the text encoder of the DiT "
                                    "MODEL") from None
    tgt_texts = [t.strip() for t in target_prompts.splitlines() if t.strip()]
    if mode == "reweight" and not tgt_texts:
        tgt_texts = [source_prompt]
    if not tgt_texts:
        raise AttentionControlError("target_prompts: give one target prompt per line")
    C = src.length
    targets = []
    for i, text in enumerate(tgt_texts):
        tc = dit_context(clip, text)
        if tc.length != C or [p.length for p in tc.parts] != [p.length for p in src.parts]:
            raise AttentionControlError(
                f"target_prompts (line {i + 1}): the prompt encodes to {tc.length} context tokens and the source "
                f"to {C}; Prompt-to-Prompt samples them in one batch, so they need the same length (shorten the "
                "longer prompt, or use a model whose text encoder pads)")
        if tc.cond_length != src.cond_length:
            # Flux.2 left-pads each prompt to 512 rows inside the model: unequal token counts shift
            # every token of one prompt against the other's, which no mapper of one batch can undo
            raise AttentionControlError(
                f"target_prompts (line {i + 1}): the prompt has {tc.cond_length} tokens and the source "
                f"{src.cond_length}; {src.family} pads each prompt on the left inside the model, so the "
                "prompts need the same token count (swap words of the same token length, or add a word)")
        if mode == "replace":
            blocks = []
            for sp, tp in zip(src.parts, tc.parts):
                try:
                    blocks.append(replace_mapper(_word_groups(sp), _word_groups(tp), sp.length))
                except AttentionControlError as e:
                    raise AttentionControlError(
                        f"target_prompts (line {i + 1}): {str(e).split(': ', 1)[-1]}") from None
            mapper, alpha = _block_diag(blocks, src.parts, C), torch.ones(C)
        elif mode == "refine":
            blocks, alphas = [], torch.ones(C)
            for sp, tp in zip(src.parts, tc.parts):
                m, a = refine_mapper(_token_keys(sp), _token_keys(tp), sp.length)
                blocks.append(m)
                alphas[sp.offset:sp.offset + sp.length] = a
            mapper, alpha = _block_diag(blocks, src.parts, C), alphas
        elif mode == "reweight":
            if [[g[2] for g in _word_groups(p)] for p in tc.parts] != [[g[2] for g in _word_groups(p)]
                                                                        for p in src.parts]:
                raise AttentionControlError(
                    f"target_prompts (line {i + 1}): reweight keeps the source prompt; leave target_prompts "
                    "empty or use mode replace/refine with reweight words on top")
            mapper, alpha = torch.eye(C), torch.ones(C)
        else:
            raise AttentionControlError(f"mode: '{mode}' is not one of replace, refine, reweight")
        weights = torch.ones(C)
        for word, f in parse_reweight(reweight):
            (spec,), _ = resolve_dit_words(clip, text, word, "reweight")
            weights[spec.positions] = f
        windows = []
        for word, ws, we in parse_windows(word_windows):
            (spec,), _ = resolve_dit_words(clip, text, word, "word_windows")
            windows.append((spec.positions, ws, we))
        targets.append(TargetEdit(mapper, alpha, weights, windows))
    blend = None
    if blend_source_words.strip() or blend_target_words.strip():
        sw = ", ".join(parse_word_list(blend_source_words)) or blend_target_words
        tw = ", ".join(parse_word_list(blend_target_words)) or sw
        specs, _ = resolve_dit_words(clip, source_prompt, sw, "blend_source_words")
        src_pos = sorted({p for s in specs for p in s.positions})
        tgt_pos = []
        for text in tgt_texts:
            specs, _ = resolve_dit_words(clip, text, tw, "blend_target_words")
            tgt_pos.append(sorted({p for s in specs for p in s.positions}))
        blend = LocalBlendSpec(src_pos, tgt_pos, threshold=blend_threshold, start=blend_start)
    ctrl = DitP2PController(targets, C, 0.0, cross_replace, self_replace, blend=blend, cond_len=src.cond_length)
    return attach(model, ctrl), [source_prompt] + tgt_texts
