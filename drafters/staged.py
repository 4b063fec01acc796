"""Staged speculation (Spector & Re 2023, SEEDS [28]; the hierarchy of [11]): the draft model's
own drafting is itself speculated, by prompt lookup.

The outer round is :class:`~drafters.draft_model.DraftModelDrafter`'s: a draft model with its
own KV cache proposes a chain of ``draft_len`` (K) tokens, verified by the target as usual. What
changes is how the draft model produces that chain. Instead of K sequential one-token forwards,
``propose`` runs inner rounds, all on the device (a ``lax.while_loop`` of static shapes with
per-row counts):

1. prompt lookup (:meth:`PromptLookupDrafter.find_ends
   <drafters.prompt_lookup.PromptLookupDrafter.find_ends>`) matches the last n-gram of the
   committed history plus the draft so far against that same text and proposes up to
   ``lookup_len`` (m) continuation tokens;
2. the draft model scores its unfed token(s) plus those m guesses in ONE forward (a chain of
   m + 1 through its own cache; the first inner round also feeds the last committed token, as
   DraftModelDrafter does);
3. the guesses are verified against the draft model itself: greedy keeps the longest prefix
   equal to its argmax and appends its argmax after it; under sampling, guess ``g`` is kept
   with probability ``q(g)`` (``q`` the draft model's processed distribution there), and the
   first rejected position draws from ``q`` with ``g`` removed, renormalised (the exact rule for
   point-mass drafts, ``specjax.accept.deterministic``). Every inner round therefore yields
   ``a + 1`` tokens (``a`` kept guesses), each with its ``q`` recorded.

It stops once every live row has K tokens (at most K inner forwards; fewer when lookup hits),
and returns the first K as the proposal, with their ``q`` under sampling.

Lossless, twice over. The outer verification is unchanged, so the output is plain decoding's
whenever the proposal's ``q`` is the distribution each drafted token was drawn from. (a) Greedy:
an inner round keeps a guess only where it equals the draft model's argmax and then adds the
argmax, so the chain is the draft model's greedy chain, token for token (up to float rounding
of a wider forward). (b) Sampling: by the point-mass rule a token at any position is ``g``
with probability ``q(g)`` and any ``x != g`` with ``(1 - q(g)) q(x) / (1 - q(g)) = q(x)``, so
given its prefix every drafted token is distributed exactly as ``q``, with fresh randomness per
inner round: the staged chain has the draft model's own autoregressive distribution, and the
recorded ``q`` is the right one for the outer speculative sampling.

Draft cache invariant (DraftModelDrafter's, unchanged): after every round the draft cache holds
correct entries for every committed position below ``L - 1``. ``propose`` rolls back to
``L - 1`` and feeds ``[previous token, pending, guesses...]``; after every inner round the cache
is committed up to the last fed token that is part of the chain, so at the end its length is
``L + n`` with ``n >= K`` drafted tokens: every position a later round may keep is correct.
Entries past that (rejected guesses) are scratch.

Statistics: the drafter state counts, per row, the draft-model forwards of every propose (and
the proposes), so ``forwards / proposals`` is the inner forwards per round (K for the plain
draft model; see :func:`inner_forwards_per_round`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import struct

from drafters import draft_model, registry
from drafters.draft_model import draft_weights_option
from drafters.prompt_lookup import PromptLookupDrafter
from specjax import masks
from specjax.cache import KVCache, set_lengths
from specjax.drafter import Proposal, SampledChainDrafter
from specjax.sampling import SamplingConfig, processed_probs, sample_probs

DEFAULT_DRAFT_LAYERS = draft_model.DraftModelOptions().draft_layers  # the draft_model default


@struct.dataclass
class StagedState:
    """The draft model's cache plus per-row counters (summed over rounds where the row was live).

    Attributes:
      cache: the draft model's KV cache (DraftModelDrafter's invariant).
      forwards: int32[B] draft-model forwards the row needed (until it had K tokens).
      proposals: int32[B] proposes.
    """

    cache: KVCache
    forwards: jax.Array
    proposals: jax.Array


def inner_forwards_per_round(state: StagedState) -> float:
    """Mean draft-model forwards per proposal over the live rows' rounds so far (K without any
    lookup hit; the batch's own cost per round is the maximum over its live rows)."""
    return float(jnp.sum(state.forwards)) / max(1, int(jnp.sum(state.proposals)))


