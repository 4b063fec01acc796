"""SAM-Decoding (Hu et al., 2024): draft the continuation of the longest suffix match, found with
suffix automata (``drafters/suffix_automaton.py``).

Two automata answer "where did the text's current suffix occur before?":

* **dynamic**, one per batch row, built on the device over the row's own history (prompt,
  emitted tokens, pending token), token by token;
* **static** (optional, ``params``), built once on the host over a corpus
  (``experiments/build_sam_automaton.py``; shipped as ``drafters/weights/<model>/sam.safetensors``).

Each keeps the match of the text so far, ``(state, match_len)``, advanced by every new token in
amortized O(1) transitions. A round drafts a chain of ``draft_len`` tokens: the continuation
of the longer match (ties to the dynamic one) among those at least ``min_match`` (dynamic) /
``static_min_match`` (static) tokens long, or nothing (every node invalid but the root) when
neither is, so a combinator can fall back to another drafter.

* Dynamic continuation: the history after ``firstpos`` (the first end of the match); the
  dynamic match of token ``i`` is taken BEFORE token ``i`` joins the automaton, so it ends
  strictly before ``i`` and at least one token follows it. When the draft runs past the end of
  the history it goes on through the drafted tokens themselves (an overlapping copy, as in
  LZ77): text repeating with period ``p`` matches with a continuation of ``p`` tokens and keeps
  repeating them, instead of a draft cut after ``p`` tokens.
* Static continuation: the corpus after the match's stored end position (the one with the
  longest continuation), up to the end of that sequence; nodes past it are invalid.

State is brought up to date from ``ctx.history`` / ``ctx.history_len`` at the START of
``propose`` (every token not consumed yet, the pending one included, in one ``while_loop``;
the prompt at the first round), and ``commit`` is a no-op: the drafter works unchanged when a
combinator verified a proposal other than its own.

Lossless: drafts are point masses (one chain), verified with the deterministic-draft rule.

Axis glossary: B batch rows, H history slots, S automaton states, E edges, N corpus tokens,
T nodes (``draft_len + 1``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct

from drafters import head_weights, registry
from drafters import suffix_automaton as sa
from specjax.drafter import DrafterBase, Proposal
from specjax.tree import DraftTree

NAME = sa.NAME


@struct.dataclass
class SamState:
    """Per-row drafting state (leading axis B).

    Attributes:
      auto: the rows' dynamic automata (:class:`~drafters.suffix_automaton.DynamicAutomaton`,
        ``[B, S]`` / ``[B, E]`` arrays, sized for the history's ``H`` slots).
      match_state, match_len: int32[B] the dynamic match of the consumed text.
      static_state, static_len: int32[B] the static match (root / 0 without a static automaton).
      consumed: int32[B] history tokens already read (``history[:consumed]``).
    """

    auto: sa.DynamicAutomaton
    match_state: jax.Array
    match_len: jax.Array
    static_state: jax.Array
    static_len: jax.Array
    consumed: jax.Array


@dataclasses.dataclass(frozen=True)
class SamDrafter(DrafterBase):
    """Static configuration (hashable; a jit static argument).

    Attributes:
      vocab_size: V, the target's vocabulary (a static automaton's separator is ``V``).
      draft_len: K, the chain's drafted tokens.
      min_match: the shortest match in the row's own text (tokens, pending included) that is
        drafted from.
      static_min_match: the same for the static automaton: short corpus matches are common and
        rarely continue the way the target does (measured: WORKSPACE "SAM-Decoding").
    """

    vocab_size: int
    draft_len: int = 8
    min_match: int = 2
    static_min_match: int = 4

    deterministic = True
    # Rows without a match offer invalid nodes that need no forward (as in prompt lookup).
    verify_widths = "auto"

    def __post_init__(self):
        if min(self.draft_len, self.min_match, self.static_min_match, self.vocab_size) < 1:
            raise ValueError(f"need vocab_size, draft_len, min_match and static_min_match >= 1, "
                             f"got {self.vocab_size}, {self.draft_len}, {self.min_match}, "
                             f"{self.static_min_match}")

    @property
    def tree(self) -> DraftTree:
        return DraftTree.chain(self.draft_len)

    def check_compatible(self, target) -> None:
        if target.vocab_size != self.vocab_size:
            raise ValueError(f"the sam drafter was built for a vocabulary of {self.vocab_size}, "
                             f"the target has {target.vocab_size}: build it for this target")

    # Drafter contract --------------------------------------------------------------------------

    def init(self, params, ctx, prompt_tokens, prompt_lengths) -> SamState:
        """Empty automata sized for ``ctx.history``'s ``H`` slots; the first ``propose`` reads
        the prompt."""
        del params, prompt_lengths
        b, h = prompt_tokens.shape[0], ctx.history.shape[1]
        zeros = jnp.zeros((b,), jnp.int32)
        return SamState(sa.empty_dynamic(b, h), zeros + sa.ROOT, zeros, zeros + sa.ROOT, zeros,
                        zeros)

    def update(self, params: Optional[dict], state: SamState, history, history_len) -> SamState:
        """``state`` after reading ``history[r, consumed[r]:history_len[r]]`` (int32[B, H],
        int32[B]) into every row's matches and dynamic automaton."""
        h = history.shape[1]
        stop = jnp.minimum(history_len, h)  # the automaton's capacity is H tokens
        steps = sa.search_steps(self.vocab_size)

        def read(row: SamState, hist):
            i = row.consumed
            token = hist[i]
            m, n = sa.dynamic_step(row.auto, row.match_state, row.match_len, token)
            s, sn = row.static_state, row.static_len
            if params is not None:
                s, sn = sa.static_step(params, s, sn, token, steps)
            auto = sa.extend(row.auto, token, i)
            return SamState(auto, sa.settle(auto, m, n), n, s, sn, i + 1)

        def one_row(row: SamState, hist, end):
            return jax.lax.while_loop(lambda r: r.consumed < end, lambda r: read(r, hist), row)

        return jax.vmap(one_row)(state, history, stop)

    def propose(self, params, state: SamState, ctx, key):
        del key
        state = self.update(params, state, ctx.history, ctx.history_len)
        tokens, valid = self.draft(params, state, ctx.history, ctx.history_len)
        tokens = jnp.concatenate([ctx.pending[:, None], tokens], axis=1)
        valid = jnp.concatenate([jnp.ones_like(valid[:, :1]), valid], axis=1)
        return Proposal(tokens=tokens, valid=valid), state, ctx.cache

    def draft(self, params, state: SamState, history, history_len):
        """``(tokens int32[B, K], valid bool[B, K])``: the continuation of the longer match
        among those at least their minimum long (invalid tokens are 0)."""
        b, h = history.shape
        d = jnp.arange(self.draft_len, dtype=jnp.int32)[None, :]
        # Dynamic: history after the first end of the match, copied on cyclically past the end.
        first = jnp.take_along_axis(state.auto.firstpos, state.match_state[:, None], axis=1)
        start = first + 1  # <= history_len - 1 when match_len > 0
        period = jnp.maximum(history_len[:, None] - start, 1)
        src = start + d % period
        dyn_ok = (state.match_len[:, None] > 0) & (src >= 0) & (src < h)
        dyn = jnp.where(dyn_ok, jnp.take_along_axis(history, jnp.where(dyn_ok, src, 0), 1), 0)
        dyn_ok = jnp.broadcast_to(dyn_ok, (b, self.draft_len))
        dyn_len = jnp.where(state.match_len >= self.min_match, state.match_len, 0)
        st_len = jnp.where(state.static_len >= self.static_min_match, state.static_len, 0)
        use_dyn = dyn_len >= st_len
        if params is None:
            tokens, ok = dyn, dyn_ok
        else:  # Static: the corpus after the match's end, up to its sequence's separator.
            corpus = params["tokens"]
            n = corpus.shape[0]
            end = params["firstpos"][state.static_state]  # >= 0 when static_len > 0
            idx = end[:, None] + 1 + d
            inside = (idx >= 0) & (idx < n)
            st = jnp.where(inside, corpus[jnp.where(inside, idx, 0)], self.vocab_size)
            st_ok = (state.static_len[:, None] > 0) & (jnp.cumprod(
                st != self.vocab_size, axis=1) > 0)
            tokens = jnp.where(use_dyn[:, None], dyn, jnp.where(st_ok, st, 0))
            ok = jnp.where(use_dyn[:, None], dyn_ok, st_ok)
        ok = ok & (jnp.maximum(dyn_len, st_len) > 0)[:, None]
        return jnp.where(ok, tokens, 0), ok


