"""EAGLE-style drafter (Li et al. 2024, EAGLE-1 static trees and EAGLE-2 dynamic trees).

One decoder layer drafts in FEATURE space: its input at slot ``s`` is the pair
``(f_s, x_{s+1})`` (a feature and the embedding of the token that followed it), its output
``g_{s+1}`` predicts the next feature ``f_{s+1}``, and the target's own (frozen, shared) LM
head turns a predicted feature into next-token logits. Here the feature ``f_s`` is the target's
FINAL-NORM hidden state at position ``s`` (what ``DraftContext.pending_hidden`` /
``CommitInfo.verify_hidden`` carry and the self-distillation data store); EAGLE-1 used the
top layer's pre-norm output. Predicted features go straight through ``lm_head``.

The drafter's own one-layer KV cache (``specjax.cache.KVCache`` with ``L = 1``) holds one entry
per committed slot, kept in step with the target (invariant after ``init`` and every
``commit``, committed target length ``L``, pending token ``x_L``):

* draft slots ``0 .. L-1`` hold the pairs ``(f_s, x_{s+1})`` with TRUE target features;
* ``state.next_feature`` is the layer's output at slot ``L - 1``: the predicted ``f_L``, whose
  top-k tokens are the candidates for ``x_{L+1}`` (depth 1).

``propose`` drafts a tree by running the layer on the tree's nodes (input: the parent's
predicted feature and the node's token, position ``L - 1 + depth``), writing their entries to
scratch slots ``L + pool index`` and attending to the committed prefix plus the node's
ancestors. ``commit`` writes the accepted path's pairs with the target's true features from
``verify_hidden`` (``D + 1`` statically shaped slots, masked past the accepted count).

Trees: ``static`` (EAGLE-1): a fixed :class:`~specjax.tree.DraftTree` whose node ``n`` holds
the rank ``choice_rank[n]`` token under its parent. ``dynamic`` (EAGLE-2): at every depth the
``top_k`` drafted nodes with the highest cumulative draft log-probability are expanded into
their ``top_k`` children; all drafted nodes are then reranked by cumulative log-probability
and the best ``budget`` kept (:func:`specjax.tree.select_top_nodes`). Drafts are top-k tokens,
i.e. point masses (``deterministic = True``): greedy and sampled verification stay lossless.

Shared pieces: the layer is the target's own decoder-layer math (:mod:`models.decoder_block`,
with the draft cache as its attention); the frozen embedding, LM head, ``draft_vocab`` slice and
compatibility check are :class:`drafters.target_readout.TargetReadout` (shared with the head
drafters); static trees are drafted level by level after
:attr:`specjax.tree.DraftTree.expansion_levels` (shared with Hydra).

Axis glossary: B batch, T tree nodes, M pool of drafted nodes, P prompt length, S draft-cache
slots, H query heads, K kv heads, D head dim, E embedding width, F MLP width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from drafters import drafter_packing, heads
from drafters.target_readout import TargetReadout
from models import decoder_block as block
from specjax import masks, packed
from specjax.cache import KVCache
from specjax.drafter import DrafterBase, Proposal, features_of
from specjax.tree import DraftTree, select_top_nodes

TREES = ("static", "dynamic")
# 12 drafted nodes, depth 5: top-3 at depth 1, a bushy path under the best guess.
DEFAULT_CHOICES = ((0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 1), (0, 1, 0),
                   (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 0, 0, 0))
DEFAULT_TOP_K, DEFAULT_DEPTH, DEFAULT_BUDGET = 4, 5, 12
DEFAULT_MAX_NODES = 64


# The layer -----------------------------------------------------------------------------------


class EagleLayer(nn.Module):
    """``fc([emb; feature])`` then one Llama decoder layer and an output RMSNorm.

    The decoder layer is :func:`models.decoder_block.decoder_block` (the target's own layer
    math; its params are named as the target's, unstacked, without qkv biases). Shapes:
    features / embeddings ``[B, T, E]``; positions ``int32[B, T]``. :meth:`run` takes the
    attention as an argument, so callers choose what the queries attend to (the draft cache
    during decoding, several feature levels in training).
    """

    config: Any  # the target's LlamaConfig (sizes, rope, eps)

    def setup(self):
        e = self.config.hidden_size
        dense = nn.initializers.normal(0.02)
        # float32, or Q8_0 blocks when packed at load (drafters/drafter_packing.py)
        self.fc = drafter_packing.param_or_packed(self, "fc", dense, (2 * e, e), jnp.float32)
        self.layer = drafter_packing.layer_params(self, block.param_specs(self.config),
                                                  jnp.float32)
        self.out_norm = self.param("out_norm", nn.initializers.ones, (e,), jnp.float32)

    def run(self, features, emb, positions, attend: block.Attend):
        """``(predicted features [B, T, E], extra)``, where ``attend(q [B,T,H,D], k [B,T,K,D],
        v [B,T,K,D]) -> (attn [B,T,H,D], extra)`` (rope applied to ``q`` and ``k``)."""
        c = self.config
        dt = jnp.dtype(c.dtype)
        x = packed.dense(jnp.concatenate([emb.astype(dt), features.astype(dt)], axis=-1),
                         self.fc)
        x, extra = block.decoder_block(self.layer, x, positions, c, attend)
        return block.rms_norm(x, self.out_norm.astype(dt), c.rms_norm_eps), extra

    def __call__(self, features, emb, positions):
        """Causal self-attention over the ``T`` pairs (parameter init, simple uses)."""
        return self.run(features, emb, positions, block.causal_attend)[0]


@struct.dataclass
class EagleState:
    """Draft cache (``L = 1``; ``lengths`` = the target's committed length) and ``next_feature
    [B, E]``, the predicted feature after the pending token (see the module docstring)."""

    cache: KVCache
    next_feature: jax.Array


def _scatter(kv: jax.Array, new: jax.Array, slots: jax.Array) -> jax.Array:
    """Writes ``new [B, T, K, D]`` at per-node slots ``int32[B, T]`` of layer 0 of ``kv``."""
    rows = jnp.broadcast_to(jnp.arange(slots.shape[0])[:, None], slots.shape)
    return kv.at[0, rows, :, slots].set(new.astype(kv.dtype), mode="drop")


# The drafter ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EagleDrafter(TargetReadout, DrafterBase):
    """Static configuration (hashable; a jit static argument). Build with :meth:`create`.

    Attributes:
      target: the target ``LlamaModel`` (frozen embedding / LM head, layer sizes).
      tree: ``static``: the candidate tree. ``dynamic``: the budget's shape (``budget + 1``
        nodes, depth ``min(depth, budget)``), which bounds every proposal.
      mode: ``"static"`` or ``"dynamic"``.
      top_k: dynamic: nodes expanded per depth, and children per expanded node.
      depth: dynamic: drafted depth.
      budget: dynamic: drafted nodes kept (root excluded).
      draft_vocab: 0 drafts over the whole vocabulary; ``N > 0`` only over token ids ``< N``
        (BPE ids roughly follow merge frequency), which makes each draft step's LM head
        ``V / N`` times cheaper. Lossless either way: verification is exact.
    """

    target: Any
    tree: DraftTree
    mode: str = "static"
    top_k: int = DEFAULT_TOP_K
    depth: int = DEFAULT_DEPTH
    budget: int = DEFAULT_BUDGET
    draft_vocab: int = 0

    name = "eagle"
    readout_subject = "the EAGLE layer is"  # for TargetReadout.check_compatible
    deterministic = True  # top-k drafts are point masses
    siblings = "without_replacement"  # siblings are distinct top-k tokens

    @classmethod
    def create(cls, target, tree: str = "static",
               choices: Optional[Sequence[Sequence[int]]] = None, top_k: int = DEFAULT_TOP_K,
               depth: int = DEFAULT_DEPTH, budget: int = DEFAULT_BUDGET,
               max_nodes: Optional[int] = DEFAULT_MAX_NODES, draft_vocab: int = 0,
               **fields) -> "EagleDrafter":
        """A static tree from Medusa-style ``choices`` (default :data:`DEFAULT_CHOICES`) or a
        dynamic tree of ``budget`` nodes; ``ValueError`` when over ``max_nodes`` (root
        included) or for impossible settings. ``fields``: a subclass's own fields."""
        if tree not in TREES:
            raise ValueError(f"unknown EAGLE tree {tree!r}; choose one of {', '.join(TREES)}")
        if tree == "static":
            return cls(target, heads.make_tree(choices, DEFAULT_CHOICES, max_nodes), "static",
                       draft_vocab=draft_vocab, **fields)
        if choices is not None:
            raise ValueError("choices apply to the static tree only; the dynamic tree is set "
                             "by top_k, depth and budget")
        if top_k < 1 or depth < 1 or budget < 1:
            raise ValueError(f"top_k, depth and budget must be >= 1, got {top_k}, {depth}, "
                             f"{budget}")
        pool = top_k + (depth - 1) * top_k * top_k
        if budget > pool:
            raise ValueError(f"budget {budget} exceeds the {pool} nodes drafted with top_k="
                             f"{top_k}, depth={depth}: lower the budget or raise top_k / depth")
        if max_nodes is not None and budget + 1 > max_nodes:
            raise ValueError(f"a dynamic tree of {budget + 1} nodes (root included) is over the "
                             f"budget {max_nodes}: lower --budget")
        d = min(depth, budget)
        width = budget - d + 1  # the shape: ``width`` depth-1 nodes, a chain under node 1
        chain = [1] + list(range(width + 1, width + d - 1)) if d > 1 else []
        shape = DraftTree.from_parents([-1] + [0] * width + chain)
        assert shape.max_depth == d and shape.num_nodes == budget + 1
        return cls(target, shape, "dynamic", top_k, depth, budget, draft_vocab, **fields)

    def __post_init__(self):
        if self.mode not in TREES:
            raise ValueError(f"unknown EAGLE tree {self.mode!r}; choose one of {TREES}")
        if self.tree.num_nodes < 2:
            raise ValueError("the tree drafts nothing: give it at least one non-root node")
        self.check_draft_vocab()

    # Sizes / params ----------------------------------------------------------------------------

    @property
    def module(self) -> EagleLayer:
        return EagleLayer(self.target.config)

    @property
    def pool_size(self) -> int:
        """``M``: drafted nodes per round before selection (static: the tree's)."""
        if self.mode == "static":
            return self.tree.num_nodes - 1
        return self.top_k + (self.depth - 1) * self.top_k * self.top_k

    def config_dict(self) -> dict:
        """The layer's architecture, stored with weights and checkpoints."""
        c = self.target.config
        return {"drafter": self.name, "hidden_size": c.hidden_size, "vocab_size": c.vocab_size,
                "num_heads": c.num_heads, "num_kv_heads": c.num_kv_heads,
                "head_dim": c.head_dim, "intermediate_size": c.intermediate_size}

    def init_params(self, key: jax.Array) -> dict:
        e = self.hidden_size
        z = jnp.zeros((1, 1, e), jnp.float32)
        return self.module.init(key, z, z, jnp.zeros((1, 1), jnp.int32))["params"]

    def param_shapes(self) -> dict:
        return jax.eval_shape(self.init_params, jax.random.key(0))

    # Hooks: what a subclass (EAGLE-3, drafters/eagle3.py) changes; identities for EAGLE-1 ---

    def layer_params(self, params):
        """The :class:`EagleLayer` params within the drafter's params."""
        return params

    def input_features(self, params, hidden: jax.Array) -> jax.Array:
        """The layer's input ``[..., E]`` from the target's features at committed positions."""
        return hidden

    def draft_scores(self, params, target_params, features: jax.Array) -> jax.Array:
        """What drafts are ranked by: ``float32[..., N]`` from predicted features."""
        return self.draft_logits(target_params, features)

    def target_ids(self, params, draft_ids: jax.Array) -> jax.Array:
        """Target token ids of drafted ids (indices into :meth:`draft_scores`)."""
        return draft_ids

    # One layer step (embed, logits, draft_logits, check_compatible: TargetReadout's) --------------

    def step(self, params, target_params, cache: KVCache, features, tokens, positions, slots,
             mask):
        """The layer on ``T`` query nodes over the draft cache.

        Args:
          features: ``[B, T, E]`` input features; tokens: ``int32[B, T]``;
          positions: ``int32[B, T]``; slots: ``int32[B, T]`` where their K/V are written;
          mask: ``bool[B, T, S]`` (after the write).
        Returns:
          ``(predicted features [B, T, E], cache)``; ``cache.lengths`` unchanged.
        """

        def write_and_attend(q, k, v):
            kc, vc = _scatter(cache.k, k, slots), _scatter(cache.v, v, slots)
            return block.attention(q, kc[0], vc[0], mask), (kc, vc)

        emb = self.embed(target_params, tokens)
        out, (kc, vc) = self.module.apply({"params": self.layer_params(params)}, features, emb,
                                          positions, write_and_attend, method=EagleLayer.run)
        return out, cache.replace(k=kc, v=vc)

    # Drafter contract --------------------------------------------------------------------------

    def init(self, params, ctx, prompt_tokens, prompt_lengths):
        """Prefills the draft cache with the prompt's pairs ``(f_s, x_{s+1})``, the features
        being the prefill's (``ctx.prompt_hidden``; recomputed by one extra prompt forward
        when a caller gives none), through :meth:`input_features`."""
        b, p = prompt_tokens.shape
        pos = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
        hidden = ctx.prompt_hidden
        if hidden is None:
            tcache = self.target.init_cache(b, p)
            out = self.target.forward(ctx.target_params, prompt_tokens, pos, tcache,
                                      masks.causal_mask(tcache.lengths, p, p),
                                      hidden_layers=self.feature_layers,
                                      logits_at=jnp.zeros((b, 1), jnp.int32))
            hidden = features_of(out, self.feature_layers)
        nxt = ctx.history[:, 1:p + 1]  # x_{s+1}; the pending token sits at prompt_lengths
        c = self.target.config
        cache = KVCache.init(1, b, c.num_kv_heads, ctx.cache.num_slots + self.pool_size + 1,
                             c.head_dim, jnp.dtype(c.dtype))
        out, cache = self.step(params, ctx.target_params, cache,
                               self.input_features(params, hidden), nxt, pos, pos,
                               masks.causal_mask(cache.lengths, p, cache.num_slots))
        last = jnp.maximum(prompt_lengths - 1, 0)[:, None, None]
        return EagleState(cache=cache.replace(lengths=jnp.asarray(prompt_lengths, jnp.int32)),
                          next_feature=jnp.take_along_axis(out, last, axis=1)[:, 0])

    def commit(self, params, state: EagleState, ctx, info):
        """Writes the accepted path's pairs ``(f, x_next)`` with the target's true features."""
        width = info.path.shape[1]  # the verified tree's depth + 1 (composed: maybe deeper)
        b = info.num_accepted.shape[0]
        acc = info.num_accepted
        path = info.path[:, :width]
        nodes = jnp.maximum(path, 0)
        feats = self.input_features(
            params, jnp.take_along_axis(info.verify_hidden, nodes[:, :, None], axis=1))
        idx = jnp.arange(width, dtype=jnp.int32)[None, :]
        child = jnp.concatenate([nodes[:, 1:], jnp.zeros((b, 1), jnp.int32)], axis=1)
        toks = jnp.where(idx < acc[:, None],
                         jnp.take_along_axis(info.proposal.tokens, child, axis=1),
                         info.next_token[:, None])
        cache = state.cache
        length = cache.lengths
        slots = length[:, None] + idx
        out, cache = self.step(params, ctx.target_params, cache, feats, toks, slots, slots,
                               masks.causal_mask(length, width, cache.num_slots))
        count = jnp.where(info.live, acc + 1, 0)
        nf = jnp.take_along_axis(out, acc[:, None, None], axis=1)[:, 0]
        return EagleState(cache=cache.replace(lengths=length + count),
                          next_feature=jnp.where(info.live[:, None], nf, state.next_feature))

    def propose(self, params, state: EagleState, ctx, key):
        del key
        if self.mode == "static":
            return self._propose_static(params, state, ctx), state, ctx.cache
        return self._propose_dynamic(params, state, ctx), state, ctx.cache

    def _propose_static(self, params, state, ctx):
        tree = self.tree
        b, t = ctx.pending.shape[0], tree.num_nodes
        length = state.cache.lengths
        tokens = jnp.zeros((b, t), jnp.int32).at[:, 0].set(ctx.pending)
        feats = jnp.zeros((b, t, self.hidden_size), state.next_feature.dtype)
        feats = feats.at[:, 0].set(state.next_feature)
        cache = state.cache
        for d, (expand, _, kids, slot, rank) in enumerate(tree.expansion_levels):
            if d > 0:  # run the layer on the expanded nodes: their inputs are parent features
                par = np.asarray(tree.parents)[expand]
                vis = jnp.asarray(tree.visible[expand][:, 1:])  # [Q, T-1] over scratch slots
                slots = length[:, None] + jnp.asarray(expand - 1)[None, :]
                out, cache = self.step(
                    params, ctx.target_params, cache, feats[:, par], tokens[:, expand],
                    jnp.broadcast_to(length[:, None] - 1 + d, slots.shape), slots,
                    masks.block_mask(length, vis, cache.num_slots))
                feats = feats.at[:, expand].set(out)
            logits = self.draft_scores(params, ctx.target_params, feats[:, expand])  # [B,Q,N]
            _, top = jax.lax.top_k(logits, int(rank.max()) + 1)
            tokens = tokens.at[:, kids].set(self.target_ids(params, top[:, slot, rank]))
        return Proposal(tokens=tokens)

    def _propose_dynamic(self, params, state, ctx):
        k, depth = self.top_k, self.depth
        b, m = ctx.pending.shape[0], self.pool_size
        rows = jnp.arange(b)[:, None]
        length = state.cache.lengths
        scores = self.draft_scores(params, ctx.target_params, state.next_feature)
        score, tok = jax.lax.top_k(jax.nn.log_softmax(scores, -1), k)  # [B, K]
        pool_tok = jnp.zeros((b, m), jnp.int32).at[:, :k].set(self.target_ids(params, tok))
        pool_par = jnp.full((b, m), -1, jnp.int32)
        pool_score = jnp.full((b, m), -jnp.inf, jnp.float32).at[:, :k].set(score)
        # Expanded frontier: pool index, input feature, visibility over pool slots.
        front = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (b, k))
        front_feat = jnp.broadcast_to(state.next_feature[:, None], (b, k, self.hidden_size))
        vis = jax.nn.one_hot(front, m, dtype=bool)  # [B, K, M]
        cache = state.cache
        base = k
        for d in range(1, depth):
            pos = jnp.broadcast_to(length[:, None] - 1 + d, (b, k))
            out, cache = self.step(params, ctx.target_params, cache, front_feat,
                                   pool_tok[rows, front], pos, length[:, None] + front,
                                   masks.block_mask(length, vis, cache.num_slots))
            logp = jax.nn.log_softmax(self.draft_scores(params, ctx.target_params, out), -1)
            child_lp, child_tok = jax.lax.top_k(logp, k)  # [B, K, K]
            child_tok = self.target_ids(params, child_tok)
            cum = pool_score[rows, front][:, :, None] + child_lp
            span = slice(base, base + k * k)
            pool_tok = pool_tok.at[:, span].set(child_tok.reshape(b, k * k))
            pool_par = pool_par.at[:, span].set(jnp.repeat(front, k, axis=1))
            pool_score = pool_score.at[:, span].set(cum.reshape(b, k * k))
            if d + 1 < depth:  # the next frontier: the best k of these k*k children
                _, best = jax.lax.top_k(cum.reshape(b, k * k), k)  # [B, K]
                parent_slot = best // k
                front = (base + best).astype(jnp.int32)
                front_feat = jnp.take_along_axis(out, parent_slot[:, :, None], axis=1)
                vis = (jnp.take_along_axis(vis, parent_slot[:, :, None], axis=1)
                       | jax.nn.one_hot(front, m, dtype=bool))
            base += k * k
        nodes, parents, valid = select_top_nodes(pool_score, pool_par, self.budget)
        tokens = jnp.concatenate([ctx.pending[:, None], pool_tok[rows, nodes]], axis=1)
        return Proposal(tokens=tokens, parents=parents, valid=valid)
