"""Candidate structures: chains, static trees and dynamic (per-step) trees.

Axis glossary: B batch rows, T nodes, P root-to-leaf paths, D depth.

Every candidate structure is a tree of ``T`` nodes in BFS order:

* node 0 is the root, the *pending* token (already decided by the previous step, not verified);
  ``parents[0] == -1``;
* every other node has ``0 <= parents[n] < n`` and ``depth[n] = depth[parents[n]] + 1``;
* depth is non-decreasing with the node index, so a node's children come after it.

A chain of ``k`` drafted tokens is the tree ``parents = (-1, 0, 1, ..., k - 1)``.

Two representations are supported:

* :class:`DraftTree`, a static tree (a hashable, frozen dataclass usable as a ``jax.jit`` static
  argument) whose derived tables are numpy arrays computed once on the host;
* dynamic trees, ``parents int32[B, T]`` chosen per step inside ``jit`` and padded to a static
  node budget with a validity mask ``valid bool[B, T]``, handled by :func:`depths_from_parents`,
  :func:`visibility_from_parents` and :func:`positions`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _readonly(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


def _check_parents(parents: Sequence[int]) -> None:
    if len(parents) == 0:
        raise ValueError("a tree needs at least the root node (parents == (-1,))")
    if parents[0] != -1:
        raise ValueError(f"node 0 is the root and must have parent -1, got {parents[0]}")
    depth = [0]
    for n in range(1, len(parents)):
        p = parents[n]
        if not 0 <= p < n:
            raise ValueError(f"node {n} has parent {p}; every non-root node needs 0 <= parent < n")
        depth.append(depth[p] + 1)
        if depth[n] < depth[n - 1]:
            raise ValueError(
                f"nodes are not in BFS order: node {n} has depth {depth[n]} after node {n - 1} "
                f"at depth {depth[n - 1]}")


def _check_budget(num_nodes: int, max_nodes: Optional[int]) -> None:
    if max_nodes is not None and num_nodes > max_nodes:
        raise ValueError(f"tree has {num_nodes} nodes (root included), over the budget {max_nodes}")


class Expansion(NamedTuple):
    """Depth ``d`` of :attr:`DraftTree.expansion_levels` (read-only): ``nodes int32[Q]`` at
    ``d`` with children, index order; ``paths int32[Q, d + 1]`` their root-to-node paths;
    ``children int32[C]`` theirs (every node at ``d + 1``), index order; ``slot int32[C]`` each
    child's parent's position in ``nodes``; ``rank int32[C]`` each child's ``choice_rank``."""

    nodes: np.ndarray
    paths: np.ndarray
    children: np.ndarray
    slot: np.ndarray
    rank: np.ndarray


