"""The drafter contract: what every drafter gives the speculative loop and gets back from it.

A drafter is a frozen, hashable dataclass of static configuration (a jit static argument) with
three pure methods, all traced inside the loop's ``lax.while_loop``:

* ``init(params, ctx, prompt) -> state``: build the drafter's own state from the prefill
  (e.g. prefill a draft model's cache, or nothing).
* ``propose(params, state, ctx, key) -> (Proposal, state, target_cache)``: candidate nodes for
  every row. Node 0 is always the pending token. May write scratch entries of the target cache
  (self-speculative drafters run the target's own layers) and returns that cache.
* ``commit(params, state, ctx, result) -> state``: update after acceptance (roll back a draft
  cache, record features, update n-gram pools).

Drafters subclass :class:`DrafterBase` (the contract's defaults: stateless, point-mass
drafts, full-width verification); the loops check a drafter with :func:`check_drafter` before
tracing. Drafters live in ``drafters/``; specjax only knows this contract.

Axis glossary: B batch rows, T candidate nodes (static budget), V vocab, E embed, H history slots.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol

import jax
import jax.numpy as jnp
from flax import struct

from specjax.cache import KVCache
from specjax.tree import DraftTree

DrafterState = Any  # each drafter's own pytree


@struct.dataclass
class Proposal:
    """Candidate nodes of one round.

    Attributes:
      tokens: int32[B, T]; ``tokens[:, 0]`` is the pending token.
      parents: int32[B, T] parent node of each node (``-1`` for node 0); valid nodes satisfy
        ``parents[n] < n`` (BFS order among valid nodes; invalid nodes, e.g. lookahead windows,
        may have parent -1 and any depth). ``None`` when the drafter's static ``tree`` applies.
      valid: bool[B, T] padding mask (invalid nodes are ignored by verification), or None.
      draft_probs: float32[B, T, V] the distribution each node's token was drawn from, or None
        for deterministic drafts (point masses: verified with the deterministic-draft rule).
      depth: int32[B, T] position offsets (``position = lengths + depth``) overriding the tree's
        depths, or None. For nodes that are computed but never candidates (lookahead windows).
      visible: bool[B, T, T] attention among the nodes, overriding the tree's ancestor-or-self
        visibility, or None. Candidate nodes must still see exactly their ancestors.
    """

    tokens: jax.Array
    parents: Optional[jax.Array] = None
    valid: Optional[jax.Array] = None
    draft_probs: Optional[jax.Array] = None
    depth: Optional[jax.Array] = None
    visible: Optional[jax.Array] = None


@struct.dataclass
class DraftContext:
    """What the loop tells a drafter at each call (read-only except the target cache).

    Attributes:
      target_params: the target model's parameters (self-speculative drafters, shared heads).
      cache: the target's KV cache (committed ``lengths``; scratch past them).
      history: int32[B, H] every token of each row so far: prompt, emitted tokens, pending last.
      history_len: int32[B] number of valid entries of ``history`` (pending is at ``-1``).
      pending: int32[B] the pending token (root of this round's candidates).
      pending_hidden: [B, E] the target's final hidden state at the node that produced
        ``pending`` (draft heads read it).
      done: bool[B] rows that have finished (their proposals are ignored).
      prompt_hidden: [B, P, E] the target's final hidden states at every prompt position (the
        prefill's), given to ``init`` only (None in ``propose`` / ``commit``): feature-based
        drafters build their state from it without a second prompt forward.

    Features: ``pending_hidden``, ``prompt_hidden`` and ``CommitInfo.verify_hidden`` hold the
    target's final-norm hidden state (width ``E``), unless the drafter names
    ``feature_layers``: then they hold the residual stream after each of those layers,
    concatenated in that order (width ``len(feature_layers) * E``; see :func:`features_of`).
    """

    target_params: Any
    cache: KVCache
    history: jax.Array
    history_len: jax.Array
    pending: jax.Array
    pending_hidden: jax.Array
    done: jax.Array
    prompt_hidden: Optional[jax.Array] = None


@struct.dataclass
class CommitInfo:
    """What the loop tells a drafter after acceptance.

    Attributes:
      proposal: the proposal that was verified.
      path: int32[B, D+1] accepted node indices (``path[:, 0] == 0``), see ``specjax.accept``.
      num_accepted: int32[B] accepted draft tokens (root excluded).
      next_token: int32[B] the new pending token.
      new_lengths: int32[B] the target cache's committed length after this round.
      verify_hidden: [B, T, E] the target's final hidden states at every node (the drafter's
        features, see :class:`DraftContext`).
      live: bool[B] rows that took part in this round.
      verify_logits: float32[B, T, V] the target's logits at every node (raw, unprocessed).
    """

    proposal: Proposal
    path: jax.Array
    num_accepted: jax.Array
    next_token: jax.Array
    new_lengths: jax.Array
    verify_hidden: jax.Array
    live: jax.Array
    verify_logits: Optional[jax.Array] = None


class Drafter(Protocol):
    """Static drafter configuration with pure ``init`` / ``propose`` / ``commit``.

    Every attribute below is part of the contract and is read directly by the loop (no
    ``getattr`` fallbacks): drafters subclass :class:`DrafterBase`, which supplies the defaults.

    Attributes:
      tree: the static candidate structure (``specjax.tree.DraftTree``), or for dynamic trees
        the node budget's shape (its ``num_nodes`` and ``max_depth`` bound the proposal).
      deterministic: True when drafted tokens are point masses (no ``draft_probs``).
      siblings: how sibling nodes were drawn, for sampling verification: ``"iid"`` or
        ``"without_replacement"`` (chains: either).
      verify_widths: None (every round verifies all T nodes), ``"auto"`` (the loop runs the
        verification forward on the narrowest of :func:`specjax.adaptive.default_verify_widths`
        covering every live row's last valid node) or an explicit ascending tuple ending with T.
        Only for drafters whose invalid nodes need no forward.
      reads_unoffered_outputs: True when ``commit`` reads the verification outputs (logits,
        hidden states) of nodes the drafter marked invalid (Jacobi's refinement, lookahead's
        window): such a drafter must be verified at full width, and a wrapper that narrows
        verification (``specjax.adaptive.AdaptiveDraftLength``) must not.
      feature_layers: ``()`` (the drafter reads the final-norm hidden state, if anything) or
        the target layers whose outputs the drafter reads (EAGLE-3's low / middle / high
        taps): the prefill and every verification forward then return those layers' outputs
        at every position, concatenated (:func:`features_of`).
      commits_any_proposal: True when ``commit`` learns correctly from any verified proposal
        (``CommitInfo.proposal`` may then be a combinator's, with other nodes, more of them and
        a deeper path than the drafter's own tree: ``drafters.compose``); False when the
        drafter's state assumes that it proposed what was verified (a draft model whose cache
        holds its own drafted tokens).
    """

    tree: Any
    deterministic: bool
    siblings: str
    verify_widths: Optional[Any]
    reads_unoffered_outputs: bool
    feature_layers: tuple
    commits_any_proposal: bool

    def check_compatible(self, target) -> None:
        """Raises ValueError (saying what to do) if this drafter cannot serve ``target``."""
        ...

    def init(self, params, ctx: DraftContext, prompt_tokens: jax.Array,
             prompt_lengths: jax.Array) -> DrafterState: ...

    def propose(self, params, state: DrafterState, ctx: DraftContext, key: jax.Array
                ) -> tuple[Proposal, DrafterState, KVCache]: ...

    def commit(self, params, state: DrafterState, ctx: DraftContext, info: CommitInfo
               ) -> DrafterState: ...


class DrafterBase:
    """Defaults of the :class:`Drafter` contract, for drafters to subclass.

    A drafter is a frozen dataclass deriving from this class; it must give ``tree`` and
    ``propose`` and may override the rest: stateless ``init`` / ``commit``, point-mass drafts
    (``deterministic = True``) with distinct siblings, full-width verification, no reads of
    unoffered nodes, a ``commit`` that follows any verified proposal, and no compatibility
    condition on the target.
    """

    deterministic = True
    siblings = "without_replacement"
    verify_widths = None
    reads_unoffered_outputs = False
    feature_layers = ()
    commits_any_proposal = True

    def check_compatible(self, target) -> None:
        del target

    def init(self, params, ctx: DraftContext, prompt_tokens: jax.Array,
             prompt_lengths: jax.Array) -> DrafterState:
        return ()

    def commit(self, params, state: DrafterState, ctx: DraftContext, info: CommitInfo
               ) -> DrafterState:
        return state


class SampledChainDrafter(DrafterBase):
    """Defaults of a drafter that drafts a chain of ``chain_length`` tokens, each drawn from its
    own distribution under the decoding's sampling settings (``self.sampling``, a
    :class:`~specjax.sampling.SamplingConfig` field): point masses when greedy, otherwise draws
    whose exact ``q`` goes into ``Proposal.draft_probs`` (see :func:`specjax.sampling.draw`).
    ``chain_length`` is the ``draft_len`` field unless a subclass says otherwise."""

    siblings = "iid"  # a chain: either rule is standard speculative sampling

    @property
    def chain_length(self) -> int:
        return self.draft_len

    @property
    def deterministic(self) -> bool:
        return self.sampling.greedy

    @property
    def tree(self) -> DraftTree:
        return DraftTree.chain(self.chain_length)


CONTRACT_ATTRIBUTES = ("tree", "deterministic", "siblings", "verify_widths",
                       "reads_unoffered_outputs", "feature_layers", "commits_any_proposal",
                       "check_compatible", "init",
                       "propose", "commit")


def check_drafter(drafter) -> None:
    """Raises TypeError naming what is missing when ``drafter`` does not implement the contract
    (checked on the host before a loop is traced)."""
    missing = [a for a in CONTRACT_ATTRIBUTES if not hasattr(drafter, a)]
    if missing:
        raise TypeError(f"{type(drafter).__name__} does not implement the drafter contract: "
                        f"missing {', '.join(missing)}; subclass specjax.drafter.DrafterBase")


def features_of(out, feature_layers: tuple) -> jax.Array:
    """The drafter's features from a forward's :class:`~specjax.model_api.ForwardOutput` run
    with ``hidden_layers=feature_layers``: ``out.hidden [B, T, E]`` when ``feature_layers`` is
    empty, else the taps concatenated along the last axis ``[B, T, n * E]``."""
    if not feature_layers:
        return out.hidden
    taps = out.taps  # [n, B, T, E]
    return jnp.concatenate([taps[i] for i in range(taps.shape[0])], axis=-1)
