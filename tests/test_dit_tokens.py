"""Word positions in the DiT families' text context (nodes/dit_tokens.py, issue 17).

Every CLIP here is a real `comfy.sd.CLIP`, built the way ComfyUI's text-encoder loader builds it
(ClipTarget of the family's real tokenizer and text-encoder classes), with the encoder's weights on
the meta device (no weights are needed to tokenize). The tokenizer files are the ones ComfyUI ships
in comfy/text_encoders/ (t5_tokenizer, qwen25_tokenizer, llama_tokenizer, the CLIP ones).

HunyuanVideo's Llama 3 tokenizer (llama_tokenizer/tokenizer.json, byte-level BPE): ComfyUI loads it
with transformers' LlamaTokenizerFast, which in this host's transformers 5 rebuilds the tokenizer
from the vocabulary with a sentencepiece-style Metaspace pre-tokenizer instead of the file's
byte-level one (spaces and newlines are lost: "a red circle" -> "ared", "circle"). The test CLIP is
built with transformers' PreTrainedTokenizerFast in that slot, which reads tokenizer.json as it is
(what LlamaTokenizerFast does in transformers 4.x, the version ComfyUI 0.3.75 targets); everything
else (template, BOS, crop) is ComfyUI's.

Tokenizers that only come inside a checkpoint are covered with ComfyUI's real tokenizer classes fed
a tiny model trained here:
- Wan 2.1 (UMT5) and Lumina 2 (Gemma 2): a sentencepiece model trained with SentencePieceTrainer on
  an in-memory corpus into tmp_path, passed as tokenizer_data["spiece_model"] (a uint8 tensor, the
  way load_text_encoder_state_dicts takes it from the checkpoint); UMT5-like (pad 0, eos 1, unk 2,
  dummy prefix) and Gemma-like (pad 0, eos 1, bos 2, unk 3, byte fallback, no dummy prefix).
- Flux.2 (Mistral 3 tekken): ComfyUI 0.3.75's tekken loader does not run with this host's
  transformers (MistralConverter now takes a file path), so the real Flux2Tokenizer is given, through
  ComfyUI's own `mistral3_24b_tokenizer_class` tokenizer_data hook, a Mistral3Tokenizer whose inner
  tokenizer is a tiny byte-level BPE trained here (Mistral's special-token ids: <s> 1, [INST] 3, pad 11);
  everything else (template, BOS, padding side, SDTokenizer) is ComfyUI's.

The context-row check replaces only the text transformer's forward (it needs real weights) with one
that writes each token's id into its output row, then runs ComfyUI's real encode_token_weights
(chunk concatenation, SD3's CLIP/T5 concatenation, Qwen-Image's template drop, Flux.2's layer
stacking): the rows at the positions found must be the word's tokens.
"""
import functools
import numbers

import pytest
import torch

import comfy.sd
import comfy.sd1_clip
import comfy.supported_models_base
import comfy.text_encoders.flux as flux_te
import comfy.text_encoders.genmo as genmo_te
import comfy.text_encoders.hunyuan_image as hunyuan_image_te
import comfy.text_encoders.hunyuan_video as hunyuan_video_te
import comfy.text_encoders.lumina2 as lumina_te
import comfy.text_encoders.pixart_t5 as pixart_te
import comfy.text_encoders.qwen_image as qwen_te
import comfy.text_encoders.sd3_clip as sd3_te
import comfy.text_encoders.wan as wan_te
import comfy.text_encoders.z_image as z_te

from attention_control.attention.core import AttentionControlError, UnsupportedModelError
from attention_control.nodes.dit_tokens import describe, dit_context, is_dit_clip, resolve_dit_words
from attention_control.nodes.common import resolve_words

PROMPT = "a red circle and a blue square"
META = dict(initial_device=torch.device("meta"), load_device=torch.device("cpu"),
            offload_device=torch.device("cpu"), dtype=torch.float16)


def make_clip(tokenizer, te, tokenizer_data=None):
    return comfy.sd.CLIP(comfy.supported_models_base.ClipTarget(tokenizer, te), model_options=META,
                         tokenizer_data=tokenizer_data or {})


# --- tiny tokenizer models for the families whose tokenizer lives in the checkpoint ----------------

WORDS = "a red circle and a blue square the green triangle next to above below big small cat dog sits on mat".split()
CORPUS = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 8 + ["a photo of a realistic painting"] * 2


def train_spm(path, **kw):
    import sentencepiece as spm
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_prefix=str(path), model_type="unigram",
                                   num_threads=1, minloglevel=2, hard_vocab_limit=False, **kw)
    return torch.ByteTensor(list(open(f"{path}.model", "rb").read()))


