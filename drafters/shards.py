"""Sharded data directories (the distillation corpus, :mod:`drafters.corpus`, and the
self-distillation data, :mod:`drafters.distill`): ``.npz`` shards written atomically, a
``progress.json`` that lets an interrupted run resume after its last complete shard, and a
``manifest.json`` written last (a directory without one is incomplete).
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from specjax.files import write_atomic

MANIFEST = "manifest.json"
PROGRESS = "progress.json"


def save_npz_atomic(path: str, **arrays) -> None:
    """``np.savez`` of ``arrays`` to ``path`` through a temporary file (never half-written)."""
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    write_atomic(path, write)


def read_shard(path: str, keys: Sequence[str], error=ValueError, fix: str = "rebuild it"
               ) -> dict:
    """``{key: array}`` of one ``.npz`` shard; ``error`` saying ``fix`` when it is missing or
    damaged."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in keys}
    except Exception as e:  # OSError, BadZipFile, ValueError, KeyError, EOFError, ...
        raise error(f"shard {path} is missing or damaged ({e}); {fix}") from None


def concat_padded(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Concatenates along axis 0, right-padding axis 1 (when there is one) to the widest."""
    if arrays[0].ndim < 2:
        return np.concatenate(arrays)
    width = max(a.shape[1] for a in arrays)
    return np.concatenate([np.pad(a, [(0, 0), (0, width - a.shape[1])] + [(0, 0)] * (a.ndim - 2))
                           for a in arrays])


def complete_shards(out_dir: str, fingerprint: str, error=ValueError, what: str = "run") -> list:
    """The complete shards an interrupted run left in ``out_dir`` (its ``progress.json``;
    ``[]`` for a fresh directory). Raises ``error`` when the progress file is damaged, or was
    written for other inputs (``fingerprint``), or names a shard that is gone."""
    path = os.path.join(out_dir, PROGRESS)
    if not os.path.exists(path):
        return []
    try:
        with open(path, encoding="utf-8") as f:
            done = json.load(f)
        shards, same = list(done["shards"]), done["fingerprint"] == fingerprint
    except (OSError, ValueError, KeyError, TypeError):
        raise error(f"{path} is damaged: delete {out_dir} and start again") from None
    if not same or not all(os.path.exists(os.path.join(out_dir, s["file"])) for s in shards):
        raise error(f"{out_dir} holds an interrupted {what} with other prompts or settings: "
                    "resume it with the same ones, or pick a new directory")
    return shards


def read_manifest(data_dir: str, fmt: str, error=ValueError, missing: str = "incomplete"
                  ) -> dict:
    """The manifest of a complete data directory in format ``fmt``; ``error`` saying
    ``missing`` when there is none, or naming the damage."""
    path = os.path.join(data_dir, MANIFEST)
    if not os.path.isfile(path):
        raise error(f"no {MANIFEST} in {data_dir!r}: {missing}")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except ValueError as e:
        raise error(f"{path} is damaged: {e}") from None
    if manifest.get("format") != fmt:
        raise error(f"{path} has format {manifest.get('format')!r}, expected {fmt}")
    return manifest
