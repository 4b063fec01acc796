"""Static-shaped key/value cache with a committed length per row.

Axis glossary (used across specjax): B batch rows, T new (query) tokens, S cache slots,
L layers, K kv heads, D head dim, E embedding width, V vocabulary, N selected nodes.

Invariants
----------
* ``k`` and ``v`` are ``[L, B, K, S, D]``; ``lengths`` is ``int32[B]``.
* Slots ``[0, lengths[b])`` of row ``b`` hold the keys/values of the committed tokens, in order.
  Slots at or beyond ``lengths[b]`` are scratch: masked by every reader, freely overwritten.
* A model forward writes its ``T`` new entries at slots ``lengths[b] + t`` and never advances
  ``lengths``; only :func:`advance`, :func:`set_lengths` and :func:`compact` change it.
* Writes use ``mode="drop"`` scatters: an out-of-range write is dropped, never clamped onto a
  valid slot. The entry points (``generate``, ``speculative_generate``) check on the host that
  ``prompt + max_new_tokens + lookahead <= S`` before anything runs, so a drop cannot happen in
  a validated run; :func:`check_capacity` is that check.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class KVCache:
    """Keys and values of every layer plus the committed length of each row."""

    k: jax.Array  # [L, B, K, S, D]
    v: jax.Array  # [L, B, K, S, D]
    lengths: jax.Array  # int32[B]

    @classmethod
    def init(cls, num_layers: int, batch: int, num_kv_heads: int, num_slots: int,
             head_dim: int, dtype=jnp.float32) -> "KVCache":
        shape = (num_layers, batch, num_kv_heads, num_slots, head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   lengths=jnp.zeros((batch,), jnp.int32))

    @property
    def num_slots(self) -> int:
        return self.k.shape[3]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]


class CacheCapacityError(ValueError):
    """A request needs more cache slots than the cache has."""


def check_capacity(needed: int, num_slots: int, what: str = "this request") -> None:
    """Raises :class:`CacheCapacityError` if ``needed`` slots do not fit in ``num_slots``."""
    if needed > num_slots:
        raise CacheCapacityError(
            f"{what} needs {needed} cache slots but the cache has {num_slots}: shorten the "
            f"prompt, lower max_new_tokens / the draft length, or raise num_slots (the cache "
            f"size; 0 picks one that fits).")


def write_layer(layer_kv: jax.Array, new: jax.Array, offsets: jax.Array) -> jax.Array:
    """Writes ``new`` at slots ``offsets[b] + t`` of one layer's keys or values.

    Args:
      layer_kv: ``[B, K, S, D]`` keys (or values) of one layer.
      new: ``[B, T, K, D]`` entries to write.
      offsets: ``int32[B]`` first slot of each row's block (normally ``lengths``).

    Returns:
      The updated ``[B, K, S, D]`` array. Writes beyond ``S`` are dropped, never clamped.
    """
    batch, num_new = new.shape[:2]
    slots = offsets[:, None] + jnp.arange(num_new, dtype=jnp.int32)[None, :]  # [B, T]
    rows = jnp.broadcast_to(jnp.arange(batch)[:, None], slots.shape)
    # Advanced indices (rows, slots) on axes 0 and 2 put the [B, T] index dims first: [B, T, K, D].
    return layer_kv.at[rows, :, slots].set(new.astype(layer_kv.dtype), mode="drop")


def write(kv: jax.Array, layer: int | jax.Array, new: jax.Array, offsets: jax.Array) -> jax.Array:
    """Writes ``new`` at slots ``offsets[b] + t`` of layer ``layer`` of a full ``[L, B, K, S, D]``
    key (or value) array, in place when the buffer is donated or carried by a loop.

    Args:
      kv: ``[L, B, K, S, D]``.
      layer: static or traced layer index.
      new: ``[B, T, K, D]``.
      offsets: ``int32[B]``.
    """
    batch, num_new = new.shape[:2]
    slots = offsets[:, None] + jnp.arange(num_new, dtype=jnp.int32)[None, :]  # [B, T]
    rows = jnp.broadcast_to(jnp.arange(batch)[:, None], slots.shape)
    # (layer, rows, :, slots): the advanced index dims come first, so the target is [B, T, K, D].
    return kv.at[layer, rows, :, slots].set(new.astype(kv.dtype), mode="drop")


def set_lengths(cache: KVCache, lengths: jax.Array) -> KVCache:
    """Rolls back (or forward) each row's committed length. Slots past it become scratch."""
    return cache.replace(lengths=jnp.asarray(lengths, jnp.int32))


def advance(cache: KVCache, num_new: jax.Array) -> KVCache:
    """Commits ``num_new[b]`` entries already written at ``lengths[b]...`` (a chain's prefix)."""
    return cache.replace(lengths=cache.lengths + jnp.asarray(num_new, jnp.int32))


def compact(cache: KVCache, src_slots: jax.Array, num_new: jax.Array) -> KVCache:
    """Moves a set of scratch entries into contiguous committed slots and commits them.

    For each row ``b`` and ``i < num_new[b]``, slot ``lengths[b] + i`` receives the entry at slot
    ``src_slots[b, i]`` (in every layer), then ``lengths[b] += num_new[b]``. This is how an
    accepted tree path is committed: its nodes were written at ``lengths + node`` by the
    verification forward. All reads happen before any write, so overlapping moves are safe.

    Args:
      cache: the cache after the verification forward.
      src_slots: ``int32[B, N]`` absolute source slots; entries ``i >= num_new[b]`` are ignored.
      num_new: ``int32[B]`` number of entries to commit per row (``<= N``).
    """
    num_layers, batch, num_kv, num_slots, head_dim = cache.k.shape
    count = src_slots.shape[1]
    idx = jnp.arange(count, dtype=jnp.int32)[None, :]
    valid = idx < num_new[:, None]
    src = jnp.clip(src_slots, 0, num_slots - 1)
    rows = jnp.broadcast_to(jnp.arange(batch)[:, None], src.shape)
    # Invalid entries are sent past the end and dropped.
    dst = jnp.where(valid, cache.lengths[:, None] + idx, num_slots)

    def move(kv):  # [L, B, K, S, D]
        # Advanced indices on axes 1 and 3 are split by a slice, so their dims come first:
        # both the gathered values and the scatter target are [B, N, L, K, D].
        moved = kv[:, rows, :, src]
        return kv.at[:, rows, :, dst].set(moved, mode="drop")

    return cache.replace(k=move(cache.k), v=move(cache.v),
                         lengths=cache.lengths + jnp.asarray(num_new, jnp.int32))
