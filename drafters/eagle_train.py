"""Training the EAGLE layer (``drafters/eagle.py``) on self-distilled sequences.

Data (:func:`window_dataset`): one window of the last ``W`` pairs of every distilled sequence,
right-aligned (left padding is masked). Window slot ``s`` holds pair ``j`` = ``(f_j, x_{j+1})``
where ``f`` is the target's final-norm hidden state; the regression target at ``s`` is
``f_{j+1}`` and the token label ``x_{j+2}`` (only where it is the target's own greedy token, i.e.
in the response).

Levels (:func:`level_features`): level 0 is teacher forcing (true input features). Level ``m``
feeds the layer its own predictions, exactly as at decode time ``m`` tokens into a draft chain:
the input feature at slot ``s`` is level ``m - 1``'s output at ``s - 1``, and a query at slot
``s`` attends to the key at slot ``s - i`` of level ``max(m - i, 0)`` (the true features before
the chain started, its own predicted ones after). Level ``m``'s argmax at slot ``s`` is the
draft at depth ``m + 1`` given correct earlier tokens, so per-level top-1 accuracy is the
per-depth acceptance of a greedy chain (:func:`depth_accuracy`). Each level is one
:meth:`EagleLayer.run <drafters.eagle.EagleLayer.run>` whose attention spans those levels.

Loss (:func:`make_loss_fn`): per level, EAGLE's feature regression (smooth L1) plus
``ce_weight`` times the token cross-entropy through the target's frozen LM head, level ``m``
weighted ``level_decay ** m``.

Axis glossary: N sequences, B batch, W window slots, E embedding width, V vocabulary.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from drafters.eagle import EagleDrafter, EagleLayer
from models.decoder_block import attention
from specjax.tree_tuning import label_ranks


def window_dataset(records, seq_len: int) -> dict:
    """Right-aligned windows of the last ``seq_len`` pairs of each sequence.

    Returns:
      ``{"hidden": float32[N, W+1, E], "tokens": int32[N, W+2], "valid": bool[N, W],
      "label_mask": bool[N, W], "positions": int32[N, W]}``: slot ``s`` has input feature
      ``hidden[:, s]``, input token ``tokens[:, s+1]``, target feature ``hidden[:, s+1]`` and
      label ``tokens[:, s+2]``.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    n, e = len(records), records.hidden.shape[-1]
    width = records.tokens.shape[1]
    hidden = np.zeros((n, seq_len + 1, e), np.float32)
    tokens = np.zeros((n, seq_len + 2), np.int32)
    valid = np.zeros((n, seq_len), bool)
    label_mask = np.zeros((n, seq_len), bool)
    positions = np.zeros((n, seq_len), np.int32)
    for r in range(n):
        length, prompt = int(records.lengths[r]), int(records.prompt_lengths[r])
        j = length - 1 - seq_len + np.arange(seq_len)  # pair index of each slot
        ok = j >= 0
        jj = np.clip(j, 0, width - 1)
        valid[r] = ok
        positions[r] = np.maximum(j, 0)
        hidden[r, :seq_len] = np.where(ok[:, None], records.hidden[r, jj], 0.0)
        hidden[r, seq_len] = records.hidden[r, length - 1]
        nxt = np.clip(j + 1, 0, width - 1)
        tokens[r, 1:seq_len + 1] = np.where(ok, records.tokens[r, nxt], 0)
        lab = j + 2  # the label of slot s is the input token of slot s + 1
        label_mask[r] = ok & (lab < length) & (lab >= prompt)
    return {"hidden": hidden, "tokens": tokens, "valid": valid, "label_mask": label_mask,
            "positions": positions}


