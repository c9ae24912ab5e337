"""Shared node-side helpers: token lookup on the model's own tokenizer, error wrapping."""
from __future__ import annotations

from ..attention.core import AttentionControlError
from ..attention.tokens import TokenError, find_positions, flatten_chunks, parse_index_spec, parse_word_list, word_token_ids
from ..attention.capture import WordSpec

CATEGORY = "attention_control"


def sd_tokenizer(clip):
    """The SD-style tokenizer inside a ComfyUI CLIP (CLIP-L for SD1.x / SDXL)."""
    tk = clip.tokenizer
    if hasattr(tk, "clip_l"):
        return tk.clip_l
    name = getattr(tk, "clip", None)
    if isinstance(name, str) and hasattr(tk, name):
        return getattr(tk, name)
    return tk


def chunks_of(clip, text: str):
    """The CLIP-L (or only) tokenization of `text`: list of 77-token chunks."""
    toks = clip.tokenize(text)
    key = "l" if "l" in toks else next(iter(toks))
    return toks[key]


def resolve_words(clip, prompt: str, words: str):
    """Words/phrases (comma-separated; `#5` or `#5+6` for token indices) -> (WordSpec list, prompt_len)."""
    st = sd_tokenizer(clip)
    bos, eos, pad = getattr(st, "start_token", None), getattr(st, "end_token", None), getattr(st, "pad_token", None)
    inv = getattr(st, "inv_vocab", None)

    def decode(t):
        s = inv.get(t, str(t)) if inv else str(t)
        return s.replace("</w>", "")

    prompt_tokens = flatten_chunks(chunks_of(clip, prompt), bos, eos, pad)
    specs = []
    items = parse_word_list(words)
    if not items:
        raise AttentionControlError("words: give at least one word of the prompt (comma-separated)")
    for w in items:
        try:
            if w.startswith("#"):
                pos = parse_index_spec(w[1:], prompt_tokens.length)
            else:
                ids = word_token_ids(chunks_of(clip, w), bos, eos, pad)
                pos = find_positions(prompt_tokens, ids, w, decode=decode)
        except TokenError as e:
            raise AttentionControlError(str(e)) from None
        specs.append(WordSpec(w, pos))
    return specs, prompt_tokens.length
