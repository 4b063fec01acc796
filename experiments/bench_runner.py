"""Timing one method on one loaded model, prompt by prompt (the benchmark's and tree tuning's
runner), through the same :class:`experiments.methods.Run` and
:class:`specjax.engine.Engine` as ``generate``.

Each (method, prompt-length bucket) is compiled ahead of time once and the first prompt is run
once untimed (warm-up); every prompt is then timed from the call to the ready result, prefill
included, compilation excluded.
"""

from __future__ import annotations

import os
import platform
from typing import Sequence

import jax

from experiments import methods


class MethodRunner:
    """One :class:`~experiments.methods.Run` on one loaded model.

    Args:
      run: the configured method.
      loaded: the model (``models.registry.LoadedModel``), params placed on ``run.plan``.
      drafter: ``(drafter, params)`` to use instead of ``run.drafter(loaded)`` (tree tuning
        times trees the registry does not name).
    """

    def __init__(self, run: methods.Run, loaded, drafter=None):
        self.run, self.loaded = run, loaded
        self.drafter, self.dparams = drafter if drafter is not None else run.drafter(loaded)
        self.engine = run.engine(loaded, self.drafter)
        self.key = jax.random.key(run.seed)
        self._compiled: dict[int, object] = {}
        self._released: set[int] = set()
        self.compile_s = 0.0
        self.warmed = False

    @property
    def buckets(self) -> list[int]:
        return sorted(set(self._compiled) | self._released)

    def release(self) -> None:
        """Drops the compiled programs (``buckets`` stays readable). A run of many methods x
        prompt buckets otherwise keeps every program alive until the process ends: on
        2026-12-01, 18 methods x 6 buckets plus the round-cost programs made XLA:CPU's compiler
        fail ("LLVM compilation error: Cannot allocate memory", then a crash) with most of the
        RAM free, most likely at the kernel's limit on memory maps (``vm.max_map_count``,
        65530 here); with this release the same run completed."""
        self._released |= set(self._compiled)
        self._compiled.clear()

    def __call__(self, ids: Sequence[int]) -> dict:
        """Generates for one prompt; returns its record (tokens, timing, statistics)."""
        batch, _ = self.engine.loop.prepare([ids])
        bucket = int(batch.tokens.shape[1])
        if bucket not in self._compiled:
            compiled = self.engine.compile(self.loaded.params, self.dparams, batch, self.key)
            self.compile_s += compiled.compile_s
            self._compiled[bucket] = compiled
        compiled = self._compiled[bucket]
        if not self.warmed:
            compiled.run(batch)
            self.warmed = True
        gen = compiled.run(batch)
        n = len(gen.tokens[0])
        rec = {"bucket": bucket, "generated_ids": gen.tokens[0], "new_tokens": n,
               "wall_s": gen.wall_s, "tokens_per_s": n / gen.wall_s if gen.wall_s > 0 else 0.0}
        s = gen.stats
        if self.drafter is None:
            rec["target_calls"] = s.target_calls
        else:
            rec |= {"target_calls": s.row_calls, "rounds": s.row_rounds, "drafted": s.drafted,
                    "accepted": s.accepted, "accepted_at_depth": list(s.accepted_at_depth)}
        rec["tau"] = n / max(1, rec["target_calls"])
        return rec


def environment() -> dict:
    """The machine and software a benchmark ran on (for its JSON)."""
    from experiments import hf_peer
    return {"jax": jax.__version__, "jax_backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()], "cpu_cores": hf_peer.num_cores(),
            "python": platform.python_version(), "machine": platform.machine(),
            "load_average": [round(x, 2) for x in os.getloadavg()]}
