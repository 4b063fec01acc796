"""EAGLE-3 drafter (Li et al. 2025): fused multi-layer target features, its own LM head over a
reduced draft vocabulary, static or dynamic trees.

What differs from EAGLE-1/2 (:mod:`drafters.eagle`, whose drafting machinery this reuses:
draft KV cache, static trees by expansion levels, dynamic EAGLE-2 trees, commit of the
accepted path):

* **Target features.** The drafter names ``feature_layers`` (default
  :func:`drafters.corpus.default_layers`: a low, a middle and a high layer), so the loop
  hands it the residual stream after those layers concatenated, ``[n * E]``, at every prefill
  and verification position (``specjax.drafter.features_of``). A learned fusion turns them
  into the layer's ``E``-dim input feature: each tap RMS-normalised with its own learned
  weights (``fuse_norm [n, E]``), then one linear map ``fuse [n * E, E]``
  (:func:`fuse_features`). Only committed positions get fused TRUE features; inside a draft
  tree a node's input feature is the layer's own output at its parent (``E``-dim, no fusion),
  as in EAGLE-1/2.
* **The layer** is EAGLE-1's :class:`~drafters.eagle.EagleLayer` (``fc([emb; feature])``,
  one decoder layer of :mod:`models.decoder_block`, output RMSNorm), with the same pair
  convention: draft slot ``s`` holds ``(f_s, x_{s+1})``; its output ``g_{s+1}`` is the input
  feature of the next slot and its logits predict ``x_{s+2}``. Its output norm is the
  drafter's own final norm.
* **Its own LM head over a draft vocabulary.** ``head [E, N]`` (trained; initialised from the
  target head's columns of the vocabulary map, :func:`drafters.draft_vocab.head_rows`) scores
  ``N << V`` tokens; ``vocab_map int32[N]`` (in the params, never trained) maps a drafted id to
  its target id before it enters ``Proposal.tokens`` or the embedding. One ``[E, N]`` matmul
  per tree depth level. Verification uses the full vocabulary: lossless.
* Drafts are top-k tokens, point masses (``deterministic = True``): lossless under sampling by
  the deterministic-draft rule.

Params (``dparams``): ``{"layer": EagleLayer params, "fuse_norm": [n, E], "fuse": [n*E, E],
"head": [E, N], "vocab_map": int32[N]}``; everything but ``vocab_map`` is trained
(:mod:`drafters.eagle3_train`). Weights files: :func:`save_weights` / :func:`load_weights`
(bf16 floats, ``vocab_map`` as int32, the architecture checked on load); the shipped ones:
``drafters/weights/<model>/eagle3.safetensors`` (:func:`load_shipped`).

Axis glossary: B batch, T tree nodes, n feature taps, E embedding width, V target vocabulary,
N draft vocabulary.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from drafters import draft_vocab as vocab_lib
from drafters import drafter_packing, head_weights, heads, registry
from drafters.corpus import default_layers
from drafters.target_readout import fuse_taps
from drafters.eagle import (DEFAULT_BUDGET, DEFAULT_DEPTH, DEFAULT_TOP_K, EagleDrafter,
                            EagleLayer)
from specjax import packed

STEM = "eagle3"  # drafters/weights/<model>/eagle3.safetensors
TRAIN_COMMAND = ("python -m experiments.train_corpus_drafter --drafter=eagle3 "
                 "--corpus_dir=CORPUS --output={path}")


def fuse_features(params, taps: jax.Array, num_taps: int, eps: float) -> jax.Array:
    """``taps [..., n * E]`` (the target's layer outputs, concatenated) -> ``[..., E]``: each
    tap RMS-normalised with its weights ``params["fuse_norm"][i]``, then ``params["fuse"]``."""
    del num_taps  # the shape of params["fuse_norm"]
    return fuse_taps(taps, params["fuse_norm"], params["fuse"], eps)


@dataclasses.dataclass(frozen=True)
class Eagle3Drafter(EagleDrafter):
    """Static configuration (hashable; a jit static argument). Build with :meth:`create`.

    Attributes (besides :class:`~drafters.eagle.EagleDrafter`'s ``target``, ``tree``,
    ``mode``, ``top_k``, ``depth``, ``budget``):
      draft_vocab: ``N``, the size of the draft vocabulary (the head's width, the length of
        ``vocab_map``); ``1 <= N <= V``.
      feature_layers: the target layers whose outputs are fused (0-based, in tap order).
    """

    feature_layers: tuple = ()

    name = "eagle3"
    readout_subject = "the EAGLE-3 drafter is"

    @classmethod
    def create(cls, target, draft_vocab: int, tree: str = "static",
               feature_layers: Optional[Sequence[int]] = None, **kwargs) -> "Eagle3Drafter":
        """A drafter over a draft vocabulary of ``draft_vocab`` ids; ``feature_layers``
        defaults to :func:`drafters.corpus.default_layers`; ``kwargs`` as
        :meth:`EagleDrafter.create` (``choices``, ``top_k``, ``depth``, ``budget``,
        ``max_nodes``)."""
        layers = default_layers(target.num_layers) if feature_layers is None else feature_layers
        return super().create(target, tree, draft_vocab=int(draft_vocab),
                              feature_layers=tuple(int(i) for i in layers), **kwargs)

    def __post_init__(self):
        super().__post_init__()
        if self.draft_vocab < 1:
            raise ValueError(f"EAGLE-3 needs a draft vocabulary of 1..{self.vocab_size} ids, "
                             f"got {self.draft_vocab}")
        layers = self.feature_layers
        if not layers or any(not 0 <= i < self.target.num_layers for i in layers):
            raise ValueError(f"feature_layers must be one or more target layers in 0.."
                             f"{self.target.num_layers - 1}, got {list(layers)}")
        widest = (int(np.max(self.tree.choice_rank[1:])) + 1 if self.mode == "static"
                  else self.top_k)
        if widest > self.draft_vocab:
            raise ValueError(f"the tree drafts {widest} tokens per node, more than the "
                             f"{self.draft_vocab} of the draft vocabulary")

    # Sizes / params ----------------------------------------------------------------------------

    @property
    def num_taps(self) -> int:
        return len(self.feature_layers)

    def config_dict(self) -> dict:
        """The architecture, stored with weights and checkpoints."""
        return dict(super().config_dict(), draft_vocab=self.draft_vocab,
                    feature_layers=list(self.feature_layers),
                    num_layers=self.target.num_layers)

    def init_params(self, key: jax.Array, target_params=None, vocab_map=None) -> dict:
        """The TRAINABLE params (float32; no ``vocab_map``). The head starts from the target
        head's columns of ``vocab_map`` when both are given (training), else at random."""
        e, n, k = self.hidden_size, self.num_taps, jax.random.split(key, 3)
        z = jnp.zeros((1, 1, e), jnp.float32)
        if target_params is not None and vocab_map is not None:
            head = vocab_lib.head_rows(vocab_lib.target_lm_head(self.target, target_params),
                                         jnp.asarray(vocab_map, jnp.int32))
        else:
            head = nn.initializers.normal(0.02)(k[2], (e, self.draft_vocab))
        return {"layer": EagleLayer(self.target.config).init(
                    k[0], z, z, jnp.zeros((1, 1), jnp.int32))["params"],
                "fuse_norm": jnp.ones((n, e), jnp.float32),
                "fuse": nn.initializers.lecun_normal()(k[1], (n * e, e)),
                "head": jnp.asarray(head, jnp.float32)}

    def param_shapes(self) -> dict:
        return jax.eval_shape(self.init_params, jax.random.key(0))

    def check_compatible(self, target) -> None:
        super().check_compatible(target)
        if target.num_layers <= max(self.feature_layers):
            raise ValueError(f"{self.readout_subject} reading layers {list(self.feature_layers)}"
                             f", the target has {target.num_layers} layers: build it with this "
                             "target")

    # EagleDrafter's hooks ----------------------------------------------------------------------

    def layer_params(self, params):
        return params["layer"]

    def input_features(self, params, hidden: jax.Array) -> jax.Array:
        """Fused true target features ``[..., E]`` of taps ``[..., n * E]``."""
        dt = jnp.dtype(self.target.config.dtype)
        return fuse_features(params, hidden.astype(dt), self.num_taps,
                             self.target.config.rms_norm_eps)

    def draft_scores(self, params, target_params, features: jax.Array) -> jax.Array:
        """``float32[..., N]``: predicted features through the drafter's own head."""
        del target_params
        dt = jnp.dtype(self.target.config.dtype)
        return packed.dense(features.astype(dt), params["head"]).astype(jnp.float32)

    def target_ids(self, params, draft_ids: jax.Array) -> jax.Array:
        return vocab_lib.to_target(params["vocab_map"], draft_ids)


def decode_params(drafter: Eagle3Drafter, params: dict, vocab_map) -> dict:
    """The trainable ``params`` plus ``vocab_map`` as int32: what the drafter decodes with;
    ValueError when the map does not fit the drafter."""
    vocab_map = vocab_lib.check_map(vocab_map, drafter.vocab_size, drafter.draft_vocab)
    return dict(params, vocab_map=jnp.asarray(vocab_map))


# Weights files ---------------------------------------------------------------------------------


def save_weights(path, drafter: Eagle3Drafter, dparams: dict, *, target_name: str = "",
                 dtype: str = "bfloat16", extra: Optional[dict] = None) -> str:
    """Writes ``dparams`` (floats as ``dtype``, ``vocab_map`` as int32) in the head weights
    format (:func:`drafters.head_weights.save_weights`), atomically; returns the absolute
    path."""
    params = dict(dparams)
    params["vocab_map"] = decode_params(drafter, {}, params.pop("vocab_map"))["vocab_map"]
    return head_weights.save_weights(path, drafter, params, target_name=target_name,
                                     dtype=dtype, extra=extra)


def _read(path: str) -> tuple[dict, dict]:
    """``(config, flat tensors)``; HeadWeightsError naming the training command when missing,
    or when the file holds another drafter's weights."""
    if not os.path.isfile(path):
        raise head_weights.HeadWeightsError(
            f"no EAGLE-3 weights at {path}: train them with " + TRAIN_COMMAND.format(path=path))
    config, flat = head_weights.read_weights(path)
    if config.get("drafter") != Eagle3Drafter.name:
        raise head_weights.HeadWeightsError(f"{path} holds {config.get('drafter')!r} weights, "
                                            "not 'eagle3'")
    return config, flat


def _check_config(path, config: dict, want: dict) -> None:
    for key, value in want.items():
        if config.get(key) != value:
            what = {"vocab_size": "vocabulary", "hidden_size": "hidden size"}.get(key, key)
            raise head_weights.HeadWeightsError(
                f"{path} was made for {what} {config.get(key)}, here it is {value}: the weights "
                f"belong to another model or setting (target {config.get('target') or '?'!r})")


def load_weights(path, drafter: Eagle3Drafter, dtype: Optional[str] = None) -> dict:
    """``dparams`` for ``drafter`` from ``path`` (floats in ``dtype``, default the target's
    param dtype).

    Raises:
      head_weights.HeadWeightsError: missing / damaged file, another drafter type, or a file
        made for another target, feature layers or draft vocabulary.
    """
    config, flat = _read(os.fspath(path))
    _check_config(path, config, drafter.config_dict())
    flat = dict(flat)
    vocab_map = np.asarray(flat.pop("vocab_map", np.zeros(0, np.float32)))
    params = head_weights.params_from_flat(path, flat, drafter, "the EAGLE-3 drafter", dtype)
    try:
        return decode_params(drafter, params, vocab_map)
    except ValueError as e:
        raise head_weights.HeadWeightsError(f"{path}: {e}") from None


def load_shipped(target, model_name: Optional[str] = None, *, path: Optional[str] = None,
                 tree: str = "static", drafter_weights: str = "auto", **create_kwargs):
    """``(drafter, dparams)``: the trained EAGLE-3 drafter for ``target`` (a ``LoadedModel`` or
    a ``LlamaModel``) from ``drafters/weights/<model_name>/eagle3.safetensors`` or ``path``;
    its draft vocabulary and feature layers are the file's.

    ``tree``: ``"static"`` (the tree tuned for these weights, ``eagle3.tree.json``, when there
    is one, at its default size for the target's weight format; else
    :data:`drafters.eagle.DEFAULT_CHOICES`), ``"tunedN"``, ``"generic"``
    (``DEFAULT_CHOICES``) or ``"dynamic"`` (EAGLE-2: ``top_k`` / ``depth`` / ``budget`` in
    ``create_kwargs``).

    ``drafter_weights``: ``"float32"``, ``"q8_0"`` (the layer, fusion and head as 8-bit blocks
    through the CPU kernel: :mod:`drafters.drafter_packing`) or ``"auto"`` (q8_0 on a packed
    target on the CPU).
    """
    if hasattr(target, "model") and hasattr(target, "params"):  # a LoadedModel
        model_name = model_name or target.name
        target = target.model
    fmt = drafter_packing.resolve(drafter_weights, target)
    path = path or head_weights.shipped_path(STEM, model_name or "smollm2-135m")
    config, _ = _read(path)
    c = target.config
    _check_config(path, config, {k: getattr(c, k) for k in (
        "hidden_size", "vocab_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
        "intermediate_size")})
    kwargs = dict(create_kwargs)
    if tree != "dynamic" and kwargs.get("choices") is None:
        # A tuned file's draft_vocab does not apply: the draft vocabulary is the weights' map.
        kwargs["choices"] = head_weights.tuned_tree(None if tree == "static" else tree, path,
                                                    head_weights.is_packed(target))[0]
    elif tree not in ("static", "dynamic"):
        raise ValueError(f"tree={tree!r} with explicit choices: use tree='static'")
    drafter = Eagle3Drafter.create(target, config.get("draft_vocab") or 0,
                                   "dynamic" if tree == "dynamic" else "static",
                                   feature_layers=config.get("feature_layers") or (), **kwargs)
    return drafter, drafter_packing.pack_params(load_weights(path, drafter), fmt)


# The method -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Eagle3Options(registry.Options):
    tree: str = registry.option(
        "static", "static: the tree tuned for the shipped EAGLE-3 drafter (or the built-in "
        "one); tunedN: its best N-node tree; generic: the built-in tree; dynamic: EAGLE-2 "
        "trees (top-k expansion per depth, reranked to a node budget).",
        choices=("static", "dynamic", "tunedN", "generic"), patterns=heads.TUNED_N)
    dynamic_top_k: Optional[int] = registry.option(
        None, f"--tree=dynamic: nodes expanded per depth and children per node (default "
        f"{DEFAULT_TOP_K}).", minimum=1)
    dynamic_depth: Optional[int] = registry.option(
        None, f"--tree=dynamic: drafted depth (default {DEFAULT_DEPTH}).", minimum=1)
    dynamic_budget: Optional[int] = registry.option(
        None, f"--tree=dynamic: drafted nodes kept per round (default {DEFAULT_BUDGET}).",
        minimum=1)
    drafter_weights: str = registry.option(
        "auto", drafter_packing.OPTION_HELP, choices=drafter_packing.DRAFTER_WEIGHTS)

    def __post_init__(self):
        super().__post_init__()
        given = [f for f in ("dynamic_top_k", "dynamic_depth", "dynamic_budget")
                 if getattr(self, f) is not None]
        if given and self.tree != "dynamic":
            raise ValueError(f"{', '.join(given)} apply to tree=dynamic only, the tree is "
                             f"{self.tree!r}")

    def dynamic_kwargs(self) -> dict:
        pairs = (("top_k", self.dynamic_top_k), ("depth", self.dynamic_depth),
                 ("budget", self.dynamic_budget))
        return {k: v for k, v in pairs if v is not None}


def build(ctx: registry.BuildContext, options: Eagle3Options):
    return load_shipped(ctx.lm, tree=options.tree, drafter_weights=options.drafter_weights,
                        **options.dynamic_kwargs())


registry.register(registry.Method(
    "eagle3", Eagle3Options, build,
    "EAGLE-3: one decoder layer on fused low/middle/high target features, its own head over a "
    "draft vocabulary (static or dynamic trees)", weights=STEM, order=92))


