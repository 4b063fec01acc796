"""Token Recycling: the table's writes and the tree walk against a plain Python reference,
warm tables from text against a full forward, the file round trip, and lossless decoding
(greedy on the tiny model, cold, warm and adversarial tables; the exact sequence distribution
under sampling)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tinymodels as kit
from drafters import head_weights
from drafters.token_recycling import (RecyclingState, TokenRecyclingDrafter, load_table,
                                      save_table, table_from_text)
from sequence_kit import SEQ_VOCAB, chi_square_pvalue, exact_joint, sample_sequences, seq_model
from specjax.drafter import CommitInfo, DraftContext, Proposal
from specjax.sampling import SamplingConfig
from specjax.speculative import SpecConfig, speculative_generate

CHOICES = ((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0))


def _random_table(rng, vocab, k):
    return np.stack([rng.permutation(vocab)[:k] for _ in range(vocab)]).astype(np.int32)


# The table against a Python reference ---------------------------------------------------------


def _ref_propose(table, tree, pending):
    tokens = [pending]
    for n in range(1, tree.num_nodes):
        tokens.append(int(table[tokens[tree.parents[n]], tree.choice_rank[n]]))
    return tokens


def _ref_commit(table, tokens, valid, live, path, num_accepted, logits, k):
    """Nodes in order, the accepted path's nodes after the others: the last write wins."""
    table = table.copy()
    if not live:
        return table
    on_path = set(path[:num_accepted + 1])
    order = [n for n in range(len(tokens)) if n not in on_path] + sorted(on_path)
    for n in order:
        if valid[n]:
            table[tokens[n]] = np.argsort(-logits[n], kind="stable")[:k]
    return table


def test_propose_and_commit_match_the_reference():
    vocab, k, b = 12, 3, 4
    drafter = TokenRecyclingDrafter.create(vocab, CHOICES, top_k=k)
    tree, t = drafter.tree, drafter.tree.num_nodes
    rng = np.random.default_rng(0)
    tables = np.stack([_random_table(rng, vocab, k) for _ in range(b)])
    propose = jax.jit(lambda s, pending: drafter.propose(None, s, DraftContext(
        None, None, None, None, pending, None, None), None)[0].tokens)
    commit = jax.jit(lambda s, info: drafter.commit(None, s, None, info).table)
    for step in range(12):
        pending = rng.integers(0, vocab, b)
        tokens = np.asarray(propose(RecyclingState(jnp.asarray(tables)), jnp.asarray(pending)))
        for r in range(b):
            assert tokens[r].tolist() == _ref_propose(tables[r], tree, int(pending[r]))
        # Few distinct tokens, so one token sits at several nodes (the write order matters);
        # distinct logits, so the top-k is unambiguous.
        tokens = rng.integers(0, 4, (b, t)).astype(np.int32)
        valid = rng.random((b, t)) < 0.8
        live = rng.random(b) < 0.8
        num_accepted = rng.integers(0, tree.max_depth + 1, b)
        path = np.full((b, tree.max_depth + 1), -1, np.int32)
        for r in range(b):  # a real root-to-node path of the tree, cut at num_accepted
            deepest = rng.choice(np.flatnonzero(tree.depth == num_accepted[r]))
            chain = [int(deepest)]
            while chain[-1] != 0:
                chain.append(tree.parents[chain[-1]])
            path[r, :len(chain)] = chain[::-1]
            valid[r, chain] = True
        logits = rng.permutation(b * t * vocab).reshape(b, t, vocab).astype(np.float32)
        info = CommitInfo(Proposal(jnp.asarray(tokens), valid=jnp.asarray(valid)),
                          jnp.asarray(path), jnp.asarray(num_accepted, jnp.int32), None, None,
                          None, jnp.asarray(live), jnp.asarray(logits))
        got = np.asarray(commit(RecyclingState(jnp.asarray(tables)), info))
        for r in range(b):
            want = _ref_commit(tables[r], tokens[r], valid[r], live[r], path[r].tolist(),
                               int(num_accepted[r]), logits[r], k)
            np.testing.assert_array_equal(got[r], want, err_msg=f"step {step} row {r}")
        tables = got


