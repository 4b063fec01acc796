"""The network of the block drafter (:mod:`drafters.block_diffusion`): tap norms and fusion,
the mask embedding, ``num_layers`` decoder layers at the target's width whose attention covers
the context entries and the block, the output norm and the head over the draft vocabulary.

Axis glossary: B batch, Q queries (block slots), S context slots, n feature taps, E width,
H query heads, Kh kv heads, Dh head dim, N draft vocabulary.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from drafters import drafter_packing
from drafters.target_readout import fuse_taps
from models import decoder_block as block
from specjax import packed

# The network ---------------------------------------------------------------------------------


class DraftLayer(nn.Module):
    """One decoder layer at the target's width (its params named as the target's, unstacked,
    without qkv biases), with the attention supplied by the caller."""

    config: Any  # the target's LlamaConfig

    def setup(self):
        # float32, or Q8_0 blocks when packed at load (drafters/drafter_packing.py)
        self.p = drafter_packing.layer_params(self, block.param_specs(self.config), jnp.float32)

    def __call__(self, x, positions, attend):
        """``x [B, Q, E]`` -> ``[B, Q, E]``; ``attend(q, k, v) -> attn [B, Q, H, Dh]``."""
        return block.decoder_block(self.p, x, positions, self.config,
                                   lambda q, k, v: (attend(q, k, v), None))[0]

    def context_kv(self, c, positions):
        """Context keys / values ``[B, S, Kh, Dh]`` of fused features ``c [B, S, E]``."""
        _, k, v = block.attention_inputs(self.p, c, positions, self.config)
        return k, v


class BlockNet(nn.Module):
    """Tap norms + fusion, mask embedding, ``num_layers`` decoder layers, output norm, head."""

    config: Any
    num_taps: int
    num_layers: int
    vocab: int  # N

    def setup(self):
        e = self.config.hidden_size
        dense = nn.initializers.normal(0.02)
        self.tap_norm = self.param("tap_norm", nn.initializers.ones, (self.num_taps, e),
                                   jnp.float32)
        self.fc = drafter_packing.param_or_packed(self, "fc", dense, (self.num_taps * e, e),
                                                  jnp.float32)
        self.mask_embedding = self.param("mask_embedding", dense, (e,), jnp.float32)
        self.layers = [DraftLayer(self.config) for _ in range(self.num_layers)]
        self.out_norm = self.param("out_norm", nn.initializers.ones, (e,), jnp.float32)
        self.head = drafter_packing.param_or_packed(self, "head", dense, (e, self.vocab),
                                                    jnp.float32)

    @property
    def dtype(self):
        return jnp.dtype(self.config.dtype)

    def fuse(self, features):
        """``[..., n * E]`` taps -> ``c [..., E]`` (each tap RMS-normalised first)."""
        return fuse_taps(features.astype(self.dtype), self.tap_norm, self.fc,
                         self.config.rms_norm_eps)

    def context_kv(self, features, positions):
        """Per layer ``(k, v)``, each ``[B, S, Kh, Dh]``, of features ``[B, S, n*E]``."""
        c = self.fuse(features)
        return [layer.context_kv(c, positions) for layer in self.layers]

    def block_inputs(self, first_emb, block_size: int):
        """``[..., K, E]``: ``first_emb [..., E]`` then ``K - 1`` mask embeddings."""
        dt = self.dtype
        first = first_emb.astype(dt)[..., None, :]
        rest = jnp.broadcast_to(self.mask_embedding.astype(dt),
                                first.shape[:-2] + (block_size - 1, first.shape[-1]))
        return jnp.concatenate([first, rest], axis=-2)

    def run(self, x, positions, attend):
        """The layers on block slots ``x [B, Q, E]`` at ``positions int32[B, Q]``, then the
        output norm; ``attend(i, q, k, v) -> attn`` is layer ``i``'s attention (rope applied)."""
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, functools.partial(attend, i))
        return block.rms_norm(x, self.out_norm.astype(self.dtype), self.config.rms_norm_eps)

    def logits(self, h):
        """``float32[..., N]`` draft-vocabulary logits of normed outputs ``h [..., E]``."""
        if packed.is_packed(self.head):
            return packed.linear(h, self.head).astype(jnp.float32)
        return jnp.einsum("...e,en->...n", h, self.head.astype(h.dtype),
                          preferred_element_type=jnp.float32)

    def __call__(self, features, positions, first_emb, block_size: int):
        """Every slot of one block after the whole context (parameter init, simple uses):
        ``features [B, S, n*E]``, ``positions int32[B, S]``, ``first_emb [B, E]`` ->
        ``float32[B, K, N]``; the block sits at positions ``S .. S + K - 1``."""
        b, s = positions.shape
        kv = self.context_kv(features, positions)
        mask = jnp.ones((b, block_size, s + block_size), bool)
        attend = functools.partial(attend_with_context, kv, mask=mask)
        pos = jnp.broadcast_to(s + jnp.arange(block_size, dtype=jnp.int32), (b, block_size))
        return self.logits(self.run(self.block_inputs(first_emb, block_size), pos, attend))


def attend_with_context(context_kv, i, q, k, v, *, mask):
    """Layer ``i``'s attention of queries ``q [B, Q, H, Dh]`` over its context entries
    ``context_kv[i] = (k, v)``, each ``[B, S, Kh, Dh]``, then the ``Q`` new keys / values ``k``,
    ``v [B, Q, Kh, Dh]``; ``mask bool[B, Q, S + Q]`` (context slots first)."""
    keys = jnp.concatenate([context_kv[i][0], k], axis=1).transpose(0, 2, 1, 3)
    vals = jnp.concatenate([context_kv[i][1], v], axis=1).transpose(0, 2, 1, 3)
    return block.attention(q, keys, vals, mask)


def init_block_net(net: BlockNet, block_size: int, key) -> dict:
    """``net``'s declared init (norm weights 1, everything else N(0, 0.02)) drawn as ONE normal
    sample: with one PRNG call per parameter the jitted init took ~15 s to compile on a busy
    2-core CPU, one call ~1 s."""
    e, n = net.config.hidden_size, net.num_taps
    shapes = jax.eval_shape(lambda k: net.init(
        k, jnp.zeros((1, 1, n * e)), jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, e)),
        block_size)["params"], key)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    sizes = [int(np.prod(leaf.shape)) for _, leaf in leaves]
    noise = 0.02 * jax.random.normal(key, (sum(sizes),), jnp.float32)
    out, start = [], 0
    for (path, leaf), size in zip(leaves, sizes):
        is_norm = path[-1].key.endswith("norm")
        out.append(jnp.ones(leaf.shape) if is_norm else
                   noise[start:start + size].reshape(leaf.shape))
        start += size
    return jax.tree_util.tree_unflatten(treedef, out)
