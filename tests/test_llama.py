"""The Llama model: its math against an independent numpy forward, and every way of feeding it
(incremental, chunked, scanned, layer subsets, trees, ragged batches) against the plain
teacher-forced forward."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.decoder_block import rms_norm, rope_inv_freq
from models.llama import LlamaModel
from specjax import cache as cache_lib
from specjax import masks
import tinymodels as kit

ATOL = 1e-5  # float32 model vs float32 model, same math in a different order
REF_ATOL = 5e-5  # float32 model vs the float64 numpy reference (observed error ~5e-6)
LONG_ATOL = 1e-4  # positions ~1000: float32 rope angles are rounded at ~1000 * 6e-8 rad

# Compiles dominate the runtime (seconds each on a loaded CPU), so the tests share a few shapes:
# batches are [B=2, T=10] in an S=16 cache, single chains are padded to [1, W=16].
B, T, S, W = 2, 10, 16, 16


def _tokens(shape, seed=0, vocab=128):
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def _close(a, b, atol=ATOL):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=atol)


def _full(model, params, tokens, **kwargs):
    """Teacher-forced forward of [B, T] tokens in an S-slot cache, with every layer tapped."""
    return kit.full_forward(model, params, tokens, num_slots=S,
                            hidden_layers=tuple(range(model.num_layers)), **kwargs)


def _step(model, params, tokens, cache):
    """One token per row at each row's committed length."""
    return kit.forward(model, params, jnp.asarray(tokens, jnp.int32), cache.lengths[:, None],
                       cache, masks.causal_mask(cache.lengths, 1, cache.num_slots))


@pytest.mark.parametrize("kind", kit.KINDS)
def test_full_forward_matches_numpy_reference(kind):
    model, params = kit.tiny_model(kind)
    tokens = _tokens((B, T), seed=1)
    layers = tuple(range(model.num_layers))
    out = _full(model, params, tokens)
    ref = kit.reference_forward(model, params, tokens)
    assert out.logits.shape == (B, T, model.vocab_size) and out.logits.dtype == jnp.float32
    _close(out.logits, ref["logits"], REF_ATOL)
    _close(out.hidden, ref["hidden"], REF_ATOL)
    # hidden_layers taps are the residual stream after each layer.
    assert out.taps.shape == (len(layers), B, T, model.hidden_size)
    _close(out.taps, ref["residuals"], REF_ATOL)
    # The forward writes keys/values and leaves lengths alone.
    np.testing.assert_array_equal(np.asarray(out.cache.lengths), [0, 0])


def test_taps_order_final_norm_and_errors():
    model, params = kit.tiny_model("llama")
    tokens = _tokens((B, T), seed=2)
    out = kit.full_forward(model, params, tokens, num_slots=S, hidden_layers=(2, 0))
    all_taps = _full(model, params, tokens).taps
    _close(out.taps[0], all_taps[2])  # in the order requested
    _close(out.taps[1], all_taps[0])
    # The last layer's residual, final-normed, is the returned hidden state.
    normed = rms_norm(out.taps[0], params["final_norm"], model.config.rms_norm_eps)
    _close(normed, out.hidden)
    with pytest.raises(ValueError, match="hidden_layers"):
        kit.full_forward(model, params, tokens, layers=(0, 1), hidden_layers=(2,))


# MHA; GQA; GQA + bias + tied; Gemma 3 and Mistral with windows shorter than T (10).
@pytest.mark.parametrize("kind", ["llama", "gqa", "qwen2", "gemma3", "mistral_window"])
def test_incremental_decoding_equals_teacher_forcing(kind):
    model, params = kit.tiny_model(kind)
    tokens = _tokens((B, T), seed=3)
    full = _full(model, params, tokens)
    cache = model.init_cache(B, S)
    for i in range(T):
        out = _step(model, params, tokens[:, i:i + 1], cache)
        _close(out.logits[:, 0], full.logits[:, i])
        _close(out.hidden[:, 0], full.hidden[:, i])
        np.testing.assert_array_equal(np.asarray(out.cache.lengths), [i, i])
        assert out.taps is None  # no hidden_layers requested
        cache = cache_lib.advance(out.cache, jnp.ones((B,), jnp.int32))
    # Same keys/values in the committed slots.
    _close(cache.k[:, :, :, :T], full.cache.k[:, :, :, :T])
    _close(cache.v[:, :, :, :T], full.cache.v[:, :, :, :T])


