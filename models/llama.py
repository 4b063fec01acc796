"""The Llama family (Llama 2/3, Mistral, Qwen2, SmolLM) as Flax Linen modules applied purely.

``LlamaModel(config).forward(params, tokens, positions, cache, mask)`` runs
``Llama(config).apply({"params": params}, ...)``: the cache goes in and comes back, nothing is
held in mutable collections. ``mask`` is a dense ``bool[B, T, S]`` or a
:class:`specjax.masks.TreeMask`; with the latter and ``LlamaConfig.attention_impl`` "pallas"
(or "auto" on GPU / TPU) every layer runs the Pallas tree-attention kernel. Layer parameters
are stacked along a leading ``layers`` axis, so the layer loop can be a ``lax.scan`` (the
default: fast compiles, and inside a decoding loop as fast as or faster than unrolling on
XLA:CPU, see WORKSPACE.md) or a Python-unrolled loop over static slices, chosen by
``LlamaConfig.scan_layers``. The same layout lets a drafter run any subset of layers
(self-speculative decoding).

Axis glossary: B batch, T new tokens, S cache slots, L layers, H query heads, K kv heads,
G = H // K query heads per kv head, D head dim, E embedding width, F MLP width, V vocabulary.
Parameters carry logical axis names (``nn.with_logical_partitioning``) for sharding.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from specjax import cache as cache_lib
from specjax.cache import KVCache
from specjax.kernels.tree_attention import tree_attention
from specjax.masks import TreeMask
from specjax.model_api import ForwardOutput

ATTENTION_IMPLS = ("xla", "pallas", "auto")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency-dependent rope scaling."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Static architecture of a Llama-family model (hashable: a jit static argument)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0  # 0 means hidden_size // num_heads
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False
    max_position_embeddings: int = 4096
    dtype: str = "float32"  # activations and cache
    param_dtype: str = "float32"
    scan_layers: bool = True  # lax.scan over layers; False unrolls (see WORKSPACE.md)
    # Attention under a TreeMask: "xla" (its dense mask, the default), "pallas" (the
    # tree-attention kernel; interpreted on CPU), "auto" (the kernel on GPU / TPU only).
    # A dense mask array always takes the XLA path.
    attention_impl: str = "xla"

    def __post_init__(self):
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got "
                             f"{self.attention_impl!r}")

    @property
    def num_params(self) -> int:
        e, f, l, d = self.hidden_size, self.intermediate_size, self.num_layers, self.head_dim
        per_layer = (2 * e + e * d * (self.num_heads * 2 + self.num_kv_heads * 2) + 3 * e * f)
        head = 0 if self.tie_embeddings else self.vocab_size * e
        return self.vocab_size * e + l * per_layer + e + head


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32, cast back to ``x.dtype`` before the weight (as in HF)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def rope_inv_freq(config: LlamaConfig) -> jax.Array:
    """``float32[D/2]`` inverse frequencies, with Llama-3 scaling when configured."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    s = config.rope_scaling
    if s is None:
        return inv_freq
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
    """Grouped-query attention of new queries over a layer's cache.

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


def uses_kernel(config: LlamaConfig) -> bool:
    """Whether attention under a :class:`TreeMask` runs the Pallas tree-attention kernel."""
    return config.attention_impl == "pallas" or (
        config.attention_impl == "auto" and jax.default_backend() in ("gpu", "cuda", "tpu"))


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask) -> jax.Array:
    """:func:`attention` under a dense ``bool[B, T, S]`` mask, or the tree-attention kernel under
    a :class:`TreeMask` (the layer resolves a TreeMask to its dense form unless the kernel runs)."""
    if isinstance(mask, TreeMask):
        return tree_attention(q, k, v, mask.lengths, mask.visible, impl="pallas")
    return attention(q, k, v, mask)


def _param(module, name, shape, axes, init, dtype):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class LayerStack(nn.Module):
    """All decoder layers, parameters stacked on a leading ``layers`` axis."""

    config: LlamaConfig

    def setup(self):
        c = self.config
        l, e, f, h, k, d = (c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads,
                            c.num_kv_heads, c.head_dim)
        dt = jnp.dtype(c.param_dtype)
        dense = nn.initializers.normal(0.02)
        ones = nn.initializers.ones
        zeros = nn.initializers.zeros
        p = {
            "attn_norm": _param(self, "attn_norm", (l, e), ("layers", "embed"), ones, dt),
            "wq": _param(self, "wq", (l, e, h, d), ("layers", "embed", "q_heads", "head_dim"),
                         dense, dt),
            "wk": _param(self, "wk", (l, e, k, d), ("layers", "embed", "kv_heads", "head_dim"),
                         dense, dt),
            "wv": _param(self, "wv", (l, e, k, d), ("layers", "embed", "kv_heads", "head_dim"),
                         dense, dt),
            "wo": _param(self, "wo", (l, h, d, e), ("layers", "q_heads", "head_dim", "embed"),
                         dense, dt),
            "mlp_norm": _param(self, "mlp_norm", (l, e), ("layers", "embed"), ones, dt),
            "w_gate": _param(self, "w_gate", (l, e, f), ("layers", "embed", "mlp"), dense, dt),
            "w_up": _param(self, "w_up", (l, e, f), ("layers", "embed", "mlp"), dense, dt),
            "w_down": _param(self, "w_down", (l, f, e), ("layers", "mlp", "embed"), dense, dt),
        }
        if c.qkv_bias:
            p["bq"] = _param(self, "bq", (l, h, d), ("layers", "q_heads", "head_dim"), zeros, dt)
            p["bk"] = _param(self, "bk", (l, k, d), ("layers", "kv_heads", "head_dim"), zeros, dt)
            p["bv"] = _param(self, "bv", (l, k, d), ("layers", "kv_heads", "head_dim"), zeros, dt)
        self.stacked = p

    def _block(self, p, x, positions, k_all, v_all, layer, offsets, mask):
        c = self.config
        dt = jnp.dtype(c.dtype)
        h = rms_norm(x, p["attn_norm"].astype(dt), c.rms_norm_eps)
        q = jnp.einsum("bte,ehd->bthd", h, p["wq"].astype(dt))
        k = jnp.einsum("bte,ekd->btkd", h, p["wk"].astype(dt))
        v = jnp.einsum("bte,ekd->btkd", h, p["wv"].astype(dt))
        if c.qkv_bias:
            q, k, v = q + p["bq"].astype(dt), k + p["bk"].astype(dt), v + p["bv"].astype(dt)
        inv_freq = rope_inv_freq(c)
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)
        k_all = cache_lib.write(k_all, layer, k, offsets)
        v_all = cache_lib.write(v_all, layer, v, offsets)
        attn = attend(q, k_all[layer], v_all[layer], mask)
        x = x + jnp.einsum("bthd,hde->bte", attn, p["wo"].astype(dt))
        h = rms_norm(x, p["mlp_norm"].astype(dt), c.rms_norm_eps)
        gate = jnp.einsum("bte,ef->btf", h, p["w_gate"].astype(dt))
        up = jnp.einsum("bte,ef->btf", h, p["w_up"].astype(dt))
        x = x + jnp.einsum("btf,fe->bte", nn.silu(gate) * up, p["w_down"].astype(dt))
        return x, k_all, v_all

    def __call__(self, x, positions, cache: KVCache, mask, layers=None, hidden_layers=()):
        c = self.config
        layer_ids = tuple(range(c.num_layers)) if layers is None else tuple(layers)
        k_all, v_all, offsets = cache.k, cache.v, cache.lengths
        if isinstance(mask, TreeMask):
            if mask.num_slots != cache.num_slots or mask.num_new != x.shape[1]:
                raise ValueError(f"TreeMask for {mask.num_new} tokens over {mask.num_slots} slots "
                                 f"does not fit {x.shape[1]} tokens and a {cache.num_slots}-slot "
                                 f"cache: build it with TreeMask.create(cache.lengths, visible, "
                                 f"cache.num_slots)")
            if not uses_kernel(c):
                mask = mask.dense()  # once for all layers
        taps = {}
        if not c.scan_layers:
            for i in layer_ids:
                p = {name: w[i] for name, w in self.stacked.items()}
                x, k_all, v_all = self._block(p, x, positions, k_all, v_all, i, offsets, mask)
                if i in hidden_layers:
                    taps[i] = x
        else:
            ids = jnp.asarray(layer_ids, jnp.int32)
            params = {name: w[ids] for name, w in self.stacked.items()} if layers is not None \
                else self.stacked

            def body(carry, xs):
                x, k_all, v_all = carry
                p, i = xs
                x, k_all, v_all = self._block(p, x, positions, k_all, v_all, i, offsets, mask)
                return (x, k_all, v_all), (x if hidden_layers else None)

            (x, k_all, v_all), per_layer = jax.lax.scan(body, (x, k_all, v_all), (params, ids))
            for j, i in enumerate(layer_ids):
                if i in hidden_layers:
                    taps[i] = per_layer[j]
        missing = [i for i in hidden_layers if i not in taps]
        if missing:
            raise ValueError(f"hidden_layers {missing} are not among the layers run {layer_ids}")
        tap_arr = jnp.stack([taps[i] for i in hidden_layers]) if hidden_layers else None
        return x, cache.replace(k=k_all, v=v_all), tap_arr


class Llama(nn.Module):
    """Token ids in, logits, final hidden states and the updated cache out."""

    config: LlamaConfig

    def setup(self):
        c = self.config
        self.embedder = nn.Embed(
            c.vocab_size, c.hidden_size, dtype=jnp.dtype(c.dtype),
            param_dtype=jnp.dtype(c.param_dtype),
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                        ("vocab", "embed")))
        self.layers = LayerStack(c)
        self.final_norm = self.param(
            "final_norm", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
            (c.hidden_size,), jnp.dtype(c.param_dtype))
        if not c.tie_embeddings:
            self.lm_head_kernel = self.param(
                "lm_head", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                        ("embed", "vocab")),
                (c.hidden_size, c.vocab_size), jnp.dtype(c.param_dtype))

    def embed(self, tokens):
        return self.embedder(tokens)

    def head(self, hidden, num_ids=None):
        """Logits ``[..., V]``; with ``num_ids`` only those of token ids ``< num_ids``."""
        c = self.config
        if c.tie_embeddings:
            w = self.embedder.embedding[:num_ids].astype(hidden.dtype)
            return jnp.einsum("...e,ve->...v", hidden, w, preferred_element_type=jnp.float32)
        return jnp.einsum("...e,ev->...v",
                          hidden, self.lm_head_kernel[:, :num_ids].astype(hidden.dtype),
                          preferred_element_type=jnp.float32)

    def __call__(self, tokens, positions, cache, mask, layers=None, hidden_layers=(),
                 logits_at=None):
        c = self.config
        x = self.embedder(tokens)
        x, cache, taps = self.layers(x, positions, cache, mask, layers, tuple(hidden_layers))
        hidden = rms_norm(x, self.final_norm.astype(x.dtype), c.rms_norm_eps)
        h = hidden if logits_at is None else jnp.take_along_axis(
            hidden, logits_at[:, :, None].astype(jnp.int32), axis=1)
        logits = self.head(h).astype(jnp.float32)
        return ForwardOutput(logits=logits, hidden=hidden, cache=cache, taps=taps)


@dataclasses.dataclass(frozen=True)
class LlamaModel:
    """Implements :class:`specjax.model_api.LanguageModel` for a :class:`LlamaConfig`."""

    config: LlamaConfig

    @property
    def module(self) -> Llama:
        return Llama(self.config)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def init(self, rng: jax.Array) -> dict:
        """Random parameters (unboxed arrays); see :func:`logical_axes` for their axis names."""
        return nn.unbox(self._init_boxed(rng))

    def _init_boxed(self, rng):
        cache = self.init_cache(1, 2)
        tokens = jnp.zeros((1, 1), jnp.int32)
        mask = jnp.ones((1, 1, 2), bool)
        return self.module.init(rng, tokens, tokens, cache, mask)["params"]

    def logical_axes(self) -> dict:
        """A pytree like the params whose leaves are ``PartitionSpec``s of logical axis names."""
        boxed = jax.eval_shape(self._init_boxed, jax.random.key(0))
        return nn.get_partition_spec(boxed)

    def init_cache(self, batch: int, num_slots: int) -> KVCache:
        c = self.config
        return KVCache.init(c.num_layers, batch, c.num_kv_heads, num_slots, c.head_dim,
                            jnp.dtype(c.dtype))

    def forward(self, params, tokens, positions, cache, mask, *, layers=None, hidden_layers=(),
                logits_at=None) -> ForwardOutput:
        return self.module.apply({"params": params}, tokens, positions, cache, mask,
                                 None if layers is None else tuple(layers), tuple(hidden_layers),
                                 logits_at)

    def embed(self, params, tokens):
        return self.module.apply({"params": params}, tokens, method=Llama.embed)

    def lm_head(self, params, hidden, num_ids: Optional[int] = None):
        """Final-norm hidden states to logits ``[..., V]``, or ``[..., num_ids]`` for the first
        ``num_ids`` token ids only (a sliced head: what a drafter limited to frequent ids
        reads)."""
        if num_ids is not None and not 0 < num_ids <= self.vocab_size:
            raise ValueError(f"num_ids must be in 1..{self.vocab_size}, got {num_ids}")
        return self.module.apply({"params": params}, hidden, num_ids, method=Llama.head)
