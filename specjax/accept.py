"""Acceptance rules: which drafted nodes to keep, and the token that follows them.

Axis glossary: B batch rows, T tree nodes, V vocabulary, D maximum draft depth.

Common inputs of every rule:

* ``tokens int32[B, T]``: node tokens; node 0 is the root (the pending token, not verified).
* ``parents``: a static :class:`~specjax.tree.DraftTree` (chain or tree) or ``int32[B, T]`` parents
  of dynamic trees, with ``valid bool[B, T]`` marking the real nodes (padding is never accepted).
* ``logits float32[B, T, V]``: ``logits[b, n]`` is the target's prediction for a *child* of node
  ``n``; the target distribution there is ``processed_probs(logits[b, n], config)``.

Every rule returns an :class:`AcceptResult`. Lossless rules: :func:`greedy` (temperature 0),
:func:`speculative_sampling` (drafts sampled from explicit ``q``; i.i.d. or without-replacement
siblings) and :func:`deterministic` (point-mass drafts). :func:`typical_acceptance_lossy` is
Medusa's typical acceptance and does NOT preserve the target distribution.

The sampling rules share :func:`rejection_walk`, which takes the acceptance uniforms as an
argument: tests integrate over them exactly, production code draws them from a key.
"""

from __future__ import annotations

from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from specjax.sampling import SamplingConfig, processed_probs, sample_probs
from specjax.tree import DraftTree, visibility_from_parents

Structure = Union[DraftTree, jax.Array, np.ndarray]
SIBLING_MODES = ("iid", "without_replacement", "deterministic")


@struct.dataclass
class AcceptResult:
    """The outcome of one verification step.

    Attributes:
      path: ``int32[B, D + 1]`` node indices of the accepted root path: ``path[:, 0] == 0``, then
        the accepted nodes by depth; entries past ``num_accepted`` are -1.
      num_accepted: ``int32[B]`` accepted draft tokens (root excluded).
      next_token: ``int32[B]`` the bonus / correction token drawn at the last accepted node.
      emitted: ``int32[B, D + 1]`` the accepted draft tokens followed by ``next_token``
        (``num_accepted + 1`` entries), then -1.
    """

    path: jax.Array
    num_accepted: jax.Array
    next_token: jax.Array
    emitted: jax.Array


@struct.dataclass
class WalkResult:
    """The state a :func:`rejection_walk` ends in (before the final token is drawn).

    Attributes:
      final_node: ``int32[B]`` the last accepted node (0 when nothing was accepted).
      residual: ``float32[B, V]`` the distribution the next token must be drawn from: the target
        at ``final_node`` after removing every rejected child (the full target if none).
      accept_prob: ``float32[B, T]`` for every tried node, its acceptance probability given that
        it was tried (``min(1, p_i(c) / q_i(c))``); 0 for untried nodes, 1 for the root.
      tried: ``bool[B, T]`` nodes whose acceptance test ran.
      accepted: ``bool[B, T]`` nodes on the accepted path (root included).
    """

    final_node: jax.Array
    residual: jax.Array
    accept_prob: jax.Array
    tried: jax.Array
    accepted: jax.Array


def tree_arrays(parents: Structure, valid: Optional[jax.Array], batch: int,
                num_nodes: int) -> tuple[jax.Array, jax.Array, int]:
    """Normalizes a structure to ``(parents int32[B, T], valid bool[B, T], max_depth)``.

    A :class:`DraftTree` is broadcast over the batch (``max_depth`` = the tree's); dynamic
    ``parents`` get ``max_depth = T - 1`` and all-True ``valid`` when none is given.
    """
    if isinstance(parents, DraftTree):
        if parents.num_nodes != num_nodes:
            raise ValueError(f"tree has {parents.num_nodes} nodes but tokens have {num_nodes}")
        tree_parents, tree_valid = parents.arrays(batch)
        if valid is not None:
            tree_valid = jnp.asarray(valid, bool) & tree_valid
        return jnp.asarray(tree_parents), jnp.asarray(tree_valid), parents.max_depth
    parents = jnp.asarray(parents, jnp.int32)
    if parents.shape != (batch, num_nodes):
        raise ValueError(f"parents must be [B, T] = {(batch, num_nodes)}, got {parents.shape}")
    valid = jnp.ones((batch, num_nodes), bool) if valid is None else jnp.asarray(valid, bool)
    return parents, valid, num_nodes - 1


