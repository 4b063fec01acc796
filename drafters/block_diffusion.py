"""A one-pass block drafter in the style of block diffusion drafters (DFlash, DEER, SpecDiff).

One forward of a small transformer drafts a whole block: committed target length ``L``,
pending token ``x_L`` (at position ``L``), block size ``K``:

* **Context.** For every committed position ``s < L`` the target's taps after
  ``feature_layers`` (default :func:`drafters.corpus.default_layers`: EAGLE-3's low / middle /
  high layers) are concatenated (``[n * E]``), each tap normalised by its own learned RMSNorm
  (residual-stream magnitudes differ a lot between layers) and fused by a learned projection
  to ``c_s [E]``. Each drafter layer turns ``c_s`` into its CONTEXT key / value with its own
  ``attn_norm`` + ``wk`` / ``wv`` (+ rope at position ``s``); they live in the drafter's KV
  cache (:class:`specjax.cache.KVCache`, one layer per drafter layer, one slot per committed
  position). A context entry depends on ``c_s`` alone, so committing costs no attention.
* **Block.** ``K`` slots: slot 0 is the target's (frozen) embedding of ``x_L``, slots
  ``1..K-1`` a learned mask embedding; slot ``i`` sits at position ``L + i``. ``num_layers``
  decoder layers at the target's width (:func:`models.decoder_block.decoder_block`) attend to
  the context entries of that layer and, bidirectionally, to all ``K`` block slots.
* **Read-out.** After a final RMSNorm, slot ``i`` predicts ``x_{L+i+1}`` (draft depth
  ``i + 1``) through the drafter's OWN head ``[E, N]`` over a draft vocabulary of ``N`` ids
  (``vocab_map int32[N]``, draft id -> target id, :mod:`drafters.draft_vocab`; the head starts
  as the target's LM-head columns for those ids and is trained).

Candidates: ``chain`` takes every slot's argmax (depth ``K``); ``static`` (default) is a
Medusa-style tree from ``choices``: the node with choice path ``(r_1..r_d)`` holds the rank
``r_d`` token of slot ``d - 1`` (:func:`drafters.heads.tree_tables`). Slot distributions do not
depend on drafted tokens, so one pass fills the whole tree. Drafts are top-k tokens, i.e. point
masses (``deterministic = True``) and siblings are distinct: greedy and sampled verification
stay lossless.

Cache invariant (after ``init`` and every ``commit``): ``state.cache.lengths == L`` (the target's
committed length) and slots ``0..L-1`` of every layer hold the context K / V of the TRUE target
features at those positions. ``init`` writes the prompt's (``ctx.prompt_hidden``); ``commit``
writes the features of the pending token and the accepted nodes (``CommitInfo.verify_hidden``
along the accepted path, static width ``D + 1``) at slots ``L..L+D`` and advances live rows by
``num_accepted + 1``; entries past that are scratch (every reader masks slots ``>= lengths``),
as are the block's entries ``propose`` writes at ``L..L+K-1``.

Cost per round: one drafter forward over ``K`` tokens (``num_layers`` decoder layers attending
to ``L + K`` keys), one head matmul ``[D, E] x [E, N]`` (``D`` = tree depth ``<= K``) and one
top-k; ``commit`` projects ``D + 1`` features (``[n*E, E]`` fusion + ``wk`` / ``wv`` per layer).
Training: :mod:`drafters.block_diffusion_train`.

Axis glossary: B batch, T tree nodes, K block slots, D tree depth, P prompt length, S draft-cache
slots, n feature taps, E width, H query heads, Kh kv heads, Dh head dim, V target vocabulary,
N draft vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from drafters import corpus, draft_vocab, drafter_packing, head_weights, heads, registry
from drafters.block_diffusion_net import BlockNet, init_block_net
from drafters.target_readout import TargetReadout
from models import decoder_block as block
from specjax import cache as cache_lib
from specjax import masks
from specjax.cache import KVCache
from specjax.drafter import DrafterBase, Proposal
from specjax.tree import DraftTree

NAME = "block_diffusion"
TREES = ("static", "chain")
DEFAULT_BLOCK_SIZE = 6
# 12 drafted nodes, depth 6: top-3 at depth 1, a bushy path under the best guess.
DEFAULT_CHOICES = ((0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 1), (0, 0, 0, 0),
                   (0, 0, 0, 1), (0, 0, 0, 0, 0), (0, 0, 0, 0, 0, 0))
DEFAULT_MAX_NODES = 64
TRAIN_COMMAND = ("python -m experiments.train_corpus_drafter --drafter=block_diffusion ...")



@struct.dataclass
class BlockState:
    """The context cache (``L = num_layers``; ``lengths`` = the target's committed length)."""

    cache: KVCache


# The drafter ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BlockDiffusionDrafter(TargetReadout, DrafterBase):
    """Static configuration (hashable; a jit static argument). Build with :meth:`create`.

    Params (``dparams``): ``{"net": BlockNet params, "vocab_map": int32[N]}``
    (:func:`decode_params`).

    Attributes:
      target: the target ``LlamaModel`` (frozen embedding, sizes, rope).
      tree: the candidate tree (depth ``<= block_size``).
      block_size: ``K`` slots per block (draft depths ``1..K``).
      num_layers: drafter decoder layers.
      feature_layers: the target layers whose outputs form the context features.
      draft_vocab_size: ``N``, the head's width (the length of ``vocab_map``).
    """

    target: Any
    tree: DraftTree
    block_size: int = DEFAULT_BLOCK_SIZE
    num_layers: int = 1
    feature_layers: tuple = ()
    draft_vocab_size: int = 0

    readout_subject = "the block drafter is"  # for TargetReadout.check_compatible
    deterministic = True  # top-k drafts are point masses
    siblings = "without_replacement"  # siblings are distinct top-k tokens of one slot

    @classmethod
    def create(cls, target, tree: str = "static",
               choices: Optional[Sequence[Sequence[int]]] = None,
               block_size: int = DEFAULT_BLOCK_SIZE, num_layers: int = 1,
               feature_layers: Optional[Sequence[int]] = None, draft_vocab_size: int = 0,
               max_nodes: Optional[int] = DEFAULT_MAX_NODES) -> "BlockDiffusionDrafter":
        """``tree="chain"``: every slot's argmax; ``"static"``: the tree of ``choices`` (default
        :data:`DEFAULT_CHOICES`, cut to ``block_size`` levels). ``draft_vocab_size`` 0 means the
        whole vocabulary; ``feature_layers`` None means ``corpus.default_layers``. ValueError
        for impossible settings."""
        if tree not in TREES:
            raise ValueError(f"unknown block_diffusion tree {tree!r}; choose one of "
                             f"{', '.join(TREES)}")
        if block_size < 2:
            raise ValueError(f"block_size must be >= 2 (the pending token and a mask slot), "
                             f"got {block_size}")
        if tree == "chain":
            if choices is not None:
                raise ValueError("choices apply to the static tree only; the chain drafts "
                                 "block_size tokens")
            shape = DraftTree.chain(block_size, max_nodes)
        else:
            if choices is None:
                choices = [c for c in DEFAULT_CHOICES if len(c) <= block_size]
            shape = heads.make_tree(choices, DEFAULT_CHOICES, max_nodes)
        layers = corpus.default_layers(target.num_layers) if feature_layers is None \
            else feature_layers
        return cls(target, shape, block_size, num_layers, tuple(int(i) for i in layers),
                   draft_vocab_size or target.vocab_size)

    def __post_init__(self):
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        if self.tree.num_nodes < 2:
            raise ValueError("the tree drafts nothing: give it at least one non-root node")
        if self.tree.max_depth > self.block_size:
            raise ValueError(f"the tree is {self.tree.max_depth} deep but a block has "
                             f"{self.block_size} slots (one per depth): use a shallower tree or "
                             "a larger block_size")
        if not 1 <= self.draft_vocab_size <= self.target.vocab_size:
            raise ValueError(f"draft_vocab_size must be in 1..{self.target.vocab_size}, got "
                             f"{self.draft_vocab_size}")
        if heads.max_rank(self.tree) > self.draft_vocab_size:
            raise ValueError(f"the tree uses ranks up to {heads.max_rank(self.tree) - 1}, more "
                             f"than the {self.draft_vocab_size} draft-vocabulary candidates")
        if not self.feature_layers or len(set(self.feature_layers)) != len(self.feature_layers):
            raise ValueError(f"feature_layers must be distinct target layers, got "
                             f"{self.feature_layers}")
        self._check_layers(self.target)

    def _check_layers(self, target):
        if not all(0 <= i < target.num_layers for i in self.feature_layers):
            raise ValueError(f"feature_layers {list(self.feature_layers)} are not all layers of "
                             f"a {target.num_layers}-layer target: use layers in "
                             f"0..{target.num_layers - 1}")

    def check_compatible(self, target) -> None:
        super().check_compatible(target)
        self._check_layers(target)

    # Sizes / params ----------------------------------------------------------------------------

    @property
    def module(self) -> BlockNet:
        return BlockNet(self.target.config, len(self.feature_layers), self.num_layers,
                        self.draft_vocab_size)

    def config_dict(self) -> dict:
        """The architecture, stored with weights and checkpoints."""
        c = self.target.config
        return {"drafter": NAME, "hidden_size": c.hidden_size, "vocab_size": c.vocab_size,
                "num_heads": c.num_heads, "num_kv_heads": c.num_kv_heads,
                "head_dim": c.head_dim, "intermediate_size": c.intermediate_size,
                "num_layers": self.num_layers, "block_size": self.block_size,
                "feature_layers": list(self.feature_layers),
                "draft_vocab_size": self.draft_vocab_size}

    def init_params(self, key: jax.Array) -> dict:
        """Fresh ``BlockNet`` params (float32; the head random: see the trainer for a head
        initialised from the target's)."""
        return _init_params(self, key)

    def param_shapes(self) -> dict:
        """Shapes of the float params of a weights file (``{"net": ...}``)."""
        return {"net": jax.eval_shape(self.init_params, jax.random.key(0))}

    # The two computations ----------------------------------------------------------------------

    def write_context(self, params, cache: KVCache, features, offsets) -> KVCache:
        """Writes the context entries of ``features [B, T, n*E]`` (positions ``offsets + t``)
        at slots ``offsets[b] + t`` of every layer; ``lengths`` unchanged."""
        t = features.shape[1]
        if features.shape[-1] != len(self.feature_layers) * self.hidden_size:
            raise ValueError(f"features of width {features.shape[-1]}, the drafter reads "
                             f"{len(self.feature_layers)} taps of width {self.hidden_size}: run "
                             "the target with hidden_layers=drafter.feature_layers")
        positions = offsets[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        kv = self.module.apply({"params": params["net"]}, features, positions,
                               method=BlockNet.context_kv)
        k, v = cache.k, cache.v
        for i, (ki, vi) in enumerate(kv):
            k, v = cache_lib.write(k, i, ki, offsets), cache_lib.write(v, i, vi, offsets)
        return cache.replace(k=k, v=v)

    def block_logits(self, params, target_params, cache: KVCache, pending):
        """One block after the cache's context: ``(float32[B, D, N] logits of slots 0..D-1,
        cache with the block's entries in scratch slots lengths..lengths+K-1)``."""
        net, k_slots = self.module, self.block_size
        length = cache.lengths
        emb = self.embed(target_params, pending)  # [B, E]
        positions = length[:, None] + jnp.arange(k_slots, dtype=jnp.int32)[None, :]
        mask = masks.block_mask(length, np.ones((k_slots, k_slots), bool), cache.num_slots)
        kv = {"k": cache.k, "v": cache.v}

        def attend(i, q, k, v):  # write the block's K / V as scratch, attend over the cache
            kv["k"] = cache_lib.write(kv["k"], i, k, length)
            kv["v"] = cache_lib.write(kv["v"], i, v, length)
            return block.attention(q, kv["k"][i], kv["v"][i], mask)

        p = {"params": params["net"]}
        x = net.apply(p, emb, k_slots, method=BlockNet.block_inputs)
        h = net.apply(p, x, positions, attend, method=BlockNet.run)
        logits = net.apply(p, h[:, :self.tree.max_depth], method=BlockNet.logits)
        return logits, cache.replace(k=kv["k"], v=kv["v"])

    # Drafter contract --------------------------------------------------------------------------

    def init(self, params, ctx, prompt_tokens, prompt_lengths):
        """The context cache of the prompt, from the prefill's taps (``ctx.prompt_hidden``)."""
        if ctx.prompt_hidden is None:
            raise ValueError("the block drafter needs the prefill's features "
                             "(DraftContext.prompt_hidden): run it through SpecLoop")
        b = prompt_tokens.shape[0]
        c = self.target.config
        cache = KVCache.init(self.num_layers, b, c.num_kv_heads,
                             ctx.cache.num_slots + self.block_size + 1, c.head_dim,
                             jnp.dtype(c.dtype))
        cache = self.write_context(params, cache, ctx.prompt_hidden, jnp.zeros((b,), jnp.int32))
        return BlockState(cache.replace(lengths=jnp.asarray(prompt_lengths, jnp.int32)))

    def propose(self, params, state: BlockState, ctx, key):
        del key
        logits, cache = self.block_logits(params, ctx.target_params, state.cache, ctx.pending)
        _, top = jax.lax.top_k(logits, heads.max_rank(self.tree))  # [B, D, R]
        slot, rank = heads.tree_tables(self.tree)
        drafted = draft_vocab.to_target(params["vocab_map"], top[:, slot, rank])  # [B, T-1]
        tokens = jnp.concatenate([ctx.pending[:, None], drafted.astype(jnp.int32)], axis=1)
        return Proposal(tokens=tokens), state.replace(cache=cache), ctx.cache

    def commit(self, params, state: BlockState, ctx, info):
        """Context entries of the pending token and the accepted nodes (their true features),
        at slots ``L..L+D``; live rows advance by ``num_accepted + 1``."""
        width = info.path.shape[1]  # the verified tree's depth + 1 (composed: maybe deeper)
        nodes = jnp.maximum(info.path[:, :width], 0)  # entries past the accepted: scratch
        feats = jnp.take_along_axis(info.verify_hidden, nodes[:, :, None], axis=1)
        cache = self.write_context(params, state.cache, feats, state.cache.lengths)
        count = jnp.where(info.live, info.num_accepted + 1, 0)
        return BlockState(cache.replace(lengths=cache.lengths + count))


@functools.partial(jax.jit, static_argnums=0)
def _init_params(drafter: BlockDiffusionDrafter, key):
    return init_block_net(drafter.module, drafter.block_size, key)


def decode_params(net_params, vocab_map) -> dict:
    """The drafter's params: the trained ``BlockNet`` params and the vocabulary map."""
    vocab_map = draft_vocab.check_map(vocab_map, np.iinfo(np.int32).max)
    return {"net": net_params, "vocab_map": jnp.asarray(vocab_map)}


# Weights files ---------------------------------------------------------------------------------


def save_weights(path, drafter: BlockDiffusionDrafter, dparams, *, target_name: str = "",
                 extra: Optional[dict] = None, dtype: str = "bfloat16") -> str:
    """Writes the float params as ``dtype`` and ``vocab_map`` as int32 (safetensors, in the
    head-weights format with the drafter's config, :func:`drafters.head_weights.save_weights`),
    atomically; returns the absolute path."""
    params = {"net": dparams["net"], "vocab_map": np.asarray(dparams["vocab_map"], np.int32)}
    return head_weights.save_weights(path, drafter, params, target_name=target_name,
                                     dtype=dtype, extra=extra)


def _file_drafter(path, config: dict, target, **create_kwargs) -> BlockDiffusionDrafter:
    """The drafter a weights file's config describes, on ``target`` (HeadWeightsError when the
    file is another drafter's or made for another target)."""
    if config.get("drafter") != NAME:
        raise head_weights.HeadWeightsError(f"{path} holds {config.get('drafter')!r} weights, "
                                            f"not {NAME!r}")
    for key, what in (("hidden_size", "hidden size"), ("vocab_size", "vocabulary")):
        have = getattr(target, key)
        if config.get(key) != have:
            raise head_weights.HeadWeightsError(
                f"{path} was trained for a target with {what} {config.get(key)}, this target "
                f"has {have}: the block drafter belongs to another model (target "
                f"{config.get('target') or 'unknown'!r})")
    arch = {k: config.get(k) for k in ("block_size", "num_layers", "feature_layers",
                                       "draft_vocab_size")}
    if not all(isinstance(v, (int, list)) for v in arch.values()):
        raise head_weights.HeadWeightsError(f"{path} lacks the block drafter's architecture "
                                            "in its metadata: re-train it")
    return BlockDiffusionDrafter.create(target, **arch, **create_kwargs)


def load_weights(path, drafter: BlockDiffusionDrafter, dtype: Optional[str] = None) -> dict:
    """``dparams`` for ``drafter`` from ``path`` (HeadWeightsError: missing, damaged, another
    drafter, another target or another architecture)."""
    config, flat = head_weights.read_weights(path)
    built = _file_drafter(path, config, drafter.target, tree="chain")
    if built.config_dict() != drafter.config_dict():
        raise head_weights.HeadWeightsError(
            f"{path} holds a block drafter {built.config_dict()}, not {drafter.config_dict()}: "
            "build the drafter from the file (load_shipped)")
    vocab_map = flat.pop("vocab_map", None)
    if vocab_map is None or vocab_map.shape != (drafter.draft_vocab_size,):
        raise head_weights.HeadWeightsError(f"{path} lacks a vocab_map of "
                                            f"{drafter.draft_vocab_size} ids: re-train it")
    params = head_weights.params_from_flat(path, flat, drafter, "the block drafter", dtype)
    return decode_params(params["net"], np.asarray(vocab_map))


def load_shipped(target, model_name: Optional[str] = None, *, path: Optional[str] = None,
                 tree: str = "static", choices=None,
                 max_nodes: Optional[int] = DEFAULT_MAX_NODES, drafter_weights: str = "auto"):
    """``(drafter, dparams)``: the trained block drafter for ``target`` (a ``LoadedModel`` or a
    ``LlamaModel``) from ``drafters/weights/<model_name>/block_diffusion.safetensors`` or
    ``path``, its architecture read from the file.

    ``tree``: ``"static"`` (the tree tuned for these weights, ``block_diffusion.tree.json``
    written by ``experiments/tune_tree.py``, when there is one, else :data:`DEFAULT_CHOICES`),
    ``"tunedN"`` (the tuned file's best N-node tree), ``"generic"`` (:data:`DEFAULT_CHOICES`)
    or ``"chain"`` (every slot's argmax); explicit ``choices`` go with ``"static"``.
    ``drafter_weights``: ``"float32"``, ``"q8_0"`` (the layers, fusion and head as 8-bit blocks
    through the CPU kernel: :mod:`drafters.drafter_packing`) or ``"auto"`` (q8_0 on a packed
    target on the CPU).

    Raises:
      head_weights.HeadWeightsError: missing or unfitting weights.
      ValueError / TunedTreeError: an unknown tree, or ``tunedN`` without a (valid) tree file.
    """
    if hasattr(target, "model") and hasattr(target, "params"):  # a LoadedModel
        model_name = model_name or target.name
        target = target.model
    fmt = drafter_packing.resolve(drafter_weights, target)
    model_name = model_name or "smollm2-135m"
    path = path or head_weights.shipped_path(NAME, model_name)
    if not os.path.isfile(path):
        raise head_weights.HeadWeightsError(
            f"no block_diffusion weights for {model_name} at {path}: train them with "
            f"{TRAIN_COMMAND}")
    config, _ = head_weights.read_weights(path)
    if choices is not None and tree != "static":
        raise ValueError(f"tree={tree!r} with explicit choices: use tree='static'")
    if tree != "chain" and choices is None:
        choices = head_weights.tuned_tree(None if tree == "static" else tree, path,
                                          head_weights.is_packed(target))[0]
    drafter = _file_drafter(path, config, target, tree="chain" if tree == "chain" else "static",
                            choices=choices, max_nodes=max_nodes)
    return drafter, drafter_packing.pack_params(load_weights(path, drafter), fmt)


# The method -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BlockDiffusionOptions(registry.Options):
    tree: str = registry.option(
        "static", "static: the tree of the slots' top-k tokens tuned for the shipped drafter "
        "(or the built-in one); tunedN: its best N-node tree; generic: the built-in tree; "
        "chain: every slot's argmax (block_size deep).",
        choices=("static", "chain", "tunedN", "generic"), patterns=heads.TUNED_N)
    drafter_weights: str = registry.option(
        "auto", drafter_packing.OPTION_HELP, choices=drafter_packing.DRAFTER_WEIGHTS)


def build(ctx: registry.BuildContext, options: BlockDiffusionOptions):
    return load_shipped(ctx.lm, tree=options.tree, drafter_weights=options.drafter_weights)


registry.register(registry.Method(
    NAME, BlockDiffusionOptions, build,
    "block drafter: one pass over pending + mask slots drafts a whole block from the "
    "target's layer features (DFlash-style)", weights=NAME, order=95))
