"""The contract between specjax and a language model (implemented in ``models/``).

specjax never imports a concrete model: decoding loops and drafters receive an object that
satisfies :class:`LanguageModel`. Such an object is a frozen, hashable dataclass of static
configuration (it is passed to ``jax.jit`` as a static argument); all arrays go in ``params``.
"""

from __future__ import annotations

from typing import Optional, Protocol, Sequence

import jax
from flax import struct

from specjax.cache import KVCache


@struct.dataclass
class ForwardOutput:
    """What one forward pass returns.

    Attributes:
      logits: float32 ``[B, T, V]`` (or ``[B, N, V]`` when ``logits_at`` selected N positions).
      hidden: ``[B, T, E]`` final hidden states (after the final norm: what the LM head sees).
      cache: the cache with the T new entries written at ``lengths + t``; lengths unchanged.
      taps: ``[n, B, T, E]`` residual stream after each requested layer (``hidden_layers``), or
        None.
    """

    logits: jax.Array
    hidden: jax.Array
    cache: KVCache
    taps: Optional[jax.Array] = None


class LanguageModel(Protocol):
    """A causal LM applied purely: ``forward(params, tokens, positions, cache, mask)``."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def num_layers(self) -> int: ...

    @property
    def hidden_size(self) -> int: ...

    @property
    def max_positions(self) -> int:
        """The context the model was trained for (positions ``0 .. max_positions - 1``): the
        loops refuse a prompt plus ``max_new_tokens`` beyond it."""
        ...

    def init_cache(self, batch: int, num_slots: int) -> KVCache: ...

    def forward(self, params, tokens: jax.Array, positions: jax.Array, cache: KVCache,
                mask: jax.Array, *, layers: Optional[Sequence[int]] = None,
                hidden_layers: Sequence[int] = (), logits_at: Optional[jax.Array] = None
                ) -> ForwardOutput:
        """Scores ``tokens[B, T]`` at ``positions[B, T]`` against ``cache`` under ``mask[B, T, S]``.

        ``layers`` runs only that subset of layers (in the order given; their cache entries are
        read and written, the others untouched). ``logits_at[B, N]`` computes logits only at
        those token indices.
        """
        ...

    def embed(self, params, tokens: jax.Array) -> jax.Array:
        """Token embeddings ``[..., E]`` (draft heads reuse the target's table)."""
        ...

    def lm_head(self, params, hidden: jax.Array, num_ids: Optional[int] = None) -> jax.Array:
        """Final-norm hidden states ``[..., E]`` to float32 logits ``[..., V]``; with
        ``num_ids``, ``[..., num_ids]`` for token ids ``< num_ids`` only (drafters that draft
        from frequent ids read a slice of the head)."""
        ...
