"""Training the EAGLE-3 drafter (:mod:`drafters.eagle3`) on a distillation corpus
(:mod:`drafters.corpus`) with EAGLE-3's training-time test (TTT).

The interface ``experiments/train_corpus_drafter.py`` calls: :func:`make_trainer` ->
:class:`Eagle3Trainer` (``drafter``, ``seq_len``, ``init_params``, ``frozen``, ``loss_fn``,
``depth_hits``, ``decode_params``).

**Windows and labels.** A batch is ``Corpus.batch(windows, seq_len)``: window slot ``s`` is
position ``p = start + s``. Slot ``s`` holds the pair ``(f_p, x_{p+1})``: the fused taps
``features[:, s]`` and the token ``tokens[:, s + 1]``. Its output predicts ``x_{p+2}``, whose
label is the target's greedy next token after position ``p + 1``: ``labels[:, s + 1]``. So
slots ``0 .. L-2`` are scored against ``labels[:, 1:]`` (and ``label_mask[:, 1:]``); the last
slot's label lies outside the window.

**Training-time test.** Step 1 (``k = 0``) is teacher forcing: every slot gets fused TRUE
features. Step ``k + 1`` feeds slot ``s`` the layer's own step-``k`` output at slot ``s - 1``
and attends to the key at slot ``s - i`` of step ``max(k - i, 0)``, exactly what the draft
cache holds ``k`` tokens into a draft chain rooted at slot ``s - k``
(:func:`drafters.eagle_train.level_features`, shared with EAGLE-1). Step ``k``'s output at
slot ``s`` is the draft at depth ``k + 1`` of that chain.

**Loss.** Tokens only (no feature regression): per step, the cross-entropy over the draft
vocabulary against the labels, weighted ``step_decay ** k``. Labels outside the draft
vocabulary are left out of the loss (the drafter cannot produce them) and counted as misses
in the accuracies. Step ``k`` needs its chain's root ``s - k`` inside the window.

**Accuracy.** ``acc_d`` / :meth:`Eagle3Trainer.depth_hits` count, per depth ``d``, the slots
whose depth-``d`` top-1 draft (mapped to a target id) equals the label, among the chains whose
``d - 1`` earlier drafted tokens are the target's own (``tokens[:, j + 1] == labels[:, j]``
along the chain): the decoding-time chance that a greedy chain is accepted at depth ``d``
given it was up to ``d - 1``. On a regenerated corpus that holds at every response position;
on a teacher-forced one, chains through data tokens the target would not pick are trained on
but not counted.

Axis glossary: B batch, L window length, E width, n taps, V target vocabulary, N draft
vocabulary, D TTT steps (draft depths).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from drafters import draft_vocab
from drafters.corpus import parse_layers
from drafters.eagle3 import Eagle3Drafter, decode_params
from drafters.eagle_train import level_features, level_masks
from specjax import tree_tuning

DEFAULT_SEQ_LEN, DEFAULT_NUM_STEPS, DEFAULT_STEP_DECAY = 256, 5, 0.8


def depth_outputs(drafter: Eagle3Drafter, params, frozen, batch: dict, num_steps: int):
    """Per TTT step ``k``: ``(scores float32[B, L-1, N], labels int32[B, L-1], loss mask,
    count mask bool[B, L-1])`` over slots ``0 .. L-2`` (see the module docstring)."""
    valid, labels = batch["valid"], batch["labels"][:, 1:]
    feats = drafter.input_features(params, batch["features"])
    outs = level_features(drafter, drafter.layer_params(params), frozen["target"], feats,
                          batch["tokens"][:, 1:], batch["positions"], valid, num_steps)
    masks = level_masks({"valid": valid[:, :-1], "label_mask": batch["label_mask"][:, 1:]},
                        num_steps)
    in_vocab = jnp.take(frozen["draft_index"], labels) >= 0
    # agree[s]: the token of slot s is the target's own choice after slot s - 1's.
    agree = (batch["tokens"][:, 1:-1] == batch["labels"][:, :-1])
    on_path = jnp.ones_like(agree)
    result = []
    for k, (out, (_, mask)) in enumerate(zip(outs, masks)):
        if k:  # the drafted tokens at depths 1..k of the chain are the target's own
            on_path = agree & jnp.concatenate([jnp.zeros_like(on_path[:, :1]),
                                               on_path[:, :-1]], axis=1)
        scores = drafter.draft_scores(params, None, out[:, :-1])
        result.append((scores, labels, mask & in_vocab, mask & on_path))
    return result


def _loss(drafter, num_steps, step_decay, params, batch, frozen):
    loss, metrics = 0.0, {}
    for k, (scores, labels, loss_mask, count_mask) in enumerate(
            depth_outputs(drafter, params, frozen, batch, num_steps)):
        ids = jnp.maximum(jnp.take(frozen["draft_index"], labels), 0)
        logp = jax.nn.log_softmax(scores, -1)
        nll = -jnp.take_along_axis(logp, ids[..., None], -1)[..., 0]
        lmask = loss_mask.astype(jnp.float32)
        ce = (nll * lmask).sum() / jnp.maximum(lmask.sum(), 1.0)
        hit = _top1(frozen, scores) == labels
        cmask = count_mask.astype(jnp.float32)
        loss = loss + step_decay ** k * ce
        metrics |= {f"ce_{k + 1}": ce,
                    f"acc_{k + 1}": (hit * cmask).sum() / jnp.maximum(cmask.sum(), 1.0)}
    return loss, metrics


def _top1(frozen, scores):
    return draft_vocab.to_target(frozen["vocab_map"], jnp.argmax(scores, -1))


@functools.partial(jax.jit, static_argnames=("drafter", "num_steps"))
def _depth_hits(drafter, num_steps, params, batch, frozen):
    hits, counts = [], []
    for scores, labels, _, count_mask in depth_outputs(drafter, params, frozen, batch,
                                                       num_steps):
        hits.append(((_top1(frozen, scores) == labels) & count_mask).sum())
        counts.append(count_mask.sum())
    return jnp.stack(hits), jnp.stack(counts)


@functools.partial(jax.jit, static_argnames=("drafter", "num_steps"))
def _depth_ranks(drafter, num_steps, params, batch, frozen):
    columns = []
    for k, (scores, labels, _, count_mask) in enumerate(
            depth_outputs(drafter, params, frozen, batch, num_steps)):
        ids = jnp.take(frozen["draft_index"], labels)
        ranks = tree_tuning.label_ranks(scores, jnp.where(ids >= 0, ids, scores.shape[-1]))
        ranks = jnp.where(count_mask, ranks, -1)  # [B, L-1] at slot s = root + k
        columns.append(jnp.concatenate([ranks[:, k:], jnp.full_like(ranks[:, :k], -1)], 1))
    return jnp.stack(columns, axis=-1)


@dataclasses.dataclass(frozen=True)
class Eagle3Trainer:
    """What the training binary needs (see :func:`make_trainer`). Not a jit argument: the
    jitted pieces take ``drafter`` (hashable) and arrays.

    Attributes:
      drafter: the decoding drafter (static tree, the trained sizes).
      vocab_map: ``int32[N]`` draft id -> target id.
      target_params: the target's params (the head starts from its LM head).
      seq_len: window length for ``Corpus.batch``.
      num_steps: TTT steps ``D`` (draft depths trained and measured).
      step_decay: loss weight of step ``k`` is ``step_decay ** k``.
    """

    drafter: Eagle3Drafter
    vocab_map: np.ndarray = dataclasses.field(compare=False, repr=False)
    target_params: Any = dataclasses.field(compare=False, repr=False)
    seq_len: int = DEFAULT_SEQ_LEN
    num_steps: int = DEFAULT_NUM_STEPS
    step_decay: float = DEFAULT_STEP_DECAY

    def init_params(self, key: jax.Array) -> dict:
        """Trainable float params; the head is the target head's columns of ``vocab_map``."""
        return self.drafter.init_params(key, self.target_params, self.vocab_map)

    def frozen(self, target_params) -> dict:
        """``{"target": params, "vocab_map": int32[N], "draft_index": int32[V]}`` (the draft id
        of each target id, -1 outside the draft vocabulary)."""
        vmap = jnp.asarray(self.vocab_map, jnp.int32)
        index = jnp.full((self.drafter.vocab_size,), -1, jnp.int32)
        return {"target": target_params, "vocab_map": vmap,
                "draft_index": index.at[vmap].set(jnp.arange(vmap.shape[0], dtype=jnp.int32))}

    def loss_fn(self, params, batch, frozen):
        """``(loss, metrics)``: ``ce_d``, ``acc_d`` for depths ``d = 1..D``."""
        return _loss(self.drafter, self.num_steps, self.step_decay, params, batch, frozen)

    def depth_hits(self, params, batch, frozen):
        """``(hits int32[D], counts int32[D])`` (jitted; see the module docstring)."""
        return _depth_hits(self.drafter, self.num_steps, params, batch, frozen)

    def depth_ranks(self, params, batch, frozen):
        """``int32[B, L-1, D]`` (jitted): per chain root (window slot) and depth, the rank
        (``jax.lax.top_k`` order over the draft vocabulary; ``N`` outside it) of the target's
        token among the drafts of the chain fed the true tokens, -1 where the chain is not
        counted (past the window or the labels, or through a data token the target would not
        pick): the input of :mod:`specjax.tree_tuning`. ``params`` may be decode params."""
        return _depth_ranks(self.drafter, self.num_steps, params, batch, frozen)

    def decode_params(self, params, vocab_map) -> dict:
        return decode_params(self.drafter, params, vocab_map)

    def trainable_params(self, dparams) -> dict:
        """The inverse of :meth:`decode_params` (a start from trained weights)."""
        return jax.tree.map(lambda v: jnp.array(v, jnp.float32),
                            {k: v for k, v in dparams.items() if k != "vocab_map"})


