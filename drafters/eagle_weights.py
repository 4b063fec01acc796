"""EAGLE layer weights: safetensors files in the head drafters' format
(``drafters/head_weights.py``: the layer's params only, bf16 by default, JSON metadata validated
against the target on load), the shipped SmolLM2 layer, random params for tests, and the
registered ``eagle`` method (its options build the drafter from the shipped weights).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax

from drafters import head_weights, heads, registry
from drafters.eagle import EagleDrafter


# Weights files ---------------------------------------------------------------------------------


def save_weights(path, drafter: EagleDrafter, params, *, target_name: str = "",
                 dtype: str = "bfloat16", extra: Optional[dict] = None) -> str:
    """Writes the layer params only (no embedding / LM head), atomically."""
    return head_weights.save_weights(path, drafter, params, target_name=target_name,
                                     dtype=dtype, extra=extra)


def load_weights(path, drafter: EagleDrafter, dtype: Optional[str] = None) -> dict:
    """Layer params for ``drafter`` from ``path``.

    Raises:
      head_weights.HeadWeightsError: missing / damaged file, another drafter type, or a file
        made for a target of another size or vocabulary.
    """
    config, flat = head_weights.read_weights(path)
    want = drafter.config_dict()
    if config.get("drafter") != want["drafter"]:
        raise head_weights.HeadWeightsError(
            f"{path} holds {config.get('drafter')!r} weights, not 'eagle'")
    for key in want:
        if key != "drafter" and config.get(key) != want[key]:
            what = {"vocab_size": "vocabulary", "hidden_size": "hidden size"}.get(key, key)
            raise head_weights.HeadWeightsError(
                f"{path} was trained for a target with {what} {config.get(key)}, this target "
                f"has {want[key]}: the EAGLE layer belongs to another model (target "
                f"{config.get('target') or 'unknown'!r})")
    return head_weights.params_from_flat(path, flat, drafter, "the EAGLE layer", dtype)


def load_shipped(target, model_name: Optional[str] = None, *, path: Optional[str] = None,
                 tree: str = "static", **create_kwargs):
    """``(drafter, params)``: the trained EAGLE layer for ``target`` (a ``LoadedModel`` or a
    ``LlamaModel``), from ``drafters/weights/<model_name>/eagle.safetensors`` or ``path``.

    ``tree``: ``"static"`` (the static tree tuned for these weights, ``eagle.tree.json``, when
    there is one, else :data:`~drafters.eagle.DEFAULT_CHOICES`), ``"tunedN"`` (the tuned
    N-node static tree), ``"generic"`` (``DEFAULT_CHOICES``, whole vocabulary) or
    ``"dynamic"`` (EAGLE-2). Unless given in ``create_kwargs``, ``draft_vocab`` is the tuned
    file's (for the dynamic tree too: it is a property of the layer's drafts, not the tree).
    Other ``create_kwargs`` go to :meth:`EagleDrafter.create` (``budget``, ``choices``...).
    """
    if hasattr(target, "model") and hasattr(target, "params"):  # a LoadedModel
        model_name = model_name or target.name
        target = target.model
    path = path or head_weights.shipped_path("eagle", model_name or "smollm2-135m")
    kwargs = dict(create_kwargs)
    if tree == "dynamic":  # the tuned file's draft_vocab, when there is a file
        kwargs.setdefault("draft_vocab", head_weights.tuned_tree(None, path)[1])
        drafter = EagleDrafter.create(target, "dynamic", **kwargs)
    else:
        if kwargs.get("choices") is None:
            choices, vocab = head_weights.tuned_tree(None if tree == "static" else tree, path,
                                                     head_weights.is_packed(target))
            kwargs["choices"] = choices
            kwargs.setdefault("draft_vocab", vocab)
        elif tree != "static":
            raise ValueError(f"tree={tree!r} with explicit choices: use tree='static'")
        drafter = EagleDrafter.create(target, "static", **kwargs)
    return drafter, load_weights(path, drafter)


def random_params(drafter: EagleDrafter, seed: int = 0, scale: float = 1.0) -> dict:
    """Untrained params at unit-preserving scales (tests; the init of training is
    :meth:`EagleDrafter.init_params`)."""
    params = drafter.init_params(jax.random.key(seed))
    e = drafter.hidden_size
    fan_in = {"fc": 2 * e, "wo": drafter.target.config.num_heads * drafter.target.config.head_dim,
              "w_down": drafter.target.config.intermediate_size}
    names = sorted(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(names))
    out = {}
    for name, key in zip(names, keys):
        leaf = params[name]
        if leaf.ndim == 1:  # norms
            out[name] = leaf + 0.1 * jax.random.normal(key, leaf.shape)
        else:
            std = scale / math.sqrt(fan_in.get(name, e))
            out[name] = std * jax.random.normal(key, leaf.shape)
    return out


# The method -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EagleOptions(registry.Options):
    tree: str = registry.option(
        "static", "static: the EAGLE-1 tree tuned for the shipped layer; tunedN: its best "
        "N-node tree; generic: the built-in tree; dynamic: EAGLE-2 (top-k expansion per depth, "
        "reranked to a node budget).", choices=("static", "dynamic", "tunedN", "generic"),
        patterns=heads.TUNED_N)
    draft_vocab: Optional[int] = registry.option(
        None, "Draft from token ids < N only (0 = all; default: the tuned tree file's).",
        minimum=0)


def build(ctx: registry.BuildContext, options: EagleOptions):
    kwargs = {} if options.draft_vocab is None else {"draft_vocab": options.draft_vocab}
    return load_shipped(ctx.lm, tree=options.tree, **kwargs)


registry.register(registry.Method(
    "eagle", EagleOptions, build,
    "EAGLE: one decoder layer drafts in the target's feature space (static or dynamic trees)",
    weights="eagle", order=90))
