"""The math of ONE Llama-family decoder layer, as plain functions of one layer's parameters.

Used by the target (:class:`models.llama.LayerStack`, one call per layer) and by drafters that
run a decoder layer of their own (the EAGLE layer in :mod:`drafters.eagle`). A layer is

    h = rms_norm(x) ; q, k, v = h Wq (+bq), h Wk (+bk), h Wv (+bv) ; rope(q), rope(k)
    x = x + attend(q, k, v) Wo
    x = x + W_down (SiLU(rms_norm(x) W_gate) * rms_norm(x) W_up)

with the family options of the config: per-head RMSNorms on q and k before rope
(``qk_norm``: Qwen3, Gemma 3), a norm on the attention output and on the MLP output before each
residual add (``sandwich_norms``: Gemma), GeGLU with tanh-GELU instead of SwiGLU
(``activation="gelu_tanh"``), a query scale other than ``1/sqrt(D)`` (``query_scale``) and a rope
base per layer (``rope_local_theta`` for the sliding-window layers of Gemma 3). Gemma's
``(1 + w)`` norm scale is folded into the stored weights by the loaders, so every norm here is
``w * normed``.

Only ``attend`` differs between callers, so it is an argument: the target writes ``k`` /
``v`` into its KV cache and attends over that layer's cache; EAGLE writes into its own draft
cache, or in training attends over several feature levels at once.

``p``, one layer's params: ``attn_norm [E]``, ``wq [E, H, D]``, ``wk [E, K, D]``,
``wv [E, K, D]``, ``wo [H, D, E]``, ``mlp_norm [E]``, ``w_gate [E, F]``, ``w_up [E, F]``,
``w_down [F, E]``, and optionally (Qwen2) ``bq [H, D]``, ``bk [K, D]``, ``bv [K, D]`` (added
when present in ``p``), ``q_norm [D]``, ``k_norm [D]`` (``qk_norm``) and ``post_attn_norm [E]``,
``post_mlp_norm [E]`` (``sandwich_norms``). Weights are cast to ``config.dtype`` (activations).
A packed layer (``--weights=gguf|int8``, :mod:`models.packing`) has instead the
:class:`specjax.packed.PackedWeight` s ``wqkv``, ``wo``, ``w_gate_up`` and ``w_down`` (rows =
output features), applied by :func:`specjax.packed.linear`.

``config``: a :class:`models.llama.LlamaConfig` (read: ``dtype``, ``rms_norm_eps``,
``head_dim``, the rope settings and the family options above).

Axis glossary: B batch, T new tokens, S key / cache slots, H query heads, K kv heads,
G = H // K query heads per kv head, D head dim, E embedding width, F MLP width.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from specjax import packed

# One layer's parameters, in declaration order (parameter init draws keys in this order).
PARAM_NAMES = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")
BIAS_NAMES = ("bq", "bk", "bv")
QK_NORM_NAMES = ("q_norm", "k_norm")
SANDWICH_NORM_NAMES = ("post_attn_norm", "post_mlp_norm")
ACTIVATIONS = ("silu", "gelu_tanh")

# attend(q [B,T,H,D], k [B,T,K,D], v [B,T,K,D]) -> (attn [B,T,H,D], extra)
Attend = Callable[[jax.Array, jax.Array, jax.Array], Tuple[jax.Array, Any]]


def param_specs(config, bias: bool = False) -> dict:
    """``{name: (shape, logical axes, initializer)}`` of one layer's params, in
    :data:`PARAM_NAMES` order, then :data:`BIAS_NAMES` when ``bias``, then the norms of the
    config's family options (:data:`QK_NORM_NAMES`, :data:`SANDWICH_NORM_NAMES`)."""
    e, f, h, k, d = (config.hidden_size, config.intermediate_size, config.num_heads,
                     config.num_kv_heads, config.head_dim)
    dense, ones, zeros = (nn.initializers.normal(0.02), nn.initializers.ones,
                          nn.initializers.zeros)
    specs = {
        "attn_norm": ((e,), ("embed",), ones),
        "wq": ((e, h, d), ("embed", "q_heads", "head_dim"), dense),
        "wk": ((e, k, d), ("embed", "kv_heads", "head_dim"), dense),
        "wv": ((e, k, d), ("embed", "kv_heads", "head_dim"), dense),
        "wo": ((h, d, e), ("q_heads", "head_dim", "embed"), dense),
        "mlp_norm": ((e,), ("embed",), ones),
        "w_gate": ((e, f), ("embed", "mlp"), dense),
        "w_up": ((e, f), ("embed", "mlp"), dense),
        "w_down": ((f, e), ("mlp", "embed"), dense),
    }
    if bias:
        specs["bq"] = ((h, d), ("q_heads", "head_dim"), zeros)
        specs["bk"] = ((k, d), ("kv_heads", "head_dim"), zeros)
        specs["bv"] = ((k, d), ("kv_heads", "head_dim"), zeros)
    if getattr(config, "qk_norm", False):
        specs["q_norm"] = ((d,), ("head_dim",), ones)
        specs["k_norm"] = ((d,), ("head_dim",), ones)
    if getattr(config, "sandwich_norms", False):
        specs["post_attn_norm"] = ((e,), ("embed",), ones)
        specs["post_mlp_norm"] = ((e,), ("embed",), ones)
    return specs


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32, cast back to ``x.dtype`` before the weight (as in HF)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def rope_inv_freq(config, local: bool = False) -> jax.Array:
    """``float32[D/2]`` inverse frequencies of the global layers (or with ``local``, of the
    sliding-window layers, whose base is ``rope_local_theta`` and which are never scaled), with
    the configured scaling: Llama-3 style, linear, or per-frequency factors (GGUF
    ``rope_freqs``)."""
    d = config.head_dim
    theta = config.rope_local_theta if local and config.rope_local_theta else config.rope_theta
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    if local and config.rope_local_theta:
        return inv_freq
    if config.rope_freq_factors:
        return inv_freq / jnp.asarray(config.rope_freq_factors, jnp.float32)
    s = config.rope_scaling
    if s is None:
        return inv_freq
    if s.rope_type == "linear":
        return inv_freq / s.factor
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotates ``x[B, T, N, D]`` by ``positions[B, T]`` (half-split layout, as in HF Llama)."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    cos = jnp.cos(freqs)[:, :, None, :]
    sin = jnp.sin(freqs)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention of new queries over a layer's keys (cache).

    The ``G`` query heads of each kv head and the ``T`` new tokens form one ``[T*G, D]`` block
    of rows, so the scores are a batched ``[T*G, D] x [S, D]^T`` product over ``(B, K)`` with
    the softmax on the minor (slot) axis. On XLA:CPU this layout avoids transposing the cache
    and was 1.5-4x faster than a ``[B, K, G, T, S]`` einsum (see WORKSPACE.md).

    Args:
      q: ``[B, T, H, D]`` (rope applied).
      k, v: ``[B, K, S, D]`` the layer's cache, new entries already written.
      mask: ``bool[B, T, S]``.
    Returns:
      ``[B, T, H, D]``.
    """
    b, t, h, d = q.shape
    kv_heads = k.shape[1]
    g = h // kv_heads
    rows = q.reshape(b, t, kv_heads, g, d).transpose(0, 2, 1, 3, 4).reshape(b, kv_heads, t * g, d)
    batch_dims = ((0, 1), (0, 1))
    scores = jax.lax.dot_general(rows, k, (((3,), (3,)), batch_dims),
                                 preferred_element_type=jnp.float32)  # [B, K, T*G, S]
    scores = scores * (1.0 / math.sqrt(d))
    row_mask = jnp.repeat(mask, g, axis=1)[:, None]  # [B, 1, T*G, S], rows t-major like q
    scores = jnp.where(row_mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jax.lax.dot_general(probs, v, (((3,), (2,)), batch_dims))  # [B, K, T*G, D]
    return out.reshape(b, kv_heads, t, g, d).transpose(0, 2, 1, 3, 4).reshape(b, t, h, d)


def layer_inv_freq(config, layer=None) -> jax.Array:
    """The rope inverse frequencies of layer ``layer`` (static or traced; None: a global one)."""
    inv_freq = rope_inv_freq(config)
    if layer is None or not (config.rope_local_theta and config.layer_windows):
        return inv_freq
    local = jnp.asarray(config.layer_windows, jnp.int32)[layer] > 0
    return jnp.where(local, rope_inv_freq(config, local=True), inv_freq)


def activation(config):
    """The MLP's gate activation."""
    act = getattr(config, "activation", "silu")
    if act == "gelu_tanh":
        return lambda x: jax.nn.gelu(x, approximate=True)
    return nn.silu


