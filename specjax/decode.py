"""Plain autoregressive decoding on the device: the reference every other method is tested against.

``generate`` runs prefill and one ``lax.while_loop`` inside a single jit: no host round trip
until every row has hit an EOS token or ``max_new_tokens``. ``stream`` drives the very same
jitted step from Python and yields tokens as they are produced (CLI, notebooks). Every entry
point takes an optional static ``plan`` (:class:`specjax.sharding.ShardingPlan`) to run on a
device mesh; None is the single-device path.

Axis glossary: B batch rows, P padded prompt length, N max new tokens, S cache slots, V vocab.

Invariant (shared with speculative decoding): the cache holds every token of a row except the
``pending`` one, the last token emitted, which is fed at the next step.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from specjax import masks
from specjax.cache import KVCache, check_capacity
from specjax.model_api import LanguageModel
from specjax.prompts import PromptBatch, make_prompt_batch
from specjax.sampling import SamplingConfig, sample
from specjax.sharding import ShardingPlan


@struct.dataclass
class DecodeStats:
    """On-device counters. ``target_calls`` counts every target forward pass, prefill included,
    so ``tau = new_tokens / target_calls`` is exactly 1 for plain decoding."""

    target_calls: jax.Array  # int32[]
    steps: jax.Array  # int32[] loop iterations after prefill


@struct.dataclass
class DecodeState:
    """Loop state of plain decoding."""

    cache: KVCache
    pending: jax.Array  # int32[B] last emitted token (not yet in the cache)
    out_tokens: jax.Array  # int32[B, N] emitted tokens, -1 past out_len
    out_len: jax.Array  # int32[B]
    done: jax.Array  # bool[B]
    key: jax.Array  # PRNG key
    stats: DecodeStats


@struct.dataclass
class GenerateOutput:
    """``tokens[b, :lengths[b]]`` are row b's new tokens (EOS included if one was emitted)."""

    tokens: jax.Array  # int32[B, N], -1 padded
    lengths: jax.Array  # int32[B]
    stats: DecodeStats


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Static decoding settings.

    Attributes:
      max_new_tokens: N, the most tokens emitted per row.
      sampling: how the next token is chosen from the target's logits.
      eos_ids: tokens that end a row (emitted, then the row stops).
      num_slots: S, cache slots; 0 picks the smallest multiple of 128 that fits.
    """

    max_new_tokens: int
    sampling: SamplingConfig = SamplingConfig()
    eos_ids: tuple[int, ...] = ()
    num_slots: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        object.__setattr__(self, "eos_ids", tuple(int(e) for e in self.eos_ids))

    def slots_for(self, padded_prompt_len: int, lookahead: int = 0) -> int:
        """Cache size: the configured one (checked) or the smallest multiple of 128 that fits."""
        needed = padded_prompt_len + self.max_new_tokens + lookahead
        if self.num_slots:
            check_capacity(needed, self.num_slots,
                           f"a prompt padded to {padded_prompt_len} tokens plus "
                           f"max_new_tokens={self.max_new_tokens} (+{lookahead} draft slots)")
            return self.num_slots
        return -(-needed // 128) * 128


class ContextLengthError(ValueError):
    """A prompt plus ``max_new_tokens`` longer than the model's context."""


def check_context(model: LanguageModel, prompt_lengths, max_new_tokens: int) -> None:
    """Raises :class:`ContextLengthError`, saying the limit and what to change, when the
    longest prompt plus ``max_new_tokens`` needs positions past ``model.max_positions`` (the
    model was never trained there: its output would be garbage, and the cache and attention
    would grow with it). Checked on the host before anything is compiled."""
    limit = int(model.max_positions)
    longest = int(np.max(prompt_lengths))
    if longest + max_new_tokens <= limit:
        return
    fix = (f"shorten the prompt to at most {limit - max_new_tokens} tokens or lower "
           f"max_new_tokens to at most {limit - longest}" if longest < limit
           else f"shorten the prompt to at most {limit - max_new_tokens} tokens")
    raise ContextLengthError(f"a prompt of {longest} tokens plus max_new_tokens="
                             f"{max_new_tokens} needs {longest + max_new_tokens} positions, over "
                             f"the model's context of {limit}: {fix}")


def is_eos(tokens: jax.Array, eos_ids: Sequence[int]) -> jax.Array:
    """bool mask of ``tokens`` that are in ``eos_ids``."""
    if not eos_ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(eos_ids, jnp.int32))


