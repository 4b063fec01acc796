"""Attention visibility masks over the cache: ``mask[b, t, s]`` is True when query ``t`` of row
``b`` may attend to cache slot ``s``.

A forward pass writes its ``T`` new tokens at slots ``lengths[b] + t`` before attending, so every
mask below describes the cache *after* that write. One formula covers prefill (``lengths = 0``,
causal block), plain decoding (``T = 1``), chains, trees and Jacobi/lookahead windows:

    visible(b, t, s) = s < lengths[b]                                   (committed prefix)
                    or 0 <= s - lengths[b] < T and block[b, t, s - lengths[b]]   (new block)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def block_mask(lengths: jax.Array, block: jax.Array, num_slots: int) -> jax.Array:
    """Visibility over the cache for a block of new tokens.

    Args:
      lengths: ``int32[B]`` committed length per row (the block starts there).
      block: ``bool[T, T]`` or ``bool[B, T, T]``; ``block[t, u]`` lets new token ``t`` see new
        token ``u`` (for a tree: ``u`` is an ancestor-or-self of ``t``).
      num_slots: ``S``.

    Returns:
      ``bool[B, T, S]``.
    """
    lengths = jnp.asarray(lengths, jnp.int32)
    block = jnp.asarray(block, bool)
    if block.ndim == 2:
        block = jnp.broadcast_to(block[None], (lengths.shape[0],) + block.shape)
    num_new = block.shape[-1]
    slots = jnp.arange(num_slots, dtype=jnp.int32)[None, :]
    rel = slots - lengths[:, None]  # [B, S]
    prefix = rel < 0
    in_block = (rel >= 0) & (rel < num_new)
    rel_c = jnp.clip(rel, 0, num_new - 1)  # [B, S]
    from_block = jnp.take_along_axis(
        block, jnp.broadcast_to(rel_c[:, None, :], block.shape[:2] + (num_slots,)), axis=2)
    return prefix[:, None, :] | (in_block[:, None, :] & from_block)


def causal_block(num_new: int) -> np.ndarray:
    """``bool[T, T]`` lower-triangular block: token ``t`` sees new tokens ``0..t``."""
    return np.tril(np.ones((num_new, num_new), bool))


def causal_mask(lengths: jax.Array, num_new: int, num_slots: int) -> jax.Array:
    """``bool[B, T, S]`` for ``T`` consecutive new tokens appended at ``lengths``."""
    return block_mask(lengths, causal_block(num_new), num_slots)
