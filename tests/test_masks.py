"""Attention masks over the cache equal a slow Python statement of the visibility rule."""

import numpy as np
import pytest

from specjax import masks


def _ref_block_mask(lengths, block, num_slots):
    """visible(b, t, s) = s < lengths[b]  or  (0 <= s - lengths[b] < T and block[b, t, s - lengths[b]])."""
    block = np.asarray(block, bool)
    nb = len(lengths)
    if block.ndim == 2:
        block = np.stack([block] * nb)
    t_new = block.shape[-1]
    out = np.zeros((nb, t_new, num_slots), bool)
    for b in range(nb):
        for t in range(t_new):
            for s in range(num_slots):
                rel = s - int(lengths[b])
                if rel < 0:
                    out[b, t, s] = True
                elif rel < t_new:
                    out[b, t, s] = bool(block[b, t, rel])
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("per_row", [False, True])
def test_block_mask_matches_reference(seed, per_row):
    rng = np.random.default_rng(seed)
    nb, t_new, num_slots = 3, int(rng.integers(1, 6)), 12
    # Lengths include 0, blocks running past the end (length + T > S) and length == S.
    lengths = rng.integers(0, num_slots + 1, nb).astype(np.int32)
    lengths[0] = 0
    lengths[-1] = num_slots - 1
    shape = (nb, t_new, t_new) if per_row else (t_new, t_new)
    block = rng.random(shape) < 0.5
    got = np.asarray(masks.block_mask(lengths, block, num_slots))
    assert got.shape == (nb, t_new, num_slots) and got.dtype == bool
    np.testing.assert_array_equal(got, _ref_block_mask(lengths, block, num_slots))


def test_block_mask_tree_example():
    # Two branches sharing a root: nodes [r, a, b] with a and b children of r.
    block = np.array([[1, 0, 0], [1, 1, 0], [1, 0, 1]], bool)
    got = np.asarray(masks.block_mask(np.array([2]), block, 6))[0]
    expected = np.array([[1, 1, 1, 0, 0, 0],
                         [1, 1, 1, 1, 0, 0],
                         [1, 1, 1, 0, 1, 0]], bool)
    np.testing.assert_array_equal(got, expected)


def test_causal_block():
    np.testing.assert_array_equal(masks.causal_block(3),
                                  [[1, 0, 0], [1, 1, 0], [1, 1, 1]])


def test_causal_mask_semantics():
    lengths = np.array([0, 3, 6], np.int32)
    t_new, num_slots = 4, 9
    got = np.asarray(masks.causal_mask(lengths, t_new, num_slots))
    assert got.shape == (3, t_new, num_slots)
    b, t, s = np.meshgrid(np.arange(3), np.arange(t_new), np.arange(num_slots), indexing="ij")
    # Query t of row b sits at slot lengths[b] + t and sees every slot up to and including it.
    np.testing.assert_array_equal(got, s <= lengths[b] + t)
    # Decode step (T = 1): exactly the committed prefix plus the new token's own slot.
    step = np.asarray(masks.causal_mask(lengths, 1, num_slots))[:, 0]
    np.testing.assert_array_equal(step.sum(-1), lengths + 1)
