"""One API for plain and speculative decoding: compile once per batch shape, call, read.

An :class:`Engine` is the target, an optional drafter (None = plain decoding), the decoding
settings and an optional sharding plan. Every caller (the binaries, the benchmarks, tree
tuning, notebooks) uses the same three calls, whatever the method:

  engine = Engine(lm.model, config, drafter)            # drafter=None: plain decoding
  compiled = engine.compile(lm.params, dparams, prompts)  # ahead of time, one batch shape
  gen = compiled.run()                                    # timed, host-side Generation
  for gen in engine.stream(lm.params, dparams, prompts): ...   # one step / round at a time

A :class:`Generation` holds every row's new tokens, the wall time and :class:`LoopStats`,
whose fields mean the same for both loops (a plain step is a round that offers no draft).

Axis glossary: B batch rows, N max new tokens.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterator, Optional

import jax
import numpy as np

from specjax import decode, memory, speculative
from specjax.decode import DecodeConfig
from specjax.model_api import LanguageModel
from specjax.prompts import PromptBatch
from specjax.sharding import ShardingPlan
from specjax.verify import SpecConfig


ADVICE = "use fewer prompts per batch, shorter prompts or a smaller max_new_tokens"


@dataclasses.dataclass(frozen=True)
class LoopStats:
    """Host-side counters of one generation, the same fields for plain and speculative loops.

    Attributes:
      target_calls: batch-wide target forward passes, prefill included.
      row_calls: per-row target calls summed over rows (a finished row stops counting), so
        ``tau = new tokens / row_calls``; exactly the token count for plain decoding.
      rounds / row_rounds: loop iterations after the prefill, batch-wide / summed over live rows.
      drafted / accepted: draft tokens offered to live rows / accepted (0 for plain decoding).
      accepted_at_depth: per draft depth ``d + 1``, the (row, round) pairs that accepted it.
    """

    target_calls: int
    row_calls: int
    rounds: int
    row_rounds: int
    drafted: int = 0
    accepted: int = 0
    accepted_at_depth: tuple[int, ...] = ()

    @classmethod
    def of(cls, stats, lengths: np.ndarray) -> "LoopStats":
        """From a loop's on-device stats (``DecodeStats`` or ``SpecStats``)."""
        stats = jax.device_get(stats)
        if isinstance(stats, decode.DecodeStats):
            tokens = int(np.sum(lengths))
            return cls(target_calls=int(stats.target_calls), row_calls=tokens,
                       rounds=int(stats.steps), row_rounds=tokens - len(lengths))
        return cls(target_calls=int(stats.target_calls), row_calls=int(stats.row_calls),
                   rounds=int(stats.rounds), row_rounds=int(stats.row_rounds),
                   drafted=int(stats.drafted), accepted=int(stats.accepted),
                   accepted_at_depth=tuple(int(a) for a in np.asarray(stats.accepted_at_depth)))

    def __add__(self, other: "LoopStats") -> "LoopStats":
        """The counters of two generations together (batches of one job)."""
        depth = max(len(self.accepted_at_depth), len(other.accepted_at_depth))
        pad = lambda t: tuple(t) + (0,) * (depth - len(t))  # noqa: E731
        return LoopStats(*(getattr(self, f.name) + getattr(other, f.name)
                           for f in dataclasses.fields(self) if f.name != "accepted_at_depth"),
                         accepted_at_depth=tuple(a + b for a, b in zip(
                             pad(self.accepted_at_depth), pad(other.accepted_at_depth))))

    def as_dict(self) -> dict:
        """Counters plus the derived rates: ``acceptance_rate`` and ``accept_rate_by_depth``
        (per (row, round) pair) when drafts were offered."""
        out = dataclasses.asdict(self)
        out["accepted_at_depth"] = list(self.accepted_at_depth)
        if self.accepted_at_depth:
            rounds = max(1, self.row_rounds)
            out["acceptance_rate"] = self.accepted / max(1, self.drafted)
            out["accept_rate_by_depth"] = [round(a / rounds, 4) for a in self.accepted_at_depth]
        return out


@dataclasses.dataclass
class Generation:
    """What one generation produced, on the host.

    Attributes:
      tokens: each row's new tokens (EOS included when one was emitted), in prompt order.
      stats: :class:`LoopStats`.
      wall_s: seconds from the call to the ready result (0 when not timed).
    """

    tokens: list[list[int]]
    stats: LoopStats
    wall_s: float = 0.0

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tau(self) -> float:
        """New tokens per target forward pass (per row, prefill and bonus tokens included)."""
        return self.new_tokens / max(1, self.stats.row_calls)

    @classmethod
    def of(cls, out, wall_s: float = 0.0) -> "Generation":
        """From a loop output (``GenerateOutput`` or ``SpecOutput``)."""
        tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
        rows = [tokens[i, :lengths[i]].tolist() for i in range(len(lengths))]
        return cls(rows, LoopStats.of(out.stats, lengths), wall_s)