def prefill(model: LanguageModel, params, batch: PromptBatch, cache: KVCache,
            hidden_layers: tuple = ()):
    """Writes every prompt token into the cache and returns the last prompt position's output.

    Returns:
      ``(ForwardOutput with logits [B, 1, V] (hidden states and ``hidden_layers`` taps at
      every position), cache with lengths = prompt lengths)``.
    """
    b, p = batch.tokens.shape
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    mask = masks.causal_mask(cache.lengths, p, cache.num_slots)
    out = model.forward(params, batch.tokens, positions, cache, mask,
                        hidden_layers=hidden_layers, logits_at=(batch.lengths - 1)[:, None])
    return out, out.cache.replace(lengths=batch.lengths)


def constrain_state(state: DecodeState, plan: ShardingPlan | None) -> DecodeState:
    """Pins the cache and the per-row arrays of the loop state to the plan's shardings (so
    GSPMD keeps them in place across the while loop); a no-op without a plan."""
    if plan is None:
        return state
    rows = plan.constrain_rows
    return state.replace(cache=plan.constrain_cache(state.cache), pending=rows(state.pending),
                         out_tokens=rows(state.out_tokens), out_len=rows(state.out_len),
                         done=rows(state.done))


def replicate_output(out, plan: ShardingPlan | None):
    """The (small) outputs replicated on every device, so every host can read them."""
    if plan is None:
        return out
    return out.replace(tokens=plan.constrain_replicated(out.tokens),
                       lengths=plan.constrain_replicated(out.lengths))


@dataclasses.dataclass(frozen=True)
class DecodeLoop:
    """Plain decoding as a static object (hashable: the jit static argument of its entry points).

    ``start`` (prefill + the first token) and ``step`` (one token per unfinished row) are traced
    functions; ``run`` is the whole ``lax.while_loop``. ``jit_start`` / ``jit_step`` run them
    one call at a time from Python (streaming, and tests that inspect the state between steps;
    ``jit_step`` donates the state).

    Attributes:
      model: the :class:`~specjax.model_api.LanguageModel`.
      config: static decoding settings.
      plan: a :class:`~specjax.sharding.ShardingPlan`, or None for one device.
    """

    model: LanguageModel
    config: DecodeConfig
    plan: ShardingPlan | None = None

    def start(self, params, batch: PromptBatch, key, num_slots: int) -> DecodeState:
        model, config = self.model, self.config
        cache = model.init_cache(batch.tokens.shape[0], num_slots)
        if self.plan is not None:
            cache = self.plan.constrain_cache(cache)
        out, cache = prefill(model, params, batch, cache)
        key, sub = jax.random.split(key)
        first = sample(sub, out.logits[:, 0], config.sampling)
        b, n = batch.tokens.shape[0], config.max_new_tokens
        out_tokens = jnp.full((b, n), -1, jnp.int32).at[:, 0].set(first)
        done = is_eos(first, config.eos_ids) | (n <= 1)
        stats = DecodeStats(target_calls=jnp.int32(1), steps=jnp.int32(0))
        state = DecodeState(cache=cache, pending=first, out_tokens=out_tokens,
                            out_len=jnp.ones((b,), jnp.int32), done=done, key=key, stats=stats)
        return constrain_state(state, self.plan)

    def step(self, params, state: DecodeState) -> DecodeState:
        """Feeds ``pending``, appends one token to every unfinished row."""
        config = self.config
        cache = state.cache
        b = state.pending.shape[0]
        positions = cache.lengths[:, None]
        mask = masks.TreeMask.create(cache.lengths, masks.causal_block(1), cache.num_slots)
        out = self.model.forward(params, state.pending[:, None], positions, cache, mask)
        key, sub = jax.random.split(state.key)
        token = sample(sub, out.logits[:, 0], config.sampling)
        live = ~state.done
        cache = out.cache.replace(lengths=cache.lengths + live.astype(jnp.int32))
        rows = jnp.arange(b)
        col = jnp.where(live, state.out_len, config.max_new_tokens)  # dropped when not live
        out_tokens = state.out_tokens.at[rows, col].set(token, mode="drop")
        out_len = state.out_len + live.astype(jnp.int32)
        done = (state.done | (live & is_eos(token, config.eos_ids))
                | (out_len >= config.max_new_tokens))
        pending = jnp.where(live, token, state.pending)
        stats = DecodeStats(target_calls=state.stats.target_calls + 1,
                            steps=state.stats.steps + 1)
        state = DecodeState(cache=cache, pending=pending, out_tokens=out_tokens,
                            out_len=out_len, done=done, key=key, stats=stats)
        return constrain_state(state, self.plan)

    def run(self, params, batch: PromptBatch, key, num_slots: int) -> GenerateOutput:
        state = self.start(params, batch, key, num_slots)
        state = jax.lax.while_loop(lambda s: ~jnp.all(s.done),
                                   lambda s: self.step(params, s), state)
        out = GenerateOutput(tokens=state.out_tokens, lengths=state.out_len, stats=state.stats)
        return replicate_output(out, self.plan)

    def prepare(self, prompts) -> tuple[PromptBatch, int]:
        """``(batch, num_slots)`` for ``prompts``, checked on the host (``ValueError`` /
        ``CacheCapacityError`` before anything is traced)."""
        batch = prepare_batch(prompts, self.model.vocab_size, self.plan)
        check_context(self.model, batch.lengths, self.config.max_new_tokens)
        num_slots = self.config.slots_for(batch.tokens.shape[1])
        check_capacity(int(np.max(batch.lengths)) + self.config.max_new_tokens, num_slots,
                       "generate")
        return batch, num_slots

    def jit_run(self, params, batch: PromptBatch, key, num_slots: int) -> GenerateOutput:
        return _run_jit(self, params, batch, key, num_slots)

    def lower_run(self, params, batch: PromptBatch, key, num_slots: int):
        """``jax.stages.Lowered`` of :meth:`run` (``.compile()`` it ahead of time)."""
        return _run_jit.lower(self, params, batch, key, num_slots)

    def jit_start(self, params, batch: PromptBatch, key, num_slots: int) -> DecodeState:
        return _start_jit(self, params, batch, key, num_slots)

    def lower_start(self, params, batch: PromptBatch, key, num_slots: int):
        return _start_jit.lower(self, params, batch, key, num_slots)

    def jit_step(self, params, state: DecodeState) -> DecodeState:
        return _step_jit(self, params, state)


