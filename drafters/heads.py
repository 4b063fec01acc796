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
  stored with the heads.

Weights files (``save_weights`` / ``load_weights`` / ``load_shipped``) are safetensors with the
heads' params only (bf16 by default) and JSON metadata (drafter type, head config, target
hidden size and vocabulary), validated against the target on load.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from specjax.drafter import Proposal
from specjax.files import write_atomic
from specjax.tree import DraftTree

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
WEIGHTS_FORMAT = "specjax-draft-heads-v1"
DEFAULT_LOSS_DECAY = 0.8  # Medusa's per-head loss weight decay: weight_k = decay ** k


class HeadWeightsError(ValueError):
    """A head weights file that is missing, damaged, or made for another target / drafter."""


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
class HeadDrafter:
    """Static configuration shared by the head drafters (hashable: a jit static argument).

    Attributes:
      target: the target model (``LlamaModel``): supplies the frozen embedding / LM head and
        the sizes the heads are built for.
      num_heads: K heads; head ``k`` drafts depth ``k + 1``.
      tree: the static candidate tree; its depth must not exceed ``num_heads``.
      num_layers: residual blocks per head.
    """

    target: Any
    num_heads: int = 3
    tree: DraftTree = DraftTree.chain(3)
    num_layers: int = 1

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

    # Sizes / params ----------------------------------------------------------------------------

    @property
    def hidden_size(self) -> int:
        return self.target.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.target.vocab_size

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

    def check_compatible(self, target) -> None:
        if target.vocab_size != self.vocab_size or target.hidden_size != self.hidden_size:
            raise ValueError(
                f"{self.name} heads are built for hidden size {self.hidden_size} / vocabulary "
                f"{self.vocab_size}, the target has {target.hidden_size} / {target.vocab_size}: "
                "build the drafter with this target")

    # Shared math -------------------------------------------------------------------------------

    def project(self, target_params, features: jax.Array) -> jax.Array:
        """Logits ``float32[..., V]`` of head features through the target's frozen LM head."""
        tparams = jax.lax.stop_gradient(target_params)
        return self.target.lm_head(tparams, features.astype(self._dtype())).astype(jnp.float32)

    def embed(self, target_params, tokens: jax.Array) -> jax.Array:
        """The target's frozen input embeddings of ``tokens``."""
        return self.target.embed(jax.lax.stop_gradient(target_params), tokens)

    def _dtype(self):
        return jnp.dtype(self.target.config.dtype)

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


_ACC_FNS: dict = {}


def _accuracy_fn(drafter):
    if drafter not in _ACC_FNS:
        @jax.jit
        def fn(params, target_params, hidden, tokens, mask):
            logits = drafter.train_logits(params, target_params, hidden, tokens)
            hit = (jnp.argmax(logits, -1) == tokens[:, 1:]) & mask
            return hit.sum(0), mask.sum(0)
        _ACC_FNS[drafter] = fn
    return _ACC_FNS[drafter]


# Weights files -----------------------------------------------------------------------------------


def _flatten(tree: dict) -> dict:
    """``{"a": {"b": x}}`` -> ``{"a/b": x}``."""
    return traverse_util.flatten_dict(tree, sep="/")


def _unflatten(flat: dict) -> dict:
    return traverse_util.unflatten_dict(flat, sep="/")


def save_weights(path: str | os.PathLike, drafter: HeadDrafter, params, *,
                 target_name: str = "", dtype: str = "bfloat16",
                 extra: Optional[dict] = None) -> str:
    """Writes the head params (only) to a safetensors file, atomically.

    Returns:
      the absolute path.
    """
    from safetensors.flax import save_file
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    flat = {k: jnp.asarray(v, dtype) for k, v in _flatten(jax.device_get(params)).items()}
    meta = {"format": WEIGHTS_FORMAT, "config": json.dumps(drafter.config_dict()),
            "target": target_name, "extra": json.dumps(extra or {})}
    return write_atomic(path, lambda tmp: save_file(flat, tmp, metadata=meta))


def read_weights(path: str | os.PathLike) -> tuple[dict, dict]:
    """``(config dict, flat params)`` of a weights file; :class:`HeadWeightsError` if it is
    missing or damaged."""
    from safetensors import safe_open
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise HeadWeightsError(f"no head weights file at {path}: train one with "
                               "experiments/train_drafter.py")
    try:
        with safe_open(path, framework="flax") as f:
            meta = f.metadata() or {}
            flat = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("format") != WEIGHTS_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {WEIGHTS_FORMAT!r}")
        config = json.loads(meta["config"])
        config["target"] = meta.get("target", "")
        config["extra"] = json.loads(meta.get("extra", "{}"))
    except HeadWeightsError:
        raise
    except Exception as e:  # safetensors raises several types for truncated / garbage files
        raise HeadWeightsError(f"head weights file {path} is damaged or not a specjax heads "
                               f"file ({type(e).__name__}: {e}); re-train or re-download it"
                               ) from None
    return config, flat


