"""A draft model with ANOTHER tokenizer (Timor et al. 2025, SEEDS [9]; transformers' "universal
assisted generation"): lossless drafting across vocabularies, entirely on the device.

The two vocabularies are related by static id maps built once on the host from the two
tokenizers (:mod:`drafters.cross_vocab_maps`): every target id's bytes as draft ids, every draft
id's bytes as target ids (up to a static width, with a length; 0 = no translation), and the
intersection of the vocabularies (ids that are one token on both sides). Inside the loop only
these tables are read: no host round-trip, no tokenizer.

**The draft's own context.** The draft model keeps its own KV cache over its rendering of the
committed text: each committed target token is replaced by its draft ids (the bytes of the
rendering equal the bytes of the target text; a target id without a translation is skipped).
The prompt is rendered the same way, at ``init``: ``init`` runs under ``jit`` on device
arrays, so an exact re-tokenisation of the prompt text by the draft tokenizer would need a
host-side hook in the drafter contract (the rendering is text-exact, only split differently).
State per row: the draft cache (committed draft length), ``last`` (the last rendered draft
token, NOT in the committed cache: the next ``propose`` feeds it again, which yields the logits
to draft from without storing them), and ``consumed`` (how many tokens of the loop's
``history`` are rendered). ``propose`` renders ``history[consumed:history_len]`` (the tokens
committed since, pending included) and feeds ``[last, rendering...]`` as one block of a static
width with a per-row count (a ``lax.while_loop`` of blocks when a backlog is wider: the prompt
at ``init``, or a round with long expansions). ``commit`` does nothing: the state follows the
history, whoever proposed what, so the drafter composes (``commits_any_proposal``). The drafted
tokens are scratch entries past the committed length, overwritten next round (a cheaper
alternative, keeping the drafted entries of accepted tokens as draft_model does, would only be
right when the accepted target tokens re-render into exactly the drafted draft tokens).
The draft cache has :meth:`CrossVocabDrafter.draft_slots` slots (the target's, times 1.5 x
``expansion`` when a target id can take several draft ids; ``expansion`` = draft tokens per
target token, measured on a sample text at build time); a row whose rendering outgrows it stops
drafting (``full``), and its output is unchanged (verified as always).

**Greedy (SLEM-style).** The draft model drafts ``draft_steps`` tokens greedily in its own
vocabulary; their target expansions are concatenated into one chain (cut at the first draft
token without a translation) and its first ``draft_len`` target tokens are proposed. The
target verifies them as usual, so the output is plain greedy decoding's whatever is proposed.

**Re-joining pieces (greedy).** A target token whose text spans two draft tokens (Qwen's
``"():\n"`` after SmolLM2's ``"():"`` and ``"\n"``) would never be proposed by the per-token
expansions alone. With ``merge_pieces`` (the default when the maps hold the target's merge
table, :func:`drafters.cross_vocab_maps.merge_table`) the concatenated expansions are re-joined
as a BPE would: while two neighbours are one target token, the pair making the lowest id is
joined (byte-level BPEs number tokens in merge order). This approximates SLEM's
re-tokenisation of the drafted text on the device: it cannot move a boundary inside a piece or
see the tokenizer's pre-tokenizer boundaries, and the last token may still grow with text not
drafted yet. With ``merge_rendering`` the draft's rendering of the target's text is re-joined
the same way through the draft's table. Whatever is proposed is verified as always.

**Sampling (TLI).** Each draft step restricts the draft's processed distribution (the
decoding's temperature / top-k / top-p / min-p) to the intersection, renormalises it and draws
a draft token there; as the intersection pairs ids one to one, that draw IS a draw of the
paired target token from ``q`` = the restricted distribution moved to target ids, which is
recorded in ``Proposal.draft_probs`` for standard speculative sampling: lossless. A row whose
draft puts no mass on the intersection stops its chain there (invalid nodes).

**Limits (why acceptance can be lower than within one vocabulary).** Translation is per token:
a target token that spans two draft tokens' text is never proposed (the chain proposes its
pieces), and the draft reads the target text rendered token by token, not as its own tokenizer
would split it. Two vocabularies that share most tokens (byte-level BPEs of one era, or one
tokenizer) lose little; a much finer draft vocabulary (bytes) proposes little the target
accepts. Re-tokenising the drafted text with the target's BPE on the device (SLEM's exact
re-tokenisation) would lift that and is left open.

Without ``--draft_model`` the draft is the target's first layers with the target's own
vocabulary (identity maps, no tokenizer needed): the same drafts as ``draft_model``, through
this path.

Axis glossary: B batch rows, W block width, V_t / V_d target / draft vocabularies, K draft_len.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import struct

from drafters import draft_model as draft_model_lib
from drafters import registry
from drafters.cross_vocab_maps import VocabMaps, build_maps, identity_maps
from specjax import masks
from specjax.cache import KVCache, set_lengths
from specjax.drafter import Proposal, SampledChainDrafter
from specjax.sampling import SamplingConfig, processed_probs, sample_probs

DEFAULT_DRAFT_LAYERS = 4


@struct.dataclass
class CrossVocabState:
    """The drafter's state (see the module docstring).

    Attributes:
      cache: the draft model's cache over its rendering; ``lengths`` excludes ``last``.
      last: int32[B] the last rendered draft token (fed again by the next ``propose``).
      has_last: bool[B] whether anything is rendered yet.
      consumed: int32[B] tokens of the loop's ``history`` rendered so far.
      full: bool[B] the draft cache ran out of room: the row stops drafting (still lossless).
    """

    cache: KVCache
    last: jax.Array
    has_last: jax.Array
    consumed: jax.Array
    full: jax.Array


@dataclasses.dataclass(frozen=True)
class CrossVocabDrafter(SampledChainDrafter):
    """Static configuration; the maps are in the params (``{"model": ..., "maps": ...}``, see
    :func:`make_drafter`).

    Attributes:
      model: the draft :class:`~specjax.model_api.LanguageModel` (its own vocabulary).
      target_vocab: the target's vocabulary size the maps were built for.
      draft_len: K target tokens proposed per round (the chain).
      draft_steps: draft-model tokens per round under greedy decoding (0: ``draft_len``); under
        sampling each draft token is one target token, so it drafts ``draft_len``.
      sampling: the decoding's sampling settings.
      t2d_width / d2t_width: widths of the two maps (the longest translation).
      expansion: draft tokens per target token in typical text (sizes the feed blocks and the
        draft cache; ``VocabMaps.sample_expansion`` unless the user gives one).
      draft_start: a draft id every rendering starts with (the draft's BOS), or -1.
      merge_steps: binary-search steps of the target's merge table
        (``VocabMaps.merge_search_steps``); 0: the greedy chain's pieces are not re-joined.
      render_merge_steps: the same for the draft's table
        (``VocabMaps.draft_merge_search_steps``); 0: the draft reads the target's text as the
        concatenated per-token renderings, not re-joined.
    """

    model: Any
    target_vocab: int
    draft_len: int = 4
    draft_steps: int = 0
    sampling: SamplingConfig = SamplingConfig()
    t2d_width: int = 1
    d2t_width: int = 1
    expansion: float = 1.0
    draft_start: int = -1
    merge_steps: int = 0
    render_merge_steps: int = 0

    def __post_init__(self):
        if self.draft_len < 1 or self.draft_steps < 0:
            raise ValueError(f"draft_len must be >= 1 and draft_steps >= 0, got "
                             f"{self.draft_len}, {self.draft_steps}")

    @property
    def steps(self) -> int:
        """Draft-model tokens drafted per round."""
        if not self.sampling.greedy:
            return self.draft_len
        return self.draft_steps or self.draft_len

    def check_compatible(self, target) -> None:
        if target.vocab_size != self.target_vocab:
            raise ValueError(f"cross_vocab maps were built for a target vocabulary of "
                             f"{self.target_vocab} ids, the target has {target.vocab_size}: "
                             "build the drafter for this target")

    # Sizes (static) ---------------------------------------------------------------------------

    def _block_width(self, new_tokens: int) -> int:
        """A feed block: ``last`` plus the typical rendering of ``new_tokens`` target tokens,
        and room for the widest one."""
        return 1 + math.ceil(new_tokens * self.expansion) + self.t2d_width - 1

    def draft_slots(self, target_slots: int) -> int:
        """Draft cache slots for a target cache of ``target_slots`` (a rendering longer than
        that on average stops the row's drafting, never its output)."""
        ratio = 1.0 if self.t2d_width == 1 else 1.5 * max(1.0, self.expansion)
        return (math.ceil(target_slots * ratio) + self._block_width(self.draft_len + 1)
                + self.steps + 2)

    # The contract -----------------------------------------------------------------------------

    def init(self, params, ctx, prompt_tokens, prompt_lengths):
        b, p = prompt_tokens.shape
        num_slots = self.draft_slots(ctx.cache.num_slots)
        start = self.draft_start
        state = CrossVocabState(
            cache=self.model.init_cache(b, num_slots),
            last=jnp.full((b,), max(start, 0), jnp.int32),
            has_last=jnp.full((b,), start >= 0), consumed=jnp.zeros((b,), jnp.int32),
            full=jnp.zeros((b,), bool))
        width = min(self._block_width(p + 1), num_slots)
        state, _, _ = self._feed(params, state, ctx.history, ctx.history_len, width)
        return state

    def propose(self, params, state, ctx, key):
        maps = params["maps"]
        state, logits, fed = self._feed(params, state, ctx.history, ctx.history_len,
                                        self._block_width(self.draft_len + 1))
        can = fed & ~state.full & (state.consumed >= ctx.history_len)
        num_slots = state.cache.num_slots
        cache = set_lengths(state.cache, state.cache.lengths + 1)  # `last` was just written
        keys = jax.random.split(key, self.steps)
        first = self._pick(maps, keys[0], logits)

        def step(carry, step_key):
            cache, token = carry
            out = self.model.forward(params["model"], token[:, None], cache.lengths[:, None],
                                     cache, masks.causal_mask(cache.lengths, 1, num_slots))
            cache = set_lengths(out.cache, cache.lengths + 1)
            picked = self._pick(maps, step_key, out.logits[:, 0])
            return (cache, picked[0]), picked

        (cache, _), rest = jax.lax.scan(step, (cache, first[0]), keys[1:])
        picks = jax.tree.map(lambda a, r: jnp.concatenate([a[:, None], jnp.moveaxis(r, 0, 1)],
                                                          axis=1), first, rest)
        if self.sampling.greedy and self.merge_steps:
            pieces, ok = _chain(maps, picks[0], self.steps * self.d2t_width)
            chain, valid = _merge_pieces(maps, pieces, ok, self.draft_len, self.merge_steps)
            draft_probs = None
        elif self.sampling.greedy:
            chain, valid = _chain(maps, picks[0], self.draft_len)
            draft_probs = None
        else:
            _, chain, ok, q = picks  # [B, K], [B, K], [B, K, V_t]
            valid = jnp.cumprod(ok.astype(jnp.int32), axis=1).astype(bool)
            draft_probs = jnp.concatenate([jnp.zeros_like(q[:, :1]), q], axis=1)
        valid = valid & can[:, None]
        tokens = jnp.concatenate([ctx.pending[:, None], jnp.where(valid, chain, 0)], axis=1)
        valid = jnp.concatenate([jnp.ones_like(valid[:, :1]), valid], axis=1)
        state = state.replace(cache=set_lengths(cache, state.cache.lengths))
        return Proposal(tokens=tokens, valid=valid, draft_probs=draft_probs), state, ctx.cache

    # commit: the base class's. The state follows the history (see the module docstring).

    # Steps ------------------------------------------------------------------------------------

    def _pick(self, maps, key, logits):
        """One draft token from the draft's logits: greedy ``(d,)``; sampling (TLI)
        ``(d, target token, ok, q over target ids)``."""
        if self.sampling.greedy:
            return (jnp.argmax(logits, axis=-1).astype(jnp.int32),)
        in_both = maps["tli_t_of_d"] >= 0
        q = jnp.where(in_both[None], processed_probs(logits, self.sampling), 0.0)
        mass = q.sum(-1, keepdims=True)
        ok = mass[:, 0] > 0
        q = q / jnp.where(mass > 0, mass, 1.0)
        d = sample_probs(key, q)
        target = jnp.maximum(maps["tli_t_of_d"][d], 0)
        d_of_t = maps["tli_d_of_t"]
        q_target = jnp.where(d_of_t[None] >= 0, jnp.take(q, jnp.maximum(d_of_t, 0), axis=1), 0.0)
        return d, target, ok, q_target

    def _feed(self, params, state: CrossVocabState, history, history_len, width: int):
        """Renders ``history[consumed:history_len]`` into the draft cache in blocks of
        ``width`` (at least one block: ``last`` is always fed again).

        Returns:
          ``(state, logits float32[B, V_d] at the last rendered token, fed bool[B])``.
        """
        b = history.shape[0]

        def body(carry):
            state, logits, fed, i = carry
            state, new_logits, new_fed = self._block(params, state, history, history_len, width)
            logits = jnp.where(new_fed[:, None], new_logits, logits)
            return state, logits, fed | new_fed, i + 1

        def cond(carry):
            state, _, _, i = carry
            return (i == 0) | jnp.any(~state.full & (state.consumed < history_len))

        init = (state, jnp.zeros((b, self.model.vocab_size), jnp.float32),
                jnp.zeros((b,), bool), jnp.int32(0))
        state, logits, fed, _ = jax.lax.while_loop(cond, body, init)
        return state, logits, fed

    def _block(self, params, state: CrossVocabState, history, history_len, width: int):
        """One feed block: ``[last] + renderings of the next target tokens that fit``."""
        maps = params["maps"]
        cache = state.cache
        num_slots = cache.num_slots
        col = jnp.arange(width, dtype=jnp.int32)[None, :]  # [1, W]
        lead = state.has_last.astype(jnp.int32)[:, None]  # [B, 1]
        pos = state.consumed[:, None] + col  # candidate target tokens
        avail = (pos < history_len[:, None]) & ~state.full[:, None]
        tok = jnp.take_along_axis(history, jnp.clip(pos, 0, history.shape[1] - 1), axis=1)
        elen = jnp.where(avail, maps["t2d_len"][tok], 0)
        end = jnp.cumsum(elen, axis=1)  # rendering offsets where each token ends
        room = jnp.minimum(width, num_slots - cache.lengths - self.steps - 2)[:, None]
        take = avail & (lead + end <= room)  # a prefix of the candidates
        total = lead[:, 0] + jnp.where(take, elen, 0).sum(1)
        stuck = avail[:, 0] & ~take[:, 0]
        r = col - lead  # rendering offset of each block slot
        ends = jnp.where(take, end, jnp.iinfo(jnp.int32).max)
        src = jnp.minimum((ends[:, None, :] <= r[:, :, None]).sum(-1), width - 1)  # [B, W]
        begin = jnp.take_along_axis(end - elen, src, axis=1)
        sub = jnp.clip(r - begin, 0, maps["t2d"].shape[1] - 1)
        rendered = maps["t2d"][jnp.take_along_axis(tok, src, axis=1), sub]
        tokens = jnp.where(col < lead, state.last[:, None], rendered)
        tokens = jnp.where(col < total[:, None], jnp.maximum(tokens, 0), 0)
        if self.render_merge_steps:  # the draft's own joins (``last`` may join the first piece)
            tokens, ok = _merge_pieces(maps, tokens, col < total[:, None], width,
                                       self.render_merge_steps, "dmerge")
            total = ok.sum(axis=1, dtype=jnp.int32)
        at = jnp.maximum(total - 1, 0)
        out = self.model.forward(params["model"], tokens, cache.lengths[:, None] + col, cache,
                                 masks.causal_mask(cache.lengths, width, num_slots),
                                 logits_at=at[:, None])
        fed = total > 0
        new_last = jnp.take_along_axis(tokens, at[:, None], axis=1)[:, 0]
        state = CrossVocabState(
            cache=set_lengths(out.cache, cache.lengths + at),
            last=jnp.where(fed, new_last, state.last), has_last=state.has_last | fed,
            consumed=state.consumed + take.sum(1, dtype=jnp.int32), full=state.full | stuck)
        return state, out.logits[:, 0], fed


def _chain(maps, drafted, length: int):
    """The target chain of greedy draft tokens ``drafted[B, S]``: their target expansions
    concatenated, cut at the first draft token without one, first ``length`` tokens.

    Returns:
      ``(tokens int32[B, length], valid bool[B, length])``.
    """
    n = maps["d2t_len"][drafted]  # [B, S]
    n = jnp.where(jnp.cumprod((n > 0).astype(jnp.int32), axis=1) > 0, n, 0)
    end = jnp.cumsum(n, axis=1)
    k = jnp.arange(length, dtype=jnp.int32)[None, :]
    src = jnp.minimum((end[:, None, :] <= k[:, :, None]).sum(-1), drafted.shape[1] - 1)
    begin = jnp.take_along_axis(end - n, src, axis=1)
    sub = jnp.clip(k - begin, 0, maps["d2t"].shape[1] - 1)
    tokens = maps["d2t"][jnp.take_along_axis(drafted, src, axis=1), sub]
    valid = k < end[:, -1:]
    return jnp.where(valid, jnp.maximum(tokens, 0), 0), valid


def _merged(maps, first: jax.Array, second: jax.Array, steps: int, table: str = "merge"
            ) -> jax.Array:
    """``int32[...]`` (the ids' shape): the id whose bytes are ``first``'s then ``second``'s
    (the merge table's entry, found by ``steps`` binary-search steps in ``first``'s row), or
    -1. ``table``: ``"merge"`` (the target's ids) or ``"dmerge"`` (the draft's)."""
    start, nxt, into = (maps[f"{table}_{k}"] for k in ("start", "next", "into"))
    last = nxt.shape[0] - 1
    first = jnp.maximum(first, 0)
    lo, end = start[first], start[first + 1]

    def step(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) // 2
        less = nxt[jnp.minimum(mid, last)] < second
        open_ = lo < hi
        return jnp.where(open_ & less, mid + 1, lo), jnp.where(open_ & ~less, mid, hi)

    lo, _ = jax.lax.fori_loop(0, steps, step, (lo, end))
    at = jnp.minimum(lo, last)
    return jnp.where((lo < end) & (nxt[at] == second), into[at], -1)


def _merge_pieces(maps, pieces: jax.Array, ok: jax.Array, length: int, steps: int,
                  table: str = "merge"):
    """The chain of ``pieces[B, S]`` (a valid prefix ``ok``) with neighbours re-joined as a BPE
    would: while any two neighbours are one target token, the pair that makes the lowest id
    (byte-level BPE vocabularies number their tokens in merge order) is joined; then the first
    ``length`` tokens.

    Returns:
      ``(tokens int32[B, length], valid bool[B, length])``.
    """
    b, s = pieces.shape
    col = jnp.arange(s)[None, :]
    pair = col[:, :-1]  # pair p joins tokens p and p + 1
    none = jnp.iinfo(jnp.int32).max

    def candidates(toks, count):
        joined = _merged(maps, toks[:, :-1], toks[:, 1:], steps, table)  # [B, S - 1]
        live = (pair + 1 < count[:, None]) & (joined >= 0)
        return jnp.where(live, joined, none)

    def cond(carry):
        _, _, rank, i = carry
        return (i < s - 1) & jnp.any(rank.min(axis=1) < none)

    def body(carry):
        toks, count, rank, i = carry
        j = jnp.argmin(rank, axis=1)  # [B]: the pair (j, j + 1) to join
        best = rank.min(axis=1)  # its token (rank = id)
        can = best < none
        jc = j[:, None]
        shifted = jnp.concatenate([toks[:, 1:], toks[:, -1:]], axis=1)
        toks = jnp.where(can[:, None],
                         jnp.where(col == jc, best[:, None], jnp.where(col > jc, shifted, toks)),
                         toks)
        count = count - can.astype(jnp.int32)
        # Only the two pairs beside the new token change; the pairs after it move down by one.
        take = lambda at: jnp.take_along_axis(toks, jnp.clip(at, 0, s - 1)[:, None], 1)[:, 0]
        made = jnp.where(can, best, 0)
        left = _merged(maps, take(j - 1), made, steps, table)
        right = _merged(maps, made, take(j + 1), steps, table)
        moved = jnp.concatenate([rank[:, 1:], jnp.full((b, 1), none, rank.dtype)], axis=1)
        new = jnp.where(pair == jc - 1, jnp.where(left >= 0, left, none)[:, None],
                        jnp.where(pair == jc, jnp.where(right >= 0, right, none)[:, None],
                                  jnp.where(pair > jc, moved, rank)))
        new = jnp.where(pair + 1 < count[:, None], new, none)
        return toks, count, jnp.where(can[:, None], new, rank), i + 1

    count = ok.sum(axis=1, dtype=jnp.int32)
    toks = jnp.where(ok, pieces, 0)
    if s > 1:  # one piece has no neighbour
        toks, count, _, _ = jax.lax.while_loop(cond, body, (toks, count,
                                                            candidates(toks, count), jnp.int32(0)))
    if s < length:
        toks = jnp.pad(toks, ((0, 0), (0, length - s)))
    valid = jnp.arange(length)[None, :] < count[:, None]
    return jnp.where(valid, toks[:, :length], 0), valid


def make_drafter(model, model_params, maps: VocabMaps, draft_len: int = 4,
                 draft_steps: int = 0, sampling: SamplingConfig = SamplingConfig(),
                 expansion: float = 0.0, merge_pieces: bool = True,
                 merge_rendering: bool = True):
    """``(CrossVocabDrafter, params)`` for a draft ``model`` and the ``maps`` between the
    target's vocabulary and the draft's (:func:`drafters.cross_vocab_maps.build_maps`);
    ``expansion`` 0 takes the maps' ``sample_expansion``; ``merge_pieces``: re-join the greedy
    chain's pieces through the maps' merge table (when they have one); ``merge_rendering``:
    re-join the draft's rendering of the target's text through the draft's table."""
    if maps.draft_vocab != model.vocab_size:
        raise ValueError(f"the maps are for a draft vocabulary of {maps.draft_vocab} ids, the "
                         f"draft model has {model.vocab_size}")
    drafter = CrossVocabDrafter(
        model, maps.target_vocab, draft_len, draft_steps, sampling,
        t2d_width=int(maps.target_to_draft.shape[1]),
        d2t_width=int(maps.draft_to_target.shape[1]),
        expansion=float(expansion or maps.sample_expansion),
        draft_start=int(maps.draft_start),
        merge_steps=maps.merge_search_steps if merge_pieces else 0,
        render_merge_steps=maps.draft_merge_search_steps if merge_rendering else 0)
    arrays = {k: jnp.asarray(v) for k, v in maps.arrays().items()}
    if not drafter.merge_steps:
        arrays = {k: v for k, v in arrays.items() if not k.startswith("merge_")}
    if not drafter.render_merge_steps:
        arrays = {k: v for k, v in arrays.items() if not k.startswith("dmerge_")}
    return drafter, {"model": model_params, "maps": arrays}


# The method -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CrossVocabOptions(registry.Options):
    draft_model: Optional[str] = registry.option(
        None, "Registry name or checkpoint path of the draft model, with its own tokenizer "
        "(both tokenizers are required); default: the target's first --draft_layers layers "
        "with the target's vocabulary (identity maps).")
    draft_len: int = registry.option(4, "Target tokens proposed per round.", minimum=1)
    draft_steps: int = registry.option(
        0, "Draft-model tokens per round under greedy decoding (0: --draft_len); sampling "
        "drafts one per target token.", minimum=0)
    draft_layers: Optional[int] = registry.option(
        None, f"Without --draft_model: how many of the target's first layers form the draft "
        f"model (default {DEFAULT_DRAFT_LAYERS}, fewer on targets with fewer layers).",
        minimum=1)
    draft_weights: str = draft_model_lib.draft_weights_option()
    max_expansion: int = registry.option(
        16, "Longest translation of one token kept in the vocabulary maps (longer: untranslated).",
        minimum=1)
    expansion: float = registry.option(
        0.0, "Draft tokens per target token the draft's feed blocks and cache are sized for "
        "(0: measured on a built-in sample text; raise it for text the draft splits finer).",
        minimum=0.0)
    merge_pieces: bool = registry.option(
        True, "Greedy: re-join the drafted text's target pieces through the target's merge "
        "table, so that target tokens spanning two draft tokens are proposed (lossless either "
        "way).")
    merge_rendering: bool = registry.option(
        True, "Re-join the draft's rendering of the target's text (prompt and committed tokens) "
        "through the draft's merge table, so that the draft reads text split about as its own "
        "tokenizer would (lossless either way).")

    def param_sharding(self) -> str:
        return "replicated" if self.draft_model else "placed_with_target"


def build(ctx: registry.BuildContext, options: CrossVocabOptions):
    draft_model_lib.check_draft_weights(options)
    if options.draft_model is None:
        layers = options.draft_layers
        if layers is None:
            layers = max(1, min(DEFAULT_DRAFT_LAYERS, ctx.model.config.num_layers - 1))
        model, params = draft_model_lib.from_target_layers(ctx.model, ctx.params, layers)
        maps = identity_maps(ctx.model.vocab_size)
    else:
        if ctx.lm.tokenizer is None:
            raise ValueError(f"cross_vocab: the target {ctx.lm.name!r} has no tokenizer, and the "
                             "vocabulary maps are built from both tokenizers: use a target "
                             "that ships one")
        small = draft_model_lib.load_named(ctx, options.draft_model, options.draft_weights)
        if small.tokenizer is None:
            raise ValueError(f"cross_vocab: the draft model {options.draft_model!r} has no "
                             "tokenizer, and the vocabulary maps are built from both "
                             "tokenizers: use a draft model that ships one")
        maps = build_maps(ctx.lm.tokenizer, small.tokenizer, ctx.model.vocab_size,
                          small.model.vocab_size, options.max_expansion)
        model, params = small.model, small.params
    return make_drafter(model, params, maps, options.draft_len, options.draft_steps,
                        ctx.sampling, options.expansion, options.merge_pieces,
                        options.merge_rendering)


registry.register(registry.Method(
    "cross_vocab", CrossVocabOptions, build,
    "a draft model with another tokenizer (static vocabulary maps; string-level chains when "
    "greedy, token-level intersection when sampling)", order=93, in_default_benchmark=False))
