"""Staged speculation (``drafters/staged.py``): the draft model's drafting sped up by prompt
lookup. Lossless twice over: the outputs are plain decoding's (greedy) and have the target's
distribution (sampling); the draft chain itself is the plain draft model's (the same tokens as
DraftModelDrafter under greedy, the draft model's own joint distribution and exact ``q`` under
sampling); and on repetitive text the lookup hits, so a round needs fewer than K draft-model
forwards."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tinymodels as kit
from drafters import registry
from drafters.draft_model import DraftModelDrafter, from_target_layers
from drafters.staged import StagedDrafter, inner_forwards_per_round
from models import registry as models
from models.registry import LoadedModel
from sequence_kit import chi_square_pvalue, counts_of, exact_joint, sample_sequences, seq_model
from specjax.cache import set_lengths
from specjax.decode import DecodeConfig, generate
from specjax.drafter import DraftContext
from specjax.sampling import SamplingConfig, processed_probs
from specjax.speculative import SpecLoop, draft_context
from tinymodels import rows_of

# Ragged: repetitive rows (the lookup has something to copy) and tinymodels' PROMPTS.
PROMPTS = [[5, 6, 7, 5, 6, 7, 5, 6], [1, 3, 1, 3, 1, 3], *kit.PROMPTS]
K = 4


@pytest.fixture(scope="module")
def spread():
    """``(model, params, drafter, draft params, config, plain rows)``: a vocabulary-24 Llama
    whose greedy text falls into repetitions (so lookup hits) and the staged drafter the
    registry builds for it by default (K = 4, lookup 3, its first 2 of 3 layers)."""
    model, params = seq_model(vocab=24, layers=3, seed=0)
    drafter, dparams = registry.build("staged", LoadedModel(model, params, None, "spread"))
    assert (drafter.draft_len, drafter.lookup_len, drafter.model.num_layers) == (K, 3, 2)
    config = DecodeConfig(max_new_tokens=24, eos_ids=(13,))
    return model, params, drafter, dparams, config, rows_of(
        generate(model, params, PROMPTS, config))


def _run_rounds(loop, params, dparams, prompts):
    """Every round of ``loop`` from Python: the SpecState after each round."""
    batch, slots = loop.prepare(prompts)
    state = loop.jit_start(params, dparams, batch, jax.random.key(0), slots)
    while not bool(np.all(np.asarray(state.done))):
        yield state
        state = loop.jit_round(params, dparams, state)
    yield state


def _rows(state):
    tokens, lengths = np.asarray(state.out_tokens), np.asarray(state.out_len)
    return [tokens[i, :lengths[i]].tolist() for i in range(len(lengths))]


def test_greedy_equals_plain_decoding_and_lookup_hits(spread):
    """Round by round (the rounds of the on-device loop; ``test_sequence_distribution_is_exact``
    and the registry tests run the whole loop)."""
    model, params, drafter, dparams, config, plain = spread
    *_, last = _run_rounds(SpecLoop(model, drafter, config), params, dparams, PROMPTS)
    assert _rows(last) == plain
    dstate = last.drafter_state
    per_round = np.asarray(dstate.forwards) / np.asarray(dstate.proposals)
    assert (per_round <= K).all()
    # The repetitive rows' drafts came from fewer draft forwards than the K of draft_model.
    assert (per_round[:2] < K - 0.25).all(), per_round
    assert inner_forwards_per_round(dstate) < K


def test_greedy_chain_equals_draft_model_chain(spread):
    """At every round of a staged generation, staged drafters and DraftModelDrafter, given the
    same context and the same draft cache, propose the same chain, and their caches agree on
    every entry a later round may keep (positions below L + K). K = 4 (3 guesses per inner
    forward) and K = 1 (no guesses: DraftModelDrafter's single forward)."""
    model, params, default, dparams, config, plain = spread
    pairs = [(dataclasses.replace(default, draft_len=k, lookup_len=m),
              DraftModelDrafter(default.model, k)) for k, m in ((K, 3), (1, 3))]
    propose = jax.jit(lambda d, p, s, c: d.propose(p, s, c, jax.random.key(0)),
                      static_argnums=0)
    checked = 0
    for state in _run_rounds(SpecLoop(model, default, config), params, dparams, PROMPTS):
        live = ~np.asarray(state.done)
        if not live.any():
            break
        ctx = draft_context(state, params)
        lengths = np.asarray(state.cache.lengths)
        for staged, plain_drafter in pairs:
            mine, mine_state, _ = propose(staged, dparams, state.drafter_state, ctx)
            ref, ref_cache, _ = propose(plain_drafter, dparams, state.drafter_state.cache, ctx)
            np.testing.assert_array_equal(np.asarray(mine.tokens)[live],
                                          np.asarray(ref.tokens)[live])
            mine_lengths = np.asarray(mine_state.cache.lengths)
            k, v = np.asarray(mine_state.cache.k), np.asarray(mine_state.cache.v)
            ref_k, ref_v = np.asarray(ref_cache.k), np.asarray(ref_cache.v)
            for b in np.flatnonzero(live):
                keep = lengths[b] + staged.draft_len
                assert mine_lengths[b] >= keep
                np.testing.assert_allclose(k[:, b, :, :keep], ref_k[:, b, :, :keep], atol=1e-5)
                np.testing.assert_allclose(v[:, b, :, :keep], ref_v[:, b, :, :keep], atol=1e-5)
        checked += int(live.sum())
    assert checked > len(PROMPTS)


# Sampling: a vocabulary of 8 -------------------------------------------------------------------

SAMPLINGS = [SamplingConfig(temperature=1.0), SamplingConfig(temperature=0.8, top_k=5)]
REPEAT = (3, 1, 4, 3, 1, 4, 3, 1)  # the lookup always finds a continuation here


def _context(model, params, histories, slots=32):
    """A DraftContext whose rows hold ``histories`` (the pending token last)."""
    b = len(histories)
    lens = np.array([len(h) for h in histories], np.int32)
    hist = np.zeros((b, slots), np.int32)
    for i, h in enumerate(histories):
        hist[i, :len(h)] = h
    return DraftContext(target_params=params,
                        cache=set_lengths(model.init_cache(b, slots), jnp.asarray(lens - 1)),
                        history=jnp.asarray(hist), history_len=jnp.asarray(lens),
                        pending=jnp.asarray(hist[np.arange(b), lens - 1]),
                        pending_hidden=jnp.zeros((b, 1)), done=jnp.zeros((b,), bool))


def test_sampled_chain_has_the_draft_models_distribution_and_q():
    """The staged chain of 3 tokens is distributed as the draft model's own sampling (exact
    joint of its 512 continuations), and each token's recorded q is the draft model's processed
    distribution at its prefix (temperature 1; the next test samples with top-k)."""
    sampling = SAMPLINGS[0]
    small, small_params = seq_model(layers=1, seed=11)
    drafter = StagedDrafter(small, 3, lookup_len=2, sampling=sampling)
    rows = 4096
    ctx = _context(small, small_params, [REPEAT] * rows)
    state = jax.jit(drafter.init)(small_params, ctx, ctx.history[:, :len(REPEAT) - 1],
                                  ctx.cache.lengths)
    propose = jax.jit(drafter.propose)
    counts, total = {}, 0
    for r in range(3):
        proposal, after, _ = propose(small_params, state, ctx, jax.random.key(200 + r))
        chains = np.asarray(proposal.tokens[:, 1:])
        for row, n in counts_of(chains).items():
            counts[row] = counts.get(row, 0) + n
        total += rows
    assert inner_forwards_per_round(after) < 3  # the lookup hit
    seqs, joint = exact_joint(small, small_params, sampling, prompt=REPEAT, length=3)
    assert chi_square_pvalue(seqs, joint, counts, total) > 1e-3 / 2  # 2 tests
    # q of the last sample: the draft model's processed distribution along each chain.
    full = np.concatenate([np.tile(REPEAT, (64, 1)), chains[:64]], axis=1)
    probs = processed_probs(kit.full_forward(small, small_params, full).logits, sampling)
    expected = np.asarray(probs)[:, len(REPEAT) - 1:len(REPEAT) + 2]
    np.testing.assert_allclose(np.asarray(proposal.draft_probs)[:64, 1:], expected, atol=1e-5)


def test_sequence_distribution_is_exact():
    """The speculative outputs (3 tokens, vocabulary 8) have exactly the target's joint
    distribution (temperature 0.8, top-k 5)."""
    sampling = SAMPLINGS[1]
    model, params = seq_model()
    small, small_params = from_target_layers(model, params, 1)
    drafter = StagedDrafter(small, 2, lookup_len=1, sampling=sampling)
    seqs, joint = exact_joint(model, params, sampling, prompt=REPEAT)
    counts, total = sample_sequences(model, params, drafter, small_params, sampling,
                                     prompt=REPEAT, rounds=2)
    assert chi_square_pvalue(seqs, joint, counts, total) > 1e-3 / 2


# Bad options ------------------------------------------------------------------------------------


@pytest.mark.parametrize("values,message", [
    ({"draft_len": 0}, "draft_len must be >= 1, got 0"),
    ({"lookup_len": 0}, "lookup_len must be >= 1, got 0"),
    ({"min_ngram": 0}, "min_ngram must be >= 1, got 0"),
])
def test_bad_options_are_one_line_value_errors(values, message):
    with pytest.raises(ValueError, match=message) as err:
        registry.get("staged").make_options(**values)
    assert "\n" not in str(err.value)


def test_bad_drafter_settings_are_one_line_value_errors():
    small, _ = seq_model(layers=1, seed=11)
    for kwargs, message in (({"draft_len": 0}, "draft_len must be >= 1, got 0"),
                            ({"lookup_len": 0}, "lookup_len must be >= 1, got 0"),
                            ({"min_ngram": 3, "max_ngram": 2}, "min_ngram <= max_ngram")):
        with pytest.raises(ValueError, match=message) as err:
            StagedDrafter(small, **kwargs)
        assert "\n" not in str(err.value)


def test_default_draft_model_fits_the_target():
    """draft_layers defaults to 4, fewer on a smaller target (tiny-llama: 2 layers -> 1); an
    explicit value must fit."""
    lm = models.load("tiny-llama")
    drafter, _ = registry.build("staged", lm)
    assert drafter.model.num_layers == 1 and drafter.draft_len == K
    with pytest.raises(ValueError, match=r"num_layers must be in \[1, 2\), got 4") as err:
        registry.build("staged", lm, draft_layers=4)
    assert "\n" not in str(err.value)