def attention_inputs(p: dict, x: jax.Array, positions: jax.Array, config, layer=None
                     ) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """Attention norm, q / k / v projections (+ biases when in ``p``), q / k norms (when in
    ``p``) and rope. The queries come out pre-multiplied by ``query_scale * sqrt(D)`` when the
    config sets a ``query_scale``, so that attention's own ``1/sqrt(D)`` gives that scale.

    Args:
      x: ``[B, T, E]`` the layer input (residual stream); positions: ``int32[B, T]``;
      layer: this layer's index (static or traced), for a per-layer rope base; None: global.
    Returns:
      ``(q [B, T, H, D], k [B, T, K, D], v [B, T, K, D])``, rope applied to ``q`` and ``k``.
    """
    dt = jnp.dtype(config.dtype)
    h = rms_norm(x, p["attn_norm"].astype(dt), config.rms_norm_eps)
    if "wqkv" in p:  # packed: one product for the q, k and v rows
        nh, nk, d = config.num_heads, config.num_kv_heads, config.head_dim
        qkv = packed.linear(h, p["wqkv"], act8=getattr(config, "act8", False))
        q = qkv[..., :nh * d].reshape(h.shape[:2] + (nh, d))
        k = qkv[..., nh * d:(nh + nk) * d].reshape(h.shape[:2] + (nk, d))
        v = qkv[..., (nh + nk) * d:].reshape(h.shape[:2] + (nk, d))
    else:
        q = jnp.einsum("bte,ehd->bthd", h, p["wq"].astype(dt))
        k = jnp.einsum("bte,ekd->btkd", h, p["wk"].astype(dt))
        v = jnp.einsum("bte,ekd->btkd", h, p["wv"].astype(dt))
    if "bq" in p:
        q, k, v = q + p["bq"].astype(dt), k + p["bk"].astype(dt), v + p["bv"].astype(dt)
    if "q_norm" in p:
        q = rms_norm(q, p["q_norm"].astype(dt), config.rms_norm_eps)
        k = rms_norm(k, p["k_norm"].astype(dt), config.rms_norm_eps)
    scale = getattr(config, "query_scale", 0.0)
    if scale:
        q = q * jnp.asarray(scale * math.sqrt(config.head_dim), dt)
    inv_freq = layer_inv_freq(config, layer)
    return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v


