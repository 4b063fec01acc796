"""Static candidate trees tuned from measured acceptance (Medusa-style choices).

Axis glossary: N held-out positions, D depth (one head / draft step per depth).

Input: ``ranks int[N, D]``. At held-out position ``i``, ``ranks[i, d]`` is the rank of the
target's own next token at depth ``d + 1`` among the drafter's candidates for that depth
(0 = the drafter's top choice), computed with the TRUE tokens on the path before it (teacher
forcing). A negative rank means "no label" (the sequence ended); ranks at or beyond the tree's
top-k width are simply never matched.

Why that is enough. A node of a static tree is a choice ``c = (r_1, ..., r_d)``: the rank
``r_k`` candidate at every depth ``k`` of its path. Under greedy verification, the nodes the
target accepts at position ``i`` are exactly those whose choice equals ``ranks[i, :d]``
(a node's tokens match the target's iff every rank on its path is the true token's rank, and
the drafter's candidates on a matching path are computed from the true tokens, which is what
teacher forcing measured). The tree is closed under prefixes, so those nodes form one path
and the accepted draft length is their count. Hence::

    E[accepted drafted tokens] = sum over nodes c of  hit(c) / N,
    hit(c) = #{i : ranks[i, :len(c)] == c}.

``hit`` never increases from a node to its child, so the ``n`` nodes of largest ``hit`` (ties
broken towards shallower, then lexicographically smaller choices) are closed under prefixes:
they are the best tree of ``n`` drafted nodes on this data, and no prefix-closed set of ``n``
nodes scores more. :func:`tuned_order` returns that order; its first ``n`` entries are the
optimal ``n``-node tree, for every ``n`` at once.

Under sampling, acceptance differs (rejection sampling), so these trees are tuned for greedy
decoding; the verification rule keeps them lossless either way.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from specjax.files import write_text_atomic

TREE_FILE_FORMAT = "specjax-tuned-tree-v1"


class TunedTreeError(ValueError):
    """A tuned-tree file that is missing, damaged, or does not fit the drafter."""


def label_ranks(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Rank of each label among its row's candidates, in ``jax.lax.top_k`` order (descending
    logit, ties to the lower id): ``int32[...]`` for ``logits [..., N]``, ``labels int[...]``;
    a label ``>= N`` (outside a drafter's reduced vocabulary) gets ``N``, never drafted."""
    n = logits.shape[-1]
    own = jnp.take_along_axis(logits, jnp.minimum(labels, n - 1)[..., None], axis=-1)
    ids = jnp.arange(n)
    ahead = (logits > own) | ((logits == own) & (ids < labels[..., None]))
    return jnp.where(labels < n, ahead.sum(-1), n).astype(jnp.int32)


def _check_ranks(ranks) -> np.ndarray:
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or not np.issubdtype(ranks.dtype, np.integer):
        raise ValueError(f"ranks must be an integer array [N, D], got {ranks.dtype} "
                         f"{ranks.shape}")
    return ranks.astype(np.int64)


def choice_hits(ranks, max_rank: int, max_depth: Optional[int] = None) -> dict:
    """``{choice: hit count}`` for every choice hit at least once, with every rank
    ``< max_rank`` and depth ``<= max_depth`` (default: all ``D`` columns)."""
    ranks = _check_ranks(ranks)
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    depth = ranks.shape[1] if max_depth is None else min(max_depth, ranks.shape[1])
    hits: collections.Counter = collections.Counter()
    for row in ranks[:, :depth]:
        prefix = ()
        for r in row:
            if r < 0 or r >= max_rank:
                break
            prefix = prefix + (int(r),)
            hits[prefix] += 1
    return dict(hits)


def tuned_order(ranks, max_nodes: int, max_rank: int = 10,
                max_depth: Optional[int] = None) -> list[tuple[int, ...]]:
    """Choices in decreasing hit count (ties: shallower, then smaller ranks), at most
    ``max_nodes`` of them and only choices hit at least once. Every prefix of the list is a
    valid (prefix-closed) choice set, and the first ``n`` form the tree of ``n`` drafted nodes
    with the most expected accepted tokens on ``ranks`` (see the module docstring)."""
    if max_nodes < 1:
        raise ValueError(f"max_nodes must be >= 1, got {max_nodes}")
    hits = choice_hits(ranks, max_rank, max_depth)
    order = sorted(hits, key=lambda c: (-hits[c], len(c), c))
    return order[:max_nodes]


def expected_accepted(choices: Sequence[Sequence[int]], ranks) -> float:
    """Mean accepted drafted tokens per round of the tree ``choices`` under greedy
    verification, on the positions ``ranks`` (``ValueError`` if not prefix-closed)."""
    ranks = _check_ranks(ranks)
    choices = [tuple(int(r) for r in c) for c in choices]
    present = set(choices)
    for c in choices:
        if not c or (len(c) > 1 and c[:-1] not in present):
            raise ValueError(f"choice {c} is empty or lacks its prefix")
    if ranks.shape[0] == 0:
        raise ValueError("no positions to evaluate on")
    max_rank = max((max(c) for c in choices), default=0) + 1
    hits = choice_hits(ranks, max_rank)
    return sum(hits.get(c, 0) for c in choices) / ranks.shape[0]


