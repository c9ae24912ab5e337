"""Shared node-side helpers: token lookup on the model's own tokenizer, error wrapping, input checks."""
from __future__ import annotations

from comfy_api.latest import io

from ..attention.core import AttentionControlError
from ..attention.validate import check_finite, check_range
from ..attention.tokens import TokenError, find_positions, flatten_chunks, parse_index_spec, parse_word_list, word_token_ids
from ..attention.capture import WordSpec
from .dit_tokens import is_dit_clip, resolve_dit_words

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


def _renamed(e: Exception, input_name: str) -> str:
    """A token error's message with its generic `words:` prefix replaced by the real input's name."""
    msg = str(e)
    for prefix in ("words: ", "prompts: "):
        if msg.startswith(prefix):
            return f"{input_name}: {msg[len(prefix):]}"
    return msg


def resolve_words(clip, prompt: str, words: str, input_name: str = "words"):
    """Words/phrases (comma-separated; `#5` or `#5+6` for token indices) -> (WordSpec list, prompt_len).
    Errors name `input_name`, the node input the words came from. SD1/SD2/SDXL CLIPs: positions in
    the CLIP-L token chunks; DiT families' text encoders (Flux, SD3, Qwen-Image, Wan, ...): positions
    in the context the diffusion model receives, see nodes/dit_tokens.py."""
    if is_dit_clip(clip):
        return resolve_dit_words(clip, prompt, words, input_name)
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
        raise AttentionControlError(f"{input_name}: give at least one word of the prompt (comma-separated)")
    for w in items:
        try:
            if w.startswith("#"):
                pos = parse_index_spec(w[1:], prompt_tokens.length)
            else:
                ids = word_token_ids(chunks_of(clip, w), bos, eos, pad)
                pos = find_positions(prompt_tokens, ids, w, decode=decode)
        except TokenError as e:
            raise AttentionControlError(_renamed(e, input_name)) from None
        specs.append(WordSpec(w, pos))
    return specs, prompt_tokens.length


# --------------------------------------------------------------------------------------------
# input checks: the same code runs in validate_inputs (widget values, before anything runs; a
# linked input arrives there as None and is skipped) and at the top of execute (every value)

def check_widgets(cls, values: dict) -> None:
    """Every FLOAT / INT / COMBO value of `values` against the node's schema: finite, within the
    widget's min and max, one of the options. ComfyUI skips its own min / max / option checks for
    the inputs a validate_inputs names, and lets NaN through its range checks, so this does both."""
    for inp in cls.define_schema().inputs or []:
        v = values.get(inp.id)
        if v is None:
            continue
        if isinstance(inp, io.Float.Input):
            check_finite(inp.id, v, f"give a finite number (default {inp.default})")
            check_range(inp.id, float(v), inp.min, inp.max)
        elif isinstance(inp, io.Int.Input):
            check_range(inp.id, v, inp.min, inp.max)
        elif isinstance(inp, io.Combo.Input) and inp.options and v not in inp.options:
            raise AttentionControlError(f"{inp.id}: '{v}' is not one of {', '.join(map(str, inp.options))}")


def validation_result(cls, values: dict, extra=None):
    """validate_inputs' answer: True, or the message of the first failed check (generic widget
    checks, then `extra(values)`, the node's own checks of its widget values)."""
    values = {k: v for k, v in values.items() if k != "cls"}
    try:
        check_widgets(cls, values)
        if extra is not None:
            extra(values)
    except ValueError as e:              # AttentionControlError, TokenError
        return str(e)
    return True
