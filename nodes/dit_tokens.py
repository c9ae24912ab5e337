r"""Word positions in the text context a DiT model attends to, per family, as ComfyUI 0.3.75 builds it.

`resolve_dit_words(clip, prompt, words)` tokenizes `prompt` through the CLIP object's own tokenizer
(`clip.tokenize`, so ComfyUI's weight syntax, escapes, templates, padding and tokenizer options
apply exactly as in CLIPTextEncode), rebuilds the context the diffusion model receives
(`c_crossattn`), and returns, per word, the context positions of all its tokens.

What the context is, per family (N: the tokenizer's token count for the prompt)

| family | tokenizer (`clip.tokenizer`) | context the model attends to | length |
|---|---|---|---|
| Flux | `flux.FluxTokenizer` | T5-XXL tokens: prompt, `</s>`, `<pad>` up to 256 (CLIP-L gives only the pooled vector) | max(256, N) |
| Chroma / PixArt | `pixart_t5.PixArtTokenizer` | T5-XXL tokens: prompt, `</s>`; no padding | N |
| SD3 | `sd3_clip.SD3Tokenizer` | CLIP part (CLIP-L and CLIP-G features side by side, padded to 4096: one row per CLIP token, BOS/EOS/padding included, 77 per chunk) then the T5-XXL part (prompt, `</s>`, pads up to 77) along the token axis | 77k + max(77, N_t5) |
| Wan 2.1 | `wan.WanT5Tokenizer` | UMT5-XXL tokens: prompt, `</s>`, `<pad>` up to 512 (padding rows are zeroed) | max(512, N) |
| Qwen-Image | `qwen_image.QwenImageTokenizer` | Qwen2.5-VL over the chat template; the encoder drops the template's first 34 tokens (system turn and `<\|im_start\|>user\n`) and keeps the prompt plus `<\|im_end\|>\n<\|im_start\|>assistant\n` | N - 34 |
| Lumina 2 | `lumina2.LuminaTokenizer` | Gemma 2 2B tokens: `<bos>`, prompt; no padding. plain CLIPTextEncode adds nothing; CLIPTextEncodeLumina2 puts `"<system prompt> <Prompt Start> "` before the prompt: one `prompt_variants` entry per system prompt | N (variants: N + the prefix's tokens) |
| Z-Image | `z_image.ZImageTokenizer` | Qwen3 4B over `<\|im_start\|>user\n{prompt}<\|im_end\|>\n<\|im_start\|>assistant\n`, all of it kept | N (checkpoints with `cap_pad_token`: NextDiT appends learned pad rows inside the model up to a multiple of 32; positions unchanged) |
| HunyuanVideo | `hunyuan_video.HunyuanVideoTokenizer` | Llama 3 over its chat template (`<\|begin_of_text\|>`, a system turn, `<\|start_header_id\|>user<\|end_header_id\|>\n\n{prompt}<\|eot_id\|>`); the encoder keeps the user turn from after `\n\n` to `<\|eot_id\|>` included (CLIP-L gives only the pooled vector); no padding | N - 95 |
| HunyuanVideo 1.5 | `hunyuan_video.HunyuanVideo15Tokenizer` | Qwen2.5-VL over its chat template, cut as Qwen-Image's: the prompt plus `<\|im_end\|>\n<\|im_start\|>assistant\n` | N - 98 |
| HunyuanImage 2.1 | `hunyuan_image.HunyuanImageTokenizer` | Qwen2.5-VL, cut as Qwen-Image's: the prompt plus `<\|im_end\|>` (a prompt that starts with a literal `<`, the refiner's template: a fixed 36 tokens dropped) | N - 34 |
| Flux.2 | `flux.Flux2Tokenizer` | Mistral 3 over `<s>[SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]{prompt}[/INST]`; `model_base.Flux2.extra_conds` left-pads the context with zero rows to 512 | max(512, N) |

How positions map: a word's positions are those of the tokens that carry its characters in the
context (all pieces of a word split into several; a sentencepiece word-start piece `▁` standing
alone before it counts too), every occurrence in the prompt, in order. Only the prompt's own text
is searched (never template, system-prompt, `prefix`, BOS, EOS or padding tokens). Matching is
case-insensitive, ignores whitespace inside the word ("blue square" finds the two words) and needs
word boundaries, so "red" does not match inside "infrared" (letters of scripts written without
spaces, such as Chinese, need none). A word is read the way the tokenizer reads the prompt: where
the tokenizer parses weights (`(red:1.2)`, escaped `\(`), the word's weight syntax is stripped the
same way; where ComfyUI disables weights (Qwen-Image, HunyuanVideo 1.5, HunyuanImage 2.1, Z-Image,
Flux.2 tokenize the prompt verbatim), the prompt's literal text is searched. In SD3 a word has positions in both parts: its
CLIP rows, then its T5 rows (offset by the CLIP part's length), one word spec. `#5` / `#5+6` give
context positions directly. Positions index `c_crossattn` as the model gets it (for Flux.2 after
the left padding: `DitContext.cond_length` is the CONDITIONING tensor's length before it).

HunyuanVideo 1.5 / HunyuanImage 2.1: quoted text in the prompt (`"..."`) also goes to ByT5 as a
separate conditioning (`conditioning_byt5small`, not in `c_crossattn`) that the model joins to the
refined context inside its forward; positions index `c_crossattn` (what the router's text slice
holds when no such tokens are joined). HunyuanVideo's Llama 3 tokenizer file (byte-level BPE) must
be read as it is: transformers 5's LlamaTokenizerFast rebuilds it with a Metaspace pre-tokenizer
that drops spaces ("a red" -> one token "ared"), and the words are then searched in what that
tokenizer produced, which is what the model gets.

Lumina 2's two encode nodes. The words are resolved in the plain context (CLIPTextEncode) and, by
`prompt_variants`, in the context of each system prompt that ComfyUI's CLIPTextEncodeLumina2 offers
(its SYSTEM_PROMPT table, read from the node; each resolved on its own, since the tokens at the
prefix's end can differ from the plain prompt's first ones). The capture and paint-with-words
controllers take these variants and pick, per model call, the one whose length the context has
(the plain encoding first, by exact length; attention/dit_regions.py `variant_of`); a positive of
a length that fits none is refused before sampling with the lengths of all of them. `#i` positions
are taken as given in every variant.

Not handled, with a named error: HiDream (four encoders feeding different blocks), Omnigen2, Cosmos,
Mochi, LTXV, AuraFlow and the other ComfyUI text encoders listed in UNSUPPORTED. Positions are those of the text-only encode (CLIPTextEncode):
image-edit encodes (TextEncodeQwenImageEdit and the like) put image tokens into the context and
change its length, which a caller sees as a context-length mismatch.
"""
from __future__ import annotations