def _root_path(parents: jax.Array, final: jax.Array, max_depth: int) -> tuple[jax.Array, jax.Array]:
    """``(path int32[B, D + 1], num_accepted int32[B])`` from the last accepted node."""
    num_nodes = parents.shape[1]
    chain = [final]  # final, parent(final), ..., -1 padding once past the root
    for _ in range(max_depth):
        node = chain[-1]
        up = jnp.take_along_axis(parents, jnp.clip(node, 0, num_nodes - 1)[:, None], 1)[:, 0]
        chain.append(jnp.where(node > 0, up, -1))
    chain = jnp.stack(chain, axis=1)  # [B, D + 1]
    num_accepted = jnp.sum(chain >= 0, axis=1).astype(jnp.int32) - 1
    # The node at depth d sits at chain[num_accepted - d].
    slot = num_accepted[:, None] - jnp.arange(max_depth + 1)[None, :]
    path = jnp.take_along_axis(chain, jnp.clip(slot, 0, max_depth), axis=1)
    return jnp.where(slot >= 0, path, -1).astype(jnp.int32), num_accepted


def _result(tokens: jax.Array, parents: jax.Array, final: jax.Array, next_token: jax.Array,
            max_depth: int) -> AcceptResult:
    path, num_accepted = _root_path(parents, final, max_depth)
    drafted = jnp.take_along_axis(tokens, jnp.clip(path[:, 1:], 0), axis=1)  # [B, D]
    drafted = jnp.concatenate([drafted, jnp.full_like(drafted[:, :1], -1)], axis=1)
    slots = jnp.arange(max_depth + 1)[None, :]
    emitted = jnp.where(slots < num_accepted[:, None], drafted,
                        jnp.where(slots == num_accepted[:, None], next_token[:, None], -1))
    return AcceptResult(path=path, num_accepted=num_accepted,
                        next_token=next_token.astype(jnp.int32), emitted=emitted.astype(jnp.int32))


def _deepest(ok: jax.Array, parents: jax.Array, valid: jax.Array, max_depth: int) -> jax.Array:
    """``int32[B]``: the deepest node whose whole root path passes ``ok`` (lowest index among
    ties)."""
    vis = visibility_from_parents(parents, valid)  # [B, T, T]
    ok = ok.at[:, 0].set(True) & valid.at[:, 0].set(True)
    # vis[:, n, 0] is False below a padding node: such nodes are cut off from the root.
    on_path_ok = jnp.all(jnp.where(vis, ok[:, None, :], True), axis=2) & vis[:, :, 0]  # [B, T]
    depth = jnp.sum(vis, axis=2) - 1
    score = jnp.where(on_path_ok & (depth <= max_depth), depth, -1)
    return jnp.argmax(score, axis=1).astype(jnp.int32)


def _parent_rows(values: jax.Array, parents: jax.Array) -> jax.Array:
    """``values[b, parents[b, n]]`` for ``values [B, T, ...]`` (the root reads itself)."""
    index = jnp.clip(parents, 0).reshape(parents.shape + (1,) * (values.ndim - 2))
    return jnp.take_along_axis(values, index, axis=1)


def greedy(tokens: jax.Array, parents: Structure, logits: jax.Array,
           valid: Optional[jax.Array] = None) -> AcceptResult:
    """Exact-match verification (V-G): identical to greedy decoding of the target.

    Node ``n > 0`` is accepted iff all its ancestors are and
    ``tokens[n] == argmax(logits[parent[n]])``. The deepest accepted node wins (the lowest index
    among equally deep ones) and the next token is the argmax there. No ``SamplingConfig`` is
    needed: temperature, top-k/p and min-p never change the argmax.

    Args:
      tokens: ``int32[B, T]``.
      parents: a DraftTree or ``int32[B, T]``.
      logits: ``[B, T, V]``.
      valid: ``bool[B, T]`` for dynamic trees (default: all valid).
    """
    batch, num_nodes = tokens.shape
    parents, valid, max_depth = tree_arrays(parents, valid, batch, num_nodes)
    top = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, T]
    match = valid & (tokens == _parent_rows(top, parents))
    final = _deepest(match, parents, valid, max_depth)
    next_token = jnp.take_along_axis(top, final[:, None], 1)[:, 0]
    return _result(tokens, parents, final, next_token, max_depth)


