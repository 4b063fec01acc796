"""Lookahead decoding through the speculative loop.

* the proposal (tokens, parents, valid, depth and the [T, T] mask) equals a slow Python
  construction for random W, N, G and pools (empty pools included), and the one forward under
  that mask gives every node the logits of a teacher-forced forward over the sequence it stands
  for;
* round by round, the drafter's window, pool and accepted counts equal a plain-Python lookahead
  decoder that runs one full forward per sequence (ragged batch);
* greedy output equals plain decoding (ragged batch and single rows, degenerate settings:
  window 1, N = 2, G = 0 / 1, empty pool);
* sampled output has exactly the target's joint distribution (chi-square).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tinymodels as kit
from drafters import lookahead, ngram_pool
from specjax import masks, tree as tree_lib
from specjax.decode import DecodeConfig
from specjax.drafter import DraftContext
from specjax.prompts import make_prompt_batch
from specjax.sampling import SamplingConfig
from specjax.speculative import SpecConfig, SpecLoop, speculative_generate
from sequence_kit import SEQ_LEN, chi_square_pvalue, counts_of, exact_joint, seq_tiny_model
from tinymodels import PROMPTS, rows_of

VOCAB = kit.SMALL_VOCAB  # small_vocab_target's vocabulary (conftest.py)
SEQ_ROWS, SEQ_SLOTS = 12288, 32  # sampled rows and cache slots of the distribution test


# The proposal against a slow construction ------------------------------------------------------


def _slow_proposal(w, n, g, pending, cands, levels):
    """One row's proposal, node by node. ``cands``: pool n-grams (newest first, as lists)."""
    t = 1 + (w + g) * (n - 1)
    tokens, parents, valid = [pending], [-1], [True]
    depth, seen = [0], [{0}]  # seen: nodes each node attends to
    node_of = {}  # (d, j) -> node index, for the canonical (kept) trie nodes
    for d in range(1, n):
        for j in range(g):
            index = len(tokens)
            first = next((k for k in range(len(cands)) if cands[k][:d] == cands[j][:d]),
                         None) if j < len(cands) else None
            if first == j:
                par = 0 if d == 1 else node_of[(d - 1, min(
                    k for k in range(len(cands)) if cands[k][:d - 1] == cands[j][:d - 1]))]
                node_of[(d, j)] = index
                tokens.append(cands[j][d - 1]), parents.append(par), valid.append(True)
                seen.append(seen[par] | {index})
            else:
                tokens.append(0), parents.append(-1), valid.append(False)
                seen.append({index})
            depth.append(d)
    look = {}
    for lev in range(n - 1):
        for i in range(w):
            look[(lev, i)] = len(tokens)
            tokens.append(levels[lev][i]), parents.append(-1), valid.append(False)
            depth.append(lev + 1 + i)
            seen.append(None)
    for (lev, i), index in look.items():
        # The guessed sequence at offsets 1 .. lev + 1 + i: level 0 left of column i, then
        # column i from level 0 up to lev.
        trajectory = [look[(0, o - 1)] if o <= i else look[(o - i - 1, i)]
                      for o in range(1, lev + 2 + i)]
        assert trajectory[-1] == index
        seen[index] = {0, *trajectory}
    visible = np.zeros((t, t), bool)
    for a, s in enumerate(seen):
        visible[a, sorted(s)] = True
    assert len(tokens) == t
    return (np.array(tokens), np.array(parents), np.array(valid), np.array(depth), visible)


def _random_case(rng, w, n, g, batch):
    """Pools whose buckets for each row's pending token hold n-grams with shared prefixes."""
    d = n - 1
    pool = ngram_pool.empty(batch, VOCAB, max(g, 1) + 1, n)
    pending = rng.integers(0, VOCAB, batch)
    grams, mask = [], []
    for b in range(batch):
        row = []
        for _ in range(rng.integers(0, 2 * g + 2)):  # sometimes none: an empty bucket
            rest = rng.integers(0, 2, d)  # a 2-letter alphabet: prefixes collide often
            first = pending[b] if rng.random() < 0.8 else rng.integers(0, VOCAB)
            row.append([first, *rest])
        grams.append(row)
    m = max(1, max(len(r) for r in grams))
    arr = np.zeros((batch, m, n), np.int32)
    mask = np.zeros((batch, m), bool)
    for b, row in enumerate(grams):
        if row:
            arr[b, :len(row)] = row
            mask[b, :len(row)] = True
    pool = ngram_pool.insert(pool, jnp.asarray(arr), jnp.asarray(mask))
    refs = []
    for b, row in enumerate(grams):
        ref = kit.RefPool(VOCAB, max(g, 1) + 1)
        for gram in row:
            ref.insert(list(map(int, gram)))
        refs.append(ref)
    levels = rng.integers(0, VOCAB, (batch, n - 1, w)).astype(np.int32)
    return pool, refs, jnp.asarray(pending, jnp.int32), levels


