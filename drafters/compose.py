"""Composing drafters: ``first_of`` (each row takes the first part that drafts) and ``merge``
(every part's candidates verified together as one tree).

The seed papers combine a model-free drafter with another one: SAM-Decoding drafts from its
suffix automaton when the match is long enough and otherwise from Token Recycling or EAGLE-2.
:class:`ComposedDrafter` does this for any point-mass drafters of the contract:

* ``first_of(a, b, ...)``: part ``a`` proposes for every row; rows where ``a`` offers no node
  (no match, a table miss) take ``b``'s proposal, and so on. A later part runs only when some
  live row still needs it (``lax.cond``), so a model-based fallback costs nothing in rounds
  where the model-free primary drafted for every row.
* ``merge(a, b, ...)``: every part proposes; the candidate trees share the root and are merged
  into one trie (a node whose token and parent equal an earlier node's is dropped and its
  children move under that node), so the target verifies the union in one pass and the longest
  accepted path wins.

Static shape: ``first_of`` has ``T = max(T_i)`` nodes, ``merge`` ``T = 1 + sum(T_i - 1)``; both
give explicit ``parents`` (a dynamic tree within that budget) and ``max_depth = max(D_i)``.

Lossless: the result is a proposal of point-mass drafts with explicit parents (``parents[n] <
n``), verified by the unchanged rules (greedy; under sampling the deterministic-draft rule, which
accepts any fixed tokens). Every part's ``commit`` gets the verified (composed) proposal and its
accepted path: parts must follow any proposal (``commits_any_proposal``), which every built-in
drafter does except the separate draft model (its cache holds its own drafted tokens); parts
that read the outputs of unoffered nodes (Jacobi, lookahead) or draw sampled drafts are refused.

Axis glossary: B batch, T nodes, P parts, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from drafters import registry
from specjax.drafter import CommitInfo, DraftContext, DrafterBase, Proposal, check_drafter
from specjax.tree import DraftTree

RULES = ("first_of", "merge")


def budget_shape(num_nodes: int, max_depth: int) -> DraftTree:
    """A tree of ``num_nodes`` nodes and depth ``max_depth`` (the dynamic budget's shape):
    ``num_nodes - max_depth`` nodes at depth 1, a chain under node 1."""
    width = num_nodes - max_depth  # depth-1 nodes
    chain = [1] + list(range(width + 1, num_nodes - 1)) if max_depth > 1 else []
    shape = DraftTree.from_parents([-1] + [0] * width + chain)
    assert shape.num_nodes == num_nodes and shape.max_depth == max_depth
    return shape


def _normalized(part, proposal: Proposal):
    """``(tokens, parents, valid)`` ``[B, T_i]`` each: the part's static tree materialized."""
    name = type(part).__name__
    if proposal.depth is not None or proposal.visible is not None:
        raise ValueError(f"{name} overrides node depths or visibility: it cannot be composed")
    if proposal.draft_probs is not None:
        raise ValueError(f"{name} drafted sampled tokens: only point-mass drafts compose")
    b, t = proposal.tokens.shape
    parents = proposal.parents
    if parents is None:
        parents = jnp.broadcast_to(jnp.asarray(part.tree.parents, jnp.int32), (b, t))
    valid = jnp.ones((b, t), bool) if proposal.valid is None else proposal.valid
    return proposal.tokens.astype(jnp.int32), parents.astype(jnp.int32), valid


def _pad(x, width: int, value):
    return jnp.pad(x, ((0, 0), (0, width - x.shape[1])), constant_values=value)


def merge_duplicates(tokens: jax.Array, parents: jax.Array, valid: jax.Array):
    """Merges the tree into a trie: a valid node with the same token and (merged) parent as an
    earlier valid node is marked invalid and its children move under the earlier node.

    Args: ``tokens, parents int32[B, T]``, ``valid bool[B, T]`` with ``parents[n] < n``.
    Returns: ``(parents, valid)``; still ``parents[n] < n``, siblings distinct.
    """
    b, t = tokens.shape
    index = jnp.arange(t, dtype=jnp.int32)

    def body(n, carry):
        canon, parents, valid = carry  # canon[b, m]: the node m merged into (itself if kept)
        parent = jnp.take_along_axis(canon, jnp.maximum(parents[:, n], 0)[:, None], 1)[:, 0]
        parent = jnp.where(parents[:, n] < 0, -1, parent)
        same = (valid & (index[None, :] < n) & (canon == index[None, :])
                & (tokens == tokens[:, n][:, None]) & (parents == parent[:, None]))
        dup = same.any(axis=1) & valid[:, n] & (n > 0)
        first = jnp.argmax(same, axis=1).astype(jnp.int32)
        canon = canon.at[:, n].set(jnp.where(dup, first, n))
        return canon, parents.at[:, n].set(parent), valid.at[:, n].set(valid[:, n] & ~dup)

    canon = jnp.broadcast_to(index, (b, t))
    _, parents, valid = jax.lax.fori_loop(0, t, body, (canon, parents, valid))
    return parents, valid


@dataclasses.dataclass(frozen=True)
class ComposedDrafter(DrafterBase):
    """Static configuration: ``rule`` (``"first_of"`` or ``"merge"``) over ``parts`` (a tuple
    of drafters; params and state are tuples in the same order)."""

    rule: str
    parts: tuple

    deterministic = True
    siblings = "without_replacement"
    verify_widths = "auto"  # no part reads unoffered nodes: padding needs no forward

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"unknown composition {self.rule!r}; choose one of {RULES}")
        if len(self.parts) < 2:
            raise ValueError(f"{self.rule} needs at least two drafters, got {len(self.parts)}")
        for part in self.parts:
            check_drafter(part)
            name = type(part).__name__
            if not part.deterministic:
                raise ValueError(f"{name} draws sampled drafts under these settings: only "
                                 "point-mass drafters compose (decode greedily or choose "
                                 "model-free parts)")
            if part.reads_unoffered_outputs:
                raise ValueError(f"{name} reads the outputs of nodes it did not offer "
                                 "(Jacobi / lookahead): it cannot be composed")
            if not part.commits_any_proposal:
                raise ValueError(f"{name} must verify its own proposals (its state holds its "
                                 "own drafts): it cannot be composed")
        layers = {tuple(p.feature_layers) for p in self.parts}
        if len(layers) > 1:
            raise ValueError("the composed drafters read the features of different target "
                             f"layers {sorted(layers)}: compose drafters that read the same")

    @property
    def tree(self) -> DraftTree:
        sizes = [p.tree.num_nodes for p in self.parts]
        depth = max(p.tree.max_depth for p in self.parts)
        nodes = max(sizes) if self.rule == "first_of" else 1 + sum(s - 1 for s in sizes)
        return budget_shape(nodes, depth)

    @property
    def feature_layers(self) -> tuple:
        return tuple(self.parts[0].feature_layers)

    def check_compatible(self, target) -> None:
        for part in self.parts:
            part.check_compatible(target)

    def init(self, params, ctx, prompt_tokens, prompt_lengths):
        return tuple(part.init(p, ctx, prompt_tokens, prompt_lengths)
                     for part, p in zip(self.parts, params))

    def propose(self, params, state, ctx: DraftContext, key):
        keys = jax.random.split(key, len(self.parts))
        t = self.tree.num_nodes
        served = ctx.done  # first_of: rows that need no later part
        cache, states, drafts = ctx.cache, [], []
        for i, part in enumerate(self.parts):
            def run(cache, st, part=part, p=params[i], k=keys[i]):
                proposal, st, cache = part.propose(p, st, ctx.replace(cache=cache), k)
                return _normalized(part, proposal), st, cache

            if self.rule == "first_of" and i > 0:
                shape = jax.eval_shape(run, cache, state[i])[0]
                skipped = tuple(jnp.zeros(s.shape, s.dtype) for s in shape)
                draft, st, cache = jax.lax.cond(
                    jnp.all(served), lambda c, s: (skipped, s, c), run, cache, state[i])
            else:
                draft, st, cache = run(cache, state[i])
            tokens, parents, valid = draft
            offers = jnp.any(valid[:, 1:], axis=1)
            served = served | offers
            drafts.append((offers, _pad(tokens, t, 0), _pad(parents, t, 0),
                           _pad(valid, t, False)) if self.rule == "first_of" else draft)
            states.append(st)
        tokens, parents, valid = (self._first_of(drafts) if self.rule == "first_of"
                                  else self._merge(drafts))
        tokens = tokens.at[:, 0].set(ctx.pending)
        proposal = Proposal(tokens=tokens, parents=parents, valid=valid)
        return proposal, tuple(states), cache

    @staticmethod
    def _first_of(drafts):
        """Each row: the first part that offers a node (else the last part's proposal)."""
        tokens, parents, valid = drafts[-1][1:]
        for offers, tok, par, val in reversed(drafts[:-1]):
            pick = offers[:, None]
            tokens = jnp.where(pick, tok, tokens)
            parents = jnp.where(pick, par, parents)
            valid = jnp.where(pick, val, valid)
        return tokens, parents, valid

    @staticmethod
    def _merge(drafts):
        """The parts' trees under one root (part ``i``'s node ``n > 0`` at ``off_i + n - 1``),
        then merged into a trie (:func:`merge_duplicates`)."""
        tokens, parents, valid = [drafts[0][0][:, :1]], [drafts[0][1][:, :1]], \
            [drafts[0][2][:, :1]]
        offset = 1
        for tok, par, val in drafts:
            tokens.append(tok[:, 1:])
            parents.append(jnp.where(par[:, 1:] <= 0, 0, par[:, 1:] + offset - 1))
            valid.append(val[:, 1:])
            offset += tok.shape[1] - 1
        tokens, parents, valid = (jnp.concatenate(x, axis=1) for x in (tokens, parents, valid))
        parents = parents.at[:, 0].set(-1)
        parents, valid = merge_duplicates(tokens, parents, valid.at[:, 0].set(True))
        return tokens, parents, valid

    def commit(self, params, state, ctx, info: CommitInfo):
        """Every part learns from what was verified: the composed proposal, its accepted path
        (cut to this tree's depth + 1: deeper entries are always -1)."""
        info = info.replace(path=info.path[:, :self.tree.max_depth + 1])
        return tuple(part.commit(p, st, ctx, info)
                     for part, p, st in zip(self.parts, params, state))


