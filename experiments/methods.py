"""Decoding methods by name, for the experiment binaries: flags, validation and timed runs.

A :class:`Run` knows how to load the model, generate on the device (timed after an ahead-of-time
compile) and stream from a Python-driven step loop. Every method registered in ``METHODS`` is
selectable with ``--method``.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Callable, Sequence

import jax
import numpy as np
from absl import flags

from experiments.common import UserError
from specjax import decode
from specjax.prompts import make_prompt_batch
from specjax.sampling import SamplingConfig

METHODS = ("ar",)


def define_flags() -> None:
    flags.DEFINE_string("method", "ar", f"Decoding method, one of {', '.join(METHODS)}.")


@dataclasses.dataclass
class Result:
    """Generated ids per prompt plus timing and on-device statistics."""

    generated: list[list[int]]
    target_calls: int
    wall_s: float
    compile_s: float
    extra: dict = dataclasses.field(default_factory=dict)

    def summary(self) -> dict:
        new = sum(len(g) for g in self.generated)
        return {"new_tokens": new, "target_calls": self.target_calls,
                "tau": new / max(1, self.target_calls) / max(1, len(self.generated)),
                "wall_s": self.wall_s, "tokens_per_s": new / self.wall_s if self.wall_s else 0.0,
                "compile_s": self.compile_s, **self.extra}

    def row_stats(self, gen: Sequence[int]) -> dict:
        return {"new_tokens": len(gen)}


def _rows(tokens: np.ndarray, lengths: np.ndarray) -> list[list[int]]:
    return [tokens[i, :lengths[i]].tolist() for i in range(len(lengths))]


@dataclasses.dataclass
class Run:
    """One configured decoding method."""

    method: str
    model_name: str
    config: decode.DecodeConfig
    seed: int = 0

    def load(self):
        from models import registry
        return registry.load(self.model_name)

    def _config_for(self, loaded) -> decode.DecodeConfig:
        eos = loaded.tokenizer.eos_ids if loaded.tokenizer is not None else ()
        return dataclasses.replace(self.config, eos_ids=tuple(eos))

    def generate(self, loaded, prompts: Sequence[Sequence[int]]) -> Result:
        config = self._config_for(loaded)
        batch = make_prompt_batch(prompts, vocab_size=loaded.model.vocab_size)
        key = jax.random.key(self.seed)
        t0 = time.perf_counter()
        fn = decode.compile_generate(loaded.model, loaded.params, batch, config, key)
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(loaded.params, batch, key))
        wall = time.perf_counter() - t0
        return Result(_rows(np.asarray(out.tokens), np.asarray(out.lengths)),
                      int(out.stats.target_calls), wall, compile_s)

    def stream(self, loaded, prompts, on_tokens: Callable[[list[int]], None]) -> Result:
        config = self._config_for(loaded)
        batch = make_prompt_batch(prompts, vocab_size=loaded.model.vocab_size)
        generated = [[] for _ in prompts]
        calls, t0, t_first = 0, time.perf_counter(), None
        for tokens, emitted in decode.stream(loaded.model, loaded.params, batch, config,
                                             jax.random.key(self.seed)):
            if t_first is None:
                t_first = time.perf_counter()
            calls += 1
            for i in np.nonzero(emitted)[0]:
                generated[i].append(int(tokens[i]))
            on_tokens(generated[0])
        end = time.perf_counter()
        # The first call includes compilation; report steady-state time after it.
        return Result(generated, calls, end - t_first, t_first - t0,
                      {"loop": "python", "note": "wall_s excludes the first (compiling) step"})


def build_run(FLAGS) -> Run:
    """Validates the flags and builds the run (before any slow model load)."""
    if FLAGS.method not in METHODS:
        raise UserError(f"unknown --method {FLAGS.method!r}; choose one of {', '.join(METHODS)}")
    try:
        sampling = SamplingConfig(temperature=FLAGS.temperature, top_k=FLAGS.top_k,
                                  top_p=FLAGS.top_p, min_p=FLAGS.min_p)
        config = decode.DecodeConfig(max_new_tokens=FLAGS.max_new_tokens, sampling=sampling)
    except ValueError as e:
        raise UserError(str(e)) from e
    return Run(method=FLAGS.method, model_name=FLAGS.model, config=config, seed=FLAGS.seed)


class TextStreamer:
    """Prints decoded text incrementally (re-decodes the ids and prints the new suffix, so
    multi-byte characters split across tokens come out whole)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.printed = ""

    def push(self, ids: list[int]) -> None:
        text = self.tokenizer.decode(ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return
        if text.startswith(self.printed):
            sys.stdout.write(text[len(self.printed):])
            sys.stdout.flush()
            self.printed = text

    def finish(self) -> None:
        sys.stdout.write("\n")
        sys.stdout.flush()