import codecs
import numbers
import re
import unicodedata
from dataclasses import dataclass, field

from ..attention.capture import WordSpec
from ..attention.core import AttentionControlError, UnsupportedModelError
from ..attention.dit_regions import PromptVariant
from ..attention.tokens import PromptTokens, TokenError, parse_index_spec, parse_word_list

# tokenizer class (ComfyUI 0.3.75, comfy.text_encoders) -> family; the most derived known class wins
FAMILIES = {
    "FluxTokenizer": "Flux",
    "Flux2Tokenizer": "Flux.2",
    "PixArtTokenizer": "Chroma / PixArt",
    "SD3Tokenizer": "SD3",
    "QwenImageTokenizer": "Qwen-Image",
    "WanT5Tokenizer": "Wan 2.1",
    "LuminaTokenizer": "Lumina 2",
    "ZImageTokenizer": "Z-Image",
    "HunyuanVideoTokenizer": "HunyuanVideo",
    "HunyuanVideo15Tokenizer": "HunyuanVideo 1.5",
    "HunyuanImageTokenizer": "HunyuanImage 2.1",
}
SD_TOKENIZERS = ("SD1Tokenizer", "SD2Tokenizer", "SDXLTokenizer", "StableCascadeTokenizer", "SDTokenizer")
UNSUPPORTED = {
    "HiDreamTokenizer": "HiDream", "Omnigen2Tokenizer": "Omnigen2", "NTokenizer": "Gemma 3 (NTokenizer)",
    "MochiT5Tokenizer": "Mochi", "LTXVT5Tokenizer": "LTXV", "CosmosT5Tokenizer": "Cosmos", "AuraT5Tokenizer": "AuraFlow",
    "SAT5Tokenizer": "Stable Audio", "AceT5Tokenizer": "ACE", "HyditTokenizer": "HunyuanDiT",
}
SUPPORTED_TEXT = "SD1.x / SD2.x / SDXL CLIP, " + ", ".join(FAMILIES.values())