# The methods ----------------------------------------------------------------------------------

PART = r"[a-z][a-z0-9_]*(?::[A-Za-z0-9_]+)?"
PARTS = rf"{PART}(?:\+{PART})+"
DEFAULT_PARTS = "sam+token_recycling"


def parse_parts(spec: str) -> list[tuple[registry.Method, str]]:
    """``"sam+eagle:dynamic"`` -> ``[(sam, ""), (eagle, "dynamic")]`` (ValueError naming the
    problem: an unknown method, plain decoding or a composition as a part, a bad tree)."""
    if not re.fullmatch(PARTS, spec):
        raise ValueError(f"a composition is METHOD+METHOD[+...], each METHOD or METHOD:TREE "
                         f"(e.g. {DEFAULT_PARTS}), got {spec!r}")
    parts = []
    for item in spec.split("+"):
        name, tree = registry.split_name(item)
        method = registry.get(name)
        if name == "ar" or name in RULES:
            raise ValueError(f"{name} cannot be a part of a composition (it drafts nothing "
                             "or is a composition itself)")
        if tree:
            method.make_options(tree=tree)  # ValueError: no such tree / no tree option
        parts.append((method, tree))
    return parts


@dataclasses.dataclass(frozen=True)
class ComposeOptions(registry.Options):
    tree: str = registry.option(
        DEFAULT_PARTS, "The drafters composed, PART+PART[+...], each METHOD or METHOD:TREE with "
        "its default options (e.g. sam+eagle:dynamic).", choices=("PART+PART",),
        patterns={"PART+PART": PARTS})

    def __post_init__(self):
        super().__post_init__()
        try:
            parse_parts(self.tree)  # unknown methods and trees fail before any model loads
        except ValueError as e:
            raise ValueError(f"tree={self.tree}: {e}") from None

    def param_sharding(self) -> str:
        return "replicated"


def _builder(rule: str):
    def build(ctx: registry.BuildContext, options: ComposeOptions):
        parts, params = [], []
        for method, tree in parse_parts(options.tree):
            drafter, dparams = method.build(ctx, method.make_options(
                **({"tree": tree} if tree else {})))
            parts.append(drafter)
            params.append(dparams)
        return ComposedDrafter(rule, tuple(parts)), tuple(params)
    build.__name__ = f"build_{rule}"
    return build


registry.register(registry.Method(
    "first_of", ComposeOptions, _builder("first_of"),
    "each row drafts with the first of several drafters that offers a draft (--tree=A+B: "
    "e.g. a suffix match, else a table or a learned drafter)", order=99))
registry.register(registry.Method(
    "merge", ComposeOptions, _builder("merge"),
    "verifies the candidates of several drafters together as one merged tree (--tree=A+B)",
    order=100))
