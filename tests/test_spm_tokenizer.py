"""SentencePiece GGUF vocabularies (``models/spm_tokenizer.py``) against two references.

* Gemma 3 270M's GGUF (262144 pieces, no space prefix): ids and decoding against transformers'
  own GGUF tokenizer loader, Gemma's chat template, its end-of-turn id.
* A tiny Llama-2-style file written here (a BPE vocabulary trained on a paragraph, pieces stored
  in shuffled order, byte pieces, control and user-defined tokens, a space prefix): against
  transformers' GGUF loader, and against SentencePiece's BPE algorithm written out below from
  its definition (greedy best-score pair merging over the scores; no merge list, no
  ``tokenizers``), which also covers the cases where transformers departs from SentencePiece.
"""

import collections
import os
import random
import re

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from models import registry  # noqa: E402
from models.gguf import open_gguf, tokenizer_from_gguf  # noqa: E402
from models.hf import CheckpointError  # noqa: E402
from models.spm_tokenizer import GEMMA_CHAT_TEMPLATE  # noqa: E402

GEMMA_TEXTS = [
    "Hello, world!", "The capital of France is", " leading space", "  two leading spaces",
    "trailing spaces   ", "multiple     spaces and\n\nnewlines\n", "\n\n\nstarts with newlines",
    "tabs\tand\t\ttabs", "CRLF\r\nline", "def f(x):\n    if x:\n        return [i for i in x]\n"
    "\treturn None  # tab", "digits 0123456789 and 3.14159 and 1,000,000 and 2024-01-01",
    "x1y22z333", "naïve café, Grüße, 東京タワー, Привет, مرحبا", "emoji 😀👍🏽 👨‍👩‍👧 🇫🇷!",
    "rare 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ 𓀀 \x00\x01", "mixed\u00a0nbsp and \u200bzero-width", "▁already▁",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>",
    "<bos>text<eos>", "<div>html</div> and <s>struck</s>", "a <0x41> b <unused5> z",
    "=" * 30 + " " + "-" * 17, " " * 31 + "x", "\t" * 40, "", " ",
]
# 32 spaces or more: Gemma's runs of 2..31 spaces are user-defined pieces, cut out of the text
# whole and longest first (as SentencePiece and llama.cpp match user-defined pieces), so 40
# spaces are 31 + 9. transformers turns them into BPE merges instead and gets 16 + 24.
GEMMA_LONG_SPACES = (" " * 40 + "x", [2, 167, 145, 236781])

CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": " And 3 + 3? "}]
CHAT_PROMPT = ("<bos><start_of_turn>user\nYou are terse.\n\nWhat is 2 + 2?<end_of_turn>\n"
               "<start_of_turn>model\n4<end_of_turn>\n"
               "<start_of_turn>user\nAnd 3 + 3?<end_of_turn>\n<start_of_turn>model\n")


@pytest.fixture(scope="module")
def gemma():
    path = registry.gguf_path("gemma3-270m")
    return tokenizer_from_gguf(open_gguf(path), path)


@pytest.fixture(scope="module")
def gemma_reference():
    """transformers' GGUF tokenizer of the same file. GemmaTokenizer is the class AutoTokenizer
    picks for it; AutoTokenizer would first parse the whole file with gguf-py for the config
    (50 s more here) and builds the same backend."""
    directory, name = os.path.split(registry.gguf_path("gemma3-270m"))
    return transformers.GemmaTokenizer.from_pretrained(directory, gguf_file=name)


def test_gemma_ids_match_transformers(gemma, gemma_reference):
    for text in GEMMA_TEXTS:
        for special in (True, False):
            ids = gemma_reference.encode(text, add_special_tokens=special)
            assert gemma.encode(text, add_special_tokens=special) == ids, (text, special)


