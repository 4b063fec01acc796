"""EAGLE layer weights: safetensors files in the head drafters' format (``drafters/heads.py``:
the layer's params only, bf16 by default, JSON metadata validated against the target on load),
the shipped SmolLM2 layer, and random params for tests.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from drafters import heads
from drafters.eagle import EagleDrafter


# Weights files ---------------------------------------------------------------------------------


def save_weights(path, drafter: EagleDrafter, params, *, target_name: str = "",
                 dtype: str = "bfloat16", extra: Optional[dict] = None) -> str:
    """Writes the layer params only (no embedding / LM head), atomically."""
    return heads.save_weights(path, drafter, params, target_name=target_name, dtype=dtype,
                              extra=extra)


def load_weights(path, drafter: EagleDrafter, dtype: Optional[str] = None) -> dict:
    """Layer params for ``drafter`` from ``path``.

    Raises:
      heads.HeadWeightsError: missing / damaged file, another drafter type, or a file made for
        a target of another size or vocabulary.
    """
    config, flat = heads.read_weights(path)
    want = drafter.config_dict()
    if config.get("drafter") != want["drafter"]:
        raise heads.HeadWeightsError(f"{path} holds {config.get('drafter')!r} weights, not "
                                     "'eagle'")
    for key in want:
        if key != "drafter" and config.get(key) != want[key]:
            what = {"vocab_size": "vocabulary", "hidden_size": "hidden size"}.get(key, key)
            raise heads.HeadWeightsError(
                f"{path} was trained for a target with {what} {config.get(key)}, this target "
                f"has {want[key]}: the EAGLE layer belongs to another model (target "
                f"{config.get('target') or 'unknown'!r})")
    shapes = heads._flatten(jax.tree.map(  # noqa: SLF001 (same file format)
        lambda s: tuple(s.shape), drafter.param_shapes(),
        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct)))
    got = {k: tuple(v.shape) for k, v in flat.items()}
    if got != shapes:
        diff = sorted(k for k in set(got) | set(shapes) if got.get(k) != shapes.get(k))
        raise heads.HeadWeightsError(f"{path} does not fit the EAGLE layer: " + "; ".join(
            f"{k}: file {got.get(k)}, drafter {shapes.get(k)}" for k in diff[:10]))
    dtype = dtype or drafter.target.config.param_dtype
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), heads._unflatten(flat))  # noqa: SLF001


def load_shipped(target, model_name: Optional[str] = None, *, path: Optional[str] = None,
                 **create_kwargs):
    """``(drafter, params)``: the trained EAGLE layer for ``target`` (a ``LoadedModel`` or a
    ``LlamaModel``), from ``drafters/weights/<model_name>/eagle.safetensors`` or ``path``;
    ``create_kwargs`` go to :meth:`EagleDrafter.create` (``tree``, ``budget``, ...)."""
    if hasattr(target, "model") and hasattr(target, "params"):  # a LoadedModel
        model_name = model_name or target.name
        target = target.model
    path = path or heads.shipped_path("eagle", model_name or "smollm2-135m")
    drafter = EagleDrafter.create(target, **create_kwargs)
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
