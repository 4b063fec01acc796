"""Training the block drafter (:mod:`drafters.block_diffusion`) on a distillation corpus.

Batches are :meth:`drafters.corpus.Corpus.batch` windows of ``seq_len`` positions (a whole
record, e.g. 512): ``tokens int32[B, W+1]``, ``labels int32[B, W]`` (the target's greedy next
token after each position), ``features float32[B, W, n*E]`` (the target's taps after
``feature_layers``), ``positions``, ``valid``, ``label_mask bool[B, W]``.

Anchors: every row draws ``anchors_per_seq`` (``M``) distinct anchor positions ``a`` among its
labelled positions (uniformly, without replacement; rows with fewer labelled positions get
masked-out extra anchors). The draw is deterministic given the batch: its key is derived from
the batch's tokens and positions, folded with ``batch["step"]`` when the caller adds one.

The block of anchor ``a`` is what the drafter sees at decode time when ``x_a`` is the pending
token: slot 0 holds the embedding of ``tokens[a]``, slots ``1..K-1`` the mask embedding (slot
``i`` at position ``a + i``), and the context is the fused features at window positions
``< a``. All anchors of a row run in ONE attention: queries ``[B, M*K]`` over the context keys
``[B, W]`` (each drafter layer's own projection of the fused features) and the block keys
``[B, M*K]``; slot ``i`` of block ``m`` sees the context positions ``< a_m`` and the ``K`` slots
of block ``m`` only.

Labels: slot ``i`` of anchor ``a`` is labelled ``labels[a + i]`` (draft depth ``i + 1``), where
``a + i`` is inside the window and ``label_mask`` holds. On TEACHER-FORCED data the tokens
after ``a`` are the data set's words, not the target's: the label of slot ``i > 0`` is the
target's prediction after the DATA prefix ``tokens[..a+i]``. The drafter never sees the tokens
``a+1..a+i`` (they are mask slots), so that label is what decoding needs only when those data
tokens are the target's own choices, ``tokens[p] == labels[p - 1]`` for ``p = a+1..a+i`` (the
chain is *consistent*). Elsewhere it is noise: the target's continuation of words the drafter
cannot see. With ``consistent_only`` the loss scores consistent slots only; the accuracies
always count consistent slots only (on regenerated data every slot is consistent). Measured
(WORKSPACE "EAGLE-3 and the one-pass block drafter", 600 steps on the ShareGPT corpus): no
gain, held-out top-1 by depth .211 .112 .101 .084 .069 .062 with it against .232 .120 .100
.077 .057 .058 without, so it is off by default (the shipped weights were trained without).

Loss: cross-entropy over the draft vocabulary (labels outside it are left out of the loss and
count as misses in the accuracy), slot ``i`` weighted ``weight_decay_per_depth ** i``,
normalised by the weights' sum. Metrics ``acc_1..acc_K``: top-1 (mapped to target ids) equals
the label, per depth, among consistent slots.

:meth:`BlockDiffusionTrainer.depth_hits` counts the same per-depth top-1 hits with EVERY
labelled position as an anchor (groups of ``M``), among consistent slots. A slot's drafts do
not depend on the drafted tokens before it, so this is exactly the decode-time draft given the
correct earlier tokens; the accepted chain length of a round still needs ALL earlier slots
right (depth ``d`` is accepted only when depths ``1..d-1`` are).

Axis glossary: B batch, W window positions, M anchors per row, K block slots, n taps, E width,
Kh kv heads, Dh head dim, V target vocabulary, N draft vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from drafters import draft_vocab
from drafters.corpus import parse_layers
from drafters.block_diffusion import DEFAULT_BLOCK_SIZE, BlockDiffusionDrafter, decode_params
from drafters.block_diffusion_net import BlockNet, attend_with_context
from specjax import tree_tuning

DEFAULTS = {"seq_len": 512, "anchors_per_seq": 32, "block_size": DEFAULT_BLOCK_SIZE,
            "num_layers": 1, "feature_layers": None, "weight_decay_per_depth": 0.8,
            "consistent_only": False}


@dataclasses.dataclass(frozen=True)
class BlockDiffusionTrainer:
    """What a training binary needs (see the module docstring). Hashable: ``vocab_map`` and
    ``target_params`` are not compared (they reach traced code only through :meth:`frozen`
    and :meth:`init_params`)."""

    drafter: BlockDiffusionDrafter
    seq_len: int
    anchors_per_seq: int
    weight_decay_per_depth: float
    consistent_only: bool
    vocab_map: np.ndarray = dataclasses.field(compare=False, repr=False)
    target_params: Any = dataclasses.field(default=None, compare=False, repr=False)

    def init_params(self, key: jax.Array, target_params=None) -> dict:
        """Trainable float params. With target params (given here or to :func:`make_trainer`)
        the head starts as the target's LM head columns of the draft vocabulary and the output
        norm as its final norm (the untrained drafter reads out like the target); without,
        both are the module's random / unit init (training then takes longer)."""
        params = self.drafter.init_params(key)
        target_params = self.target_params if target_params is None else target_params
        if target_params is None:
            return params
        target = self.drafter.target
        head = draft_vocab.head_rows(draft_vocab.target_lm_head(target, target_params),
                                     jnp.asarray(self.vocab_map))
        norm = jnp.array(target_params["final_norm"], jnp.float32)  # a copy: steps donate
        return dict(params, head=jnp.asarray(head, jnp.float32), out_norm=norm)

    def frozen(self, target_params) -> dict:
        """``{"target": target params, "vocab_map": int32[N], "draft_ids": int32[V]}``
        (``draft_ids[t]``: the draft id of target id ``t``, or -1)."""
        n, v = len(self.vocab_map), self.drafter.vocab_size
        draft_ids = np.full((v,), -1, np.int32)
        draft_ids[self.vocab_map] = np.arange(n, dtype=np.int32)
        return {"target": target_params, "vocab_map": jnp.asarray(self.vocab_map, jnp.int32),
                "draft_ids": jnp.asarray(draft_ids)}

    def decode_params(self, params, vocab_map) -> dict:
        return decode_params(params, vocab_map)

    def trainable_params(self, dparams) -> dict:
        """The inverse of :meth:`decode_params` (a start from trained weights)."""
        return jax.tree.map(lambda v: jnp.array(v, jnp.float32), dparams["net"])

    # The forward -------------------------------------------------------------------------------

    def context(self, params, batch) -> list:
        """Per drafter layer ``(k, v)`` ``[B, W, Kh, Dh]`` of every window position."""
        return self.drafter.module.apply({"params": params}, batch["features"],
                                         batch["positions"], method=BlockNet.context_kv)

    def blocks(self, params, batch, frozen, context_kv, anchors, anchor_ok):
        """All anchors' blocks in one attention.

        Args:
          anchors: ``int32[B, M]`` window positions; anchor_ok: ``bool[B, M]``.
        Returns:
          ``(logits float32[B, M, K, N], labels int32[B, M, K], ok bool[B, M, K],
          consistent bool[B, M, K])``: ``ok`` where the slot has a label, ``consistent`` where
          the data tokens between the anchor and the slot are the target's own.
        """
        drafter, net, k = self.drafter, self.drafter.module, self.drafter.block_size
        valid = batch["valid"]
        b, w = valid.shape
        m = anchors.shape[1]
        p = {"params": params}
        first = jnp.take_along_axis(batch["tokens"][:, :w], anchors, axis=1)  # [B, M]
        emb = drafter.embed(frozen["target"], first)
        x = net.apply(p, emb, k, method=BlockNet.block_inputs).reshape(b, m * k, -1)
        offsets = jnp.arange(k, dtype=jnp.int32)
        start = jnp.take_along_axis(batch["positions"], anchors, axis=1)
        positions = (start[:, :, None] + offsets).reshape(b, m * k)
        sees = (jnp.arange(w)[None, None, :] < anchors[:, :, None]) & valid[:, None, :]
        own = np.kron(np.eye(m, dtype=bool), np.ones((k, k), bool))  # [M*K, M*K]
        mask = jnp.concatenate([jnp.repeat(sees, k, axis=1),
                                jnp.broadcast_to(own, (b, m * k, m * k))], axis=2)
        attend = functools.partial(attend_with_context, context_kv, mask=mask)
        h = net.apply(p, x, positions, attend, method=BlockNet.run)
        logits = net.apply(p, h, method=BlockNet.logits).reshape(b, m, k, -1)
        at = anchors[:, :, None] + offsets  # [B, M, K] the label's window position
        safe = jnp.minimum(at, w - 1).reshape(b, m * k)
        labels = jnp.take_along_axis(batch["labels"], safe, axis=1).reshape(b, m, k)
        labelled = jnp.take_along_axis(batch["label_mask"], safe, axis=1).reshape(b, m, k)
        # Disagreements up to each window position: tokens[p] != labels[p - 1] for p >= 1.
        off = batch["tokens"][:, 1:w] != batch["labels"][:, :w - 1]
        seen = jnp.concatenate([jnp.zeros((b, 1), jnp.int32),
                                jnp.cumsum(off.astype(jnp.int32), axis=1)], axis=1)  # [B, W]
        before = jnp.take_along_axis(seen, anchors, axis=1)[:, :, None]
        consistent = (jnp.take_along_axis(seen, safe, axis=1).reshape(b, m, k) == before)
        return logits, labels, (at < w) & labelled & anchor_ok[:, :, None], consistent

    def anchors(self, batch):
        """``(anchors int32[B, M], anchor_ok bool[B, M])``: ``M`` distinct labelled positions
        per row, drawn with a key derived from the batch (see the module docstring)."""
        tokens = jnp.asarray(batch["tokens"]).astype(jnp.uint32)
        weights = 2 * jnp.arange(tokens.shape[1], dtype=jnp.uint32) + 1
        seed = jnp.sum(tokens * weights) + jnp.sum(
            jnp.asarray(batch["positions"])[:, 0].astype(jnp.uint32) * jnp.uint32(40503))
        key = jax.random.key(seed)
        if "step" in batch:
            key = jax.random.fold_in(key, batch["step"])
        label_mask = batch["label_mask"]
        score = jnp.where(label_mask, jax.random.uniform(key, label_mask.shape), -1.0)
        _, anchors = jax.lax.top_k(score, self.anchors_per_seq)
        anchors = anchors.astype(jnp.int32)
        return anchors, jnp.take_along_axis(label_mask, anchors, axis=1)

    # Loss and evaluation -----------------------------------------------------------------------

    def loss_fn(self, params, batch, frozen):
        """``(loss, metrics)`` for :func:`specjax.train.make_train_step`."""
        batch = {name: jnp.asarray(a) for name, a in batch.items()}
        anchors, anchor_ok = self.anchors(batch)
        logits, labels, ok, consistent = self.blocks(
            params, batch, frozen, self.context(params, batch), anchors, anchor_ok)
        ids = frozen["draft_ids"][labels]
        scored = ok & (ids >= 0) & (consistent if self.consistent_only else True)
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, jnp.maximum(ids, 0)[..., None], axis=-1)[..., 0]
        weight = scored.astype(jnp.float32)
        ce = (nll * weight).sum((0, 1)) / jnp.maximum(weight.sum((0, 1)), 1.0)  # [K]
        k = self.drafter.block_size
        depth_w = jnp.asarray([self.weight_decay_per_depth ** i for i in range(k)], jnp.float32)
        loss = jnp.sum(depth_w * ce) / jnp.sum(depth_w)
        top = draft_vocab.to_target(frozen["vocab_map"], jnp.argmax(logits, axis=-1))
        counted = ok & consistent
        count = jnp.maximum(counted.sum((0, 1)), 1)
        acc = ((top == labels) & counted).sum((0, 1)) / count
        metrics = {f"acc_{d + 1}": acc[d] for d in range(k)}
        metrics |= {"ce": ce.mean(), "in_vocab": scored.sum() / jnp.maximum(ok.sum(), 1)}
        return loss, metrics

    def depth_hits(self, params, batch, frozen):
        """``(hits int32[K], counts int32[K])`` with every labelled position as an anchor."""
        batch = {name: jnp.asarray(a) for name, a in batch.items() if name != "step"}
        return _depth_hits(self, params, batch, frozen)

    def depth_ranks(self, params, batch, frozen):
        """``int32[B, W, K]`` (jitted): per anchor (window position) and depth, the rank
        (``jax.lax.top_k`` order over the draft vocabulary; ``N`` outside it) of the target's
        token among the slot's logits, -1 where the slot is not counted (unlabelled, past the
        window, or inconsistent): the input of :mod:`specjax.tree_tuning`."""
        batch = {name: jnp.asarray(a) for name, a in batch.items() if name != "step"}
        return _depth_ranks(self, params, batch, frozen)