def rejection_walk(tokens: jax.Array, parents: jax.Array, valid: jax.Array,
                   target_probs: jax.Array, draft_probs: Optional[jax.Array],
                   uniforms: jax.Array, mode: str) -> WalkResult:
    """The shared core of the lossless sampling rules, with injectable acceptance uniforms.

    Nodes are visited in index order (BFS order puts children after their parent). The walk
    keeps the current node (last accepted, starting at the root) and the residual distribution
    ``p_i`` there. A valid node whose parent is the current node is tried: with ``c`` its token
    and ``q_i`` its proposal, it is accepted iff ``u * q_i(c) < p_i(c)``; the walk then moves to
    it with ``p = target_probs[node]``. On rejection ``p_{i+1} = norm(max(0, p_i - q_i))``.

    ``mode`` fixes ``q_i``:

    * ``"iid"`` (V-MC-iid): ``q_i = draft_probs[node]``; siblings were drawn i.i.d. from it.
    * ``"without_replacement"`` (V-RRS): ``draft_probs[node]`` is the drafter's distribution at
      the parent *before* removing earlier siblings; ``q_i`` zeroes the tokens of the siblings
      tried before (renormalized). Siblings must appear in their draw order.
    * ``"deterministic"`` (V-Δ): ``q_i = onehot(c)``: accept with ``p_i(c)``, else zero ``c``
      in ``p_i`` and renormalize. ``draft_probs`` is ignored; any fixed tokens are allowed.

    A chain (one child per node) is standard speculative sampling in every mode. No "done" flag
    is needed: once every child of the current node has failed, no later node can be tried, so
    the final residual is what the next token is drawn from (the full target after acceptance
    of a leaf: the bonus token).

    Args:
      tokens: ``int32[B, T]``.
      parents: ``int32[B, T]``, ``parents[:, n] < n``.
      valid: ``bool[B, T]``; invalid nodes and their subtrees are never tried.
      target_probs: ``float32[B, T, V]`` processed target distribution at every node.
      draft_probs: ``float32[B, T, V]`` (row 0 ignored) or None for ``"deterministic"``.
      uniforms: ``float32[B, T]`` in ``[0, 1)``; ``uniforms[:, n]`` decides node ``n``.
      mode: one of ``"iid"``, ``"without_replacement"``, ``"deterministic"``.

    Returns:
      A :class:`WalkResult`.
    """
    if mode not in SIBLING_MODES:
        raise ValueError(f"mode must be one of {SIBLING_MODES}, got {mode!r}")
    if mode != "deterministic" and draft_probs is None:
        raise ValueError(f"mode {mode!r} needs draft_probs")
    batch, num_nodes, vocab = target_probs.shape
    target_probs = target_probs.astype(jnp.float32)
    if draft_probs is None:
        draft_probs = jnp.zeros((batch, num_nodes, 0), jnp.float32)  # never read
    time_major = lambda x: jnp.swapaxes(x, 0, 1)[1:]
    xs = (jnp.arange(1, num_nodes), time_major(parents), time_major(tokens), time_major(valid),
          time_major(uniforms), time_major(target_probs),
          time_major(draft_probs.astype(jnp.float32)))

    def step(carry, x):
        cur, p, removed = carry
        node, par, tok, ok, u, p_node, q = x
        tried = ok & (par == cur)
        tok_hot = jax.nn.one_hot(tok, vocab, dtype=jnp.float32)
        if mode == "deterministic":
            q = tok_hot
        elif mode == "without_replacement":
            q = jnp.where(removed, 0.0, q)
            mass = jnp.sum(q, axis=-1, keepdims=True)
            q = jnp.where(mass > 0, q / jnp.where(mass > 0, mass, 1.0), 0.0)
        p_c = jnp.sum(p * tok_hot, axis=-1)
        q_c = jnp.sum(q * tok_hot, axis=-1)
        accept = tried & (u * q_c < p_c)
        prob = jnp.where(q_c > 0, jnp.minimum(1.0, p_c / jnp.where(q_c > 0, q_c, 1.0)),
                         (p_c > 0).astype(jnp.float32))
        residual = jnp.maximum(p - q, 0.0)
        mass = jnp.sum(residual, axis=-1, keepdims=True)
        # Zero mass only happens with probability 0 (then p_i == q_i and acceptance is certain).
        residual = jnp.where(mass > 0, residual / jnp.where(mass > 0, mass, 1.0), p)
        reject = tried & ~accept
        new_p = jnp.where(accept[:, None], p_node, jnp.where(reject[:, None], residual, p))
        new_removed = jnp.where(accept[:, None], False, removed | (reject[:, None] & (tok_hot > 0)))
        new_cur = jnp.where(accept, node, cur)
        return (new_cur, new_p, new_removed), (jnp.where(tried, prob, 0.0), tried, accept)

    init = (jnp.zeros((batch,), jnp.int32), target_probs[:, 0], jnp.zeros((batch, vocab), bool))
    (final, residual, _), (prob, tried, accepted) = jax.lax.scan(step, init, xs)
    with_root = lambda x, root: jnp.concatenate([jnp.full((batch, 1), root, x.dtype), x.T], axis=1)
    # An acceptance moves the walk into that node's subtree for good, so the accepted nodes are
    # exactly the final root path.
    return WalkResult(final_node=final, residual=residual, accept_prob=with_root(prob, 1.0),
                      tried=with_root(tried, False), accepted=with_root(accepted, True))


