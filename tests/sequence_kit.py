"""Test kit for sequence-level distribution tests (imported as ``sequence_kit``).

A lossless sampling method must give every short continuation exactly the probability the target
gives it. On a vocabulary of 8 and 3 new tokens there are 512 continuations, so the exact joint
distribution is one teacher-forced forward over all of them (:func:`exact_joint`), and a
chi-square test compares it with many sampled rows (:func:`sample_sequences`,
:func:`chi_square_pvalue`).
"""

from __future__ import annotations

import itertools
from typing import Sequence

import jax
import numpy as np
from scipy import stats as sps

import tinymodels as kit
from models.llama import LlamaConfig, LlamaModel
from specjax.decode import DecodeConfig
from specjax.sampling import SamplingConfig, processed_probs
from specjax.speculative import SpecConfig, speculative_generate

SEQ_VOCAB = 8  # V of the distribution tests
SEQ_LEN = 3  # new tokens per sampled row
SEQ_PROMPT = (3, 1, 4)


def seq_model(vocab: int = SEQ_VOCAB, layers: int = 2, seed: int = 3, **overrides):
    """A small GQA Llama (hidden 32, 4 heads, 2 kv heads) at Flax's default init scales, whose
    next-token distributions are spread out (good for distribution tests)."""
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                         num_layers=layers, num_heads=4, num_kv_heads=2, **overrides)
    model = LlamaModel(config)
    return model, model.init(jax.random.key(seed))


def seq_tiny_model():
    """A tiny Llama on the ``SEQ_VOCAB`` vocabulary (hidden 32, one kv head) with
    ``tinymodels``' weights (not Flax's init, unlike :func:`seq_model`): the target of the
    Jacobi (SJD) and lookahead distribution tests."""
    return kit.tiny_model("llama", vocab_size=SEQ_VOCAB, hidden_size=32, intermediate_size=64,
                          num_layers=2, num_kv_heads=1, seed=3)


def exact_joint(model, params, sampling: SamplingConfig, prompt: Sequence[int] = SEQ_PROMPT,
                length: int = SEQ_LEN) -> tuple[np.ndarray, np.ndarray]:
    """Every continuation of ``length`` tokens and its exact probability under the processed
    target distribution: ``(seqs int32[V**length, length], joint float64[V**length])``."""
    vocab = model.vocab_size
    seqs = np.array(list(itertools.product(range(vocab), repeat=length)), np.int32)
    full = np.concatenate([np.tile(np.asarray(prompt, np.int32), (len(seqs), 1)), seqs], axis=1)
    probs = np.asarray(processed_probs(kit.full_forward(model, params, full).logits, sampling),
                       np.float64)
    p0 = len(prompt)
    joint = np.ones(len(seqs))
    for i in range(length):
        joint *= probs[np.arange(len(seqs)), p0 - 1 + i, seqs[:, i]]
    return seqs, joint


def counts_of(tokens: np.ndarray) -> dict:
    """``{continuation tuple: count}`` of sampled rows ``int32[N, length]``."""
    counts: dict = {}
    for row in map(tuple, np.asarray(tokens).tolist()):
        counts[row] = counts.get(row, 0) + 1
    return counts


def sample_sequences(model, params, drafter, dparams, sampling: SamplingConfig,
                     spec: SpecConfig = SpecConfig(), prompt: Sequence[int] = SEQ_PROMPT,
                     rows: int = 4096, rounds: int = 3, length: int = SEQ_LEN,
                     num_slots: int = 0) -> tuple[dict, int]:
    """Samples ``rows * rounds`` continuations with speculative decoding (keys 100, 101, ...);
    returns ``(counts, total)``. Every row must produce exactly ``length`` tokens."""
    config = DecodeConfig(max_new_tokens=length, sampling=sampling, num_slots=num_slots)
    counts: dict = {}
    for r in range(rounds):
        out = speculative_generate(model, params, drafter, dparams, [list(prompt)] * rows,
                                   config, spec, key=jax.random.key(100 + r))
        assert (np.asarray(out.lengths) == length).all()
        for row, n in counts_of(np.asarray(out.tokens)).items():
            counts[row] = counts.get(row, 0) + n
    return counts, rows * rounds


def chi_square_pvalue(seqs: np.ndarray, joint: np.ndarray, counts: dict, total: int) -> float:
    """Pearson chi-square p-value of sampled ``counts`` against ``joint``; continuations with an
    expected count under 5 are pooled into one cell. Fails outright when a continuation of
    probability 0 was sampled."""
    expected = joint * total
    observed = np.array([counts.get(tuple(s), 0) for s in seqs.tolist()], float)
    assert observed.sum() == total, "a sampled continuation is not in seqs"
    assert observed[joint == 0].sum() == 0, "sampled a sequence the target gives probability 0"
    keep = expected >= 5
    obs = np.append(observed[keep], observed[~keep].sum())
    exp = np.append(expected[keep], expected[~keep].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return sps.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


def token_chi_square_pvalue(samples, probs) -> float:
    """Pearson chi-square p-value of sampled token ids ``samples`` against ``probs[V]``; fails
    outright when a token of probability 0 was sampled."""
    counts = np.bincount(samples, minlength=probs.size)
    assert counts.size == probs.size
    assert counts[probs == 0].sum() == 0, "token outside the target's support"
    support = probs > 0
    expected = probs[support] / probs[support].sum() * counts.sum()
    return sps.chisquare(counts[support], expected).pvalue