def level_features(drafter: EagleDrafter, params, target_params, feats, tokens, positions,
                   valid, num_levels: int) -> list:
    """Predicted features of every level (see the module docstring).

    Args:
      feats: ``[B, W, E]`` true input features; tokens: ``int32[B, W]`` input tokens;
      positions: ``int32[B, W]``; valid: ``bool[B, W]`` real pairs.
    Returns:
      ``num_levels`` arrays ``[B, W, E]``; level ``m`` is meaningful at slots whose pair
      ``s - m`` is valid.
    """
    mod = drafter.module
    emb = drafter.embed(target_params, tokens)
    b, w, _ = feats.shape
    s = jnp.arange(w)
    offset = s[:, None] - s[None, :]  # query - key
    causal = (offset >= 0)[None] & valid[:, None, :]  # [B, W, W]
    keys, values, outs = [], [], []
    level_in = feats
    for m in range(num_levels):

        def attend_levels(q, k, v, m=m):  # over the keys of levels 0..m
            keys.append(k.transpose(0, 2, 1, 3))
            values.append(v.transpose(0, 2, 1, 3))
            # Key (level j, slot s') is seen by a level-m query at s iff j == max(m-(s-s'), 0).
            blocks = [causal & (jnp.maximum(m - offset, 0) == j)[None] for j in range(m + 1)]
            return attention(q, jnp.concatenate(keys, axis=2), jnp.concatenate(values, axis=2),
                             jnp.concatenate(blocks, axis=2)), None

        out, _ = mod.apply({"params": params}, level_in, emb, positions, attend_levels,
                           method=EagleLayer.run)
        outs.append(out)
        level_in = jnp.concatenate([jnp.zeros_like(out[:, :1]), out[:, :-1]], axis=1)
    return outs


def _smooth_l1(x):
    a = jnp.abs(x)
    return jnp.where(a < 1.0, 0.5 * a * a, a - 0.5)


def level_masks(batch: dict, num_levels: int) -> list:
    """Per level ``m``: ``(regression mask, label mask)`` ``bool[B, W]``; level ``m`` needs the
    chain's first pair ``s - m`` to be valid."""
    valid, label = batch["valid"], batch["label_mask"]
    out = []
    for m in range(num_levels):
        start_ok = jnp.concatenate([jnp.zeros_like(valid[:, :m]), valid[:, :valid.shape[1] - m]],
                                   axis=1) if m else valid
        out.append((valid & start_ok, label & start_ok))
    return out


def make_loss_fn(drafter: EagleDrafter, num_levels: int = 3, ce_weight: float = 0.1,
                 level_decay: float = 1.0, ce_window: int = 128):
    """``loss_fn(params, batch, target_params) -> (loss, metrics)`` for
    :func:`specjax.train.make_train_step`; ``batch`` as from :func:`window_dataset`.

    The token loss is computed on the last ``ce_window`` slots only (the LM head is the
    expensive part; windows are right-aligned, so the response ends there).
    """
    if num_levels < 1:
        raise ValueError(f"num_levels must be >= 1, got {num_levels}")

    def loss_fn(params, batch, target_params):
        w = batch["valid"].shape[1]
        hidden = batch["hidden"]
        outs = level_features(drafter, params, target_params, hidden[:, :w],
                              batch["tokens"][:, 1:w + 1], batch["positions"], batch["valid"],
                              num_levels)
        target = hidden[:, 1:]
        labels = batch["tokens"][:, 2:][:, -ce_window:]
        loss, metrics = 0.0, {}
        for m, (out, (reg_mask, lab_mask)) in enumerate(zip(outs, level_masks(batch,
                                                                               num_levels))):
            reg = _smooth_l1(out - target).mean(-1)
            rmask = reg_mask.astype(jnp.float32)
            reg = (reg * rmask).sum() / jnp.maximum(rmask.sum(), 1.0)
            logits = drafter.logits(target_params, out[:, -ce_window:])
            logp = jax.nn.log_softmax(logits, -1)
            nll = -jnp.take_along_axis(logp, labels[..., None], -1)[..., 0]
            lmask = lab_mask[:, -ce_window:].astype(jnp.float32)
            count = jnp.maximum(lmask.sum(), 1.0)
            ce = (nll * lmask).sum() / count
            acc = ((jnp.argmax(logits, -1) == labels) * lmask).sum() / count
            loss = loss + level_decay ** m * (reg + ce_weight * ce)
            metrics |= {f"reg_{m}": reg, f"ce_{m}": ce, f"acc_{m}": acc}
        return loss, metrics

    return loss_fn


