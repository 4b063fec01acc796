"""Blockwise parallel decoding (Stern et al. 2018): K independent heads propose a chain.

Head ``k`` is a residual feed-forward layer on the pending hidden state ``h``,
``x_k = h + W2_k ReLU(W1_k h)`` (``W2`` starts at zero), followed by the target's own frozen
output layer; it proposes the token ``k + 1`` places after the pending one. Each round drafts
the chain of the heads' top-1 tokens (point masses: ``deterministic = True``) and the loop
verifies it with exact match (greedy) or the deterministic-draft rule (sampling): lossless.

Stern et al.'s *relaxed* acceptance criteria are LOSSY and opt-in:
``SpecConfig(acceptance="topk_lossy", topk_k=k)`` (``--acceptance=topk_lossy --topk_k=k``) and
``"distance_lossy"`` (ordinal vocabularies only), implemented in :mod:`specjax.accept`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from drafters import heads, registry
from drafters.heads import HeadDrafter
from specjax.tree import DraftTree


class BlockwiseHeads(nn.Module):
    """K residual FFN heads: ``[..., E] -> [..., K, E]``."""

    num_heads: int
    hidden_size: int
    ffn_size: int

    @nn.compact
    def __call__(self, h):
        outs = []
        for k in range(self.num_heads):
            y = nn.relu(nn.Dense(self.ffn_size, name=f"head_{k}_in")(h))
            y = nn.Dense(self.hidden_size, kernel_init=nn.initializers.zeros,
                         name=f"head_{k}_out")(y)
            outs.append(h + y)
        return jnp.stack(outs, axis=-2)


@dataclasses.dataclass(frozen=True)
class BlockwiseDrafter(HeadDrafter):
    """Blockwise heads; ``num_layers`` is the FFN width as a multiple of the hidden size.

    ``tree`` is a chain of ``draft_len <= num_heads`` drafted tokens.
    """

    name = "blockwise"

    @classmethod
    def create(cls, target, num_heads: int = 4, num_layers: int = 1,
               draft_len: Optional[int] = None, max_nodes: Optional[int] = None,
               choices=None, draft_vocab: int = 0) -> "BlockwiseDrafter":
        """Drafts the chain of heads ``0 .. draft_len - 1`` (default: all heads);
        ``draft_vocab``: see :class:`~drafters.heads.HeadDrafter`."""
        if choices is not None:
            raise ValueError("blockwise decoding drafts a chain: pass draft_len, not choices")
        draft_len = num_heads if draft_len is None else draft_len
        return cls(target=target, num_heads=num_heads,
                   tree=DraftTree.chain(draft_len, max_nodes=max_nodes), num_layers=num_layers,
                   draft_vocab=draft_vocab)

    def __post_init__(self):
        super().__post_init__()
        if not self.tree.is_chain:
            raise ValueError("blockwise decoding drafts a chain (DraftTree.chain)")

    @property
    def module(self) -> BlockwiseHeads:
        return BlockwiseHeads(self.num_heads, self.hidden_size,
                              self.num_layers * self.hidden_size)

    def _init_inputs(self):
        return (jnp.zeros((1, self.hidden_size), jnp.float32),)

    def train_logits(self, params, target_params, hidden, tokens):
        del tokens
        feats = self.module.apply({"params": params}, hidden.astype(jnp.float32))
        return self.logits(target_params, feats)

    def propose(self, params, state, ctx, key):
        del key
        k = self.tree.max_depth
        feats = self.module.apply({"params": params}, ctx.pending_hidden.astype(jnp.float32))
        logits = self.draft_logits(ctx.target_params, feats[:, :k])  # [B, K, V]
        drafted = jnp.argmax(logits, axis=-1)
        return self._proposal(ctx.pending, drafted), state, ctx.cache


# The method -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BlockwiseOptions(registry.Options):
    draft_len: int = registry.option(4, "Draft tokens per round (at most the 4 shipped heads).",
                                     minimum=1)
    draft_vocab: Optional[int] = registry.option(
        None, "Draft from token ids < N only (0 = all, the default).", minimum=0)


registry.register(registry.Method(
    "blockwise", BlockwiseOptions, heads.shipped_builder("blockwise"),
    "blockwise parallel decoding: K independent heads draft a chain", weights="blockwise",
    order=60))
