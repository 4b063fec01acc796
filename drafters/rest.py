"""REST (He et al., 2023): retrieval-based speculative decoding from a datastore of text.

A datastore (``drafters/rest_datastore.py``: a corpus's tokens and their suffix array, built
offline on the host and shipped like weights) is queried with the row's last tokens; what
followed the matches is merged into a trie, verified by the target in one pass. No model runs
while drafting. Each round, for every row, inside ``propose`` (static shapes, no host trip):

1. **Match.** For every n-gram size ``n`` in ``max_ngram .. min_ngram`` the range of the suffix
   array whose first ``n`` tokens equal the row's last ``n`` history tokens (the pending token
   last) is found by two binary searches of a fixed number of steps; the longest ``n`` with a
   non-empty range wins.
2. **Retrieve.** ``C = num_candidates`` suffixes of the range, spread evenly over it (all of
   them when it holds at most ``C``): the range is sorted by what follows the match, so an even
   spread samples the continuations in proportion to their frequency (the first ``C`` would
   favour small token ids). Their continuations ``[C, L]`` (``L = draft_depth``) stop at the
   end of their sequence.
3. **Trie.** Every distinct prefix of a continuation is one node, counted by the candidates
   that share it, scored ``count * (L + 1) + (L - depth)``; the ``num_nodes`` best prefixes are
   kept, in BFS (depth-major) order, node 0 the pending token, padding marked invalid. A row
   without a match offers no drafted node.

Kept set closed under parents: a prefix ``p`` of depth ``d >= 2`` has its parent ``p'`` (depth
``d - 1``) in the pool, and every candidate sharing ``p`` shares ``p'``, so ``count(p') >=
count(p)`` and ``score(p') >= count(p) * (L + 1) + (L - d + 1) > score(p)``. ``top_k`` keeps
elements so that none left out scores above one kept: if ``p`` is kept, ``p'`` is too.

Stateless (``init`` / ``commit`` are the contract's defaults): a round's proposal depends only
on the history and the datastore, whoever verified the last one. Drafts are distinct point
masses (siblings are different prefixes, hence different tokens), so greedy and sampled
verification stay lossless unchanged.

Axis glossary: B batch, H history slots, N datastore tokens, M suffixes, G n-gram sizes,
C candidates, L draft depth, T nodes (``num_nodes + 1``, the root included).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct

from drafters import head_weights, registry
from drafters.rest_datastore import BUILD_HINT, NAME, Datastore, load_datastore
from specjax.drafter import DrafterBase, Proposal
from specjax.tree import DraftTree


@struct.dataclass
class Retrieval:
    """What the datastore gave each row.

    Attributes:
      ngram: int32[B] matched n-gram size (0: no match).
      count: int32[B] suffixes in the matched range.
      tokens: int32[B, C, L] the candidates' continuations (the separator past their end).
      valid: bool[B, C, L] real continuation tokens (a taken candidate, before its end).
    """

    ngram: jax.Array
    count: jax.Array
    tokens: jax.Array
    valid: jax.Array


@dataclasses.dataclass(frozen=True)
class RestDrafter(DrafterBase):
    """Static configuration. Params: ``{"tokens": int32[N], "suffix_array": int32[M]}``
    (:meth:`params_of` a :class:`~drafters.rest_datastore.Datastore`).

    Attributes:
      vocab_size: ``V``, the target's vocabulary; the datastore's separator id.
      num_candidates: ``C``, suffixes retrieved per round.
      num_nodes: drafted nodes kept (the root excluded).
      draft_depth: ``L``, continuation tokens per candidate.
      max_ngram, min_ngram: the n-gram sizes matched, longest first.
    """

    vocab_size: int
    num_candidates: int = 32
    num_nodes: int = 8
    draft_depth: int = 6
    max_ngram: int = 8
    min_ngram: int = 1

    deterministic = True  # retrieved tokens are point masses
    siblings = "without_replacement"  # siblings are distinct prefixes: distinct tokens
    # Rows without a match (and short tries) pad with invalid nodes that need no forward.
    verify_widths = "auto"

    def __post_init__(self):
        if min(self.num_candidates, self.num_nodes, self.draft_depth) < 1:
            raise ValueError("num_candidates, num_nodes and draft_depth must be >= 1, got "
                             f"{self.num_candidates}, {self.num_nodes}, {self.draft_depth}")
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {self.min_ngram}, "
                             f"{self.max_ngram}")
        if self.num_nodes > self.num_candidates * self.draft_depth:
            raise ValueError(f"num_nodes {self.num_nodes} is over the {self.num_candidates} x "
                             f"{self.draft_depth} prefixes retrieved: lower it or raise "
                             "num_candidates / draft_depth")

    @property
    def tree(self) -> DraftTree:
        """The budget's shape (the proposal brings its own parents): ``num_nodes + 1`` nodes,
        as deep as ``min(L, num_nodes)``."""
        d = min(self.draft_depth, self.num_nodes)
        width = self.num_nodes - d + 1  # ``width`` depth-1 nodes, a chain under node 1
        chain = [1] + list(range(width + 1, width + d - 1)) if d > 1 else []
        return DraftTree.from_parents([-1] + [0] * width + chain)

    def check_compatible(self, target) -> None:
        if target.vocab_size != self.vocab_size:
            raise ValueError(f"the REST datastore is for a vocabulary of {self.vocab_size}, the "
                             f"target has {target.vocab_size}: build one for this model")

    def check_datastore(self, store: Datastore) -> None:
        """ValueError when ``store`` cannot serve this configuration."""
        if store.vocab_size != self.vocab_size:
            raise ValueError(f"the datastore is for a vocabulary of {store.vocab_size}, the "
                             f"drafter {self.vocab_size}")
        if self.max_ngram + self.draft_depth > store.sort_depth:
            raise ValueError(f"max_ngram + draft_depth = {self.max_ngram + self.draft_depth} "
                             f"is over the datastore's sort depth {store.sort_depth}: lower "
                             "them or rebuild it with a larger --sort_depth")

    def params_of(self, store: Datastore) -> dict:
        self.check_datastore(store)
        return {"tokens": jnp.asarray(store.tokens, jnp.int32),
                "suffix_array": jnp.asarray(store.suffix_array, jnp.int32)}

    # The datastore query -----------------------------------------------------------------------

    def retrieve(self, params, history: jax.Array, history_len: jax.Array) -> Retrieval:
        """Steps 1 and 2 (module docstring) for ``history int32[B, H]`` (``history_len[b]``
        tokens valid, the pending token last)."""
        tokens, sa = params["tokens"], params["suffix_array"]
        sep, m = self.vocab_size, sa.shape[0]
        b, h = history.shape
        sizes = jnp.arange(self.max_ngram, self.min_ngram - 1, -1, dtype=jnp.int32)  # [G]
        g, k = sizes.shape[0], self.max_ngram
        j = jnp.arange(k, dtype=jnp.int32)
        used = j[None, :] < sizes[:, None]  # [G, K]: query token j is part of n-gram g
        at = history_len[:, None, None] - sizes[None, :, None] + j[None, None, :]  # [B, G, K]
        query = jnp.take_along_axis(history, jnp.clip(at, 0, h - 1).reshape(b, g * k), axis=1)
        query = query.reshape(b, g, k)

        def read(pos):  # datastore tokens at ``pos`` (the separator past the end)
            return jnp.take(tokens, pos, mode="fill", fill_value=sep)

        def order(mid):  # -1 / 0 / 1: suffix sa[mid] below / equal to / above the query
            text = read(jnp.take(sa, jnp.minimum(mid, m - 1))[..., None] + j)  # [B, G, K]
            gap = jnp.where(used, text - query, 0)
            first = jnp.argmax(gap != 0, axis=-1)[..., None]  # the first differing token
            return jnp.sign(jnp.take_along_axis(gap, first, -1)[..., 0])  # 0 when none

        def bisect(_, bounds):  # lower and upper bound at once: [2, B, G]
            lo, hi = bounds
            mid = (lo + hi) // 2
            cmp = order(mid)
            right = jnp.stack([cmp[0] < 0, cmp[1] <= 0])  # the bound lies past ``mid``
            open_ = lo < hi
            return (jnp.where(open_ & right, mid + 1, lo), jnp.where(open_ & ~right, mid, hi))

        start = (jnp.zeros((2, b, g), jnp.int32), jnp.full((2, b, g), m, jnp.int32))
        steps = max(1, math.ceil(math.log2(m + 1)))
        lo, _ = jax.lax.fori_loop(0, steps, bisect, start)
        first, end = lo[0], lo[1]  # [B, G]
        found = (end > first) & (history_len[:, None] >= sizes[None, :])
        best = jnp.argmax(found, axis=1)[:, None]  # the longest n-gram with a match
        hit = found.any(1)
        ngram = jnp.where(hit, sizes[best[:, 0]], 0)
        lo = jnp.take_along_axis(first, best, 1)[:, 0]
        count = jnp.where(hit, jnp.take_along_axis(end, best, 1)[:, 0] - lo, 0)  # [B]
        c = self.num_candidates
        i = jnp.arange(c, dtype=jnp.int32)[None, :]
        # Spread over the range: i * count // C without overflow; all of it when count <= C.
        spread = i * (count[:, None] // c) + (i * (count[:, None] % c)) // c
        pick = lo[:, None] + jnp.where(count[:, None] > c, spread, i)  # [B, C]
        taken = i < count[:, None]
        src = (jnp.take(sa, jnp.minimum(pick, m - 1)) + ngram[:, None])[..., None] \
            + jnp.arange(self.draft_depth, dtype=jnp.int32)  # [B, C, L]
        cont = read(src)
        valid = taken[..., None] & (jnp.cumprod(cont != sep, axis=-1) > 0)
        return Retrieval(ngram.astype(jnp.int32), count.astype(jnp.int32), cont, valid)

    # The trie ------------------------------------------------------------------------------------

    def trie(self, cont: jax.Array, valid: jax.Array):
        """Step 3: the kept prefixes of ``cont int32[B, C, L]`` (``valid bool[B, C, L]``).

        Returns:
          ``(tokens int32[B, T - 1], parents int32[B, T], node_valid bool[B, T])`` with
          ``T = num_nodes + 1``: drafted node ``n >= 1`` holds ``tokens[:, n - 1]``; root and
          padding have parent -1.
        """
        b, c, l = cont.shape
        t = self.num_nodes
        both = valid[:, :, None, :] & valid[:, None, :, :]
        # share[b, i, i', d]: candidates i and i' agree on their first d + 1 tokens.
        share = both & (jnp.cumprod(cont[:, :, None, :] == cont[:, None, :, :], axis=-1) > 0)
        count = share.sum(2)  # [B, C, L]
        rep = jnp.argmax(share, axis=2)  # the first candidate holding the same prefix
        own = valid & (rep == jnp.arange(c)[None, :, None])  # one pool entry per prefix
        depth = jnp.arange(1, l + 1, dtype=jnp.int32)
        score = jnp.where(own, count * (l + 1) + (l - depth), -1)
        # Pool entry (i, d) at index d * C + i: depth-major, so sorting indices is BFS order.
        flat = jnp.swapaxes(score, 1, 2).reshape(b, l * c)
        top, chosen = jax.lax.top_k(flat, t)  # [B, T-1]
        keep = top > 0
        chosen = jnp.sort(jnp.where(keep, chosen, l * c + chosen), axis=1)
        keep = chosen < l * c
        chosen = jnp.where(keep, chosen, chosen - l * c)
        d, i = chosen // c, chosen % c
        rows = jnp.arange(b)[:, None]
        node = jnp.zeros((b, l * c), jnp.int32).at[rows, chosen].set(
            jnp.where(keep, jnp.arange(1, t + 1, dtype=jnp.int32), 0))
        parent_entry = (d - 1) * c + rep[rows, i, jnp.maximum(d - 1, 0)]  # [B, T-1]
        parent = jnp.where(d > 0, node[rows, jnp.maximum(parent_entry, 0)], 0)
        parents = jnp.concatenate([jnp.full((b, 1), -1, jnp.int32),
                                   jnp.where(keep, parent, -1)], axis=1)
        node_valid = jnp.concatenate([jnp.ones((b, 1), bool), keep], axis=1)
        return jnp.where(keep, cont[rows, i, d], 0), parents, node_valid

    def propose(self, params, state, ctx, key):
        del key
        found = self.retrieve(params, ctx.history, ctx.history_len)
        drafted, parents, valid = self.trie(found.tokens, found.valid)
        tokens = jnp.concatenate([ctx.pending[:, None], drafted], axis=1)
        return Proposal(tokens=tokens, parents=parents, valid=valid), state, ctx.cache


# The method -----------------------------------------------------------------------------------


# Trie nodes per round by weight format (WORKSPACE "Chain lengths on packed weights"): on packed
# weights a plain step is ~3x cheaper while a 9-token verify is not, so one node pays best there.
NUM_NODES = 8
PACKED_NUM_NODES = 1


@dataclasses.dataclass(frozen=True)
class RestOptions(registry.Options):
    datastore: str = registry.option(
        "shipped", "shipped: the datastore shipped for the model (drafters/weights/<model>/"
        "rest.safetensors); or the path of one built by experiments.build_rest_datastore.")
    num_candidates: int = registry.option(32, "Datastore matches retrieved per round.",
                                          minimum=1)
    num_nodes: Optional[int] = registry.option(
        None, f"Drafted trie nodes verified per round (default {NUM_NODES}; {PACKED_NUM_NODES} "
        "on packed weights, --weights=gguf|gguf_a8|int8).", minimum=1)
    draft_depth: int = registry.option(6, "Tokens taken after each match (the trie's depth).",
                                       minimum=1)
    max_ngram: int = registry.option(8, "Longest n-gram matched.", minimum=1)
    min_ngram: int = registry.option(1, "Shortest n-gram matched.", minimum=1)

    def param_sharding(self) -> str:
        return "replicated"


def build(ctx: registry.BuildContext, options: RestOptions):
    vocab = ctx.lm.model.vocab_size
    num_nodes = ctx.size_for_weights(options.num_nodes, NUM_NODES, PACKED_NUM_NODES)
    drafter = RestDrafter(vocab, options.num_candidates, num_nodes, options.draft_depth,
                          options.max_ngram, options.min_ngram)
    path = options.datastore
    if path == "shipped":
        path = head_weights.shipped_path(NAME, ctx.lm.name)
        if not os.path.exists(path):
            raise head_weights.HeadWeightsError(
                f"no REST datastore is shipped for {ctx.lm.name} ({path}): {BUILD_HINT}")
    store = load_datastore(path, vocab)
    try:
        return drafter, drafter.params_of(store)
    except ValueError as e:
        raise head_weights.HeadWeightsError(f"{path}: {e}") from None


registry.register(registry.Method(
    NAME, RestOptions, build,
    "retrieves what followed the last n-gram in a datastore of text (suffix array) and "
    "verifies the continuations as a trie (REST; training-free)", weights=NAME, order=98))
