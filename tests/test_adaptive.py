"""Adaptive draft length and draft-following verification widths are lossless, and really
narrow: greedy output equals plain decoding on ragged batches, the sampled sequence distribution
is exact, the per-row draft length follows its rule, and the verification forward writes only
the nodes of the narrow width it picked."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tinymodels as kit
from drafters.draft_model import DraftModelDrafter, from_target_layers
from drafters.prompt_lookup import PromptLookupDrafter
from drafters.scripted import ScriptedDrafter
from specjax import adaptive
from specjax.adaptive import AdaptiveDraftLength, AdaptiveState, max_draft_len_for_batch
from specjax.decode import DecodeConfig, generate
from specjax.drafter import CommitInfo, Proposal
from specjax.prompts import make_prompt_batch
from specjax.sampling import SamplingConfig
from specjax.speculative import SpecConfig, SpecLoop, speculative_generate
from sequence_kit import chi_square_pvalue, exact_joint, sample_sequences, seq_model
from tinymodels import rows_of

# Not tinymodels.PROMPTS: periodic prompts, so prompt lookup finds matches to draft from, decoded
# without EOS, so every row runs the full MAX_NEW tokens.
REPETITIVE_PROMPTS = [[5, 6, 7, 5, 6, 7, 5, 6], [9, 10, 11, 12, 13, 9, 10, 11, 12, 13, 9],
                      [3], [40, 41, 40, 41, 40]]
MAX_NEW = 20


@pytest.fixture(scope="module")
def repetitive_reference(target):
    """``(config, rows)``: plain greedy decoding of ``REPETITIVE_PROMPTS`` on ``target``."""
    model, params = target
    config = DecodeConfig(max_new_tokens=MAX_NEW)
    out = generate(model, params, REPETITIVE_PROMPTS, config)
    return config, rows_of(out)


def _wrapped(model, params, rows):
    small, small_params = from_target_layers(model, params, 1)
    script = kit.script(REPETITIVE_PROMPTS, rows)
    return {
        "lookup_chain": (AdaptiveDraftLength(PromptLookupDrafter(draft_len=6)), None),
        "lookup_tree_cap2": (AdaptiveDraftLength(PromptLookupDrafter(draft_len=4, num_branches=2),
                                                 max_draft_len=2), None),
        "lookup_static_cap0": (AdaptiveDraftLength(PromptLookupDrafter(draft_len=4),
                                                   policy="static", max_draft_len=0), None),
        "draft_model": (AdaptiveDraftLength(DraftModelDrafter(small, 3)), small_params),
        "oracle_grow": (AdaptiveDraftLength(ScriptedDrafter("oracle", 5, model.vocab_size),
                                            max_draft_len=5, grow=2), script),
        "wrong": (AdaptiveDraftLength(ScriptedDrafter("wrong", 4, model.vocab_size)), script),
        "batch_cap": (adaptive.for_batch(PromptLookupDrafter(draft_len=8),
                                         len(REPETITIVE_PROMPTS)), None),
    }


@pytest.mark.parametrize("name", ["lookup_chain", "lookup_tree_cap2", "lookup_static_cap0",
                                  "draft_model", "oracle_grow", "wrong", "batch_cap"])
def test_greedy_equals_plain_decoding_ragged(target, repetitive_reference, name):
    model, params = target
    config, rows = repetitive_reference
    drafter, dparams = _wrapped(model, params, rows)[name]
    out = speculative_generate(model, params, drafter, dparams, REPETITIVE_PROMPTS, config)
    assert rows_of(out) == rows


def test_plain_prompt_lookup_uses_widths_and_stays_exact(target, repetitive_reference):
    # prompt lookup opts in with verify_widths = "auto": default widths (1, 2, 4, 9).
    model, params = target
    config, rows = repetitive_reference
    drafter = PromptLookupDrafter(draft_len=8)
    assert adaptive.verify_widths_of(drafter, drafter.tree.num_nodes) == (1, 2, 4, 9)
    out = speculative_generate(model, params, drafter, None, REPETITIVE_PROMPTS, config)
    assert rows_of(out) == rows


def test_wrong_drafter_shrinks_to_one_token(target, repetitive_reference):
    model, params = target
    config, rows = repetitive_reference
    drafter, script = _wrapped(model, params, rows)["wrong"]
    out = speculative_generate(model, params, drafter, script, REPETITIVE_PROMPTS, config)
    assert int(out.stats.accepted) == 0
    # Round 1 offers the full 4 drafts and all are rejected: k = min(4 - 1, 0 + 1) = 1, then
    # 1 draft per round. Each row runs len - 1 rounds (one token each after the prefill's).
    expected = sum(4 + (len(r) - 2) for r in rows)
    assert int(out.stats.drafted) == expected


def test_oracle_keeps_full_length(target, repetitive_reference):
    model, params = target
    config, rows = repetitive_reference
    drafter, script = _wrapped(model, params, rows)["oracle_grow"]
    out = speculative_generate(model, params, drafter, script, REPETITIVE_PROMPTS, config)
    # Every draft is accepted, k stays at the cap 5: ceil((n - 1) / 6) rounds per row.
    assert int(out.stats.row_rounds) == sum(-(-(len(r) - 1) // 6) for r in rows)
    assert int(out.stats.drafted) == int(out.stats.row_rounds) * 5


def test_update_rule():
    inner = ScriptedDrafter("oracle", 6, 8)
    drafter = AdaptiveDraftLength(inner, max_draft_len=5, min_draft_len=2, grow=2)
    k = jnp.array([3, 3, 3, 5, 3, 3, 4], jnp.int32)
    offered = jnp.array([3, 3, 3, 5, 0, 2, 4], jnp.int32)  # deepest valid node per row
    n_acc = jnp.array([3, 1, 0, 5, 0, 2, 2], jnp.int32)
    live = jnp.array([1, 1, 1, 1, 1, 1, 0], bool)
    depth = jnp.arange(7, dtype=jnp.int32)[None, :]
    proposal = Proposal(tokens=jnp.zeros((7, 7), jnp.int32), valid=depth <= offered[:, None])
    info = CommitInfo(proposal=proposal, path=jnp.zeros((7, 7), jnp.int32), num_accepted=n_acc,
                      next_token=jnp.zeros((7,), jnp.int32), new_lengths=jnp.zeros((7,), jnp.int32),
                      verify_hidden=jnp.zeros((7, 7, 1)), live=live)
    state = drafter.commit(None, AdaptiveState(inner=(), draft_len=k), None, info)
    # all accepted: 3 + 2; rejected after 1: min(2, 2); rejected at once: floor 2; at the cap
    # 5: stays; nothing offered: unchanged; drafter stopped short (2 of 3), all accepted:
    # unchanged; not live: unchanged.
    np.testing.assert_array_equal(np.asarray(state.draft_len), [5, 2, 2, 5, 3, 3, 4])


def _round_once(model, params, drafter, dparams, prompts, config, draft_len=None):
    """One round after the prefill; ``draft_len`` overrides the wrapper's per-row k."""
    batch = make_prompt_batch(prompts)
    loop = SpecLoop(model, drafter, config, SpecConfig())
    state = loop.jit_start(params, dparams, batch, jax.random.key(0), 64)
    if draft_len is not None:
        state = state.replace(drafter_state=state.drafter_state.replace(
            draft_len=jnp.asarray(draft_len, jnp.int32)))
    before = np.asarray(state.cache.lengths)
    state = loop.jit_round(params, dparams, state)
    return before, np.asarray(state.cache.k), state