def _node_uniforms(key: jax.Array, batch: int, num_nodes: int) -> jax.Array:
    """``float32[B, T]``: one independent stream per node (``fold_in(key, node)``)."""
    keys = jax.vmap(lambda n: jax.random.fold_in(key, n))(jnp.arange(num_nodes))
    return jax.vmap(lambda k: jax.random.uniform(k, (batch,)))(keys).T


def _sampling_rule(key, tokens, parents, logits, draft_probs, config, valid, mode):
    batch, num_nodes = tokens.shape
    parents, valid, max_depth = tree_arrays(parents, valid, batch, num_nodes)
    accept_key, residual_key = jax.random.split(key)
    walk = rejection_walk(tokens, parents, valid, processed_probs(logits, config), draft_probs,
                          _node_uniforms(accept_key, batch, num_nodes), mode)
    if config.greedy:  # the residual is the target's one-hot: take it without drawing
        next_token = jnp.argmax(walk.residual, axis=-1).astype(jnp.int32)
    else:
        next_token = sample_probs(residual_key, walk.residual)
    return _result(tokens, parents, walk.final_node, next_token, max_depth)


def speculative_sampling(key: jax.Array, tokens: jax.Array, parents: Structure, logits: jax.Array,
                         draft_probs: jax.Array, config: SamplingConfig,
                         valid: Optional[jax.Array] = None, siblings: str = "iid") -> AcceptResult:
    """Lossless verification of drafts sampled from explicit distributions (V-SS / V-MC / V-RRS).

    Args:
      key: PRNG key; acceptance uniforms use ``fold_in(accept_key, node)``, the residual/bonus
        draw uses a separate key.
      tokens: ``int32[B, T]`` node tokens (node 0: the pending root token).
      parents: a DraftTree (static) or ``int32[B, T]`` dynamic parents.
      logits: ``[B, T, V]``; ``logits[b, n]`` predicts the children of node ``n``.
      draft_probs: ``float32[B, T, V]``: ``draft_probs[b, n]`` is the distribution node ``n``'s
        token was drawn from (for ``"without_replacement"``: before removing earlier siblings).
      config: target sampling settings (temperature 0 gives exact greedy behaviour).
      valid: ``bool[B, T]`` for dynamic trees (default: all valid).
      siblings: ``"iid"`` (siblings drawn i.i.d., multi-round rejection) or
        ``"without_replacement"`` (siblings drawn without replacement, in index order: recursive
        rejection sampling). Both equal standard speculative sampling on a chain.

    Returns:
      An :class:`AcceptResult` (``D`` = the DraftTree's max depth, or ``T - 1`` for dynamic trees).
    """
    if siblings not in ("iid", "without_replacement"):
        raise ValueError(f"siblings must be 'iid' or 'without_replacement', got {siblings!r}")
    return _sampling_rule(key, tokens, parents, logits, draft_probs, config, valid, siblings)


def deterministic(key: jax.Array, tokens: jax.Array, parents: Structure, logits: jax.Array,
                  config: SamplingConfig, valid: Optional[jax.Array] = None) -> AcceptResult:
    """Lossless verification of point-mass drafts (V-Δ: prompt lookup, greedy or top-k heads).

    Children of the current node are tried in index order: child ``c`` is accepted with
    probability ``p_i(c)``; on rejection ``c`` is zeroed in ``p_i`` and the rest renormalized.
    When every child fails the next token is drawn from the final residual. Exact for any
    drafted tokens, duplicate siblings included. Arguments as in :func:`speculative_sampling`.
    """
    return _sampling_rule(key, tokens, parents, logits, None, config, valid, "deterministic")