def block_output(p: dict, x: jax.Array, attn: jax.Array, config) -> jax.Array:
    """Output projection (+ post-attention norm) + residual, MLP norm, gated MLP (+ post-MLP
    norm) + residual.

    Args:
      x: ``[B, T, E]`` the layer input; attn: ``[B, T, H, D]`` the attention output.
    Returns:
      ``[B, T, E]`` the layer output.
    """
    dt = jnp.dtype(config.dtype)
    eps = config.rms_norm_eps

    def post_norm(y, name):
        return rms_norm(y, p[name].astype(dt), eps) if name in p else y

    act = activation(config)
    if "w_gate_up" in p:  # packed
        act8 = getattr(config, "act8", False)  # 8-bit activations (--weights=gguf_a8)
        o = packed.linear(attn.reshape(attn.shape[:2] + (-1,)), p["wo"], act8=act8)
        x = x + post_norm(o, "post_attn_norm")
        h = rms_norm(x, p["mlp_norm"].astype(dt), eps)
        gate, up = jnp.split(packed.linear(h, p["w_gate_up"], act8=act8), 2, axis=-1)
        down = packed.linear(act(gate) * up, p["w_down"], act8=act8)
        return x + post_norm(down, "post_mlp_norm")
    o = jnp.einsum("bthd,hde->bte", attn, p["wo"].astype(dt))
    x = x + post_norm(o, "post_attn_norm")
    h = rms_norm(x, p["mlp_norm"].astype(dt), eps)
    gate = jnp.einsum("bte,ef->btf", h, p["w_gate"].astype(dt))
    up = jnp.einsum("bte,ef->btf", h, p["w_up"].astype(dt))
    mlp = jnp.einsum("btf,fe->bte", act(gate) * up, p["w_down"].astype(dt))
    return x + post_norm(mlp, "post_mlp_norm")


def decoder_block(p: dict, x: jax.Array, positions: jax.Array, config, attend: Attend,
                  layer=None) -> Tuple[jax.Array, Any]:
    """One decoder layer: ``x [B, T, E]`` -> ``(x [B, T, E], extra)``.

    ``attend(q, k, v) -> (attn [B, T, H, D], extra)`` gets this layer's rope'd queries and new
    keys / values (shapes as from :func:`attention_inputs`) and decides what they attend to
    (e.g. writes ``k`` / ``v`` into a cache, then :func:`attention` over it); ``extra`` (such as
    the updated cache) is handed back unchanged. ``layer`` (static or traced) picks the
    layer's rope base when the config has per-layer ones.
    """
    q, k, v = attention_inputs(p, x, positions, config, layer)
    attn, extra = attend(q, k, v)
    return block_output(p, x, attn, config), extra


def causal_attend(q: jax.Array, k: jax.Array, v: jax.Array) -> Tuple[jax.Array, None]:
    """An ``attend`` for plain causal self-attention among the ``T`` new tokens (no cache)."""
    b, t = q.shape[:2]
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
    return attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask), None
