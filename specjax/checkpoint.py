"""Saving and restoring params (any pytree of arrays) with orbax-checkpoint.

    save("/ckpt/run1", params)
    params = restore("/ckpt/run1", like=params)          # or an abstract tree:
    params = restore("/ckpt/run1", like=jax.eval_shape(model.init, key))

``like`` gives the structure, shapes and dtypes to restore into (a different dtype is a cast), and
the shardings when its leaves carry them (``jax.ShapeDtypeStruct(..., sharding=...)`` or sharded
arrays): restore places each array directly on its devices. ``shardings`` (a tree of
``jax.sharding.Sharding`` like ``like``, or one sharding for every leaf) overrides them; with a
:class:`specjax.sharding.ShardingPlan`::

    params = restore(path, like=jax.eval_shape(model.init, key),
                     shardings=plan.tree_shardings(model.logical_axes()))

Each host then reads only the shards its devices hold; nothing lands on one device first. A
checkpoint that does not fit ``like`` raises :class:`CheckpointMismatchError` naming the leaves
that differ.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
    """The checkpoint's tree, shapes or dtypes differ from the restore target."""


def save(path: str | os.PathLike, params: Any, *, overwrite: bool = False) -> str:
    """Writes ``params`` to the directory ``path`` (created; must not exist unless ``overwrite``).

    Returns:
      The absolute checkpoint path.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists: pass overwrite=True or choose a new path.")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, params, force=overwrite)
        ckptr.wait_until_finished()
    return path


def _abstract(leaf):
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return leaf
    sharding = leaf.sharding if isinstance(leaf, jax.Array) else None
    dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
    return jax.ShapeDtypeStruct(np.shape(leaf), dtype, sharding=sharding)


def _shapes(tree) -> dict:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(p): tuple(leaf.shape) for p, leaf in flat}


def _with_shardings(target, shardings):
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda t: t.update(sharding=shardings), target)
    try:
        return jax.tree.map(lambda t, s: t.update(sharding=s), target, shardings,
                            is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    except ValueError as e:
        raise CheckpointMismatchError(
            f"shardings do not have the structure of the restore target ({e}): build them from "
            "the same tree as `like` (e.g. plan.tree_shardings(model.logical_axes()))") from None


def restore(path: str | os.PathLike, like: Optional[Any] = None,
            shardings: Optional[Any] = None) -> Any:
    """Reads a checkpoint written by :func:`save`.

    Args:
      path: the checkpoint directory.
      like: target tree (arrays or ``jax.ShapeDtypeStruct``s); None restores as saved (with
        ``shardings``: the saved shapes and dtypes).
      shardings: where to place the arrays: a tree of ``jax.sharding.Sharding`` with the
        structure of ``like``, or one ``Sharding`` for all leaves; None keeps ``like``'s.

    Raises:
      FileNotFoundError: no checkpoint at ``path``.
      CheckpointMismatchError: the saved tree does not match ``like`` (or ``shardings``).
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint at {path}: pass the directory given to save().")
    with ocp.StandardCheckpointer() as ckptr:
        if like is None and shardings is None:
            return ckptr.restore(path)
        if like is None:
            like = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype),
                                ckptr.metadata(path).item_metadata.tree)
        target = jax.tree.map(_abstract, like)
        if shardings is not None:
            target = _with_shardings(target, shardings)
        saved = _shapes(ckptr.metadata(path).item_metadata.tree)
        wanted = _shapes(target)
        problems = [f"{k}: missing from the checkpoint" for k in wanted if k not in saved]
        problems += [f"{k}: in the checkpoint but not in the target" for k in saved
                     if k not in wanted]
        problems += [f"{k}: checkpoint has shape {saved[k]}, target wants {wanted[k]}"
                     for k in wanted
                     if k in saved and saved[k] != wanted[k]]
        if problems:
            raise CheckpointMismatchError(
                f"checkpoint {path} does not fit the restore target ({len(problems)} "
                f"differences; restore with the config it was saved with):\n  "
                + "\n  ".join(problems[:20]))
        return ckptr.restore(path, target)
