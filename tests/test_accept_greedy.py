"""Tests for the exact-match side of specjax.accept: greedy verification against a plain Python
reference on random static and dynamic trees, every sampling rule reducing to it at temperature
zero, and the lossy typical acceptance (proved lossy, and matched against the same reference
with its own acceptance test). The sampling rules' distributions are in ``test_accept.py``."""

import jax
import numpy as np
import pytest

import tinymodels as kit
from specjax import accept
from specjax.sampling import GREEDY, SamplingConfig, processed_probs
from specjax.tree import DraftTree
from sequence_kit import token_chi_square_pvalue


# Greedy -----------------------------------------------------------------------------------------


def greedy_reference(tokens, parents, valid, logits, passes=None):
    """Plain Python V-G: deepest node whose whole path matches (lowest index among ties).

    ``passes(n)`` replaces the exact-match test of node ``n`` (used for typical acceptance).
    """
    top = np.argmax(logits, -1)
    passes = passes or (lambda n: tokens[n] == top[parents[n]])
    num_nodes = len(parents)
    ok = [True] + [False] * (num_nodes - 1)
    depth = [0] * num_nodes
    for n in range(1, num_nodes):
        p = parents[n]
        depth[n] = depth[p] + 1
        ok[n] = bool(valid[n]) and ok[p] and bool(passes(n))
    best = max((n for n in range(num_nodes) if ok[n]), key=lambda n: (depth[n], -n))
    path = [best]
    while path[-1] != 0:
        path.append(parents[path[-1]])
    path = path[::-1]
    return path, [int(tokens[n]) for n in path[1:]] + [int(top[best])]


def matching_tokens(rng, parents, logits, match_prob, distinct_siblings=False):
    """Node tokens equal to the parent's argmax with probability ``match_prob``."""
    vocab = logits.shape[-1]
    top = np.argmax(logits, -1)
    tokens = rng.integers(0, vocab, len(parents))
    for n in range(1, len(parents)):
        if rng.random() < match_prob:
            tokens[n] = top[parents[n]]
    if distinct_siblings:  # keep one token per (parent, token); re-draw others to unused tokens
        for v in range(len(parents)):
            kids = [n for n in range(1, len(parents)) if parents[n] == v]
            used = set()
            for n in kids:
                while tokens[n] in used:
                    tokens[n] = rng.integers(0, vocab)
                used.add(tokens[n])
    return tokens


def check_against_reference(result, tokens, parents, valid, logits):
    outcomes = set()
    for b in range(len(tokens)):
        path, emitted = greedy_reference(tokens[b], parents[b], valid[b], logits[b])
        n = len(path) - 1
        assert int(result.num_accepted[b]) == n
        np.testing.assert_array_equal(result.path[b, :n + 1], path)
        assert np.all(np.asarray(result.path[b, n + 1:]) == -1)
        np.testing.assert_array_equal(result.emitted[b, :n + 1], emitted)
        assert np.all(np.asarray(result.emitted[b, n + 1:]) == -1)
        assert int(result.next_token[b]) == emitted[-1]
        outcomes.add(n)
    return outcomes


def test_greedy_matches_reference_on_random_dynamic_trees():
    rng = np.random.default_rng(0)
    batch, num_nodes, vocab = 24, 12, 5
    parents = np.stack([kit.random_parents(rng, num_nodes) for _ in range(batch)]).astype(np.int32)
    logits = rng.normal(size=(batch, num_nodes, vocab)).astype(np.float32)
    tokens = np.stack([matching_tokens(rng, parents[b], logits[b], 0.7)
                       for b in range(batch)]).astype(np.int32)
    valid = rng.random((batch, num_nodes)) < 0.85
    valid[:, 0] = True
    result = jax.jit(accept.greedy)(tokens, parents, logits, valid)
    assert result.path.shape == (batch, num_nodes)  # dynamic trees: D = T - 1
    outcomes = check_against_reference(result, tokens, parents, valid, logits)
    assert len(outcomes) >= 3  # rows really differ


def test_greedy_static_tree_and_duplicate_siblings():
    rng = np.random.default_rng(1)
    tree = DraftTree.from_choices([(0,), (1,), (2,), (0, 0), (1, 0), (1, 1), (2, 0), (1, 0, 0)])
    batch, vocab = 16, 4
    logits = rng.normal(size=(batch, tree.num_nodes, vocab)).astype(np.float32)
    tokens = np.stack([matching_tokens(rng, tree.parents, logits[b], 0.4)
                       for b in range(batch)]).astype(np.int32)
    tokens[0, 1:4] = np.argmax(logits[0, 0])  # three identical matching siblings
    run = jax.jit(accept.greedy, static_argnums=1)
    result = run(tokens, tree, logits)
    assert result.path.shape == (batch, tree.max_depth + 1)
    parents, valid = tree.arrays(batch)
    outcomes = check_against_reference(result, tokens, parents, valid, logits)
    assert len(outcomes) >= 3


