"""Shared pieces of the draft-head drafters (Blockwise, Medusa, Hydra).

Conventions (all three drafters):

* ``h``: the target's FINAL-NORM hidden state at the node that produced the pending token ``p``
  (``DraftContext.pending_hidden``). The target's own LM head on ``h`` gives ``p``.
* Head ``k`` (``0 <= k < K``) drafts the token at tree depth ``k + 1``, i.e. ``k + 1`` tokens
  after ``p``. Trained on the target's own tokens: at a position ``t`` of a self-distilled
  sequence, ``h = hidden[t]``, ``p = tokens[t + 1]`` and head ``k``'s label is
  ``tokens[t + 2 + k]``.
* Head modules are Flax Linen modules applied purely; their params are their own pytree. The
  target's embedding and LM head are FROZEN inputs (``stop_gradient``), neither trained nor
  stored with the heads: :class:`HeadDrafter` reads them through
  :class:`drafters.target_readout.TargetReadout` (``embed``, ``logits``, ``draft_logits``,
  ``check_compatible``), the read-out it shares with the EAGLE drafter.
* Hydra drafts its tree level by level after :attr:`specjax.tree.DraftTree.expansion_levels`,
  the plan it shares with EAGLE's static trees.

Weights files and the shipped weights: :mod:`drafters.head_weights`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from drafters import registry
from drafters.target_readout import TargetReadout
from specjax.drafter import DrafterBase, Proposal
from specjax.tree import DraftTree
from specjax.tree_tuning import label_ranks

DEFAULT_LOSS_DECAY = 0.8  # Medusa's per-head loss weight decay: weight_k = decay ** k


# Modules -----------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """Medusa's residual block ``x + SiLU(W x + b)``; ``W`` starts at zero, so an untrained
    block is the identity."""

    features: int

    @nn.compact
    def __call__(self, x):
        y = nn.Dense(self.features, kernel_init=nn.initializers.zeros, name="linear")(x)
        return x + nn.silu(y)


# The drafter base ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HeadDrafter(TargetReadout, DrafterBase):
    """Static configuration shared by the head drafters (hashable: a jit static argument).

    Attributes:
      target: the target model (``LlamaModel``): supplies the frozen embedding / LM head and
        the sizes the heads are built for.
      num_heads: K heads; head ``k`` drafts depth ``k + 1``.
      tree: the static candidate tree; its depth must not exceed ``num_heads``.
      num_layers: residual blocks per head.
      draft_vocab: 0 drafts over the whole vocabulary; ``N > 0`` only over token ids ``< N``
        (the LM head sliced to them: a round reads ``N / V`` of it per head). Lossless either
        way (the target verifies every draft); a BPE vocabulary's low ids are its frequent
        tokens, so little acceptance is lost. Training always uses the whole vocabulary.
    """

    target: Any
    num_heads: int = 3
    tree: DraftTree = DraftTree.chain(3)
    num_layers: int = 1
    draft_vocab: int = 0

    name = "heads"
    deterministic = True  # greedy / top-k heads draft point masses
    siblings = "without_replacement"  # siblings are distinct top-k tokens

    def __post_init__(self):
        if self.num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {self.num_heads}")
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        if self.tree.max_depth > self.num_heads:
            raise ValueError(f"the tree is {self.tree.max_depth} deep but the drafter has only "
                             f"{self.num_heads} heads (one per depth): use a shallower tree or "
                             "more heads")
        if self.tree.num_nodes < 2:
            raise ValueError("the tree drafts nothing: give it at least one non-root node")
        self.check_draft_vocab()
        if self.draft_vocab and self.tree.num_nodes > 1 and \
                int(np.max(self.tree.choice_rank[1:])) >= self.draft_vocab:
            raise ValueError(f"the tree uses ranks up to {int(np.max(self.tree.choice_rank))}, "
                             f"more than draft_vocab={self.draft_vocab} candidates")

    # Sizes / params ----------------------------------------------------------------------------

    @property
    def readout_subject(self) -> str:  # for TargetReadout.check_compatible
        return f"{self.name} heads are"

    @property
    def module(self) -> nn.Module:
        raise NotImplementedError

    def config_dict(self) -> dict:
        """The head architecture, as stored with weights and checkpoints."""
        return {"drafter": self.name, "num_heads": self.num_heads, "num_layers": self.num_layers,
                "hidden_size": self.hidden_size, "vocab_size": self.vocab_size}

    def _init_inputs(self):
        raise NotImplementedError

    def init_params(self, key: jax.Array) -> dict:
        """Fresh head params (float32)."""
        return self.module.init(key, *self._init_inputs())["params"]

    def param_shapes(self) -> dict:
        return jax.eval_shape(self.init_params, jax.random.key(0))

    # Shared math -------------------------------------------------------------------------------

    def train_logits(self, params, target_params, hidden: jax.Array, tokens: jax.Array
                     ) -> jax.Array:
        """Teacher-forced logits of every head.

        Args:
          hidden: ``[N, E]`` final-norm hidden states ``h``.
          tokens: ``int32[N, K + 1]``: ``tokens[:, 0]`` is the pending token ``p`` (the target's
            next token after ``h``), ``tokens[:, 1 + k]`` head ``k``'s label.
        Returns:
          ``float32[N, K, V]``.
        """
        raise NotImplementedError

    # Drafter contract --------------------------------------------------------------------------

    def init(self, params, ctx, prompt_tokens, prompt_lengths):
        return ()

    def commit(self, params, state, ctx, info):
        return state

    def _proposal(self, pending: jax.Array, drafted: jax.Array) -> Proposal:
        tokens = jnp.concatenate([pending[:, None], drafted.astype(jnp.int32)], axis=1)
        return Proposal(tokens=tokens)


def tree_tables(tree: DraftTree):
    """Static per-node tables: ``(head int32[T-1], rank int32[T-1])`` for nodes 1..T-1:
    node ``n`` holds the rank ``rank`` token of head ``depth[n] - 1``."""
    depth = np.asarray(tree.depth)[1:] - 1
    rank = np.asarray(tree.choice_rank)[1:]
    return depth.astype(np.int32), rank.astype(np.int32)


def max_rank(tree: DraftTree) -> int:
    """Top-k width needed to fill every node of ``tree``."""
    return int(np.max(tree.choice_rank[1:])) + 1


def make_tree(choices: Optional[Sequence[Sequence[int]]], default: Sequence[Sequence[int]],
              max_nodes: Optional[int] = None) -> DraftTree:
    """A Medusa-style tree from ``choices`` (``default`` when None); ``ValueError`` when it
    has more than ``max_nodes`` nodes (root included)."""
    return DraftTree.from_choices(default if choices is None else choices, max_nodes=max_nodes)


# Training loss -----------------------------------------------------------------------------------


def head_loss(logits: jax.Array, labels: jax.Array, mask: jax.Array,
              decay: float = DEFAULT_LOSS_DECAY):
    """Cross-entropy of every head against the target's own tokens.

    Args:
      logits: ``float32[N, K, V]``; labels: ``int32[N, K]``; mask: ``bool[N, K]``.
    Returns:
      ``(loss, metrics)``: the loss is ``sum_k decay**k * mean CE_k``; metrics hold ``acc_k``
      (top-1 accuracy of head ``k``, scalars) and ``ce``.
    """
    k = logits.shape[1]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]  # [N, K]
    weight = mask.astype(jnp.float32)
    count = jnp.maximum(weight.sum(0), 1.0)  # [K]
    ce = (nll * weight).sum(0) / count
    decay_w = jnp.asarray([decay ** i for i in range(k)], jnp.float32)
    loss = jnp.sum(decay_w * ce)
    correct = ((jnp.argmax(logits, -1) == labels) & mask).sum(0) / count
    metrics = {f"acc_{i}": correct[i] for i in range(k)}
    metrics["ce"] = ce.mean()
    return loss, metrics


def make_loss_fn(drafter: HeadDrafter, decay: float = DEFAULT_LOSS_DECAY):
    """``loss_fn(params, batch, target_params)`` for :func:`specjax.train.make_train_step`;
    ``batch`` = ``{"hidden" [N, E], "tokens" int32[N, K+1], "mask" bool[N, K]}``."""

    def loss_fn(params, batch, target_params):
        logits = drafter.train_logits(params, target_params, batch["hidden"], batch["tokens"])
        return head_loss(logits, batch["tokens"][:, 1:], batch["mask"], decay)

    return loss_fn


def head_accuracy(drafter: HeadDrafter, params, target_params, data: dict,
                  chunk: int = 256) -> np.ndarray:
    """Per-head top-1 accuracy ``float[K]`` on ``data`` (as in :func:`make_loss_fn`)."""
    fn = _accuracy_fn(drafter)
    n = data["hidden"].shape[0]
    correct = np.zeros(drafter.num_heads)
    count = np.zeros(drafter.num_heads)
    for s in range(0, n, chunk):
        idx = np.arange(s, s + chunk) % n  # fixed shape: wrap, then mask the repeats
        keep = (np.arange(s, s + chunk) < n)[:, None]
        c, m = fn(params, target_params, data["hidden"][idx], data["tokens"][idx],
                  data["mask"][idx] & keep)
        correct += np.asarray(c)
        count += np.asarray(m)
    return correct / np.maximum(count, 1)


def true_ranks(drafter: HeadDrafter, params, target_params, data: dict,
               chunk: int = 256) -> np.ndarray:
    """Teacher-forced rank of every label among its head's candidates: ``int32[M, K]``.

    ``ranks[i, k]`` is the position of label ``k`` in ``jax.lax.top_k`` of head ``k``'s
    drafting logits (ties to the lower token id, as ``top_k`` orders them; with a
    ``draft_vocab``, a label outside it gets rank ``draft_vocab``: never drafted), or -1 where
    the label is masked; the input to :mod:`specjax.tree_tuning`. ``data`` as in
    :func:`make_loss_fn`.
    """
    fn = _rank_fn(drafter)
    n = data["hidden"].shape[0]
    out = []
    for s in range(0, n, chunk):
        idx = np.arange(s, s + chunk) % n  # fixed shape: wrap, then drop the repeats
        r = fn(params, target_params, data["hidden"][idx], data["tokens"][idx],
               data["mask"][idx])
        out.append(np.asarray(r)[:min(chunk, n - s)])
    return np.concatenate(out).astype(np.int32) if out else np.zeros((0, drafter.num_heads),
                                                                      np.int32)


_ACC_FNS: dict = {}
_RANK_FNS: dict = {}


def _rank_fn(drafter):
    if drafter not in _RANK_FNS:
        @jax.jit
        def fn(params, target_params, hidden, tokens, mask):
            logits = drafter.train_logits(params, target_params, hidden, tokens)  # [N, K, V]
            logits = logits[..., :drafter.draft_vocab or logits.shape[-1]]
            return jnp.where(mask, label_ranks(logits, tokens[:, 1:]), -1)
        _RANK_FNS[drafter] = fn
    return _RANK_FNS[drafter]


def _accuracy_fn(drafter):
    if drafter not in _ACC_FNS:
        @jax.jit
        def fn(params, target_params, hidden, tokens, mask):
            logits = drafter.train_logits(params, target_params, hidden, tokens)
            hit = (jnp.argmax(logits, -1) == tokens[:, 1:]) & mask
            return hit.sum(0), mask.sum(0)
        _ACC_FNS[drafter] = fn
    return _ACC_FNS[drafter]


# Shipped heads as registered methods (blockwise.py, medusa.py, hydra.py register them) --------

TUNED_N = {"tunedN": r"tuned[1-9][0-9]*"}


@dataclasses.dataclass(frozen=True)
class TreeHeadOptions(registry.Options):
    """Options of the tree head methods (Medusa, Hydra) on their shipped weights."""

    tree: str = registry.option(
        "tuned", "tuned: the tree tuned for the shipped weights (experiments/tune_tree.py); "
        "tunedN: its best N-node tree (e.g. tuned16); generic: the drafter's built-in tree.",
        choices=("tuned", "tunedN", "generic"), patterns=TUNED_N)
    draft_vocab: Optional[int] = registry.option(
        None, "Draft from token ids < N only (0 = all; default: the tuned tree file's).",
        minimum=0)


def shipped_builder(name: str):
    """The build function of head drafter ``name`` on the weights shipped for the model
    (``drafters/weights/<model>/<name>.safetensors``, :mod:`drafters.head_weights`)."""

    def build(ctx: registry.BuildContext, options):
        from drafters import head_weights
        kwargs = {k: v for k, v in dataclasses.asdict(options).items() if v is not None}
        return head_weights.load_shipped(name, ctx.lm, **kwargs)

    build.__qualname__ = f"build_{name}"
    return build
