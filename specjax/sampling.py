"""Logits to the processed target distribution, and sampling from it.

:func:`processed_probs` is the single definition of "the target distribution" in specjax: plain
sampling draws from it, and every lossless verification rule compares drafts against it. Changing
how logits are processed therefore changes plain and speculative decoding together.

Processing order (the order Hugging Face transformers applies its warpers in): temperature, then
top-k, then top-p (nucleus), then min-p. Greedy decoding (``temperature == 0``) is a separate
static branch (argmax), never ``temperature -> 0``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Static sampling settings (hashable: a jit static argument).

    Attributes:
      temperature: 0 means greedy (argmax); otherwise logits are divided by it.
      top_k: keep the k most probable tokens (0 disables).
      top_p: keep the smallest set of most probable tokens whose mass reaches top_p (1.0 disables).
      min_p: drop tokens whose probability is below ``min_p * max_prob`` (0.0 disables).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    def __post_init__(self):
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p < 1.0:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


GREEDY = SamplingConfig()


def processed_logits(logits: jax.Array, config: SamplingConfig) -> jax.Array:
    """Applies temperature, top-k, top-p and min-p; removed tokens get ``-inf``.

    Args:
      logits: ``[..., V]``.
    Returns:
      float32 ``[..., V]`` logits of the processed distribution (for greedy: the raw logits).
    """
    logits = logits.astype(jnp.float32)
    if config.greedy:
        return logits
    logits = logits / config.temperature
    neg_inf = jnp.array(-jnp.inf, jnp.float32)
    vocab = logits.shape[-1]
    if config.top_k and config.top_k < vocab:
        kth = jax.lax.top_k(logits, config.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg_inf, logits)
    if config.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
        # Keep a sorted token while the mass strictly before it is below top_p (so the top token
        # always stays); the threshold is the smallest kept logit.
        keep = mass_before < config.top_p
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, neg_inf, logits)
    if config.min_p > 0.0:
        probs = jax.nn.softmax(logits, axis=-1)
        cutoff = config.min_p * jnp.max(probs, axis=-1, keepdims=True)
        logits = jnp.where(probs < cutoff, neg_inf, logits)
    return logits


def processed_probs(logits: jax.Array, config: SamplingConfig) -> jax.Array:
    """The target distribution ``p``: float32 ``[..., V]`` summing to 1.

    For greedy decoding it is the one-hot of the argmax (a point mass), so rules written for
    sampling reduce to exact greedy matching.
    """
    if config.greedy:
        return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    return jax.nn.softmax(processed_logits(logits, config), axis=-1)


def sample(key: jax.Array, logits: jax.Array, config: SamplingConfig) -> jax.Array:
    """Draws one token per row from the processed distribution (argmax when greedy).

    Args:
      key: a PRNG key (unused when greedy).
      logits: ``[..., V]``.
    Returns:
      int32 ``[...]``.
    """
    if config.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, processed_logits(logits, config), axis=-1).astype(jnp.int32)


def sample_probs(key: jax.Array, probs: jax.Array) -> jax.Array:
    """Draws one token per row from explicit probabilities ``[..., V]`` (rows need not be
    normalised; an all-zero row yields token 0 and must be excluded by the caller)."""
    logp = jnp.where(probs > 0, jnp.log(jnp.maximum(probs, 1e-38)), -jnp.inf)
    return jax.random.categorical(key, logp, axis=-1).astype(jnp.int32)


def draw(key: jax.Array, logits: jax.Array, config: SamplingConfig
         ) -> tuple[jax.Array, Optional[jax.Array]]:
    """A drafter's token from its own logits under the decoding's sampling settings.

    Greedy: the argmax and no distribution. Sampling: a draw from the processed distribution
    ``q`` (same temperature / top-k / top-p / min-p as the target), returned with ``q``, the
    exact distribution speculative sampling must be told the draft came from.

    Returns:
      ``(int32[...], float32[..., V] or None)``.
    """
    if config.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), None
    q = processed_probs(logits, config)
    return sample_probs(key, q), q