# ComfyUI's own constants: Qwen2 <|im_start|>, "user", "\n" (qwen_image.QwenImageTEModel.encode_token_weights)
_QWEN_IM_START, _QWEN_USER, _QWEN_NL = 151644, 872, 198
_FLUX2_TEXT_LEN = 512        # model_base.Flux2.extra_conds target_text_len
# Llama 3 <|start_header_id|>, "user", <|end_header_id|>, "\n\n", <|eot_id|> (hunyuan_video.HunyuanVideoClipModel)
_LLAMA_HEADER, _LLAMA_USER, _LLAMA_HEADER_END, _LLAMA_NLNL, _LLAMA_EOT = 128006, 882, 128007, 271, 128009
_QWEN_LT, _HUNYUAN_IMAGE_REFINER_END = 27, 36    # hunyuan_image.HunyuanImageTEModel: "<" first -> 36 dropped


def classify(tokenizer) -> tuple[str, str | None]:
    """("dit", family) for a supported DiT tokenizer, ("unsupported", name) for a known other
    ComfyUI text encoder, ("sd", None) for the SD1/SD2/SDXL CLIP ones, ("unknown", class) else."""
    for cls in type(tokenizer).__mro__:
        name = cls.__name__
        if name in FAMILIES:
            return "dit", FAMILIES[name]
        if name in UNSUPPORTED:
            return "unsupported", UNSUPPORTED[name]
        if name in SD_TOKENIZERS:
            return "sd", None
    return "unknown", type(tokenizer).__name__


def is_dit_clip(clip) -> bool:
    """True when word lookup for this CLIP must go through `resolve_dit_words` (a DiT family's text
    encoder, supported or not); SD-style and unknown tokenizers keep the CLIP-L lookup."""
    tk = getattr(clip, "tokenizer", None)
    return tk is not None and classify(tk)[0] in ("dit", "unsupported")


# --------------------------------------------------------------------------------------------
# token text


def _byte_decoder() -> dict[str, int]:
    """The reversible byte <-> printable-character table of byte-level BPE vocabularies (GPT-2 style,
    used by CLIP, Qwen2/3 and the tekken-converted Mistral vocab): printable Latin-1 bytes stand for
    themselves, the other bytes for chr(256 + k) in increasing byte order."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    table, k = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + k)] = b
            k += 1
    return table


_BYTES = _byte_decoder()
_SPM_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _bbpe_bytes(piece: str) -> bytes:
    return b"".join(bytes([_BYTES[c]]) if c in _BYTES else c.encode("utf-8") for c in piece)


def _token_bytes(kind: str, piece: str) -> bytes:
    if kind == "spm":
        m = _SPM_BYTE.match(piece)
        return bytes([int(m.group(1), 16)]) if m else piece.replace("\u2581", " ").encode("utf-8")
    if kind == "clip":
        end = piece.endswith("</w>")
        return _bbpe_bytes(piece[:-4] if end else piece) + (b" " if end else b"")
    return _bbpe_bytes(piece)


def _special_test(st):
    """id -> True for the tokenizer's special / control / unknown tokens."""
    ids = {t for t in (getattr(st, "start_token", None), getattr(st, "end_token", None), getattr(st, "pad_token", None))
           if isinstance(t, int)}
    hf = getattr(st, "tokenizer", None)
    try:
        ids |= set(getattr(hf, "all_special_ids", None) or [])
    except (AttributeError, TypeError, ValueError):     # no special-token bookkeeping
        pass
    sp = getattr(hf, "tokenizer", None)   # comfy SPieceTokenizer wraps a SentencePieceProcessor
    spm = sp if hasattr(sp, "is_control") and hasattr(sp, "is_unknown") else None

    def special(t: int) -> bool:
        if t in ids or t < 0:
            return True
        if spm is not None and t < spm.get_piece_size():
            return bool(spm.is_control(t) or spm.is_unknown(t))
        return False
    return special