def _every_anchor(trainer: BlockDiffusionTrainer, params, batch, frozen, measure):
    """``measure(logits, labels, counted)`` of every window position as an anchor, in groups
    of ``M`` anchors (``jax.lax.map``); ``counted = ok & consistent`` (see :meth:`blocks`).
    Returns the per-group results stacked along a leading axis ``[G, ...]``."""
    kv = trainer.context(params, batch)
    b, w = batch["valid"].shape
    m = trainer.anchors_per_seq

    def group(g):
        idx = g * m + jnp.arange(m, dtype=jnp.int32)
        anchors = jnp.broadcast_to(jnp.minimum(idx, w - 1), (b, m))
        ok = (idx < w)[None, :] & jnp.take_along_axis(batch["label_mask"], anchors, axis=1)
        logits, labels, ok, consistent = trainer.blocks(params, batch, frozen, kv, anchors, ok)
        return measure(logits, labels, ok & consistent)

    return jax.lax.map(group, jnp.arange(-(-w // m)))


def _hits(trainer: BlockDiffusionTrainer, params, batch, frozen):
    def measure(logits, labels, counted):
        top = draft_vocab.to_target(frozen["vocab_map"], jnp.argmax(logits, axis=-1))
        return ((top == labels) & counted).sum((0, 1)), counted.sum((0, 1))

    hits, counts = _every_anchor(trainer, params, batch, frozen, measure)
    return hits.sum(0).astype(jnp.int32), counts.sum(0).astype(jnp.int32)


_depth_hits = jax.jit(_hits, static_argnums=0)


def _ranks(trainer: BlockDiffusionTrainer, params, batch, frozen):
    def measure(logits, labels, counted):
        ids = frozen["draft_ids"][labels]
        ranks = tree_tuning.label_ranks(logits, jnp.where(ids >= 0, ids, logits.shape[-1]))
        return jnp.where(counted, ranks, -1)  # [B, M, K]

    groups = _every_anchor(trainer, params, batch, frozen, measure)  # [G, B, M, K]
    b, w = batch["valid"].shape
    return jnp.moveaxis(groups, 0, 1).reshape(b, -1, trainer.drafter.block_size)[:, :w]


_depth_ranks = jax.jit(_ranks, static_argnums=0)


def make_trainer(target, vocab_map: np.ndarray, *, target_params=None,
                 **options) -> BlockDiffusionTrainer:
    """The trainer of a block drafter on ``target`` (a model, or a ``LoadedModel`` whose params
    then serve as ``target_params``: the head's init) over the draft vocabulary ``vocab_map``
    (int[N], distinct target ids). Options (defaults in :data:`DEFAULTS`): ``seq_len``,
    ``anchors_per_seq``, ``block_size``, ``num_layers``, ``feature_layers`` (None: the
    corpus's default taps; a sequence, or text such as ``"2:15:27"``),
    ``weight_decay_per_depth``, ``consistent_only`` (score only the slots whose data chain is
    the target's own; see the module docstring). ValueError for bad values."""
    if hasattr(target, "model") and hasattr(target, "params"):  # a LoadedModel
        target_params = target.params if target_params is None else target_params
        target = target.model
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown block_diffusion training option {', '.join(unknown)}; "
                         f"known: {', '.join(DEFAULTS)}")
    o = {**DEFAULTS, **options}
    if o["feature_layers"] is not None:  # a sequence, or text from a command line: "2:15:27"
        o["feature_layers"] = parse_layers(o["feature_layers"])
    vocab_map = draft_vocab.check_map(vocab_map, target.vocab_size)
    if o["seq_len"] < 2 or not 1 <= o["anchors_per_seq"] <= o["seq_len"]:
        raise ValueError(f"need seq_len >= 2 and 1 <= anchors_per_seq <= seq_len, got "
                         f"{o['seq_len']}, {o['anchors_per_seq']}")
    if not 0 < o["weight_decay_per_depth"] <= 1:
        raise ValueError(f"weight_decay_per_depth must be in (0, 1], got "
                         f"{o['weight_decay_per_depth']}")
    if not isinstance(o["consistent_only"], (bool, np.bool_)):
        raise ValueError(f"consistent_only must be true or false, got {o['consistent_only']!r}")
    drafter = BlockDiffusionDrafter.create(
        target, "chain", block_size=o["block_size"], num_layers=o["num_layers"],
        feature_layers=o["feature_layers"], draft_vocab_size=len(vocab_map))
    return BlockDiffusionTrainer(drafter, int(o["seq_len"]), int(o["anchors_per_seq"]),
                                 float(o["weight_decay_per_depth"]),
                                 bool(o["consistent_only"]), vocab_map, target_params)