@dataclasses.dataclass
class Compiled:
    """An engine compiled for one batch shape.

    Attributes:
      batch: the prompts it was compiled for (placed on the plan's mesh).
      compile_s: seconds the ahead-of-time compilation took.
    """

    engine: "Engine"
    batch: PromptBatch
    key: jax.Array
    compile_s: float
    _call: Callable

    def __call__(self, prompts=None, key: Optional[jax.Array] = None):
        """Runs the loop on ``prompts`` (another batch of the same shape; default: the one it
        was compiled for); returns the device output without waiting for it."""
        batch = self.batch if prompts is None else self.engine.loop.prepare(prompts)[0]
        return self._call(batch, self.key if key is None else key)

    def run(self, prompts=None, key: Optional[jax.Array] = None) -> Generation:
        """Runs, waits, and returns the host-side :class:`Generation` with its wall time."""
        t0 = time.perf_counter()
        out = jax.block_until_ready(self(prompts, key))
        return Generation.of(out, time.perf_counter() - t0)


@dataclasses.dataclass(frozen=True)
class Engine:
    """Plain (``drafter=None``) or speculative decoding of one target, one API.

    Attributes:
      target: the :class:`~specjax.model_api.LanguageModel`.
      config: static decoding settings.
      drafter: a :class:`~specjax.drafter.Drafter`, or None for plain decoding.
      spec: acceptance settings (speculative only).
      plan: a :class:`~specjax.sharding.ShardingPlan` (params placed on its mesh), or None.
    """

    target: LanguageModel
    config: DecodeConfig
    drafter: Any = None
    spec: SpecConfig = SpecConfig()
    plan: Optional[ShardingPlan] = None

    @property
    def loop(self):
        """The static loop object: :class:`~specjax.decode.DecodeLoop` or
        :class:`~specjax.speculative.SpecLoop`."""
        if self.drafter is None:
            return decode.DecodeLoop(self.target, self.config, self.plan)
        return speculative.SpecLoop(self.target, self.drafter, self.config, self.spec, self.plan)

    def _what(self, batch) -> str:
        b, p = batch.tokens.shape
        return (f"decoding {b} prompt(s) padded to {p} tokens with "
                f"max_new_tokens={self.config.max_new_tokens}")

    def _args(self, tparams, dparams) -> tuple:
        return (tparams,) if self.drafter is None else (tparams, dparams)

    def compile(self, tparams, dparams, prompts, key: Optional[jax.Array] = None) -> Compiled:
        """Checks the inputs (host, before any tracing: the drafter, the batch, the model's
        context, the cache capacity), compiles ahead of time for this batch shape, checks that
        the program's buffers fit the free device memory (:mod:`specjax.memory`), and returns
        the callable :class:`Compiled`."""
        loop = self.loop
        batch, num_slots = loop.prepare(prompts)
        key = jax.random.key(0) if key is None else key
        args = self._args(tparams, dparams)
        t0 = time.perf_counter()
        compiled = loop.lower_run(*args, batch, key, num_slots).compile()
        compile_s = time.perf_counter() - t0
        memory.check_fits(compiled, self._what(batch), ADVICE)
        return Compiled(self, batch, key, compile_s, lambda b, k: compiled(*args, b, k))

    def required_bytes(self, tparams, dparams, prompts) -> Optional[int]:
        """What one run on ``prompts`` will allocate (XLA's estimate; compiles, never runs):
        how the binaries size their batches (:func:`specjax.memory.rows_that_fit`)."""
        loop = self.loop
        batch, num_slots = loop.prepare(prompts)
        lowered = loop.lower_run(*self._args(tparams, dparams), batch, jax.random.key(0),
                                 num_slots)
        return memory.required_bytes(lowered.compile())

    def generate(self, tparams, dparams, prompts, key: Optional[jax.Array] = None
                 ) -> Generation:
        """:meth:`compile` and run once; the wall time includes compilation."""
        compiled = self.compile(tparams, dparams, prompts, key)
        gen = compiled.run()
        gen.wall_s += compiled.compile_s
        return gen

    def stream(self, tparams, dparams, prompts, key: Optional[jax.Array] = None
               ) -> Iterator[Generation]:
        """The same loop driven from Python: a :class:`Generation` of the tokens so far after
        the prefill and after every step / round (``wall_s`` since the call, first included).
        Input and memory errors raise at the call; the steps run as the caller iterates."""
        loop = self.loop
        batch, num_slots = loop.prepare(prompts)
        key = jax.random.key(0) if key is None else key
        args = self._args(tparams, dparams)
        t0 = time.perf_counter()
        start = loop.lower_start(*args, batch, key, num_slots).compile()  # compiled once
        memory.check_fits(start, self._what(batch), ADVICE)
        return self._stream(loop, args, batch, key, start, t0)

    def _stream(self, loop, args, batch, key, start, t0):
        state = start(*args, batch, key)
        step = loop.jit_step if self.drafter is None else loop.jit_round
        while True:
            out = jax.device_get((state.out_tokens, state.out_len, state.stats))
            yield Generation.of(_Snapshot(*out), time.perf_counter() - t0)
            if bool(np.all(np.asarray(state.done))):
                return
            state = step(*args, state)


@dataclasses.dataclass
class _Snapshot:
    tokens: Any
    lengths: Any
    stats: Any
