"""Where a speculative round's time goes, in plain decoding steps (the benchmark's round-cost
breakdown, issue 13 item 4).

On one prompt, three loops run one call at a time from Python, interleaved call by call so that
a shared CPU's drift hits them alike, and each is timed as the median of ``calls`` calls; each
call runs ``rounds_per_call`` rounds (steps) fused in one ``lax.fori_loop`` from the same start
state, as the decoding loop's ``lax.while_loop`` runs them, and is divided by that count:

* a plain decoding step (``DecodeLoop.jit_step``): the unit;
* a round of the method (``SpecLoop.jit_round``: draft, verify, accept, commit);
* a round of the same loop with :class:`TreeShapeDrafter` in the drafter's place: the same tree
  shape and verification settings (width, feature taps), drafts that cost nothing to make.

``round_steps`` = method round / step; ``verify_steps`` = shape-only round / step (the target's
multi-token forward, acceptance and the commit); ``drafting_steps`` = their difference (the
drafter's ``propose`` and ``commit``: its forwards, its LM-head reads, its cache updates). The
loop's per-round work outside the drafter is in ``verify_steps``. Prefill is excluded: the
rounds run after the prompt is in the cache. Methods whose tree changes shape per round
(dynamic trees) get the shape-only round of their template tree; drafters whose verification
width follows their drafts (``verify_widths``) are not comparable this way (the shape-only
drafter fills the whole tree) and the benchmark leaves them out.

One round per Python call (``rounds_per_call=1``, the benchmark's only mode until 2026-12-01)
pays a dispatch and a state copy per round: on 2026-11-30 its figures differed from the in-loop
round cost (``tau / speedup``) by up to 1.4x for 2-node trees. Fused rounds remove that; the
rows may finish (``done``) inside a call when ``rounds_per_call`` is large against the
request's token budget, and then the later rounds still run the full forward (static shapes),
so the timing stays a round's cost.

Axis glossary: B batch (1 here), T tree nodes.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp

from specjax.drafter import DrafterBase, Proposal
from specjax.speculative import SpecLoop
from specjax.tree import DraftTree


@dataclasses.dataclass(frozen=True)
class TreeShapeDrafter(DrafterBase):
    """Drafts the tree of another drafter with each node's sibling rank as its token (distinct
    siblings, nearly always rejected), at no cost; verification as that drafter asks for it.

    Attributes:
      shape: the drafted tree.
      feature_layers / verify_widths / reads_unoffered_outputs: copied from the drafter.
    """

    shape: DraftTree
    feature_layers: tuple = ()
    verify_widths: Any = None
    reads_unoffered_outputs: bool = False

    @classmethod
    def like(cls, drafter) -> "TreeShapeDrafter":
        return cls(drafter.tree, tuple(drafter.feature_layers), drafter.verify_widths,
                   bool(drafter.reads_unoffered_outputs))

    @property
    def tree(self) -> DraftTree:
        return self.shape

    def propose(self, params, state, ctx, key):
        """``tokens int32[B, T]``: the pending token, then every node's rank."""
        del params, key
        ranks = jnp.asarray(self.shape.choice_rank[1:], jnp.int32)
        b = ctx.pending.shape[0]
        tokens = jnp.concatenate([ctx.pending[:, None],
                                  jnp.broadcast_to(ranks, (b, ranks.shape[0]))], axis=1)
        return Proposal(tokens=tokens), state, ctx.cache


def _median_s(samples) -> float:
    return float(statistics.median(samples))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _steps(decode_loop, tparams, state, n: int):
    """``n`` plain steps fused (no donation: the caller reuses ``state``)."""
    return jax.lax.fori_loop(0, n, lambda i, s: decode_loop.step(tparams, s), state)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _rounds(spec_loop, tparams, dparams, state, n: int):
    """``n`` speculative rounds fused (no donation: the caller reuses ``state``)."""
    return jax.lax.fori_loop(0, n, lambda i, s: spec_loop.round(tparams, dparams, s), state)


def breakdown(spec_loop: SpecLoop, decode_loop, tparams, dparams, ids, calls: int = 8,
              key: Optional[jax.Array] = None, rounds_per_call: int = 4) -> dict:
    """``{"step_s", "round_s", "verify_s", "round_steps", "verify_steps", "drafting_steps",
    "calls", "rounds_per_call"}`` for one prompt ``ids`` (see the module docstring).
    ``spec_loop`` and ``decode_loop`` decode with the same settings; each call after one
    compiling warm-up call is timed; ``*_s`` are per round (step)."""
    if calls < 1 or rounds_per_call < 1:
        raise ValueError(f"calls and rounds_per_call must be at least 1, got {calls} and "
                         f"{rounds_per_call}")
    key = jax.random.key(0) if key is None else key
    free = dataclasses.replace(spec_loop, drafter=TreeShapeDrafter.like(spec_loop.drafter))
    batch, slots = spec_loop.prepare([ids])
    free_batch, free_slots = free.prepare([ids])
    plain_batch, plain_slots = decode_loop.prepare([ids])
    states = {"step": decode_loop.jit_start(tparams, plain_batch, key, plain_slots),
              "round": spec_loop.jit_start(tparams, dparams, batch, key, slots),
              "verify": free.jit_start(tparams, (), free_batch, key, free_slots)}
    n = rounds_per_call
    advance = {"step": lambda s: _steps(decode_loop, tparams, s, n),
               "round": lambda s: _rounds(spec_loop, tparams, dparams, s, n),
               "verify": lambda s: _rounds(free, tparams, (), s, n)}
    times = {name: [] for name in states}
    for i in range(calls + 1):
        for name in states:
            t0 = time.perf_counter()
            jax.block_until_ready(advance[name](states[name]))
            if i:  # the first call compiles
                times[name].append((time.perf_counter() - t0) / n)
    step, round_s, verify = (_median_s(times[n]) for n in ("step", "round", "verify"))
    return {"step_s": step, "round_s": round_s, "verify_s": verify,
            "round_steps": round_s / step, "verify_steps": verify / step,
            "drafting_steps": (round_s - verify) / step, "calls": calls,
            "rounds_per_call": rounds_per_call}
