"""Every decoding method on the embedded SmolLM2-135M: greedy output identical to plain decoding.

The tiny-model tests prove each rule and drafter in depth; this file checks the real model with
its real tokenizer, the CLI's method defaults and the shipped head weights, on a ragged batch.
"""

import dataclasses

import numpy as np
import pytest

from experiments import methods
from models import registry
from specjax.decode import DecodeConfig, generate
from specjax.speculative import speculative_generate

QUESTIONS = [
    "Repeat exactly: the quick brown fox jumps over the lazy dog, the quick brown fox.",
    "What is 12 times 7? Explain step by step.",
]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def smollm2():
    lm = registry.load("smollm2-135m")
    ids = [lm.tokenizer.encode(lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": q}], add_generation_prompt=True), add_special_tokens=False)
        for q in QUESTIONS]
    config = DecodeConfig(max_new_tokens=NEW_TOKENS, eos_ids=lm.tokenizer.eos_ids)
    plain = generate(lm.model, lm.params, ids, config)
    rows = [np.asarray(plain.tokens[i, :plain.lengths[i]]).tolist() for i in range(len(ids))]
    return lm, ids, config, rows


@pytest.mark.parametrize("method", [m for m in methods.METHODS if m != "ar"])
def test_method_equals_plain_greedy_on_smollm2(smollm2, method):
    lm, ids, config, rows = smollm2
    run = methods.Run(method, "smollm2-135m", dataclasses.replace(config, eos_ids=()))
    drafter, dparams = run.drafter(lm)
    out = speculative_generate(lm.model, lm.params, drafter, dparams, ids, config)
    got = [np.asarray(out.tokens[i, :out.lengths[i]]).tolist() for i in range(len(ids))]
    assert got == rows
    assert int(out.stats.row_calls) <= sum(len(r) for r in rows)  # never more calls than tokens
