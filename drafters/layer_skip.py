"""Self-speculative decoding by layer skipping (Draft & Verify, Zhang et al. 2024; SWIFT).

The target drafts for itself by running only a subset of its layers (``keep_layers``) plus its
embedding, final norm and LM head. No extra parameters and no extra cache: drafting reads the
target's committed cache entries of the kept layers and writes its draft tokens' entries into
the scratch slots ``L, L+1, ...`` of those layers, exactly the slots the verification forward
then overwrites with the full model's entries. Drafts are a chain of ``draft_len`` tokens;
under sampling each is drawn from the processed draft distribution and its ``q`` recorded.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from specjax import masks
from drafters import registry
from specjax.drafter import Proposal, SampledChainDrafter
from specjax.sampling import SamplingConfig, draw


def default_keep_layers(num_layers: int) -> tuple[int, ...]:
    """Skips every third layer from ``num_layers // 6`` up to the last three (kept): for 30
    layers it skips 5, 8, ..., 26 and keeps 22. Of the sets tried on SmolLM2-135M (WORKSPACE.md)
    this one had the highest acceptance (tau 1.78 with 3 drafts). Models with fewer than 4
    layers skip their middle layer.
    """
    skip = set(range(num_layers // 6, num_layers - 3, 3)) or {num_layers // 2}
    return tuple(i for i in range(num_layers) if i not in skip)


@dataclasses.dataclass(frozen=True)
class LayerSkipDrafter(SampledChainDrafter):
    """Static configuration.

    Attributes:
      target: the target model (drafts run its own layers).
      keep_layers: layers run while drafting (ascending); ``None`` = :func:`default_keep_layers`.
      draft_len: K tokens drafted per round.
      sampling: the decoding's sampling settings.
    """

    target: object
    keep_layers: Optional[tuple[int, ...]] = None
    draft_len: int = 4
    sampling: SamplingConfig = SamplingConfig()

    def __post_init__(self):
        n = self.target.num_layers
        keep = default_keep_layers(n) if self.keep_layers is None else tuple(
            int(i) for i in self.keep_layers)
        if not keep or list(keep) != sorted(set(keep)) or keep[0] < 0 or keep[-1] >= n:
            raise ValueError(f"keep_layers must be distinct ascending layer indices in [0, {n}), "
                             f"got {self.keep_layers}")
        if len(keep) == n:
            raise ValueError("keep_layers keeps every layer: skip at least one layer")
        if self.draft_len < 1:
            raise ValueError(f"draft_len must be >= 1, got {self.draft_len}")
        object.__setattr__(self, "keep_layers", keep)

    @classmethod
    def skipping(cls, target, skip_layers: Sequence[int], **kwargs) -> "LayerSkipDrafter":
        """Builds the drafter from the layers to skip instead of the layers to keep."""
        skip = {int(i) for i in skip_layers}
        bad = sorted(i for i in skip if not 0 <= i < target.num_layers)
        if bad:
            raise ValueError(f"skip_layers {bad} are not layers of a {target.num_layers}-layer "
                             "model")
        keep = tuple(i for i in range(target.num_layers) if i not in skip)
        return cls(target=target, keep_layers=keep, **kwargs)

    def check_compatible(self, target) -> None:
        if target != self.target:
            raise ValueError("a layer-skip drafter must be built from the target it drafts for")

    def propose(self, params, state, ctx, key):
        del params  # drafting uses the target's own parameters
        tparams, cache = ctx.target_params, ctx.cache
        committed = cache.lengths

        def step(carry, xs):
            cache, token = carry
            offset, step_key = xs
            at = committed + offset  # this token's slot and position
            out = self.target.forward(tparams, token[:, None], at[:, None],
                                      cache.replace(lengths=at),
                                      masks.causal_mask(at, 1, cache.num_slots),
                                      layers=self.keep_layers)
            nxt, q = draw(step_key, out.logits[:, 0], self.sampling)
            return (out.cache.replace(lengths=committed), nxt), (nxt, q)

        offsets = jnp.arange(self.draft_len, dtype=jnp.int32)
        keys = jax.random.split(key, self.draft_len)
        (cache, _), (drafted, qs) = jax.lax.scan(step, (cache, ctx.pending), (offsets, keys))
        tokens = jnp.concatenate([ctx.pending[:, None], jnp.moveaxis(drafted, 0, 1)], axis=1)
        draft_probs = None
        if qs is not None:
            qs = jnp.moveaxis(qs, 0, 1)
            draft_probs = jnp.concatenate([jnp.zeros_like(qs[:, :1]), qs], axis=1)
        return Proposal(tokens=tokens, draft_probs=draft_probs), state, cache


# The method -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerSkipOptions(registry.Options):
    draft_len: int = registry.option(2, "Draft tokens per round.", minimum=1)
    skip_layers: Optional[tuple[int, ...]] = registry.option(
        None, "Comma-separated layers skipped while drafting (default: a tuned set, see "
        "drafters/layer_skip.py).", parse=registry.parse_ints)

    def param_sharding(self) -> str:
        return "none"


def build(ctx: registry.BuildContext, options: LayerSkipOptions):
    if options.skip_layers is None:
        return LayerSkipDrafter(ctx.model, None, options.draft_len, ctx.sampling), None
    return LayerSkipDrafter.skipping(ctx.model, options.skip_layers,
                                     draft_len=options.draft_len, sampling=ctx.sampling), None


registry.register(registry.Method(
    "layer_skip", LayerSkipOptions, build,
    "the target drafts for itself with a subset of its layers (self-speculative)", order=30))
