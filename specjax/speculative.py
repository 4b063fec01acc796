"""Draft-then-verify speculative decoding: one jitted ``lax.while_loop`` for every drafter.

A round is :meth:`SpecLoop.round`, in named steps, for every row at once (rows accept
different numbers of tokens; nothing leaves the device):

1. PROPOSE  ``drafter.propose`` -> candidate nodes (node 0 = pending token), chain or tree,
            normalised by :func:`specjax.verify.candidates`.
2. VERIFY   one target forward over all nodes at positions ``lengths + depth`` under the tree
            mask (:func:`specjax.verify.verify`); their K/V land in scratch slots
            ``lengths + node``.
3. ACCEPT   a rule from ``specjax.accept`` on the processed target distribution
            (:func:`specjax.verify.accept`): greedy exact match, or a lossless sampling rule
            chosen by how the drafter drew its nodes.
4. COMMIT   the accepted path's K/V are compacted to ``lengths, lengths+1, ...`` and
            ``lengths += accepted + 1``; rejected entries stay scratch and cost nothing.
5. EMIT     accepted tokens plus the target's next token, truncated after EOS / max_new_tokens;
            the next token becomes pending; the drafter updates its state (``drafter.commit``).
6. STATS    on-device counters (target calls, drafted and accepted tokens by depth).

:class:`SpecLoop` is the static object (target, drafter, settings, sharding plan) the jitted
entry points take as their static argument, so the steps share it instead of threading the
same parameters through every function.

Axis glossary: B batch, T candidate nodes, D max depth, N max new tokens, H history, V vocab.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from specjax import verify as verify_lib
from specjax.accept import AcceptResult
from specjax.cache import KVCache, advance, check_capacity, compact
from specjax.decode import (DecodeConfig, check_context, is_eos, prefill, prepare_batch,
                            replicate_output)
from specjax.drafter import CommitInfo, DraftContext, Drafter, check_drafter, features_of
from specjax.model_api import LanguageModel
from specjax.prompts import PromptBatch
from specjax.sampling import sample
from specjax.sharding import ShardingPlan
from specjax.verify import ACCEPTANCE_RULES, SpecConfig  # noqa: F401  (public names here too)


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
    pending_hidden: jax.Array  # [B, E'] the drafter's features (specjax.drafter.features_of)
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


def draft_context(state: SpecState, target_params) -> DraftContext:
    """What the loop tells the drafter about ``state`` (a
    :class:`~specjax.drafter.DraftContext`)."""
    return DraftContext(target_params=target_params, cache=state.cache, history=state.history,
                        history_len=state.history_len, pending=state.pending,
                        pending_hidden=state.pending_hidden, done=state.done)


@dataclasses.dataclass(frozen=True)
class SpecLoop:
    """Speculative decoding as a static object (hashable: the jit static argument).

    ``start`` (prefill, first token, drafter init) and ``round`` (one draft-verify-accept
    round, in the named steps below) are traced functions; ``run`` is the whole
    ``lax.while_loop``. ``jit_start`` / ``jit_round`` run them one call at a time from Python
    (streaming, and tests that inspect the state between rounds; ``jit_round`` donates it).

    Attributes:
      target: the :class:`~specjax.model_api.LanguageModel` whose output is reproduced.
      drafter: a :class:`~specjax.drafter.Drafter`.
      config: static decoding settings (sampling, EOS, max_new_tokens).
      spec: acceptance settings (lossless ``"auto"`` by default).
      plan: a :class:`~specjax.sharding.ShardingPlan`, or None for one device.
    """

    target: LanguageModel
    drafter: Drafter
    config: DecodeConfig
    spec: SpecConfig = SpecConfig()
    plan: ShardingPlan | None = None

    # The loop ---------------------------------------------------------------------------------

    def start(self, tparams, dparams, batch: PromptBatch, key, num_slots: int) -> SpecState:
        config, plan = self.config, self.plan
        b, p = batch.tokens.shape
        cache = self.target.init_cache(b, num_slots)
        if plan is not None:
            cache = plan.constrain_cache(cache)
        layers = tuple(self.drafter.feature_layers)
        out, cache = prefill(self.target, tparams, batch, cache, layers)
        features = features_of(out, layers)  # [B, P, E'] what the drafter reads
        key, sub = jax.random.split(key)
        first = sample(sub, out.logits[:, 0], config.sampling)
        last = (batch.lengths - 1)[:, None, None]
        pending_hidden = jnp.take_along_axis(features, last, axis=1)[:, 0]
        rows = jnp.arange(b)
        history = jnp.zeros((b, num_slots), jnp.int32).at[:, :p].set(batch.tokens)
        history = history.at[rows, batch.lengths].set(first)
        n = config.max_new_tokens
        depth = self.drafter.tree.max_depth
        stats = SpecStats(target_calls=jnp.int32(1), rounds=jnp.int32(0), row_calls=jnp.int32(b),
                          row_rounds=jnp.int32(0), drafted=jnp.int32(0), accepted=jnp.int32(0),
                          accepted_at_depth=jnp.zeros((max(depth, 1),), jnp.int32))
        state = SpecState(cache=cache, drafter_state=None, pending=first,
                          pending_hidden=pending_hidden, history=history,
                          history_len=batch.lengths + 1,
                          out_tokens=jnp.full((b, n), -1, jnp.int32).at[:, 0].set(first),
                          out_len=jnp.ones((b,), jnp.int32),
                          done=is_eos(first, config.eos_ids) | (n <= 1), key=key, stats=stats)
        state = self._constrain(state)
        ctx = draft_context(state, tparams).replace(prompt_hidden=features)
        dstate = self.drafter.init(dparams, ctx, batch.tokens, batch.lengths)
        return state.replace(drafter_state=dstate)

    def round(self, tparams, dparams, state: SpecState) -> SpecState:
        key, k_draft, k_accept = jax.random.split(state.key, 3)
        live = ~state.done
        cand, dstate, cache = self.propose(tparams, dparams, state, k_draft)
        out = self.verify(tparams, cand, cache, live)
        result = self.accept(cand, out.logits, k_accept)
        n_acc = jnp.where(live, result.num_accepted, 0)
        cache = self.commit(out.cache, cand, result, n_acc, live)
        new_state = self.emit(state, result, n_acc, live, out.hidden, cache, key)
        # Accepted paths are at most the drafter's max_depth deep (the contract's bound).
        depth = self.drafter.tree.max_depth
        info = CommitInfo(proposal=cand.proposal, path=result.path[:, :depth + 1],
                          num_accepted=n_acc,
                          next_token=result.next_token, new_lengths=cache.lengths,
                          verify_hidden=out.hidden, live=live, verify_logits=out.logits)
        dstate = self.drafter.commit(dparams, dstate, draft_context(new_state, tparams), info)
        stats = self.count(state.stats, cand.valid, n_acc, live)
        return self._constrain(new_state.replace(drafter_state=dstate, stats=stats))

    def run(self, tparams, dparams, batch: PromptBatch, key, num_slots: int) -> SpecOutput:
        state = self.start(tparams, dparams, batch, key, num_slots)
        state = jax.lax.while_loop(lambda s: ~jnp.all(s.done),
                                   lambda s: self.round(tparams, dparams, s), state)
        out = SpecOutput(tokens=state.out_tokens, lengths=state.out_len, stats=state.stats)
        return replicate_output(out, self.plan)

    # The steps of a round ---------------------------------------------------------------------

    def propose(self, tparams, dparams, state: SpecState, key):
        """PROPOSE: ``(Candidates, drafter state, target cache)``; the drafter may have
        written scratch entries of the target cache (self-speculative drafters)."""
        proposal, dstate, cache = self.drafter.propose(dparams, state.drafter_state,
                                                       draft_context(state, tparams), key)
        return verify_lib.candidates(self.drafter, proposal, state.pending), dstate, cache

    def verify(self, tparams, cand: verify_lib.Candidates, cache: KVCache, live):
        """VERIFY: the target's forward over the candidates (narrow widths if opted in)."""
        widths = verify_lib.verify_widths(self.drafter, cand.proposal)
        return verify_lib.verify(self.target, tparams, cand, cache, live, widths,
                                 tuple(self.drafter.feature_layers))

    def accept(self, cand: verify_lib.Candidates, logits, key) -> AcceptResult:
        """ACCEPT: the rule ``spec`` and the drafter call for."""
        return verify_lib.accept(self.drafter, cand, logits, self.config.sampling, self.spec,
                                 key)

    def commit(self, cache: KVCache, cand: verify_lib.Candidates, result: AcceptResult,
               n_acc, live) -> KVCache:
        """COMMIT the target cache: pending + accepted drafts (a chain just advances)."""
        num_new = jnp.where(live, n_acc + 1, 0)
        if cand.proposal.parents is None and self.drafter.tree.is_chain:
            return advance(cache, num_new)
        src = cache.lengths[:, None] + jnp.maximum(result.path, 0)
        return compact(cache, src, num_new)

    def emit(self, state: SpecState, result: AcceptResult, n_acc, live, verify_hidden,
             cache: KVCache, key) -> SpecState:
        """EMIT accepted drafts + the next token, truncated after EOS and at max_new_tokens;
        the next token becomes pending (with the target's hidden state at its node)."""
        config = self.config
        emitted = result.emitted  # [B, D+1]
        b, width = emitted.shape
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
        new_hidden = jnp.take_along_axis(verify_hidden,
                                         jnp.maximum(last_node, 0)[:, None, None], axis=1)[:, 0]
        return state.replace(
            cache=cache, pending=jnp.where(live, result.next_token, state.pending),
            pending_hidden=jnp.where(live[:, None], new_hidden, state.pending_hidden),
            history=history, history_len=state.history_len + count, out_tokens=out_tokens,
            out_len=out_len, done=done, key=key)

    def count(self, s: SpecStats, valid, n_acc, live) -> SpecStats:
        """STATS: this round's target call, offered and accepted drafts by depth."""
        max_depth = s.accepted_at_depth.shape[0]
        depth_hit = (jnp.arange(1, max_depth + 1)[None, :] <= n_acc[:, None]) & live[:, None]
        return SpecStats(
            target_calls=s.target_calls + 1, rounds=s.rounds + 1,
            row_calls=s.row_calls + live.sum(dtype=jnp.int32),
            row_rounds=s.row_rounds + live.sum(dtype=jnp.int32),
            drafted=s.drafted + jnp.where(live[:, None], valid[:, 1:], False).sum(
                dtype=jnp.int32),
            accepted=s.accepted + n_acc.sum(dtype=jnp.int32),
            accepted_at_depth=s.accepted_at_depth + depth_hit.sum(0, dtype=jnp.int32))

    def _constrain(self, state: SpecState) -> SpecState:
        """Pins the target cache and the per-row loop arrays to the plan's shardings (the
        drafter's own state is left to GSPMD); a no-op without a plan."""
        if self.plan is None:
            return state
        rows = self.plan.constrain_rows
        return state.replace(
            cache=self.plan.constrain_cache(state.cache), pending=rows(state.pending),
            pending_hidden=rows(state.pending_hidden), history=rows(state.history),
            history_len=rows(state.history_len), out_tokens=rows(state.out_tokens),
            out_len=rows(state.out_len), done=rows(state.done))

    # Host side --------------------------------------------------------------------------------

    def prepare(self, prompts) -> tuple[PromptBatch, int]:
        """``(batch, num_slots)`` for ``prompts``, checked on the host: the drafter's contract
        and compatibility with the target, the batch, the cache capacity (errors before any
        tracing)."""
        check_drafter(self.drafter)
        self.drafter.check_compatible(self.target)
        batch = prepare_batch(prompts, self.target.vocab_size, self.plan)
        # Draft nodes of the last rounds may sit up to the tree's depth past the context; they
        # are verified but never emitted, so only the emitted positions are checked.
        check_context(self.target, batch.lengths, self.config.max_new_tokens)
        lookahead = self.drafter.tree.num_nodes + 1
        num_slots = self.config.slots_for(batch.tokens.shape[1], lookahead)
        check_capacity(int(np.max(batch.lengths)) + self.config.max_new_tokens + lookahead,
                       num_slots, f"speculative decoding with {self.drafter.tree.num_nodes} "
                       "candidate nodes")
        return batch, num_slots

    def jit_run(self, tparams, dparams, batch: PromptBatch, key, num_slots: int) -> SpecOutput:
        return _run_jit(self, tparams, dparams, batch, key, num_slots)

    def lower_run(self, tparams, dparams, batch: PromptBatch, key, num_slots: int):
        """``jax.stages.Lowered`` of :meth:`run` (``.compile()`` it ahead of time)."""
        return _run_jit.lower(self, tparams, dparams, batch, key, num_slots)

    def jit_start(self, tparams, dparams, batch: PromptBatch, key, num_slots: int) -> SpecState:
        return _start_jit(self, tparams, dparams, batch, key, num_slots)

    def lower_start(self, tparams, dparams, batch: PromptBatch, key, num_slots: int):
        return _start_jit.lower(self, tparams, dparams, batch, key, num_slots)

    def jit_round(self, tparams, dparams, state: SpecState) -> SpecState:
        return _round_jit(self, tparams, dparams, state)