def test_gemma_decode_matches_transformers(gemma, gemma_reference):
    for text in GEMMA_TEXTS + [GEMMA_LONG_SPACES[0]]:
        ids = gemma.encode(text)
        for skip in (True, False):
            assert gemma.decode(ids, skip) == gemma_reference.decode(
                ids, skip_special_tokens=skip), (text, skip)
        if "<" not in text and "\u2581" not in text:  # ("▁" is a space to SentencePiece)
            assert gemma.decode(ids) == text


def test_gemma_random_slices_match_transformers(gemma, gemma_reference):
    text, rng = "\n".join(GEMMA_TEXTS), random.Random(0)
    for _ in range(300):
        start = rng.randrange(len(text))
        piece = text[start:start + rng.randrange(1, 60)]
        assert gemma.encode(piece) == gemma_reference.encode(piece), piece


def test_gemma_long_space_runs(gemma):
    text, ids = GEMMA_LONG_SPACES
    assert gemma.encode(text) == ids


def test_gemma_special_ids(gemma):
    assert gemma.vocab_size == 262144
    assert (gemma.bos_id, gemma.pad_id) == (2, 0)
    assert gemma.eos_ids == (1, 106)  # <eos>, <end_of_turn>; not "</s>", an HTML tag here
    assert gemma.id_to_token(106) == "<end_of_turn>"


def test_gemma_chat_template(gemma, gemma_reference):
    assert gemma_reference.chat_template is None  # the GGUF has none: the module supplies it
    prompt = gemma.apply_chat_template(CHAT)
    assert prompt == CHAT_PROMPT
    # transformers, given the same template, renders and tokenizes the conversation the same.
    render = lambda **kw: gemma_reference.apply_chat_template(  # noqa: E731
        CHAT, chat_template=GEMMA_CHAT_TEMPLATE, add_generation_prompt=True, **kw)
    assert render(tokenize=False) == prompt
    ids = gemma.encode(prompt, add_special_tokens=False)
    assert ids == list(render(tokenize=True)["input_ids"])
    assert ids[:3] == [2, 105, 2364] and ids[-3:] == [105, 4368, 107]  # <bos><start_of_turn>user
    with pytest.raises(Exception, match="must alternate"):
        gemma.apply_chat_template([{"role": "user", "content": "a"}] * 2)


# ---- a tiny Llama-2-style file ----

CORPUS = """The quick brown fox jumps over the lazy dog. A speculative decoder drafts several tokens
and the target model verifies them in one pass; accepted tokens are kept, the rest are dropped.
def accept(draft, target):
    for i, token in enumerate(draft):
        if token != target[i]:
            return i
    return len(draft)
Numbers like 1234 and 3.14159 appear in text, as do dates such as 2024-01-01 and words such as
tokenizer, tokenization, token, tokens, decode, decoder, decoding, encode, encoder, encoding.
"""
CONTROL, USER_DEFINED = ["<s>", "</s>", "[INST]", "[/INST]"], ["<|tool|>"]
# Text where transformers agrees with SentencePiece: it starts with no whitespace, and no text
# follows a control or user-defined token.
SYNTH_TEXTS = [
    "The quick brown fox jumps over the lazy dog.", "tokenization decoding encoders",
    "untrained words: zebra quixotic", "trailing spaces   ", "a  b   c", "line\n\nbreaks\n",
    "def accept(draft, target):\n    for i in draft:\n\treturn i", "1234 3.14159 2024-01-01 99",
    "Zürich, 東京, Привет, 😀👍🏽", "x", "", "ok</s>", "literal▁marks",
    "\nnewline first", "\tindented",
]
# SentencePiece (and llama.cpp, and Llama 2's own tokenizer.json) put a "▁" before every stretch
# of text, after special tokens too, and keep a leading space as one more "▁". transformers'
# GGUF loader uses Metaspace(prepend_scheme="first"), which does neither: these differ from it.
SYNTH_PREFIX_TEXTS = [" leading", "  two leading", "\u2581literal first",
                      "[INST] hi [/INST] ok</s>", "<s>[INST]What?[/INST]", "<|tool|>call(x)",
                      "a<|tool|> b"]