def _state(pool, levels, batch):
    return lookahead.LookaheadState(levels=jnp.asarray(levels), fill=jnp.ones((batch,), jnp.int32),
                                    pool=pool, hist_len=jnp.zeros((batch,), jnp.int32))


def _ctx(pending):
    return DraftContext(target_params=None, cache=None, history=None, history_len=None,
                        pending=pending, pending_hidden=None, done=None)


@functools.partial(jax.jit, static_argnums=0)
def _propose(drafter, state, pending):
    return drafter.propose(None, state, _ctx(pending), None)[0]


@pytest.mark.parametrize("seed", range(5))
def test_proposal_matches_slow_construction(small_vocab_target, seed):
    rng = np.random.default_rng(seed)
    w, n, g = int(rng.integers(1, 5)), int(rng.integers(2, 5)), int(rng.integers(0, 5))
    if seed == 0:
        w, n, g = 1, 2, 1
    batch = 3
    model, _ = small_vocab_target
    drafter = lookahead.LookaheadDrafter(model, window=w, ngram=n, guess_set=g,
                                         pool_capacity=max(g, 1) + 1)
    t = drafter.num_nodes
    assert drafter.tree.num_nodes == t
    assert drafter.tree.max_depth == (n - 1 if g else 1)
    for _ in range(4):  # several pools, one compilation
        pool, refs, pending, levels = _random_case(rng, w, n, g, batch)
        proposal = _propose(drafter, _state(pool, levels, batch), pending)
        assert proposal.tokens.shape == (batch, t)
        for b in range(batch):
            cands = [list(c) for c in refs[b].lookup(int(pending[b]), g)]
            want = _slow_proposal(w, n, g, int(pending[b]), cands, levels[b].tolist())
            got = (proposal.tokens[b], proposal.parents[b], proposal.valid[b],
                   proposal.depth[b], proposal.visible[b])
            for name, x, y in zip(("tokens", "parents", "valid", "depth", "visible"), got, want):
                np.testing.assert_array_equal(np.asarray(x), y,
                                              err_msg=f"{name} (w={w} n={n} g={g})")
            # Candidate nodes see exactly their ancestors (the contract).
            vis = tree_lib.visibility_from_parents(proposal.parents[b:b + 1],
                                                   proposal.valid[b:b + 1])
            real = np.asarray(proposal.valid[b])
            np.testing.assert_array_equal(np.asarray(vis[0])[real], want[4][real])


def test_one_forward_gives_every_node_its_sequence(small_vocab_target):
    """Under the combined mask each node's logits are those of the sequence it stands for."""
    model, params = small_vocab_target
    rng = np.random.default_rng(11)
    w, n, g, batch = 3, 4, 3, 2
    drafter = lookahead.LookaheadDrafter(model, window=w, ngram=n, guess_set=g)
    pool, _, pending, levels = _random_case(rng, w, n, g, batch)
    proposal = _propose(drafter, _state(pool, levels, batch), pending)
    prompts = [[5, 9, 2, 7], [3, 3, 8]]
    batch_p = make_prompt_batch(prompts)
    slots = 64
    cache = model.init_cache(batch, slots)
    p = batch_p.tokens.shape[1]
    cache = kit.forward(model, params, batch_p.tokens, jnp.broadcast_to(jnp.arange(p), (batch, p)),
                        cache, masks.causal_mask(cache.lengths, p, slots)).cache
    cache = cache.replace(lengths=batch_p.lengths)
    positions = tree_lib.positions(cache.lengths, proposal.depth)
    out = kit.forward(model, params, proposal.tokens, positions, cache,
                      masks.block_mask(cache.lengths, proposal.visible, slots))
    tokens, visible = np.asarray(proposal.tokens), np.asarray(proposal.visible)
    depth, valid = np.asarray(proposal.depth), np.asarray(proposal.valid)
    seqs, where = [], []
    for b in range(batch):
        for node in range(drafter.num_nodes):
            if node > drafter.num_verify or valid[b, node]:
                seen = sorted(np.flatnonzero(visible[b, node]), key=lambda x: depth[b, x])
                assert [depth[b, x] for x in seen] == list(range(depth[b, node] + 1))
                seqs.append(prompts[b] + tokens[b, seen].tolist())
                where.append((b, node))
    width = max(map(len, seqs))
    full = np.array([s + [0] * (width - len(s)) for s in seqs], np.int32)
    ref = np.asarray(kit.full_forward(model, params, full).logits)
    got = np.asarray(out.logits)
    for k, (b, node) in enumerate(where):
        np.testing.assert_allclose(got[b, node], ref[k, len(seqs[k]) - 1], atol=2e-4)


