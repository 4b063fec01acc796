"""Every decoding method on the embedded SmolLM2-135M: greedy output identical to plain decoding,
through both paths a user takes: ``generate``'s (its flags, ``Run.generate``) and the
benchmark's (its flags, ``MethodRunner``), with the same flags.

(The benchmark's runner path runs for a few methods, see RUNNER_METHODS.) The tiny-model
tests prove each rule and drafter in depth; this file checks the real model with
its real tokenizer, the CLI's method defaults and the shipped head weights, on a ragged batch.
The methods run with ``--weights=gguf`` (the checkpoint's own Q4_1 / Q8_0 blocks through the C++
kernel, ~3x faster than float32 here), and plain decoding with those weights is checked to give
the float32 path's tokens: the same numbers, summed in another order.
"""

import numpy as np
import pytest
from absl import flags

from drafters import registry
from experiments import benchmark, generate, methods
from experiments.bench_runner import MethodRunner
from models import registry as models
from specjax.decode import DecodeConfig, generate as plain_generate

XLA_OPTIMIZE = True  # its time is running SmolLM2, not compiling (tests/conftest.py)
QUESTIONS = [
    "Repeat exactly: the quick brown fox jumps over the lazy dog, the quick brown fox.",
    "What is 12 times 7? Explain step by step.",
]
NEW_TOKENS = 24
WEIGHTS = "gguf"


@pytest.fixture(scope="module")
def smollm2():
    lm = models.load("smollm2-135m", weights=WEIGHTS)
    ids = [lm.tokenizer.encode(lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": q}], add_generation_prompt=True), add_special_tokens=False)
        for q in QUESTIONS]
    config = DecodeConfig(max_new_tokens=NEW_TOKENS, eos_ids=lm.tokenizer.eos_ids)
    plain = plain_generate(lm.model, lm.params, ids, config)
    rows = [np.asarray(plain.tokens[i, :plain.lengths[i]]).tolist() for i in range(len(ids))]
    return lm, ids, config, rows


def _parse(define, argv):
    fv = flags.FlagValues()
    define(fv)
    fv(argv)
    return fv


# The compositions (first_of, merge) are left out: their parts run here one by one, and
# tests/test_compose.py proves the compositions on tiny models (47 + 35 s saved per make test).
# So are staged and cross_vocab: on SmolLM2 by default both run draft_model's draft (the first
# layers; through prompt lookup, or identity vocabulary maps), which runs here; their own paths
# are proven on tiny models (tests/test_staged.py, tests/test_cross_vocab.py, tests/test_families.py)
# and cross_vocab on real tokenizers in tests/test_embedded_models.py.
SKIPPED_HERE = ("ar", "first_of", "merge", "staged", "cross_vocab")
# The benchmark's runner (batch 1, per prompt) is method-agnostic once the run is equal (asserted
# for every method): it runs here for a chain and a tree drafter with weights (~130 s of CPU
# saved per make test).
RUNNER_METHODS = ("prompt_lookup", "eagle")


@pytest.mark.parametrize("method", [m for m in registry.names() if m not in SKIPPED_HERE])
def test_method_equals_plain_greedy_on_smollm2(smollm2, method):
    lm, ids, config, rows = smollm2
    args = [f"--max_new_tokens={NEW_TOKENS}", f"--weights={WEIGHTS}"]
    run = methods.build_run(_parse(generate.define_flags, ["generate", f"--method={method}",
                                                           *args]))
    result = run.generate(lm, ids)
    got = result.generated
    assert got == rows
    assert result.generation.stats.row_calls <= sum(len(r) for r in rows)  # never more calls
    bench_run = benchmark.build_runs(_parse(benchmark.define_flags, [
        "benchmark", f"--methods={method}", *args]))[method]
    assert bench_run == run  # the benchmark builds the same run from the same flags
    if method not in RUNNER_METHODS:
        return
    record = MethodRunner(bench_run, lm)(ids[0])
    assert record["generated_ids"] == rows[0]
    assert record["target_calls"] <= len(rows[0])


def test_gguf_weights_give_the_float32_tokens(smollm2):
    """--weights=gguf holds the numbers the float32 path dequantises: greedy decoding gives the
    same tokens (a flip would need a near-tie within float32 summation error)."""
    lm, ids, config, rows = smollm2
    assert dict(lm.model.config.weight_formats) == {
        "embedding": "q8_0", "wqkv": "q4_1", "wo": "q4_1", "w_gate_up": "q4_1",
        "w_down": "q4_1"}
    float_lm = models.load("smollm2-135m")
    plain = plain_generate(float_lm.model, float_lm.params, ids, config)
    assert [np.asarray(plain.tokens[i, :plain.lengths[i]]).tolist()
            for i in range(len(ids))] == rows
