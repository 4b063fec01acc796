"""Adaptive draft length and verification widths that follow the drafts.

Three pieces, all lossless (they only change which draft nodes are offered and how wide the
verification forward runs, never how a node is accepted):

* :func:`verify_widths_of`: the small static set of widths ``W`` the speculative loop may run
  its verification forward on (``lax.switch`` over pre-sized forwards). Each round uses the
  narrowest ``W`` that covers every live row's last valid node; nodes past ``W`` are invalid,
  never accepted, and cost nothing.
* :class:`AdaptiveDraftLength`: a drafter wrapper that keeps a per-row draft depth ``k[b]`` on
  the device, updated in ``commit`` from that row's acceptance, and marks nodes deeper than
  ``k[b]`` invalid. Nodes are in BFS order, so the nodes of depth <= k are a prefix of the
  node index: shorter drafts mean narrower verification.
* :func:`max_draft_len_for_batch`: the host-side static cap on the draft length from the batch
  size, so that one verification forward stays within a token budget ``B * (k + 1)``.

Why the per-row policy (``policy="acceptance"``): the published adaptive-length methods (SpecDec++,
DISCO, AdaEAGLE; SEEDS.md F8) predict when a draft will be rejected with a trained head or
classifier, which a drafter-agnostic wrapper cannot have. The signal every drafter does give is
the row's own acceptance in the previous round, and acceptance is strongly autocorrelated
(copy runs for prompt lookup, formulaic text for model drafters). So the rule is additive
growth, fast shrink: if a row accepted every token up to its cap, ``k += grow`` (probe for
longer runs); if a draft was rejected after ``n`` accepted tokens, ``k = min(k - 1, n + 1)``
(the next round offers about what the last one accepted: a single-sample version of SpecDec++'s
"stop where a rejection becomes likely"); rounds in which the row offered nothing (no match) or
stopped short of its cap on its own leave ``k`` unchanged. Always ``min_draft_len <= k <=
max_draft_len``.

Why the batch cap (:func:`default_token_budget`: 8 tokens per verification forward on CPU, 16
elsewhere): on the 2-core development CPU a SmolLM2-135M forward over n tokens costs about 60 /
61 / 78 / 126 / 136 / 259 ms for n = 1 / 2 / 4 / 8 / 16 / 32 (PERF_NOTES.md): up to ~16 tokens
the weights' memory traffic dominates and extra tokens are cheap, past it the cost grows
linearly with n (compute bound), so verifying ``B * (k + 1)`` tokens only pays while it stays
near 16. The batched
benchmark (``experiments/benchmark_batch.py``, WORKSPACE.md "Batched serving") measures it:
at batch 8 a round verifying 2 tokens per row (16 in all) cost ~1.47 plain steps on that CPU
(2026-11-30), so no drafter below tau ~1.5 gained there and the CPU default is 8 (batch 8 and
up decode plainly). 16 for GPUs and TPUs is the earlier estimate, not measured on one.

Axis glossary: B batch rows, T candidate nodes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import struct

from specjax import tree as tree_lib
from specjax.drafter import CommitInfo, DraftContext, DrafterBase, Proposal

POLICIES = ("acceptance", "static")
DEFAULT_TOKEN_BUDGET = 16  # GPU / TPU: not measured on one (the module docstring)
CPU_TOKEN_BUDGET = 8  # measured on the 2-core development CPU


def default_token_budget(backend: Optional[str] = None) -> int:
    """The batch cap's default tokens per verification forward on ``backend`` (``"cpu"``,
    ``"gpu"``, ``"tpu"``; default: ``jax.default_backend()``)."""
    backend = jax.default_backend() if backend is None else backend
    return CPU_TOKEN_BUDGET if backend == "cpu" else DEFAULT_TOKEN_BUDGET


def default_verify_widths(num_nodes: int) -> tuple[int, ...]:
    """Powers of two ``p`` with ``2p <= T``, then ``T`` itself: ``T=9 -> (1, 2, 4, 9)``.

    Each width is one more compiled forward inside the loop; widths closer than 2x apart save
    little on the CPU (a forward's cost is nearly flat below ~16 tokens).
    """
    if num_nodes < 1:
        raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
    widths, w = [], 1
    while 2 * w <= num_nodes:
        widths.append(w)
        w *= 2
    return tuple(widths) + ((num_nodes,) if not widths or widths[-1] != num_nodes else ())


def check_verify_widths(widths, num_nodes: int) -> tuple[int, ...]:
    """Validates explicit widths: strictly ascending integers in ``[1, T]`` ending with ``T``.

    Raises:
      ValueError: saying what a valid set looks like.
    """
    widths = tuple(int(w) for w in widths)
    if (not widths or widths[-1] != num_nodes or widths[0] < 1
            or any(a >= b for a, b in zip(widths, widths[1:]))):
        raise ValueError(f"verify_widths must be strictly ascending widths in [1, {num_nodes}] "
                         f"ending with the node count {num_nodes}, got {widths}; e.g. "
                         f"{default_verify_widths(num_nodes)}")
    return widths


def verify_widths_of(drafter, num_nodes: int) -> tuple[int, ...]:
    """The static verification widths the loop may use for ``drafter`` (ascending, last = T).

    From the contract attribute ``drafter.verify_widths`` (:class:`specjax.drafter.Drafter`):
    None gives ``(T,)``; ``"auto"`` :func:`default_verify_widths`; a tuple is validated.
    Drafters whose invalid nodes must still be computed (the lookahead window, Jacobi's
    refinement from every node's logits) keep None.
    """
    widths = drafter.verify_widths
    if widths is None:
        return (num_nodes,)
    if isinstance(widths, str):
        if widths != "auto":
            raise ValueError(f"verify_widths must be 'auto' or a tuple of widths, got {widths!r}")
        return default_verify_widths(num_nodes)
    return check_verify_widths(widths, num_nodes)


def max_draft_len_for_batch(batch_size: int, draft_len: int,
                            token_budget: Optional[int] = None) -> int:
    """Host-side static cap: the largest ``k <= draft_len`` with ``B * (k + 1) <= budget``.

    ``token_budget`` None: :func:`default_token_budget`. With 16: ``B = 1, 2, 4, 8, 16, 32 -> k
    <= 15, 7, 3, 1, 0, 0``; with 8 (CPU): ``k <= 7, 3, 1, 0, 0, 0``. A cap of
    0 means speculation does not pay at this batch size: run plain decoding (or the wrapper with
    ``max_draft_len=0``, which verifies one token per row per round).
    """
    token_budget = default_token_budget() if token_budget is None else token_budget
    if batch_size < 1 or draft_len < 0 or token_budget < 1:
        raise ValueError(f"need batch_size >= 1, draft_len >= 0 and token_budget >= 1, got "
                         f"{batch_size}, {draft_len}, {token_budget}")
    return max(0, min(draft_len, token_budget // batch_size - 1))


@struct.dataclass
class AdaptiveState:
    inner: Any  # the wrapped drafter's state
    draft_len: jax.Array  # int32[B] current per-row draft depth k


def _node_depths(tree, proposal: Proposal, batch: int) -> jax.Array:
    """``int32[B, T]`` candidate depth of every node (from the parents, not the position
    offsets a drafter may override for non-candidate nodes)."""
    if proposal.parents is None:
        return jnp.broadcast_to(jnp.asarray(tree.depth, jnp.int32)[None],
                                (batch, tree.num_nodes))
    return tree_lib.depths_from_parents(proposal.parents)


@dataclasses.dataclass(frozen=True)
class AdaptiveDraftLength(DrafterBase):
    """Wraps any drafter; offers each row only its nodes of depth <= ``k[b]``.

    Attributes:
      inner: the wrapped drafter (chain or tree; any drafter of the contract).
      policy: ``"acceptance"`` (per-row ``k`` from acceptance, see the module docstring) or
        ``"static"`` (``k = max_draft_len`` for every row: only the cap applies).
      max_draft_len: the cap (``None`` = the inner tree's depth); at most that depth.
      min_draft_len: the floor of ``k`` under ``"acceptance"``, >= 1 (a row at 0 would never
        draft again, so nothing could make it grow); capped at ``max_draft_len``.
      grow: added to ``k`` when a row accepted every token up to its cap.
      narrow_verify: let the loop verify on the narrowest width covering the offered nodes
        (:func:`default_verify_widths` of the inner tree). None (default): narrow unless the
        inner drafter ``reads_unoffered_outputs`` (lookahead, Jacobi), which must be verified at
        full width (True is then a ValueError).

    The inner drafter still drafts its full length (a wrapper cannot shorten a draft model's
    loop): for model-based drafters also build the inner with the cap as its draft length.
    """

    inner: Any
    policy: str = "acceptance"
    max_draft_len: Optional[int] = None
    min_draft_len: int = 1
    grow: int = 1
    narrow_verify: Optional[bool] = None

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"unknown adaptive policy {self.policy!r}; choose one of {POLICIES}")
        depth = self.inner.tree.max_depth
        cap = depth if self.max_draft_len is None else int(self.max_draft_len)
        if not 0 <= cap <= depth:
            raise ValueError(f"max_draft_len must be in [0, {depth}] (the inner drafter's depth), "
                             f"got {self.max_draft_len}")
        if self.min_draft_len < 1:
            raise ValueError(f"min_draft_len must be >= 1, got {self.min_draft_len}")
        if self.grow < 1:
            raise ValueError(f"grow must be >= 1, got {self.grow}")
        object.__setattr__(self, "max_draft_len", cap)
        reads = self.inner.reads_unoffered_outputs
        if self.narrow_verify and reads:
            raise ValueError(f"{type(self.inner).__name__} reads the verification outputs of "
                             "nodes it did not offer: it must be verified at full width "
                             "(narrow_verify=False or None)")
        object.__setattr__(self, "narrow_verify", not reads if self.narrow_verify is None
                           else bool(self.narrow_verify))

    # The contract's static attributes come from the inner drafter.
    @property
    def tree(self):
        return self.inner.tree

    @property
    def deterministic(self) -> bool:
        return self.inner.deterministic

    @property
    def siblings(self) -> str:
        return self.inner.siblings

    @property
    def verify_widths(self):
        return "auto" if self.narrow_verify else None

    @property
    def reads_unoffered_outputs(self) -> bool:
        return self.inner.reads_unoffered_outputs

    @property
    def feature_layers(self) -> tuple:
        return self.inner.feature_layers

    @property
    def commits_any_proposal(self) -> bool:
        return self.inner.commits_any_proposal

    def check_compatible(self, target) -> None:
        self.inner.check_compatible(target)

    def init(self, params, ctx: DraftContext, prompt_tokens, prompt_lengths) -> AdaptiveState:
        inner = self.inner.init(params, ctx, prompt_tokens, prompt_lengths)
        k = jnp.full((prompt_tokens.shape[0],), self.max_draft_len, jnp.int32)
        return AdaptiveState(inner=inner, draft_len=k)

    def propose(self, params, state: AdaptiveState, ctx: DraftContext, key):
        proposal, inner, cache = self.inner.propose(params, state.inner, ctx, key)
        b, t = proposal.tokens.shape
        valid = jnp.ones((b, t), bool) if proposal.valid is None else proposal.valid
        depth = _node_depths(self.tree, proposal, b)
        valid = valid & (depth <= state.draft_len[:, None])
        return proposal.replace(valid=valid), state.replace(inner=inner), cache

    def commit(self, params, state: AdaptiveState, ctx: DraftContext, info: CommitInfo
               ) -> AdaptiveState:
        inner = self.inner.commit(params, state.inner, ctx, info)
        k = state.draft_len
        if self.policy == "acceptance":
            b = k.shape[0]
            depth = _node_depths(self.tree, info.proposal, b)
            offered = jnp.max(jnp.where(info.proposal.valid, depth, 0), axis=1)  # deepest node
            n = info.num_accepted
            grown = jnp.minimum(k + self.grow, self.max_draft_len)
            floor = min(self.min_draft_len, self.max_draft_len)
            shrunk = jnp.maximum(jnp.minimum(k - 1, n + 1), floor)
            new = jnp.where(n >= k, grown, jnp.where(n < offered, shrunk, k))
            k = jnp.where(info.live & (offered > 0), new, k)
        return state.replace(inner=inner, draft_len=k)


def for_batch(inner, batch_size: int, token_budget: Optional[int] = None,
              policy: str = "acceptance", **kwargs) -> AdaptiveDraftLength:
    """:class:`AdaptiveDraftLength` with the batch-size cap :func:`max_draft_len_for_batch`."""
    cap = max_draft_len_for_batch(batch_size, inner.tree.max_depth, token_budget)
    return AdaptiveDraftLength(inner, policy=policy, max_draft_len=cap, **kwargs)