def make_trainer(target, vocab_map: np.ndarray, *, target_params=None,
                 seq_len: int = DEFAULT_SEQ_LEN, num_steps: int = DEFAULT_NUM_STEPS,
                 step_decay: float = DEFAULT_STEP_DECAY,
                 feature_layers: Optional[Sequence[int] | str] = None,
                 tree: str = "static") -> Eagle3Trainer:
    """An :class:`Eagle3Trainer` for ``target`` (a ``LoadedModel``, or a model with
    ``target_params``) over the draft vocabulary ``vocab_map int32[N]``
    (:func:`drafters.draft_vocab.frequent_ids`).

    Options (``--trainer_options``): ``seq_len``, ``num_steps`` (TTT depth), ``step_decay``,
    ``feature_layers`` (e.g. ``"2:15:27"``; default :func:`drafters.corpus.default_layers`;
    the corpus must hold these taps) and ``tree`` (the drafter's tree; training ignores it).

    Raises:
      ValueError: bad options, a bad map, or no target params.
    """
    if hasattr(target, "model") and hasattr(target, "params"):  # a LoadedModel
        target_params = target.params if target_params is None else target_params
        target = target.model
    if target_params is None:
        raise ValueError("eagle3 starts its draft head from the target's LM head: give "
                         "make_trainer the LoadedModel (or target_params=)")
    if seq_len < 2 or num_steps < 1 or not 0.0 < step_decay <= 1.0:
        raise ValueError(f"need seq_len >= 2, num_steps >= 1 and 0 < step_decay <= 1, got "
                         f"{seq_len}, {num_steps}, {step_decay}")
    vocab_map = np.asarray(vocab_map)
    layers = None if feature_layers is None else parse_layers(feature_layers)
    drafter = Eagle3Drafter.create(target, int(vocab_map.shape[0]) if vocab_map.ndim == 1 else 0,
                                   tree, feature_layers=layers)
    decode_params(drafter, {}, vocab_map)  # validates the map
    return Eagle3Trainer(drafter, vocab_map.astype(np.int32), target_params, int(seq_len),
                         int(num_steps), float(step_decay))