@pytest.mark.parametrize("chunks", [(4, 4, 2), (1, 3, 3, 3)])
def test_chunked_prefill_equals_one_block(chunks):
    model, params = kit.tiny_model("gqa")
    tokens = _tokens((B, T), seed=4)
    full = _full(model, params, tokens)
    cache = model.init_cache(B, S)
    start = 0
    for size in chunks:
        pos = jnp.broadcast_to(jnp.arange(start, start + size, dtype=jnp.int32), (B, size))
        out = kit.forward(model, params, jnp.asarray(tokens[:, start:start + size]), pos, cache,
                          masks.causal_mask(cache.lengths, size, S))
        _close(out.logits, full.logits[:, start:start + size])
        cache = cache_lib.advance(out.cache, jnp.full((B,), size, jnp.int32))
        start += size
    _close(cache.k[:, :, :, :T], full.cache.k[:, :, :, :T])
    _close(cache.v[:, :, :, :T], full.cache.v[:, :, :, :T])


def test_scan_layers_equals_unrolled():
    base, params = kit.tiny_model("llama")
    model = LlamaModel(dataclasses.replace(base.config, scan_layers=False))
    scanned = LlamaModel(dataclasses.replace(base.config, scan_layers=True))
    tokens = _tokens((B, T), seed=5)
    for kwargs in (dict(hidden_layers=(0, 1, 2)), dict(layers=(2, 0), hidden_layers=(0,))):
        a = kit.full_forward(model, params, tokens, num_slots=S, **kwargs)
        b = kit.full_forward(scanned, params, tokens, num_slots=S, **kwargs)
        _close(b.logits, a.logits)
        _close(b.hidden, a.hidden)
        _close(b.cache.k, a.cache.k)
        _close(b.cache.v, a.cache.v)
        if a.taps is not None:
            _close(b.taps, a.taps)


def _sub_model(model, params, layer_ids):
    """A len(layer_ids)-layer model made of the given layers' parameters, in that order."""
    sub = LlamaModel(model.config.with_layers(layer_ids))
    idx = np.asarray(layer_ids)
    sub_params = dict(params, layers={n: w[idx] for n, w in params["layers"].items()})
    return sub, sub_params


@pytest.mark.parametrize("layer_ids,scan,kind", [((0, 1), False, "llama"), ((0, 2), False, "llama"),
                                                ((2, 1), True, "llama"), ((1, 2), True, "gemma3")])
def test_layer_subset_equals_smaller_model(layer_ids, scan, kind):
    """(Gemma 3: each layer keeps its window and rope base in the smaller model.)"""
    model, params = kit.tiny_model(kind)
    full_model = model
    model = LlamaModel(dataclasses.replace(model.config, scan_layers=scan))
    sub, sub_params = _sub_model(model, params, layer_ids)
    tokens = _tokens((B, T), seed=6)
    got = kit.full_forward(model, params, tokens, num_slots=S, layers=layer_ids)
    want = kit.full_forward(sub, sub_params, tokens, num_slots=S)
    _close(got.logits, want.logits)
    _close(got.hidden, want.hidden)
    # Layer i's cache entries live at index i; layers not run are untouched (still zero).
    for j, i in enumerate(layer_ids):
        _close(got.cache.k[i], want.cache.k[j])
        _close(got.cache.v[i], want.cache.v[j])
    for i in set(range(model.num_layers)) - set(layer_ids):
        assert not np.any(np.asarray(got.cache.k[i])) and not np.any(np.asarray(got.cache.v[i]))
    # The subset really is a different network (the comparison above is not vacuous).
    assert np.abs(np.asarray(got.logits) - np.asarray(
        _full(full_model, params, tokens).logits)).max() > 0.1


