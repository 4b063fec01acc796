"""Hydra draft heads (Ankner et al. 2024): sequentially dependent Medusa heads.

Head ``k`` sees the pending hidden state ``h`` AND the target's input embeddings of the tokens
on its path: the pending token ``p`` and the ``k`` tokens drafted before it,

    x_k = h + SiLU(W_k [h; emb(p); emb(d_1); ...; emb(d_k)])     (then num_layers - 1 ResBlocks)
    logits_k = lm_head(x_k)                                       (the target's, frozen)

so head 0 already knows ``p`` (Medusa's head 0 does not). ``W_k`` starts at zero: an untrained
head predicts what the target's LM head predicts from ``h``.

In a static tree every node's children are filled by one head call on the node's own path, so
the tree is drafted level by level (``max_depth`` head calls, each over all nodes of one depth
that have children, static shapes), after :attr:`specjax.tree.DraftTree.expansion_levels` (the
plan EAGLE's static trees use too). Children take the top-k ranks of their parent's head output
(per ``choice_of_node``), so siblings are distinct tokens. Drafts are point masses
(``deterministic = True``): verification stays lossless under greedy and sampling.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from drafters import heads, registry
from drafters.heads import ResBlock
from drafters.medusa import MedusaDrafter


class HydraHead(nn.Module):
    """One head: ``(h [..., E], path_emb [..., k + 1, E]) -> [..., E]``."""

    hidden_size: int
    num_layers: int = 1

    @nn.compact
    def __call__(self, h, path_emb):
        flat = path_emb.reshape(path_emb.shape[:-2] + (-1,))
        x = jnp.concatenate([h, flat.astype(h.dtype)], axis=-1)
        x = h + nn.silu(nn.Dense(self.hidden_size, kernel_init=nn.initializers.zeros,
                                 name="in_proj")(x))
        for layer in range(self.num_layers - 1):
            x = ResBlock(self.hidden_size, name=f"block_{layer}")(x)
        return x


class HydraHeads(nn.Module):
    """K heads; head ``k`` takes ``k + 1`` path embeddings."""

    num_heads: int
    hidden_size: int
    num_layers: int = 1

    def setup(self):
        self.heads = [HydraHead(self.hidden_size, self.num_layers, name=f"head_{k}")
                      for k in range(self.num_heads)]

    def head(self, k: int, h, path_emb):
        return self.heads[k](h, path_emb)

    def __call__(self, h, path_emb):
        """Teacher-forced: ``path_emb [..., K, E]`` (p, d_1, .., d_{K-1}) -> ``[..., K, E]``."""
        return jnp.stack([self.heads[k](h, path_emb[..., :k + 1, :])
                          for k in range(self.num_heads)], axis=-2)


@dataclasses.dataclass(frozen=True)
class HydraDrafter(MedusaDrafter):
    """Hydra heads on Medusa's trees (``create`` and its tree options are Medusa's). See
    :class:`drafters.heads.HeadDrafter` for the fields."""

    name = "hydra"

    @property
    def module(self) -> HydraHeads:
        return HydraHeads(self.num_heads, self.hidden_size, self.num_layers)

    def _init_inputs(self):
        e = self.hidden_size
        return (jnp.zeros((1, e), jnp.float32), jnp.zeros((1, self.num_heads, e), jnp.float32))

    def train_logits(self, params, target_params, hidden, tokens):
        emb = self.embed(target_params, tokens[:, :self.num_heads]).astype(jnp.float32)
        feats = self.module.apply({"params": params}, hidden.astype(jnp.float32), emb)
        return self.logits(target_params, feats)

    def propose(self, params, state, ctx, key):
        del key
        b = ctx.pending.shape[0]
        t = self.tree.num_nodes
        h = ctx.pending_hidden.astype(jnp.float32)
        tokens = jnp.zeros((b, t), jnp.int32).at[:, 0].set(ctx.pending)
        for d, (_, paths, children, slot, rank) in enumerate(self.tree.expansion_levels):
            path_tokens = tokens[:, paths]  # [B, P, d + 1]
            emb = self.embed(ctx.target_params, path_tokens).astype(jnp.float32)
            hp = jnp.broadcast_to(h[:, None], (b, paths.shape[0], h.shape[-1]))
            feats = self.module.apply({"params": params}, d, hp, emb,
                                      method=HydraHeads.head)  # [B, P, E]
            logits = self.draft_logits(ctx.target_params, feats)  # [B, P, V]
            _, top = jax.lax.top_k(logits, int(rank.max()) + 1)  # [B, P, R]
            tokens = tokens.at[:, children].set(top[:, slot, rank])
        return self._proposal(ctx.pending, tokens[:, 1:]), state, ctx.cache


registry.register(registry.Method(
    "hydra", heads.TreeHeadOptions, heads.shipped_builder("hydra"),
    "Hydra heads: each head also reads the tokens drafted before it, a static tree",
    weights="hydra", order=80))
