"""Token alignment between a prompt and the words asked for, on the model's own tokenizer output.

Works on the token lists that ComfyUI's tokenizers return (chunks of 77 `(token, weight, ...)`
tuples, BOS first); no tokenizer is imported here, the caller passes its output.
"""
from __future__ import annotations

from dataclasses import dataclass


class TokenError(ValueError):
    """A word / token request that does not fit the prompt (message names the input and the fix)."""


@dataclass(frozen=True)
class PromptTokens:
    """Flat view of a tokenized prompt: ids per global position (chunk * chunk_len + pos)."""
    ids: tuple[int, ...]
    chunk_len: int
    bos: int | None
    eos: int | None
    pad: int | None

    @property
    def length(self) -> int:
        return len(self.ids)

    def content_positions(self) -> list[int]:
        """Positions that carry prompt text (not BOS, EOS or padding)."""
        out = []
        for c in range(0, len(self.ids), self.chunk_len):
            chunk = self.ids[c:c + self.chunk_len]
            for i, t in enumerate(chunk):
                if i == 0 and t == self.bos:
                    continue
                if t == self.eos or (self.pad is not None and t == self.pad):
                    break
                out.append(c + i)
        return out


def flatten_chunks(chunks, bos=None, eos=None, pad=None) -> PromptTokens:
    """`chunks`: list of chunks, each a list of (token_id, weight[, word_id]) or ints."""
    if not chunks:
        raise TokenError("prompt: the tokenizer returned no tokens")
    chunk_len = len(chunks[0])
    ids = []
    for ch in chunks:
        for t in ch:
            tid = t[0] if isinstance(t, (tuple, list)) else t
            ids.append(int(tid) if not hasattr(tid, "shape") else -1)
    if bos is None:
        bos = ids[0]
    if eos is None:
        # the first token after the content that repeats up to the end of chunk 0
        eos = ids[chunk_len - 1] if chunk_len > 1 else None
    return PromptTokens(tuple(ids), chunk_len, bos, eos, pad)


def word_token_ids(word_chunks, bos: int | None, eos: int | None, pad: int | None = None) -> list[int]:
    """Token ids of a word/phrase tokenized alone (strip BOS, EOS and padding)."""
    flat = flatten_chunks(word_chunks, bos, eos, pad)
    return [flat.ids[p] for p in flat.content_positions()]


def find_positions(prompt: PromptTokens, word_ids: list[int], word: str, occurrence: int | None = None,
                   decode=None) -> list[int]:
    """Global positions of `word_ids` as a contiguous run inside the prompt's content.

    Every occurrence is returned (all their tokens) unless `occurrence` (0-based) picks one.
    """
    if not word_ids:
        raise TokenError(f"words: '{word}' has no tokens; give a word that appears in the prompt")
    content = prompt.content_positions()
    seq = [prompt.ids[p] for p in content]
    n = len(word_ids)
    hits = [i for i in range(len(seq) - n + 1) if seq[i:i + n] == list(word_ids)]
    if not hits:
        raise TokenError(
            f"words: '{word}' is not in the prompt. The prompt's words/tokens are: {describe(prompt, decode)}. "
            "Fix the word, or give token indices instead.")
    if occurrence is not None:
        if occurrence >= len(hits):
            raise TokenError(f"words: '{word}' occurs {len(hits)} time(s); occurrence {occurrence + 1} does not exist")
        hits = [hits[occurrence]]
    return [content[i + j] for i in hits for j in range(n)]


def describe(prompt: PromptTokens, decode=None) -> str:
    """A short human listing of the prompt's content tokens as `index:token`."""
    parts = []
    for p in prompt.content_positions():
        t = prompt.ids[p]
        parts.append(f"{p}:{decode(t) if decode else t}")
    return "[" + ", ".join(parts) + "]"


def parse_word_list(text: str) -> list[str]:
    """Words / phrases separated by commas or new lines; empty entries dropped."""
    out = []
    for line in text.replace("\n", ",").split(","):
        w = line.strip()
        if w:
            out.append(w)
    return out


def parse_index_spec(spec: str, length: int) -> list[int]:
    """`"5"`, `"5+6"` (one word made of two tokens): returns positions, validated against length."""
    out = []
    for part in spec.replace(" ", "").split("+"):
        if not part:
            continue
        if not part.lstrip("-").isdigit():
            raise TokenError(f"words: '{spec}' is not a token index list (use e.g. 5 or 5+6)")
        i = int(part)
        if not 0 <= i < length:
            raise TokenError(f"words: token index {i} is outside the prompt (0..{length - 1})")
        out.append(i)
    return out


def sequential_positions(prompt: PromptTokens, parts: list[list[int]], names: list[str], decode=None) -> list[list[int]]:
    """Global positions of several token runs that appear in this order in the prompt (e.g. the
    layer texts of a prompt made by joining them): each is searched after the end of the previous."""
    content = prompt.content_positions()
    seq = [prompt.ids[p] for p in content]
    out, cursor = [], 0
    for ids, name in zip(parts, names):
        n = len(ids)
        if n == 0:
            out.append([])
            continue
        hit = next((i for i in range(cursor, len(seq) - n + 1) if seq[i:i + n] == list(ids)), None)
        if hit is None:
            raise TokenError(f"prompts: '{name}' was not found in the joined prompt {describe(prompt, decode)}")
        out.append(content[hit:hit + n])
        cursor = hit + n
    return out