def test_logits_at_selects_from_full_logits():
    model, params = kit.tiny_model("gqa")
    tokens = _tokens((B, T), seed=7)
    full = _full(model, params, tokens)
    idx = np.array([[9, 0, 3], [2, 2, 5]], np.int32)  # any order, repeats allowed
    cache = model.init_cache(B, S)
    out = kit.forward(model, params, jnp.asarray(tokens),
                      jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)), cache,
                      masks.causal_mask(cache.lengths, T, S), logits_at=jnp.asarray(idx))
    assert out.logits.shape == (B, 3, model.vocab_size)
    _close(out.logits, np.take_along_axis(np.asarray(full.logits), idx[:, :, None], axis=1))
    _close(out.hidden, full.hidden)  # hidden is still every position


@pytest.mark.parametrize("kind", ["gqa", "qwen2"])  # untied / tied LM head
def test_lm_head_num_ids_is_a_slice_of_the_full_head(kind):
    model, params = kit.tiny_model(kind)
    hidden = jax.random.normal(jax.random.key(0), (2, 3, model.hidden_size))
    full = np.asarray(model.lm_head(params, hidden))
    part = np.asarray(model.lm_head(params, hidden, num_ids=40))
    assert part.shape == (2, 3, 40)
    _close(part, full[..., :40])
    for bad in (0, model.vocab_size + 1):
        with pytest.raises(ValueError, match="num_ids"):
            model.lm_head(params, hidden, num_ids=bad)


def test_rope_inv_freq_and_llama3_scaling():
    model, params = kit.tiny_model("llama3_rope")
    config = model.config
    got = np.asarray(rope_inv_freq(config))
    ref = kit.reference_inv_freq(config)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=0)
    plain_config = dataclasses.replace(config, rope_scaling=None)
    plain = kit.reference_inv_freq(plain_config)
    np.testing.assert_allclose(np.asarray(rope_inv_freq(plain_config)), plain, rtol=1e-6)
    # The tiny config exercises all three bands: kept, divided by factor, smoothed in between.
    factor = config.rope_scaling.factor
    assert np.any(np.isclose(ref, plain)) and np.any(np.isclose(ref, plain / factor))
    assert np.any(~np.isclose(ref, plain) & ~np.isclose(ref, plain / factor))

    # Runs and matches the reference at long positions; differs from the unscaled model.
    unscaled = LlamaModel(plain_config)
    tokens = _tokens((B, T), seed=8)
    for start in (0, 1000):
        out = _full(model, params, tokens, start_position=start)
        ref_out = kit.reference_forward(model, params, tokens, start_position=start)
        _close(out.logits, ref_out["logits"], LONG_ATOL)
        other = kit.full_forward(unscaled, params, tokens, num_slots=S, start_position=start)
        assert np.all(np.isfinite(np.asarray(out.logits)))
        assert np.abs(np.asarray(out.logits) - np.asarray(other.logits))[:, 1:].max() > 0.1
        # The first token only sees itself: rope cannot matter there.
        _close(out.logits[:, 0], other.logits[:, 0])


def test_rope_is_relative():
    """Shifting every position by a constant leaves the logits unchanged."""
    model, params = kit.tiny_model("gqa")
    tokens = _tokens((B, T), seed=9)
    a = _full(model, params, tokens)
    b = _full(model, params, tokens, start_position=100)
    _close(b.logits, a.logits, REF_ATOL)