def test_settings_and_tables_are_checked():
    with pytest.raises(ValueError, match="raise top_k"):
        TokenRecyclingDrafter.create(50, ((0,), (5,)), top_k=4)
    with pytest.raises(ValueError, match="top_k must be in 1..50"):
        TokenRecyclingDrafter.create(50, ((0,),), top_k=51)
    drafter = TokenRecyclingDrafter.create(50, ((0,), (1,)), top_k=4)
    assert (drafter.check_table(drafter.cold_table()) == np.arange(4)).all()
    with pytest.raises(ValueError, match=r"int\[50, 4\]"):
        drafter.check_table(np.zeros((50, 3), np.int32))
    with pytest.raises(ValueError, match="ids must be in 0..49"):
        drafter.check_table(np.full((50, 4), 50) - np.arange(4)[None, :] + 1)
    with pytest.raises(ValueError, match="distinct"):
        drafter.check_table(np.zeros((50, 4), np.int32))
    with pytest.raises(ValueError, match="vocabulary of 128"):
        drafter.check_compatible(kit.tiny_model("gqa")[0])


def test_table_from_text_is_each_tokens_last_top_k(target, tmp_path):
    model, params = target
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, 20, n).tolist() for n in (5, 70, 33)]  # repeats; two widths
    got = table_from_text(model, params, seqs, top_k=4, batch_size=2)
    want = np.broadcast_to(np.arange(4), (model.vocab_size, 4)).copy()
    for s in seqs:
        logits = np.asarray(kit.full_forward(model, params, np.asarray([s])).logits[0])
        for i, tok in enumerate(s):
            want[tok] = np.argsort(-logits[i], kind="stable")[:4]
    np.testing.assert_array_equal(got, want)
    drafter = TokenRecyclingDrafter.create(model.vocab_size, CHOICES, top_k=4)
    path = save_table(str(tmp_path / "t.safetensors"), got, source="test")
    np.testing.assert_array_equal(load_table(path, drafter), got)
    with pytest.raises(head_weights.HeadWeightsError, match="int\\[128, 8\\]"):
        load_table(path, TokenRecyclingDrafter.create(model.vocab_size, CHOICES))
    kit.truncate_file(path)
    with pytest.raises(head_weights.HeadWeightsError, match="not a token-recycling table"):
        load_table(path, drafter)
    with pytest.raises(head_weights.HeadWeightsError, match="build one"):
        load_table(str(tmp_path / "none.safetensors"), drafter)


# Lossless decoding -----------------------------------------------------------------------------


def test_greedy_equals_plain_decoding_cold_warm_and_adversarial(target, reference):
    model, params = target
    config, rows = reference
    drafter = TokenRecyclingDrafter.create(model.vocab_size, CHOICES, top_k=4)
    rng = np.random.default_rng(2)
    warm = table_from_text(model, params, [p + r for p, r in zip(kit.PROMPTS, rows)], top_k=4)
    tables = {"cold": None, "warm": warm, "random": _random_table(rng, model.vocab_size, 4)}
    tau = {}
    for name, table in tables.items():
        dparams = None if table is None else {"table": jnp.asarray(table)}
        out = speculative_generate(model, params, drafter, dparams, kit.PROMPTS, config)
        assert kit.rows_of(out) == rows, name
        tau[name] = sum(map(len, rows)) / int(out.stats.row_calls)
    # The table is what drafts: warmed on these very answers, it must be accepted far more.
    assert tau["warm"] > 1.5 * tau["random"] and tau["warm"] > 2.0


def test_sequence_distribution_is_exact():
    sampling = SamplingConfig(temperature=1.0)
    model, params = seq_model()
    drafter = TokenRecyclingDrafter.create(SEQ_VOCAB, CHOICES, top_k=3)
    table = _random_table(np.random.default_rng(3), SEQ_VOCAB, 3)
    seqs, joint = exact_joint(model, params, sampling)
    counts, total = sample_sequences(model, params, drafter, {"table": jnp.asarray(table)},
                                     sampling, SpecConfig())
    assert chi_square_pvalue(seqs, joint, counts, total) > 1e-3
