"""An independent small draft model (Leviathan et al. 2023; Chen et al. 2023): a chain of K tokens.

The draft model has its own KV cache, kept in step with the target's committed sequence:

* invariant after every round: the draft cache holds correct entries for every committed
  position below ``L - 1`` (``L`` = the target's committed length, pending token at ``L``);
* ``propose`` rolls the draft cache back to ``L - 1`` and feeds the last committed token and
  the pending token as one 2-token block (this re-derives the entry of a fully accepted chain's
  last draft, which the draft model never fed), then drafts autoregressively;
* under sampling each draft token is drawn from the draft's processed distribution (the same
  temperature / top-k / top-p as the target), and that exact ``q`` is recorded for verification.

``from_target_layers`` builds a draft model from the first layers of a Llama-family target
(own cache, the target's embedding, final norm and LM head): the default for SmolLM2, which has
no smaller sibling with its tokenizer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from specjax import masks
from specjax.cache import set_lengths
from specjax.drafter import Proposal
from specjax.sampling import SamplingConfig, processed_probs, sample_probs
from specjax.tree import DraftTree


@dataclasses.dataclass(frozen=True)
class DraftModelDrafter:
    """Static configuration.

    Attributes:
      model: the draft :class:`~specjax.model_api.LanguageModel` (same vocabulary as the target).
      draft_len: K tokens drafted per round.
      sampling: the decoding's sampling settings (drafts use the same processing).
    """

    model: Any
    draft_len: int = 4
    sampling: SamplingConfig = SamplingConfig()

    siblings = "iid"

    def __post_init__(self):
        if self.draft_len < 1:
            raise ValueError(f"draft_len must be >= 1, got {self.draft_len}")

    @property
    def deterministic(self) -> bool:
        return self.sampling.greedy

    @property
    def tree(self) -> DraftTree:
        return DraftTree.chain(self.draft_len)

    def check_compatible(self, target) -> None:
        if self.model.vocab_size != target.vocab_size:
            raise ValueError(
                f"draft model vocabulary ({self.model.vocab_size}) differs from the target's "
                f"({target.vocab_size}): speculative decoding needs a drafter with the same "
                "tokenizer; pick a draft model from the target's family or use layer_skip / "
                "prompt_lookup")

    def init(self, params, ctx, prompt_tokens, prompt_lengths):
        b, p = prompt_tokens.shape
        cache = self.model.init_cache(b, ctx.cache.num_slots)
        positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
        out = self.model.forward(params, prompt_tokens, positions, cache,
                                 masks.causal_mask(cache.lengths, p, cache.num_slots),
                                 logits_at=jnp.zeros((b, 1), jnp.int32))
        return set_lengths(out.cache, prompt_lengths)

    def _draw(self, key, logits):
        if self.sampling.greedy:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32), None
        q = processed_probs(logits, self.sampling)
        return sample_probs(key, q), q

    def propose(self, params, state, ctx, key):
        cache = state
        b = ctx.pending.shape[0]
        length = ctx.cache.lengths  # L: pending sits at position L
        prev = jnp.take_along_axis(ctx.history, jnp.maximum(length - 1, 0)[:, None], axis=1)[:, 0]
        cache = set_lengths(cache, jnp.maximum(length - 1, 0))
        tokens = jnp.stack([prev, ctx.pending], axis=1)
        positions = cache.lengths[:, None] + jnp.arange(2, dtype=jnp.int32)[None, :]
        out = self.model.forward(params, tokens, positions, cache,
                                 masks.causal_mask(cache.lengths, 2, cache.num_slots),
                                 logits_at=jnp.ones((b, 1), jnp.int32))
        cache = set_lengths(out.cache, cache.lengths + 2)
        keys = jax.random.split(key, self.draft_len)
        token, q = self._draw(keys[0], out.logits[:, 0])

        def step(carry, step_key):
            cache, token = carry
            out = self.model.forward(params, token[:, None], cache.lengths[:, None], cache,
                                     masks.causal_mask(cache.lengths, 1, cache.num_slots))
            cache = set_lengths(out.cache, cache.lengths + 1)
            nxt, q = self._draw(step_key, out.logits[:, 0])
            return (cache, nxt), (nxt, q)

        (cache, _), (rest, rest_q) = jax.lax.scan(step, (cache, token), keys[1:])
        drafted = jnp.concatenate([token[:, None], jnp.moveaxis(rest, 0, 1)], axis=1)  # [B, K]
        all_tokens = jnp.concatenate([ctx.pending[:, None], drafted], axis=1)
        draft_probs = None
        if q is not None:
            qs = jnp.concatenate([q[:, None], jnp.moveaxis(rest_q, 0, 1)], axis=1)  # [B, K, V]
            draft_probs = jnp.concatenate([jnp.zeros_like(qs[:, :1]), qs], axis=1)
        return Proposal(tokens=all_tokens, draft_probs=draft_probs), cache, ctx.cache

    def commit(self, params, state, ctx, info):
        return state  # the next propose rolls back to the new committed length


def from_target_layers(target, target_params, num_layers: int):
    """A draft model made of the target's first ``num_layers`` layers plus its embedding, final
    norm and LM head (its own model and cache; nothing is trained).

    Returns:
      ``(draft_model, draft_params)``; the draft params share the target's arrays.
    """
    config = target.config
    if not 1 <= num_layers < config.num_layers:
        raise ValueError(f"num_layers must be in [1, {config.num_layers}), got {num_layers}")
    draft_config = dataclasses.replace(config, num_layers=num_layers)
    draft_params = dict(target_params)
    draft_params["layers"] = jax.tree.map(lambda w: w[:num_layers], target_params["layers"])
    return type(target)(draft_config), draft_params