@dataclasses.dataclass(frozen=True)
class DraftTree:
    """A static candidate tree.

    Attributes:
      parents: parent index of every node (``parents[0] == -1``), BFS order.
      choices: optional per-node top-k rank path (Medusa style, root ``()``), set by
        :meth:`from_choices`; when ``None``, :attr:`choice_of_node` is derived from sibling ranks.
    """

    parents: tuple[int, ...]
    choices: Optional[tuple[tuple[int, ...], ...]] = None

    def __post_init__(self):
        object.__setattr__(self, "parents", tuple(int(p) for p in self.parents))
        _check_parents(self.parents)
        if self.choices is not None:
            choices = tuple(tuple(int(r) for r in c) for c in self.choices)
            object.__setattr__(self, "choices", choices)
            if len(choices) != len(self.parents) or choices[0] != ():
                raise ValueError("choices needs one entry per node, with () for the root")
            for n in range(1, len(choices)):
                if choices[n][:-1] != choices[self.parents[n]]:
                    raise ValueError(
                        f"choice {choices[n]} of node {n} does not extend its parent's")

    # Constructors ------------------------------------------------------------------------------

    @classmethod
    def from_parents(cls, parents: Sequence[int], max_nodes: Optional[int] = None) -> "DraftTree":
        """A tree from explicit parents; raises ``ValueError`` when over ``max_nodes``."""
        _check_budget(len(parents), max_nodes)
        return cls(tuple(parents))

    @classmethod
    def chain(cls, k: int, max_nodes: Optional[int] = None) -> "DraftTree":
        """A chain of ``k`` drafted tokens: ``k + 1`` nodes, ``parents = (-1, 0, ..., k - 1)``."""
        if k < 0:
            raise ValueError(f"a chain needs k >= 0 drafted tokens, got {k}")
        _check_budget(k + 1, max_nodes)
        return cls(tuple(range(-1, k)), tuple((0,) * d for d in range(k + 1)))

    @classmethod
    def from_choices(cls, choices: Sequence[Sequence[int]],
                     max_nodes: Optional[int] = None) -> "DraftTree":
        """A tree from Medusa-style choices.

        Each choice is the tuple of top-k ranks along the path from the root, e.g.
        ``[(0,), (1,), (0, 0), (0, 1), (1, 0)]``: node ``(0, 1)`` is the second-ranked token of
        head 1 (depth 2) under the first-ranked token of head 0 (depth 1). Nodes are sorted by
        ``(depth, choice)``, so siblings appear in rank order and the children of a node are
        contiguous.

        Raises:
          ValueError: an empty or negative choice, a duplicate, a missing prefix, or more than
            ``max_nodes`` nodes (root included).
        """
        normalized = []
        for choice in choices:
            choice = tuple(int(r) for r in choice)
            if not choice:
                raise ValueError("the root is implicit; choices must be non-empty tuples")
            if min(choice) < 0:
                raise ValueError(f"ranks must be >= 0, got {choice}")
            normalized.append(choice)
        if len(set(normalized)) != len(normalized):
            raise ValueError("duplicate choices")
        present = set(normalized)
        for choice in normalized:
            if len(choice) > 1 and choice[:-1] not in present:
                raise ValueError(f"choice {choice} lacks its prefix {choice[:-1]}")
        _check_budget(len(normalized) + 1, max_nodes)
        ordered = [()] + sorted(normalized, key=lambda c: (len(c), c))
        index = {c: n for n, c in enumerate(ordered)}
        parents = tuple([-1] + [index[c[:-1]] for c in ordered[1:]])
        return cls(parents, tuple(ordered))

    # Derived tables (numpy, read-only) ---------------------------------------------------------

    @property
    def num_nodes(self) -> int:
        """``T``, root included."""
        return len(self.parents)

    @functools.cached_property
    def depth(self) -> np.ndarray:
        """``int32[T]``: 0 for the root."""
        depth = np.zeros(self.num_nodes, np.int32)
        for n in range(1, self.num_nodes):
            depth[n] = depth[self.parents[n]] + 1
        return _readonly(depth)

    @property
    def max_depth(self) -> int:
        """``D``: the number of drafted tokens on the longest path."""
        return int(self.depth[-1])

    @functools.cached_property
    def visible(self) -> np.ndarray:
        """``bool[T, T]``: ``visible[i, j]`` iff ``j`` is an ancestor-or-self of ``i``."""
        visible = np.eye(self.num_nodes, dtype=bool)
        for n in range(1, self.num_nodes):
            visible[n] |= visible[self.parents[n]]
        return _readonly(visible)

    @functools.cached_property
    def children(self) -> tuple[tuple[int, ...], ...]:
        """Children of every node, in index order."""
        children = [[] for _ in range(self.num_nodes)]
        for n in range(1, self.num_nodes):
            children[self.parents[n]].append(n)
        return tuple(tuple(c) for c in children)

    @functools.cached_property
    def num_children(self) -> np.ndarray:
        """``int32[T]``."""
        return _readonly(np.array([len(c) for c in self.children], np.int32))

    @functools.cached_property
    def sibling_rank(self) -> np.ndarray:
        """``int32[T]``: 0-based rank of each node among its parent's children (root: 0)."""
        rank = np.zeros(self.num_nodes, np.int32)
        for kids in self.children:
            rank[list(kids)] = np.arange(len(kids))
        return _readonly(rank)

    @functools.cached_property
    def leaves(self) -> np.ndarray:
        """``int32[P]``: nodes without children, in index order."""
        return _readonly(np.flatnonzero(self.num_children == 0).astype(np.int32))

    @functools.cached_property
    def paths(self) -> np.ndarray:
        """``int32[P, D + 1]``: root-to-leaf node indices (one row per leaf), padded with -1."""
        paths = np.full((len(self.leaves), self.max_depth + 1), -1, np.int32)
        for row, leaf in enumerate(self.leaves):
            nodes = np.flatnonzero(self.visible[leaf])  # ancestors have smaller indices
            paths[row, :len(nodes)] = nodes
        return _readonly(paths)

    @functools.cached_property
    def choice_of_node(self) -> tuple[tuple[int, ...], ...]:
        """Per node, the rank path from the root (``()`` for the root).

        For a head drafter, node ``n`` is filled by head ``depth[n] - 1`` with the token of rank
        ``choice_of_node[n][-1]`` (see :attr:`choice_rank`) under its parent's token.
        """
        if self.choices is not None:
            return self.choices
        choices = [()]
        for n in range(1, self.num_nodes):
            choices.append(choices[self.parents[n]] + (int(self.sibling_rank[n]),))
        return tuple(choices)

    @functools.cached_property
    def choice_rank(self) -> np.ndarray:
        """``int32[T]``: the last entry of :attr:`choice_of_node` (-1 for the root)."""
        return _readonly(np.array([c[-1] if c else -1 for c in self.choice_of_node], np.int32))

    @functools.cached_property
    def expansion_levels(self) -> tuple[Expansion, ...]:
        """Plan for drafting level by level, one :class:`Expansion` per depth ``0 .. D - 1``:
        the nodes a drafter runs on, and which top-k rank of which of them fills each child."""
        levels = []
        for d in range(self.max_depth):
            nodes = [n for n in range(self.num_nodes) if self.depth[n] == d and self.children[n]]
            kids = [c for n in nodes for c in self.children[n]]
            arrays = (nodes, [np.flatnonzero(self.visible[n]) for n in nodes], kids,
                      [nodes.index(self.parents[c]) for c in kids], self.choice_rank[kids])
            levels.append(Expansion(*(_readonly(np.array(a, np.int32)) for a in arrays)))
        return tuple(levels)

    @property
    def is_chain(self) -> bool:
        return self.parents == tuple(range(-1, self.num_nodes - 1))

    def arrays(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """The tree as dynamic-tree arrays: ``(parents int32[B, T], valid bool[B, T])``."""
        parents = np.broadcast_to(np.asarray(self.parents, np.int32), (batch, self.num_nodes))
        return parents, np.ones((batch, self.num_nodes), bool)


# Dynamic trees (jit-friendly) --------------------------------------------------------------------


def depths_from_parents(parents: jax.Array) -> jax.Array:
    """Depth of every node of a batch of dynamic trees.

    Args:
      parents: ``int32[B, T]`` with ``parents[:, n] < n``; a negative parent (the root, or a
        padding node given parent -1) gives depth 0.

    Returns:
      ``int32[B, T]``. Padding nodes get whatever depth their parent chain implies; callers mask
      them with ``valid``.
    """
    parents = jnp.asarray(parents, jnp.int32)
    num_nodes = parents.shape[1]

    def body(n, depth):
        par = parents[:, n]
        has_parent = (par >= 0) & (par < n)
        parent_depth = jnp.take_along_axis(depth, jnp.clip(par, 0, num_nodes - 1)[:, None], 1)[:, 0]
        return depth.at[:, n].set(jnp.where(has_parent, parent_depth + 1, 0))

    return jax.lax.fori_loop(1, num_nodes, body, jnp.zeros_like(parents))


def visibility_from_parents(parents: jax.Array, valid: Optional[jax.Array] = None) -> jax.Array:
    """Ancestor-or-self visibility of a batch of dynamic trees.

    Args:
      parents: ``int32[B, T]`` with ``parents[:, n] < n`` for valid non-root nodes.
      valid: ``bool[B, T]`` (default: all valid). Invalid (padding) nodes see only themselves
        and are seen by no other node.

    Returns:
      ``bool[B, T, T]``: ``vis[b, i, j]`` iff ``j`` is an ancestor-or-self of ``i`` in row ``b``.
    """
    parents = jnp.asarray(parents, jnp.int32)
    batch, num_nodes = parents.shape
    valid = jnp.ones((batch, num_nodes), bool) if valid is None else jnp.asarray(valid, bool)
    eye = jnp.eye(num_nodes, dtype=bool)

    def body(n, vis):
        par = parents[:, n]
        linked = valid[:, n] & (par >= 0) & (par < n)
        par_index = jnp.clip(par, 0, num_nodes - 1)[:, None, None]
        parent_row = jnp.take_along_axis(vis, par_index, axis=1)[:, 0]  # [B, T]
        return vis.at[:, n].set(eye[n][None] | (linked[:, None] & parent_row))

    init = jnp.broadcast_to(eye, (batch, num_nodes, num_nodes))
    vis = jax.lax.fori_loop(1, num_nodes, body, init)
    # A valid node whose parent is padding must not see it; padding rows see only themselves.
    vis = vis & (valid[:, None, :] | eye[None])
    return jnp.where(valid[:, :, None], vis, eye[None])


def positions(lengths: jax.Array, depth: jax.Array) -> jax.Array:
    """Position ids of the nodes: ``lengths[b] + depth[b, n]``.

    Args:
      lengths: ``int32[B]`` committed length per row (the root sits at position ``lengths``).
      depth: ``int32[B, T]`` or ``int32[T]`` (a static tree's :attr:`DraftTree.depth`).

    Returns:
      ``int32[B, T]``.
    """
    lengths = jnp.asarray(lengths, jnp.int32)
    depth = jnp.asarray(depth, jnp.int32)
    if depth.ndim == 1:
        depth = depth[None, :]
    return lengths[:, None] + depth


# Dynamic-tree selection (EAGLE-2 style reranking) ------------------------------------------------


def select_top_nodes(scores: jax.Array, parents: jax.Array, budget: int
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Keeps the ``budget`` best nodes of a pool of drafted nodes, as a BFS-ordered tree.

    The pool is every node a drafter considered, in generation order: pool node ``m`` has a
    parent ``parents[b, m]`` that is either ``-1`` (a child of the root, the pending token) or
    an earlier pool node (``< m``), and a score such as its cumulative draft log-probability.

    Selection ranks nodes by score, best first, ties broken by the lower pool index. Scores are
    first made non-increasing along every path (``score[m] = min(score[m], score[parent])``,
    which changes nothing for cumulative log-probabilities), so a parent always ranks before
    its child and the selected set is ancestor-closed. Nodes with score ``-inf`` are invalid
    (never chosen over a valid node; marked ``valid=False`` if the budget reaches them).

    Args:
      scores: ``float32[B, M]``.
      parents: ``int32[B, M]`` pool parents (``-1`` = root, else ``< m``).
      budget: ``N <= M`` nodes to keep (root excluded), static.

    Returns:
      ``(nodes int32[B, N], tree_parents int32[B, N + 1], valid bool[B, N + 1])``: output node
      ``n >= 1`` is pool node ``nodes[b, n - 1]``; nodes are in BFS order (depth, then pool
      index); ``tree_parents[:, 0] == -1`` and invalid nodes get parent -1; ``valid[:, 0]`` is
      True (the root).

    Raises:
      ValueError: ``budget`` outside ``[1, M]``.
    """
    scores = jnp.asarray(scores, jnp.float32)
    parents = jnp.asarray(parents, jnp.int32)
    batch, pool = scores.shape
    if not 1 <= budget <= pool:
        raise ValueError(f"the node budget {budget} must be in [1, {pool}] (the pool size): "
                         "draft more candidates or lower the budget")
    rows = jnp.arange(batch)

    def monotone(m, carry):
        eff, depth = carry
        par = parents[:, m]
        has_parent = (par >= 0) & (par < m)
        p = jnp.clip(par, 0, pool - 1)
        eff = eff.at[:, m].set(jnp.where(has_parent, jnp.minimum(eff[:, m], eff[rows, p]),
                                         eff[:, m]))
        depth = depth.at[:, m].set(jnp.where(has_parent, depth[rows, p] + 1, 1))
        return eff, depth

    eff, depth = jax.lax.fori_loop(0, pool, monotone,
                                   (scores, jnp.ones((batch, pool), jnp.int32)))
    # Best first, lower index among ties: stable sort of the negated scores.
    order = jnp.argsort(-eff, axis=1, stable=True)[:, :budget]  # [B, N]
    chosen_valid = jnp.take_along_axis(eff, order, 1) > -jnp.inf
    chosen_depth = jnp.take_along_axis(depth, order, 1)
    # BFS order: valid nodes first, then by depth, then by pool index.
    key = (jnp.where(chosen_valid, 0, 1) * (pool + 1) + chosen_depth) * (pool + 1) + order
    bfs = jnp.argsort(key, axis=1)
    nodes = jnp.take_along_axis(order, bfs, 1).astype(jnp.int32)
    valid = jnp.take_along_axis(chosen_valid, bfs, 1)
    # Pool index -> output node index (0 = root / not selected).
    new_index = jnp.zeros((batch, pool), jnp.int32).at[rows[:, None], nodes].set(
        jnp.arange(1, budget + 1, dtype=jnp.int32)[None, :])
    pool_par = jnp.take_along_axis(parents, nodes, 1)
    par = jnp.where(pool_par >= 0,
                    jnp.take_along_axis(new_index, jnp.clip(pool_par, 0, pool - 1), 1), 0)
    par = jnp.where(valid, par, -1)
    tree_parents = jnp.concatenate([jnp.full((batch, 1), -1, jnp.int32), par], axis=1)
    valid = jnp.concatenate([jnp.ones((batch, 1), bool), valid], axis=1)
    return nodes, tree_parents, valid
