"""Draft-then-verify speculative decoding: one jitted ``lax.while_loop`` for every drafter.

Each round, for every row at once (rows accept different numbers of tokens; nothing leaves the
device):

1. DRAFT    ``drafter.propose`` -> candidate nodes (node 0 = pending token), chain or tree.
2. VERIFY   one target forward over all nodes at positions ``lengths + depth`` under the tree
            mask; their K/V land in scratch slots ``lengths + node``.
3. ACCEPT   a rule from ``specjax.accept`` on the processed target distribution: greedy exact
            match, or a lossless sampling rule chosen by how the drafter drew its nodes.
4. COMMIT   the accepted path's K/V are compacted to ``lengths, lengths+1, ...`` and
            ``lengths += accepted + 1``; rejected entries stay scratch and cost nothing.
5. EMIT     accepted tokens plus the target's next token, truncated after EOS / max_new_tokens;
            the next token becomes pending; the drafter updates its state.

Axis glossary: B batch, T candidate nodes, D max depth, N max new tokens, H history, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from specjax import accept as accept_lib
from specjax import adaptive
from specjax import masks, tree as tree_lib
from specjax.cache import KVCache, advance, check_capacity, compact
from specjax.decode import DecodeConfig, is_eos, prefill, prepare_batch, replicate_output
from specjax.drafter import CommitInfo, DraftContext, Drafter
from specjax.model_api import ForwardOutput, LanguageModel
from specjax.prompts import PromptBatch
from specjax.sampling import sample
from specjax.sharding import ShardingPlan

ACCEPTANCE_RULES = ("auto", "typical_lossy", "topk_lossy", "distance_lossy")


@dataclasses.dataclass(frozen=True)
class SpecConfig:
    """Static settings of speculative decoding on top of :class:`DecodeConfig`.

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


@struct.dataclass
class SpecStats:
    """On-device counters (summed over rows and rounds).

    ``row_calls`` counts target forward passes per live row, prefill included, so
    ``tau = new tokens / row_calls`` is the mean number of tokens per target call (bonus
    included). ``accepted_at_depth[d]`` counts rounds in which a row accepted a draft at depth
    ``d + 1``; divided by ``row_rounds`` it is the acceptance rate by draft position.
    """

    target_calls: jax.Array  # int32[] forward passes of the target (batch-wide), prefill included
    rounds: jax.Array  # int32[]
    row_calls: jax.Array  # int32[]
    row_rounds: jax.Array  # int32[]
    drafted: jax.Array  # int32[] valid draft nodes offered to live rows
    accepted: jax.Array  # int32[] accepted draft tokens
    accepted_at_depth: jax.Array  # int32[D]


@struct.dataclass
class SpecState:
    cache: KVCache
    drafter_state: Any
    pending: jax.Array  # int32[B]
    pending_hidden: jax.Array  # [B, E]
    history: jax.Array  # int32[B, H]
    history_len: jax.Array  # int32[B]
    out_tokens: jax.Array  # int32[B, N]
    out_len: jax.Array  # int32[B]
    done: jax.Array  # bool[B]
    key: jax.Array
    stats: SpecStats


@struct.dataclass
class SpecOutput:
    tokens: jax.Array  # int32[B, N], -1 padded
    lengths: jax.Array  # int32[B]
    stats: SpecStats


def _context(state: SpecState, target_params) -> DraftContext:
    return DraftContext(target_params=target_params, cache=state.cache, history=state.history,
                        history_len=state.history_len, pending=state.pending,
                        pending_hidden=state.pending_hidden, done=state.done)


def _constrain(state: SpecState, plan: ShardingPlan | None) -> SpecState:
    """Pins the target cache and the per-row loop arrays to the plan's shardings (the drafter's
    own state is left to GSPMD); a no-op without a plan."""
    if plan is None:
        return state
    rows = plan.constrain_rows
    return state.replace(
        cache=plan.constrain_cache(state.cache), pending=rows(state.pending),
        pending_hidden=rows(state.pending_hidden), history=rows(state.history),
        history_len=rows(state.history_len), out_tokens=rows(state.out_tokens),
        out_len=rows(state.out_len), done=rows(state.done))


