"""Benchmark metrics: per-prompt records pooled into tau, speed, speedup and acceptance.

Definitions (Spec-Bench's where there is one):

* ``tau``: new tokens / target forward passes (prefill counted as a call that yields a token;
  bonus tokens included), pooled over the prompts.
* ``tokens_per_s``: mean over prompts of new tokens / wall seconds.
* ``speedup``: a method's mean per-prompt tokens/s over ``ar``'s in the same run;
  ``speedup_wall``: ``ar``'s total wall time over the method's, on the same prompts.
* ``accept_rate_by_depth[d]``: accepted drafts at depth ``d + 1`` per (row, round) pair.
* ``round_cost`` (the report's): ``tau / speedup``, what one round costs in plain steps.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def first_mismatch(a: Sequence[int], b: Sequence[int]) -> Optional[int]:
    """Index of the first differing token (a length difference counts), or None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def aggregate(records: Sequence[dict], baseline: Optional[Sequence[dict]] = None) -> dict:
    """Pooled metrics of some prompts' records (see the module docstring)."""
    new = sum(r["new_tokens"] for r in records)
    wall = sum(r["wall_s"] for r in records)
    tps = float(np.mean([r["tokens_per_s"] for r in records])) if records else 0.0
    out = {"prompts": len(records), "new_tokens": new, "wall_s": wall, "tokens_per_s": tps,
           "tokens_per_s_total": new / wall if wall > 0 else 0.0}
    if records and "target_calls" in records[0]:
        out["target_calls"] = sum(r["target_calls"] for r in records)
        out["tau"] = new / max(1, out["target_calls"])
    if records and "rounds" in records[0]:
        rounds = sum(r["rounds"] for r in records)
        drafted = sum(r["drafted"] for r in records)
        accepted = sum(r["accepted"] for r in records)
        depth = np.sum([r["accepted_at_depth"] for r in records], axis=0)
        out |= {"rounds": rounds, "acceptance_rate": accepted / max(1, drafted),
                "accept_rate_by_depth": [round(float(a) / max(1, rounds), 4) for a in depth]}
    if baseline:
        base = aggregate(baseline)
        out["speedup"] = tps / base["tokens_per_s"] if base["tokens_per_s"] else 0.0
        out["speedup_wall"] = base["wall_s"] / wall if wall > 0 else 0.0
    if records and "matches_ar" in records[0]:
        out["mismatches"] = sum(not r["matches_ar"] for r in records)
    return out


def summarize(records: Sequence[dict], baseline: Optional[Sequence[dict]], groups: Sequence[str]
              ) -> dict:
    """``{"by_category": {group: metrics}, "overall": metrics}``; records and baseline are in
    prompt order and carry ``group``."""
    by = {}
    for g in groups:
        idx = [i for i, r in enumerate(records) if r["group"] == g]
        by[g] = aggregate([records[i] for i in idx],
                          [baseline[i] for i in idx] if baseline else None)
    return {"by_category": by, "overall": aggregate(records, baseline)}


