"""Trained draft-head weights: safetensors files, the shipped weights and their tuned trees.

A weights file holds the heads' params only (bf16 by default) plus JSON metadata (drafter type,
head config, target hidden size and vocabulary), validated against the target on load. The
weights shipped for a model live in ``drafters/weights/<model>/<name>.safetensors``, next to
the Medusa / Hydra tree tuned for them, ``<name>.tree.json`` (``experiments/tune_tree.py``).
"""

from __future__ import annotations

import json
import os
import re
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from drafters.heads import HeadDrafter
from specjax.files import write_atomic

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
WEIGHTS_FORMAT = "specjax-draft-heads-v1"


class HeadWeightsError(ValueError):
    """A head weights file that is missing, damaged, or made for another target / drafter."""


def _flatten(tree: dict) -> dict:
    """``{"a": {"b": x}}`` -> ``{"a/b": x}``."""
    return traverse_util.flatten_dict(tree, sep="/")


def _unflatten(flat: dict) -> dict:
    return traverse_util.unflatten_dict(flat, sep="/")


def save_weights(path: str | os.PathLike, drafter: HeadDrafter, params, *,
                 target_name: str = "", dtype: str = "bfloat16",
                 extra: Optional[dict] = None) -> str:
    """Writes the drafter's params (only: no embedding / LM head of the target) to a
    safetensors file, atomically: floating leaves as ``dtype``, integer leaves (a draft
    vocabulary map) as they are.

    Returns:
      the absolute path.
    """
    from safetensors.flax import save_file
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    flat = {k: v if np.issubdtype(v.dtype, np.integer) else jnp.asarray(v, dtype)
            for k, v in _flatten(jax.device_get(params)).items()}
    meta = {"format": WEIGHTS_FORMAT, "config": json.dumps(drafter.config_dict()),
            "target": target_name, "extra": json.dumps(extra or {})}
    return write_atomic(path, lambda tmp: save_file(flat, tmp, metadata=meta))


def read_weights(path: str | os.PathLike) -> tuple[dict, dict]:
    """``(config dict, flat params)`` of a weights file; :class:`HeadWeightsError` if it is
    missing or damaged."""
    from safetensors import safe_open
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise HeadWeightsError(f"no head weights file at {path}: train one with "
                               "experiments/train_drafter.py")
    try:
        with safe_open(path, framework="flax") as f:
            meta = f.metadata() or {}
            flat = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("format") != WEIGHTS_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {WEIGHTS_FORMAT!r}")
        config = json.loads(meta["config"])
        config["target"] = meta.get("target", "")
        config["extra"] = json.loads(meta.get("extra", "{}"))
    except HeadWeightsError:
        raise
    except Exception as e:  # safetensors raises several types for truncated / garbage files
        raise HeadWeightsError(f"head weights file {path} is damaged or not a specjax heads "
                               f"file ({type(e).__name__}: {e}); re-train or re-download it"
                               ) from None
    return config, flat


def read_vocab_map(path: str | os.PathLike, drafter: str) -> np.ndarray:
    """``int32[N]`` draft id -> target id of ``drafter``'s weights at ``path`` (a start for
    further training); HeadWeightsError when missing, damaged, another drafter's or without a
    map."""
    config, flat = read_weights(path)
    if config.get("drafter") != drafter:
        raise HeadWeightsError(f"{os.fspath(path)} holds {config.get('drafter')!r} weights, not "
                               f"{drafter!r}")
    if "vocab_map" not in flat:
        raise HeadWeightsError(f"{os.fspath(path)} has no vocab_map: retrain it")
    return np.asarray(flat["vocab_map"], np.int32)

def load_weights(path: str | os.PathLike, drafter: HeadDrafter, dtype: Optional[str] = None
                 ) -> dict:
    """Head params for ``drafter`` from ``path``, checked against its architecture.

    Raises:
      HeadWeightsError: missing / damaged file, another drafter type, another target size or
        vocabulary, or parameter shapes that differ.
    """
    config, flat = read_weights(path)
    want = drafter.config_dict()
    if config.get("drafter") != want["drafter"]:
        raise HeadWeightsError(f"{path} holds {config.get('drafter')!r} heads, not "
                               f"{want['drafter']!r}")
    for key, what in (("hidden_size", "hidden size"), ("vocab_size", "vocabulary")):
        if config.get(key) != want[key]:
            raise HeadWeightsError(
                f"{path} was trained for a target with {what} {config.get(key)}, this target "
                f"has {want[key]}: these heads belong to another model (target "
                f"{config.get('target') or 'unknown'!r})")
    for key in ("num_heads", "num_layers"):
        if config.get(key) != want[key]:
            raise HeadWeightsError(f"{path} has {key}={config.get(key)}, the drafter "
                                   f"{want[key]}: build the drafter with the file's {key}")
    return params_from_flat(path, flat, drafter, "the drafter's parameters", dtype)


def params_from_flat(path, flat: dict, drafter, what: str, dtype: Optional[str] = None) -> dict:
    """The params pytree of a weights file's ``flat`` tensors, cast to ``dtype`` (default: the
    target's param dtype); :class:`HeadWeightsError` naming ``what`` when a shape differs from
    ``drafter.param_shapes()`` (shared by every drafter stored in this format)."""
    shapes = _flatten(jax.tree.map(lambda s: tuple(s.shape), drafter.param_shapes(),
                                   is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct)))
    got = {k: tuple(v.shape) for k, v in flat.items()}
    if got != shapes:
        diff = sorted(k for k in set(got) | set(shapes) if got.get(k) != shapes.get(k))
        raise HeadWeightsError(f"{path} does not fit {what}: "
                               + "; ".join(f"{k}: file {got.get(k)}, drafter {shapes.get(k)}"
                                           for k in diff[:10]))
    dtype = dtype or drafter.target.config.param_dtype
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), _unflatten(flat))