@pytest.mark.parametrize("rule", ["iid", "without_replacement", "deterministic", "typical"])
def test_sampling_rules_are_exact_greedy_at_temperature_zero(rule):
    rng = np.random.default_rng(2)
    batch, num_nodes, vocab = 32, 10, 6
    parents = np.stack([kit.random_parents(rng, num_nodes) for _ in range(batch)]).astype(np.int32)
    logits = rng.normal(size=(batch, num_nodes, vocab)).astype(np.float32)
    tokens = np.stack([matching_tokens(rng, parents[b], logits[b], 0.7, distinct_siblings=True)
                       for b in range(batch)]).astype(np.int32)
    q = jax.nn.softmax(rng.normal(size=(batch, num_nodes, vocab)).astype(np.float32))
    if rule == "deterministic":
        run = lambda key: accept.deterministic(key, tokens, parents, logits, GREEDY)
    elif rule == "typical":
        run = lambda key: accept.typical_acceptance_lossy(key, tokens, parents, logits, GREEDY)
    else:
        run = lambda key: accept.speculative_sampling(key, tokens, parents, logits, q, GREEDY,
                                                      siblings=rule)
    result = jax.jit(run)(jax.random.PRNGKey(0))
    expected = jax.jit(accept.greedy)(tokens, parents, logits)
    for field in ("path", "num_accepted", "next_token", "emitted"):
        np.testing.assert_array_equal(getattr(result, field), getattr(expected, field),
                                      err_msg=field)


# Lossy typical acceptance -------------------------------------------------------------------------


def test_typical_acceptance_is_lossy():
    """p = (0.5, 0.3, 0.2), draft always token 1: p(1) = 0.3 > min(0.09, 0.3 exp(-H(p))) = 0.09,
    so token 1 is always accepted and the first token is 1 with probability 1 instead of 0.3
    (total variation 0.7). A peaked target (p(1) = 0.02 < 0.09) rejects the same draft."""
    rows = 4000
    cfg = SamplingConfig(temperature=1.0)
    rule = jax.jit(accept.typical_acceptance_lossy, static_argnames=("parents", "config"))
    tokens = np.tile(np.array([[0, 1]], np.int32), (rows, 1))
    tree = DraftTree.chain(1)
    p = np.array([0.5, 0.3, 0.2])
    lossy = rule(jax.random.PRNGKey(0), tokens, tree, np.tile(np.log(p), (rows, 2, 1)), cfg)
    assert np.all(np.asarray(lossy.emitted[:, 0]) == 1)  # P_out = delta_1, not p
    assert token_chi_square_pvalue(np.asarray(lossy.emitted[:, 0]), p) < 1e-9
    peaked = np.tile(np.log([0.96, 0.02, 0.02]), (rows, 2, 1))
    res = rule(jax.random.PRNGKey(1), tokens, tree, peaked, cfg)
    assert np.all(np.asarray(res.num_accepted) == 0)
    assert token_chi_square_pvalue(np.asarray(res.next_token), np.array([0.96, 0.02, 0.02])) > 1e-3


def test_typical_acceptance_matches_reference():
    rng = np.random.default_rng(6)
    batch, num_nodes, vocab = 16, 10, 4
    cfg = SamplingConfig(temperature=1.0)
    parents = np.stack([kit.random_parents(rng, num_nodes) for _ in range(batch)]).astype(np.int32)
    logits = (2.0 * rng.normal(size=(batch, num_nodes, vocab))).astype(np.float32)
    tokens = np.stack([matching_tokens(rng, parents[b], logits[b], 0.6)
                       for b in range(batch)]).astype(np.int32)
    probs = np.asarray(processed_probs(logits, cfg), np.float64)
    entropy = -np.sum(probs * np.log(probs), -1)
    # Large epsilon and delta make the threshold vary from node to node.
    threshold = np.minimum(0.6, 0.9 * np.exp(-entropy))
    result = jax.jit(accept.typical_acceptance_lossy, static_argnames="config")(
        jax.random.PRNGKey(0), tokens, parents, logits, cfg, epsilon=0.6, delta=0.9)
    depths = set()
    for b in range(batch):
        par = parents[b]
        passes = lambda n: probs[b, par[n], tokens[b, n]] > threshold[b, par[n]]
        path, emitted = greedy_reference(tokens[b], par, [True] * num_nodes, logits[b], passes)
        n = len(path) - 1
        assert int(result.num_accepted[b]) == n
        np.testing.assert_array_equal(result.path[b, :n + 1], path)
        np.testing.assert_array_equal(result.emitted[b, :n], emitted[:-1])
        depths.add(n)
    assert len(depths) >= 3
