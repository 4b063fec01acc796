"""Jacobi decoding and SJD through the speculative loop: greedy output equals plain decoding for
every init policy and window (ragged batches and single rows), the rounds are exactly a slow
Python Jacobi iteration, and SJD's sampled sequences have exactly the target's joint
distribution (chi-square against the enumerated joint)."""

import jax
import numpy as np
import pytest

import tinymodels as kit
from drafters import jacobi
from sequence_kit import SEQ_LEN, chi_square_pvalue, counts_of, exact_joint, seq_tiny_model
from specjax.decode import DecodeConfig
from specjax.sampling import SamplingConfig
from specjax.speculative import speculative_generate, speculative_stream
from tinymodels import PROMPTS, rows_of

VOCAB = kit.SMALL_VOCAB  # small_vocab_target's vocabulary (conftest.py)


# test_rounds_are_the_jacobi_iteration covers "repeat" with window 3 on a single row.
@pytest.mark.parametrize("init,window", [("repeat", 1), ("random", 3), ("prompt_lookup", 4)])
def test_greedy_equals_plain_decoding(small_vocab_target, small_vocab_reference, init, window):
    model, params = small_vocab_target
    config, reference = small_vocab_reference
    drafter, dparams = jacobi.make(model, window=window, init=init)
    out = speculative_generate(model, params, drafter, dparams, PROMPTS, config)
    assert rows_of(out) == reference
    assert int(out.stats.accepted) > 0 or init == "random"


def test_greedy_single_rows(small_vocab_target, small_vocab_reference):
    model, params = small_vocab_target
    config, reference = small_vocab_reference
    drafter, dparams = jacobi.make(model, window=3, init="prompt_lookup")
    for i in (1, 3):  # same padded prompt shape: one compilation
        out = speculative_generate(model, params, drafter, dparams, [PROMPTS[i]], config)
        assert rows_of(out) == [reference[i]]


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


def test_rounds_are_the_jacobi_iteration(small_vocab_target):
    model, params = small_vocab_target
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


def test_configuration_errors(small_vocab_target):
    model, _ = small_vocab_target
    with pytest.raises(ValueError, match="window"):
        jacobi.make(model, window=0)
    with pytest.raises(ValueError, match="init"):
        jacobi.make(model, init="zeros")
    other, _ = kit.tiny_model("llama", vocab_size=VOCAB, seed=1, num_layers=2)
    with pytest.raises(ValueError, match="target"):
        jacobi.make(other)[0].check_compatible(model)


# SJD: the joint distribution of 3 sampled tokens on a vocabulary of 8 ------------------------

SEQ_PROMPT, SEQ_ROWS, SEQ_SLOTS = [3, 1, 4, 1], 12288, 32
SJD_CASES = [("random", SamplingConfig(temperature=1.0)),
             ("prompt_lookup", SamplingConfig(temperature=0.8, top_k=5))]


@pytest.mark.parametrize("init,sampling", SJD_CASES, ids=["random_t1", "lookup_t0.8_top5"])
def test_sjd_sequence_distribution_is_exact(init, sampling):
    model, params = seq_tiny_model()
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