def shipped_path(name: str, model_name: str) -> str:
    return os.path.join(WEIGHTS_DIR, model_name, f"{name}.safetensors")


def tree_file_of(weights_path: str) -> str:
    """The tuned-tree file that goes with a weights file: ``X.safetensors`` -> ``X.tree.json``
    (written by ``experiments/tune_tree.py``)."""
    stem = weights_path[:-len(".safetensors")] if weights_path.endswith(".safetensors") \
        else weights_path
    return stem + ".tree.json"


TREE_HELP = ("tuned (the tree tuned for these weights, its default size), tunedN (its best "
             "N-node tree), generic (the drafter's built-in tree)")


def tuned_tree(tree: Optional[str], weights_path: str,
               packed: bool = False) -> tuple[Optional[list], int]:
    """``(choices, draft_vocab)`` of the Medusa / Hydra tree that ``tree`` names for the
    weights at ``weights_path``.

    ``tree``: ``"tuned"`` (the tuned file's default size, its packed-weights default when
    ``packed`` and the file has one, and its ``draft_vocab``), ``"tunedN"``
    (its first N choices: the best N-node tree on its tuning data), ``"generic"`` (``(None,
    0)``: the drafter's ``DEFAULT_CHOICES``, whole vocabulary), or None (tuned when the weights
    have a tuned file, else generic).

    Raises:
      ValueError: an unknown ``tree`` or N beyond the tuned order.
      TunedTreeError: ``tuned``/``tunedN`` asked for and the file is missing or damaged.
    """
    from specjax import tree_tuning
    path = tree_file_of(weights_path)
    if tree is None:
        tree = "tuned" if os.path.exists(path) else "generic"
    if tree == "generic":
        return None, 0
    match = re.fullmatch(r"tuned(\d*)", tree)
    if not match:
        raise ValueError(f"unknown tree {tree!r}: use {TREE_HELP}")
    tuned = tree_tuning.load_tree_file(path)
    choices = tuned.choices(int(match.group(1)) if match.group(1) else None, packed=packed)
    return [list(c) for c in choices], tuned.draft_vocab


def is_packed(model) -> bool:
    """Whether a target (a ``LlamaModel``) keeps its weights packed (``--weights=gguf|gguf_a8|
    int8``): tuned trees then take their packed-weights default size."""
    return bool(getattr(getattr(model, "config", None), "weight_formats", ()))


DRAFTER_NAMES = ("blockwise", "medusa", "hydra")


def drafter_class(name: str):
    if name == "blockwise":
        from drafters.blockwise import BlockwiseDrafter
        return BlockwiseDrafter
    if name == "medusa":
        from drafters.medusa import MedusaDrafter
        return MedusaDrafter
    if name == "hydra":
        from drafters.hydra import HydraDrafter
        return HydraDrafter
    raise ValueError(f"unknown head drafter {name!r}; choose one of {', '.join(DRAFTER_NAMES)}")


def load_shipped(name: str, target, model_name: Optional[str] = None, *,
                 path: Optional[str] = None, choices=None, max_nodes: Optional[int] = None,
                 tree: Optional[str] = None, **drafter_kwargs):
    """The trained ``name`` heads (``blockwise`` / ``medusa`` / ``hydra``) for ``target``.

    Args:
      name: the drafter type.
      target: a ``LoadedModel`` (from ``models.registry.load``) or a ``LlamaModel``.
      model_name: the registry name the weights were trained for (default: ``target.name``
        for a ``LoadedModel``, else ``smollm2-135m``); picks
        ``drafters/weights/<model_name>/<name>.safetensors``.
      path: an explicit weights file instead.
      choices, max_nodes, drafter_kwargs: passed to the drafter's ``create`` (tree choices for
        medusa / hydra, ``draft_len`` for blockwise, the tree's node budget).
      tree: medusa / hydra without ``choices``: which tree (see :func:`tuned_tree`); by
        default the tree tuned for these weights (``<weights>.tree.json``, with its
        ``draft_vocab``) when there is one.

    Returns:
      ``(drafter, params)``; params in the target's param dtype.

    Raises:
      HeadWeightsError: no file, a damaged file, or weights for another target size /
        vocabulary / drafter type.
      ValueError: a tree over ``max_nodes`` or deeper than the heads.
    """
    cls = drafter_class(name)
    if hasattr(target, "model") and hasattr(target, "params"):  # a LoadedModel
        model_name = model_name or target.name
        target = target.model
    model_name = model_name or "smollm2-135m"
    path = path or shipped_path(name, model_name)
    config, _ = read_weights(path)
    kwargs = dict(drafter_kwargs)
    if choices is None and name in ("medusa", "hydra"):
        choices, vocab = tuned_tree(tree, path, is_packed(target))
        kwargs.setdefault("draft_vocab", vocab)
    elif tree is not None and (name not in ("medusa", "hydra") or choices is not None):
        raise ValueError(f"tree={tree!r} applies to medusa / hydra without explicit choices")
    if choices is not None:
        kwargs["choices"] = choices
    if not isinstance(config.get("num_heads"), int) or not isinstance(config.get("num_layers"),
                                                                      int):
        raise HeadWeightsError(f"{path} lacks num_heads / num_layers in its metadata")
    drafter = cls.create(target, num_heads=config["num_heads"],
                         num_layers=config["num_layers"], max_nodes=max_nodes, **kwargs)
    return drafter, load_weights(path, drafter)