def _start(target, tparams, drafter, dparams, batch: PromptBatch, key, config: DecodeConfig,
           num_slots: int, plan: ShardingPlan | None = None) -> SpecState:
    b, p = batch.tokens.shape
    cache = target.init_cache(b, num_slots)
    if plan is not None:
        cache = plan.constrain_cache(cache)
    out, cache = prefill(target, tparams, batch, cache)
    key, sub = jax.random.split(key)
    first = sample(sub, out.logits[:, 0], config.sampling)
    last = (batch.lengths - 1)[:, None, None]
    pending_hidden = jnp.take_along_axis(out.hidden, last, axis=1)[:, 0]
    rows = jnp.arange(b)
    history = jnp.zeros((b, num_slots), jnp.int32).at[:, :p].set(batch.tokens)
    history = history.at[rows, batch.lengths].set(first)
    n = config.max_new_tokens
    depth = drafter.tree.max_depth
    stats = SpecStats(target_calls=jnp.int32(1), rounds=jnp.int32(0), row_calls=jnp.int32(b),
                      row_rounds=jnp.int32(0), drafted=jnp.int32(0), accepted=jnp.int32(0),
                      accepted_at_depth=jnp.zeros((max(depth, 1),), jnp.int32))
    state = SpecState(cache=cache, drafter_state=None, pending=first,
                      pending_hidden=pending_hidden, history=history,
                      history_len=batch.lengths + 1,
                      out_tokens=jnp.full((b, n), -1, jnp.int32).at[:, 0].set(first),
                      out_len=jnp.ones((b,), jnp.int32),
                      done=is_eos(first, config.eos_ids) | (n <= 1), key=key, stats=stats)
    state = _constrain(state, plan)
    ctx = _context(state, tparams).replace(prompt_hidden=out.hidden)
    dstate = drafter.init(dparams, ctx, batch.tokens, batch.lengths)
    return state.replace(drafter_state=dstate)


def _accept(drafter, proposal, structure, valid, logits, config: DecodeConfig, spec: SpecConfig,
            key):
    """Picks the acceptance rule: lossless unless ``spec`` explicitly asks for a lossy one."""
    tokens = proposal.tokens
    if spec.acceptance == "typical_lossy":
        return accept_lib.typical_acceptance_lossy(
            key, tokens, structure, logits, config.sampling, valid,
            epsilon=spec.typical_epsilon, delta=spec.typical_delta)
    if spec.acceptance == "topk_lossy":
        return accept_lib.topk_acceptance_lossy(key, tokens, structure, logits, config.sampling,
                                                valid, top_k=spec.topk_k)
    if spec.acceptance == "distance_lossy":
        return accept_lib.distance_acceptance_lossy(key, tokens, structure, logits,
                                                    config.sampling, valid,
                                                    max_distance=spec.max_distance)
    if config.sampling.greedy:
        return accept_lib.greedy(tokens, structure, logits, valid)
    if drafter.deterministic or proposal.draft_probs is None:
        return accept_lib.deterministic(key, tokens, structure, logits, config.sampling, valid)
    return accept_lib.speculative_sampling(key, tokens, structure, logits, proposal.draft_probs,
                                           config.sampling, valid, siblings=drafter.siblings)


