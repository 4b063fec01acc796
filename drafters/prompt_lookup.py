"""Prompt lookup decoding: draft by copying what followed earlier occurrences of the last n-gram.

Model-free and deterministic (drafts are point masses, verified with the deterministic-draft
rule under sampling). Everything runs on the device over the static ``history[B, H]`` buffer:

* For each n-gram size ``n`` in ``[min_ngram, max_ngram]``, every position ``e`` of the history
  is an *end* candidate when ``history[e-n:e]`` equals the row's last ``n`` tokens and ``e`` lies
  before the pending token (so at least one continuation token exists).
* Each end ``e`` is scored by the longest n-gram that matches there, then by recency
  (``score = n * (H + 1) + e``); the ``num_branches`` best distinct ends give the branches.
* Branch ``j`` drafts ``history[e_j], history[e_j + 1], ...`` up to ``draft_len`` tokens, cut at
  the end of the known history (the cut-off nodes are marked invalid).

With ``num_branches == 1`` the candidates form a chain; otherwise a static tree of
``num_branches`` chains sharing the root, nodes in BFS order (depth-major, branch-minor).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from drafters import registry
from specjax.drafter import DrafterBase, Proposal
from specjax.tree import DraftTree


def branch_tree(num_branches: int, draft_len: int) -> DraftTree:
    """``num_branches`` chains of ``draft_len`` nodes under one root, in BFS order.

    Node ``1 + (d - 1) * num_branches + j`` is branch ``j`` at depth ``d``.
    """
    parents = [-1]
    for d in range(1, draft_len + 1):
        for j in range(num_branches):
            parents.append(0 if d == 1 else 1 + (d - 2) * num_branches + j)
    return DraftTree(tuple(parents))


@dataclasses.dataclass(frozen=True)
class PromptLookupDrafter(DrafterBase):
    """Static configuration of prompt lookup drafting.

    Attributes:
      draft_len: K, tokens drafted per branch.
      max_ngram, min_ngram: n-gram sizes tried (longer matches are preferred).
      num_branches: continuations verified together (1 = chain).
    """

    draft_len: int = 8
    max_ngram: int = 3
    min_ngram: int = 1
    num_branches: int = 1

    # Rows without a match offer invalid nodes that need no forward: the loop verifies on the
    # narrowest width covering the offered nodes (one token when no row matched).
    verify_widths = "auto"

    def __post_init__(self):
        if self.draft_len < 1:
            raise ValueError(f"draft_len must be >= 1, got {self.draft_len}")
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {self.min_ngram}, "
                             f"{self.max_ngram}")
        if self.num_branches < 1:
            raise ValueError(f"num_branches must be >= 1, got {self.num_branches}")

    @property
    def tree(self) -> DraftTree:
        return branch_tree(self.num_branches, self.draft_len)

    def find_ends(self, history: jax.Array, history_len: jax.Array):
        """Best match ends per row.

        Args:
          history: int32[B, H]. history_len: int32[B] (the pending token is at ``len - 1``).
        Returns:
          ``(ends int32[B, M], found bool[B, M])`` with M = ``num_branches``, best first.
        """
        b, h = history.shape
        ends = jnp.arange(h, dtype=jnp.int32)[None, :]  # candidate continuation start e
        length = history_len[:, None]
        best_n = jnp.zeros((b, h), jnp.int32)
        for n in range(self.min_ngram, self.max_ngram + 1):
            match = (ends >= n) & (ends <= length - 1) & (length >= n + 1)
            for j in range(n):
                hist_j = jnp.take_along_axis(history, jnp.clip(ends - n + j, 0, h - 1), axis=1)
                key_j = jnp.take_along_axis(history, jnp.clip(length - n + j, 0, h - 1), axis=1)
                match = match & (hist_j == key_j)
            best_n = jnp.where(match, n, best_n)
        score = jnp.where(best_n > 0, best_n * (h + 1) + ends, -1)
        top_score, top_end = jax.lax.top_k(score, self.num_branches)
        return top_end.astype(jnp.int32), top_score >= 0

    def propose(self, params, state, ctx, key):
        del params, key
        history, length = ctx.history, ctx.history_len
        b, h = history.shape
        ends, found = self.find_ends(history, length)  # [B, M]
        m, k = self.num_branches, self.draft_len
        offsets = jnp.arange(k, dtype=jnp.int32)  # depth d = offset + 1
        src = ends[:, None, :] + offsets[None, :, None]  # [B, K, M] depth-major like the tree
        ok = found[:, None, :] & (src < length[:, None, None])
        drafted = jnp.take_along_axis(history, jnp.clip(src, 0, h - 1).reshape(b, k * m), axis=1)
        tokens = jnp.concatenate([ctx.pending[:, None], jnp.where(ok.reshape(b, k * m),
                                                                  drafted, 0)], axis=1)
        valid = jnp.concatenate([jnp.ones((b, 1), bool), ok.reshape(b, k * m)], axis=1)
        return Proposal(tokens=tokens, valid=valid), state, ctx.cache


# The method -----------------------------------------------------------------------------------

# Default chain length per weight format (WORKSPACE "Chain lengths on packed weights"): on packed
# weights a plain step is ~3x cheaper while a multi-token verify is not (a 9-token verify costs
# ~2.3 steps there against ~1.4 on float32), so shorter chains pay.
DRAFT_LEN = 8
PACKED_DRAFT_LEN = 2


@dataclasses.dataclass(frozen=True)
class PromptLookupOptions(registry.Options):
    draft_len: Optional[int] = registry.option(
        None, f"Draft tokens per branch (default {DRAFT_LEN}; {PACKED_DRAFT_LEN} on packed "
        "weights, --weights=gguf|gguf_a8|int8).", minimum=1)
    tree: str = registry.option("chain", "chain: one continuation; tree: --num_branches "
                                "continuations verified together.", choices=("chain", "tree"))
    num_branches: int = registry.option(3, "Branches with --tree=tree.", minimum=1)
    max_ngram: int = registry.option(3, "Longest n-gram matched.", minimum=1)
    min_ngram: int = registry.option(1, "Shortest n-gram matched.", minimum=1)

    def param_sharding(self) -> str:
        return "none"


def build(ctx: registry.BuildContext, options: PromptLookupOptions):
    branches = options.num_branches if options.tree == "tree" else 1
    draft_len = ctx.size_for_weights(options.draft_len, DRAFT_LEN, PACKED_DRAFT_LEN)
    return PromptLookupDrafter(draft_len=draft_len, max_ngram=options.max_ngram,
                               min_ngram=options.min_ngram, num_branches=branches), None


registry.register(registry.Method(
    "prompt_lookup", PromptLookupOptions, build,
    "copies the continuation of the longest n-gram match in the prompt and the text so far",
    order=10))
