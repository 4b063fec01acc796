"""KVCache invariants: writes land at each row's own offset and nowhere else, out-of-range writes
are dropped (never clamped), compaction equals writing the accepted entries directly."""

import jax.numpy as jnp
import numpy as np
import pytest

from specjax import cache as cache_lib
from specjax.cache import CacheCapacityError, KVCache

L, B, K, S, D = 2, 3, 2, 8, 4


def _filled(seed=0):
    """A cache whose every entry is distinct (and k != v), with lengths [2, 0, 5]."""
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((L, B, K, S, D)).astype(np.float32)
    v = rng.standard_normal((L, B, K, S, D)).astype(np.float32)
    return KVCache(k=jnp.asarray(k), v=jnp.asarray(v),
                   lengths=jnp.asarray([2, 0, 5], jnp.int32))


def _ref_write_layer(layer_kv, new, offsets):
    """Slow reference: loop over rows and new tokens, skip slots >= S."""
    out = np.array(layer_kv, copy=True)
    for b in range(new.shape[0]):
        for t in range(new.shape[1]):
            s = int(offsets[b]) + t
            if s < out.shape[2]:
                out[b, :, s, :] = new[b, t]
    return out


def test_init_shapes_and_properties():
    c = KVCache.init(L, B, K, S, D, jnp.bfloat16)
    assert c.k.shape == c.v.shape == (L, B, K, S, D)
    assert c.k.dtype == jnp.bfloat16
    assert c.lengths.dtype == jnp.int32 and c.lengths.shape == (B,)
    assert not np.any(np.asarray(c.lengths))
    assert (c.num_layers, c.batch, c.num_slots) == (L, B, S)


@pytest.mark.parametrize("offsets,num_new", [([0, 3, 5], 2), ([1, 0, 4], 3), ([7, 2, 0], 1)])
def test_write_layer_at_each_rows_offset_only(offsets, num_new):
    c = _filled()
    layer_kv = np.asarray(c.k[1])
    new = np.random.default_rng(1).standard_normal((B, num_new, K, D)).astype(np.float32)
    offsets = np.asarray(offsets, np.int32)
    got = np.asarray(cache_lib.write_layer(jnp.asarray(layer_kv), jnp.asarray(new),
                                           jnp.asarray(offsets)))
    np.testing.assert_array_equal(got, _ref_write_layer(layer_kv, new, offsets))
    # Spot check the layout: row b, slot offsets[b] + t holds new[b, t] for every kv head.
    np.testing.assert_array_equal(got[1, :, offsets[1]], new[1, 0])


@pytest.mark.parametrize("layer", [0, 1])
def test_write_full_array_touches_only_that_layer(layer):
    c = _filled()
    new = np.random.default_rng(2).standard_normal((B, 3, K, D)).astype(np.float32)
    offsets = np.array([1, 4, 0], np.int32)
    kv = np.asarray(c.k)
    got = np.asarray(cache_lib.write(c.k, layer, jnp.asarray(new), jnp.asarray(offsets)))
    expected = kv.copy()
    expected[layer] = _ref_write_layer(kv[layer], new, offsets)
    np.testing.assert_array_equal(got, expected)
    # Traced layer index (as inside lax.scan) gives the same result.
    got_traced = np.asarray(cache_lib.write(c.k, jnp.int32(layer), jnp.asarray(new),
                                            jnp.asarray(offsets)))
    np.testing.assert_array_equal(got_traced, expected)


def test_writes_past_the_end_are_dropped_not_clamped():
    c = _filled()
    kv = np.asarray(c.k)
    new = np.random.default_rng(3).standard_normal((B, 3, K, D)).astype(np.float32)
    # Row 0: slots 6, 7 written, 8 dropped. Row 1: 7 written, 8, 9 dropped. Row 2: all dropped.
    offsets = np.array([6, 7, S], np.int32)
    got = np.asarray(cache_lib.write(c.k, 0, jnp.asarray(new), jnp.asarray(offsets)))
    np.testing.assert_array_equal(got[0, 0, :, 6], new[0, 0])
    np.testing.assert_array_equal(got[0, 0, :, S - 1], new[0, 1])  # not new[0, 2] (clamped)
    np.testing.assert_array_equal(got[0, 1, :, S - 1], new[1, 0])  # not new[1, 2] (clamped)
    np.testing.assert_array_equal(got[0, 2], kv[0, 2])  # slot S-1 of row 2 unchanged
    np.testing.assert_array_equal(got[1], kv[1])
    np.testing.assert_array_equal(got[0, 0, :, :6], kv[0, 0, :, :6])
    np.testing.assert_array_equal(got[0, 1, :, :7], kv[0, 1, :, :7])
    # write_layer drops the same way.
    got_layer = np.asarray(cache_lib.write_layer(c.k[0], jnp.asarray(new), jnp.asarray(offsets)))
    np.testing.assert_array_equal(got_layer, got[0])