def _round(target, tparams, drafter, dparams, state: SpecState, config: DecodeConfig,
           spec: SpecConfig, plan: ShardingPlan | None = None) -> SpecState:
    tree = drafter.tree
    b = state.pending.shape[0]
    key, k_draft, k_accept = jax.random.split(state.key, 3)
    live = ~state.done
    proposal, dstate, cache = drafter.propose(dparams, state.drafter_state,
                                              _context(state, tparams), k_draft)
    num_nodes = proposal.tokens.shape[1]
    if proposal.parents is None:
        parents = jnp.broadcast_to(jnp.asarray(tree.parents, jnp.int32), (b, num_nodes))
        depth = jnp.asarray(tree.depth, jnp.int32)[None]
        visible = jnp.asarray(tree.visible)
    else:
        parents = proposal.parents
        depth = tree_lib.depths_from_parents(parents)
        visible = tree_lib.visibility_from_parents(parents, proposal.valid)
    if proposal.depth is not None:
        depth = proposal.depth
    if proposal.visible is not None:
        visible = proposal.visible
    valid = (jnp.ones((b, num_nodes), bool) if proposal.valid is None else proposal.valid)
    tokens = proposal.tokens.at[:, 0].set(state.pending)

    # VERIFY: one forward pass over the nodes of every row. Drafters that opt in (see
    # adaptive.verify_widths_of) run it on the narrowest of a few static widths W covering every
    # live row's last valid node (W = 1 when nobody drafted): a lax.switch over pre-sized
    # forwards. Outputs of the nodes past W (invalid, never accepted) are zero-padded to T and
    # their scratch slots are left unwritten. The branches return only the W new K/V entries,
    # written into the cache after the switch: a cache updated inside the branches was copied
    # (measured: +40% per round at batch 8 on the CPU).
    lengths = cache.lengths
    positions = tree_lib.positions(lengths, depth)
    # Structured mask: a model may run its tree-attention kernel on it, or densify it.
    mask = masks.TreeMask.create(lengths, visible, cache.num_slots)
    widths = ((num_nodes,) if proposal.valid is None
              else adaptive.verify_widths_of(drafter, num_nodes))
    if len(widths) == 1:
        out = target.forward(tparams, tokens, positions, cache, mask)
    else:
        node = jnp.arange(num_nodes, dtype=jnp.int32)[None, :]
        slots = lengths[:, None] + node  # [B, T] scratch slot of every node
        rows = jnp.arange(b)[:, None]

        def verify_on(w):
            def run(_):
                o = target.forward(tparams, tokens[:, :w], positions[:, :w], cache, mask.first(w))
                pad = lambda x: jnp.pad(x, [(0, 0), (0, num_nodes - w)]  # noqa: E731
                                        + [(0, 0)] * (x.ndim - 2))
                read = jnp.minimum(slots, cache.num_slots - 1)
                # [B, T, L, K, D] (advanced indices first); entries past W are never written.
                return (pad(o.logits), pad(o.hidden), o.cache.k[:, rows, :, read],
                        o.cache.v[:, rows, :, read])
            return run

        last_valid = jnp.max(jnp.where(proposal.valid & live[:, None], node, 0))
        branch = jnp.sum(jnp.asarray(widths[:-1], jnp.int32) <= last_valid)  # first W > last
        logits, hidden, new_k, new_v = jax.lax.switch(branch, [verify_on(w) for w in widths],
                                                      None)
        width = jnp.asarray(widths, jnp.int32)[branch]
        dst = jnp.where(node < width, slots, cache.num_slots)  # out of range: dropped
        out = ForwardOutput(logits=logits, hidden=hidden, cache=cache.replace(
            k=cache.k.at[:, rows, :, dst].set(new_k, mode="drop"),
            v=cache.v.at[:, rows, :, dst].set(new_v, mode="drop")))

    # ACCEPT
    structure = tree if proposal.parents is None else parents
    result = _accept(drafter, proposal.replace(tokens=tokens), structure, proposal.valid,
                     out.logits, config, spec, k_accept)
    n_acc = jnp.where(live, result.num_accepted, 0)

    # COMMIT the target cache: pending + accepted drafts.
    num_new = jnp.where(live, n_acc + 1, 0)
    if proposal.parents is None and tree.is_chain:
        cache = advance(out.cache, num_new)
    else:
        src = lengths[:, None] + jnp.maximum(result.path, 0)
        cache = compact(out.cache, src, num_new)

    # EMIT accepted drafts + next token, truncated after EOS and at max_new_tokens.
    emitted = result.emitted  # [B, D+1]
    width = emitted.shape[1]
    idx = jnp.arange(width, dtype=jnp.int32)[None, :]
    in_range = idx <= n_acc[:, None]
    eos_hit = is_eos(emitted, config.eos_ids) & in_range
    first_eos = jnp.where(eos_hit.any(1), jnp.argmax(eos_hit, axis=1), width)
    room = config.max_new_tokens - state.out_len
    count = jnp.minimum(jnp.minimum(n_acc + 1, first_eos + 1), room)
    count = jnp.where(live, count, 0)
    write = idx < count[:, None]
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], emitted.shape)
    out_cols = jnp.where(write, state.out_len[:, None] + idx, config.max_new_tokens)
    out_tokens = state.out_tokens.at[rows, out_cols].set(emitted, mode="drop")
    hist_cols = jnp.where(write, state.history_len[:, None] + idx, state.history.shape[1])
    history = state.history.at[rows, hist_cols].set(emitted, mode="drop")
    out_len = state.out_len + count
    done = state.done | (live & (first_eos < count)) | (out_len >= config.max_new_tokens)
    last_node = jnp.take_along_axis(result.path, n_acc[:, None], axis=1)[:, 0]
    new_hidden = jnp.take_along_axis(out.hidden, jnp.maximum(last_node, 0)[:, None, None],
                                     axis=1)[:, 0]
    pending = jnp.where(live, result.next_token, state.pending)
    pending_hidden = jnp.where(live[:, None], new_hidden, state.pending_hidden)

    info = CommitInfo(proposal=proposal.replace(tokens=tokens), path=result.path,
                      num_accepted=n_acc, next_token=result.next_token,
                      new_lengths=cache.lengths, verify_hidden=out.hidden, live=live,
                      verify_logits=out.logits)
    new_state = state.replace(cache=cache, pending=pending, pending_hidden=pending_hidden,
                              history=history, history_len=state.history_len + count,
                              out_tokens=out_tokens, out_len=out_len, done=done, key=key)
    dstate = drafter.commit(dparams, dstate, _context(new_state, tparams), info)

    s = state.stats
    max_depth = s.accepted_at_depth.shape[0]
    depth_hit = (jnp.arange(1, max_depth + 1)[None, :] <= n_acc[:, None]) & live[:, None]
    stats = SpecStats(
        target_calls=s.target_calls + 1, rounds=s.rounds + 1,
        row_calls=s.row_calls + live.sum(dtype=jnp.int32),
        row_rounds=s.row_rounds + live.sum(dtype=jnp.int32),
        drafted=s.drafted + jnp.where(live[:, None], valid[:, 1:], False).sum(dtype=jnp.int32),
        accepted=s.accepted + n_acc.sum(dtype=jnp.int32),
        accepted_at_depth=s.accepted_at_depth + depth_hit.sum(0, dtype=jnp.int32))
    return _constrain(new_state.replace(drafter_state=dstate, stats=stats), plan)


