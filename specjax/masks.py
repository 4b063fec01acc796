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
from flax import struct


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


@struct.dataclass
class TreeMask:
    """The structured form of :func:`block_mask`: what a kernel needs instead of ``bool[B, T, S]``.

    ``dense()`` is exactly ``block_mask(lengths, visible, num_slots)``: row ``b``'s query ``t``
    sees the committed slots ``s < lengths[b]`` and the new slots ``lengths[b] + j`` (``j < T``,
    inside the cache) where ``visible[b, t, j]``. Passing this instead of the dense mask lets a
    model use the tree-attention kernel (``specjax.kernels.tree_attention``), which builds the
    mask inside the kernel from these ``B + B*T*T`` values instead of reading ``B*T*S``.
    """

    lengths: jax.Array  # int32[B] committed length per row (the block starts there)
    visible: jax.Array  # bool[B, T, T] visibility among the new tokens
    num_slots: int = struct.field(pytree_node=False)  # S

    @classmethod
    def create(cls, lengths: jax.Array, visible: jax.Array, num_slots: int) -> "TreeMask":
        """Accepts ``visible`` as ``bool[T, T]`` (shared by every row) or ``bool[B, T, T]``."""
        lengths = jnp.asarray(lengths, jnp.int32)
        visible = jnp.asarray(visible, bool)
        if lengths.ndim != 1:
            raise ValueError(f"lengths must be int32[B], got shape {lengths.shape}")
        if visible.ndim == 2:
            visible = jnp.broadcast_to(visible[None], (lengths.shape[0],) + visible.shape)
        if visible.ndim != 3 or visible.shape[0] != lengths.shape[0] or \
                visible.shape[1] != visible.shape[2]:
            raise ValueError(f"visible must be bool[T, T] or bool[B, T, T] with B = "
                             f"{lengths.shape[0]}, got shape {visible.shape}")
        if num_slots < 1:
            raise ValueError(f"num_slots must be positive, got {num_slots}")
        return cls(lengths=lengths, visible=visible, num_slots=int(num_slots))

    @property
    def num_new(self) -> int:
        """``T``."""
        return self.visible.shape[-1]

    def dense(self) -> jax.Array:
        """``bool[B, T, S]``, equal to ``block_mask(lengths, visible, num_slots)``."""
        return block_mask(self.lengths, self.visible, self.num_slots)

    def first(self, num_new: int) -> "TreeMask":
        """The mask of the first ``num_new`` new tokens alone (e.g. a root-only forward)."""
        return self.replace(visible=self.visible[:, :num_new, :num_new])