def _train_pieces(corpus: str, n_merges: int) -> tuple[list[str], list[str]]:
    """Plain BPE training (SentencePiece style: each word starts with "▁"): the merged pieces in
    merge order, and the characters."""
    words = collections.Counter("\u2581" + w for w in corpus.split())
    split = {w: list(w) for w in words}
    merged = []
    for _ in range(n_merges):
        pairs = collections.Counter()
        for w, count in words.items():
            for pair in zip(split[w], split[w][1:]):
                pairs[pair] += count
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        if a + b not in merged:
            merged.append(a + b)
        for w, symbols in split.items():
            out, i = [], 0
            while i < len(symbols):
                joined = symbols[i:i + 2] == [a, b]
                out.append(a + b if joined else symbols[i])
                i += 2 if joined else 1
            split[w] = out
    return merged, sorted({ch for w in words for ch in w})


def _write_spm_gguf(path, scores: bool = True, add_space_prefix=True):
    """A Llama-2-like GGUF: <unk>, control tokens, 256 byte pieces, a user-defined token, then the
    normal pieces in shuffled order (merges must follow the scores, not the positions)."""
    merged, chars = _train_pieces(CORPUS, 300)
    normal = [(p, -float(i)) for i, p in enumerate(merged + chars)]
    random.Random(0).shuffle(normal)
    tokens = (["<unk>"] + CONTROL + [f"<0x{b:02X}>" for b in range(256)] + USER_DEFINED
              + [p for p, _ in normal])
    types = [2] + [3] * len(CONTROL) + [6] * 256 + [4] * len(USER_DEFINED) + [1] * len(normal)
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_rope_dimension_count(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    if scores:
        w.add_token_scores([0.0] * (len(tokens) - len(normal)) + [s for _, s in normal])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    if add_space_prefix is not None:
        w.add_add_space_prefix(add_space_prefix)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


class SentencePieceBPE:
    """SentencePiece BPE encoding from its definition, as llama.cpp's SPM tokenizer does it:
    control and user-defined tokens are cut out of the raw text first (longest first); each
    stretch of text between them gets "▁" for spaces and a leading "▁"; then, starting from
    characters, the adjacent pair whose concatenation is the best-scoring normal piece is joined
    (leftmost on ties) until none is; a symbol that is no piece becomes its UTF-8 byte pieces.
    For files with a space prefix (``add_space_prefix`` true), like the one written here."""

    def __init__(self, reader):
        field = lambda key: reader.fields[f"tokenizer.ggml.{key}"].contents()  # noqa: E731
        self.tokens, self.types = field("tokens"), field("token_type")
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        self.score = {t: s for t, s, ty in zip(self.tokens, field("scores"), self.types)
                      if ty == 1}
        whole = sorted((t for t, ty in zip(self.tokens, self.types) if ty in (3, 4)),
                       key=len, reverse=True)
        self.whole = re.compile("|".join(map(re.escape, whole)))
        self.bos = field("bos_token_id")

    def _bpe(self, text: str) -> list[int]:
        symbols = list(text)
        while True:
            best = None
            for i in range(len(symbols) - 1):
                score = self.score.get(symbols[i] + symbols[i + 1])
                if score is not None and (best is None or score > best[0]):
                    best = (score, i)
            if best is None:
                break
            i = best[1]
            symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
        ids = []
        for s in symbols:
            if s in self.score:
                ids.append(self.ids[s])
            else:
                ids.extend(self.ids[f"<0x{b:02X}>"] for b in s.encode())
        return ids

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids, pos = [self.bos] if add_bos else [], 0
        for match in [*self.whole.finditer(text), None]:
            end = len(text) if match is None else match.start()
            if end > pos:
                ids += self._bpe("\u2581" + text[pos:end].replace(" ", "\u2581"))
            if match is not None:
                ids.append(self.ids[match.group()])
                pos = match.end()
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        out = b""
        for i in ids:
            if self.types[i] == 3 and skip_special:
                continue
            token = self.tokens[i]
            out += bytes([int(token[3:5], 16)]) if self.types[i] == 6 else (
                token.replace("\u2581", " ").encode())
        text = out.decode("utf-8", errors="replace")
        return text[1:] if text.startswith(" ") else text


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """``(ours, transformers', SentencePieceBPE)`` for the tiny Llama-2-style file."""
    path = str(_write_spm_gguf(tmp_path_factory.mktemp("spm") / "tiny-spm.gguf"))
    reader = open_gguf(path)
    directory, name = os.path.split(path)
    reference = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    return tokenizer_from_gguf(reader, path), reference, SentencePieceBPE(reader)


def test_synthetic_matches_sentencepiece(synthetic):
    tok, _, spm = synthetic
    assert tok.encode("x")[0] == 1  # no add_bos_token flag: BOS, as llama.cpp does
    for text in SYNTH_TEXTS + SYNTH_PREFIX_TEXTS:
        for special in (True, False):
            assert tok.encode(text, special) == spm.encode(text, special), (text, special)
        ids = tok.encode(text)
        for skip in (True, False):
            assert tok.decode(ids, skip) == spm.decode(ids, skip), (text, skip)
        if not spm.whole.search(text) and "\u2581" not in text:
            assert tok.decode(ids) == text


def test_synthetic_matches_transformers(synthetic):
    tok, ref, _ = synthetic
    for text in SYNTH_TEXTS:
        for special in (True, False):
            assert tok.encode(text, special) == ref.encode(text, add_special_tokens=special), text
    for text in SYNTH_TEXTS + SYNTH_PREFIX_TEXTS:
        ids = tok.encode(text)
        for skip in (True, False):
            assert tok.decode(ids, skip) == ref.decode(ids, skip_special_tokens=skip), (text, skip)
    assert tok.encode(" leading") == [1, tok.token_to_id("\u2581")] + ref.encode("leading")[1:]


def test_synthetic_random_slices(synthetic):
    """Slices of the training text with odd characters and added tokens mixed in."""
    tok, ref, spm = synthetic
    extras, rng = ["é", "東", "😀", "\t", "  ", "[INST]", "<|tool|>", "</s>"], random.Random(0)
    for _ in range(300):
        start = rng.randrange(len(CORPUS))
        text = CORPUS[start:start + rng.randrange(1, 50)]
        if rng.random() < 0.5:
            cut = rng.randrange(len(text) + 1)
            text = text[:cut] + rng.choice(extras) + text[cut:]
        assert tok.encode(text) == spm.encode(text), text
        if not text[0].isspace() and not spm.whole.search(text):
            assert tok.encode(text) == ref.encode(text), text


def test_synthetic_space_prefix_default_and_special_ids(synthetic, tmp_path):
    tok, ref, _ = synthetic
    path = str(_write_spm_gguf(tmp_path / "no-flag.gguf", add_space_prefix=None))
    no_flag = tokenizer_from_gguf(open_gguf(path), path)
    for text in SYNTH_TEXTS + SYNTH_PREFIX_TEXTS:
        assert no_flag.encode(text) == tok.encode(text), text  # absent flag: a prefix, as Llama 2
    assert (tok.bos_id, tok.eos_ids, tok.pad_id, tok.chat_template) == (1, (2,), None, None)
    assert tok.vocab_size == len(ref)


def test_missing_scores_is_one_line_error(tmp_path):
    path = str(_write_spm_gguf(tmp_path / "no-scores.gguf", scores=False))
    with pytest.raises(CheckpointError, match=r"no-scores\.gguf.*has no tokenizer\.ggml\.scores"
                       ) as err:
        tokenizer_from_gguf(open_gguf(path), path)
    assert "\n" not in str(err.value) and "convert_hf_to_gguf" in str(err.value)