# --------------------------------------------------------------------------------------------
# the context


@dataclass
class Part:
    """One text encoder's stretch of the context, with the surface text of its prompt tokens."""
    label: str                   # e.g. "T5-XXL"
    offset: int                  # first context row of this part
    length: int                  # rows of this part in the context
    chars: list[str] = field(default_factory=list)            # surface text of the prompt tokens
    owners: list[tuple[int, ...]] = field(default_factory=list)  # context positions behind each char
    tokens: list[tuple[int, str]] = field(default_factory=list)  # (context position, shown text)

    def text(self) -> str:
        return "".join(self.chars)


@dataclass
class DitContext:
    family: str
    length: int          # rows of c_crossattn as the diffusion model receives it
    cond_length: int     # rows of the CONDITIONING tensor the encode node outputs (differs for Flux.2)
    parts: list[Part]
    weights: bool        # the tokenizer parses (word:1.2) weight syntax


def _flat(chunks) -> list[int]:
    out = []
    for ch in chunks:
        for t in ch:
            tid = t[0] if isinstance(t, (tuple, list)) else t
            out.append(int(tid) if isinstance(tid, numbers.Integral) else -1)
    return out


def _lcp(a: list[int], b: list[int]) -> int:
    n = 0
    while n < len(a) and n < len(b) and a[n] == b[n]:
        n += 1
    return n


def _build_part(label, kind, st, ids, content, to_ctx, offset, length) -> Part:
    """Surface text of the content tokens (raw indices `content`, in order), each char owned by the
    context positions of the tokens its bytes came from; gaps between content runs separate words."""
    inv = getattr(st, "inv_vocab", None) or {}
    part = Part(label, offset, length)
    dec = codecs.getincrementaldecoder("utf-8")("replace")
    pending: list[int] = []
    prev = None

    def flush():
        tail = dec.decode(b"", final=True)
        for c in tail:
            part.chars.append(c)
            part.owners.append(tuple(sorted(set(pending))))
        pending.clear()
        dec.reset()

    for raw in content:
        if prev is not None and raw != prev + 1:
            flush()
            part.chars.append("\x00")
            part.owners.append(())
        prev = raw
        pos = to_ctx(raw)
        piece = inv.get(ids[raw], "")
        start = len(part.chars)
        for b in _token_bytes(kind, piece):
            pending.append(pos)
            out = dec.decode(bytes([b]))
            for c in out:
                part.chars.append(c)
                part.owners.append(tuple(sorted(set(pending))))
            if out:
                pending.clear()
        shown = "".join(c for c, o in zip(part.chars[start:], part.owners[start:]) if pos in o)
        if kind == "clip":
            shown = shown.rstrip(" ")
        shown = shown.replace(" ", "\u2581").replace("\n", "\\n")
        part.tokens.append((pos, shown or piece))
    flush()
    return part


def _stream(clip, key, attr, kind, label, full, ref, offset=0, keep_from=0, pad_front=0, length=None):
    """A single-encoder stretch: raw tokens `full[key]`, the prompt's own tokens found against the
    reference tokenization `ref` (template / prefix alone), kept from raw index `keep_from`, shifted
    right by `pad_front` rows, `length` rows long (default: every kept token). Returns (part, raw count)."""
    tk = clip.tokenizer
    st = getattr(tk, attr, None) or getattr(tk, getattr(tk, "clip", ""))    # SD1Tokenizer-style: "clip_<name>"
    chunks = full[key]
    ids, rids = _flat(chunks), _flat(ref[key])
    p = _lcp(ids, rids)                              # template / prefix tokens before the prompt
    q = _lcp(ids[p:][::-1], rids[p:][::-1])          # template tokens (or padding) after it
    n = len(ids) - keep_from + pad_front if length is None else length
    chunk_len = len(chunks[0]) if chunks else 1
    flat = PromptTokens(tuple(ids), chunk_len, getattr(st, "start_token", None), getattr(st, "end_token", None),
                        getattr(st, "pad_token", None))
    special = _special_test(st)

    def to_ctx(raw):
        return offset + pad_front + raw - keep_from

    content = [i for i in flat.content_positions()
               if max(p, keep_from) <= i < len(ids) - q and to_ctx(i) < offset + n and not special(ids[i])]
    return _build_part(label, kind, st, ids, content, to_ctx, offset, n), len(ids)