def test_set_lengths_and_advance_change_only_lengths():
    c = _filled()
    c2 = cache_lib.advance(c, jnp.asarray([1, 0, 3]))
    np.testing.assert_array_equal(np.asarray(c2.lengths), [3, 0, 8])
    assert c2.lengths.dtype == jnp.int32
    c3 = cache_lib.set_lengths(c2, np.array([0, 4, 1]))
    np.testing.assert_array_equal(np.asarray(c3.lengths), [0, 4, 1])
    assert c3.lengths.dtype == jnp.int32
    for x in (c2, c3):
        np.testing.assert_array_equal(np.asarray(x.k), np.asarray(c.k))
        np.testing.assert_array_equal(np.asarray(x.v), np.asarray(c.v))


def _ref_compact(c, src_slots, num_new):
    """Reads every accepted entry from the original cache, then writes them directly with
    ``write`` at the row's committed length (only the accepted ones: num_new differs per row)."""
    k, v = np.asarray(c.k), np.asarray(c.v)
    out_k, out_v = k.copy(), v.copy()
    lengths = np.asarray(c.lengths)
    for b in range(B):
        for i in range(int(num_new[b])):
            dst, src = lengths[b] + i, src_slots[b, i]
            out_k[:, b, :, dst] = k[:, b, :, src]
            out_v[:, b, :, dst] = v[:, b, :, src]
    return out_k, out_v, lengths + num_new


def test_compact_equals_writing_accepted_entries_directly():
    c = _filled()  # lengths [2, 0, 5]
    # Row 0: overlapping move (dst 2,3,4 from 4,2,3: slot 3 must receive the *old* slot 2).
    # Row 1: num_new = 0, nothing moves even though src_slots has entries.
    # Row 2: 2 of 4 accepted; ignored entries hold junk (-1, out of range) that must not matter.
    src_slots = np.array([[4, 2, 3, 0], [5, 6, 7, 1], [7, 5, -1, 99]], np.int32)
    num_new = np.array([3, 0, 2], np.int32)
    got = cache_lib.compact(c, jnp.asarray(src_slots), jnp.asarray(num_new))
    ref_k, ref_v, ref_len = _ref_compact(c, src_slots, num_new)
    np.testing.assert_array_equal(np.asarray(got.k), ref_k)
    np.testing.assert_array_equal(np.asarray(got.v), ref_v)
    np.testing.assert_array_equal(np.asarray(got.lengths), ref_len)
    # Hand-checked expectations of the example itself.
    k = np.asarray(c.k)
    np.testing.assert_array_equal(np.asarray(got.k)[:, 0, :, 3], k[:, 0, :, 2])
    np.testing.assert_array_equal(np.asarray(got.k)[:, 0, :, 4], k[:, 0, :, 3])
    np.testing.assert_array_equal(np.asarray(got.k)[:, 1], k[:, 1])
    np.testing.assert_array_equal(np.asarray(got.k)[:, 2, :, 7], k[:, 2, :, 7])  # untouched
    np.testing.assert_array_equal(np.asarray(got.lengths), [5, 0, 7])


def test_compact_identity_and_reverse_moves():
    c = _filled(seed=4)
    lengths = np.array([1, 3, 0], np.int32)
    c = cache_lib.set_lengths(c, lengths)
    # Row 0: in-place identity; row 1: reversed block; row 2: pick every other slot.
    src_slots = np.array([[1, 2, 3, 4], [6, 5, 4, 3], [0, 2, 4, 6]], np.int32)
    num_new = np.array([4, 4, 4], np.int32)
    got = cache_lib.compact(c, jnp.asarray(src_slots), jnp.asarray(num_new))
    ref_k, ref_v, ref_len = _ref_compact(c, src_slots, num_new)
    np.testing.assert_array_equal(np.asarray(got.k), ref_k)
    np.testing.assert_array_equal(np.asarray(got.v), ref_v)
    np.testing.assert_array_equal(np.asarray(got.lengths), ref_len)


def test_check_capacity():
    cache_lib.check_capacity(8, 8)  # exactly full is fine
    with pytest.raises(CacheCapacityError) as info:
        cache_lib.check_capacity(9, 8, "my request")
    msg = str(info.value)
    assert "my request" in msg and "9" in msg and "8" in msg
    assert "max_new_tokens" in msg and "prompt" in msg  # says what to change
    assert isinstance(info.value, ValueError)  # callers catching ValueError see it too