# The method -----------------------------------------------------------------------------------


# Default chain length per weight format (WORKSPACE "Chain lengths on packed weights"): shorter
# on packed weights, where a plain step is ~3x cheaper and a multi-token verify is not.
DRAFT_LEN = 8
PACKED_DRAFT_LEN = 4


@dataclasses.dataclass(frozen=True)
class SamOptions(registry.Options):
    draft_len: Optional[int] = registry.option(
        None, f"Draft tokens per round, one chain (default {DRAFT_LEN}; {PACKED_DRAFT_LEN} on "
        "packed weights, --weights=gguf|gguf_a8|int8).", minimum=1)
    min_match: int = registry.option(
        2, "Shortest suffix match (tokens) drafted from; shorter: no draft this round.",
        minimum=1)
    static_min_match: int = registry.option(
        4, "Shortest match in the static automaton drafted from.", minimum=1)
    static: str = registry.option(
        "shipped", "shipped: also match against the static automaton shipped for the model "
        "(drafters/weights/<model>/sam.safetensors, or --static_path); a model with none "
        "shipped runs dynamic-only, as with none. none: the text's own automaton only.",
        choices=("shipped", "none"))
    static_path: str = registry.option(
        "", "A static automaton file (build_sam_automaton) used instead of the shipped one.")

    def param_sharding(self) -> str:
        return "replicated"


def static_file(options: SamOptions, model_name: str) -> Optional[str]:
    """The static automaton file ``options`` ask for on ``model_name`` (None: dynamic only,
    including ``static=shipped`` on a model that has none shipped)."""
    if options.static == "none":
        if options.static_path:
            raise ValueError("static_path is set but static=none: drop one of them")
        return None
    if options.static_path:
        return options.static_path
    path = head_weights.shipped_path(NAME, model_name)
    return path if os.path.exists(path) else None


def build(ctx: registry.BuildContext, options: SamOptions):
    vocab = ctx.lm.model.vocab_size
    draft_len = ctx.size_for_weights(options.draft_len, DRAFT_LEN, PACKED_DRAFT_LEN)
    drafter = SamDrafter(vocab, draft_len, options.min_match, options.static_min_match)
    path = static_file(options, ctx.lm.name)
    if path is None:
        return drafter, None
    return drafter, {k: jnp.asarray(v) for k, v in sa.load_static(path, vocab).items()}


registry.register(registry.Method(
    NAME, SamOptions, build,
    "drafts the continuation of the longest suffix match in the text so far (a suffix automaton "
    "per row) or in a corpus (a static automaton shipped per model; dynamic-only where none "
    "is; SAM-Decoding, training-free)", order=97))
