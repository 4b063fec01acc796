"""Tests for specjax.tree: static DraftTree tables and the jit-friendly dynamic-tree helpers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tinymodels as kit
from specjax import tree as tree_lib
from specjax.tree import DraftTree


def slow_visibility(parents, valid):
    """Reference: follow parent pointers up while the ancestors are valid."""
    num_nodes = len(parents)
    vis = np.eye(num_nodes, dtype=bool)
    for n in range(num_nodes):
        if not valid[n]:
            continue
        m = n
        while parents[m] >= 0:
            m = parents[m]
            if not valid[m]:
                break
            vis[n, m] = True
    return vis


def test_chain_tables():
    t = DraftTree.chain(3)
    assert t.parents == (-1, 0, 1, 2)
    assert t.num_nodes == 4 and t.max_depth == 3 and t.is_chain
    np.testing.assert_array_equal(t.depth, [0, 1, 2, 3])
    np.testing.assert_array_equal(t.visible, np.tril(np.ones((4, 4), bool)))
    np.testing.assert_array_equal(t.paths, [[0, 1, 2, 3]])
    np.testing.assert_array_equal(t.num_children, [1, 1, 1, 0])
    np.testing.assert_array_equal(t.sibling_rank, [0, 0, 0, 0])
    assert t.choice_of_node == ((), (0,), (0, 0), (0, 0, 0))
    root_only = DraftTree.chain(0)
    assert root_only.parents == (-1,) and root_only.max_depth == 0
    np.testing.assert_array_equal(root_only.paths, [[0]])


def test_from_choices_tables():
    # Deliberately unsorted input: nodes must come out sorted by (depth, choice).
    t = DraftTree.from_choices([(1, 0), (0,), (0, 1), (1,), (0, 0)])
    assert t.parents == (-1, 0, 0, 1, 1, 2)
    assert t.choice_of_node == ((), (0,), (1,), (0, 0), (0, 1), (1, 0))
    np.testing.assert_array_equal(t.depth, [0, 1, 1, 2, 2, 2])
    assert t.max_depth == 2 and not t.is_chain
    expected_visible = np.array([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [1, 1, 0, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],
        [1, 0, 1, 0, 0, 1]], bool)
    np.testing.assert_array_equal(t.visible, expected_visible)
    np.testing.assert_array_equal(t.paths, [[0, 1, 3], [0, 1, 4], [0, 2, 5]])
    np.testing.assert_array_equal(t.leaves, [3, 4, 5])
    assert t.children == ((1, 2), (3, 4), (5,), (), (), ())
    np.testing.assert_array_equal(t.sibling_rank, [0, 0, 1, 0, 1, 0])
    np.testing.assert_array_equal(t.choice_rank, [-1, 0, 1, 0, 1, 0])


def test_from_choices_sparse_ranks_and_uneven_paths():
    t = DraftTree.from_choices([(0,), (2,), (2, 1), (2, 1, 0)])
    assert t.parents == (-1, 0, 0, 2, 3)
    np.testing.assert_array_equal(t.sibling_rank, [0, 0, 1, 0, 0])
    np.testing.assert_array_equal(t.choice_rank, [-1, 0, 2, 1, 0])  # rank, not sibling position
    np.testing.assert_array_equal(t.paths, [[0, 1, -1, -1], [0, 2, 3, 4]])


def test_derived_choices_and_hashing():
    t = DraftTree((-1, 0, 0, 1))
    assert t.choice_of_node == ((), (0,), (1,), (0, 0))
    same = DraftTree([-1, 0, 0, 1])
    assert t == same and hash(t) == hash(same)
    assert DraftTree.chain(2) != DraftTree.from_choices([(0,), (1,)])

    calls = []

    def depth_sum(static_tree, x):
        calls.append(1)
        return x + int(static_tree.depth.sum())
    g = jax.jit(depth_sum, static_argnums=0)
    assert int(g(t, 1)) == 1 + 0 + 1 + 1 + 2
    assert int(g(same, 1)) == 5 and len(calls) == 1  # equal trees hit the jit cache
    with pytest.raises(ValueError):
        t.depth[0] = 3  # tables are read-only


@pytest.mark.parametrize("parents, message", [
    ((), "root"),
    ((0,), "parent -1"),
    ((-1, 1), "parent < n"),
    ((-1, 0, -1), "parent < n"),
    ((-1, 0, 1, 0), "BFS"),
])
def test_invalid_parents(parents, message):
    with pytest.raises(ValueError, match=message):
        DraftTree(parents)


@pytest.mark.parametrize("choices, message", [
    ([(0,), (0,)], "duplicate"),
    ([(0,), (1, 0)], "prefix"),
    ([()], "non-empty"),
    ([(0,), (0, -1)], ">= 0"),
])
def test_invalid_choices(choices, message):
    with pytest.raises(ValueError, match=message):
        DraftTree.from_choices(choices)


def test_budget_and_bad_chain():
    with pytest.raises(ValueError, match="budget"):
        DraftTree.chain(4, max_nodes=4)
    assert DraftTree.chain(3, max_nodes=4).num_nodes == 4
    with pytest.raises(ValueError, match="budget"):
        DraftTree.from_choices([(0,), (1,), (0, 0)], max_nodes=3)
    with pytest.raises(ValueError, match="budget"):
        DraftTree.from_parents([-1, 0, 0], max_nodes=2)
    with pytest.raises(ValueError):
        DraftTree.chain(-1)
    with pytest.raises(ValueError, match="extend"):
        DraftTree((-1, 0, 1), choices=((), (0,), (1, 0)))


def test_dynamic_helpers_match_static_tables():
    rng = np.random.default_rng(0)
    num_nodes, batch = 11, 16
    trees = [DraftTree(kit.random_parents(rng, num_nodes)) for _ in range(batch)]
    assert len({t.parents for t in trees}) > 8  # really different rows
    parents = np.stack([np.asarray(t.parents) for t in trees]).astype(np.int32)
    depth = jax.jit(tree_lib.depths_from_parents)(parents)
    vis = jax.jit(tree_lib.visibility_from_parents)(parents, np.ones_like(parents, bool))
    for b, t in enumerate(trees):
        np.testing.assert_array_equal(depth[b], t.depth)
        np.testing.assert_array_equal(vis[b], t.visible)
        np.testing.assert_array_equal(vis[b], slow_visibility(t.parents, [True] * num_nodes))
    np.testing.assert_array_equal(tree_lib.visibility_from_parents(parents), vis)  # default valid


def test_visibility_with_padding_matches_reference():
    rng = np.random.default_rng(1)
    num_nodes, batch = 10, 12
    parents = np.stack([kit.random_parents(rng, num_nodes) for _ in range(batch)]).astype(np.int32)
    valid = rng.random((batch, num_nodes)) < 0.7
    valid[:, 0] = True
    valid[0] = True
    vis = np.asarray(jax.jit(tree_lib.visibility_from_parents)(parents, valid))
    for b in range(batch):
        np.testing.assert_array_equal(vis[b], slow_visibility(parents[b], valid[b]))
    invalid = ~valid
    # Padding sees only itself and is seen by no other node.
    assert not np.any(vis & invalid[:, None, :] & ~np.eye(num_nodes, dtype=bool)[None])
    assert np.all(vis.sum(-1)[invalid] == 1)


def test_positions():
    np.testing.assert_array_equal(
        tree_lib.positions(jnp.array([5, 9]), DraftTree.from_choices([(0,), (1,), (0, 0)]).depth),
        [[5, 6, 6, 7], [9, 10, 10, 11]])
    np.testing.assert_array_equal(
        tree_lib.positions(jnp.array([2, 3]), jnp.array([[0, 1], [0, 0]])), [[2, 3], [3, 3]])


def test_arrays_broadcast():
    parents, valid = DraftTree.chain(2).arrays(3)
    np.testing.assert_array_equal(parents, [[-1, 0, 1]] * 3)
    assert valid.all() and valid.shape == (3, 3)
