"""The speculative loop is lossless: greedy output equals plain decoding token for token, the
sampled output has exactly the target's joint distribution, and the cache stays consistent."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drafters.draft_model import DraftModelDrafter, from_target_layers
from drafters.layer_skip import LayerSkipDrafter
from drafters.prompt_lookup import PromptLookupDrafter
from drafters.scripted import ScriptedDrafter
from sequence_kit import (SEQ_VOCAB, chi_square_pvalue, exact_joint, sample_sequences,
                          seq_model)
from specjax import masks
from specjax.cache import CacheCapacityError
from specjax.decode import DecodeConfig, generate
from specjax.prompts import make_prompt_batch
from specjax.sampling import SamplingConfig
from specjax.speculative import (SpecConfig, SpecLoop, speculative_generate,
                                 speculative_stream)
from tinymodels import PROMPTS, rows_of, script

VOCAB = 24


def _model(vocab=VOCAB, layers=3, seed=0, **kw):
    return seq_model(vocab=vocab, layers=layers, seed=seed, **kw)  # spread-out distributions


# Not conftest's small_vocab_target (tinymodels' peaked weights): Flax's default init, whose
# next-token distributions are spread out (sequence_kit.seq_model).
@pytest.fixture(scope="module")
def spread_target():
    return _model()


@pytest.fixture(scope="module")
def spread_reference(spread_target):
    """``(config, rows)``: plain greedy decoding of ``PROMPTS`` on ``spread_target``."""
    model, params = spread_target
    config = DecodeConfig(max_new_tokens=24, eos_ids=(13,))
    return config, rows_of(generate(model, params, PROMPTS, config))


def _drafters(model, params, reference_rows, sampling=SamplingConfig()):
    small, small_params = from_target_layers(model, params, 1)
    other, other_params = _model(layers=2, seed=7)
    scripted = script(PROMPTS, reference_rows, width=96)
    return {
        "prompt_lookup_chain": (PromptLookupDrafter(draft_len=4), None),
        "prompt_lookup_tree": (PromptLookupDrafter(draft_len=3, num_branches=3), None),
        "draft_model_first_layer": (DraftModelDrafter(small, 3, sampling), small_params),
        "draft_model_independent": (DraftModelDrafter(other, 2, sampling), other_params),
        "layer_skip": (LayerSkipDrafter(model, (0, 2), 3, sampling), None),
        "oracle": (ScriptedDrafter("oracle", 4, VOCAB), scripted),
        "wrong": (ScriptedDrafter("wrong", 4, VOCAB), scripted),
        "random": (ScriptedDrafter("random", 3, VOCAB), scripted),
    }


@pytest.mark.parametrize("name", ["prompt_lookup_chain", "prompt_lookup_tree",
                                  "draft_model_first_layer", "draft_model_independent",
                                  "layer_skip", "oracle", "wrong", "random"])
def test_greedy_equals_plain_decoding(spread_target, spread_reference, name):
    model, params = spread_target
    config, ref_rows = spread_reference
    drafter, dparams = _drafters(model, params, ref_rows)[name]
    # Ragged batch of 4 and each prompt alone.
    out = speculative_generate(model, params, drafter, dparams, PROMPTS, config)
    assert rows_of(out) == ref_rows
    for i in (0, 2):
        alone_params = dparams[i:i + 1] if name in ("oracle", "wrong", "random") else dparams
        single = speculative_generate(model, params, drafter, alone_params, [PROMPTS[i]], config)
        assert rows_of(single) == [ref_rows[i]]


def test_adversarial_drafters_tau(spread_target, spread_reference):
    model, params = spread_target
    config, ref_rows = spread_reference
    drafters = _drafters(model, params, ref_rows)
    k = 4
    new_tokens = sum(len(r) for r in ref_rows)
    wrong = speculative_generate(model, params, *drafters["wrong"], PROMPTS, config)
    assert int(wrong.stats.accepted) == 0
    assert int(wrong.stats.row_calls) == new_tokens  # exactly one token per target call
    oracle = speculative_generate(model, params, *drafters["oracle"], PROMPTS, config)
    # Every round emits K + 1 tokens until the row's end: ceil((n - 1) / (K + 1)) rounds.
    expected_rounds = sum(-(-(len(r) - 1) // (k + 1)) for r in ref_rows)
    assert int(oracle.stats.row_rounds) == expected_rounds
    rates = np.asarray(oracle.stats.accepted_at_depth)
    assert rates[0] == expected_rounds  # depth 1 accepted in every round


def test_stream_matches_generate(spread_target, spread_reference):
    model, params = spread_target
    config, ref_rows = spread_reference
    drafter = PromptLookupDrafter(draft_len=3)
    last = None
    for out_tokens, out_len, _ in speculative_stream(model, params, drafter, None, PROMPTS,
                                                      config):
        last = [out_tokens[i, :out_len[i]].tolist() for i in range(len(PROMPTS))]
    assert last == ref_rows


def test_cache_consistent_after_every_round(spread_target, spread_reference):
    model, params = spread_target
    config, _ = spread_reference
    drafter = PromptLookupDrafter(draft_len=3, num_branches=2)
    batch = make_prompt_batch(PROMPTS)
    slots = 128
    loop = SpecLoop(model, drafter, config, SpecConfig())
    state = loop.jit_start(params, None, batch, jax.random.key(0), slots)
    for _ in range(6):
        state = loop.jit_round(params, None, state)
        lengths = np.asarray(state.cache.lengths)
        hist = np.asarray(state.history)
        np.testing.assert_array_equal(lengths + 1, np.asarray(state.history_len))
        for b in range(len(PROMPTS)):
            n = int(lengths[b])
            fresh = model.init_cache(1, slots)
            toks = jnp.asarray(hist[b:b + 1, :n])
            pos = jnp.arange(n, dtype=jnp.int32)[None]
            ref = model.forward(params, toks, pos, fresh, masks.causal_mask(fresh.lengths, n,
                                                                            slots)).cache
            np.testing.assert_allclose(np.asarray(state.cache.k[:, b, :, :n]),
                                       np.asarray(ref.k[:, 0, :, :n]), atol=1e-5)
            np.testing.assert_allclose(np.asarray(state.cache.v[:, b, :, :n]),
                                       np.asarray(ref.v[:, 0, :, :n]), atol=1e-5)


def test_bad_input(spread_target):
    model, params = spread_target
    with pytest.raises(CacheCapacityError, match="cache"):
        speculative_generate(model, params, PromptLookupDrafter(draft_len=8), None, [[1] * 40],
                             DecodeConfig(max_new_tokens=20, num_slots=64))
    other, other_params = _model(vocab=VOCAB + 1)
    with pytest.raises(ValueError, match="vocabulary"):
        speculative_generate(model, params, DraftModelDrafter(other, 2), other_params, [[1, 2]],
                             DecodeConfig(max_new_tokens=4))
    with pytest.raises(ValueError, match="acceptance"):
        SpecConfig(acceptance="typical")
    with pytest.raises(ValueError, match="keep_layers"):
        LayerSkipDrafter(model, (0, 1, 2))


# Sequence level: the joint distribution of 3 sampled tokens on a vocabulary of 8 -------------

SEQ_SAMPLINGS = [SamplingConfig(temperature=1.0), SamplingConfig(temperature=0.8, top_k=5)]


@pytest.mark.parametrize("sampling", SEQ_SAMPLINGS, ids=["t1", "t0.8_top5"])
@pytest.mark.parametrize("name", ["draft_model", "layer_skip", "prompt_lookup_tree", "random"])
def test_sequence_distribution_is_exact(name, sampling):
    model, params = seq_model()
    other, other_params = seq_model(layers=1, seed=11)
    drafter, dparams = {
        "draft_model": (DraftModelDrafter(other, 2, sampling), other_params),
        "layer_skip": (LayerSkipDrafter(model, (1,), 2, sampling), None),
        "prompt_lookup_tree": (PromptLookupDrafter(draft_len=2, num_branches=2, min_ngram=1), None),
        "random": (ScriptedDrafter("random", 2, SEQ_VOCAB), jnp.zeros((4096, 16), jnp.int32)),
    }[name]
    seqs, joint = exact_joint(model, params, sampling)
    counts, total = sample_sequences(model, params, drafter, dparams, sampling, SpecConfig())
    # 16 tests in this file's matrix: Bonferroni-corrected 1e-3 family-wise threshold.
    assert chi_square_pvalue(seqs, joint, counts, total) > 1e-3 / 16


def test_typical_acceptance_is_lossy_and_named_so():
    sampling = SamplingConfig(temperature=1.0)
    model, params = seq_model()
    drafter = ScriptedDrafter("random", 2, SEQ_VOCAB)
    seqs, joint = exact_joint(model, params, sampling)
    # A permissive threshold accepts almost any drafted token: far from the target distribution.
    spec = SpecConfig(acceptance="typical_lossy", typical_epsilon=0.01, typical_delta=0.01)
    counts, total = sample_sequences(model, params, drafter, jnp.zeros((4096, 16), jnp.int32),
                                      sampling, spec)
    assert chi_square_pvalue(seqs, joint, counts, total) < 1e-6
