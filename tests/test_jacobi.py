"""Jacobi decoding and SJD through the speculative loop: greedy output equals plain decoding for
every init policy and window (ragged batches and single rows), the rounds are exactly a slow
Python Jacobi iteration, and SJD's sampled sequences have exactly the target's joint
distribution (chi-square against the enumerated joint)."""

import jax
import numpy as np
import pytest

import tinymodels as kit
from drafters import jacobi
from sequence_kit import SEQ_LEN, SEQ_VOCAB, chi_square_pvalue, counts_of, exact_joint
from specjax.decode import DecodeConfig, generate
from specjax.sampling import SamplingConfig
from specjax.speculative import speculative_generate, speculative_stream

VOCAB = 24
PROMPTS = [[1, 2, 3, 1, 2], [4, 5, 6, 7, 8, 9, 10, 4, 5, 6], [11], [7, 7, 7, 7]]
CONFIG = DecodeConfig(max_new_tokens=24, eos_ids=(13,))


@pytest.fixture(scope="module")
def target():
    return kit.tiny_model("llama", vocab_size=VOCAB)


@pytest.fixture(scope="module")
def reference(target):
    model, params = target
    return _rows(generate(model, params, PROMPTS, CONFIG))


def _rows(out):
    return [np.asarray(out.tokens[i, :out.lengths[i]]).tolist() for i in range(out.tokens.shape[0])]


# test_rounds_are_the_jacobi_iteration covers "repeat" with window 3 on a single row.
@pytest.mark.parametrize("init,window", [("repeat", 1), ("random", 3), ("prompt_lookup", 4)])
def test_greedy_equals_plain_decoding(target, reference, init, window):
    model, params = target
    drafter, dparams = jacobi.make(model, window=window, init=init)
    out = speculative_generate(model, params, drafter, dparams, PROMPTS, CONFIG)
    assert _rows(out) == reference
    assert int(out.stats.accepted) > 0 or init == "random"


def test_greedy_single_rows(target, reference):
    model, params = target
    drafter, dparams = jacobi.make(model, window=3, init="prompt_lookup")
    for i in (1, 3):  # same padded prompt shape: one compilation
        out = speculative_generate(model, params, drafter, dparams, [PROMPTS[i]], CONFIG)
        assert _rows(out) == [reference[i]]


def _slow_jacobi(model, params, prompt, window, max_new, width=64):
    """Plain-Python Jacobi iteration (``repeat`` init) with a full teacher-forced forward per
    round. Returns the accepted guess count of every round."""
    seq = list(prompt) + [int(np.argmax(np.asarray(
        kit.full_forward(model, params, np.pad([prompt], ((0, 0), (0, width - len(prompt)))))
        .logits)[0, len(prompt) - 1]))]
    guesses, refined, accepted = [0] * window, 0, []
    while len(seq) - len(prompt) < max_new:
        guesses = guesses[:refined] + [([seq[-1]] + guesses)[refined]] * (window - refined)
        full = np.zeros((1, width), np.int32)
        full[0, :len(seq) + window] = seq + guesses
        logits = np.asarray(kit.full_forward(model, params, full).logits)[0]
        pred = [int(np.argmax(logits[len(seq) - 1 + k])) for k in range(window + 1)]
        a = 0
        while a < window and guesses[a] == pred[a]:
            a += 1
        accepted.append(a)
        seq += guesses[:a] + [pred[a]]
        guesses, refined = pred[a + 1:] + [0] * (a + 1), window - a
        guesses = guesses[:window]
    return accepted, seq[len(prompt):len(prompt) + max_new]


def test_rounds_are_the_jacobi_iteration(target):
    model, params = target
    window, max_new = 3, 16
    config = DecodeConfig(max_new_tokens=max_new)
    want_accepted, want_tokens = _slow_jacobi(model, params, PROMPTS[0], window, max_new)
    drafter, _ = jacobi.make(model, window=window, init="repeat")
    got, last = [], 0
    for tokens, length, stats in speculative_stream(model, params, drafter, None, [PROMPTS[0]],
                                                    config):
        if int(stats.rounds):
            got.append(int(stats.accepted) - last)
            last = int(stats.accepted)
    assert tokens[0, :length[0]].tolist() == want_tokens
    # The last round may be cut by max_new_tokens; every other round must agree exactly.
    assert got[:-1] == want_accepted[:len(got) - 1]
    assert sum(want_accepted) > 0


def test_configuration_errors(target):
    model, _ = target
    with pytest.raises(ValueError, match="window"):
        jacobi.make(model, window=0)
    with pytest.raises(ValueError, match="init"):
        jacobi.make(model, init="zeros")
    other, _ = kit.tiny_model("llama", vocab_size=VOCAB, seed=1, num_layers=2)
    with pytest.raises(ValueError, match="target"):
        jacobi.make(other)[0].check_compatible(model)


# SJD: the joint distribution of 3 sampled tokens on a vocabulary of 8 ------------------------

SEQ_PROMPT, SEQ_ROWS, SEQ_SLOTS = [3, 1, 4, 1], 12288, 32


@pytest.fixture(scope="module")
def small_target():
    return kit.tiny_model("llama", vocab_size=SEQ_VOCAB, hidden_size=32, intermediate_size=64,
                          num_layers=2, num_kv_heads=1, seed=3)


SJD_CASES = [("random", SamplingConfig(temperature=1.0)),
             ("prompt_lookup", SamplingConfig(temperature=0.8, top_k=5))]


@pytest.mark.parametrize("init,sampling", SJD_CASES, ids=["random_t1", "lookup_t0.8_top5"])
def test_sjd_sequence_distribution_is_exact(small_target, init, sampling):
    model, params = small_target
    drafter, dparams = jacobi.make(model, window=2, init=init, sampling=sampling)
    config = DecodeConfig(max_new_tokens=SEQ_LEN, sampling=sampling, num_slots=SEQ_SLOTS)
    out = speculative_generate(model, params, drafter, dparams, [SEQ_PROMPT] * SEQ_ROWS, config,
                               key=jax.random.key(7))
    assert (np.asarray(out.lengths) == SEQ_LEN).all()
    # Refined guesses must actually be used and accepted, or the test has no power.
    assert int(out.stats.accepted) > SEQ_ROWS // 10
    seqs, joint = exact_joint(model, params, sampling, SEQ_PROMPT)
    # 2 cases here + 1 in test_lookahead.py: Bonferroni-corrected 1e-3 family-wise threshold.
    assert chi_square_pvalue(seqs, joint, counts_of(out.tokens), SEQ_ROWS) > 1e-3 / 3