WIDTH_PROMPTS = [list(range(i, i + 16)) for i in (1, 30, 60)]


def _written(k, first, count):
    """bool[B, count]: which of the slots first .. first + count - 1 hold a K entry."""
    return np.abs(k[:, :, :, first:first + count]).sum(axis=(0, 2, 4)) > 0


@pytest.mark.parametrize("cap,width", [(0, 1), (1, 2), (4, 8)])
def test_narrow_width_is_taken(target, cap, width):
    # All prompts fill their 16-slot bucket, so slots >= 16 are zero after the prefill; one
    # round's forward writes exactly its width W of scratch slots 16 .. 16 + W - 1. Widths of an
    # 8-node chain: (1, 2, 4, 8).
    model, params = target
    config = DecodeConfig(max_new_tokens=8)
    script = kit.script(WIDTH_PROMPTS, rows_of(generate(model, params, WIDTH_PROMPTS, config)))
    drafter = AdaptiveDraftLength(ScriptedDrafter("oracle", 7, model.vocab_size),
                                  max_draft_len=cap)
    before, k, state = _round_once(model, params, drafter, script, WIDTH_PROMPTS, config)
    assert (before == 16).all()
    written = _written(k, 16, 8)
    assert written[:, :width].all() and not written[:, width:].any()
    assert int(state.stats.drafted) == 3 * cap