def load_weights(path: str | os.PathLike, drafter: HeadDrafter, dtype: Optional[str] = None
                 ) -> dict:
    """Head params for ``drafter`` from ``path``, checked against its architecture.

    Raises:
      HeadWeightsError: missing / damaged file, another drafter type, another target size or
        vocabulary, or parameter shapes that differ.
    """
    config, flat = read_weights(path)
    want = drafter.config_dict()
    if config.get("drafter") != want["drafter"]:
        raise HeadWeightsError(f"{path} holds {config.get('drafter')!r} heads, not "
                               f"{want['drafter']!r}")
    for key, what in (("hidden_size", "hidden size"), ("vocab_size", "vocabulary")):
        if config.get(key) != want[key]:
            raise HeadWeightsError(
                f"{path} was trained for a target with {what} {config.get(key)}, this target "
                f"has {want[key]}: these heads belong to another model (target "
                f"{config.get('target') or 'unknown'!r})")
    for key in ("num_heads", "num_layers"):
        if config.get(key) != want[key]:
            raise HeadWeightsError(f"{path} has {key}={config.get(key)}, the drafter "
                                   f"{want[key]}: build the drafter with the file's {key}")
    params = _unflatten(flat)
    shapes = _flatten(jax.tree.map(lambda s: tuple(s.shape), drafter.param_shapes(),
                                   is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct)))
    got = {k: tuple(v.shape) for k, v in flat.items()}
    if got != shapes:
        diff = sorted(k for k in set(got) | set(shapes) if got.get(k) != shapes.get(k))
        raise HeadWeightsError(f"{path} does not fit the drafter's parameters: "
                               + "; ".join(f"{k}: file {got.get(k)}, drafter {shapes.get(k)}"
                                           for k in diff[:10]))
    dtype = dtype or drafter.target.config.param_dtype
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), params)


def shipped_path(name: str, model_name: str) -> str:
    return os.path.join(WEIGHTS_DIR, model_name, f"{name}.safetensors")


DRAFTER_NAMES = ("blockwise", "medusa", "hydra")


def drafter_class(name: str):
    if name == "blockwise":
        from drafters.blockwise import BlockwiseDrafter
        return BlockwiseDrafter
    if name == "medusa":
        from drafters.medusa import MedusaDrafter
        return MedusaDrafter
    if name == "hydra":
        from drafters.hydra import HydraDrafter
        return HydraDrafter
    raise ValueError(f"unknown head drafter {name!r}; choose one of {', '.join(DRAFTER_NAMES)}")


def load_shipped(name: str, target, model_name: Optional[str] = None, *,
                 path: Optional[str] = None, choices=None, max_nodes: Optional[int] = None,
                 **drafter_kwargs):
    """The trained ``name`` heads (``blockwise`` / ``medusa`` / ``hydra``) for ``target``.

    Args:
      name: the drafter type.
      target: a ``LoadedModel`` (from ``models.registry.load``) or a ``LlamaModel``.
      model_name: the registry name the weights were trained for (default: ``target.name``
        for a ``LoadedModel``, else ``smollm2-135m``); picks
        ``drafters/weights/<model_name>/<name>.safetensors``.
      path: an explicit weights file instead.
      choices, max_nodes, drafter_kwargs: passed to the drafter's ``create`` (tree choices for
        medusa / hydra, ``draft_len`` for blockwise, the tree's node budget).

    Returns:
      ``(drafter, params)``; params in the target's param dtype.

    Raises:
      HeadWeightsError: no file, a damaged file, or weights for another target size /
        vocabulary / drafter type.
      ValueError: a tree over ``max_nodes`` or deeper than the heads.
    """
    cls = drafter_class(name)
    if hasattr(target, "model") and hasattr(target, "params"):  # a LoadedModel
        model_name = model_name or target.name
        target = target.model
    model_name = model_name or "smollm2-135m"
    path = path or shipped_path(name, model_name)
    config, _ = read_weights(path)
    kwargs = dict(drafter_kwargs)
    if choices is not None:
        kwargs["choices"] = choices
    if not isinstance(config.get("num_heads"), int) or not isinstance(config.get("num_layers"),
                                                                      int):
        raise HeadWeightsError(f"{path} lacks num_heads / num_layers in its metadata")
    drafter = cls.create(target, num_heads=config["num_heads"],
                         num_layers=config["num_layers"], max_nodes=max_nodes, **kwargs)
    return drafter, load_weights(path, drafter)