def typical_acceptance_lossy(key: jax.Array, tokens: jax.Array, parents: Structure,
                             logits: jax.Array, config: SamplingConfig,
                             valid: Optional[jax.Array] = None, epsilon: float = 0.09,
                             delta: float = 0.3) -> AcceptResult:
    """Medusa's typical acceptance. LOSSY: the output is NOT distributed as the target.

    Node ``n`` passes iff ``p(tokens[n]) > min(epsilon, delta * exp(-H(p)))`` with ``p`` the
    processed target at its parent; the deepest node whose whole path passes is kept (lowest
    index among ties) and the next token is sampled from the target there. Defaults are Medusa's
    (posterior threshold 0.09, alpha 0.3). Arguments as in :func:`speculative_sampling`.
    """
    batch, num_nodes = tokens.shape
    parents, valid, max_depth = tree_arrays(parents, valid, batch, num_nodes)
    probs = processed_probs(logits, config)  # [B, T, V]
    entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0),
                       axis=-1)
    threshold = jnp.minimum(epsilon, delta * jnp.exp(-entropy))  # [B, T]
    p_token = jnp.take_along_axis(_parent_rows(probs, parents), tokens[..., None], axis=-1)[..., 0]
    passes = valid & (p_token > _parent_rows(threshold, parents))
    final = _deepest(passes, parents, valid, max_depth)
    final_probs = jnp.take_along_axis(probs, final[:, None, None], axis=1)[:, 0]
    if config.greedy:
        next_token = jnp.argmax(final_probs, axis=-1).astype(jnp.int32)
    else:
        next_token = sample_probs(key, final_probs)
    return _result(tokens, parents, final, next_token, max_depth)


def topk_acceptance_lossy(key: jax.Array, tokens: jax.Array, parents: Structure,
                          logits: jax.Array, config: SamplingConfig,
                          valid: Optional[jax.Array] = None, top_k: int = 2) -> AcceptResult:
    """Blockwise parallel decoding's relaxed top-k criterion (Stern et al. 2018). LOSSY: the
    output is NOT the target's greedy output, nor distributed as the target.

    Node ``n`` passes iff its token is among the ``top_k`` highest target logits at its parent;
    the deepest node whose whole root path passes is kept (lowest index among ties) and the
    next token is the target's argmax there (sampled from the processed target when sampling).
    ``top_k == 1`` is exact-match greedy. Arguments as in :func:`speculative_sampling`.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    batch, num_nodes = tokens.shape
    parents, valid, max_depth = tree_arrays(parents, valid, batch, num_nodes)
    _, top = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))  # [B, T, k]
    passes = valid & jnp.any(_parent_rows(top, parents) == tokens[..., None], axis=-1)
    final = _deepest(passes, parents, valid, max_depth)
    return _result(tokens, parents, final, _next_at(key, logits, final, config), max_depth)


def distance_acceptance_lossy(key: jax.Array, tokens: jax.Array, parents: Structure,
                              logits: jax.Array, config: SamplingConfig,
                              valid: Optional[jax.Array] = None,
                              max_distance: int = 1) -> AcceptResult:
    """Blockwise parallel decoding's relaxed distance criterion (Stern et al. 2018). LOSSY.

    For vocabularies whose ids are ORDINAL (e.g. quantised pixel intensities or numbers), node
    ``n`` passes iff ``|tokens[n] - argmax(logits[parent])| <= max_distance``. On text
    vocabularies ids carry no order, so this rule is only meaningful for ordinal outputs.
    ``max_distance == 0`` is exact-match greedy. Arguments as in :func:`speculative_sampling`.
    """
    if max_distance < 0:
        raise ValueError(f"max_distance must be >= 0, got {max_distance}")
    batch, num_nodes = tokens.shape
    parents, valid, max_depth = tree_arrays(parents, valid, batch, num_nodes)
    best = _parent_rows(jnp.argmax(logits, axis=-1).astype(jnp.int32), parents)  # [B, T]
    passes = valid & (jnp.abs(tokens - best) <= max_distance)
    final = _deepest(passes, parents, valid, max_depth)
    return _result(tokens, parents, final, _next_at(key, logits, final, config), max_depth)


def _next_at(key: jax.Array, logits: jax.Array, final: jax.Array,
             config: SamplingConfig) -> jax.Array:
    """``int32[B]``: the target's next token at node ``final`` (argmax, or a sample when
    ``config`` samples)."""
    final_logits = jnp.take_along_axis(logits, final[:, None, None], axis=1)[:, 0]
    if config.greedy:
        return jnp.argmax(final_logits, axis=-1).astype(jnp.int32)
    return sample_probs(key, processed_probs(final_logits, config))


def expected_tau(alpha, k: int):
    """Expected tokens per verification of a ``k``-token chain with i.i.d. acceptance ``alpha``:
    ``(1 - alpha**(k + 1)) / (1 - alpha)`` (``k + 1`` when ``alpha == 1``), bonus included."""
    alpha = np.asarray(alpha, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        tau = np.where(alpha == 1.0, k + 1.0, (1.0 - alpha ** (k + 1)) / (1.0 - alpha))
    return tau if tau.ndim else float(tau)
