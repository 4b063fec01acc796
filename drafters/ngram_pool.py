"""An n-gram pool on the device in static arrays (the store of lookahead decoding).

Each row of the batch owns a pool of n-grams ``(first, rest[0], ..., rest[N-2])``, bucketed by
their first token: bucket ``first % num_keys`` (``num_keys == vocab`` gives one bucket per
token; fewer buckets hash tokens together and the stored ``first`` token tells them apart).

Layout (axis glossary: B rows, K buckets, C capacity per bucket, N n-gram size, M n-grams):

* ``first int32[B, K, C]``: the first token of the n-gram in each slot (-1 when empty);
* ``rest int32[B, K, C, N-1]``: the other N-1 tokens (what is drafted after ``first``);
* ``size int32[B, K]``: occupied slots of each bucket, always ``<= C``.

A bucket is an ordered list, slot 0 the least recently inserted, slot ``size - 1`` the most
recent. Replacement policy (lookahead decoding's reference implementation, per bucket):

* inserting an n-gram already in the bucket moves it to the most recent slot (no duplicates);
* inserting a new n-gram into a bucket with room appends it;
* inserting a new n-gram into a full bucket evicts the oldest one (slot 0), FIFO;

so a bucket never holds more than C n-grams. :func:`lookup` returns the most recent n-grams
whose first token matches, newest first.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class NGramPool:
    """Per-row n-gram pools (see the module docstring for the layout and policy)."""

    first: jax.Array  # int32[B, K, C]
    rest: jax.Array  # int32[B, K, C, N-1]
    size: jax.Array  # int32[B, K]

    @property
    def num_keys(self) -> int:
        return self.first.shape[1]

    @property
    def capacity(self) -> int:
        return self.first.shape[2]

    @property
    def ngram(self) -> int:
        return self.rest.shape[3] + 1


def empty(batch: int, num_keys: int, capacity: int, ngram: int) -> NGramPool:
    """An empty pool of ``ngram``-grams: ``num_keys`` buckets of ``capacity`` slots per row."""
    if num_keys < 1 or capacity < 1 or ngram < 2:
        raise ValueError(f"need num_keys >= 1, capacity >= 1, ngram >= 2; got {num_keys}, "
                         f"{capacity}, {ngram}")
    return NGramPool(first=jnp.full((batch, num_keys, capacity), -1, jnp.int32),
                     rest=jnp.zeros((batch, num_keys, capacity, ngram - 1), jnp.int32),
                     size=jnp.zeros((batch, num_keys), jnp.int32))


def _insert_one(pool: NGramPool, gram: jax.Array, ok: jax.Array) -> NGramPool:
    """Inserts one n-gram per row: ``gram int32[B, N]`` where ``ok bool[B]``."""
    b = gram.shape[0]
    cap = pool.capacity
    rows = jnp.arange(b)
    first, rest = gram[:, 0], gram[:, 1:]
    bucket = jnp.mod(first, pool.num_keys)
    b_first = pool.first[rows, bucket]  # [B, C]
    b_rest = pool.rest[rows, bucket]  # [B, C, N-1]
    size = pool.size[rows, bucket]  # [B]
    slot = jnp.arange(cap, dtype=jnp.int32)[None, :]
    same = ((b_first == first[:, None]) & jnp.all(b_rest == rest[:, None, :], axis=-1)
            & (slot < size[:, None]))
    found = jnp.any(same, axis=1)
    # Removed slot r: the duplicate, else the oldest when full, else none (r = size).
    r = jnp.where(found, jnp.argmax(same, axis=1), jnp.where(size >= cap, 0, size))
    new_size = jnp.where(found | (size >= cap), size, size + 1)
    src = jnp.minimum(slot + (slot >= r[:, None]), cap - 1)  # close the gap left at r
    shifted_first = jnp.take_along_axis(b_first, src, axis=1)
    shifted_rest = jnp.take_along_axis(b_rest, src[:, :, None], axis=1)
    last = slot == (new_size - 1)[:, None]  # the new n-gram goes to the most recent slot
    live = slot < new_size[:, None]
    n_first = jnp.where(last, first[:, None], jnp.where(live, shifted_first, -1))
    n_rest = jnp.where(last[:, :, None], rest[:, None, :],
                       jnp.where(live[:, :, None], shifted_rest, 0))
    n_first = jnp.where(ok[:, None], n_first, b_first)
    n_rest = jnp.where(ok[:, None, None], n_rest, b_rest)
    new_size = jnp.where(ok, new_size, size)
    return NGramPool(first=pool.first.at[rows, bucket].set(n_first),
                     rest=pool.rest.at[rows, bucket].set(n_rest),
                     size=pool.size.at[rows, bucket].set(new_size))


def insert(pool: NGramPool, grams: jax.Array, mask: jax.Array) -> NGramPool:
    """Inserts n-grams in order (one after another, so later ones are more recent).

    Args:
      pool: the pools.
      grams: ``int32[B, M, N]`` n-grams (first token first).
      mask: ``bool[B, M]`` which of them to insert.
    """
    grams = jnp.asarray(grams, jnp.int32)
    if grams.shape[-1] != pool.ngram:
        raise ValueError(f"pool holds {pool.ngram}-grams, got {grams.shape[-1]}-grams")
    mask = jnp.asarray(mask, bool)

    def body(m, p):
        return _insert_one(p, grams[:, m], mask[:, m])

    return jax.lax.fori_loop(0, grams.shape[1], body, pool)


def insert_sequence(pool: NGramPool, tokens: jax.Array, start: jax.Array,
                    stop: jax.Array) -> NGramPool:
    """Inserts the n-grams of a token sequence that lie within ``[start, stop)``, in order.

    Args:
      tokens: ``int32[B, S]``.
      start, stop: ``int32[B]``; n-gram ``tokens[b, s:s+N]`` is inserted iff
        ``start[b] <= s`` and ``s + N <= stop[b]``.
    """
    n = pool.ngram
    s_len = tokens.shape[1]
    if s_len < n:
        return pool
    starts = jnp.arange(s_len - n + 1, dtype=jnp.int32)  # [M]
    grams = jnp.stack([tokens[:, j:j + s_len - n + 1] for j in range(n)], axis=-1)  # [B, M, N]
    mask = (start[:, None] <= starts[None]) & (starts[None] + n <= stop[:, None])
    return insert(pool, grams, mask)


def lookup(pool: NGramPool, first: jax.Array, count: int):
    """The ``count`` most recent n-grams starting with ``first``.

    Args:
      first: ``int32[B]``.
      count: static number of candidates.

    Returns:
      ``(rest int32[B, count, N-1], found bool[B, count])``, newest first; missing candidates
      have ``found`` False and zero tokens.
    """
    b = first.shape[0]
    cap = pool.capacity
    rows = jnp.arange(b)
    bucket = jnp.mod(first, pool.num_keys)
    b_first = pool.first[rows, bucket]  # [B, C]
    b_rest = pool.rest[rows, bucket]  # [B, C, N-1]
    size = pool.size[rows, bucket]
    slot = jnp.arange(cap, dtype=jnp.int32)[None, :]
    match = (b_first == first[:, None]) & (slot < size[:, None])
    # Newest first: sort matching slots by descending slot index.
    score = jnp.where(match, slot, -1)
    if count == 0:
        return jnp.zeros((b, 0, pool.ngram - 1), jnp.int32), jnp.zeros((b, 0), bool)
    k = min(count, cap)
    top, idx = jax.lax.top_k(score, k)
    rest = jnp.take_along_axis(b_rest, idx[:, :, None], axis=1)
    found = top >= 0
    rest = jnp.where(found[:, :, None], rest, 0)
    if k < count:
        rest = jnp.concatenate([rest, jnp.zeros((b, count - k, pool.ngram - 1), jnp.int32)], 1)
        found = jnp.concatenate([found, jnp.zeros((b, count - k), bool)], axis=1)
    return rest, found
