"""Lookahead decoding (Fu et al. 2024) as a drafter of the speculative loop.

Every round runs ONE target forward over three groups of nodes, under one combined mask:

* the root (node 0): the pending token;
* the *verification branch*: up to G candidate n-grams from the row's n-gram pool whose first
  token is the pending token, each a chain of the N-1 tokens that followed it; candidates that
  share a prefix are merged into a trie (so siblings carry distinct tokens). Node
  ``1 + (d - 1) * G + j`` is candidate j's token at depth d (depth-major, candidate-minor, as
  in ``drafters.prompt_lookup.branch_tree``); merged or missing nodes are invalid padding;
* the *lookahead branch*: a 2-D window of W columns x (N-1) levels of Jacobi trajectory tokens.
  Node ``1 + G * (N - 1) + l * W + i`` is level l (0 = oldest), column i, at position offset
  ``l + 1 + i`` after the root. It sees the root, the level-0 tokens of the columns left of it
  and its own column's tokens of levels <= l: together one contiguous guessed sequence at
  offsets ``1 .. l + 1 + i`` (the paper's 2-D mask). These nodes are never candidates: parent -1,
  ``valid=False``.

Through the drafter contract: ``Proposal.parents`` (the verification trie; -1 elsewhere),
``valid`` (the trie's real nodes), ``depth`` (position offsets of every node, lookahead nodes
included) and ``visible`` (the full ``[B, T, T]`` mask). T = 1 + W (N-1) + G (N-1), static.

``commit`` reads the target's predictions at the newest real level (argmax, also under
sampling: it only shapes future drafts). While the window is filling up (the first N-2 rounds)
the predictions become the next level; once all N-1 levels are real, every column gives an
n-gram ``(level 0, ..., level N-2, prediction)`` that goes into the pool, the oldest level is
dropped and the predictions become the newest level. Level 0 starts as random prompt tokens.

Optional (``history_ngrams``, off in the paper): the pool is also fed the n-grams of the prompt
and of every emitted token, which makes the verification branch a prompt-lookup drafter too.

Verification: greedy exact match (identical to plain greedy decoding); under sampling the
candidates are point masses (``deterministic = True``), verified with the deterministic-draft
rule, which is exact for any fixed tokens; the pool is fixed before the round's acceptance
randomness is drawn.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from drafters import ngram_pool
from drafters.jacobi import node_logits
from drafters import registry
from specjax.drafter import DrafterBase, Proposal
from specjax.sampling import SamplingConfig
from specjax.tree import DraftTree

# Defaults for SmolLM2-135M (see make()).
DEFAULT_WINDOW, DEFAULT_NGRAM, DEFAULT_GUESS_SET = 5, 3, 2


@struct.dataclass
class LookaheadState:
    levels: jax.Array  # int32[B, N-1, W] trajectory tokens, level 0 the oldest
    fill: jax.Array  # int32[B] real levels (1 .. N-1)
    pool: ngram_pool.NGramPool
    hist_len: jax.Array  # int32[B] history length already fed to the pool (history_ngrams)


def budget_tree(window: int, ngram: int, guess_set: int) -> DraftTree:
    """A static tree with the proposal's node count and maximum depth (the loop reads only
    those two: cache slots and per-depth statistics): W(N-1) + G depth-1 nodes, then G chains
    continuing to depth N-1."""
    look, g, d = window * (ngram - 1), guess_set, ngram - 1
    parents = [-1] + [0] * (look + g)
    prev = list(range(1 + look, 1 + look + g))
    for _ in range(2, d + 1):
        start = len(parents)
        parents += prev
        prev = list(range(start, start + g))
    return DraftTree(tuple(parents))


@dataclasses.dataclass(frozen=True)
class LookaheadDrafter(DrafterBase):
    """Static configuration.

    Attributes:
      target: the target model (its LM head turns lookahead hidden states into predictions).
      window: W columns of the lookahead window.
      ngram: N, the n-gram size (N-1 trajectory levels; candidates draft N-1 tokens).
      guess_set: G, the most candidate n-grams verified per round.
      pool_capacity: C, n-grams kept per pool bucket (0: max(G, 1), the paper's choice).
      num_keys: pool buckets (0: the vocabulary size, one per first token).
      history_ngrams: also pool the n-grams of the prompt and of the emitted tokens.
      sampling: the decoding's sampling settings (drafts are point masses either way).
      seed: seeds the random prompt tokens of the initial window.
    """

    target: Any
    window: int = DEFAULT_WINDOW
    ngram: int = DEFAULT_NGRAM
    guess_set: int = DEFAULT_GUESS_SET
    pool_capacity: int = 0
    num_keys: int = 0
    history_ngrams: bool = False
    sampling: SamplingConfig = SamplingConfig()
    seed: int = 0

    # commit reads the predictions at the lookahead window's nodes, which are never offered
    # as candidates: verification must run every node.
    reads_unoffered_outputs = True

    def __post_init__(self):
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.ngram < 2:
            raise ValueError(f"ngram must be >= 2, got {self.ngram}")
        if self.guess_set < 0:
            raise ValueError(f"guess_set must be >= 0, got {self.guess_set}")
        if self.pool_capacity < 0 or self.num_keys < 0:
            raise ValueError("pool_capacity and num_keys must be >= 0 (0 = default)")

    # Static layout ------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self.pool_capacity or max(self.guess_set, 1)

    @property
    def keys(self) -> int:
        return self.num_keys or self.target.vocab_size

    @property
    def num_verify(self) -> int:
        return self.guess_set * (self.ngram - 1)

    @property
    def num_nodes(self) -> int:
        return 1 + self.num_verify + self.window * (self.ngram - 1)

    @property
    def tree(self) -> DraftTree:
        return budget_tree(self.window, self.ngram, self.guess_set)

    def look_node(self, level, col):
        return 1 + self.num_verify + level * self.window + col

    @functools.cached_property
    def _lookahead_layout(self):
        """``(depth int32[W(N-1)], visible bool[W(N-1), T])`` of the lookahead nodes (numpy)."""
        w, levels, t = self.window, self.ngram - 1, self.num_nodes
        depth = np.zeros(w * levels, np.int32)
        visible = np.zeros((w * levels, t), bool)
        for lev in range(levels):
            for i in range(w):
                row = lev * w + i
                depth[row] = lev + 1 + i
                visible[row, 0] = True
                visible[row, [self.look_node(0, c) for c in range(i)]] = True
                visible[row, [self.look_node(m, i) for m in range(lev + 1)]] = True
        depth.setflags(write=False)
        visible.setflags(write=False)
        return depth, visible

    def check_compatible(self, target) -> None:
        if target != self.target:
            raise ValueError("a lookahead drafter must be built from the target it decodes "
                             "with (its LM head produces the lookahead window)")

    # Contract -----------------------------------------------------------------------------------

    def init(self, params, ctx, prompt_tokens, prompt_lengths):
        del params
        b, p = prompt_tokens.shape
        levels, w = self.ngram - 1, self.window
        key = jax.random.key(self.seed)
        idx = jax.random.randint(key, (b, levels * w), 0, jnp.iinfo(jnp.int32).max)
        idx = idx % jnp.maximum(prompt_lengths, 1)[:, None]
        window = jnp.take_along_axis(prompt_tokens, idx, axis=1).reshape(b, levels, w)
        pool = ngram_pool.empty(b, self.keys, self.capacity, self.ngram)
        if self.history_ngrams:  # the prompt and the first token
            width = min(p + 1, ctx.history.shape[1])
            pool = ngram_pool.insert_sequence(pool, ctx.history[:, :width],
                                              jnp.zeros((b,), jnp.int32), ctx.history_len)
        return LookaheadState(levels=window.astype(jnp.int32), fill=jnp.ones((b,), jnp.int32),
                              pool=pool, hist_len=ctx.history_len)

    def verification_branch(self, pool: ngram_pool.NGramPool, pending: jax.Array):
        """The verification trie: ``(tokens, parents, valid, visible)`` of its G(N-1) nodes,
        ``visible bool[B, G(N-1), T]`` over all T nodes."""
        g, d_max, t = self.guess_set, self.ngram - 1, self.num_nodes
        b = pending.shape[0]
        if g == 0:
            return (jnp.zeros((b, 0), jnp.int32), jnp.zeros((b, 0), jnp.int32),
                    jnp.zeros((b, 0), bool), jnp.zeros((b, 0, t), bool))
        cand, found = ngram_pool.lookup(pool, pending, g)  # [B, G, D], [B, G]
        # same[b, d, j, k]: candidates j and k agree on depths 1..d+1 (both found).
        eq = cand[:, :, None, :] == cand[:, None, :, :]  # [B, G, G, D]
        both = found[:, :, None] & found[:, None, :]
        same = jnp.cumprod(eq, axis=-1).astype(bool) & both[..., None]
        same = jnp.moveaxis(same, -1, 1)  # [B, D, G, G]
        # canon[b, d, j]: the first candidate sharing j's prefix up to depth d+1 (the trie node).
        canon = jnp.argmax(same, axis=-1).astype(jnp.int32)  # [B, D, G]
        j_idx = jnp.arange(g, dtype=jnp.int32)
        valid = (canon == j_idx[None, None, :]) & found[:, None, :]  # [B, D, G]
        node = lambda d, j: 1 + d * g + j  # noqa: E731  (d = depth - 1)
        parent_canon = jnp.concatenate([jnp.zeros((b, 1, g), jnp.int32), canon[:, :-1]], 1)
        d_idx = jnp.arange(d_max, dtype=jnp.int32)[None, :, None]
        parents = jnp.where(d_idx == 0, 0, node(d_idx - 1, parent_canon))
        parents = jnp.where(valid, parents, -1)
        tokens = jnp.where(valid, jnp.moveaxis(cand, -1, 1), 0)  # [B, D, G]
        # Node (d, j) sees node (d', canon[d', j]) for d' <= d, and the root.
        anc = ((d_idx[:, :, :, None, None] >= jnp.arange(d_max)[None, None, None, :, None])
               & (jnp.moveaxis(canon, 1, 2)[:, None, :, :, None]
                  == j_idx[None, None, None, None, :]))  # [B, D, G, D', G']
        anc = anc.reshape(b, d_max * g, d_max * g)
        flat_valid = valid.reshape(b, d_max * g)
        eye = jnp.eye(d_max * g, dtype=bool)[None]
        anc = jnp.where(flat_valid[:, :, None], anc, eye)  # padding sees only itself
        visible = jnp.concatenate([
            flat_valid[:, :, None], anc,
            jnp.zeros((b, d_max * g, t - 1 - d_max * g), bool)], axis=2)
        return (tokens.reshape(b, d_max * g), parents.reshape(b, d_max * g), flat_valid,
                visible)

    def propose(self, params, state: LookaheadState, ctx, key):
        del params, key
        b = ctx.pending.shape[0]
        t = self.num_nodes
        look_depth, look_visible = self._lookahead_layout
        v_tokens, v_parents, v_valid, v_visible = self.verification_branch(state.pool,
                                                                           ctx.pending)
        look = state.levels.reshape(b, -1)
        tokens = jnp.concatenate([ctx.pending[:, None], v_tokens, look], axis=1)
        parents = jnp.concatenate([jnp.full((b, 1), -1, jnp.int32), v_parents,
                                   jnp.full(look.shape, -1, jnp.int32)], axis=1)
        valid = jnp.concatenate([jnp.ones((b, 1), bool), v_valid,
                                 jnp.zeros(look.shape, bool)], axis=1)
        v_depth = jnp.repeat(jnp.arange(1, self.ngram, dtype=jnp.int32), self.guess_set)
        depth = jnp.concatenate([jnp.zeros((1,), jnp.int32), v_depth, jnp.asarray(look_depth)])
        root_row = jnp.zeros((b, 1, t), bool).at[:, 0, 0].set(True)
        visible = jnp.concatenate([
            root_row, v_visible,
            jnp.broadcast_to(jnp.asarray(look_visible)[None], (b,) + look_visible.shape)], 1)
        return Proposal(tokens=tokens, parents=parents, valid=valid,
                        depth=jnp.broadcast_to(depth[None], (b, t)), visible=visible), \
            state, ctx.cache

    def commit(self, params, state: LookaheadState, ctx, info):
        del params
        b = info.live.shape[0]
        levels_n, w = self.ngram - 1, self.window
        newest = state.fill - 1
        nodes = self.look_node(newest[:, None], jnp.arange(w, dtype=jnp.int32)[None, :])
        pred = jnp.argmax(node_logits(self.target, ctx, info, nodes), -1).astype(jnp.int32)
        live = info.live
        full = state.fill >= levels_n
        grams = jnp.concatenate([jnp.moveaxis(state.levels, 1, 2), pred[:, :, None]], axis=2)
        pool = ngram_pool.insert(state.pool, grams,
                                 jnp.broadcast_to((live & full)[:, None], (b, w)))
        shifted = jnp.concatenate([state.levels[:, 1:], pred[:, None]], axis=1)
        rows = jnp.arange(b)
        filled = state.levels.at[rows, jnp.minimum(state.fill, levels_n - 1)].set(pred)
        levels = jnp.where(full[:, None, None], shifted, filled)
        levels = jnp.where(live[:, None, None], levels, state.levels)
        fill = jnp.where(live & ~full, state.fill + 1, state.fill)
        hist_len = state.hist_len
        if self.history_ngrams:
            # n-grams ending at the newly emitted tokens (at most N of them per round).
            n = self.ngram
            new_len = ctx.history_len
            starts = hist_len[:, None] - n + 1 + jnp.arange(n, dtype=jnp.int32)[None, :]
            cols = starts[:, :, None] + jnp.arange(n, dtype=jnp.int32)[None, None, :]
            h = ctx.history.shape[1]
            hist_grams = jnp.take_along_axis(ctx.history, jnp.clip(cols, 0, h - 1).reshape(b, -1),
                                             axis=1).reshape(b, n, n)
            ok = live[:, None] & (starts >= 0) & (starts + n <= new_len[:, None])
            pool = ngram_pool.insert(pool, hist_grams, ok)
            hist_len = jnp.where(live, new_len, hist_len)
        return LookaheadState(levels=levels, fill=fill, pool=pool, hist_len=hist_len)


def make(target, *, window: int = DEFAULT_WINDOW, ngram: int = DEFAULT_NGRAM,
         guess_set: int = DEFAULT_GUESS_SET, sampling: SamplingConfig = SamplingConfig(),
         history_ngrams: bool = False, pool_capacity: int = 0):
    """``(drafter, drafter_params)`` for lookahead decoding.

    Defaults for SmolLM2-135M-Instruct (2 chat prompts x 64 tokens, greedy): (W, N, G) =
    (5, 3, 2), T = 15 nodes, tau 1.376; also tried (3,3,3) 1.28, (3,4,2) 1.22, (4,4,4) 1.26,
    (8,3,4) 1.38, (5,3,5) 1.28, (6,5,6) 1.32, (7,2,7) 1.26; history_ngrams made no difference
    there (1.376). The paper's GPU settings (W=15, N=5, G=15) cost 141 nodes per forward.

    Args:
      target: the target model.
      window: W, ngram: N, guess_set: G (T = 1 + (W + G)(N - 1) nodes per round).
      sampling: the decoding's sampling settings.
      history_ngrams: also pool prompt / output n-grams (not in the paper).
      pool_capacity: n-grams kept per first token (0: max(G, 1)).
    """
    return LookaheadDrafter(target=target, window=window, ngram=ngram, guess_set=guess_set,
                            sampling=sampling, history_ngrams=history_ngrams,
                            pool_capacity=pool_capacity), None


# The method -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LookaheadOptions(registry.Options):
    window: int = registry.option(DEFAULT_WINDOW, "W, columns of the lookahead window.",
                                  minimum=1)
    ngram: int = registry.option(DEFAULT_NGRAM, "N, the n-gram size.", minimum=2)
    guess_set: int = registry.option(DEFAULT_GUESS_SET, "G, candidate n-grams verified per "
                                     "round.", minimum=0)

    def param_sharding(self) -> str:
        return "none"


def build(ctx: registry.BuildContext, options: LookaheadOptions):
    return make(ctx.model, window=options.window, ngram=options.ngram,
                guess_set=options.guess_set, sampling=ctx.sampling)


registry.register(registry.Method(
    "lookahead", LookaheadOptions, build,
    "lookahead decoding: a 2-D Jacobi window feeds an n-gram pool verified in the same "
    "forward", order=50))
