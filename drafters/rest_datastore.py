"""REST's datastore (He et al., 2023): a token corpus and its suffix array, built on the host.

Layout (numpy; the drafter's params on the device, see ``drafters/rest.py``):

* ``tokens int32[N]``: the sequences concatenated, each followed by the separator
  ``SEP = vocab_size``, an id no query holds: no match crosses the end of a sequence and every
  continuation stops there (positions past ``N`` read as ``SEP`` too).
* ``suffix_array int32[M]``: the start position of every non-separator token (``M = N`` minus
  the separators), sorted by the first ``sort_depth`` (``K``) tokens of the suffix starting
  there, ties by position.

Why the first ``K`` tokens are enough (not a full suffix array): the device looks for the
suffixes whose first ``n <= max_ngram`` tokens equal the row's last ``n`` tokens. Ordered by
their first ``K >= n`` tokens, the suffixes are also ordered by their first ``n``, so those
suffixes are one contiguous range, found by binary search. Inside the range they are ordered by
the next ``K - n >= L`` tokens (``L`` the draft depth), so equal continuations are adjacent,
and a sample spread evenly over the range holds each continuation about as often as the corpus
does. The drafter checks ``max_ngram + draft_depth <= sort_depth``. Sorting ``K`` columns
(``np.lexsort``) costs seconds where a full suffix array would need a dedicated algorithm.

On disk: safetensors, ``tokens`` as uint16 when ``SEP`` fits (uint32 otherwise) and
``suffix_array`` as uint32, with metadata (format, vocabulary, sort depth, provenance).

Axis glossary: N datastore tokens (separators included), M suffixes, K sort depth.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

from drafters.head_weights import HeadWeightsError
from specjax.files import write_atomic

NAME = "rest"
FORMAT = "specjax-rest-datastore-v1"
DEFAULT_SORT_DEPTH = 24
BUILD_HINT = ("build one with python -m experiments.build_rest_datastore --corpus_dir=CORPUS "
              "(--output=PATH, then --datastore=PATH)")


@dataclasses.dataclass(frozen=True, eq=False)
class Datastore:
    """A datastore in memory.

    Attributes:
      tokens: int32[N], sequences each followed by ``vocab_size`` (the separator).
      suffix_array: int32[M], non-separator positions sorted by their first ``sort_depth``
        tokens.
      vocab_size: ``V``; also the separator id.
      sort_depth: ``K``.
      meta: the file's metadata (provenance), ``{}`` when built in memory.
    """

    tokens: np.ndarray
    suffix_array: np.ndarray
    vocab_size: int
    sort_depth: int
    meta: dict = dataclasses.field(default_factory=dict)

    @property
    def num_sequences(self) -> int:
        return int(np.sum(self.tokens == self.vocab_size))


def _suffix_keys(tokens: np.ndarray, starts: np.ndarray, depth: int, sep: int) -> np.ndarray:
    """``int32[depth, len(starts)]``: the first ``depth`` tokens of every suffix (``sep`` past
    the end)."""
    idx = starts[None, :] + np.arange(depth)[:, None]
    return np.where(idx < tokens.size, tokens[np.minimum(idx, tokens.size - 1)], sep)


def build_datastore(sequences: Sequence[Sequence[int]], vocab_size: int,
                    sort_depth: int = DEFAULT_SORT_DEPTH) -> Datastore:
    """The datastore of ``sequences`` (lists of token ids in ``[0, vocab_size)``).

    Raises:
      ValueError: an id outside the vocabulary, a bad ``sort_depth``, or no token at all.
    """
    if vocab_size < 1 or sort_depth < 1:
        raise ValueError(f"vocab_size and sort_depth must be >= 1, got {vocab_size}, "
                         f"{sort_depth}")
    parts = []
    for s in sequences:
        s = np.asarray(s, np.int64).reshape(-1)
        if s.size and (s.min() < 0 or s.max() >= vocab_size):
            raise ValueError(f"token ids must be in 0..{vocab_size - 1}: a sequence holds "
                             f"{int(s.min() if s.min() < 0 else s.max())}")
        parts += [s, np.array([vocab_size])]
    tokens = np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)
    starts = np.flatnonzero(tokens != vocab_size).astype(np.int32)
    if not starts.size:
        raise ValueError("the datastore would hold no token: give it non-empty sequences")
    keys = _suffix_keys(tokens, starts, sort_depth, vocab_size)
    order = np.lexsort(keys[::-1])  # the first row is the primary key; stable: ties by position
    return Datastore(tokens, starts[order], int(vocab_size), int(sort_depth))


def check_datastore(store: Datastore, what: str = "the datastore") -> Datastore:
    """``store`` if consistent (ids in range, the suffix array a sorted permutation of the
    non-separator positions); ValueError naming ``what`` otherwise."""
    tokens, sa, sep = store.tokens, store.suffix_array, store.vocab_size
    if tokens.ndim != 1 or sa.ndim != 1 or not sa.size:
        raise ValueError(f"{what}: tokens and suffix_array must be non-empty vectors")
    if tokens.min() < 0 or tokens.max() > sep:
        raise ValueError(f"{what}: token ids must be in 0..{sep} (the separator)")
    starts = np.flatnonzero(tokens != sep)
    if sa.size != starts.size or not np.array_equal(np.sort(sa), starts):
        raise ValueError(f"{what}: suffix_array is not a permutation of the token positions")
    keys = _suffix_keys(tokens, sa, store.sort_depth, sep)  # [K, M]
    diff = keys[:, 1:] != keys[:, :-1]
    first = np.argmax(diff, axis=0)
    step = np.arange(sa.size - 1)
    descending = diff.any(axis=0) & (keys[first, step + 1] < keys[first, step])
    if descending.any():
        raise ValueError(f"{what}: suffix_array is not sorted")
    return store


def save_datastore(path: str, store: Datastore, *, source: str = "", command: str = "") -> str:
    """Writes ``store`` as safetensors with its provenance, atomically; returns the absolute
    path."""
    from safetensors.numpy import save_file
    token_dtype = np.uint16 if store.vocab_size < 2 ** 16 else np.uint32
    data = {"tokens": np.ascontiguousarray(store.tokens, token_dtype),
            "suffix_array": np.ascontiguousarray(store.suffix_array, np.uint32)}
    meta = {"format": FORMAT, "drafter": NAME, "vocab_size": str(store.vocab_size),
            "sort_depth": str(store.sort_depth), "num_sequences": str(store.num_sequences),
            "source": source, "command": command}
    return os.path.abspath(write_atomic(path, lambda tmp: save_file(data, tmp, metadata=meta)))


def load_datastore(path: str, vocab_size: int | None = None) -> Datastore:
    """The datastore at ``path``, checked (and against the target's ``vocab_size`` if given).

    Raises:
      HeadWeightsError: a missing, damaged or inconsistent file, or one for another
        vocabulary; the message says what to do.
    """
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise HeadWeightsError(f"no REST datastore at {path}: {BUILD_HINT}")
    try:
        with safe_open(path, framework="numpy") as f:
            meta = dict(f.metadata() or {})
            arrays = {k: f.get_tensor(k) for k in ("tokens", "suffix_array")}
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
        store = Datastore(arrays["tokens"].astype(np.int32),
                          arrays["suffix_array"].astype(np.int32),
                          int(meta["vocab_size"]), int(meta["sort_depth"]), meta)
    except Exception as e:  # safetensors raises several types for truncated / garbage files
        raise HeadWeightsError(f"{path} is not a REST datastore ({type(e).__name__}: {e}); "
                               f"{BUILD_HINT}") from None
    if vocab_size is not None and store.vocab_size != vocab_size:
        raise HeadWeightsError(f"{path} was built for a vocabulary of {store.vocab_size}, the "
                               f"target has {vocab_size}: {BUILD_HINT} for this model")
    try:
        return check_datastore(store, path)
    except ValueError as e:
        raise HeadWeightsError(f"{e}; {BUILD_HINT}") from None
