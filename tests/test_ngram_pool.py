"""The on-device n-gram pool against a plain Python reference: insertion order, duplicate
refresh, FIFO eviction per bucket, capacity, hashed buckets and newest-first lookup."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tinymodels as kit
from drafters import ngram_pool


def _check_same(pool, refs, vocab, count):
    size = np.asarray(pool.size)
    assert (size <= pool.capacity).all() and (size >= 0).all()
    first_arr, rest_arr = np.asarray(pool.first), np.asarray(pool.rest)
    for b, ref in enumerate(refs):
        for k in range(pool.num_keys):
            want = ref.buckets.get(k, [])
            assert size[b, k] == len(want)
            got = [(int(first_arr[b, k, s]), tuple(rest_arr[b, k, s].tolist()))
                   for s in range(size[b, k])]
            assert got == want
            assert (first_arr[b, k, size[b, k]:] == -1).all()
    firsts = jnp.arange(vocab, dtype=jnp.int32)
    for b, ref in enumerate(refs):
        rows = jax.tree.map(lambda x: jnp.repeat(x[b:b + 1], vocab, axis=0), pool)
        rest, found = _lookup(rows, firsts, count)
        rest, found = np.asarray(rest), np.asarray(found)
        for tok in range(vocab):
            want = ref.lookup(tok, count)
            assert found[tok].sum() == len(want)
            assert found[tok, :len(want)].all()
            assert [tuple(r) for r in rest[tok, :len(want)].tolist()] == want


_insert = jax.jit(ngram_pool.insert)
_lookup = jax.jit(ngram_pool.lookup, static_argnames="count")


@pytest.mark.parametrize("vocab,num_keys,capacity,n", [(6, 6, 3, 3), (9, 4, 2, 2), (5, 5, 1, 4)],
                         ids=["exact_keys", "hashed", "capacity1"])
def test_random_streams_match_reference(vocab, num_keys, capacity, n):
    rng = np.random.default_rng(vocab * 100 + capacity)
    batch, per_step, steps = 3, 4, 25
    pool = ngram_pool.empty(batch, num_keys, capacity, n)
    refs = [kit.RefPool(num_keys, capacity) for _ in range(batch)]
    for step in range(steps):
        # Small alphabet per step so duplicates (refresh) and evictions both happen often.
        grams = rng.integers(0, vocab, (batch, per_step, n))
        grams[:, :, 1:] %= 2
        mask = rng.random((batch, per_step)) < 0.8
        pool = _insert(pool, jnp.asarray(grams, jnp.int32), jnp.asarray(mask))
        for b in range(batch):
            for m in range(per_step):
                if mask[b, m]:
                    refs[b].insert(grams[b, m].tolist())
        if step % 6 == 5 or step == steps - 1:
            _check_same(pool, refs, vocab, count=capacity + 1)


def test_insert_sequence_and_empty_lookup():
    pool = ngram_pool.empty(2, 7, 2, 3)
    rest, found = ngram_pool.lookup(pool, jnp.array([1, 2], jnp.int32), 3)
    assert not np.asarray(found).any() and rest.shape == (2, 3, 2)
    tokens = jnp.array([[1, 2, 3, 1, 2, 4, 1, 2, 3, 0], [5, 5, 5, 5, 6, 0, 0, 0, 0, 0]], jnp.int32)
    pool = ngram_pool.insert_sequence(pool, tokens, jnp.array([0, 1], jnp.int32),
                                      jnp.array([9, 5], jnp.int32))
    refs = [kit.RefPool(7, 2), kit.RefPool(7, 2)]
    for gram in ([1, 2, 3], [2, 3, 1], [3, 1, 2], [1, 2, 4], [2, 4, 1], [4, 1, 2], [1, 2, 3]):
        refs[0].insert(gram)
    for gram in ([5, 5, 5], [5, 5, 6]):  # start=1: the n-gram at 0 is skipped
        refs[1].insert(gram)
    _check_same(pool, refs, 7, count=2)
    # Most recent first: (1, 2, 3) was refreshed after (1, 2, 4).
    rest, found = ngram_pool.lookup(pool, jnp.array([1, 5], jnp.int32), 2)
    assert np.asarray(rest[0]).tolist() == [[2, 3], [2, 4]]
    assert np.asarray(rest[1]).tolist() == [[5, 6], [5, 5]]
    assert np.asarray(found).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="ngram"):
        ngram_pool.empty(1, 4, 2, 1)
    pool = ngram_pool.empty(1, 4, 2, 3)
    with pytest.raises(ValueError, match="3-grams"):
        ngram_pool.insert(pool, jnp.zeros((1, 2, 4), jnp.int32), jnp.ones((1, 2), bool))
