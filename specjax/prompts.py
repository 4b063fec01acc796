"""Batches of prompts of different lengths, padded to a bucketed static length.

Padding every batch to a bucketed length (powers of two up to 256, then multiples of 256) bounds
recompilation: a jitted decoder traces once per (batch size, bucket), not once per prompt length.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from flax import struct


@struct.dataclass
class PromptBatch:
    """Right-padded prompts.

    Attributes:
      tokens: int32[B, P] prompt ids, padded with ``pad_id`` past each row's length.
      lengths: int32[B] true prompt lengths (>= 1).
    """

    tokens: jax.Array
    lengths: jax.Array


def bucket_length(n: int, min_bucket: int = 16, step: int = 256) -> int:
    """The padded length for a prompt of ``n`` tokens: the smallest power of two
    ``>= max(n, min_bucket)`` up to ``step``, then the next multiple of ``step`` (so a long
    prompt wastes less than ``step`` padded positions in prefill)."""
    size = min_bucket
    while size < n and size < step:
        size *= 2
    if size >= n:
        return size
    return -(-n // step) * step


def make_prompt_batch(prompts: Sequence[Sequence[int]], pad_id: int = 0, min_bucket: int = 16,
                      vocab_size: int | None = None) -> PromptBatch:
    """Pads token-id prompts into a :class:`PromptBatch`.

    Raises:
      ValueError: no prompts, an empty prompt, or (when ``vocab_size`` is given) an id outside
        ``[0, vocab_size)``.
    """
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts:
        raise ValueError("no prompts given: pass at least one prompt")
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token "
                             "(for text, a non-empty string or a BOS token)")
        if vocab_size is not None and (min(p) < 0 or max(p) >= vocab_size):
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab_size}): wrong "
                             "tokenizer for this model?")
    width = bucket_length(max(len(p) for p in prompts), min_bucket)
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    lengths = np.array([len(p) for p in prompts], np.int32)
    return PromptBatch(tokens=tokens, lengths=lengths)