def _ancestor_block(parents):
    """bool[T, T]: node t sees u iff u is t or an ancestor of t."""
    t_new = len(parents)
    block = np.zeros((t_new, t_new), bool)
    for t in range(t_new):
        u = t
        while u >= 0:
            block[t, u] = True
            u = parents[u]
    return block


def _depths(parents):
    return np.array([0 if p < 0 else 1 + _depths(parents[:p + 1])[p] for p in parents])


def _paths(parents):
    """Root-to-leaf node lists."""
    leaves = [t for t in range(len(parents)) if t not in parents]
    out = []
    for leaf in leaves:
        path, u = [], leaf
        while u >= 0:
            path.append(u)
            u = parents[u]
        out.append(path[::-1])
    return out


def test_tree_mask_branches_equal_chains_and_compact_commits_a_branch():
    model, params = kit.tiny_model("gqa")
    prompt_lens = np.array([5, 3], np.int32)
    prompts = _tokens((B, T), seed=10)  # garbage past each row's length
    # Row 0: root -> a1 -> a2 and root -> b1 -> b2. Row 1: root with children c, d; c -> e; d -> f.
    parents = [[-1, 0, 1, 0, 3], [-1, 0, 0, 1, 2]]
    nodes = _tokens((B, 5), seed=11)

    # Commit the prompts (padded batch prefill, then roll lengths back to the true lengths).
    cache = cache_lib.set_lengths(_full(model, params, prompts).cache, prompt_lens)

    # One forward over both trees: [B, T, T] ancestor blocks, positions = length + depth.
    block = np.stack([_ancestor_block(p) for p in parents])
    positions = prompt_lens[:, None] + np.stack([_depths(p) for p in parents])
    out = kit.forward(model, params, jnp.asarray(nodes), jnp.asarray(positions, jnp.int32), cache,
                      masks.block_mask(cache.lengths, block, S))

    accepted = []
    for b in range(B):
        for path in _paths(parents[b]):
            chain = list(prompts[b, :prompt_lens[b]]) + list(nodes[b, path])
            ref = kit.chain_logits(model, params, chain, W)
            for j, node in enumerate(path):
                _close(out.logits[b, node], ref[prompt_lens[b] + j])
        accepted.append(_paths(parents[b])[-1])  # commit the last branch of each row

    # Commit one branch per row with compact, then decode one more token: it must equal the
    # chain prompt + branch + token run from scratch.
    src = np.stack([prompt_lens[b] + np.array(accepted[b]) for b in range(B)]).astype(np.int32)
    num_new = np.array([len(a) for a in accepted], np.int32)
    cache = cache_lib.compact(out.cache, jnp.asarray(src), jnp.asarray(num_new))
    np.testing.assert_array_equal(np.asarray(cache.lengths), prompt_lens + num_new)
    nxt = _tokens((B, 1), seed=12)
    step = _step(model, params, nxt, cache)
    for b in range(B):
        chain = list(prompts[b, :prompt_lens[b]]) + list(nodes[b, accepted[b]]) + [nxt[b, 0]]
        _close(step.logits[b, 0], kit.chain_logits(model, params, chain, W)[-1])


def test_ragged_batch_rows_equal_each_row_alone():
    model, params = kit.tiny_model("gqa")
    lens = np.array([3, 9], np.int32)
    tokens = _tokens((B, T), seed=13)  # garbage padding past each row's length
    out = _full(model, params, tokens)
    for b in range(B):
        _close(out.logits[b, :lens[b]], kit.chain_logits(model, params, tokens[b, :lens[b]], W))
    # Continue each row at its own length with one new token (ragged positions).
    cache = cache_lib.set_lengths(out.cache, lens)
    nxt = _tokens((B, 1), seed=14)
    step = _step(model, params, nxt, cache)
    for b in range(B):
        chain = list(tokens[b, :lens[b]]) + [nxt[b, 0]]
        _close(step.logits[b, 0], kit.chain_logits(model, params, chain, W)[-1])
