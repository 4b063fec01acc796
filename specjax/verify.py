"""The VERIFY and ACCEPT steps of a speculative round, and the static settings of acceptance.

* :func:`candidates`: a drafter's :class:`~specjax.drafter.Proposal` made explicit: every row's
  parents, depths, attention visibility and validity, node 0 set to the pending token.
* :func:`verify`: one target forward over the candidate nodes at positions
  ``lengths + depth`` under the tree mask; their K/V land in scratch slots ``lengths + node``.
  A drafter that opts in (``verify_widths``) is verified on the narrowest of a few static
  widths covering every live row's last valid node (a ``lax.switch``).
* :func:`accept`: the acceptance rule: lossless (greedy exact match, or the sampling rule that
  matches how the drafter drew its nodes) unless :class:`SpecConfig` asks for a LOSSY one.

Axis glossary: B batch rows, T candidate nodes, V vocabulary, E embedding width, L layers,
K kv heads, D head dim, S cache slots.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from specjax import accept as accept_lib
from specjax import adaptive, masks
from specjax import tree as tree_lib
from specjax.cache import KVCache
from specjax.drafter import Proposal, features_of
from specjax.model_api import ForwardOutput
from specjax.sampling import SamplingConfig

ACCEPTANCE_RULES = ("auto", "typical_lossy", "topk_lossy", "distance_lossy")


@dataclasses.dataclass(frozen=True)
class SpecConfig:
    """Static settings of speculative decoding on top of :class:`~specjax.decode.DecodeConfig`.

    Attributes:
      acceptance: ``"auto"`` picks the lossless rule (greedy exact match, or the sampling rule
        that matches how the drafter drew its nodes). The others are LOSSY (the output is NOT
        the target's): ``"typical_lossy"`` is Medusa's typical acceptance; ``"topk_lossy"`` and
        ``"distance_lossy"`` are blockwise parallel decoding's relaxed criteria (a draft passes
        when it is among the target's ``topk_k`` best tokens, or within ``max_distance`` ids of
        the target's argmax: ordinal vocabularies only).
      typical_epsilon, typical_delta: thresholds of typical acceptance.
      topk_k: the ``k`` of ``"topk_lossy"``.
      max_distance: the id distance of ``"distance_lossy"``.
    """

    acceptance: str = "auto"
    typical_epsilon: float = 0.09
    typical_delta: float = 0.3
    topk_k: int = 2
    max_distance: int = 1

    def __post_init__(self):
        if self.acceptance not in ACCEPTANCE_RULES:
            raise ValueError(f"unknown acceptance rule {self.acceptance!r}; choose one of "
                             f"{ACCEPTANCE_RULES}")
        if self.topk_k < 1:
            raise ValueError(f"topk_k must be >= 1, got {self.topk_k}")
        if self.max_distance < 0:
            raise ValueError(f"max_distance must be >= 0, got {self.max_distance}")

    @property
    def lossless(self) -> bool:
        return self.acceptance == "auto"


class Candidates(NamedTuple):
    """One round's candidate nodes, explicit for every row (a trace-time container).

    Attributes:
      proposal: the drafter's proposal with ``tokens[:, 0]`` set to the pending token.
      structure: the drafter's static :class:`~specjax.tree.DraftTree`, or ``parents`` of a
        dynamic tree (what the acceptance rules take).
      parents: ``int32[B, T]``; depth: ``int32[B or 1, T]`` position offsets;
      visible: ``bool[T, T]`` or ``bool[B, T, T]`` attention among the nodes;
      valid: ``bool[B, T]`` (all True when the drafter pads nothing).
    """

    proposal: Proposal
    structure: Any
    parents: jax.Array
    depth: jax.Array
    visible: jax.Array
    valid: jax.Array

    @property
    def tokens(self) -> jax.Array:
        return self.proposal.tokens

    @property
    def num_nodes(self) -> int:
        return self.proposal.tokens.shape[1]


def candidates(drafter, proposal: Proposal, pending: jax.Array) -> Candidates:
    """Normalises a proposal: the static tree's tables (or the dynamic tree's, derived from its
    parents), the drafter's depth / visibility overrides, and the pending token at node 0."""
    tree = drafter.tree
    b, t = proposal.tokens.shape
    if proposal.parents is None:
        parents = jnp.broadcast_to(jnp.asarray(tree.parents, jnp.int32), (b, t))
        depth = jnp.asarray(tree.depth, jnp.int32)[None]
        visible = jnp.asarray(tree.visible)
        structure = tree
    else:
        parents = proposal.parents
        depth = tree_lib.depths_from_parents(parents)
        visible = tree_lib.visibility_from_parents(parents, proposal.valid)
        structure = parents
    if proposal.depth is not None:
        depth = proposal.depth
    if proposal.visible is not None:
        visible = proposal.visible
    valid = jnp.ones((b, t), bool) if proposal.valid is None else proposal.valid
    proposal = proposal.replace(tokens=proposal.tokens.at[:, 0].set(pending))
    return Candidates(proposal, structure, parents, depth, visible, valid)