def _has(clip, name) -> bool:
    cm = getattr(clip, "cond_stage_model", None)
    return cm is None or getattr(cm, name, True) is not None


def dit_context(clip, prompt: str, prefix: str = "") -> DitContext:
    """The context the diffusion model receives for `prefix + prompt` (prefix: text the encode node
    puts before the user's prompt, e.g. Lumina 2's system prompt), and the prompt's tokens in it."""
    tk = getattr(clip, "tokenizer", None)
    kind, family = classify(tk) if tk is not None else ("unknown", None)
    if kind != "dit":
        what = family or type(tk).__name__
        raise UnsupportedModelError(
            f"words: word lookup does not support this text encoder ({what}); supported: {SUPPORTED_TEXT}")
    full, ref = clip.tokenize(prefix + prompt), clip.tokenize(prefix)

    if family in ("Flux", "Chroma / PixArt"):
        part, n = _stream(clip, "t5xxl", "t5xxl", "spm", "T5-XXL", full, ref)
        return DitContext(family, n, n, [part], True)
    if family == "Wan 2.1":
        part, n = _stream(clip, "umt5xxl", "umt5xxl", "spm", "UMT5-XXL", full, ref)
        return DitContext(family, n, n, [part], True)
    if family == "Lumina 2":
        part, n = _stream(clip, "gemma2_2b", "gemma2_2b", "spm", "Gemma 2", full, ref)
        return DitContext(family, n, n, [part], True)
    if family == "Z-Image":
        part, n = _stream(clip, "qwen3_4b", "qwen3_4b", "bbpe", "Qwen3", full, ref)
        return DitContext(family, n, n, [part], False)
    if family in ("Qwen-Image", "HunyuanVideo 1.5", "HunyuanImage 2.1"):
        ids = _flat(full["qwen25_7b"][:1])
        n_all = len(_flat(full["qwen25_7b"]))
        start = _qwen_image_template_end(ids, n_all)
        if family != "Qwen-Image" and ids and ids[0] == _QWEN_LT and len(ids) > _HUNYUAN_IMAGE_REFINER_END:
            start = _HUNYUAN_IMAGE_REFINER_END
        kept = range(n_all)[start:]
        keep_from = kept.start if len(kept) else n_all
        part, _ = _stream(clip, "qwen25_7b", "qwen25_7b", "bbpe", "Qwen2.5-VL", full, ref, keep_from=keep_from,
                          length=len(kept))
        return DitContext(family, len(kept), len(kept), [part], False)
    if family == "HunyuanVideo":
        ids = _flat(full["llama"][:1])
        kept = range(len(_flat(full["llama"])))[_hunyuan_video_crop(ids)]
        keep_from = kept.start if len(kept) else len(ids)
        part, _ = _stream(clip, "llama", "llama", "bbpe", "Llama 3", full, ref, keep_from=keep_from, length=len(kept))
        return DitContext(family, len(kept), len(kept), [part], True)
    if family == "Flux.2":
        n = len(_flat(full["mistral3_24b"]))
        pad = max(0, _FLUX2_TEXT_LEN - n)
        part, _ = _stream(clip, "mistral3_24b", "mistral3_24b", "bbpe", "Mistral 3", full, ref, pad_front=pad)
        return DitContext(family, n + pad, n, [part], False)
    # SD3: [CLIP-L | CLIP-G | 0] rows (cut to the shorter of the two), then T5 rows
    parts, offset = [], 0
    if _has(clip, "clip_l") or _has(clip, "clip_g"):
        lens = [len(_flat(full[k])) for k, a in (("l", "clip_l"), ("g", "clip_g")) if _has(clip, a)]
        clip_len = min(lens)
        part, _ = _stream(clip, "l", "clip_l", "clip", "CLIP-L/G", full, ref, length=clip_len)
        parts.append(part)
        offset = clip_len
    if _has(clip, "t5xxl"):
        part, n = _stream(clip, "t5xxl", "t5xxl", "spm", "T5-XXL", full, ref, offset=offset)
        parts.append(part)
        offset += n
    return DitContext(family, offset, offset, parts, True)


