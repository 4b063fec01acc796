"""Medusa-1 draft heads (Cai et al. 2024) on a frozen target, with a static sparse tree.

Head ``k`` is ``num_layers`` residual blocks ``x + SiLU(W x)`` on the pending hidden state ``h``
followed by the target's own (frozen, shared) LM head; it predicts the token ``k + 1`` places
after the pending one. The candidate tree comes from Medusa-style ``choices``
(:meth:`DraftTree.from_choices`): node ``n`` at depth ``d`` holds the rank
``choice_of_node[n][-1]`` token of head ``d - 1``'s top-k, whatever its parent's token (Medusa
heads do not see the drafted tokens). Drafts are point masses (``deterministic = True``):
greedy exact match under greedy decoding, the deterministic-draft rule under sampling, so
decoding stays lossless.

Usage::

    drafter, params = head_weights.load_shipped("medusa", loaded)  # trained, tuned tree
    drafter = MedusaDrafter.create(loaded.model)                   # untrained, generic tree
    params = drafter.init_params(jax.random.key(0))
    speculative_generate(loaded.model, loaded.params, drafter, params, prompts, config)
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from drafters import heads, registry
from drafters.heads import HeadDrafter, ResBlock

# 10 drafted nodes (11 with the root), depth 3: top-3 of head 0, the best continuations below
# the first two. Chosen for SmolLM2-135M on a 2-core CPU, where a verify pass costs about
# linearly more beyond ~8-10 nodes.
DEFAULT_CHOICES = ((0,), (1,), (2,), (0, 0), (0, 1), (0, 2), (1, 0), (0, 0, 0), (0, 0, 1),
                   (0, 1, 0))
DEFAULT_MAX_NODES = 64


class MedusaHeads(nn.Module):
    """K independent heads: ``[..., E] -> [..., K, E]`` features for the LM head."""

    num_heads: int
    hidden_size: int
    num_layers: int = 1

    @nn.compact
    def __call__(self, h):
        outs = []
        for k in range(self.num_heads):
            x = h
            for layer in range(self.num_layers):
                x = ResBlock(self.hidden_size, name=f"head_{k}_block_{layer}")(x)
            outs.append(x)
        return jnp.stack(outs, axis=-2)


@dataclasses.dataclass(frozen=True)
class MedusaDrafter(HeadDrafter):
    """Medusa-1 heads. See :class:`drafters.heads.HeadDrafter` for the fields."""

    name = "medusa"

    @classmethod
    def create(cls, target, num_heads: int = 3, num_layers: int = 1,
               choices: Optional[Sequence[Sequence[int]]] = None,
               max_nodes: Optional[int] = DEFAULT_MAX_NODES, draft_vocab: int = 0
               ) -> "MedusaDrafter":
        """A drafter with the tree from ``choices`` (default :data:`DEFAULT_CHOICES`, cut to
        ``num_heads`` levels); ``ValueError`` if the tree exceeds ``max_nodes`` nodes.
        ``draft_vocab``: see :class:`~drafters.heads.HeadDrafter`."""
        if choices is None:
            choices = [c for c in DEFAULT_CHOICES if len(c) <= num_heads]
        tree = heads.make_tree(choices, DEFAULT_CHOICES, max_nodes)
        return cls(target=target, num_heads=num_heads, tree=tree, num_layers=num_layers,
                   draft_vocab=draft_vocab)

    @property
    def module(self) -> MedusaHeads:
        return MedusaHeads(self.num_heads, self.hidden_size, self.num_layers)

    def _init_inputs(self):
        return (jnp.zeros((1, self.hidden_size), jnp.float32),)

    def train_logits(self, params, target_params, hidden, tokens):
        del tokens  # Medusa heads see only h
        feats = self.module.apply({"params": params}, hidden.astype(jnp.float32))
        return self.logits(target_params, feats)

    def propose(self, params, state, ctx, key):
        del key
        depth = self.tree.max_depth
        h = ctx.pending_hidden.astype(jnp.float32)
        feats = self.module.apply({"params": params}, h)[:, :depth]  # [B, D, E]
        logits = self.draft_logits(ctx.target_params, feats)  # [B, D, V]
        _, top = jax.lax.top_k(logits, heads.max_rank(self.tree))  # [B, D, R]
        head, rank = heads.tree_tables(self.tree)
        drafted = top[:, head, rank]  # [B, T - 1]
        return self._proposal(ctx.pending, drafted), state, ctx.cache


registry.register(registry.Method(
    "medusa", heads.TreeHeadOptions, heads.shipped_builder("medusa"),
    "Medusa-1 heads: one head per depth on the last hidden state, a static tree",
    weights="medusa", order=70))