@functools.partial(jax.jit,
                   static_argnames=("target", "drafter", "config", "spec", "num_slots", "plan"))
def _speculative_generate(target, tparams, drafter, dparams, batch, key, config, spec, num_slots,
                          plan=None):
    state = _start(target, tparams, drafter, dparams, batch, key, config, num_slots, plan)
    state = jax.lax.while_loop(
        lambda s: ~jnp.all(s.done),
        lambda s: _round(target, tparams, drafter, dparams, s, config, spec, plan), state)
    out = SpecOutput(tokens=state.out_tokens, lengths=state.out_len, stats=state.stats)
    return replicate_output(out, plan)


def _prepare(target, drafter, prompts, config: DecodeConfig, plan: ShardingPlan | None = None):
    drafter.check_compatible(target)
    batch = prepare_batch(prompts, target.vocab_size, plan)
    lookahead = drafter.tree.num_nodes + 1
    num_slots = config.slots_for(batch.tokens.shape[1], lookahead)
    check_capacity(int(np.max(batch.lengths)) + config.max_new_tokens + lookahead, num_slots,
                   f"speculative decoding with {drafter.tree.num_nodes} candidate nodes")
    return batch, num_slots


def speculative_generate(target: LanguageModel, target_params, drafter: Drafter, drafter_params,
                         prompts, config: DecodeConfig, spec: SpecConfig = SpecConfig(),
                         key: jax.Array | None = None,
                         plan: ShardingPlan | None = None) -> SpecOutput:
    """Speculative decoding of a batch of prompts, entirely on the device.

    With ``spec.acceptance == "auto"`` the output is exactly what :func:`specjax.decode.generate`
    produces under greedy decoding, and has exactly its distribution under sampling.
    ``plan`` runs it on a device mesh (see :mod:`specjax.sharding`; place the target params with
    ``plan.shard_params`` and the drafter params with ``sharding.shard_drafter_params`` first).
    """
    batch, num_slots = _prepare(target, drafter, prompts, config, plan)
    key = jax.random.key(0) if key is None else key
    return _speculative_generate(target, target_params, drafter, drafter_params, batch, key,
                                 config, spec, num_slots, plan)


