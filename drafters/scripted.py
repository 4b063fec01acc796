"""Scripted drafters for tests and diagnostics: an oracle, an always-wrong and a random drafter.

They read a reference continuation given as their *params* (``int32[B, R]``: each row's prompt
followed by the target's greedy output, aligned with the loop's ``history``), so they are static
and need no model. ``oracle`` drafts the reference (every draft accepted under greedy: K + 1 tokens
per target call); ``wrong`` drafts ``(reference + 1) % V`` (every draft rejected: exactly 1 token
per call); ``random`` drafts uniform random tokens. Greedy output must be identical for all three.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from specjax.drafter import DrafterBase, Proposal
from specjax.tree import DraftTree

MODES = ("oracle", "wrong", "random")


@dataclasses.dataclass(frozen=True)
class ScriptedDrafter(DrafterBase):
    """Attributes: mode (one of ``MODES``), draft_len K, vocab_size V."""

    mode: str
    draft_len: int
    vocab_size: int

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown scripted mode {self.mode!r}; choose one of {MODES}")

    @property
    def tree(self) -> DraftTree:
        return DraftTree.chain(self.draft_len)

    def check_compatible(self, target) -> None:
        if target.vocab_size != self.vocab_size:
            raise ValueError(f"scripted drafter vocabulary {self.vocab_size} != target "
                             f"{target.vocab_size}")

    def propose(self, params, state, ctx, key):
        reference = params  # [B, R]
        width = reference.shape[1]
        idx = ctx.history_len[:, None] + jnp.arange(self.draft_len, dtype=jnp.int32)[None, :]
        ref = jnp.take_along_axis(reference, jnp.clip(idx, 0, width - 1), axis=1)
        if self.mode == "wrong":
            ref = (ref + 1) % self.vocab_size
        elif self.mode == "random":
            ref = jax.random.randint(key, ref.shape, 0, self.vocab_size, jnp.int32)
        tokens = jnp.concatenate([ctx.pending[:, None], ref], axis=1)
        return Proposal(tokens=tokens), state, ctx.cache
