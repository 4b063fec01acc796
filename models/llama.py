"""Llama-style decoders (Llama 2/3, Mistral, Qwen2/2.5, Qwen3, Gemma 3, SmolLM) as Flax Linen
modules applied purely.

One configurable decoder covers the families: :class:`LlamaConfig`'s family options switch on
what differs (q / k norms, Gemma's sandwich norms, GeGLU, scaled embeddings, a query scale,
sliding-window layers with their own rope base); :data:`FAMILY_OPTIONS` lists them.

``LlamaModel(config).forward(params, tokens, positions, cache, mask)`` runs
``Llama(config).apply({"params": params}, ...)``: the cache goes in and comes back, nothing is
held in mutable collections. ``mask`` is a dense ``bool[B, T, S]`` or a
:class:`specjax.masks.TreeMask`; with the latter and ``LlamaConfig.attention_impl`` "pallas"
(or "auto" on GPU / TPU) every layer runs the Pallas tree-attention kernel. Layer parameters
are stacked along a leading ``layers`` axis, so the layer loop can be a ``lax.scan`` (the
default: fast compiles, and inside a decoding loop as fast as or faster than unrolling on
XLA:CPU, see WORKSPACE.md) or a Python-unrolled loop over static slices, chosen by
``LlamaConfig.scan_layers``. The same layout lets a drafter run any subset of layers
(self-speculative decoding). The math of one layer is :mod:`models.decoder_block` (shared with
the EAGLE drafter's layer); ``LayerStack`` supplies its attention: write the new keys / values
into the KV cache, attend over that layer's cache.

Axis glossary: B batch, T new tokens, S cache slots, L layers, H query heads, K kv heads,
G = H // K query heads per kv head, D head dim, E embedding width, F MLP width, V vocabulary.
Parameters carry logical axis names (``nn.with_logical_partitioning``) for sharding.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import decoder_block as block
# experiments/benchmark_kernel.py reads ``models.llama.attention``: keep it imported by name.
from models.decoder_block import attention, rms_norm
from models.packing import FLOAT_LINEAR_NAMES, PACKED_LAYER_NAMES, packed_shapes
from specjax import cache as cache_lib
from specjax import packed
from specjax.cache import KVCache
from specjax.kernels.tree_attention import tree_attention
from specjax.masks import TreeMask
from specjax.model_api import ForwardOutput

ATTENTION_IMPLS = ("xla", "pallas", "auto")
FAMILY_OPTIONS = ("qkv_bias", "qk_norm", "sandwich_norms", "activation", "embed_scale",
                  "query_scale", "layer_windows", "rope_local_theta", "rope_freq_factors")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rope scaling: ``rope_type`` "llama3" (frequency-dependent, the default) or "linear"
    (every inverse frequency divided by ``factor``; the other fields unused)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    rope_type: str = "llama3"


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
    # Weights kept packed (models/packing.py): sorted (name, format) pairs, e.g.
    # (("embedding", "q8_0"), ("w_down", "q4_1"), ...); empty: every weight a float array.
    weight_formats: tuple = ()
    # With packed weights: round every packed product's input to 8 bits per 32-value block first
    # (specjax.packed.linear's act8; --weights=gguf_a8, llama.cpp's arithmetic): another model.
    act8: bool = False
    # Family options (models/decoder_block.py); the defaults are Llama's.
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before rope (Qwen3, Gemma 3)
    sandwich_norms: bool = False  # norms on the attention and MLP outputs too (Gemma)
    activation: str = "silu"  # gate activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU, Gemma)
    embed_scale: bool = False  # embeddings times sqrt(hidden_size), in dtype (Gemma)
    query_scale: float = 0.0  # attention scale; 0: 1/sqrt(head_dim) (Gemma 3: 1/sqrt(qpas))
    # Per-layer sliding window, in positions: a query at p sees keys at p - w + 1 .. p (0: the
    # whole context). Empty: every layer global. Mistral: (w,) * L; Gemma 3: 512 / 0 interleaved.
    layer_windows: tuple = ()
    rope_local_theta: float = 0.0  # rope base of the windowed layers (Gemma 3); 0: rope_theta
    rope_freq_factors: tuple = ()  # per-frequency divisors (Llama 3.1+ GGUF ``rope_freqs``)

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
        if self.activation not in block.ACTIVATIONS:
            raise ValueError(f"activation must be one of {block.ACTIVATIONS}, got "
                             f"{self.activation!r}")
        if self.layer_windows and (len(self.layer_windows) != self.num_layers
                                   or min(self.layer_windows) < 0):
            raise ValueError(f"layer_windows must give a window >= 0 for each of the "
                             f"{self.num_layers} layers, got {self.layer_windows}")
        if self.rope_freq_factors and len(self.rope_freq_factors) != self.head_dim // 2:
            raise ValueError(f"rope_freq_factors must have head_dim / 2 = {self.head_dim // 2} "
                             f"entries, got {len(self.rope_freq_factors)}")

    def with_layers(self, layer_ids) -> "LlamaConfig":
        """The config of a model made of layers ``layer_ids`` of this one (in that order): the
        per-layer settings (windows) follow their layers."""
        layer_ids = tuple(int(i) for i in layer_ids)
        windows = tuple(self.layer_windows[i] for i in layer_ids) if self.layer_windows else ()
        return dataclasses.replace(self, num_layers=len(layer_ids), layer_windows=windows)

    @property
    def windowed(self) -> bool:
        """Whether some layer attends through a sliding window."""
        return any(self.layer_windows)

    @property
    def family(self) -> str:
        """A short description of the options set (for logs and results)."""
        opts = [name for name in FAMILY_OPTIONS
                if getattr(self, name) != LlamaConfig.__dataclass_fields__[name].default]
        return "llama" if not opts else "llama+" + "+".join(opts)

    @property
    def num_params(self) -> int:
        e, f, l, d = self.hidden_size, self.intermediate_size, self.num_layers, self.head_dim
        per_layer = (2 * e + e * d * (self.num_heads * 2 + self.num_kv_heads * 2) + 3 * e * f
                     + (2 * d if self.qk_norm else 0) + (2 * e if self.sandwich_norms else 0))
        head = 0 if self.tie_embeddings else self.vocab_size * e
        return self.vocab_size * e + l * per_layer + e + head


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
        dt = jnp.dtype(c.param_dtype)
        formats = dict(c.weight_formats)
        stacked = {
            name: _param(self, name, (c.num_layers,) + shape, ("layers",) + axes, init, dt)
            for name, (shape, axes, init) in block.param_specs(c, bias=c.qkv_bias).items()
            if not (formats and name in FLOAT_LINEAR_NAMES)}
        if formats:
            shapes = packed_shapes(c)
            for name in PACKED_LAYER_NAMES:
                stacked[name] = _packed_param(self, name, formats[name], (c.num_layers,),
                                              *shapes[name])
        self.stacked = stacked

    def _block(self, p, x, positions, k_all, v_all, layer, offsets, mask, distance):
        """:func:`models.decoder_block.decoder_block` whose attention writes the new k / v into
        the cache at ``offsets`` and attends over layer ``layer`` of it (through the layer's
        sliding window when it has one: ``distance [B, T, S]`` is query minus key position)."""
        c = self.config
        if c.windowed:
            window = jnp.asarray(c.layer_windows, jnp.int32)[layer]
            mask = mask & ((window == 0) | (distance < window))

        def write_and_attend(q, k, v):
            ks = cache_lib.write(k_all, layer, k, offsets)
            vs = cache_lib.write(v_all, layer, v, offsets)
            return attend(q, ks[layer], vs[layer], mask), (ks, vs)

        x, (k_all, v_all) = block.decoder_block(p, x, positions, c, write_and_attend, layer)
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
            if not uses_kernel(c) or c.windowed:  # the kernel has no window
                mask = mask.dense()  # once for all layers
        distance = key_distance(positions, offsets, cache.num_slots) if c.windowed else None
        taps = {}
        # Packed weights stay whole stacks: each layer's products read their layer in place
        # (PackedWeight.at), where a slice of the stack would copy the layer's bytes first.
        stacks = {n: w for n, w in self.stacked.items() if packed.is_packed(w)}
        floats = {n: w for n, w in self.stacked.items() if n not in stacks}
        if not c.scan_layers:
            for i in layer_ids:
                p = jax.tree.map(lambda w: w[i], floats)
                p.update({n: w.at(i) for n, w in stacks.items()})
                x, k_all, v_all = self._block(p, x, positions, k_all, v_all, i, offsets, mask,
                                              distance)
                if i in hidden_layers:
                    taps[i] = x
        else:
            ids = jnp.asarray(layer_ids, jnp.int32)
            params = jax.tree.map(lambda w: w[ids], floats) if layers is not None else floats

            def body(carry, xs):
                x, k_all, v_all = carry
                p, i = xs
                p = dict(p, **{n: w.at(i) for n, w in stacks.items()})
                x, k_all, v_all = self._block(p, x, positions, k_all, v_all, i, offsets, mask,
                                              distance)
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


def key_distance(positions: jax.Array, offsets: jax.Array, num_slots: int) -> jax.Array:
    """``int32[B, T, S]``: each new token's position minus the position of each cache slot.

    Committed slot ``s`` holds position ``s`` (every loop commits tokens contiguously from slot
    0); the ``T`` new tokens are written at slots ``offsets + t`` with their own ``positions``
    (tree nodes share depths). Other scratch slots are masked anyway.
    """
    b, t = positions.shape
    slot_pos = jnp.broadcast_to(jnp.arange(num_slots, dtype=jnp.int32), (b, num_slots))
    slots = offsets[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], slots.shape)
    slot_pos = slot_pos.at[rows, slots].set(positions.astype(jnp.int32), mode="drop")
    return positions.astype(jnp.int32)[:, :, None] - slot_pos[:, None, :]


def _packed_param(module, name, fmt, lead, n, k):
    """A :class:`specjax.packed.PackedWeight` param (zero bytes at init: its shapes only)."""
    return module.param(name, lambda rng: packed.zeros(fmt, lead, n, k))


class PackedEmbed(nn.Module):
    """The embedding table kept packed (rows = token ids): a lookup dequantises the rows."""

    config: LlamaConfig

    def setup(self):
        c = self.config
        self.embedding = _packed_param(self, "embedding", dict(c.weight_formats)["embedding"],
                                       (), c.vocab_size, c.hidden_size)

    def __call__(self, tokens):
        return packed.take_rows(self.embedding, tokens).astype(jnp.dtype(self.config.dtype))


class Llama(nn.Module):
    """Token ids in, logits, final hidden states and the updated cache out."""

    config: LlamaConfig

    def setup(self):
        c = self.config
        formats = dict(c.weight_formats)
        if formats:
            self.embedder = PackedEmbed(c)
        else:
            self.embedder = nn.Embed(
                c.vocab_size, c.hidden_size, dtype=jnp.dtype(c.dtype),
                param_dtype=jnp.dtype(c.param_dtype),
                embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                            ("vocab", "embed")))
        self.layers = LayerStack(c)
        self.final_norm = self.param(
            "final_norm", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
            (c.hidden_size,), jnp.dtype(c.param_dtype))
        if not c.tie_embeddings and formats:
            self.lm_head_kernel = _packed_param(self, "lm_head", formats["lm_head"], (),
                                                c.vocab_size, c.hidden_size)
        elif not c.tie_embeddings:
            self.lm_head_kernel = self.param(
                "lm_head", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                        ("embed", "vocab")),
                (c.hidden_size, c.vocab_size), jnp.dtype(c.param_dtype))

    def embed(self, tokens):
        """Input embeddings ``[..., E]`` (times ``sqrt(E)`` for Gemma, as the first layer sees
        them)."""
        x = self.embedder(tokens)
        if self.config.embed_scale:
            x = x * jnp.asarray(self.config.hidden_size ** 0.5, x.dtype)
        return x

    def head(self, hidden, num_ids=None):
        """Logits ``[..., V]``; with ``num_ids`` only those of token ids ``< num_ids``."""
        c = self.config
        if c.weight_formats:  # rows = token ids, in the packed format
            w = self.embedder.embedding if c.tie_embeddings else self.lm_head_kernel
            return packed.linear(hidden.astype(jnp.float32),
                                 w if num_ids is None else w.rows(num_ids), act8=c.act8)
        if c.tie_embeddings:
            w = self.embedder.embedding[:num_ids].astype(hidden.dtype)
            return jnp.einsum("...e,ve->...v", hidden, w, preferred_element_type=jnp.float32)
        return jnp.einsum("...e,ev->...v",
                          hidden, self.lm_head_kernel[:, :num_ids].astype(hidden.dtype),
                          preferred_element_type=jnp.float32)

    def __call__(self, tokens, positions, cache, mask, layers=None, hidden_layers=(),
                 logits_at=None):
        c = self.config
        x = self.embed(tokens)
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

    @property
    def max_positions(self) -> int:
        return self.config.max_position_embeddings

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