_run_jit = jax.jit(DecodeLoop.run, static_argnums=(0, 4))
_start_jit = jax.jit(DecodeLoop.start, static_argnums=(0, 4))
_step_jit = jax.jit(DecodeLoop.step, static_argnums=0, donate_argnums=2)


def num_compiled() -> int:
    """How many programs the whole-loop entry point (``generate``, :meth:`DecodeLoop.jit_run`)
    has compiled in this process: one per (loop, batch shape, slots), so prompts padded to the
    same length bucket share one."""
    return _run_jit._cache_size()


def prepare_batch(prompts, vocab_size: int, plan: ShardingPlan | None = None) -> PromptBatch:
    """A ``PromptBatch`` from token-id lists (or as given), its rows split over the plan's
    ``data`` axis when there is a plan (``ValueError`` when the data axis does not divide B)."""
    batch = prompts if isinstance(prompts, PromptBatch) else make_prompt_batch(
        prompts, vocab_size=vocab_size)
    return batch if plan is None else plan.shard_rows(batch)


def generate(model: LanguageModel, params, prompts, config: DecodeConfig,
             key: jax.Array | None = None, plan: ShardingPlan | None = None) -> GenerateOutput:
    """Generates up to ``config.max_new_tokens`` tokens for each prompt, on the device.

    Args:
      model: a :class:`~specjax.model_api.LanguageModel` (static).
      params: its parameters.
      prompts: a list of token-id sequences (different lengths allowed) or a ``PromptBatch``.
      config: static decoding settings.
      key: PRNG key for sampling (ignored when greedy).
      plan: a :class:`~specjax.sharding.ShardingPlan` to run on a device mesh (params placed
        with ``plan.shard_params`` first), or None for one device.

    Returns:
      :class:`GenerateOutput`; rows are in prompt order.
    """
    loop = DecodeLoop(model, config, plan)
    batch, num_slots = loop.prepare(prompts)
    key = jax.random.key(0) if key is None else key
    return loop.jit_run(params, batch, key, num_slots)


def stream(model: LanguageModel, params, prompts, config: DecodeConfig,
           key: jax.Array | None = None, plan: ShardingPlan | None = None
           ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Plain decoding driven from Python, one jitted step per token (the same step ``generate``
    loops over on the device).

    Yields:
      ``(tokens int32[B], emitted bool[B])`` after prefill and after every step: the token each
      row produced and whether that row emitted one (finished rows emit nothing).
    """
    loop = DecodeLoop(model, config, plan)
    batch, num_slots = loop.prepare(prompts)
    key = jax.random.key(0) if key is None else key
    # Input errors above raise at the call; the steps run lazily as the caller iterates.
    return _stream_steps(loop, params, batch, key, num_slots)


def _stream_steps(loop: DecodeLoop, params, batch, key, num_slots):
    state = loop.jit_start(params, batch, key, num_slots)
    yield np.asarray(state.pending), np.ones(state.pending.shape, bool)
    while not bool(jnp.all(state.done)):
        live = ~np.asarray(state.done)
        state = loop.jit_step(params, state)
        yield np.asarray(state.pending), live