_run_jit = jax.jit(SpecLoop.run, static_argnums=(0, 5))
_start_jit = jax.jit(SpecLoop.start, static_argnums=(0, 5))
_round_jit = jax.jit(SpecLoop.round, static_argnums=0, donate_argnums=3)


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
    loop = SpecLoop(target, drafter, config, spec, plan)
    batch, num_slots = loop.prepare(prompts)
    key = jax.random.key(0) if key is None else key
    return loop.jit_run(target_params, drafter_params, batch, key, num_slots)


def speculative_stream(target, target_params, drafter, drafter_params, prompts,
                       config: DecodeConfig, spec: SpecConfig = SpecConfig(), key=None,
                       plan: ShardingPlan | None = None):
    """The same rounds driven from Python (on one host; see :mod:`specjax.sharding`).

    Yields:
      ``(out_tokens int32[B, N], out_len int32[B], stats SpecStats)`` after prefill and after
      every round (rows grow by their accepted count).
    """
    loop = SpecLoop(target, drafter, config, spec, plan)
    batch, num_slots = loop.prepare(prompts)
    key = jax.random.key(0) if key is None else key
    # Input errors above raise at the call; the rounds run lazily as the caller iterates.
    return _stream_rounds(loop, target_params, drafter_params, batch, key, num_slots)


def _stream_rounds(loop: SpecLoop, target_params, drafter_params, batch, key, num_slots):
    state = loop.jit_start(target_params, drafter_params, batch, key, num_slots)
    yield np.asarray(state.out_tokens), np.asarray(state.out_len), jax.device_get(state.stats)
    while not bool(jnp.all(state.done)):
        state = loop.jit_round(target_params, drafter_params, state)
        yield np.asarray(state.out_tokens), np.asarray(state.out_len), jax.device_get(state.stats)