def _qwen_image_template_end(ids: list[int], n_out: int) -> int:
    """ComfyUI's QwenImageTEModel.encode_token_weights: the output is `out[:, template_end:]` where
    template_end is the index of the second <|im_start|>, moved past "user\\n" when they follow."""
    template_end, count = -1, 0
    for i, t in enumerate(ids):
        if t == _QWEN_IM_START and count < 2:
            template_end = i
            count += 1
    if n_out > template_end + 3:
        if ids[template_end + 1] == _QWEN_USER and ids[template_end + 2] == _QWEN_NL:
            template_end += 3
    return template_end


def _hunyuan_video_crop(ids: list[int]) -> slice:
    """ComfyUI's HunyuanVideoClipModel.encode_token_weights: the output is the Llama rows from the
    user turn's `<|end_header_id|>` (moved past it and "\\n\\n" when "\\n\\n" follows) to its
    `<|eot_id|>`, included."""
    template_end, user_end = 0, None
    for i, t in enumerate(ids):
        if t == _LLAMA_HEADER and ids[i + 1:i + 3] == [_LLAMA_USER, _LLAMA_HEADER_END]:
            template_end, user_end = i + 2, -1
        if t == _LLAMA_EOT and user_end == -1:
            user_end = i + 1
    if len(ids) > template_end + 2 and ids[template_end + 1] == _LLAMA_NLNL:
        template_end += 2
    return slice(template_end, user_end)


# --------------------------------------------------------------------------------------------
# matching


def _cjk(c: str) -> bool:
    o = ord(c)
    return (0x2E80 <= o <= 0x9FFF or 0x3040 <= o <= 0x30FF or 0xAC00 <= o <= 0xD7AF or 0xF900 <= o <= 0xFAFF
            or 0x20000 <= o <= 0x2FA1F)


def _wordish(c: str) -> bool:
    return (c.isalnum() or c == "_") and not _cjk(c)


def _word_text(word: str, weights: bool) -> str:
    """The text of a word as the tokenizer reads the prompt: weight syntax and escapes as ComfyUI parses them."""
    from comfy.sd1_clip import escape_important, token_weights, unescape_important
    text = escape_important(word)
    if weights:
        return "".join(unescape_important(seg) for seg, _ in token_weights(text, 1.0))
    return unescape_important(text)


def find_word(part: Part, word: str) -> list[int]:
    """Context positions of every occurrence of `word` in the part's prompt text (empty if none)."""
    chars, owners = part.chars, part.owners
    idx = [i for i, c in enumerate(chars) if not c.isspace()]
    flat = "".join(chars[i] for i in idx)
    order = [p for p, _ in part.tokens]
    lone_space = [set(t) == {"\u2581"} for _, t in part.tokens]
    out: list[int] = []
    seen_keys = []
    for key in (word, unicodedata.normalize("NFKC", word)):
        key = "".join(key.split())
        if not key or key in seen_keys:
            continue
        seen_keys.append(key)
        pat = re.compile(re.escape(key), re.IGNORECASE)
        at = 0
        while True:
            m = pat.search(flat, at)
            if m is None:
                break
            at = m.start() + 1
            a, b = idx[m.start()], idx[m.end() - 1]
            if _wordish(chars[a]) and a > 0 and _wordish(chars[a - 1]):
                continue
            if _wordish(chars[b]) and b + 1 < len(chars) and _wordish(chars[b + 1]):
                continue
            pos = {p for i in range(a, b + 1) for p in owners[i]}
            # a lone word-start piece (sentencepiece "▁") right before the word is one of its tokens
            k = order.index(min(pos))
            while k > 0 and lone_space[k - 1] and order[k - 1] == order[k] - 1:
                k -= 1
                pos.add(order[k])
            out.extend(sorted(p for p in pos if p not in out))
        if out:
            break
    return out


