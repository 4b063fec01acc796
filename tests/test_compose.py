"""Composed drafters (``first_of``, ``merge``): the trie merge against a Python reference, which
part drafts for which row, lossless greedy decoding with model-free and learned parts (including
adversarial ones), the exact sequence distribution under sampling, and what cannot compose."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tinymodels as kit
from drafters import registry
from drafters.compose import ComposedDrafter, merge_duplicates, parse_parts
from drafters.draft_model import DraftModelDrafter
from drafters.eagle import EagleDrafter
from drafters.eagle_weights import random_params
from drafters.prompt_lookup import PromptLookupDrafter
from drafters.scripted import ScriptedDrafter
from drafters.token_recycling import TokenRecyclingDrafter
from sequence_kit import SEQ_VOCAB, chi_square_pvalue, exact_joint, sample_sequences, seq_model
from specjax.drafter import DraftContext
from specjax.sampling import SamplingConfig
from specjax.speculative import SpecConfig, speculative_generate

CHOICES = ((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0))


def _random_table(rng, vocab, k):
    return jnp.asarray(np.stack([rng.permutation(vocab)[:k] for _ in range(vocab)]), jnp.int32)


# The trie merge --------------------------------------------------------------------------------


def _ref_merge(tokens, parents, valid):
    """Nodes in order; a valid node equal (token, merged parent) to an earlier kept node joins
    it and its children follow it."""
    canon, new_parents, new_valid = list(range(len(tokens))), list(parents), list(valid)
    for n in range(1, len(tokens)):
        parent = canon[parents[n]]
        new_parents[n] = parent
        if not valid[n]:
            continue
        for m in range(n):
            if new_valid[m] and canon[m] == m and m > 0 and tokens[m] == tokens[n] \
                    and new_parents[m] == parent:
                canon[n], new_valid[n] = m, False
                break
    return new_parents, new_valid


def test_merge_duplicates_matches_the_reference():
    rng = np.random.default_rng(0)
    b, t = 16, 12
    parents = np.stack([kit.random_parents(rng, t) for _ in range(b)]).astype(np.int32)
    tokens = rng.integers(0, 3, (b, t)).astype(np.int32)  # many duplicates
    valid = rng.random((b, t)) < 0.85
    valid[:, 0] = True
    got_p, got_v = jax.jit(merge_duplicates)(jnp.asarray(tokens), jnp.asarray(parents),
                                             jnp.asarray(valid))
    got_p, got_v = np.asarray(got_p), np.asarray(got_v)
    merged = 0
    for r in range(b):
        ref_p, ref_v = _ref_merge(tokens[r].tolist(), parents[r].tolist(), valid[r].tolist())
        assert got_p[r].tolist() == ref_p and got_v[r].tolist() == ref_v, r
        assert all(got_p[r, n] < n for n in range(1, t))
        kept = [(tokens[r, n], got_p[r, n]) for n in range(1, t) if got_v[r, n]]
        assert len(kept) == len(set(kept))  # siblings distinct
        merged += int(valid[r].sum() - got_v[r].sum())
    assert merged > 10  # the random trees did hold duplicates


# Which part drafts --------------------------------------------------------------------------


def _context(pending, history, history_len, cache):
    b = len(pending)
    return DraftContext(target_params=None, cache=cache, history=history,
                        history_len=history_len, pending=pending,
                        pending_hidden=jnp.zeros((b, 4)), done=jnp.zeros((b,), bool))


def test_first_of_takes_the_first_part_that_drafts_and_merge_takes_both(target):
    model, _ = target
    lookup = PromptLookupDrafter(draft_len=3, max_ngram=2)
    table = np.tile(np.arange(3, dtype=np.int32), (model.vocab_size, 1)) + 7
    recycle = TokenRecyclingDrafter.create(model.vocab_size, ((0,), (1,), (0, 0)), top_k=3)
    # Row 0 repeats "5 6" (lookup matches: drafts 9 ...); row 1 has no repeat (no match).
    history = jnp.asarray([[5, 6, 9, 4, 5, 6, 0, 0], [1, 2, 3, 4, 0, 0, 0, 0]], jnp.int32)
    length = jnp.asarray([6, 4], jnp.int32)
    pending = jnp.asarray([6, 4], jnp.int32)
    ctx = _context(pending, history, length, model.init_cache(2, 16))
    params = (None, {"table": jnp.asarray(table)})
    for rule in ("first_of", "merge"):
        drafter = ComposedDrafter(rule, (lookup, recycle))
        state = drafter.init(params, ctx, history[:, :4], jnp.asarray([4, 4]))
        proposal, _, _ = drafter.propose(params, state, ctx, jax.random.key(0))
        tokens, parents, valid = (np.asarray(x) for x in (proposal.tokens, proposal.parents,
                                                           proposal.valid))
        assert tokens.shape[1] == drafter.tree.num_nodes
        offered = [sorted(zip(tokens[r][valid[r]].tolist(), parents[r][valid[r]].tolist()))
                   for r in range(2)]
        lookup_row0 = [(6, -1), (9, 0), (4, 1), (5, 2)]
        recycle_row = lambda p: [(p, -1), (7, 0), (8, 0), (7, 1 if rule == "first_of" else 4)]
        if rule == "first_of":
            assert offered[0] == sorted(lookup_row0)  # the lookup matched: its chain only
            assert offered[1] == sorted(recycle_row(4))  # no match: the table's tree
        else:  # both parts' nodes (row 1: the lookup offered none)
            assert offered[0] == sorted(lookup_row0 + recycle_row(6)[1:])
            assert offered[1] == sorted([(4, -1), (7, 0), (8, 0), (7, 4)])


def test_parts_are_checked(target):
    model, _ = target
    lookup = PromptLookupDrafter()
    with pytest.raises(ValueError, match="at least two"):
        ComposedDrafter("first_of", (lookup,))
    with pytest.raises(ValueError, match="unknown composition"):
        ComposedDrafter("both", (lookup, lookup))
    with pytest.raises(ValueError, match="its own proposals"):
        ComposedDrafter("merge", (lookup, DraftModelDrafter(model=model, draft_len=2)))
    sampled = DraftModelDrafter(model=model, draft_len=2, sampling=SamplingConfig(1.0))
    with pytest.raises(ValueError, match="point-mass"):
        ComposedDrafter("merge", (lookup, sampled))
    for bad, match in [("sam", "METHOD\\+METHOD"), ("ar+prompt_lookup", "cannot be a part"),
                       ("merge+prompt_lookup", "cannot be a part"),
                       ("nope+prompt_lookup", "unknown method"),
                       ("prompt_lookup:bogus+token_recycling", "tree")]:
        with pytest.raises(ValueError, match=match):
            parse_parts(bad)
    with pytest.raises(ValueError, match="unknown method"):
        registry.get("first_of").make_options(tree="nope+prompt_lookup")


# Lossless decoding -----------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["first_of", "merge"])
def test_greedy_equals_plain_decoding(target, reference, rule):
    model, params = target
    config, rows = reference
    script = kit.script(kit.PROMPTS, rows)
    wrong = ScriptedDrafter("wrong", 3, model.vocab_size)
    oracle = ScriptedDrafter("oracle", 4, model.vocab_size)
    eagle = EagleDrafter.create(model, tree="dynamic", top_k=3, depth=3, budget=6)
    # (prompt lookup + Token Recycling: the sampling test below, exact in distribution)
    cases = {  # name: parts, params, params for prompt 1 alone (None: not run alone)
        "wrong+oracle": ((wrong, oracle), (script, script), None),
        "lookup+eagle": ((PromptLookupDrafter(draft_len=5), eagle),
                         (None, random_params(eagle, seed=3)), (None, random_params(eagle, 3))),
    }
    calls = {}
    for name, (parts, dparams, single_params) in cases.items():
        drafter = ComposedDrafter(rule, parts)
        out = speculative_generate(model, params, drafter, dparams, kit.PROMPTS, config)
        assert kit.rows_of(out) == rows, name
        if single_params is not None:  # batch 1: rows independent
            single = speculative_generate(model, params, drafter, single_params,
                                          [kit.PROMPTS[1]], config)
            assert kit.rows_of(single) == [rows[1]], name
        calls[name] = int(out.stats.row_calls)
    tokens = sum(map(len, rows))
    if rule == "merge":  # the oracle's chain is verified beside the wrong one: 5 per call
        assert calls["wrong+oracle"] <= -(-tokens // 5) + 2 * len(rows)
    else:  # the always-wrong chain is always offered: the oracle is never asked
        assert calls["wrong+oracle"] == tokens


def test_first_of_falls_back_only_where_the_primary_offers_nothing(target, reference):
    model, params = target
    config, rows = reference
    script = kit.script(kit.PROMPTS, rows)
    oracle = ScriptedDrafter("oracle", 4, model.vocab_size)
    lookup = PromptLookupDrafter(draft_len=4, max_ngram=3, min_ngram=3)
    out = speculative_generate(model, params, ComposedDrafter("first_of", (lookup, oracle)),
                               (None, script), kit.PROMPTS, config)
    assert kit.rows_of(out) == rows
    alone = speculative_generate(model, params, lookup, None, kit.PROMPTS, config)
    # The oracle answers wherever the 3-gram lookup had nothing: far fewer target calls.
    assert int(out.stats.row_calls) < 0.6 * int(alone.stats.row_calls)


def test_sequence_distribution_is_exact():
    sampling = SamplingConfig(temperature=1.0)
    model, params = seq_model()
    recycle = TokenRecyclingDrafter.create(SEQ_VOCAB, CHOICES, top_k=3)
    table = {"table": _random_table(np.random.default_rng(3), SEQ_VOCAB, 3)}
    lookup = PromptLookupDrafter(draft_len=3, max_ngram=1)
    seqs, joint = exact_joint(model, params, sampling)
    for rule, rounds in (("first_of", 1), ("merge", 2)):
        drafter = ComposedDrafter(rule, (lookup, recycle))
        counts, total = sample_sequences(model, params, drafter, (None, table), sampling,
                                         SpecConfig(), rounds=rounds)
        assert chi_square_pvalue(seqs, joint, counts, total) > 1e-3, rule
