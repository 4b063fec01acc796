"""Tests for specjax.accept.

The exact tests enumerate every draft outcome and integrate the acceptance uniforms exactly: for
each outcome and each candidate final node ``f`` the real jitted :func:`rejection_walk` runs with
``u = 0`` on the path to ``f`` (accept whenever possible) and ``u = 1`` elsewhere (reject unless
acceptance is certain); the probability of that decision pattern is the product of the walk's own
``accept_prob`` (or one minus it) over the tried nodes, and the walk's residual gives the next
token. A second run with every ``u`` just inside its accept / reject region checks that the
walk's comparison thresholds exactly at ``accept_prob``. Monte Carlo tests run the public rules
end to end with real keys. Greedy verification and the lossy typical rule are in
``test_accept_greedy.py``.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tinymodels as kit
from specjax import accept
from specjax.sampling import SamplingConfig, processed_probs, sample
from specjax.tree import DraftTree
from sequence_kit import token_chi_square_pvalue

WALK = jax.jit(accept.rejection_walk, static_argnames="mode")
TREE2 = (-1, 0, 0, 1, 1, 2)  # depth-2 tree: two root children, two + one grandchildren


def normalize(x):
    x = np.asarray(x, np.float64)
    return x / x.sum(-1, keepdims=True)


def pq_cases(vocab, rng):
    """Hand-made (p, q) pairs over ``vocab`` tokens."""
    half = vocab // 2
    rand = lambda: normalize(rng.random(vocab) + 0.05)
    with_zero = rand() * (np.arange(vocab) != 1)
    return {
        "disjoint": (normalize(np.r_[rng.random(half) + 0.1, np.zeros(vocab - half)]),
                     normalize(np.r_[np.zeros(half), rng.random(vocab - half) + 0.1])),
        "q_point": (rand(), np.eye(vocab)[vocab - 1]),
        "p_point": (np.eye(vocab)[1], rand()),
        "q_equals_p": (lambda p: (p, p.copy()))(rand()),
        "q_uniform": (normalize(with_zero), np.full(vocab, 1.0 / vocab)),
        "random": (normalize(with_zero), normalize(rand() * (np.arange(vocab) != vocab - 1))),
    }


def enumerate_drafts(parents, mode, draft_at, vocab):
    """All draft outcomes of a tree: ``(tokens int[O, T], prob [O], drafts [O, T, V])``.

    ``draft_at(tokens, v) -> [O, V]`` is the drafter's distribution for the children of ``v``.
    """
    tree = DraftTree(parents)
    tokens = np.zeros((1, tree.num_nodes), np.int64)
    probs = np.ones(1)
    drafts = np.zeros((1, tree.num_nodes, vocab))
    for v, kids in enumerate(tree.children):
        if not kids:
            continue
        q = draft_at(tokens, v)  # [O, V]
        if mode == "iid":
            options = np.array(list(itertools.product(range(vocab), repeat=len(kids))))
            option_prob = np.prod(q[:, options], axis=-1)  # [O, M]
        else:  # sequential draws without replacement
            options = np.array(list(itertools.permutations(range(vocab), len(kids))))
            q_opt = q[:, options]  # [O, M, k]
            left = 1.0 - (np.cumsum(q_opt, -1) - q_opt)
            option_prob = np.prod(np.where(left > 1e-12, q_opt / np.maximum(left, 1e-12), 0.0), -1)
        o_idx, m_idx = np.nonzero(option_prob > 0)
        tokens, drafts = tokens[o_idx].copy(), drafts[o_idx].copy()
        tokens[:, list(kids)] = options[m_idx]
        drafts[:, list(kids)] = q[o_idx][:, None, :]
        probs = probs[o_idx] * option_prob[o_idx, m_idx]
    return tokens, probs, drafts


def exact_walk(mode, parents, tokens, targets, drafts, next_table=None):
    """Exact output distribution of the walk per draft outcome.

    Args:
      tokens: ``[O, T]``; targets, drafts: ``[O, T, V]``; next_table: ``[O, V, V]`` target of
        the second token given the first (for the next round when nothing is accepted).

    Returns:
      ``first [O, V]``, ``pair [O, V, V]`` (None without next_table), ``tau [O]`` (expected
      tokens emitted), all conditional on the outcome.
    """
    tree = DraftTree(parents)
    num_out, num_nodes = tokens.shape
    vocab = targets.shape[-1]
    on_path = tree.visible  # on_path[f, n]: n lies on the root path of f
    rows = num_out * num_nodes
    padded = max(64, 1 << (rows - 1).bit_length())  # few distinct shapes -> few compilations
    rep = lambda x: np.repeat(x, num_nodes, axis=0)
    pad = lambda x: np.concatenate([x, np.repeat(x[:1], padded - rows, 0)])
    shape = (num_out, num_nodes)
    args = [pad(rep(x)) for x in (tokens.astype(np.int32), targets.astype(np.float32),
                                  drafts.astype(np.float32))]

    def run(uniforms):  # uniforms [O, F, T] -> (accept_prob, tried, final, residual)
        res = WALK(args[0], np.tile(tree.parents, (padded, 1)).astype(np.int32),
                   np.ones((padded, num_nodes), bool), args[1], args[2],
                   pad(uniforms.reshape(rows, num_nodes)).astype(np.float32), mode=mode)
        return (np.asarray(res.accept_prob, np.float64)[:rows].reshape(shape + (num_nodes,)),
                np.asarray(res.tried)[:rows].reshape(shape + (num_nodes,)),
                np.asarray(res.final_node)[:rows].reshape(shape),
                np.asarray(res.residual, np.float64)[:rows].reshape(shape + (vocab,)))

    # Pass 1: u = 0 on the path to f (accept unless impossible), u = 1 elsewhere (reject unless
    # certain); this reveals every tried node's acceptance probability a.
    extreme = np.broadcast_to(np.where(on_path, 0.0, 1.0), shape + (num_nodes,))
    prob, tried, final, residual = run(extreme)
    factor = np.where(tried, np.where(on_path[None], prob, 1.0 - prob), np.where(on_path, 0.0, 1.0))
    weight = np.prod(factor[..., 1:], axis=-1)  # [O, F]
    # Pass 2: u just inside the accept region [0, a) or the reject region [a, 1) checks that the
    # walk's comparison really thresholds at a; the decisions and the state must not change.
    near = np.where(on_path[None], prob * (1 - 1e-3), prob + (1.0 - prob) * 1e-3)
    prob2, tried2, final2, residual2 = run(np.where(tried, near, extreme))
    live = weight > 1e-9
    np.testing.assert_array_equal(final2[live], final[live])
    np.testing.assert_array_equal(tried2[live], tried[live])
    np.testing.assert_allclose(prob2[live], prob[live], atol=1e-7)
    np.testing.assert_allclose(residual2[live], residual[live], atol=1e-7)
    assert np.all(~live | (final == np.arange(num_nodes)[None])), "walk left the pattern"
    np.testing.assert_allclose(weight.sum(1), 1.0, atol=1e-6)

    eye = np.eye(vocab)
    depth = tree.depth
    anc = np.array([[np.flatnonzero(on_path[f] & (depth == d))[0] if d <= depth[f] else 0
                     for d in range(tree.max_depth + 1)] for f in range(num_nodes)])
    first = weight[:, 0, None] * residual[:, 0]
    pair = None
    if next_table is not None:
        pair = weight[:, 0, None, None] * residual[:, 0, :, None] * next_table
    for f in range(1, num_nodes):
        tok1 = eye[tokens[:, anc[f, 1]]]  # [O, V]
        first += weight[:, f, None] * tok1
        if pair is None:
            continue
        second = residual[:, f] if depth[f] == 1 else eye[tokens[:, anc[f, 2]]]
        pair += weight[:, f, None, None] * tok1[:, :, None] * second[:, None, :]
    tau = weight @ (depth + 1.0)
    return first, pair, tau


class Scenario:
    """Targets and drafters for depth <= 2 where the depth-2 distributions depend on the depth-1
    token: the target is p1 at the root, P2[x] below token x, p3 deeper; the drafter likewise."""

    def __init__(self, vocab, rng, p1=None, q1=None):
        rand = lambda: normalize(rng.random(vocab) ** 2 + 0.02)
        self.p1 = rand() if p1 is None else p1
        self.q1 = rand() if q1 is None else q1
        self.P2 = np.stack([rand() for _ in range(vocab)])
        self.Q2 = np.stack([rand() for _ in range(vocab)])
        self.p3, self.q3 = rand(), rand()

    def _at(self, tokens, v, parents, root, table, deep):
        depth = DraftTree(parents).depth[v]
        if depth == 0:
            return np.broadcast_to(root, (len(tokens), len(root)))
        if depth == 1:
            return table[tokens[:, v]]
        return np.broadcast_to(deep, (len(tokens), len(deep)))

    def draft_at(self, parents):
        return lambda tokens, v: self._at(tokens, v, parents, self.q1, self.Q2, self.q3)

    def targets(self, parents, tokens):
        return np.stack([self._at(tokens, n, parents, self.p1, self.P2, self.p3)
                         for n in range(len(parents))], axis=1)

    def exact(self, mode, parents, tokens=None):
        """``(first [O, V], pair [O, V, V], tau [O], probs [O])`` per draft outcome; ``tokens``
        fixes the drafts (deterministic mode)."""
        return exact_many(mode, parents, [self], tokens)[0]


def exact_many(mode, parents, scenarios, tokens=None):
    """:meth:`Scenario.exact` for several scenarios in one walk call (one compilation)."""
    parts = []
    for sc in scenarios:
        vocab = len(sc.p1)
        if tokens is None:
            tok, probs, drafts = enumerate_drafts(parents, mode, sc.draft_at(parents), vocab)
        else:
            tok, probs = tokens, np.full(len(tokens), 1.0 / len(tokens))
            drafts = np.zeros(tokens.shape + (vocab,))
        parts.append((tok, drafts, sc.targets(parents, tok), np.repeat(sc.P2[None], len(tok), 0),
                      probs))
    stacked = [np.concatenate(x) for x in list(zip(*parts))[:4]]
    first, pair, tau = exact_walk(mode, parents, stacked[0], stacked[2], stacked[1], stacked[3])
    ends = np.cumsum([len(part[0]) for part in parts])
    return [(f, p, t, part[4]) for f, p, t, part in
            zip(np.split(first, ends[:-1]), np.split(pair, ends[:-1]), np.split(tau, ends[:-1]),
                parts)]


# Exact single-step distributions ----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["iid", "without_replacement"])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("vocab", [3, 6])
def test_exact_multi_candidate(mode, k, vocab):
    if mode == "without_replacement":
        vocab = max(vocab, k + 2)  # k distinct draws need a larger vocabulary
    rng = np.random.default_rng(100 * k + vocab)
    parents = (-1,) + (0,) * k  # root with k children (k = 1: a chain, V-SS)
    cases = {name: Scenario(vocab, rng, p1=p, q1=q) for name, (p, q) in pq_cases(vocab, rng).items()
             if mode == "iid" or np.count_nonzero(q) >= k}  # else k distinct draws are impossible
    assert len(cases) >= 4
    for (name, sc), (first, _, _, probs) in zip(cases.items(), exact_many(mode, parents,
                                                                           list(cases.values()))):
        err = np.abs(probs @ first - sc.p1).max()
        assert err < 1e-6, (name, err)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_exact_deterministic_every_fixed_draft(k):
    """V-Δ must give exactly p for every fixed set of sibling tokens, duplicates included."""
    vocab = 4
    rng = np.random.default_rng(k)
    parents = (-1,) + (0,) * k
    tokens = np.array(list(itertools.product(range(vocab), repeat=k)))
    tokens = np.concatenate([np.zeros((len(tokens), 1), int), tokens], axis=1)
    cases = {name: Scenario(vocab, rng, p1=p) for name, (p, _) in pq_cases(vocab, rng).items()}
    results = exact_many("deterministic", parents, list(cases.values()), tokens)
    for (name, sc), (first, _, _, _) in zip(cases.items(), results):
        err = np.abs(first - sc.p1[None]).max()  # per fixed draft, not just on average
        assert err < 1e-6, (name, err)


@pytest.mark.parametrize("parents", [(-1, 0, 1), TREE2], ids=["chain2", "tree2"])
@pytest.mark.parametrize("mode", ["iid", "without_replacement", "deterministic"])
def test_exact_depth_two_pairs(parents, mode):
    """First and first-two-token distributions of depth-2 structures with context-dependent
    targets and drafters."""
    vocab = 4
    rng = np.random.default_rng(7)
    sc = Scenario(vocab, rng)
    if mode == "deterministic":
        tokens = rng.integers(0, vocab, (300, len(parents)))
        tokens[:5, 1:] = 2  # all-duplicate drafts
        first, pair, _, _ = sc.exact(mode, parents, tokens)
        errs = [np.abs(first - sc.p1).max(), np.abs(pair - sc.p1[:, None] * sc.P2).max()]
    else:
        first, pair, _, probs = sc.exact(mode, parents)
        errs = [np.abs(probs @ first - sc.p1).max(),
                np.abs(np.tensordot(probs, pair, 1) - sc.p1[:, None] * sc.P2).max()]
    assert max(errs) < 1e-6, errs


def test_exact_tau_matches_formula():
    """Context-free chain: E[tokens per step] is (1 - a^(k+1)) / (1 - a), a = sum min(p, q)."""
    vocab, k = 5, 3
    rng = np.random.default_rng(3)
    p, q = normalize(rng.random(vocab)), normalize(rng.random(vocab))
    sc = Scenario(vocab, rng, p1=p, q1=q)
    sc.P2, sc.Q2 = np.tile(p, (vocab, 1)), np.tile(q, (vocab, 1))
    sc.p3, sc.q3 = p, q
    _, _, tau, probs = sc.exact("iid", (-1, 0, 1, 2))
    alpha = np.minimum(p, q).sum()
    assert abs(probs @ tau - accept.expected_tau(alpha, k)) < 1e-6
    assert accept.expected_tau(1.0, k) == k + 1
    assert abs(accept.expected_tau(0.0, k) - 1.0) < 1e-12


def test_exact_harness_catches_wrong_rules():
    """Negative controls: the harness flags verification rules that do not match the drafts."""
    vocab = 4
    rng = np.random.default_rng(11)
    sc = Scenario(vocab, rng)
    parents = (-1, 0, 0)
    # Siblings drawn without replacement but verified as if i.i.d.
    tokens, probs, drafts = enumerate_drafts(parents, "without_replacement",
                                             sc.draft_at(parents), vocab)
    first, _, _ = exact_walk("iid", parents, tokens, sc.targets(parents, tokens), drafts)
    assert np.abs(probs @ first - sc.p1).max() > 1e-3
    # A greedy-head draft (argmax of q) verified with the head's softmax as if it were sampled.
    tokens = np.array([[0, int(np.argmax(sc.q1))]])
    first, _, _ = exact_walk("iid", (-1, 0), tokens, sc.targets((-1, 0), tokens),
                             np.broadcast_to(sc.q1, (1, 2, vocab)))
    assert np.abs(first[0] - sc.p1).max() > 1e-2


# Padding, static vs dynamic ---------------------------------------------------------------------


def test_padding_nodes_are_ignored():
    """A tree with interleaved padding nodes walks exactly like its compact version."""
    rng = np.random.default_rng(4)
    compact = DraftTree(kit.random_parents(rng, 8))
    vocab, batch = 5, 64
    keep = np.array([0, 1, 2, 4, 5, 6, 8, 9], int)  # compact node i sits at padded slot keep[i]
    padded_parents = np.full(10, -1, np.int32)
    padded_parents[keep[1:]] = keep[np.asarray(compact.parents[1:])]
    padded_parents[[3, 7]] = [0, 2]  # padding with plausible-looking parents
    valid = np.zeros(10, bool)
    valid[keep] = True
    target = jax.nn.softmax(rng.normal(size=(batch, 8, vocab)).astype(np.float32))
    draft = jax.nn.softmax(rng.normal(size=(batch, 8, vocab)).astype(np.float32))
    tokens = rng.integers(0, vocab, (batch, 8)).astype(np.int32)
    u = rng.random((batch, 8)).astype(np.float32)

    def spread(x, fill):
        out = np.full((batch, 10) + x.shape[2:], fill, np.asarray(x).dtype)
        out[:, keep] = x
        return out
    parents_c, valid_c = compact.arrays(batch)
    mode = "without_replacement"  # the mode with the most state; the padding logic is shared
    a = WALK(tokens, parents_c, valid_c, target, draft, u, mode=mode)
    b = WALK(spread(tokens, 0), np.tile(padded_parents, (batch, 1)), np.tile(valid, (batch, 1)),
             spread(target, 0.2), spread(draft, 0.2), spread(u, 0.0), mode=mode)
    np.testing.assert_array_equal(keep[np.asarray(a.final_node)], b.final_node)
    np.testing.assert_allclose(a.residual, b.residual, atol=1e-7)
    assert not np.asarray(b.tried)[:, [3, 7]].any()
    assert len(set(np.asarray(a.final_node).tolist())) >= 3


def test_static_tree_equals_dynamic_arrays():
    rng = np.random.default_rng(5)
    tree = DraftTree.from_choices([(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)])
    batch, vocab = 8, 5
    logits = rng.normal(size=(batch, tree.num_nodes, vocab)).astype(np.float32)
    q = jax.nn.softmax(rng.normal(size=logits.shape).astype(np.float32))
    tokens = rng.integers(0, vocab, (batch, tree.num_nodes)).astype(np.int32)
    parents, _ = tree.arrays(batch)
    key = jax.random.PRNGKey(3)
    cfg = SamplingConfig(temperature=1.0)
    rule = jax.jit(accept.speculative_sampling, static_argnames=("parents", "config"))
    static = rule(key, tokens, tree, logits, q, cfg)  # a DraftTree is a static argument
    dynamic = jax.jit(accept.speculative_sampling, static_argnames="config")(
        key, tokens, parents, logits, q, cfg)
    np.testing.assert_array_equal(static.path, dynamic.path[:, :tree.max_depth + 1])
    np.testing.assert_array_equal(static.emitted, dynamic.emitted[:, :tree.max_depth + 1])
    assert np.all(np.asarray(dynamic.path[:, tree.max_depth + 1:]) == -1)
    with pytest.raises(ValueError, match="nodes"):
        accept.greedy(tokens[:, :3], tree, logits[:, :3])
    with pytest.raises(ValueError, match="siblings"):
        accept.speculative_sampling(key, tokens, tree, logits, q, cfg, siblings="sorted")


def test_result_layout_on_a_chain():
    """Hand-checked case: chain of 3, the first two drafts match the argmax, the third does not."""
    logits = np.full((1, 4, 5), -5.0, np.float32)
    for n, top in enumerate([2, 4, 1, 3]):
        logits[0, n, top] = 5.0
    tokens = np.array([[9, 2, 4, 0]], np.int32)
    result = jax.jit(accept.greedy, static_argnums=1)(tokens, DraftTree.chain(3), logits)
    np.testing.assert_array_equal(result.path, [[0, 1, 2, -1]])
    np.testing.assert_array_equal(result.num_accepted, [2])
    np.testing.assert_array_equal(result.next_token, [1])
    np.testing.assert_array_equal(result.emitted, [[2, 4, 1, -1]])


# Monte Carlo with the real jitted rules ---------------------------------------------------------

MC_SAMPLES = 200_000
MC_TREE = (-1, 0, 0, 0, 1, 1, 2)
MC_CASES = {  # name: (parents, rule, target sampling config)
    "ss_chain": ((-1, 0, 1), "iid", SamplingConfig(temperature=0.8, top_k=4)),
    "iid_tree": (MC_TREE, "iid", SamplingConfig(temperature=1.0)),
    "rrs_tree": (MC_TREE, "without_replacement", SamplingConfig(temperature=1.0, top_p=0.9)),
    "det_chain": ((-1, 0, 1), "deterministic", SamplingConfig(temperature=1.0)),
    "det_tree": (MC_TREE, "deterministic", SamplingConfig(temperature=0.7, min_p=0.05)),
}
MC_ALPHA = 1e-3 / (2 * len(MC_CASES))  # Bonferroni over the two tests of every case


def mc_first_two_tokens(parents, rule, config, vocab=5, seed=0, verify_as=None):
    """Samples (first, second) emitted tokens of one step (the second from a plain next-round
    draw when nothing was accepted), vmapped over ``MC_SAMPLES`` keys; drafts follow ``rule``,
    verification ``verify_as`` (default: the matching rule). Also returns the exact p1, pair."""
    verify_as = verify_as or rule
    rng = np.random.default_rng(seed)
    tree = DraftTree(parents)
    l1, l2, l3 = rng.normal(size=vocab), rng.normal(size=(vocab, vocab)), rng.normal(size=vocab)
    q1 = normalize(rng.random(vocab) * (np.arange(vocab) != 0) + 0.05 * (np.arange(vocab) != 0))
    q2 = normalize(rng.random((vocab, vocab)) + 0.02)
    q3 = normalize(rng.random(vocab))
    fixed = np.array([0, int(np.argmax(q1)), int(np.argmax(q1)), 3, 2, 2, 1][:tree.num_nodes])
    l1, l2, l3, q1, q2, q3 = (jnp.asarray(x, jnp.float32) for x in (l1, l2, l3, q1, q2, q3))

    def one(key):
        k_draft, k_verify, k_next = jax.random.split(key, 3)
        tokens = jnp.zeros(tree.num_nodes, jnp.int32)
        drafts = jnp.zeros((tree.num_nodes, vocab), jnp.float32)
        for v, kids in enumerate(tree.children):
            if not kids:
                continue
            q = [q1, q2[tokens[v]], q3][tree.depth[v]]
            kv, kids = jax.random.fold_in(k_draft, v), np.asarray(kids)
            if rule == "iid":
                draws = jax.random.categorical(kv, jnp.log(q), shape=(len(kids),))
            elif rule == "without_replacement":  # Gumbel top-k: sequential draws in order
                draws = jnp.argsort(-(jnp.log(q) + jax.random.gumbel(kv, (vocab,))))[:len(kids)]
            else:
                draws = jnp.asarray(fixed[kids])
            tokens, drafts = tokens.at[kids].set(draws), drafts.at[kids].set(q)
        logits = jnp.stack([[l1, l2[tokens[n]], l3][tree.depth[n]] for n in range(tree.num_nodes)])
        if verify_as == "deterministic":
            res = accept.deterministic(k_verify, tokens[None], tree, logits[None], config)
        else:
            res = accept.speculative_sampling(k_verify, tokens[None], tree, logits[None],
                                              drafts[None], config, siblings=verify_as)
        first = res.emitted[0, 0]
        second = jnp.where(res.num_accepted[0] >= 1, res.emitted[0, 1],
                           sample(k_next, l2[first], config))
        return first, second

    keys = jax.random.split(jax.random.PRNGKey(seed + 1), MC_SAMPLES)
    first, second = jax.jit(jax.vmap(one))(keys)
    p1 = np.asarray(processed_probs(l1, config), np.float64)
    pair = p1[:, None] * np.asarray(processed_probs(l2, config), np.float64)
    return np.asarray(first), np.asarray(second), p1, pair


@pytest.mark.parametrize("name", list(MC_CASES))
def test_monte_carlo_first_and_pair(name):
    parents, rule, config = MC_CASES[name]
    first, second, p1, pair = mc_first_two_tokens(parents, rule, config)
    vocab = p1.size
    p_first = token_chi_square_pvalue(first, p1)
    p_pair = token_chi_square_pvalue(first * vocab + second, pair.reshape(-1))
    assert p_first > MC_ALPHA and p_pair > MC_ALPHA, (p_first, p_pair)


def test_monte_carlo_detects_a_biased_rule():
    """Power check: siblings drawn without replacement but verified with the i.i.d. rule."""
    config = SamplingConfig(temperature=1.0)
    first, second, p1, pair = mc_first_two_tokens(MC_TREE, "without_replacement", config,
                                                  verify_as="iid")
    assert min(token_chi_square_pvalue(first, p1),
               token_chi_square_pvalue(first * p1.size + second, pair.reshape(-1))) < 1e-9