def describe(ctx: DitContext) -> str:
    """The prompt's tokens as this tokenizer sees them, `position:token` in context positions."""
    return "; ".join(f"{p.label} [" + ", ".join(f"{pos}:{t}" for pos, t in p.tokens) + "]" for p in ctx.parts)


def resolve_dit_words(clip, prompt: str, words: str, input_name: str = "words", prefix: str = ""):
    """Words/phrases (comma-separated; `#5` or `#5+6` for context positions) -> (WordSpec list,
    context_len) on a DiT family's CLIP. Errors name `input_name`, the node input the words came from."""
    try:
        ctx = dit_context(clip, prompt, prefix)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{input_name}: {str(e)[len('words: '):]}") from None
    items = parse_word_list(words)
    if not items:
        raise AttentionControlError(f"{input_name}: give at least one word of the prompt (comma-separated)")
    specs = []
    for w in items:
        if w.startswith("#"):
            try:
                pos = parse_index_spec(w[1:], ctx.length)
            except TokenError as e:
                msg = str(e)
                raise AttentionControlError(f"{input_name}: {msg[len('words: '):] if msg.startswith('words: ') else msg}"
                                            ) from None
            specs.append(WordSpec(w, pos))
            continue
        text = _word_text(w, ctx.weights)
        pos, missing = [], []
        for part in ctx.parts:
            got = find_word(part, text)
            if got:
                pos.extend(got)
            else:
                missing.append(part.label)
        if missing:
            where = "the prompt" if len(missing) == len(ctx.parts) else f"the {' and '.join(missing)} tokens of the prompt"
            raise AttentionControlError(
                f"{input_name}: '{w}' is not in {where}. The prompt's words/tokens ({ctx.family}) are: {describe(ctx)}. "
                f"Fix the word, or give context positions instead (#i or #i+j, 0..{ctx.length - 1}).")
        specs.append(WordSpec(w, pos))
    return specs, ctx.length


def lumina2_prefixes() -> dict[str, str]:
    """CLIPTextEncodeLumina2's text before the user's prompt, per system_prompt choice
    (`f"{system prompt} <Prompt Start> {user_prompt}"`), read from ComfyUI's node; {} where the node
    is absent."""
    try:
        from comfy_extras.nodes_lumina2 import CLIPTextEncodeLumina2
    except ImportError:
        return {}
    return {k: f"{v} <Prompt Start> " for k, v in getattr(CLIPTextEncodeLumina2, "SYSTEM_PROMPT", {}).items()}


def prompt_variants(clip, prompt: str, *words: str) -> tuple:
    """The other encodings of `prompt` that a sampler's positive may come from, with the positions of
    `words` (each a comma-separated list as `resolve_dit_words` takes it; their specs concatenated,
    in order) in each: Lumina 2, one per system prompt of CLIPTextEncodeLumina2 (PromptVariant,
    label `CLIPTextEncodeLumina2 (system_prompt 'superior')`); () for the other text encoders. The
    controllers pick the variant whose length the conditioning has (attention/dit_regions.py
    `variant_of`). A variant in which a word is not found is left out (its error is raised where
    that variant's conditioning meets the controller, as a length mismatch)."""
    tk = getattr(clip, "tokenizer", None)
    if tk is None or classify(tk) != ("dit", "Lumina 2"):
        return ()
    out = []
    for key, prefix in lumina2_prefixes().items():
        pos, n = [], None
        try:
            for w in words:
                specs, n = resolve_dit_words(clip, prompt, w, prefix=prefix)
                pos += [tuple(s.positions) for s in specs]
        except AttentionControlError:
            continue
        if n is not None:
            out.append(PromptVariant(f"CLIPTextEncodeLumina2 (system_prompt '{key}')", n, tuple(pos)))
    return tuple(out)
