"""The frozen-target read-out shared by drafters that work in the target's feature space.

Head drafters (:mod:`drafters.heads`: Blockwise, Medusa, Hydra) and the EAGLE drafter
(:mod:`drafters.eagle`) predict FEATURES (final-norm-like hidden states ``[..., E]``) and turn
them into tokens with the target's own LM head; Hydra and EAGLE also read the target's input
embedding. Both are FROZEN inputs here (``stop_gradient``): never trained, never stored with
the drafter's params. A drafter may draft over the first ``draft_vocab`` token ids only (the
LM head sliced to them; ids are unchanged), which verification keeps lossless.

:class:`TargetReadout` is a mixin for a frozen dataclass drafter with the fields ``target``
(a :class:`specjax.model_api.LanguageModel` with ``embed`` / ``lm_head``, e.g. ``LlamaModel``)
and ``draft_vocab`` (0 = the whole vocabulary). It adds no fields, so the drafter stays a
hashable jit static argument.

Axis glossary: E embedding width, V vocabulary, N = ``draft_vocab``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.decoder_block import rms_norm
from specjax import packed


def fuse_taps(taps: jax.Array, norms: jax.Array, fc: jax.Array, eps: float) -> jax.Array:
    """The target's layer outputs ``taps [..., n * E]`` (concatenated, as a drafter with
    ``feature_layers`` receives them) to one feature ``[..., E']``: each tap RMS-normalised with
    its own weights ``norms [n, E]`` (residual-stream magnitudes differ a lot between layers),
    then ``fc [n * E, E']`` (EAGLE-3's fusion; the block drafter's context features)."""
    x = taps.reshape(taps.shape[:-1] + norms.shape)
    x = rms_norm(x, norms.astype(taps.dtype), eps)
    return packed.dense(x.reshape(taps.shape), fc)  # fc: float [n*E, E'] or packed rows


class TargetReadout:
    """Embedding, LM head and compatibility check of a drafter on a frozen target.

    Subclasses set :attr:`readout_subject` (how :meth:`check_compatible` names the drafter)
    and call :meth:`check_draft_vocab` from ``__post_init__``.
    """

    readout_subject = "the drafter is"  # "<subject> built for hidden size ..."

    @property
    def hidden_size(self) -> int:
        return self.target.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.target.vocab_size

    def check_draft_vocab(self) -> None:
        if not 0 <= self.draft_vocab <= self.target.vocab_size:
            raise ValueError(f"draft_vocab must be in [0, {self.target.vocab_size}] (0 = all), "
                             f"got {self.draft_vocab}")

    def check_compatible(self, target) -> None:
        if target.vocab_size != self.vocab_size or target.hidden_size != self.hidden_size:
            raise ValueError(
                f"{self.readout_subject} built for hidden size {self.hidden_size} / vocabulary "
                f"{self.vocab_size}, the target has {target.hidden_size} / {target.vocab_size}: "
                "build the drafter with this target")

    def embed(self, target_params, tokens: jax.Array) -> jax.Array:
        """The target's frozen input embeddings ``[..., E]`` of ``tokens``."""
        return self.target.embed(jax.lax.stop_gradient(target_params), tokens)

    def logits(self, target_params, features: jax.Array) -> jax.Array:
        """``float32[..., V]``: ``features [..., E]`` through the target's frozen LM head."""
        return self._lm_head(target_params, features, None)

    def draft_logits(self, target_params, features: jax.Array) -> jax.Array:
        """What drafts are chosen from: ``float32[..., V]``, or ``[..., N]`` over token ids
        ``< draft_vocab`` (the LM head sliced to them; ids are unchanged)."""
        n = self.draft_vocab
        return self._lm_head(target_params, features, n if n and n != self.vocab_size else None)

    def _lm_head(self, target_params, features, num_ids):
        tparams = jax.lax.stop_gradient(target_params)
        dt = jnp.dtype(self.target.config.dtype)
        return self.target.lm_head(tparams, features.astype(dt), num_ids=num_ids
                                   ).astype(jnp.float32)