def verify(target, tparams, cand: Candidates, cache: KVCache, live: jax.Array,
           widths: tuple[int, ...], feature_layers: tuple = ()) -> ForwardOutput:
    """The target's forward over every row's candidate nodes.

    With one width (``(T,)``) all ``T`` nodes are run. With several (ascending, last = T) the
    forward runs on the narrowest width ``W`` covering every live row's last valid node
    (``W = 1`` when nobody drafted): a ``lax.switch`` over pre-sized forwards. Outputs of nodes
    past ``W`` (invalid, never accepted) are zero-padded to ``T`` and their scratch slots are
    left unwritten. The branches return only the ``W`` new K/V entries, written into the cache
    after the switch: a cache updated inside the branches was copied (measured: +40% per round
    at batch 8 on the CPU).

    Returns:
      logits ``[B, T, V]``, hidden ``[B, T, E]`` (with ``feature_layers``, those layers'
      outputs concatenated, ``[B, T, n * E]``: :func:`specjax.drafter.features_of`) and the
      cache with the nodes' entries at ``lengths + node`` (lengths unchanged).
    """
    lengths = cache.lengths
    positions = tree_lib.positions(lengths, cand.depth)
    # Structured mask: a model may run its tree-attention kernel on it, or densify it.
    mask = masks.TreeMask.create(lengths, cand.visible, cache.num_slots)
    tokens, num_nodes = cand.tokens, cand.num_nodes
    def forward(w):
        o = target.forward(tparams, tokens[:, :w], positions[:, :w], cache,
                           mask if w == num_nodes else mask.first(w),
                           hidden_layers=feature_layers)
        return o.replace(hidden=features_of(o, feature_layers), taps=None)

    if len(widths) == 1:
        return forward(num_nodes)
    b = tokens.shape[0]
    node = jnp.arange(num_nodes, dtype=jnp.int32)[None, :]
    slots = lengths[:, None] + node  # [B, T] scratch slot of every node
    rows = jnp.arange(b)[:, None]

    def verify_on(w):
        def run(_):
            o = forward(w)
            pad = lambda x: jnp.pad(x, [(0, 0), (0, num_nodes - w)]  # noqa: E731
                                    + [(0, 0)] * (x.ndim - 2))
            read = jnp.minimum(slots, cache.num_slots - 1)
            # [B, T, L, K, D] (advanced indices first); entries past W are never written.
            return (pad(o.logits), pad(o.hidden), o.cache.k[:, rows, :, read],
                    o.cache.v[:, rows, :, read])
        return run

    last_valid = jnp.max(jnp.where(cand.valid & live[:, None], node, 0))
    branch = jnp.sum(jnp.asarray(widths[:-1], jnp.int32) <= last_valid)  # first W > last
    logits, hidden, new_k, new_v = jax.lax.switch(branch, [verify_on(w) for w in widths], None)
    width = jnp.asarray(widths, jnp.int32)[branch]
    dst = jnp.where(node < width, slots, cache.num_slots)  # out of range: dropped
    return ForwardOutput(logits=logits, hidden=hidden, cache=cache.replace(
        k=cache.k.at[:, rows, :, dst].set(new_k, mode="drop"),
        v=cache.v.at[:, rows, :, dst].set(new_v, mode="drop")))


def verify_widths(drafter, proposal: Proposal) -> tuple[int, ...]:
    """The static widths :func:`verify` may use: all nodes when the drafter pads nothing,
    else what the drafter opts into (:func:`specjax.adaptive.verify_widths_of`)."""
    num_nodes = proposal.tokens.shape[1]
    if proposal.valid is None:
        return (num_nodes,)
    return adaptive.verify_widths_of(drafter, num_nodes)


def accept(drafter, cand: Candidates, logits: jax.Array, sampling: SamplingConfig,
           spec: SpecConfig, key: jax.Array) -> accept_lib.AcceptResult:
    """Picks and runs the acceptance rule: lossless unless ``spec`` asks for a lossy one."""
    tokens, structure, valid = cand.tokens, cand.structure, cand.proposal.valid
    if spec.acceptance == "typical_lossy":
        return accept_lib.typical_acceptance_lossy(
            key, tokens, structure, logits, sampling, valid,
            epsilon=spec.typical_epsilon, delta=spec.typical_delta)
    if spec.acceptance == "topk_lossy":
        return accept_lib.topk_acceptance_lossy(key, tokens, structure, logits, sampling, valid,
                                                top_k=spec.topk_k)
    if spec.acceptance == "distance_lossy":
        return accept_lib.distance_acceptance_lossy(key, tokens, structure, logits, sampling,
                                                    valid, max_distance=spec.max_distance)
    if sampling.greedy:
        return accept_lib.greedy(tokens, structure, logits, valid)
    draft_probs = cand.proposal.draft_probs
    if drafter.deterministic or draft_probs is None:
        return accept_lib.deterministic(key, tokens, structure, logits, sampling, valid)
    return accept_lib.speculative_sampling(key, tokens, structure, logits, draft_probs, sampling,
                                           valid, siblings=drafter.siblings)