def test_width_follows_the_deepest_live_row(target):
    # Only row 1 offers drafts (2 of them): the forward is 4 wide (covers node 2) for every
    # row, not the full 8.
    model, params = target
    config = DecodeConfig(max_new_tokens=8)
    script = kit.script(WIDTH_PROMPTS, rows_of(generate(model, params, WIDTH_PROMPTS, config)))
    drafter = AdaptiveDraftLength(ScriptedDrafter("oracle", 7, model.vocab_size))
    before, k, state = _round_once(model, params, drafter, script, WIDTH_PROMPTS, config,
                                   draft_len=[0, 2, 0])
    written = _written(k, 16, 8)
    assert written[:, :4].all() and not written[:, 4:].any()
    assert int(state.stats.drafted) == 2 and int(state.stats.accepted) == 2
def test_sequence_distribution_is_exact():
    # A draft model's sampled chain (iid rule with draft_probs), cut per row by the adaptive
    # length and verified on narrow widths (1, 2, 4): the joint distribution of 3 sampled
    # tokens is the target's. (Deterministic drafts on narrow widths: plain prompt lookup's
    # sequence-level test in test_speculative.py.)
    sampling = SamplingConfig(temperature=1.0)
    model, params = seq_model()
    other, other_params = seq_model(layers=1, seed=11)
    drafter = AdaptiveDraftLength(DraftModelDrafter(other, 3, sampling), max_draft_len=2)
    seqs, joint = exact_joint(model, params, sampling)
    counts, total = sample_sequences(model, params, drafter, other_params, sampling,
                                      SpecConfig())
    assert chi_square_pvalue(seqs, joint, counts, total) > 1e-3


def test_batch_cap_and_bad_input():
    sizes = (1, 2, 4, 8, 16, 32)
    assert [max_draft_len_for_batch(b, 8, 16) for b in sizes] == [8, 7, 3, 1, 0, 0]
    assert [max_draft_len_for_batch(b, 8, 8) for b in sizes] == [7, 3, 1, 0, 0, 0]
    assert adaptive.default_token_budget("cpu") == 8 and adaptive.default_token_budget("tpu") == 16
    default = adaptive.default_token_budget()  # this backend's
    assert [max_draft_len_for_batch(b, 8) for b in sizes] == [
        max_draft_len_for_batch(b, 8, default) for b in sizes]
    assert max_draft_len_for_batch(4, 8, token_budget=64) == 8
    assert adaptive.default_verify_widths(9) == (1, 2, 4, 9)
    assert adaptive.default_verify_widths(8) == (1, 2, 4, 8)
    assert adaptive.default_verify_widths(1) == (1,)
    inner = PromptLookupDrafter(draft_len=4)
    with pytest.raises(ValueError, match="policy"):
        AdaptiveDraftLength(inner, policy="fast")
    with pytest.raises(ValueError, match="max_draft_len"):
        AdaptiveDraftLength(inner, max_draft_len=5)
    with pytest.raises(ValueError, match="min_draft_len"):
        AdaptiveDraftLength(inner, min_draft_len=0)
    with pytest.raises(ValueError, match="batch_size"):
        max_draft_len_for_batch(0, 4)
    with pytest.raises(ValueError, match="ascending"):
        adaptive.check_verify_widths((2, 1, 5), 5)
    with pytest.raises(ValueError, match="ending with"):
        adaptive.check_verify_widths((1, 2), 5)