@pytest.fixture(scope="module")
def spm_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("spm")
    umt5 = train_spm(d / "umt5", vocab_size=90, pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    gemma = train_spm(d / "gemma", vocab_size=350, pad_id=0, eos_id=1, bos_id=2, unk_id=3, byte_fallback=True,
                      add_dummy_prefix=False, normalization_rule_name="identity", remove_extra_whitespaces=False)
    return {"umt5": umt5, "gemma": gemma}


MISTRAL_SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
                    "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]


@functools.lru_cache(maxsize=1)
def tiny_mistral_class():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS + ["You are an AI that reasons about image descriptions."] * 4,
                            trainers.BpeTrainer(vocab_size=400, special_tokens=MISTRAL_SPECIALS, show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    assert tok.token_to_id("<pad>") == 11 and tok.token_to_id("[INST]") == 3

    class TinyMistral3Tokenizer(flux_te.Mistral3Tokenizer):
        """ComfyUI's Mistral3Tokenizer settings, with the tiny BPE in place of the tekken file."""
        def __init__(self, embedding_directory=None, tokenizer_data={}):
            self.tekken_data = None
            comfy.sd1_clip.SDTokenizer.__init__(
                self, "", pad_with_end=False, embedding_size=5120, embedding_key="mistral3_24b",
                tokenizer_class=flux_te.MistralTokenizerClass, has_end_token=False, pad_to_max_length=False,
                pad_token=11, max_length=99999999, min_length=1, pad_left=True,
                tokenizer_args={"tokenizer_object": tok, "legacy": False}, tokenizer_data=tokenizer_data)
    return TinyMistral3Tokenizer


def hunyuan_video_clip():
    """The HunyuanVideo CLIP with the Llama 3 tokenizer file read as it is (see the module docstring)."""
    import transformers
    real = hunyuan_video_te.LlamaTokenizerFast
    hunyuan_video_te.LlamaTokenizerFast = transformers.PreTrainedTokenizerFast
    try:
        return make_clip(hunyuan_video_te.HunyuanVideoTokenizer, hunyuan_video_te.hunyuan_video_clip())
    finally:
        hunyuan_video_te.LlamaTokenizerFast = real


BUILDERS = {
    "Flux": lambda m: make_clip(flux_te.FluxTokenizer, flux_te.flux_clip()),
    "Chroma": lambda m: make_clip(pixart_te.PixArtTokenizer, pixart_te.pixart_te()),
    "SD3": lambda m: make_clip(sd3_te.SD3Tokenizer, sd3_te.sd3_clip()),
    "SD3 CLIP only": lambda m: make_clip(sd3_te.SD3Tokenizer, sd3_te.sd3_clip(t5=False)),
    "SD3 T5 only": lambda m: make_clip(sd3_te.SD3Tokenizer, sd3_te.sd3_clip(clip_l=False, clip_g=False)),
    "Qwen-Image": lambda m: make_clip(qwen_te.QwenImageTokenizer, qwen_te.te()),
    "Z-Image": lambda m: make_clip(z_te.ZImageTokenizer, z_te.te()),
    "Wan": lambda m: make_clip(wan_te.WanT5Tokenizer, wan_te.te(), {"spiece_model": m["umt5"]}),
    "Lumina 2": lambda m: make_clip(lumina_te.LuminaTokenizer, lumina_te.te(), {"spiece_model": m["gemma"]}),
    "Flux.2": lambda m: make_clip(flux_te.Flux2Tokenizer, flux_te.flux2_te(pruned=True),
                                  {"mistral3_24b_tokenizer_class": tiny_mistral_class()}),
    "HunyuanVideo": lambda m: hunyuan_video_clip(),
    "HunyuanVideo 1.5": lambda m: make_clip(hunyuan_video_te.HunyuanVideo15Tokenizer, hunyuan_image_te.te()),
    "HunyuanImage 2.1": lambda m: make_clip(hunyuan_image_te.HunyuanImageTokenizer, hunyuan_image_te.te()),
}


@pytest.fixture(scope="module")
def clips(spm_models):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = BUILDERS[name](spm_models)
        return cache[name]
    return get


def positions(clip, words, prompt=PROMPT, **kw):
    specs, n = resolve_dit_words(clip, prompt, words, **kw)
    return [s.positions for s in specs], n


def sub_tokenizer(clip, key):
    tk = clip.tokenizer
    return getattr(tk, {"l": "clip_l", "g": "clip_g"}.get(key, key), None) or getattr(tk, tk.clip)


def decode(clip, key, ids):
    """The sub-tokenizer's own decoding of `ids` (HF tokenizers, or sentencepiece for SPieceTokenizer)."""
    hf = sub_tokenizer(clip, key).tokenizer
    if hasattr(hf, "decode"):
        return hf.decode(ids)
    return hf.tokenizer.decode(ids)


def raw_ids(clip, key, prompt=PROMPT):
    return [t for ch in clip.tokenize(prompt)[key] for t, *_ in ch]


# --- hand-checked positions per family -------------------------------------------------------------

def test_flux_t5_context_and_positions(clips):
    clip = clips("Flux")
    ids = raw_ids(clip, "t5xxl")
    # T5: ▁ a ▁red ▁circle ▁and ▁ a ▁blue ▁square </s> <pad>... (min_length 256; CLIP-L is only pooled)
    assert [sub_tokenizer(clip, "t5xxl").inv_vocab[i] for i in ids[:10]] == [
        "▁", "a", "▁red", "▁circle", "▁and", "▁", "a", "▁blue", "▁square", "</s>"]
    got, n = positions(clip, "red, circle, blue square, a, square")
    assert n == 256 == len(ids)
    assert got == [[2], [3], [7, 8], [0, 1, 5, 6], [8]]
    assert decode(clip, "t5xxl", [ids[p] for p in got[2]]) == "blue square"
    # a long prompt: no padding, the context grows
    long_prompt = " ".join(["red"] * 300)
    assert positions(clip, "#299", prompt=long_prompt)[1] == 301


def test_chroma_t5_has_no_padding(clips):
    got, n = positions(clips("Chroma"), "red, a")
    assert n == 10 and got == [[2], [0, 1, 5, 6]]        # 9 prompt tokens + </s>


def test_sd3_word_has_clip_and_t5_positions(clips):
    clip = clips("SD3")
    got, n = positions(clip, "red, blue square, a")
    # CLIP part: <bos> a red circle and a blue square <eos> ... (77 rows), then T5 from row 77
    assert n == 77 + 77
    assert got == [[2, 79], [6, 7, 84, 85], [1, 5, 77, 78, 82, 83]]
    l_ids, t5_ids = raw_ids(clip, "l"), raw_ids(clip, "t5xxl")
    assert decode(clip, "l", [l_ids[2]]).strip() == "red" and decode(clip, "t5xxl", [t5_ids[79 - 77]]) == "red"
    # the encoders present decide the parts
    assert positions(clips("SD3 CLIP only"), "red") == ([[2]], 77)
    assert positions(clips("SD3 T5 only"), "red") == ([[2]], 77)
    # a long prompt: two CLIP chunks (154 rows) before T5
    long_prompt = " ".join(["word"] * 80) + " zebra"
    (zebra,), n = positions(clip, "zebra", prompt=long_prompt)
    assert n == 154 + len(raw_ids(clip, "t5xxl", long_prompt)) and zebra[0] > 77 and zebra[-1] >= 154


def test_qwen_image_drops_the_template_prefix(clips):
    clip = clips("Qwen-Image")
    ids = raw_ids(clip, "qwen25_7b")
    # ComfyUI keeps out[:, 34:]: the system turn and "<|im_start|>user\n" (34 tokens) are dropped
    assert decode(clip, "qwen25_7b", ids[31:34]) == "<|im_start|>user\n" and len(ids) == 34 + 7 + 5
    got, n = positions(clip, "red, circle, blue square, a")
    assert n == 12 and got == [[1], [2], [5, 6], [0, 4]]
    assert decode(clip, "qwen25_7b", [ids[34 + p] for p in got[2]]) == " blue square"
    # words of the system prompt ("shape", "color") are not the user's
    with pytest.raises(AttentionControlError, match="'shape' is not in the prompt"):
        positions(clip, "shape")


def test_z_image_keeps_the_whole_template(clips):
    clip = clips("Z-Image")
    got, n = positions(clip, "red, blue square, a")
    # <|im_start|> user \n | a red circle and a blue square | <|im_end|> \n <|im_start|> assistant \n
    assert n == 3 + 7 + 5 and got == [[4], [8, 9], [3, 7]]
    with pytest.raises(AttentionControlError, match="'user' is not in the prompt"):
        positions(clip, "user")


def test_wan_umt5_from_the_checkpoint_tokenizer(clips):
    clip = clips("Wan")
    got, n = positions(clip, "red, a, square")
    assert n == 512                                    # UMT5 min_length 512, padding included
    assert got == [[1], [0, 4], [6]]
    ids = raw_ids(clip, "umt5xxl", PROMPT)
    assert decode(clip, "umt5xxl", [ids[p] for p in got[0]]) == "red"
    # a word the tiny vocabulary splits into many pieces: all of them, the lone "▁" first
    prompt = "a blue triangular square"
    (tri,), _ = positions(clip, "triangular", prompt=prompt)
    ids = raw_ids(clip, "umt5xxl", prompt)
    assert tri == list(range(2, 13)) and decode(clip, "umt5xxl", [ids[p] for p in tri]) == "triangular"
    assert sub_tokenizer(clip, "umt5xxl").inv_vocab[ids[tri[0]]] == "▁"
    # "green" is a piece of "greenish" (▁green i s h) but not the word
    with pytest.raises(AttentionControlError, match="'green' is not in the prompt"):
        positions(clip, "green", prompt="a greenish cat")
    # a character the vocabulary lacks is <unk>: a word with it cannot be found
    with pytest.raises(AttentionControlError, match="'photo' is not in the prompt"):
        positions(clip, "photo", prompt="a photo")


def test_lumina2_gemma_bos_prefix_and_byte_pieces(clips):
    import comfy_extras.nodes_lumina2 as L
    clip = clips("Lumina 2")
    got, n = positions(clip, "red, a")
    assert n == 8 and got == [[2], [1, 5]]             # <bos> a ▁red ▁circle ▁and ▁a ▁blue ▁square
    # CLIPTextEncodeLumina2 puts "<system prompt> <Prompt Start> " before the user's prompt
    prefix = L.CLIPTextEncodeLumina2.SYSTEM_PROMPT["superior"] + " <Prompt Start> "
    n_full = len(clip.tokenize(prefix + PROMPT)["gemma2_2b"][0])
    got, n = positions(clip, "red, a", prefix=prefix)
    assert n == n_full and got == [[n_full - 6], [n_full - 7, n_full - 3]]
    with pytest.raises(AttentionControlError, match="'designed' is not in the prompt"):
        positions(clip, "designed", prefix=prefix)           # a word of the system prompt
    # a character the vocabulary lacks: byte-fallback pieces, one character over three tokens
    prompt = "the 猫 cat"
    (cat_cjk, cat), _ = positions(clip, "猫, cat", prompt=prompt)
    ids = raw_ids(clip, "gemma2_2b", prompt)
    inv = sub_tokenizer(clip, "gemma2_2b").inv_vocab
    assert [inv[ids[p]] for p in cat_cjk] == ["▁", "<0xE7>", "<0x8C>", "<0xAB>"]          # ▁ and 3 bytes
    assert decode(clip, "gemma2_2b", [ids[p] for p in cat_cjk]).strip() == "猫"
    assert decode(clip, "gemma2_2b", [ids[p] for p in cat]).strip() == "cat"


def test_flux2_context_is_left_padded_to_512(clips):
    clip = clips("Flux.2")
    ctx = dit_context(clip, "a red circle")
    ids = raw_ids(clip, "mistral3_24b", "a red circle")
    # <s> [SYSTEM_PROMPT] ... [/SYSTEM_PROMPT] [INST] a red circle [/INST], then 512 - N zero rows in front
    assert ids[0] == 1 and ids[-1] == 4 and ctx.cond_length == len(ids) and ctx.length == 512
    (red, circle), n = positions(clip, "red, circle", prompt="a red circle")
    assert n == 512 and circle[-1] == 510
    pad = 512 - len(ids)
    assert decode(clip, "mistral3_24b", [ids[p - pad] for p in red]).strip() == "red"
    with pytest.raises(AttentionControlError, match="'descriptions' is not in the prompt"):
        positions(clip, "descriptions", prompt="a red circle")


def test_hunyuan_video_keeps_the_user_turn_of_the_llama3_template(clips):
    clip = clips("HunyuanVideo")
    ids = raw_ids(clip, "llama")
    # <|begin_of_text|>, the system turn, <|start_header_id|>user<|end_header_id|>\n\n (95 tokens), then
    # a red circle and a blue square <|eot_id|>: ComfyUI keeps the prompt and the <|eot_id|>
    assert ids[0] == 128000 and len(ids) == 95 + 7 + 1 and ids[-1] == 128009
    assert decode(clip, "llama", ids[91:95]) == "<|start_header_id|>user<|end_header_id|>\n\n"
    got, n = positions(clip, "red, circle, blue square, a")
    assert n == 8 and got == [[1], [2], [5, 6], [0, 4]]
    assert decode(clip, "llama", [ids[95 + p] for p in got[2]]) == " blue square"
    assert len(clip.tokenize(PROMPT)["l"][0]) == 77                 # CLIP-L: only the pooled vector
    # the prompt's weights are parsed; words of the system turn are not the user's
    # (ComfyUI tokenizes each weighted segment alone: "a " | "red" | " circle" -> a, Ġ, red, Ġcircle; the
    # lone space piece before the word counts as the word's, as sentencepiece's lone "▁" does)
    weighted = "a (red:1.2) circle"
    assert positions(clip, "red, (red:1.2)", prompt=weighted)[0] == [[1, 2], [1, 2]]
    ids = raw_ids(clip, "llama", weighted)
    assert decode(clip, "llama", ids[95 + 1:95 + 3]) == " red" and clip.tokenize(weighted)["llama"][0][97][1] == 1.2
    with pytest.raises(AttentionControlError, match="'video' is not in the prompt"):
        positions(clip, "video")


def test_hunyuan_qwen_templates_of_video15_and_image21(clips):
    v15, i21 = clips("HunyuanVideo 1.5"), clips("HunyuanImage 2.1")
    for clip, tail in ((v15, "<|im_end|>\n<|im_start|>assistant\n"), (i21, "<|im_end|>")):
        ids = raw_ids(clip, "qwen25_7b")
        got, n = positions(clip, "red, circle, blue square, a")
        # the second <|im_start|> and "user\n" end the dropped part; the prompt and the template's tail stay
        start = len(ids) - n
        assert decode(clip, "qwen25_7b", ids[start - 3:start]) == "<|im_start|>user\n"
        assert decode(clip, "qwen25_7b", ids[start:]) == PROMPT + tail
        assert got == [[1], [2], [5, 6], [0, 4]]
    assert positions(v15, "red")[1] == 12 and positions(i21, "red")[1] == 8
    with pytest.raises(AttentionControlError, match="'video' is not in the prompt"):
        positions(v15, "video")
    # quoted text also goes to ByT5 (a separate conditioning, conditioning_byt5small): the context is unchanged
    quoted = 'a sign that says "red"'
    assert "byt5" in i21.tokenize(quoted)
    (red,), n = positions(i21, "red", prompt=quoted)
    assert n == len(raw_ids(i21, "qwen25_7b", quoted)) - 34 and red == [5]          # a sign that says Ġ" red
    # HunyuanImage 2.1's encoder drops a fixed 36 tokens from a prompt that starts with "<" (the refiner's
    # Llama-style template, which the Qwen tokenizer reads as text)
    refiner = "<|start_header_id|>system<|end_header_id|> describe <|start_header_id|>user<|end_header_id|> a red cat "
    refiner += "sits on a small green mat next to a big blue dog"
    ids = raw_ids(i21, "qwen25_7b", refiner)
    assert ids[0] == 27 and len(ids) > 36
    (dog,), n = positions(i21, "dog", prompt=refiner)
    assert n == len(ids) - 36 and decode(i21, "qwen25_7b", [ids[36 + p] for p in dog]) == " dog"
    with pytest.raises(AttentionControlError, match="'cat' is not in the prompt"):       # in the dropped 36
        positions(i21, "cat", prompt=refiner)


# --- prompt syntax ---------------------------------------------------------------------------------

def test_weight_syntax_and_escapes_follow_the_tokenizer(clips):
    flux, qwen = clips("Flux"), clips("Qwen-Image")
    weighted = "a (red:1.2) circle and a blue square"
    toks = flux.tokenize(weighted)["t5xxl"][0]
    assert toks[2][1] == pytest.approx(1.2)            # ComfyUI parsed the weight: same tokens, weighted
    assert positions(flux, "red, (red:1.2), circle", prompt=weighted)[0] == [[2], [2], [3]]
    # escaped parens are literal text
    esc = r"a \(red\) circle"
    (red, paren), _ = positions(flux, r"red, \(red\)", prompt=esc)
    ids = raw_ids(flux, "t5xxl", esc)
    assert decode(flux, "t5xxl", [ids[p] for p in paren]).replace(" ", "") == "(red)" and set(red) < set(paren)
    # Qwen-Image tokenizes the prompt verbatim (weights disabled): the literal "(red:1.2)" is there
    (red, literal), _ = positions(qwen, "red, (red:1.2)", prompt=weighted)
    ids = raw_ids(qwen, "qwen25_7b", weighted)
    assert red == [2] and decode(qwen, "qwen25_7b", [ids[34 + p] for p in literal]).strip() == "(red:1.2)"


def test_words_inside_longer_words_do_not_match(clips):
    for name in ("Flux", "Qwen-Image", "SD3", "Wan"):
        with pytest.raises(AttentionControlError, match="'red' is not in the prompt"):
            positions(clips(name), "red", prompt="an infrared photo of circles")
        with pytest.raises(AttentionControlError, match="'circle' is not in"):
            positions(clips(name), "circle", prompt="an infrared photo of circles")
    # multi-piece words: T5 splits photorealistic into ▁photo real istic
    flux = clips("Flux")
    prompt = "a blue photorealistic square"
    (photo,), _ = positions(flux, "Photorealistic", prompt=prompt)
    ids = raw_ids(flux, "t5xxl", prompt)
    assert [sub_tokenizer(flux, "t5xxl").inv_vocab[ids[p]] for p in photo] == ["▁photo", "real", "istic"]


def test_repeated_words_give_every_occurrence(clips):
    prompt = "a red circle, a red square"
    # T5: ▁ a ▁red ▁circle , ▁ a ▁red ▁square
    assert positions(clips("Flux"), "red", prompt=prompt)[0] == [[2, 7]]
    assert positions(clips("Z-Image"), "red circle", prompt=prompt)[0] == [[4, 5]]


def test_errors_name_the_input_the_word_and_the_tokens(clips):
    flux, sd3 = clips("Flux"), clips("SD3")
    with pytest.raises(AttentionControlError, match=r"phrases: 'giraffe' is not in the prompt\. .*T5-XXL \[0:▁, 1:a, 2:▁red"):
        resolve_dit_words(flux, PROMPT, "giraffe", input_name="phrases")
    with pytest.raises(AttentionControlError, match="phrases: give at least one word"):
        resolve_dit_words(flux, PROMPT, " , ", input_name="phrases")
    with pytest.raises(AttentionControlError, match="boxes: token index 300 is outside the prompt \\(0..255\\)"):
        resolve_dit_words(flux, PROMPT, "#300", input_name="boxes")
    assert positions(flux, "#2+3")[0] == [[2, 3]]
    # SD3: in the CLIP tokens but not in T5's (T5 has no such character)
    with pytest.raises(AttentionControlError, match="'猫' is not in the T5-XXL tokens of the prompt"):
        positions(sd3, "猫", prompt="a 猫 cat")
    assert "CLIP-L/G [1:a, 2:red" in describe(dit_context(sd3, PROMPT))


def test_unsupported_text_encoder_is_named():
    clip = comfy.sd.CLIP(no_init=True)
    clip.tokenizer, clip.tokenizer_options = genmo_te.MochiT5Tokenizer(), {}
    assert is_dit_clip(clip)
    with pytest.raises(UnsupportedModelError, match="words: word lookup does not support this text encoder "
                                                    r"\(Mochi\); supported: SD1.x / SD2.x / SDXL CLIP, Flux"):
        resolve_words(clip, PROMPT, "red")


def test_resolve_words_dispatches_and_keeps_sd_clip_lookup(clips):
    import comfy.sd1_clip as S
    sd1 = make_clip(S.SD1Tokenizer, S.SD1ClipModel)
    assert not is_dit_clip(sd1)
    specs, n = resolve_words(sd1, PROMPT, "red, blue square")
    assert n == 77 and [s.positions for s in specs] == [[2], [6, 7]]          # the CLIP-L chunk lookup
    flux = clips("Flux")
    specs, n = resolve_words(flux, PROMPT, "red, blue square", input_name="phrases")
    assert n == 256 and [s.positions for s in specs] == [[2], [7, 8]] and specs[0].label == "red"


# --- the context rows ComfyUI's encoders produce ---------------------------------------------------

def _id_rows_forward(self, tokens):
    """Stand-in for the text transformer: row i of the output holds token i's id in every feature."""
    ids = torch.tensor([[float(t) if isinstance(t, numbers.Integral) else -1.0 for t in seq] for seq in tokens])
    dim = self.transformer.get_input_embeddings().weight.shape[1]
    z = ids[..., None].repeat(1, 1, dim)
    if isinstance(self.layer, list):                  # Flux.2: one output per chosen layer
        z = z[:, None].repeat(1, len(self.layer), 1, 1)
    pooled = torch.zeros(ids.shape[0], dim)
    if self.return_attention_masks:
        return z, pooled, {"attention_mask": torch.ones(ids.shape, dtype=torch.long)}
    return z, pooled


ROW_CASES = [  # family, sub-tokenizer key of each part (in order), words
    ("Flux", ["t5xxl"], "red, blue square, a"),
    ("Chroma", ["t5xxl"], "red, circle"),
    ("SD3", ["l", "t5xxl"], "red, blue square"),
    ("SD3 T5 only", ["t5xxl"], "red"),
    ("Qwen-Image", ["qwen25_7b"], "red, blue square, a"),
    ("Z-Image", ["qwen3_4b"], "red, square"),
    ("Wan", ["umt5xxl"], "red, blue square"),
    ("Lumina 2", ["gemma2_2b"], "red, blue square"),
    ("Flux.2", ["mistral3_24b"], "red, blue square"),
    ("HunyuanVideo", ["llama"], "red, blue square, a"),
    ("HunyuanVideo 1.5", ["qwen25_7b"], "red, blue square"),
    ("HunyuanImage 2.1", ["qwen25_7b"], "red, square"),
]


@pytest.mark.parametrize("family,keys,words", ROW_CASES, ids=[c[0] for c in ROW_CASES])
def test_positions_index_the_rows_comfyui_encodes(clips, monkeypatch, family, keys, words):
    clip = clips(family)
    monkeypatch.setattr(comfy.sd1_clip.SDClipModel, "forward", _id_rows_forward)
    cond = clip.cond_stage_model.encode_token_weights(clip.tokenize(PROMPT))[0]
    ctx = dit_context(clip, PROMPT)
    assert cond.shape[1] == ctx.cond_length
    rows = cond[0, :, 0].long().tolist()
    if family == "Flux.2":                              # model_base.Flux2.extra_conds: zero rows in front
        rows = [None] * (ctx.length - ctx.cond_length) + rows
    assert len(rows) == ctx.length
    specs, n = resolve_dit_words(clip, PROMPT, words)
    assert n == ctx.length
    for spec in specs:
        for part, key in zip(ctx.parts, keys):
            mine = [p for p in spec.positions if part.offset <= p < part.offset + part.length]
            text = decode(clip, key, [rows[p] for p in mine])
            assert text.split() == spec.label.split() * (2 if spec.label == "a" else 1), (family, spec, text)


# --- Lumina 2: the words in CLIPTextEncode's and CLIPTextEncodeLumina2's conditioning ---------------

LUMINA_WORDS = "red, blue square"


def lumina_encodes(clip, monkeypatch, prompt):
    """Context rows (token ids, see `_id_rows_forward`) of the conditioning ComfyUI's own nodes give:
    CLIPTextEncode, and CLIPTextEncodeLumina2 with each of its system prompts. The weights are on
    the meta device: `load_model` (moving them to the load device) is skipped."""
    import comfy_extras.nodes_lumina2 as L
    import nodes as comfy_nodes                         # ComfyUI's nodes.py
    monkeypatch.setattr(comfy.sd1_clip.SDClipModel, "forward", _id_rows_forward)
    monkeypatch.setattr(clip, "load_model", lambda: clip.patcher)
    out = {"CLIPTextEncode": comfy_nodes.CLIPTextEncode().encode(clip, prompt)[0]}
    for key in L.CLIPTextEncodeLumina2.SYSTEM_PROMPT:
        out[f"CLIPTextEncodeLumina2 (system_prompt '{key}')"] = L.CLIPTextEncodeLumina2.execute(clip, prompt,
                                                                                                key).result[0]
    return {k: c[0][0][0, :, 0].long().tolist() for k, c in out.items()}


def test_lumina2_words_in_both_encode_nodes(clips, monkeypatch):
    from attention_control.nodes.dit_tokens import prompt_variants
    clip = clips("Lumina 2")
    rows = lumina_encodes(clip, monkeypatch, PROMPT)
    specs, n = resolve_dit_words(clip, PROMPT, LUMINA_WORDS)
    variants = prompt_variants(clip, PROMPT, LUMINA_WORDS, "a")        # two word lists: specs concatenated
    assert [v.label for v in variants] == list(rows)[1:]              # one per system prompt, the node's order
    got = {"CLIPTextEncode": (n, [s.positions for s in specs] + [positions(clip, "a")[0][0]])}
    got.update({v.label: (v.length, [list(p) for p in v.positions]) for v in variants})
    for label, r in rows.items():
        length, pos = got[label]
        assert len(r) == length, label
        for w, p in zip(("red", "blue square", "a a"), pos):
            assert decode(clip, "gemma2_2b", [r[i] for i in p]).split() == w.split(), (label, w)
    assert len({length for length, _ in got.values()}) == 3           # the length tells the encode node apart
    # the plain context: <bos> a ▁red ▁circle ▁and ▁a ▁blue ▁square; a system prompt's: its tokens first
    assert got["CLIPTextEncode"][1][:2] == [[2], [6, 7]]
    sup = got["CLIPTextEncodeLumina2 (system_prompt 'superior')"]
    assert sup[1][:2] == [[sup[0] - 6], [sup[0] - 2, sup[0] - 1]]
    # other tokenizers have no variants
    assert prompt_variants(clips("Flux"), PROMPT, LUMINA_WORDS) == ()


def _lumina_run(ctrl_factory, pos_len, neg_len, keep=None):
    from ac_dit import sample, tiny
    from attention_control.attention.router import attach
    t = tiny("Lumina 2")
    g = torch.Generator().manual_seed(8)
    latent = torch.zeros_like(t.x)
    noise = torch.randn(latent.shape, generator=g)
    pos = [[torch.randn(1, pos_len, 32, generator=g), {}]]
    neg = [[torch.randn(1, neg_len, 32, generator=g), {}]]
    m = attach(t.patcher, ctrl_factory())
    if keep is not None:
        m = attach(attach(t.patcher, keep), ctrl_factory())
    return sample(m, noise, pos, neg, latent, steps=2), sample(t.patcher, noise, pos, neg, latent, steps=2)


def test_capture_on_lumina2_takes_the_words_of_the_encode_node_used(clips):
    """The capture node's prompt is the plain text; the sampler's positive comes from CLIPTextEncode or
    CLIPTextEncodeLumina2 (its length picks the variant): the maps are those of the words' columns in
    that context (the naive float64 joint softmax), and another length is refused by name."""
    from test_dit_capture import Keep, naive_maps
    from attention_control.attention.capture import AttentionMaps, WordSpec
    from attention_control.attention.dit_capture import DitCaptureController
    from attention_control.attention.dit_layers import DitLayerSelector
    from attention_control.nodes.dit_tokens import prompt_variants
    clip = clips("Lumina 2")
    specs, n = resolve_dit_words(clip, PROMPT, LUMINA_WORDS)
    variants = prompt_variants(clip, PROMPT, LUMINA_WORDS)
    cases = [(n, [s.positions for s in specs])] + [(v.length, [list(p) for p in v.positions]) for v in variants]
    for length, want_pos in cases:
        keep, handle = Keep(), AttentionMaps([s.label for s in specs])
        out, ref = _lumina_run(lambda: DitCaptureController(specs, n, handle, DitLayerSelector.parse("all"),
                                                            cond_len=n, variants=variants), length, n, keep)
        assert torch.equal(out, ref)
        calls = [c for c in keep.calls if c["rows"]]
        assert calls
        want = naive_maps(calls, [WordSpec(s.label, p) for s, p in zip(specs, want_pos)], 1)
        torch.testing.assert_close(handle.maps.double(), want, rtol=1e-4, atol=1e-6)
    with pytest.raises(AttentionControlError, match=r"prompt: the capture node's prompt has 8 context tokens, \d+ as "
                                                    r"CLIPTextEncodeLumina2 \(system_prompt 'superior'\).*but the "
                                                    r"positive conditioning has 9; .*\(CLIPTextEncode, or "
                                                    r"CLIPTextEncodeLumina2"):
        _lumina_run(lambda: DitCaptureController(specs, n, AttentionMaps(["red", "blue square"]),
                                                 DitLayerSelector.parse("all"), cond_len=n, variants=variants), n + 1, n)


def test_paint_on_lumina2_takes_the_words_of_the_encode_node_used(clips):
    """Paint-with-words given the plain prompt and the variants equals, bit for bit, paint given the
    positions and length of the system-prompt context the positive has; without variants it is refused."""
    from attention_control.attention.dit_layers import DitLayerSelector
    from attention_control.attention.dit_regions import DitPaintController
    from attention_control.attention.regions import PaintedPhrase
    from attention_control.nodes.dit_tokens import prompt_variants
    clip = clips("Lumina 2")
    specs, n = resolve_dit_words(clip, PROMPT, LUMINA_WORDS)
    variants = prompt_variants(clip, PROMPT, LUMINA_WORDS)
    mask = torch.zeros(64, 64)
    mask[:32, :32] = 1.0

    def paint(pos, length, var=()):
        phrases = [PaintedPhrase(s.label, list(p), mask, 1.0) for s, p in zip(specs, pos)]
        return lambda: DitPaintController(phrases, length, weight=2.0, selector=DitLayerSelector.parse("all"),
                                          variants=var)
    v = variants[0]
    got, ref = _lumina_run(paint([s.positions for s in specs], n, variants), v.length, n)
    direct, _ = _lumina_run(paint(v.positions, v.length), v.length, n)
    assert not torch.equal(got, ref) and torch.equal(got, direct)
    with pytest.raises(AttentionControlError, match="prompt: the paint-with-words node's prompt has 8 context tokens, "
                                                    "but the positive conditioning has"):
        _lumina_run(paint([s.positions for s in specs], n), v.length, n)


@pytest.mark.parametrize("family", ["HunyuanVideo", "HunyuanVideo 1.5", "HunyuanImage 2.1"])
def test_hunyuan_positions_are_the_key_columns_of_the_joint_calls(clips, family):
    """On the tiny HunyuanVideo-class models (image tokens first, then the refined context, one row
    per c_crossattn row): a context of the resolver's length gives joint calls whose text keys are
    exactly that long, and a word's key columns are n_image + its context positions."""
    from ac_dit import forward, inputs, tiny
    from test_dit_capture import Keep
    from attention_control.attention.router import attach
    clip = clips(family)
    specs, n = resolve_dit_words(clip, PROMPT, "red, blue square")
    t = tiny(family)
    x, conds = inputs(family, torch.Generator().manual_seed(2))
    conds = dict(conds, c_crossattn=torch.randn(1, n, 32, generator=torch.Generator().manual_seed(3)))
    keep = Keep()
    forward(attach(t.patcher, keep), x, conds)
    joint = [c for c in keep.calls if c["qi"] is not None]
    assert joint
    n_image = joint[0]["qi"].stop - joint[0]["qi"].start
    for c in joint:
        assert c["k"].shape[2] == n_image + n and c["qi"] == slice(0, n_image)
        assert [c["cols"](s.positions) for s in specs] == [[n_image + p for p in s.positions] for s in specs]


def test_capture_node_on_lumina2_with_the_lumina2_encode_node(clips):
    """The capture node given the plain prompt, sampled with a positive of the length
    CLIPTextEncodeLumina2 ('alignment') gives: it runs and publishes one map per word."""
    from attention_control.nodes.capture import CaptureAttention
    from attention_control.nodes.dit_tokens import prompt_variants
    from ac_dit import sample, tiny
    clip = clips("Lumina 2")
    t = tiny("Lumina 2")
    model, handle = CaptureAttention.execute(t.patcher, clip, PROMPT, LUMINA_WORDS, "all", 0.0, 1.0, False).result
    length = [v for v in prompt_variants(clip, PROMPT, LUMINA_WORDS) if "alignment" in v.label][0].length
    g = torch.Generator().manual_seed(4)
    latent = torch.zeros_like(t.x)
    pos, neg = [[torch.randn(1, length, 32, generator=g), {}]], [[torch.randn(1, 8, 32, generator=g), {}]]
    sample(model, torch.randn(latent.shape, generator=g), pos, neg, latent, steps=2)
    assert handle.maps.shape[:2] == (1, 2) and torch.isfinite(handle.maps).all() and handle.maps.sum() > 0
