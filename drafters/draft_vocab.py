"""A reduced draft vocabulary: the N most frequent tokens of the target's labels, with the map
from draft ids to target ids (EAGLE-3's ``d2t``).

A drafter that scores its positions over ``N << V`` tokens reads an ``[E, N]`` LM head instead
of ``[E, V]`` (SmolLM2: 49152 x 576 = 113 MB per read), once per round. Drafted tokens are
mapped back to target ids before verification, which uses the full vocabulary: a token outside
the draft vocabulary is simply never drafted, so the output is unchanged (lossless).

``vocab_map int32[N]``: ``vocab_map[j]`` is the target id of draft id ``j``, most frequent
first. It travels with the drafter's params (an integer leaf, never trained: training keeps it
among the frozen inputs).

Axis glossary: E width, V target vocabulary, N draft vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def frequent_ids(labels: np.ndarray, mask: np.ndarray, size: int, vocab_size: int) -> np.ndarray:
    """``int32[size]``: the ``size`` most frequent ids among ``labels[mask]`` (ties: the lower
    id first), completed with the lowest ids never seen when fewer than ``size`` occur."""
    if not 1 <= size <= vocab_size:
        raise ValueError(f"draft vocabulary size must be in 1..{vocab_size}, got {size}")
    counts = np.bincount(np.asarray(labels)[np.asarray(mask, bool)].ravel(),
                         minlength=vocab_size)[:vocab_size]
    order = np.lexsort((np.arange(vocab_size), -counts))  # by count desc, then id asc
    return order[:size].astype(np.int32)


def check_map(vocab_map, vocab_size: int, size=None) -> np.ndarray:
    """``vocab_map`` as ``int32[N]``; ValueError unless it holds ``size`` (when given)
    distinct target ids in ``0..vocab_size - 1`` (siblings drafted from it must stay distinct
    tokens after the mapping)."""
    vocab_map = np.asarray(vocab_map)
    if vocab_map.ndim != 1 or not vocab_map.size or \
            not np.issubdtype(vocab_map.dtype, np.integer) or \
            (size is not None and vocab_map.shape != (size,)):
        raise ValueError(f"vocab_map must be {size or 'N'} integer ids (target ids, int[N]), "
                         f"got {vocab_map.dtype} {vocab_map.shape}")
    if vocab_map.max() >= vocab_size:
        raise ValueError(f"vocab_map must hold distinct target ids in 0..{vocab_size - 1}: it "
                         f"holds ids up to {vocab_map.max()}; build it for this target")
    if vocab_map.min() < 0 or len(np.unique(vocab_map)) != vocab_map.size:
        raise ValueError(f"vocab_map must hold distinct target ids in 0..{vocab_size - 1} "
                         "(drafters.draft_vocab.frequent_ids makes one)")
    return vocab_map.astype(np.int32)


def coverage(vocab_map: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> float:
    """The share of ``labels[mask]`` inside the draft vocabulary (the ceiling of depth-1
    acceptance for drafts from it)."""
    lab = np.asarray(labels)[np.asarray(mask, bool)]
    return float(np.isin(lab, vocab_map).mean()) if lab.size else 0.0


def head_rows(target_head: jax.Array, vocab_map: jax.Array) -> jax.Array:
    """``[E, N]``: the columns of a target LM head ``[E, V]`` for the draft vocabulary (the
    initial value of a drafter's own head)."""
    return jnp.take(target_head, vocab_map, axis=1)


def to_target(vocab_map: jax.Array, draft_ids: jax.Array) -> jax.Array:
    """Draft ids ``int32[...]`` to target ids."""
    return jnp.take(vocab_map, draft_ids, axis=0)


def target_lm_head(target, target_params) -> jax.Array:
    """The target's LM head as ``[E, V]`` (its own matrix, or the tied embedding transposed),
    for :func:`head_rows`."""
    p = target_params
    if "lm_head" in p:
        return p["lm_head"]
    return p["embedder"]["embedding"].T