# Round by round against a plain-Python lookahead decoder ---------------------------------------


class SlowLookahead:
    """One row of lookahead decoding with a teacher-forced forward per sequence."""

    def __init__(self, w, n, g, cap, history_ngrams, prompt, first, levels):
        self.w, self.n, self.g, self.history_ngrams = w, n, g, history_ngrams
        self.seq, self.prompt_len = list(prompt) + [first], len(prompt)
        self.levels, self.fill = [list(x) for x in levels], 1
        self.pool = kit.RefPool(VOCAB, cap)
        if history_ngrams:
            for s in range(len(self.seq) - n + 1):
                self.pool.insert(self.seq[s:s + n])

    def round(self, predict, max_new):
        w, n, seq = self.w, self.n, self.seq
        cands = [list(c) for c in self.pool.lookup(seq[-1], self.g)]
        look_seqs = [seq + [self.levels[0][c] for c in range(i)]
                     + [self.levels[m][i] for m in range(self.fill)] for i in range(w)]
        verify_seqs = [seq + c for c in cands] or [list(seq)]
        preds = predict(look_seqs + verify_seqs)  # argmax after every prefix of each sequence
        look_pred = [p[-1] for p in preds[:w]]
        best, emitted = -1, None
        for c, p in zip(cands or [[]], preds[w:]):
            a = 0
            while a < len(c) and c[a] == p[len(seq) - 1 + a]:
                a += 1
            if a > best:
                best, emitted = a, c[:a] + [p[len(seq) - 1 + a]]
        old_len = len(seq)
        self.seq = (seq + emitted)[:self.prompt_len + max_new]  # the loop truncates too
        if self.fill == n - 1:
            for i in range(w):
                self.pool.insert([self.levels[m][i] for m in range(n - 1)] + [look_pred[i]])
            self.levels = self.levels[1:] + [look_pred]
        else:
            self.levels[self.fill] = look_pred
            self.fill += 1
        if self.history_ngrams:
            for s in range(max(0, old_len - n + 1), len(self.seq) - n + 1):
                self.pool.insert(self.seq[s:s + n])
        return best


def _pool_lists(pool, b):
    size = np.asarray(pool.size[b])
    first, rest = np.asarray(pool.first[b]), np.asarray(pool.rest[b])
    return {k: [(int(first[k, s]), tuple(rest[k, s].tolist())) for s in range(size[k])]
            for k in range(pool.num_keys) if size[k]}


@pytest.mark.parametrize("w,n,g,history", [(3, 3, 2, False), (2, 4, 3, True)])
def test_rounds_match_slow_lookahead(small_vocab_target, small_vocab_reference, w, n, g,
                                     history):
    model, params = small_vocab_target
    _, reference = small_vocab_reference
    max_new = 20
    rows = [0, 3, 1]
    prompts = [PROMPTS[i] for i in rows]
    drafter = lookahead.LookaheadDrafter(model, window=w, ngram=n, guess_set=g,
                                         history_ngrams=history)
    config = DecodeConfig(max_new_tokens=max_new)
    loop = SpecLoop(model, drafter, config, SpecConfig())
    state = loop.jit_start(params, None, make_prompt_batch(prompts), jax.random.key(0), 64)
    width = 48

    def predict(seqs):
        full = np.zeros((len(seqs), width), np.int32)
        for k, s in enumerate(seqs):
            full[k, :len(s)] = s
        top = np.argmax(np.asarray(kit.full_forward(model, params, full).logits), -1)
        return [top[k, :len(s)].tolist() for k, s in enumerate(seqs)]

    slow = [SlowLookahead(w, n, g, drafter.capacity, history, p, int(state.pending[b]),
                          np.asarray(state.drafter_state.levels[b]).tolist())
            for b, p in enumerate(prompts)]
    total = 0
    while not bool(jnp.all(state.done)):
        live = ~np.asarray(state.done)
        before = int(state.stats.accepted)
        state = loop.jit_round(params, None, state)
        want = sum(s.round(predict, max_new) for s, ok in zip(slow, live) if ok)
        assert int(state.stats.accepted) - before == want
        total += want
        ds = state.drafter_state
        for b, s in enumerate(slow):
            assert np.asarray(ds.levels[b]).tolist() == s.levels
            assert int(ds.fill[b]) == s.fill
            assert _pool_lists(ds.pool, b) == s.pool.buckets
    for b, s in enumerate(slow):
        got = np.asarray(state.out_tokens[b, :state.out_len[b]]).tolist()
        assert got == s.seq[len(prompts[b]):] == reference[rows[b]][:max_new]  # no EOS there
    assert total > 0