def cumulative_expected(order: Sequence[Sequence[int]], ranks) -> np.ndarray:
    """``float[len(order)]``: expected accepted tokens of the trees ``order[:n]``, n = 1.."""
    ranks = _check_ranks(ranks)
    max_rank = max((max(c) for c in order), default=0) + 1
    hits = choice_hits(ranks, max_rank)
    gains = np.array([hits.get(tuple(c), 0) for c in order], np.float64)
    return np.cumsum(gains) / max(ranks.shape[0], 1)


# Files ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TunedTree:
    """A tuned-tree file's contents.

    Attributes:
      order: choices in tuned order; ``order[:n]`` is the tuned ``n``-node tree.
      default_nodes: the size used by default (the best measured speed).
      draft_vocab: the drafter's ``draft_vocab`` the order was tuned with (0 = all ids).
      info: how it was made (data, measured figures, date).
      packed_default_nodes: the default size for a target with packed weights (``--weights=
        gguf|gguf_a8|int8``), tuned on that format's timings, where steps are cheaper and wide
        verifies dearer than in float32; 0: ``default_nodes`` for every format.
    """

    order: tuple
    default_nodes: int
    draft_vocab: int = 0
    info: dict = dataclasses.field(default_factory=dict, compare=False)
    packed_default_nodes: int = 0

    def choices(self, num_nodes: Optional[int] = None,
                packed: bool = False) -> list[tuple[int, ...]]:
        """The tuned tree of ``num_nodes`` drafted nodes (default: ``default_nodes``, or
        ``packed_default_nodes`` when it is set and ``packed``: the target's weights are)."""
        default = self.packed_default_nodes if packed and self.packed_default_nodes \
            else self.default_nodes
        n = default if num_nodes is None else num_nodes
        if not 1 <= n <= len(self.order):
            raise ValueError(f"a tuned tree has 1..{len(self.order)} nodes, asked for {n}")
        return list(self.order[:n])


def save_tree_file(path: str, tuned: TunedTree) -> str:
    """Writes ``tuned`` as JSON, atomically (:class:`TunedTreeError` if it is invalid)."""
    order = [list(map(int, c)) for c in tuned.order]
    _validate(order, tuned.default_nodes, tuned.draft_vocab, path, tuned.packed_default_nodes)
    doc = {"format": TREE_FILE_FORMAT, "default_nodes": int(tuned.default_nodes),
           "draft_vocab": int(tuned.draft_vocab), "order": order, "info": tuned.info}
    if tuned.packed_default_nodes:
        doc["packed_default_nodes"] = int(tuned.packed_default_nodes)
    return write_text_atomic(path, json.dumps(doc, indent=1) + "\n")


def _validate(order, default_nodes, draft_vocab, path, packed_default_nodes=0) -> None:
    seen = set()
    for c in order:
        c = tuple(c)
        if not c or min(c) < 0 or c in seen or (len(c) > 1 and c[:-1] not in seen):
            raise TunedTreeError(f"{path}: choice {list(c)} is empty, negative, repeated or "
                                 "comes before its prefix; re-run experiments/tune_tree.py")
        if draft_vocab and max(c) >= draft_vocab:
            raise TunedTreeError(f"{path}: choice {list(c)} ranks beyond draft_vocab "
                                 f"{draft_vocab}; re-run experiments/tune_tree.py")
        seen.add(c)
    if not 1 <= default_nodes <= len(order):
        raise TunedTreeError(f"{path}: default_nodes {default_nodes} is not in 1.."
                             f"{len(order)}; re-run experiments/tune_tree.py")
    if not 0 <= packed_default_nodes <= len(order):
        raise TunedTreeError(f"{path}: packed_default_nodes {packed_default_nodes} is not in "
                             f"0..{len(order)}; re-run experiments/tune_tree.py")
    if draft_vocab < 0:
        raise TunedTreeError(f"{path}: draft_vocab {draft_vocab} < 0")


def load_tree_file(path: str) -> TunedTree:
    """The :class:`TunedTree` in a file written by :func:`save_tree_file`.

    Raises:
      TunedTreeError: missing, unreadable, another format, or an order that is not
        prefix-closed at every cut.
    """
    if not os.path.isfile(path):
        raise TunedTreeError(f"no tuned tree file at {path}: create it with "
                             "experiments/tune_tree.py")
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        if doc.get("format") != TREE_FILE_FORMAT:
            raise ValueError(f"format {doc.get('format')!r}, expected {TREE_FILE_FORMAT!r}")
        order = tuple(tuple(int(r) for r in c) for c in doc["order"])
        tuned = TunedTree(order, int(doc["default_nodes"]), int(doc.get("draft_vocab", 0)),
                          dict(doc.get("info", {})), int(doc.get("packed_default_nodes", 0)))
    except Exception as e:  # JSON, key and type errors of a damaged file
        raise TunedTreeError(f"tuned tree file {path} is damaged ({type(e).__name__}: {e}); "
                             "re-run experiments/tune_tree.py") from None
    _validate(tuned.order, tuned.default_nodes, tuned.draft_vocab, path,
              tuned.packed_default_nodes)
    return tuned
