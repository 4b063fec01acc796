"""Jacobi decoding and Speculative Jacobi Decoding (SJD) as a drafter of the speculative loop.

A row keeps a *window* of ``n`` guessed tokens that follow its pending token. Each round the
window is proposed as a chain (node 0 = pending, nodes 1..n = guesses), so the verification
forward IS one Jacobi iteration: at every node ``k`` the target predicts the token after the
window's first ``k`` guesses. With ``a`` guesses accepted and the target's token after them as
the new pending token, the refined window is the target's predictions at the nodes after the
accepted prefix, shifted so that they follow the new pending token:

    refined[j] = prediction at node a + 1 + j      for j < n - a
    refined[j] = init policy                       for j >= n - a   (nothing predicted there)

Node ``a + 1`` saw the rejected guess instead of the new pending token: that is exactly the Jacobi
update ``y_{k+1}[i] = f(y_k[< i])``; a fixed point is the greedy continuation.

Greedy (temperature 0): predictions are argmaxes and verification is exact matching, so the
output is plain greedy decoding's by construction.

Sampling (SJD, Teng et al. 2024): the window stores, for each refined position, the *processed
target distribution* ``q`` predicted there (``specjax.sampling.processed_probs``, the decoding's
own temperature / top-k / top-p / min-p); ``propose`` draws the guess from that ``q`` with the
round's drafting key and hands the exact ``q`` to the loop, which verifies the chain with
standard speculative sampling (``accept.speculative_sampling``). Fresh positions are drawn from
the init distribution, recorded exactly: uniform over the vocabulary for ``"random"``, a point
mass on the chosen token for ``"repeat"`` / ``"prompt_lookup"`` (speculative sampling with a
point mass is the deterministic-draft rule).

Why this is exact. Chain speculative sampling outputs the target's distribution whenever guess
``i`` is, conditionally on everything the acceptance test of this round has not yet used, a draw
from the ``q_i`` handed to the verifier; ``q_i`` may depend on anything fixed before the draw
(the committed sequence, earlier rounds, earlier guesses of this chain) but not on this round's
acceptance uniforms. Here ``q_i`` is a function of the *previous* round's forward pass and of
how many guesses that round accepted, all fixed when the previous round ended; the guess is
drawn from it in ``propose`` with ``k_draft``, a key split off independently of the round's
acceptance key ``k_accept`` (``specjax.speculative._round``). The same would NOT hold if
``commit`` drew the refined guesses with randomness shared with the acceptance test, or if a
refined guess's ``q`` were reported as a distribution other than the one it was drawn from
(e.g. the *current* round's distribution at that position, which is only known after the
guess). Conditioning on the past then gives the target's conditional, hence the target's joint.

Init policies for fresh positions (the first round: all ``n``): ``"repeat"`` repeats the token
before the position (the last refined guess, or the pending token); ``"random"`` draws uniform
vocabulary tokens; ``"prompt_lookup"`` copies the continuation of the best n-gram match of the
history (``drafters.prompt_lookup``), aligned so that its first token is window position 0, and
falls back to ``"repeat"`` where the continuation runs out.

State per row: the window tokens ``int32[B, n]`` (greedy), the number of refined positions
``int32[B]``, and under sampling their distributions ``float32[B, n, V]``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import struct

from drafters.prompt_lookup import PromptLookupDrafter
from drafters import registry
from specjax.drafter import Proposal, SampledChainDrafter
from specjax.sampling import SamplingConfig, processed_probs, sample_probs

INITS = ("repeat", "random", "prompt_lookup")
DEFAULT_WINDOW = 2  # SmolLM2-135M: see make()


def node_logits(target, ctx, info, nodes: jax.Array) -> jax.Array:
    """The target's logits ``[B, M, V]`` at verification nodes ``nodes int32[B, M]``.

    Uses ``info.verify_logits`` when the loop provides it; otherwise recomputes them from the
    final hidden states with the target's LM head (M x E x V extra work per round).
    """
    logits = info.verify_logits
    if logits is not None:
        return jnp.take_along_axis(logits, nodes[:, :, None], axis=1).astype(jnp.float32)
    hidden = jnp.take_along_axis(info.verify_hidden, nodes[:, :, None], axis=1)
    return target.lm_head(ctx.target_params, hidden).astype(jnp.float32)


@struct.dataclass
class JacobiState:
    tokens: jax.Array  # int32[B, n] window guesses (greedy; positions >= refined are stale)
    refined: jax.Array  # int32[B] leading window positions produced by the last iteration
    q: Optional[jax.Array] = None  # float32[B, n, V] under sampling: their distributions


@dataclasses.dataclass(frozen=True)
class JacobiDrafter(SampledChainDrafter):
    """Static configuration.

    Attributes:
      target: the target model (its LM head turns verification hidden states into predictions).
      window: n guessed tokens after the pending token (n + 1 nodes per round).
      init_policy: policy for fresh positions, one of ``INITS``.
      sampling: the decoding's sampling settings (temperature 0: Jacobi; else SJD).
      lookup_max_ngram: longest n-gram matched by ``init="prompt_lookup"``.
    """

    target: Any
    window: int = DEFAULT_WINDOW
    init_policy: str = "repeat"
    sampling: SamplingConfig = SamplingConfig()
    lookup_max_ngram: int = 3

    # commit refines the window from the predictions at every node, the rejected ones too.
    reads_unoffered_outputs = True

    def __post_init__(self):
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.init_policy not in INITS:
            raise ValueError(f"unknown init {self.init_policy!r}; choose one of {INITS}")
        if self.lookup_max_ngram < 1:
            raise ValueError(f"lookup_max_ngram must be >= 1, got {self.lookup_max_ngram}")

    @property
    def chain_length(self) -> int:
        return self.window

    @property
    def vocab_size(self) -> int:
        return self.target.vocab_size

    def check_compatible(self, target) -> None:
        if target != self.target:
            raise ValueError("a Jacobi drafter must be built from the target it decodes with "
                             "(its LM head produces the refined guesses)")

    def init(self, params, ctx, prompt_tokens, prompt_lengths):
        b, n = ctx.pending.shape[0], self.window
        q = None if self.sampling.greedy else jnp.zeros((b, n, self.vocab_size), jnp.float32)
        return JacobiState(tokens=jnp.zeros((b, n), jnp.int32),
                           refined=jnp.zeros((b,), jnp.int32), q=q)

    def _fill(self, key, ctx, base, refined):
        """Tokens for fresh positions ``int32[B, n]`` and whether each is a point mass."""
        b, n = base.shape
        # The token before each fresh run: the last refined guess, or the pending token.
        before = jnp.take_along_axis(jnp.concatenate([ctx.pending[:, None], base], axis=1),
                                     refined[:, None], axis=1)
        repeat = jnp.broadcast_to(before, (b, n))
        if self.init_policy == "repeat":
            return repeat, jnp.ones((b, n), bool)
        if self.init_policy == "random":
            tokens = jax.random.randint(key, (b, n), 0, self.vocab_size, jnp.int32)
            return tokens, jnp.zeros((b, n), bool)
        lookup = PromptLookupDrafter(draft_len=n, max_ngram=self.lookup_max_ngram, min_ngram=1)
        ends, found = lookup.find_ends(ctx.history, ctx.history_len)  # [B, 1]
        src = ends + jnp.arange(n, dtype=jnp.int32)[None, :]
        ok = found & (src < ctx.history_len[:, None])
        cont = jnp.take_along_axis(ctx.history, jnp.clip(src, 0, ctx.history.shape[1] - 1), 1)
        return jnp.where(ok, cont, repeat), jnp.ones((b, n), bool)

    def propose(self, params, state: JacobiState, ctx, key):
        del params
        k_sample, k_init = jax.random.split(key)
        n = self.window
        is_refined = jnp.arange(n, dtype=jnp.int32)[None, :] < state.refined[:, None]
        if self.sampling.greedy:
            base = state.tokens
        else:
            # Refined guesses are drawn now, from the recorded q, with the drafting key.
            base = jnp.where(is_refined, sample_probs(k_sample, state.q), 0)
        fill, point = self._fill(k_init, ctx, base, state.refined)
        window = jnp.where(is_refined, base, fill)
        tokens = jnp.concatenate([ctx.pending[:, None], window], axis=1)
        draft_probs = None
        if not self.sampling.greedy:
            v = self.vocab_size
            init_q = jnp.where(point[..., None], jax.nn.one_hot(fill, v, dtype=jnp.float32),
                               jnp.float32(1.0 / v))
            q = jnp.where(is_refined[..., None], state.q, init_q)
            draft_probs = jnp.concatenate([jnp.zeros_like(q[:, :1]), q], axis=1)
        return Proposal(tokens=tokens, draft_probs=draft_probs), state, ctx.cache

    def commit(self, params, state: JacobiState, ctx, info):
        del params
        n = self.window
        a = info.num_accepted
        nodes = a[:, None] + 1 + jnp.arange(n, dtype=jnp.int32)[None, :]  # [B, n]
        logits = node_logits(self.target, ctx, info, jnp.minimum(nodes, n))
        live = info.live
        refined = jnp.where(live, jnp.maximum(n - a, 0), state.refined)
        if self.sampling.greedy:
            tokens = jnp.where(live[:, None], jnp.argmax(logits, -1).astype(jnp.int32),
                               state.tokens)
            return JacobiState(tokens=tokens, refined=refined, q=None)
        q = jnp.where(live[:, None, None], processed_probs(logits, self.sampling), state.q)
        return JacobiState(tokens=state.tokens, refined=refined, q=q)


def make(target, *, window: int = DEFAULT_WINDOW, init: str = "repeat",
         sampling: SamplingConfig = SamplingConfig()):
    """``(drafter, drafter_params)`` for Jacobi decoding (greedy) / SJD (sampling).

    Default window for SmolLM2-135M-Instruct (2 chat prompts x 64 tokens, greedy, "repeat"):
    tau 1.049 at window 2, 1.041 at 4 and 8 (2-core CPU: the smallest window is also the
    cheapest round). Jacobi rarely converges faster than one token per step on an untrained
    model; the window is mostly paid for, not used.

    Args:
      target: the target model.
      window: guessed tokens per round.
      init: fresh-guess policy, one of ``INITS``.
      sampling: the decoding's sampling settings (must be the DecodeConfig's).
    """
    return JacobiDrafter(target=target, window=window, init_policy=init, sampling=sampling), None


# The methods: jacobi (greedy) and sjd (the same drafter, named for sampling) ---------------------


@dataclasses.dataclass(frozen=True)
class JacobiOptions(registry.Options):
    window: int = registry.option(DEFAULT_WINDOW, "Guessed tokens refined per round.",
                                  minimum=1)
    jacobi_init: str = registry.option("repeat", "Fresh guesses: repeat, random or "
                                       "prompt_lookup.", choices=INITS)

    def param_sharding(self) -> str:
        return "none"


def build(ctx: registry.BuildContext, options: JacobiOptions):
    return make(ctx.model, window=options.window, init=options.jacobi_init,
                sampling=ctx.sampling)


registry.register(registry.Method(
    "jacobi", JacobiOptions, build,
    "Jacobi iteration: a window of guesses refined by every verification forward", order=40))
registry.register(registry.Method(
    "sjd", JacobiOptions, build,
    "speculative Jacobi decoding: Jacobi's window verified by speculative sampling (the same "
    "as jacobi when greedy)", order=41, in_default_benchmark=False))
