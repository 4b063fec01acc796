"""Suffix automata for SAM-Decoding (``drafters/sam.py``): a static one built on the host over a
corpus, and a per-row dynamic one built on the device, token by token, over a row's history.

A suffix automaton (SAM) of a text is the smallest automaton accepting exactly its substrings.
Its states are the classes of substrings with the same set of end positions; ``length[v]`` is
the longest string of state ``v``, ``link[v]`` the state of its longest suffix that lies in
another class (the suffix link), and ``firstpos[v]`` an end position of the strings of ``v``.
The standard online construction adds one token at a time (new state, suffix-link walk adding
transitions, clone of a state when a class splits, redirection of transitions to the clone);
everything here uses it.

**Matching.** The longest suffix of a text that occurs in an automaton's text is tracked
incrementally as ``(state, match_len)``: to read a token, follow suffix links (``match_len =
length[link]``) until the state has a transition by it, then take it (``match_len + 1``); at the
root without one the match is empty. A continuation of the match is the text after its end
position ``firstpos[state]``.

**Static automaton** (:func:`build_static`, numpy, offline): the sequences are concatenated with
a separator ``vocab_size`` after each one (no query token equals it, so no match contains it,
and continuations stop there). States whose strings all contain a separator are dropped, and
so are transitions by the separator: what remains accepts exactly the substrings of the
sequences. ``firstpos[v]`` is the end position, among all of ``v``'s, whose continuation
before the next separator is longest (capped at ``continuation_cap``; the earliest on ties).
Arrays (int32 on the device; stored compact):

  length, link, firstpos [S]; offsets [S+1]; edge_token, edge_dest [E]; tokens [N]

with the transitions of state ``v`` at ``offsets[v]:offsets[v+1]``, sorted by token
(:func:`static_step` finds one by a binary search of fixed iteration count).

**Dynamic automaton** (:class:`DynamicAutomaton`, jnp, one per batch row): fixed-capacity arrays
for a history of ``H`` slots: ``S = 2H`` states and ``E = 3H`` transitions, kept as an
unordered edge list ``(edge_src, edge_token, edge_dest)`` found by a vectorized compare.
Capacity: a SAM over ``n`` tokens has at most ``2n - 1`` states for ``n >= 2`` (2 for ``n =
1``) and at most ``3n - 4`` transitions for ``n >= 3`` (3 for ``n = 2``, 1 for ``n = 1``), so
at most ``2n`` and ``3n``; within one extension the counts only grow, so they never pass the
final ones. With ``n <= H`` tokens every write is in range; :func:`extend` must not be called
for more than ``H`` tokens (the caller bounds positions by ``H``). State reads index states
below ``num_states``; edge lookups compare whole arrays whose unused slots (-1) match nothing.
``firstpos`` here is the FIRST end position (the standard one): its continuation is the
longest the history holds, where the most recent occurrence would give the shortest.

Axis glossary: B batch rows, H history slots, S automaton states, E edges (transitions),
N corpus tokens.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from drafters import head_weights
from specjax.files import write_atomic

NAME = "sam"
FORMAT = "specjax-sam-v1"
ROOT = 0
DEFAULT_CONTINUATION_CAP = 32
STATIC_KEYS = ("length", "link", "firstpos", "offsets", "edge_token", "edge_dest", "tokens")
BUILD_HINT = "build one with python -m experiments.build_sam_automaton"


# The static automaton (host) ------------------------------------------------------------------


def _online_sam(tokens):
    """The standard online construction over ``tokens`` (a list of ints): ``(length, link,
    firstpos, is_clone, trans)`` as Python lists (``trans[v]`` a dict token -> state)."""
    length, link, firstpos, is_clone, trans = [0], [-1], [-1], [False], [{}]
    last = ROOT
    for i, c in enumerate(tokens):
        cur = len(length)
        length.append(length[last] + 1), link.append(ROOT), firstpos.append(i)
        is_clone.append(False), trans.append({})
        p = last
        while p != -1 and c not in trans[p]:
            trans[p][c] = cur
            p = link[p]
        if p != -1:
            q = trans[p][c]
            if length[p] + 1 == length[q]:
                link[cur] = q
            else:
                clone = len(length)
                length.append(length[p] + 1), link.append(link[q]), firstpos.append(firstpos[q])
                is_clone.append(True), trans.append(dict(trans[q]))
                while p != -1 and trans[p].get(c) == q:
                    trans[p][c] = clone
                    p = link[p]
                link[q] = link[cur] = clone
        last = cur
    return length, link, firstpos, is_clone, trans


def build_static(sequences, vocab_size: int,
                 continuation_cap: int = DEFAULT_CONTINUATION_CAP) -> dict:
    """The static automaton over ``sequences`` (lists of token ids in ``0..vocab_size-1``):
    ``{name: int32 array}`` for :data:`STATIC_KEYS` (see the module docstring)."""
    seqs = [np.asarray(s, np.int64).reshape(-1) for s in sequences]
    seqs = [s for s in seqs if s.size]
    if not seqs:
        raise ValueError("the static automaton needs at least one non-empty token sequence")
    if not 1 <= vocab_size < 2 ** 31 - 1:
        raise ValueError(f"vocab_size must be in 1..{2 ** 31 - 2}, got {vocab_size}")
    for s in seqs:
        if s.min() < 0 or s.max() >= vocab_size:
            raise ValueError(f"token ids must be in 0..{vocab_size - 1}")
    sep = vocab_size
    tokens = np.concatenate([np.append(s, sep) for s in seqs])
    n = tokens.size
    length, link, firstpos, is_clone, trans = _online_sam(tokens.tolist())
    length, link, firstpos = (np.asarray(a, np.int64) for a in (length, link, firstpos))
    # Continuation length after each position, up to the next separator (capped).
    is_sep = tokens == sep
    next_sep = np.minimum.accumulate(np.where(is_sep, np.arange(n), n)[::-1])[::-1]
    cont = np.minimum(next_sep - np.arange(n) - 1, continuation_cap).tolist()
    # Best end position per state: own position (non-clones) or a descendant's in the link tree
    # (children are longer than their parent: visit by decreasing length).
    best = np.where(np.asarray(is_clone), -1, firstpos)
    best[ROOT] = -1
    best, link_l = best.tolist(), link.tolist()
    score = [cont[b] if b >= 0 else -1 for b in best]
    for v in np.argsort(-length, kind="stable").tolist():
        u = link_l[v]
        if u > ROOT and (score[v] > score[u] or (score[v] == score[u] and best[v] < best[u])):
            best[u], score[u] = best[v], score[v]
    best = np.asarray(best, np.int64)
    # Keep states whose shortest string (length[link] + 1 tokens ending at any end position)
    # holds no separator; that set is closed under suffix links and separator-free transitions.
    prev_sep = np.maximum.accumulate(np.where(is_sep, np.arange(n), -1))
    first = np.maximum(firstpos, 0)
    keep = prev_sep[first] < firstpos - length[np.maximum(link, 0)]
    keep[ROOT] = True
    new_id = np.cumsum(keep) - 1
    src, tok, dst = [], [], []
    for v in np.flatnonzero(keep).tolist():
        for c, d in trans[v].items():
            if c != sep:
                src.append(new_id[v]), tok.append(c), dst.append(d)
    dst = np.asarray(dst, np.int64)
    assert keep[dst].all(), "a separator-free transition reached a dropped state"
    src, tok, dst = np.asarray(src, np.int64), np.asarray(tok, np.int64), new_id[dst]
    order = np.lexsort((tok, src))
    kept = np.flatnonzero(keep)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(src, minlength=kept.size))])
    out = {"length": length[kept], "link": np.where(link[kept] >= 0, new_id[link[kept]], -1),
           "firstpos": best[kept], "offsets": offsets, "edge_token": tok[order],
           "edge_dest": dst[order], "tokens": tokens}
    return {k: v.astype(np.int32) for k, v in out.items()}


def _compact(a: np.ndarray) -> np.ndarray:
    lo, hi = int(a.min(initial=0)), int(a.max(initial=0))
    for dtype in (np.uint16, np.int16, np.uint32, np.int32):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return np.ascontiguousarray(a, dtype)
    raise ValueError("automaton arrays must fit int32")


def save_static(path: str, arrays: dict, vocab_size: int, *, source: str = "",
                command: str = "") -> str:
    """Writes a static automaton (each array in the smallest of uint16 / int16 / uint32 / int32
    that holds it) as safetensors with its provenance, atomically; returns the absolute path."""
    from safetensors.numpy import save_file
    data = {k: _compact(np.asarray(arrays[k])) for k in STATIC_KEYS}
    meta = {"drafter": NAME, "format": FORMAT, "vocab_size": str(int(vocab_size)),
            "states": str(data["length"].size), "edges": str(data["edge_token"].size),
            "tokens": str(data["tokens"].size), "source": source, "command": command}
    return os.path.abspath(write_atomic(path, lambda tmp: save_file(data, tmp, metadata=meta)))


def check_static(arrays: dict, vocab_size: int) -> dict:
    """``arrays`` as int32 numpy arrays after checking their shapes and ranges (ValueError)."""
    missing = [k for k in STATIC_KEYS if k not in arrays]
    if missing:
        raise ValueError(f"missing arrays {', '.join(missing)}")
    a = {k: np.asarray(arrays[k]) for k in STATIC_KEYS}
    for k, v in a.items():
        if v.ndim != 1 or v.dtype.kind not in "iu" or v.size >= 2 ** 31:
            raise ValueError(f"{k} must be a 1-D integer array, got {v.dtype}{list(v.shape)}")
    a = {k: v.astype(np.int64) for k, v in a.items()}
    s, e, n = a["length"].size, a["edge_token"].size, a["tokens"].size
    off = a["offsets"]

    def bad(name, ok):
        if not ok:
            raise ValueError(f"{name} is inconsistent")
    bad("the state arrays' sizes", s >= 1 and a["link"].size == s and a["firstpos"].size == s
        and off.size == s + 1 and a["edge_dest"].size == e and n >= 1)
    bad("offsets", off[0] == 0 and off[-1] == e and (np.diff(off) >= 0).all())
    bad("link", a["link"][ROOT] == -1 and (a["link"][1:] >= 0).all() and
        (a["link"] < s).all() and (a["length"][np.maximum(a["link"][1:], 0)] <
                                   a["length"][1:]).all())
    bad("length", a["length"][ROOT] == 0 and (a["length"] <= n).all())
    bad("firstpos", (a["firstpos"] >= -1).all() and (a["firstpos"] < n).all() and
        (a["firstpos"][1:] >= 0).all())
    bad("edge_dest", e == 0 or (a["edge_dest"].min() >= 1 and a["edge_dest"].max() < s))
    tok = a["edge_token"]
    src = np.repeat(np.arange(s), np.diff(off))
    bad("edge_token", e == 0 or (tok.min() >= 0 and tok.max() < vocab_size and
                                 ((np.diff(tok) > 0) | (np.diff(src) > 0)).all()))
    bad("tokens", a["tokens"].min() >= 0 and a["tokens"].max() <= vocab_size)
    return {k: v.astype(np.int32) for k, v in a.items()}


def load_static(path: str, vocab_size: int) -> dict:
    """The static automaton stored at ``path`` for a target of ``vocab_size`` tokens, as int32
    numpy arrays; :class:`~drafters.head_weights.HeadWeightsError` saying what to do otherwise."""
    from safetensors import SafetensorError, safe_open
    from safetensors.numpy import load_file
    err = head_weights.HeadWeightsError
    if not os.path.isfile(path):
        raise err(f"no suffix automaton at {path}: {BUILD_HINT}")
    try:
        with safe_open(path, "numpy") as f:
            meta = f.metadata() or {}
        arrays = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise err(f"{path} is not a suffix automaton file ({e}): {BUILD_HINT}")
    if meta.get("drafter") != NAME or meta.get("format") != FORMAT:
        raise err(f"{path} is not a suffix automaton file (drafter {meta.get('drafter')!r}, "
                  f"format {meta.get('format')!r}): {BUILD_HINT}")
    if meta.get("vocab_size") != str(vocab_size):
        raise err(f"{path} was built for a vocabulary of {meta.get('vocab_size')} tokens, the "
                  f"target has {vocab_size}: {BUILD_HINT} --model=<this target>")
    try:
        return check_static(arrays, vocab_size)
    except ValueError as e:
        raise err(f"{path} is a damaged suffix automaton ({e}): {BUILD_HINT}")


# Matching (device) ----------------------------------------------------------------------------


def _advance(find, link, length, state, match_len, token):
    """One token read by the match ``(state, match_len)``: suffix links are followed while the
    state has no transition by ``token`` (``find(state, token) -> (found, dest)``)."""
    found, dest = find(state, token)

    def cond(c):
        return ~c[2] & (c[0] != ROOT)

    def body(c):
        s = jnp.maximum(link[c[0]], ROOT)  # c[0] != ROOT here: a state with a link
        f, d = find(s, token)
        return s, length[s], f, d

    _, n, found, dest = jax.lax.while_loop(cond, body, (state, match_len, found, dest))
    return jnp.where(found, dest, ROOT), jnp.where(found, n + 1, 0)


def search_steps(vocab_size: int) -> int:
    """Bisection steps that find a token among at most ``vocab_size`` sorted transitions."""
    return int(vocab_size).bit_length()


def static_step(arrays: dict, state, match_len, token, steps: int):
    """Reads ``token`` into the static match ``(state, match_len)`` (int32 scalars; vmap for
    rows): ``(state, match_len)`` of the longest suffix that occurs in the corpus. ``steps``:
    :func:`search_steps` of the vocabulary (a static bound on a state's transitions)."""
    offsets, edge_token, edge_dest = arrays["offsets"], arrays["edge_token"], arrays["edge_dest"]
    last_edge = edge_token.shape[0] - 1

    def find(s, tok):
        start, end = offsets[s], offsets[s + 1]

        def bisect(_, lh):
            lo, hi = lh
            open_ = lo < hi
            mid = (lo + hi) // 2  # < hi <= E while the range is open
            below = edge_token[jnp.minimum(mid, last_edge)] < tok  # read only if open
            return (jnp.where(open_ & below, mid + 1, lo), jnp.where(open_ & ~below, mid, hi))

        lo, _ = jax.lax.fori_loop(0, steps, bisect, (start, end))
        hit = jnp.minimum(lo, last_edge)  # used only when lo < end <= E
        found = (lo < end) & (edge_token[hit] == tok)
        return found, jnp.where(found, edge_dest[hit], ROOT)

    return _advance(find, arrays["link"], arrays["length"], state, match_len, token)


# The dynamic automaton (device, one per row) --------------------------------------------------


@struct.dataclass
class DynamicAutomaton:
    """One row's suffix automaton in fixed capacity (add a leading ``[B]`` axis for a batch).

    Attributes:
      length, link, firstpos: int32[S] (``S = 2H``); unused states 0 / -1 / -1. ``firstpos``
        is the first end position (the history index) of the state's strings.
      edge_src, edge_token, edge_dest: int32[E] (``E = 3H``) the transitions, unordered; unused
        slots -1 (never equal to a state or a token).
      num_states, num_edges: int32 used entries; last: int32 the state of the whole text.
    """

    length: jax.Array
    link: jax.Array
    firstpos: jax.Array
    edge_src: jax.Array
    edge_token: jax.Array
    edge_dest: jax.Array
    num_states: jax.Array
    num_edges: jax.Array
    last: jax.Array


def empty_dynamic(batch: int, history_slots: int) -> DynamicAutomaton:
    """``batch`` automata of the empty text, each sized for ``history_slots`` (H) tokens."""
    s, e = 2 * history_slots, 3 * history_slots
    full = lambda n, v: jnp.full((batch, n), v, jnp.int32)  # noqa: E731
    scalar = lambda v: jnp.full((batch,), v, jnp.int32)  # noqa: E731
    return DynamicAutomaton(full(s, 0), full(s, -1), full(s, -1), full(e, -1), full(e, -1),
                            full(e, -1), scalar(1), scalar(0), scalar(ROOT))


def _find(src, tok, state, token):
    """``(found, index)`` of the transition ``(state, token)`` in an edge list (unique)."""
    hit = (src == state) & (tok == token)
    index = jnp.argmax(hit)
    return hit[index], index


def dynamic_step(a: DynamicAutomaton, state, match_len, token):
    """Reads ``token`` into the match ``(state, match_len)`` against one row's automaton."""
    def find(s, t):
        found, i = _find(a.edge_src, a.edge_token, s, t)
        return found, jnp.where(found, a.edge_dest[i], ROOT)
    return _advance(find, a.link, a.length, state, match_len, token)


def extend(a: DynamicAutomaton, token, pos) -> DynamicAutomaton:
    """One row's automaton after appending ``token`` at history index ``pos`` (< H).

    The loops carry only what they change (the edge list; the links stay fixed while they
    walk). The clone's writes are gated by index: a row that does not split writes to index
    ``S`` / ``E``, which ``mode="drop"`` discards (never a capacity overflow, see above)."""
    num_s, num_e = a.length.shape[0], a.edge_src.shape[0]
    cur, link = a.num_states, a.link
    length = a.length.at[cur].set(a.length[a.last] + 1)
    firstpos = a.firstpos.at[cur].set(pos)

    def missing(c):
        p, src, tok, _, _ = c
        return (p != -1) & ~_find(src, tok, p, token)[0]

    def add(c):  # the transition p --token--> cur, then up p's suffix link
        p, src, tok, dst, n = c
        return (link[jnp.maximum(p, 0)], src.at[n].set(p), tok.at[n].set(token),
                dst.at[n].set(cur), n + 1)

    p, src, tok, dst, num_edges = jax.lax.while_loop(
        missing, add, (a.last, a.edge_src, a.edge_token, a.edge_dest, a.num_edges))
    p0 = jnp.maximum(p, 0)  # reads through p matter only when p >= 0
    qi = _find(src, tok, p0, token)[1]  # found when p >= 0: the walk stopped there
    q = jnp.where(p >= 0, dst[qi], ROOT)
    solid = (p >= 0) & (length[p0] + 1 == length[q])
    split = (p >= 0) & ~solid
    clone = cur + 1
    link = link.at[cur].set(jnp.where(p < 0, ROOT, jnp.where(solid, q, clone)))
    # The clone: p's length + 1, q's link, end position and transitions; then q links to it.
    at = jnp.where(split, clone, num_s)
    length = length.at[at].set(length[p0] + 1, mode="drop")
    firstpos = firstpos.at[at].set(firstpos[q], mode="drop")
    link = link.at[at].set(link[q], mode="drop").at[jnp.where(split, q, num_s)].set(
        clone, mode="drop")
    mine = (src == q) & split
    slot = jnp.where(mine, num_edges + jnp.cumsum(mine) - 1, num_e)
    src = src.at[slot].set(clone, mode="drop")
    tok = tok.at[slot].set(tok, mode="drop")
    dst = dst.at[slot].set(dst, mode="drop")
    num_edges = num_edges + mine.sum(dtype=jnp.int32)

    def to_q(c):  # p's chain still leads to q by token: redirect it to the clone
        p, dst = c
        found, i = _find(src, tok, p, token)
        return split & (p != -1) & found & (dst[i] == q)

    def redirect(c):
        p, dst = c
        i = _find(src, tok, p, token)[1]
        return a.link[jnp.maximum(p, 0)], dst.at[i].set(clone)

    _, dst = jax.lax.while_loop(to_q, redirect, (p, dst))
    return DynamicAutomaton(length, link, firstpos, src, tok, dst,
                            cur + 1 + split.astype(jnp.int32), num_edges, cur)


def settle(a: DynamicAutomaton, state, match_len):
    """The match's state after an :func:`extend`: a clone may have taken over the shorter
    strings of ``state`` (one split per extension), then the match lives in its suffix link."""
    up = (state != ROOT) & (a.length[jnp.maximum(a.link[state], 0)] >= match_len)
    return jnp.where(up, a.link[state], state)
