"""Token Recycling (Luo et al., 2024): draft from a table of the target's own recent top-k guesses.

Every verification forward computes the target's logits at every candidate node, accepted or
not; plain speculative decoding throws the rejected ones away. Token Recycling keeps them in an
**adjacency table** ``table int32[V, k]``: row ``v`` holds the ``k`` tokens the target ranked
highest the last time it read ``v`` (in whatever context that was). Drafting walks the table
from the pending token along a static tree: the node with choice path ``(r_1, ..., r_d)`` holds
``table[token(parent), r_d]`` (Medusa-style choices, :class:`specjax.tree.DraftTree`). The tree
is filled level by level with ``D`` gathers: no model runs, so drafting costs nothing next to a
target forward; its only price is the verification width.

Update (``commit``): for every valid node ``n`` of the verified proposal, ``table[token_n] =
top_k(verify_logits[n])`` (the raw logits; ``CommitInfo.verify_logits``). When a token sits at
several nodes, the accepted path's node wins (its context is the real one), then the later
node; the write is deterministic.

Decisions (WORKSPACE "Token Recycling"):

* **One table per row.** Each batch row drafts from and writes to its own copy, so a row's
  drafts never depend on which other prompts share its batch (rows stay independent, and a
  row's tau is the same at any batch size). A shared table would learn from every row at once
  but needs a write order between rows; the memory cost of the copies is ``B * V * k * 4`` bytes
  (1.5 MB per row for SmolLM2 with ``k = 8``).
* **Warm start.** ``params`` is ``None`` (cold: every row starts as ``0, 1, ..., k-1``, distinct
  ids, wrong but harmless) or ``{"table": int32[V, k]}``, the starting table of every row (e.g.
  :func:`table_from_text` over text the target wrote, or a table kept from earlier requests).
  The paper keeps its matrix across requests; a warm table is that state, made explicit and
  reproducible.

Lossless: drafts are point masses with distinct siblings (a table row is one ``top_k``), so the
greedy and the sampled verification rules apply unchanged (``specjax.accept``).

Axis glossary: B batch, T tree nodes, D tree depth, V vocabulary, k table width.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from drafters import head_weights, heads, registry
from specjax import masks
from specjax.drafter import DrafterBase, Proposal
from specjax.files import write_atomic
from specjax.tree import DraftTree

NAME = "token_recycling"
DEFAULT_TOP_K = 8
# 10 drafted nodes, depth 5: top-3 successors of the pending token, a path under the best one.
DEFAULT_CHOICES = ((0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 1),
                   (0, 0, 0, 0), (0, 0, 0, 0, 0))
DEFAULT_MAX_NODES = 128


def cold_table(vocab_size: int, top_k: int) -> np.ndarray:
    """``int32[V, k]`` (C order, writable): every row ``0, 1, ..., k - 1``, the table before it
    learned anything (distinct ids, so siblings stay distinct)."""
    return np.tile(np.arange(top_k, dtype=np.int32), (vocab_size, 1))


@struct.dataclass
class RecyclingState:
    table: jax.Array  # int32[B, V, k]


@dataclasses.dataclass(frozen=True)
class TokenRecyclingDrafter(DrafterBase):
    """Static configuration (hashable; a jit static argument). Build with :meth:`create`.

    Attributes:
      vocab_size: ``V``, the target's vocabulary (the table's rows).
      tree: the static candidate tree (ranks ``< top_k``).
      top_k: ``k``, successors kept per token.
    """

    vocab_size: int
    tree: DraftTree
    top_k: int = DEFAULT_TOP_K

    deterministic = True  # drafts are table entries: point masses
    siblings = "without_replacement"  # siblings are distinct entries of one table row

    @classmethod
    def create(cls, vocab_size: int, choices: Optional[Sequence[Sequence[int]]] = None,
               top_k: int = DEFAULT_TOP_K, max_nodes: Optional[int] = DEFAULT_MAX_NODES
               ) -> "TokenRecyclingDrafter":
        """The drafter on the tree of ``choices`` (default :data:`DEFAULT_CHOICES`)."""
        return cls(int(vocab_size), heads.make_tree(choices, DEFAULT_CHOICES, max_nodes),
                   int(top_k))

    def __post_init__(self):
        if not 1 <= self.top_k <= self.vocab_size:
            raise ValueError(f"top_k must be in 1..{self.vocab_size}, got {self.top_k}")
        if self.tree.num_nodes < 2:
            raise ValueError("the tree drafts nothing: give it at least one non-root node")
        if heads.max_rank(self.tree) > self.top_k:
            raise ValueError(f"the tree uses ranks up to {heads.max_rank(self.tree) - 1} but the "
                             f"table keeps {self.top_k} successors per token: raise top_k or "
                             "use a narrower tree")

    def check_compatible(self, target) -> None:
        if target.vocab_size != self.vocab_size:
            raise ValueError(f"the token-recycling table has {self.vocab_size} rows, the target "
                             f"a vocabulary of {target.vocab_size}: build the drafter for it")

    def cold_table(self) -> np.ndarray:
        """``int32[V, k]``: every row ``0, 1, ..., k - 1`` (distinct, never learned)."""
        return cold_table(self.vocab_size, self.top_k)

    def check_table(self, table) -> np.ndarray:
        """``table`` as ``int32[V, k]`` of valid, row-wise distinct ids (ValueError otherwise)."""
        table = np.asarray(table)
        if table.shape != (self.vocab_size, self.top_k) or table.dtype.kind not in "iu":
            raise ValueError(f"a token-recycling table must be int[{self.vocab_size}, "
                             f"{self.top_k}], got {table.dtype}{list(table.shape)}")
        if table.size and (table.min() < 0 or table.max() >= self.vocab_size):
            raise ValueError(f"table ids must be in 0..{self.vocab_size - 1}")
        ordered = np.sort(table, axis=1)
        if np.any(ordered[:, 1:] == ordered[:, :-1]):
            raise ValueError("every table row must hold distinct ids (one top-k each)")
        return table.astype(np.int32)

    # Drafter contract --------------------------------------------------------------------------

    def init(self, params, ctx, prompt_tokens, prompt_lengths):
        del ctx, prompt_lengths
        start = jnp.asarray(self.cold_table() if params is None else params["table"], jnp.int32)
        b = prompt_tokens.shape[0]
        return RecyclingState(jnp.broadcast_to(start, (b,) + start.shape))  # one table per row

    def propose(self, params, state: RecyclingState, ctx, key):
        """Fills the tree level by level: ``tokens[n] = table[tokens[parent[n]], rank[n]]``."""
        del params, key
        tree = self.tree
        parents, depth = np.asarray(tree.parents), np.asarray(tree.depth)
        rank = np.asarray(tree.choice_rank)
        tokens = jnp.zeros((ctx.pending.shape[0], tree.num_nodes), jnp.int32)
        tokens = tokens.at[:, 0].set(ctx.pending)
        rows = jnp.arange(ctx.pending.shape[0])[:, None]
        for d in range(1, tree.max_depth + 1):
            nodes = np.flatnonzero(depth == d)
            parent_tokens = tokens[:, parents[nodes]]  # [B, n_d]
            tokens = tokens.at[:, nodes].set(state.table[rows, parent_tokens, rank[nodes]])
        return Proposal(tokens=tokens), state, ctx.cache

    def commit(self, params, state: RecyclingState, ctx, info):
        """Writes ``top_k(verify_logits[n])`` into the row of every valid node's token."""
        del params, ctx
        proposal = info.proposal
        tokens = proposal.tokens  # [B, T]
        b, t = tokens.shape
        valid = jnp.ones((b, t), bool) if proposal.valid is None else proposal.valid
        valid = valid & info.live[:, None]
        on_path = jnp.zeros((b, t), bool).at[jnp.arange(b)[:, None], info.path].max(
            (jnp.arange(info.path.shape[1])[None, :] <= info.num_accepted[:, None])
            & (info.path >= 0), mode="drop")
        priority = on_path.astype(jnp.int32) * t + jnp.arange(t, dtype=jnp.int32)[None, :]
        same = (tokens[:, :, None] == tokens[:, None, :]) & valid[:, None, :]  # [B, n, m]
        beaten = jnp.any(same & (priority[:, None, :] > priority[:, :, None]), axis=-1)
        keep = valid & ~beaten
        _, top = jax.lax.top_k(info.verify_logits, self.top_k)  # [B, T, k]
        index = jnp.where(keep, tokens, self.vocab_size)  # out of range: dropped
        table = state.table.at[jnp.arange(b)[:, None], index].set(top.astype(jnp.int32),
                                                                   mode="drop")
        return RecyclingState(table)