def compile_speculative_generate(target, target_params, drafter, drafter_params, prompts,
                                 config: DecodeConfig, spec: SpecConfig = SpecConfig(), key=None,
                                 plan: ShardingPlan | None = None):
    """Ahead-of-time compiled ``speculative_generate`` for one batch shape.

    Returns:
      ``(fn(target_params, drafter_params, batch, key) -> SpecOutput, batch)`` (``batch`` placed
      on the plan's mesh when there is a plan).
    """
    batch, num_slots = _prepare(target, drafter, prompts, config, plan)
    key = jax.random.key(0) if key is None else key
    compiled = _speculative_generate.lower(target, target_params, drafter, drafter_params, batch,
                                           key, config, spec, num_slots, plan).compile()
    return (lambda tp, dp, bt, k: compiled(tp, dp, bt, k)), batch


_start_jit = jax.jit(_start, static_argnames=("target", "drafter", "config", "num_slots", "plan"))
_round_jit = jax.jit(_round, static_argnames=("target", "drafter", "config", "spec", "plan"),
                     donate_argnames=("state",))


def speculative_stream(target, target_params, drafter, drafter_params, prompts,
                       config: DecodeConfig, spec: SpecConfig = SpecConfig(), key=None,
                       plan: ShardingPlan | None = None):
    """The same rounds driven from Python (on one host; see :mod:`specjax.sharding`).

    Yields:
      ``(out_tokens int32[B, N], out_len int32[B], stats SpecStats)`` after prefill and after
      every round (rows grow by their accepted count).
    """
    batch, num_slots = _prepare(target, drafter, prompts, config, plan)
    key = jax.random.key(0) if key is None else key
    # Input errors above raise at the call; the rounds run lazily as the caller iterates.
    return _stream_rounds(target, target_params, drafter, drafter_params, batch, config, spec,
                          key, num_slots, plan)


def _stream_rounds(target, target_params, drafter, drafter_params, batch, config, spec, key,
                   num_slots, plan):
    state = _start_jit(target, target_params, drafter, drafter_params, batch, key, config,
                       num_slots, plan)
    yield np.asarray(state.out_tokens), np.asarray(state.out_len), jax.device_get(state.stats)
    while not bool(jnp.all(state.done)):
        state = _round_jit(target, target_params, drafter, drafter_params, state, config, spec,
                           plan)
        yield np.asarray(state.out_tokens), np.asarray(state.out_len), jax.device_get(state.stats)
