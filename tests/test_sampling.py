"""The processed target distribution equals a numpy statement of temperature / top-k / top-p /
min-p, and sampling draws from exactly that distribution."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from specjax.sampling import (GREEDY, SamplingConfig, processed_logits, processed_probs, sample,
                              sample_probs)

V = 32


def _softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _ref_row(logits, c: SamplingConfig):
    """One row, float64, written from the definitions (HF warper order), plus the smallest
    distance of any token to a keep/drop boundary (to check the test data is unambiguous)."""
    x = np.asarray(logits, np.float64) / c.temperature
    margin = math.inf
    if c.top_k:
        # Keep a token iff fewer than k tokens are strictly more probable (ties with the k-th kept).
        greater = (x[None, :] > x[:, None]).sum(1)
        x = np.where(greater < c.top_k, x, -np.inf)
    if c.top_p < 1.0:
        # Keep a token iff the mass of strictly more probable tokens is below top_p.
        p = _softmax(x)
        mass_greater = np.array([p[x > x[j]].sum() for j in range(len(x))])
        # (The top token, with nothing above it, is kept by construction: no boundary there.)
        near = np.isfinite(x) & (mass_greater > 0)
        if near.any():
            margin = min(margin, np.min(np.abs(mass_greater[near] - c.top_p)))
        x = np.where(mass_greater < c.top_p, x, -np.inf)
    if c.min_p > 0.0:
        p = _softmax(x)
        cutoff = c.min_p * p.max()
        margin = min(margin, np.min(np.abs(p[np.isfinite(x)] - cutoff)))
        x = np.where(p >= cutoff, x, -np.inf)
    return _softmax(x), margin


def _ref_probs(logits, c):
    rows = [_ref_row(r, c) for r in np.asarray(logits).reshape(-1, V)]
    probs = np.stack([r[0] for r in rows]).reshape(np.shape(logits))
    return probs, min(r[1] for r in rows)


def _test_logits():
    rng = np.random.default_rng(0)
    smooth = 2.0 * rng.standard_normal((3, V))
    ties = 0.5 * rng.integers(-4, 5, (2, V))  # many exactly tied logits
    ties[1, :5] = ties[1].max() + 1.0  # a 5-way tie for the top token
    peaked = rng.standard_normal((1, V))
    peaked[0, 7] += 8.0
    return np.concatenate([smooth, ties, peaked]).astype(np.float32)


CONFIGS = [
    SamplingConfig(temperature=1.0),
    SamplingConfig(temperature=0.7),
    SamplingConfig(temperature=1.6),
    SamplingConfig(temperature=1.0, top_k=1),
    SamplingConfig(temperature=1.0, top_k=5),
    SamplingConfig(temperature=1.0, top_k=V),
    SamplingConfig(temperature=1.0, top_k=V + 10),
    SamplingConfig(temperature=1.0, top_p=0.9),
    SamplingConfig(temperature=0.8, top_p=0.5),
    SamplingConfig(temperature=1.0, top_p=1e-6),
    SamplingConfig(temperature=1.0, min_p=0.1),
    SamplingConfig(temperature=1.3, min_p=0.3),
    SamplingConfig(temperature=0.8, top_k=10, top_p=0.9),
    SamplingConfig(temperature=1.2, top_k=8, min_p=0.05),
    SamplingConfig(temperature=1.0, top_p=0.8, min_p=0.2),
    SamplingConfig(temperature=0.5, top_k=20, top_p=0.7, min_p=0.1),
]


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_processed_probs_matches_numpy_reference(config):
    logits = _test_logits()
    ref, margin = _ref_probs(logits, config)
    assert margin > 1e-4, "test data too close to a keep/drop boundary to be decisive"
    got = np.asarray(processed_probs(jnp.asarray(logits), config))
    assert got.shape == logits.shape and got.dtype == np.float32
    np.testing.assert_array_equal(got > 0, ref > 0)  # exactly the same support
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got.sum(-1), 1.0, rtol=0, atol=1e-5)
    # Removed tokens are exactly -inf in the processed logits, kept ones finite.
    pl = np.asarray(processed_logits(jnp.asarray(logits), config))
    np.testing.assert_array_equal(np.isfinite(pl), ref > 0)
    assert np.all(pl[ref == 0] == -np.inf)


def test_reference_cases_by_hand():
    logits = _test_logits()
    # top_p tiny keeps only the argmax (all of a tied top group).
    tiny_p = np.asarray(processed_probs(jnp.asarray(logits), SamplingConfig(1.0, top_p=1e-6)))
    np.testing.assert_array_equal(tiny_p[0] > 0, np.arange(V) == np.argmax(logits[0]))
    np.testing.assert_array_equal(tiny_p[4] > 0, np.arange(V) < 5)
    np.testing.assert_allclose(tiny_p[4, :5], 0.2, rtol=0, atol=1e-6)
    # top_k >= V changes nothing: plain softmax.
    for k in (V, V + 10):
        np.testing.assert_allclose(
            np.asarray(processed_probs(jnp.asarray(logits), SamplingConfig(1.0, top_k=k))),
            _softmax(logits), rtol=0, atol=1e-6)
    # top_k=1 on a 5-way tie keeps the whole tie.
    k1 = np.asarray(processed_probs(jnp.asarray(logits), SamplingConfig(1.0, top_k=1)))
    np.testing.assert_array_equal(k1[4] > 0, np.arange(V) < 5)


def test_greedy_is_argmax_point_mass():
    logits = jnp.asarray(_test_logits())
    p = np.asarray(processed_probs(logits, GREEDY))
    np.testing.assert_array_equal(p, np.eye(V, dtype=np.float32)[np.argmax(logits, -1)])
    tok = np.asarray(sample(jax.random.key(0), logits, GREEDY))
    assert tok.dtype == np.int32
    np.testing.assert_array_equal(tok, np.argmax(logits, -1))
    # Batched leading dims are kept.
    assert sample(jax.random.key(0), logits.reshape(2, 3, V), SamplingConfig(0.9)).shape == (2, 3)


@pytest.mark.parametrize("kwargs,field", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-1), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_p=-0.2), "top_p"), (dict(min_p=-0.1), "min_p"), (dict(min_p=1.0), "min_p"),
])
def test_sampling_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**kwargs)


def test_sampling_config_static_and_hashable():
    assert SamplingConfig().greedy and not SamplingConfig(temperature=0.5).greedy
    assert SamplingConfig(0.5, 3, 0.9, 0.1) == SamplingConfig(0.5, 3, 0.9, 0.1)
    assert hash(SamplingConfig(0.5, 3)) == hash(SamplingConfig(0.5, 3))
    # Boundary values that are allowed.
    SamplingConfig(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0)


def test_same_key_same_token():
    logits = jnp.asarray(_test_logits())
    config = SamplingConfig(temperature=1.0)
    a = np.asarray(sample(jax.random.key(7), logits, config))
    b = np.asarray(sample(jax.random.key(7), logits, config))
    np.testing.assert_array_equal(a, b)
    draws = np.stack([np.asarray(sample(jax.random.key(s), logits, config)) for s in range(8)])
    assert len(np.unique(draws[:, 0])) > 1  # the key matters


N_DRAWS = 20000


def _chi_square(counts, probs):
    """p-value of counts under probs over the support; counts off the support must be zero."""
    support = probs > 0
    assert counts[~support].sum() == 0, "sampled a token the processed distribution removed"
    expected = probs[support] * counts.sum()
    return stats.chisquare(counts[support], expected / expected.sum() * counts.sum()).pvalue


def _draw(logits, config, seed):
    keys = jax.random.split(jax.random.key(seed), N_DRAWS)
    tokens = jax.jit(jax.vmap(lambda k: sample(k, logits, config)))(keys)
    return np.bincount(np.asarray(tokens), minlength=logits.shape[-1])


# Logits with a spread that leaves several tokens with sizeable mass in every setting.
_CHI_LOGITS = np.array([2.0, 1.6, 1.3, 1.0, 0.8, 0.5, 0.2, 0.0, -0.3, -0.7, -1.0, -1.5],
                       np.float32)


@pytest.mark.parametrize("config,seed", [
    (SamplingConfig(temperature=0.7), 1),
    (SamplingConfig(temperature=1.0, top_k=4), 2),
    (SamplingConfig(temperature=1.0, top_p=0.8), 3),
    (SamplingConfig(temperature=1.5, top_k=8, top_p=0.9, min_p=0.1), 4),
])
def test_sample_follows_processed_probs(config, seed):
    logits = jnp.asarray(_CHI_LOGITS)
    probs = np.asarray(processed_probs(logits, config), np.float64)
    counts = _draw(logits, config, seed)
    assert counts.sum() == N_DRAWS
    assert _chi_square(counts, probs) > 1e-3
    # Power: the same draws clearly reject the unprocessed distribution softmax(logits).
    raw = _softmax(_CHI_LOGITS)
    if np.all(probs > 0):
        assert stats.chisquare(counts, raw * N_DRAWS).pvalue < 1e-6
    else:
        assert counts[probs == 0].sum() < raw[probs == 0].sum() * N_DRAWS / 10


def test_sample_probs_follows_explicit_probs():
    probs = np.array([0.0, 0.5, 0.0, 0.2, 0.3, 0.0], np.float32)
    keys = jax.random.split(jax.random.key(5), N_DRAWS)
    tokens = jax.vmap(lambda k: sample_probs(k, jnp.asarray(probs)))(keys)
    counts = np.bincount(np.asarray(tokens), minlength=len(probs))
    assert _chi_square(counts, probs.astype(np.float64)) > 1e-3
    # Unnormalised rows are fine: scaling changes nothing.
    tokens2 = jax.vmap(lambda k: sample_probs(k, jnp.asarray(probs * 3.0)))(keys)
    np.testing.assert_array_equal(np.asarray(tokens2), np.asarray(tokens))