# Greedy equivalence ---------------------------------------------------------------------------

# test_rounds_match_slow_lookahead covers (3, 3, 2) and (2, 4, 3, history) on single rows of a
# ragged batch; these add EOS, a batch of 4 and the degenerate settings.
GREEDY_CASES = {  # (W, N, G, history_ngrams)
    "w1_n2_g1": (1, 2, 1, False),  # the smallest window / n-gram
    "w4_n3_g0": (4, 3, 0, False),  # no verification branch: one token per round
    "w5_n5_g1_hist": (5, 5, 1, True),
}


@pytest.mark.parametrize("name", list(GREEDY_CASES))
def test_greedy_equals_plain_decoding(small_vocab_target, small_vocab_reference, name):
    model, params = small_vocab_target
    config, reference = small_vocab_reference
    w, n, g, history = GREEDY_CASES[name]
    drafter, dparams = lookahead.make(model, window=w, ngram=n, guess_set=g,
                                      history_ngrams=history)
    out = speculative_generate(model, params, drafter, dparams, PROMPTS, config)
    assert rows_of(out) == reference
    if g == 0:
        assert int(out.stats.accepted) == 0 and int(out.stats.drafted) == 0
    else:
        assert int(out.stats.accepted) > 0


def test_greedy_single_rows(small_vocab_target, small_vocab_reference):
    model, params = small_vocab_target
    config, reference = small_vocab_reference
    drafter, dparams = lookahead.make(model, window=3, ngram=3, guess_set=2, history_ngrams=True)
    for i in (1, 3):  # same padded prompt shape: one compilation
        out = speculative_generate(model, params, drafter, dparams, [PROMPTS[i]], config)
        assert rows_of(out) == [reference[i]]


def test_configuration_errors(small_vocab_target):
    model, _ = small_vocab_target
    for kwargs, match in (({"window": 0}, "window"), ({"ngram": 1}, "ngram"),
                          ({"guess_set": -1}, "guess_set")):
        with pytest.raises(ValueError, match=match):
            lookahead.make(model, **kwargs)
    other, _ = kit.tiny_model("llama", vocab_size=VOCAB, seed=1, num_layers=2)
    with pytest.raises(ValueError, match="target"):
        lookahead.make(other)[0].check_compatible(model)


# Sampling: deterministic-draft verification is exact -------------------------------------------


def test_sampled_sequence_distribution_is_exact():
    sampling = SamplingConfig(temperature=1.0)
    model, params = seq_tiny_model()
    # The prompt holds the target's likely continuations, so pooled n-grams are often accepted
    # and the test has power.
    prompt = [3, 1, 4, 1, 5, 7, 2, 5, 7, 2]
    drafter, dparams = lookahead.make(model, window=2, ngram=3, guess_set=2, sampling=sampling,
                                      history_ngrams=True)
    config = DecodeConfig(max_new_tokens=SEQ_LEN, sampling=sampling, num_slots=SEQ_SLOTS)
    out = speculative_generate(model, params, drafter, dparams, [prompt] * SEQ_ROWS, config,
                               key=jax.random.key(5))
    assert (np.asarray(out.lengths) == SEQ_LEN).all()
    assert int(out.stats.accepted) > SEQ_ROWS // 4
    seqs, joint = exact_joint(model, params, sampling, prompt)
    # Bonferroni over the 3 distribution tests (2 in test_jacobi.py).
    assert chi_square_pvalue(seqs, joint, counts_of(out.tokens), SEQ_ROWS) > 1e-3 / 3