# Warm tables ----------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("model", "top_k"))
def _text_top_k(model, params, tokens, top_k: int):
    """``int32[B, W, k]``: the target's top-k at every position of ``tokens [B, W]`` (causal, so
    the padding after a sequence changes nothing before it)."""
    b, w = tokens.shape
    cache = model.init_cache(b, w)
    positions = jnp.broadcast_to(jnp.arange(w, dtype=jnp.int32), (b, w))
    out = model.forward(params, tokens, positions, cache, masks.causal_mask(cache.lengths, w, w))
    return jax.lax.top_k(out.logits, top_k)[1].astype(jnp.int32)


def text_top_k(model, params, sequences: Sequence[Sequence[int]], top_k: int = DEFAULT_TOP_K,
               batch_size: int = 8, width_step: int = 64) -> list:
    """``[int32[len(s), k]]``: the target's top-k at every position of each sequence (lists of
    token ids), best first. One batched, full-attention forward per ``batch_size`` sequences
    (widths padded to a multiple of ``width_step``, so few programs compile)."""
    seqs = [list(map(int, s)) for s in sequences]
    out = []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i:i + batch_size]
        w = max(-(-max(len(s) for s in chunk) // width_step) * width_step, width_step)
        toks = np.zeros((len(chunk), w), np.int32)
        for r, s in enumerate(chunk):
            toks[r, :len(s)] = s
        top = np.asarray(_text_top_k(model, params, jnp.asarray(toks), top_k))
        out.extend(top[r, :len(s)] for r, s in enumerate(chunk))
    return out


def table_from_text(model, params, sequences: Sequence[Sequence[int]], top_k: int = DEFAULT_TOP_K,
                    start: Optional[np.ndarray] = None, batch_size: int = 8) -> np.ndarray:
    """``int32[V, k]``: the table after the target read ``sequences`` (lists of token ids),
    each position's top-k (:func:`text_top_k`) written into the row of its token, later
    positions and sequences winning; rows never read keep ``start`` (default: the cold
    table)."""
    v = model.vocab_size
    table = cold_table(v, top_k) if start is None else np.array(start, np.int32, order="C")
    for s, top in zip(sequences, text_top_k(model, params, sequences, top_k, batch_size)):
        ids = np.asarray(s, np.int64)
        if ids.size:
            _, from_end = np.unique(ids[::-1], return_index=True)
            last = len(ids) - 1 - from_end  # each id's last position
            table[ids[last]] = top[last]
    return table


def walk_ranks(table: np.ndarray, tokens: Sequence[int], top: np.ndarray, start: int,
               depth: int, consistent: Optional[Sequence[bool]] = None) -> np.ndarray:
    """Tree-tuning ranks of one sequence the target reads from ``start`` on, the table learning
    as it goes (numpy; ``table`` is updated in place).

    At each position ``i >= start`` the pending token is ``tokens[i]``: ``ranks[i - start, d]``
    is the column of ``tokens[i + d + 1]`` in ``table[tokens[i + d]]`` (``k`` when absent, -1
    past the end or past a token the target would not have written: ``consistent[j]`` False
    means ``tokens[j + 1]`` is not the target's own next token), read BEFORE ``table[tokens[i]]
    = top[i]``, the target's top-k at ``i``. This follows one drafted chain per position and
    the writes of the accepted tokens; decoding also writes the rejected nodes' rows and only
    once per round (WORKSPACE "Token Recycling")."""
    n, k = len(tokens), table.shape[1]
    tokens = np.asarray(tokens)
    ranks = np.full((max(n - 1 - start, 0), depth), -1, np.int32)
    for i in range(start, n - 1):
        for d in range(depth):
            j = i + d
            if j + 1 >= n or (consistent is not None and not consistent[j]):
                break
            hit = np.flatnonzero(table[tokens[j]] == tokens[j + 1])
            ranks[i - start, d] = hit[0] if hit.size else k
        table[tokens[i]] = top[i]
    return ranks


def save_table(path: str, table: np.ndarray, *, source: str = "", command: str = "") -> str:
    """Writes ``table`` (uint16 when the vocabulary fits, else int32) as safetensors with its
    provenance, atomically; returns the absolute path."""
    from safetensors.numpy import save_file
    table = np.asarray(table)
    data = np.ascontiguousarray(table, np.uint16 if table.max(initial=0) < 2 ** 16 else np.int32)
    meta = {"drafter": NAME, "vocab_size": str(table.shape[0]), "top_k": str(table.shape[1]),
            "source": source, "command": command}
    return os.path.abspath(write_atomic(path, lambda tmp: save_file({"table": data}, tmp,
                                                                    metadata=meta)))


def load_table(path: str, drafter: TokenRecyclingDrafter) -> np.ndarray:
    """The table stored at ``path``, checked against ``drafter`` (HeadWeightsError)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    if not os.path.isfile(path):
        raise head_weights.HeadWeightsError(f"no token-recycling table at {path}: build one with "
                                            "python -m experiments.build_recycling_table")
    try:
        table = load_file(path)["table"]
    except (SafetensorError, KeyError, OSError) as e:
        raise head_weights.HeadWeightsError(f"{path} is not a token-recycling table ({e})")
    try:
        return drafter.check_table(table)
    except ValueError as e:
        raise head_weights.HeadWeightsError(f"{path}: {e}")


# The method -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TokenRecyclingOptions(registry.Options):
    tree: str = registry.option(
        "static", "static: the tree tuned for this model (or the built-in one); tunedN: its "
        "best N-node tree; generic: the built-in tree.",
        choices=("static", "tunedN", "generic"), patterns=heads.TUNED_N)
    table: str = registry.option(
        "warm", "warm: every request starts from the table shipped for the model (built from "
        "text the target wrote; cold when none is shipped); cold: from an untrained table.",
        choices=("warm", "cold"))
    table_width: int = registry.option(DEFAULT_TOP_K, "Successors kept per token (k).",
                                       minimum=1)

    def param_sharding(self) -> str:
        return "replicated"


def build(ctx: registry.BuildContext, options: TokenRecyclingOptions):
    path = head_weights.shipped_path(NAME, ctx.lm.name)
    choices = None
    if options.tree != "generic" and os.path.exists(head_weights.tree_file_of(path)):
        choices = head_weights.tuned_tree(None if options.tree == "static" else options.tree,
                                          path, head_weights.is_packed(ctx.lm.model))[0]
    elif options.tree.startswith("tuned"):
        head_weights.tuned_tree(options.tree, path)  # raises: no tuned tree for this model
    drafter = TokenRecyclingDrafter.create(ctx.lm.model.vocab_size, choices, options.table_width)
    if options.table == "cold" or not os.path.exists(path):
        return drafter, None
    return drafter, {"table": jnp.asarray(load_table(path, drafter))}


registry.register(registry.Method(
    NAME, TokenRecyclingOptions, build,
    "drafts a tree from a table of the target's own top-k successors of each token, refreshed "
    "from every verification's logits (training-free)", order=96))