def _batch_levels(drafter, params, target_params, batch, num_levels):
    """Level features of a :func:`window_dataset` batch, and its labels ``int32[B, W]``."""
    w = batch["valid"].shape[1]
    outs = level_features(drafter, params, target_params, batch["hidden"][:, :w],
                          batch["tokens"][:, 1:w + 1], batch["positions"], batch["valid"],
                          num_levels)
    return outs, batch["tokens"][:, 2:]


@functools.partial(jax.jit, static_argnames=("drafter", "num_levels"))
def _hits(drafter, params, target_params, batch, num_levels):
    outs, labels = _batch_levels(drafter, params, target_params, batch, num_levels)
    hits, counts = [], []
    for out, (_, lab_mask) in zip(outs, level_masks(batch, num_levels)):
        top = jnp.argmax(drafter.logits(target_params, out), -1)
        hits.append(((top == labels) & lab_mask).sum())
        counts.append(lab_mask.sum())
    return jnp.stack(hits), jnp.stack(counts)


def depth_accuracy(drafter: EagleDrafter, params, target_params, data: dict,
                   num_levels: int = 4, chunk: int = 8) -> np.ndarray:
    """``float[num_levels]``: top-1 accuracy of the draft at depth ``1..num_levels`` against the
    target's own tokens, the drafter feeding its own predicted features (earlier tokens
    correct), on ``data`` from :func:`window_dataset`."""
    n = data["valid"].shape[0]
    hits = np.zeros(num_levels)
    counts = np.zeros(num_levels)
    for s in range(0, n, chunk):
        idx = np.arange(s, s + chunk) % n  # fixed shape: wrap, then mask the repeats
        batch = {k: v[idx] for k, v in data.items()}
        keep = (np.arange(s, s + chunk) < n)[:, None]
        batch["label_mask"] = batch["label_mask"] & keep
        h, c = _hits(drafter, params, target_params, batch, num_levels)
        hits += np.asarray(h)
        counts += np.asarray(c)
    return hits / np.maximum(counts, 1)


@functools.partial(jax.jit, static_argnames=("drafter", "num_levels"))
def _level_ranks(drafter, params, target_params, batch, num_levels):
    outs, labels = _batch_levels(drafter, params, target_params, batch, num_levels)
    ranks = []
    for out, (_, lab_mask) in zip(outs, level_masks(batch, num_levels)):
        logits = drafter.draft_logits(target_params, out)  # [B, W, N]
        ranks.append(jnp.where(lab_mask, label_ranks(logits, labels), -1))
    return jnp.stack(ranks, axis=-1)  # [B, W, M]


def depth_ranks(drafter: EagleDrafter, params, target_params, data: dict, num_levels: int = 5,
                chunk: int = 4) -> np.ndarray:
    """Teacher-forced ranks of the target's tokens under the drafter, per ROOT and depth:
    ``int32[R, num_levels]``, the input of :mod:`specjax.tree_tuning`.

    Row ``r`` is one root (a slot of ``data`` from :func:`window_dataset` whose depth-1 label
    is a response token); entry ``d - 1`` is the rank (``top_k`` order; ``draft_vocab`` when
    the token is outside the draft vocabulary) of the true token at depth ``d`` among the
    drafts of the layer fed its own predicted features for the ``d - 1`` steps after the root
    and the TRUE tokens (what the layer computes on a tree path that matches the target), or
    -1 when that token is past the response.
    """
    n = data["valid"].shape[0]
    rows = []
    for s in range(0, n, chunk):
        idx = np.arange(s, s + chunk) % n  # fixed shape: wrap, then drop the repeats
        batch = {k: v[idx] for k, v in data.items()}
        lv = np.asarray(_level_ranks(drafter, params, target_params, batch, num_levels))
        lv = lv[:min(chunk, n - s)]  # [b, W, M]: level m at slot r + m belongs to root r
        w = lv.shape[1]
        per_root = np.full(lv.shape, -1, np.int64)
        for m in range(num_levels):
            per_root[:, :w - m, m] = lv[:, m:, m]
        rows.append(per_root[per_root[..., 0] >= 0])
    return np.concatenate(rows).astype(np.int32) if rows else \
        np.zeros((0, num_levels), np.int32)