@dataclasses.dataclass(frozen=True)
class StagedDrafter(SampledChainDrafter):
    """Static configuration.

    Attributes:
      model: the draft :class:`~specjax.model_api.LanguageModel` (same vocabulary as the target).
      draft_len: K tokens drafted per round.
      lookup_len: m, prompt-lookup guesses the draft model checks per inner forward (at most
        ``K - 1`` are used: more could never be kept).
      max_ngram, min_ngram: n-gram sizes the lookup matches (longer preferred, then recent).
      sampling: the decoding's sampling settings (drafts use the same processing).
    """

    model: Any
    draft_len: int = 4
    lookup_len: int = 3
    max_ngram: int = 3
    min_ngram: int = 1
    sampling: SamplingConfig = SamplingConfig()

    def __post_init__(self):
        if self.draft_len < 1:
            raise ValueError(f"draft_len must be >= 1, got {self.draft_len}")
        if self.lookup_len < 1:
            raise ValueError(f"lookup_len must be >= 1, got {self.lookup_len}")
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {self.min_ngram}, "
                             f"{self.max_ngram}")

    # A chain like DraftModelDrafter's; its cache holds its own drafted tokens (not composable).
    commits_any_proposal = False

    @property
    def guesses(self) -> int:
        """Guesses per inner forward: ``lookup_len``, capped at ``K - 1``."""
        return min(self.lookup_len, self.draft_len - 1)

    def check_compatible(self, target) -> None:
        draft_model.DraftModelDrafter(self.model, self.draft_len).check_compatible(target)

    def init(self, params, ctx, prompt_tokens, prompt_lengths):
        cache = draft_model.DraftModelDrafter(self.model, self.draft_len).init(
            params, ctx, prompt_tokens, prompt_lengths)
        zeros = jnp.zeros(prompt_lengths.shape, jnp.int32)
        return StagedState(cache=cache, forwards=zeros, proposals=zeros)

    # The inner rounds -----------------------------------------------------------------------

    def lookup(self, ctx, drafted, n):
        """Prompt lookup continuing the committed history plus each row's first ``n`` drafts.

        Args:
          drafted: int32[B, K] drafted tokens (the first ``n[b]`` are real). n: int32[B].
        Returns:
          ``(guesses int32[B, m], ok bool[B, m])`` (``ok`` is a prefix: the continuation is
          cut at the end of the text).
        """
        m, k = self.guesses, self.draft_len
        history, hist_len = ctx.history, ctx.history_len
        b, h = history.shape
        steps = jnp.arange(k, dtype=jnp.int32)[None, :]
        text = jnp.concatenate([history, jnp.zeros((b, k), jnp.int32)], axis=1)  # [B, H + K]
        cols = jnp.where(steps < n[:, None], hist_len[:, None] + steps, h + k)
        text = text.at[jnp.arange(b)[:, None], cols].set(drafted, mode="drop")
        text_len = hist_len + jnp.minimum(n, k)
        matcher = PromptLookupDrafter(draft_len=m, max_ngram=self.max_ngram,
                                      min_ngram=self.min_ngram)
        ends, found = matcher.find_ends(text, text_len)  # [B, 1]
        src = ends + jnp.arange(m, dtype=jnp.int32)[None, :]
        ok = found & (src < text_len[:, None])
        guesses = jnp.take_along_axis(text, jnp.clip(src, 0, h + k - 1), axis=1)
        return jnp.where(ok, guesses, 0), ok

    def judge(self, key, logits, guesses, ok):
        """Verifies ``guesses`` against the draft model itself.

        Args:
          logits: float32[B, m + 1, V]: ``logits[:, i]`` predicts the token after guess ``i``
            (``i = 0``: after the last fed chain token).
          guesses: int32[B, m]; ok: bool[B, m].
        Returns:
          ``(new int32[B, m + 1], q float32[B, m + 1, V] or None, kept int32[B])``: the row's
          new chain tokens are ``new[:, :kept + 1]`` (the kept guesses, then the draft model's
          own token), ``q[:, i]`` the distribution ``new[:, i]`` is distributed as.
        """
        b, m = guesses.shape
        if self.sampling.greedy:
            top = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, m + 1]
            hit = ok & (guesses == top[:, :m])
            kept = jnp.sum(jnp.cumprod(hit, axis=1), axis=1, dtype=jnp.int32)
            return top, None, kept  # top[i] == guesses[i] for every kept i
        q = processed_probs(logits, self.sampling)  # [B, m + 1, V]
        key_u, key_t = jax.random.split(key)
        q_guess = jnp.take_along_axis(q[:, :m], guesses[..., None], axis=-1)[..., 0]
        hit = ok & (jax.random.uniform(key_u, (b, m)) < q_guess)  # kept with probability q(g)
        kept = jnp.sum(jnp.cumprod(hit, axis=1), axis=1, dtype=jnp.int32)
        pad = lambda x, v: jnp.concatenate([x, jnp.full((b, 1), v, x.dtype)], axis=1)  # noqa: E731
        at = lambda x: jnp.take_along_axis(x, kept[:, None], axis=1)[:, 0]  # noqa: E731
        rejected = at(pad(ok, False))  # a guess was tried at ``kept`` and failed
        q_at = jnp.take_along_axis(q, kept[:, None, None], axis=1)[:, 0]  # [B, V]
        vocab = jnp.arange(q.shape[-1], dtype=jnp.int32)[None, :]
        residual = jnp.where(rejected[:, None] & (vocab == at(pad(guesses, 0))[:, None]), 0.0,
                             q_at)
        token = sample_probs(key_t, residual)  # q without the rejected guess, renormalised
        positions = jnp.arange(m + 1, dtype=jnp.int32)[None, :]
        new = jnp.where(positions == kept[:, None], token[:, None], pad(guesses, 0))
        return new, q, kept

    def propose(self, params, state, ctx, key):
        k, m = self.draft_len, self.guesses
        b = ctx.pending.shape[0]
        rows = jnp.arange(b)[:, None]
        length = ctx.cache.lengths  # L: pending sits at position L
        prev = jnp.take_along_axis(ctx.history, jnp.maximum(length - 1, 0)[:, None], axis=1)[:, 0]
        cache = set_lengths(state.cache, jnp.maximum(length - 1, 0))
        drafted = jnp.zeros((b, k), jnp.int32)
        qs = None if self.sampling.greedy else jnp.zeros((b, k, self.model.vocab_size),
                                                        jnp.float32)

        def inner(key, cache, fed, guesses, ok, first):
            """One draft-model forward over ``fed + guesses``; ``(new, q, kept, cache)`` with the
            cache written but not advanced."""
            tokens = jnp.concatenate([fed, guesses], axis=1)
            width = tokens.shape[1]
            positions = cache.lengths[:, None] + jnp.arange(width, dtype=jnp.int32)[None, :]
            logits_at = jnp.broadcast_to(jnp.arange(first, width, dtype=jnp.int32), (b, m + 1))
            out = self.model.forward(params, tokens, positions, cache,
                                     masks.causal_mask(cache.lengths, width, cache.num_slots),
                                     logits_at=logits_at)
            new, q, kept = self.judge(key, out.logits, guesses, ok)
            return new, q, kept, out.cache

        def record(drafted, qs, n, new, q):
            """Writes ``new`` (and ``q``) at chain positions ``n, n+1, ...`` (past K: dropped;
            entries past the kept ones are overwritten by the next inner round)."""
            cols = n[:, None] + jnp.arange(m + 1, dtype=jnp.int32)[None, :]
            drafted = drafted.at[rows, cols].set(new, mode="drop")
            if qs is not None:
                qs = qs.at[rows, cols].set(q, mode="drop")
            return drafted, qs

        def guess(drafted, n):
            if m == 0:
                return jnp.zeros((b, 0), jnp.int32), jnp.zeros((b, 0), bool)
            return self.lookup(ctx, drafted, n)

        # Inner round 0: the last committed token, pending, then the lookup's guesses.
        n = jnp.zeros((b,), jnp.int32)
        guesses, ok = guess(drafted, n)
        new, q, kept, cache_out = inner(jax.random.fold_in(key, 0), cache,
                                        jnp.stack([prev, ctx.pending], axis=1), guesses, ok, 1)
        cache = set_lengths(cache_out, cache.lengths + 2 + kept)
        drafted, qs = record(drafted, qs, n, new, q)
        n = kept + 1
        last = jnp.take_along_axis(new, kept[:, None], axis=1)[:, 0]  # produced, not yet fed
        forwards = jnp.ones((b,), jnp.int32)
        live = ~ctx.done

        def cond(carry):
            i, _, _, _, n, _, _ = carry
            return (i < k) & jnp.any(live & (n < k))

        def body(carry):
            i, cache, drafted, qs, n, last, forwards = carry
            active = n < k
            guesses, ok = guess(drafted, n)
            new, q, kept, cache_out = inner(jax.random.fold_in(key, i), cache, last[:, None],
                                            guesses, ok, 0)
            cache = set_lengths(cache_out, jnp.where(active, cache.lengths + 1 + kept,
                                                     cache.lengths))
            drafted, qs = record(drafted, qs, jnp.where(active, n, k), new, q)
            last = jnp.where(active, jnp.take_along_axis(new, kept[:, None], axis=1)[:, 0], last)
            return (i + 1, cache, drafted, qs, jnp.where(active, n + kept + 1, n), last,
                    forwards + active.astype(jnp.int32))

        _, cache, drafted, qs, _, _, forwards = jax.lax.while_loop(
            cond, body, (jnp.int32(1), cache, drafted, qs, n, last, forwards))

        tokens = jnp.concatenate([ctx.pending[:, None], drafted], axis=1)
        draft_probs = None
        if qs is not None:
            draft_probs = jnp.concatenate([jnp.zeros_like(qs[:, :1]), qs], axis=1)
        state = StagedState(cache=cache,
                            forwards=state.forwards + jnp.where(live, forwards, 0),
                            proposals=state.proposals + live.astype(jnp.int32))
        return Proposal(tokens=tokens, draft_probs=draft_probs), state, ctx.cache

    # commit: the base class's (the next propose rolls back to the new committed length).


