"""Where a speculative round's time goes, in plain decoding steps (the benchmark's round-cost
breakdown, issue 13 item 4).

On one prompt, three loops run one call at a time from Python, interleaved call by call so that
a shared CPU's drift hits them alike, and each is timed as the median of ``calls`` calls:

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

Per-call timings from Python can differ from the in-loop round cost (``tau / speedup``): on
2026-11-30 up to 1.4x for 2-node trees. Read the split, not the absolute values.

Axis glossary: B batch (1 here), T tree nodes.
"""

from __future__ import annotations

import dataclasses
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


def breakdown(spec_loop: SpecLoop, decode_loop, tparams, dparams, ids, calls: int = 8,
              key: Optional[jax.Array] = None) -> dict:
    """``{"step_s", "round_s", "verify_s", "round_steps", "verify_steps", "drafting_steps",
    "calls"}`` for one prompt ``ids`` (see the module docstring). ``spec_loop`` and
    ``decode_loop`` decode with the same settings; each call after one compiling warm-up call
    is timed."""
    key = jax.random.key(0) if key is None else key
    free = dataclasses.replace(spec_loop, drafter=TreeShapeDrafter.like(spec_loop.drafter))
    batch, slots = spec_loop.prepare([ids])
    free_batch, free_slots = free.prepare([ids])
    plain_batch, plain_slots = decode_loop.prepare([ids])
    states = {"step": decode_loop.jit_start(tparams, plain_batch, key, plain_slots),
              "round": spec_loop.jit_start(tparams, dparams, batch, key, slots),
              "verify": free.jit_start(tparams, (), free_batch, key, free_slots)}
    advance = {"step": lambda s: decode_loop.jit_step(tparams, s),
               "round": lambda s: spec_loop.jit_round(tparams, dparams, s),
               "verify": lambda s: free.jit_round(tparams, (), s)}
    times = {name: [] for name in states}
    for i in range(calls + 1):
        for name in states:
            t0 = time.perf_counter()
            states[name] = jax.block_until_ready(advance[name](states[name]))
            if i:  # the first call compiles
                times[name].append(time.perf_counter() - t0)
    step, round_s, verify = (_median_s(times[n]) for n in ("step", "round", "verify"))
    return {"step_s": step, "round_s": round_s, "verify_s": verify,
            "round_steps": round_s / step, "verify_steps": verify / step,
            "drafting_steps": (round_s - verify) / step, "calls": calls}
