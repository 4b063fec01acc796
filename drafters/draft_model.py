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
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp

from specjax import masks
from specjax.cache import set_lengths
from drafters import registry
from models import packing
from specjax.drafter import Proposal, SampledChainDrafter
from specjax.sampling import SamplingConfig, draw


@dataclasses.dataclass(frozen=True)
class DraftModelDrafter(SampledChainDrafter):
    """Static configuration.

    Attributes:
      model: the draft :class:`~specjax.model_api.LanguageModel` (same vocabulary as the target).
      draft_len: K tokens drafted per round.
      sampling: the decoding's sampling settings (drafts use the same processing).
    """

    model: Any
    draft_len: int = 4
    sampling: SamplingConfig = SamplingConfig()

    def __post_init__(self):
        if self.draft_len < 1:
            raise ValueError(f"draft_len must be >= 1, got {self.draft_len}")

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
        token, q = draw(keys[0], out.logits[:, 0], self.sampling)

        def step(carry, step_key):
            cache, token = carry
            out = self.model.forward(params, token[:, None], cache.lengths[:, None], cache,
                                     masks.causal_mask(cache.lengths, 1, cache.num_slots))
            cache = set_lengths(out.cache, cache.lengths + 1)
            nxt, q = draw(step_key, out.logits[:, 0], self.sampling)
            return (cache, nxt), (nxt, q)

        (cache, _), (rest, rest_q) = jax.lax.scan(step, (cache, token), keys[1:])
        drafted = jnp.concatenate([token[:, None], jnp.moveaxis(rest, 0, 1)], axis=1)  # [B, K]
        all_tokens = jnp.concatenate([ctx.pending[:, None], drafted], axis=1)
        draft_probs = None
        if q is not None:
            qs = jnp.concatenate([q[:, None], jnp.moveaxis(rest_q, 0, 1)], axis=1)  # [B, K, V]
            draft_probs = jnp.concatenate([jnp.zeros_like(qs[:, :1]), qs], axis=1)
        return Proposal(tokens=all_tokens, draft_probs=draft_probs), cache, ctx.cache

    # commit: the base class's (nothing to do: the next propose rolls back to the new committed
    # length). Its cache then holds its own drafted tokens at the accepted positions, right only
    # when it proposed what was verified: it cannot be composed.
    commits_any_proposal = False


def from_target_layers(target, target_params, num_layers: int):
    """A draft model made of the target's first ``num_layers`` layers plus its embedding, final
    norm and LM head (its own model and cache; nothing is trained).

    Returns:
      ``(draft_model, draft_params)``; the draft params share the target's arrays.
    """
    config = target.config
    if not 1 <= num_layers < config.num_layers:
        raise ValueError(f"num_layers must be in [1, {config.num_layers}), got {num_layers}")
    draft_config = config.with_layers(range(num_layers))
    draft_params = dict(target_params)
    draft_params["layers"] = jax.tree.map(lambda w: w[:num_layers], target_params["layers"])
    return type(target)(draft_config), draft_params


# The method -----------------------------------------------------------------------------------

DRAFT_WEIGHTS = ("auto",) + packing.WEIGHTS


def draft_weights_option():
    """The ``draft_weights`` option of the methods that load a named draft model."""
    return registry.option(
        "auto", "Weights of --draft_model: auto (the target's format, so that drafting gets as "
        "cheap as the target's step: a GGUF format becomes int8 for a HF directory, which keeps "
        "no blocks), or a format as for --weights.", choices=DRAFT_WEIGHTS)


def load_named(ctx: registry.BuildContext, name: str, weights: str = "auto"):
    """The draft model ``name`` (registry name or checkpoint path) as a ``LoadedModel`` in the
    target's dtype and in ``weights`` (``auto``: the target's format; see
    :func:`draft_weights_option`)."""
    from models import registry as models
    if weights == "auto":
        weights = packing.weights_of(ctx.model.config)
        if weights.startswith("gguf") and os.path.isdir(os.fspath(name)):
            weights = "int8"
    return models.load(name, dtype=ctx.model.config.dtype, weights=weights)


@dataclasses.dataclass(frozen=True)
class DraftModelOptions(registry.Options):
    draft_len: int = registry.option(2, "Draft tokens per round.", minimum=1)
    draft_model: Optional[str] = registry.option(
        None, "Registry name or checkpoint path of the draft model; default: the target's "
        "first --draft_layers layers.")
    draft_layers: int = registry.option(4, "Without --draft_model: how many of the target's "
                                        "first layers form the draft model.", minimum=1)
    draft_weights: str = draft_weights_option()

    def param_sharding(self) -> str:
        return "by_logical_axes" if self.draft_model else "placed_with_target"


def check_draft_weights(options) -> None:
    """ValueError when ``draft_weights`` is set without a named draft model (the target's own
    layers keep the target's weights)."""
    if options.draft_weights != "auto" and not options.draft_model:
        raise ValueError("draft_weights applies to a named --draft_model only (the default "
                         "draft, the target's own layers, keeps the target's weights)")


def build(ctx: registry.BuildContext, options: DraftModelOptions):
    check_draft_weights(options)
    if options.draft_model:
        small = load_named(ctx, options.draft_model, options.draft_weights)
        return DraftModelDrafter(small.model, options.draft_len, ctx.sampling), small.params
    model, params = from_target_layers(ctx.model, ctx.params, options.draft_layers)
    return DraftModelDrafter(model, options.draft_len, ctx.sampling), params


registry.register(registry.Method(
    "draft_model", DraftModelOptions, build,
    "a small model with the target's tokenizer drafts a chain (default: the target's first "
    "layers)", order=20))