# The method -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StagedOptions(registry.Options):
    draft_len: int = registry.option(4, "Draft tokens per round.", minimum=1)
    lookup_len: int = registry.option(3, "Prompt-lookup tokens the draft model checks per "
                                      "inner forward (at most draft_len - 1 are used).",
                                      minimum=1)
    max_ngram: int = registry.option(3, "Longest n-gram matched.", minimum=1)
    min_ngram: int = registry.option(1, "Shortest n-gram matched.", minimum=1)
    draft_model: Optional[str] = registry.option(
        None, "Registry name or checkpoint path of the draft model; default: the target's "
        "first --draft_layers layers.")
    draft_layers: Optional[int] = registry.option(
        None, f"Without --draft_model: how many of the target's first layers form the draft "
        f"model (default {DEFAULT_DRAFT_LAYERS}, fewer on targets with fewer layers).",
        minimum=1)
    draft_weights: str = draft_weights_option()

    def param_sharding(self) -> str:
        return "by_logical_axes" if self.draft_model else "placed_with_target"


def build(ctx: registry.BuildContext, options: StagedOptions):
    layers = options.draft_layers
    if layers is None:
        layers = max(1, min(DEFAULT_DRAFT_LAYERS, ctx.model.config.num_layers - 1))
    inner, params = draft_model.build(ctx, draft_model.DraftModelOptions(
        draft_len=options.draft_len, draft_model=options.draft_model, draft_layers=layers,
        draft_weights=options.draft_weights))
    return StagedDrafter(inner.model, options.draft_len, options.lookup_len, options.max_ngram,
                         options.min_ngram, ctx.sampling), params


registry.register(registry.Method(
    "staged", StagedOptions, build,
    "staged speculation: the draft model's own drafting is sped up by prompt lookup (the "
    "draft_model chain in fewer draft forwards)", order=94, in_default_benchmark=False))
