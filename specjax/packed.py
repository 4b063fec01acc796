"""Weights kept in a packed row format (a GGUF checkpoint's own blocks, or int8), and the matmul
that reads them.

A :class:`PackedWeight` holds the ``N`` rows (output features) of a linear map of ``K`` inputs,
each row ``row_bytes`` bytes in one of :data:`FORMATS`, with optional leading axes (a stack of
layers). :func:`linear` computes ``x @ W^T``:

* on CPU through the C++ kernel (:mod:`specjax.kernels.cpu_matmul`): each weight byte is read
  once for all rows of ``x``, dequantised in registers, accumulated in float32;
* elsewhere (GPU, TPU) as :func:`dequantize` followed by ``jnp.dot``, which XLA fuses there
  (int8: the convert goes into the dot and the per-row scale onto its output).

:func:`dequantize` is the pure-JAX reference of every format (it reproduces ``gguf``'s numpy
dequantiser value for value). The byte layouts are GGUF's blocks:

========  ============  ==========================================================
format    block         bytes per block
========  ============  ==========================================================
``f32``   1 value       4 (float32)
``q8_0``  32 values     34: f16 scale d, int8 q[32]; w = d q
``q4_0``  32 values     18: f16 d, 16 bytes of nibbles; w = d (q - 8)
``q4_1``  32 values     20: f16 d, f16 m, 16 bytes of nibbles; w = d q + m
``i8``    1 value       1 (int8) plus a float32 scale per row: w = s[n] q
``q4_k``  256 values    144: f16 d, f16 dmin, 12 bytes of 6-bit scales / mins, nibbles
``q6_k``  256 values    210: 4-bit low parts, 2-bit high parts, int8 scales[16], f16 d
``q5_0``  32 values     22: f16 d, 4 bytes of fifth bits (uint32 LE), nibbles; w = d (q - 16)
========  ============  ==========================================================

In the 32-value nibble formats byte ``j`` holds value ``j`` (low nibble) and value ``j + 16``
(high nibble).

Axis glossary: N output features (rows of W), K input features, R bytes per row, M rows of x.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

# format -> (code shared with packed_matmul.cc, values per block, bytes per block)
FORMATS = {
    "f32": (0, 1, 4), "q8_0": (1, 32, 34), "q4_0": (2, 32, 18), "q4_1": (3, 32, 20),
    "i8": (4, 1, 1), "q4_k": (5, 256, 144), "q6_k": (6, 256, 210), "q5_0": (7, 32, 22),
}
# Above this many rows of x (a prefill) linear() dequantises and lets XLA's GEMM run: measured on
# SmolLM2 (2026-11-30), a 512-token forward took 3.5 s through the kernel and 1.9 s as float32.
KERNEL_MAX_ROWS = 32
# The formats whose products can take 8-bit activations (linear(..., act8=True)): llama.cpp's
# Q8_0 "vec_dot_type" of these formats.
A8_FORMATS = ("q8_0", "q4_0", "q4_1")
# GGUF tensor types kept as they are (the rest are dequantised to f32 rows by the loaders).
GGUF_FORMATS = {"F32": "f32", "Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1", "Q4_K": "q4_k",
                "Q6_K": "q6_k", "Q5_0": "q5_0"}


def row_bytes(fmt: str, k: int) -> int:
    """Bytes of one row of ``k`` values in ``fmt``; ValueError if ``k`` does not fill blocks."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; known: {', '.join(FORMATS)}")
    _, values, nbytes = FORMATS[fmt]
    if k <= 0 or k % values:
        raise ValueError(f"{fmt} rows hold whole blocks of {values} values; K={k} is not a "
                         "positive multiple")
    return k // values * nbytes


@struct.dataclass
class PackedWeight:
    """``N`` rows of ``K`` inputs in format ``fmt``.

    Attributes:
      data: ``uint8[..., N, R]`` the rows' bytes.
      scale: ``float32[..., N]`` per-row scales (``i8``), else ``float32[..., 1]`` (unused).
      fmt: a key of :data:`FORMATS` (static).
      in_features: ``K`` (static).
      layer: None, or ``int32[]``: ``data`` / ``scale`` are a stack ``[L, N, R]`` / ``[L, ...]``
        and this weight is its layer ``layer`` (:meth:`at`): the kernel reads that layer in
        place, where slicing the stack inside a layer loop would copy the layer's bytes first.
    """

    data: jax.Array
    scale: jax.Array
    fmt: str = struct.field(pytree_node=False)
    in_features: int = struct.field(pytree_node=False)
    layer: Optional[jax.Array] = None

    def at(self, layer) -> "PackedWeight":
        """Layer ``layer`` (a traced or static index) of a stack ``[L, N, R]``, as a view."""
        if self.data.ndim != 3 or self.layer is not None:
            raise ValueError(f"at() takes a stack of weights (data [L, N, R]), got data "
                             f"{self.data.shape}{' already at a layer' if self.layer is not None else ''}")
        return PackedWeight(self.data, self.scale, self.fmt, self.in_features,
                            jnp.asarray(layer, jnp.int32))

    def resolved(self) -> "PackedWeight":
        """The weight itself: a view's layer sliced out of the stack (a copy), else ``self``."""
        if self.layer is None:
            return self
        return PackedWeight(self.data[self.layer], self.scale[self.layer], self.fmt,
                            self.in_features)

    @property
    def out_features(self) -> int:
        return self.data.shape[-2]

    def rows(self, stop: int) -> "PackedWeight":
        """The first ``stop`` rows (output features)."""
        scale = self.scale[..., :stop] if self.fmt == "i8" else self.scale
        return PackedWeight(self.data[..., :stop, :], scale, self.fmt, self.in_features)


def zeros(fmt: str, lead: tuple, n: int, k: int, xp=jnp) -> PackedWeight:
    """An all-zero :class:`PackedWeight` of shape ``lead + (n, row_bytes)`` (shapes for init)."""
    scale_n = n if fmt == "i8" else 1
    return PackedWeight(xp.zeros(lead + (n, row_bytes(fmt, k)), xp.uint8),
                        xp.zeros(lead + (scale_n,), xp.float32), fmt, k)


# ---------------------------------------------------------------------------------------------
# Reference dequantisers (pure jnp): data [..., N, R] -> float32 [..., N, K].


def _half(b):  # [..., 2] uint8 -> float32 [...]
    return jax.lax.bitcast_convert_type(b, jnp.float16).astype(jnp.float32)


def _nibbles(qs):  # [..., 16] uint8 -> [..., 32] values (low nibbles, then high)
    return jnp.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(jnp.float32)


def _dequant_blocks(fmt: str, b: jax.Array) -> jax.Array:
    """``b [..., nb, block bytes]`` -> float32 ``[..., nb, block values]``."""
    if fmt == "q8_0":
        q = jax.lax.bitcast_convert_type(b[..., 2:], jnp.int8).astype(jnp.float32)
        return _half(b[..., 0:2])[..., None] * q
    if fmt == "q4_0":
        return _half(b[..., 0:2])[..., None] * (_nibbles(b[..., 2:]) - 8.0)
    if fmt == "q4_1":
        return _half(b[..., 0:2])[..., None] * _nibbles(b[..., 4:]) + _half(b[..., 2:4])[..., None]
    if fmt == "q5_0":  # value j's fifth bit is bit j of the little-endian uint32 qh
        bits = (b[..., 2:6, None] >> jnp.arange(8, dtype=jnp.uint8)) & 1  # [..., 4, 8]
        high = bits.reshape(b.shape[:-1] + (32,)).astype(jnp.float32)
        return _half(b[..., 0:2])[..., None] * (_nibbles(b[..., 6:]) + 16.0 * high - 16.0)
    if fmt == "q4_k":
        d, dmin = _half(b[..., 0:2]), _half(b[..., 2:4])
        s = b[..., 4:16].astype(jnp.int32)
        sc = jnp.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)],
                             axis=-1).astype(jnp.float32)  # [..., 8]
        mn = jnp.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)],
                             axis=-1).astype(jnp.float32)
        qs = b[..., 16:].reshape(b.shape[:-1] + (4, 32))
        q = jnp.stack([qs & 0x0F, qs >> 4], axis=-2).reshape(b.shape[:-1] + (8, 32))
        out = (d[..., None] * sc)[..., None] * q.astype(jnp.float32) - (dmin[..., None] * mn)[
            ..., None]
        return out.reshape(b.shape[:-1] + (256,))
    if fmt == "q6_k":
        lead = b.shape[:-1]
        ql = b[..., 0:128].reshape(lead + (2, 64)).astype(jnp.int32)
        qh = b[..., 128:192].reshape(lead + (2, 32)).astype(jnp.int32)
        scales = jax.lax.bitcast_convert_type(b[..., 192:208], jnp.int8).astype(jnp.float32)
        d = _half(b[..., 208:210])
        lo, hi = ql[..., :32], ql[..., 32:]
        q = jnp.stack([(lo & 0x0F) | ((qh & 3) << 4), (hi & 0x0F) | (((qh >> 2) & 3) << 4),
                       (lo >> 4) | (((qh >> 4) & 3) << 4), (hi >> 4) | (((qh >> 6) & 3) << 4)],
                      axis=-2) - 32  # [..., 2, 4, 32]
        # value l + 32 i of half h has scale scales[8 h + 2 i + l // 16]
        sc = jnp.repeat((d[..., None] * scales).reshape(lead + (2, 4, 2)), 16, axis=-1)
        return (sc * q.astype(jnp.float32)).reshape(lead + (256,))
    raise ValueError(f"no block dequantiser for {fmt!r}")


def dequantize(w: PackedWeight) -> jax.Array:
    """float32 ``[..., N, K]``: the weight's values (the reference of every format)."""
    w = w.resolved()
    lead_n = w.data.shape[:-1]
    if w.fmt == "f32":
        return jax.lax.bitcast_convert_type(
            w.data.reshape(lead_n + (w.in_features, 4)), jnp.float32)
    if w.fmt == "i8":
        q = jax.lax.bitcast_convert_type(w.data, jnp.int8).astype(jnp.float32)
        return w.scale[..., None] * q
    _, values, nbytes = FORMATS[w.fmt]
    blocks = w.data.reshape(lead_n + (w.in_features // values, nbytes))
    return _dequant_blocks(w.fmt, blocks).reshape(lead_n + (w.in_features,))


def take_rows(w: PackedWeight, ids: jax.Array) -> jax.Array:
    """float32 ``ids.shape + (K,)``: rows ``ids`` of an unstacked weight, dequantised (an
    embedding lookup)."""
    scale = w.scale[ids] if w.fmt == "i8" else w.scale
    return dequantize(PackedWeight(w.data[ids], scale, w.fmt, w.in_features))


# ---------------------------------------------------------------------------------------------
# The matmul.


def quantize_activations(x: jax.Array) -> tuple:
    """``x [..., K]`` (K a multiple of 32) quantised per 32-value block as GGUF's Q8_0 does:
    ``(q int8 [..., K], d float32 [..., K / 32])`` with ``d = max |x| * (1 / 127)`` and ``q =
    round-half-even(x * (1 / d))`` (0 for an all-zero block), so ``x ~ d * q`` within ``d / 2``.
    The reference of the kernel's ``act8`` path (the same float32 operations)."""
    k = x.shape[-1]
    if k % 32:
        raise ValueError(f"8-bit activations need K a multiple of 32, got {k}")
    xb = x.astype(jnp.float32).reshape(x.shape[:-1] + (k // 32, 32))
    d = jnp.max(jnp.abs(xb), axis=-1) * jnp.float32(1.0 / 127.0)
    inv = jnp.where(d != 0, 1.0 / jnp.where(d != 0, d, 1.0), 0.0)
    q = jnp.round(xb * inv[..., None]).astype(jnp.int8)
    return q.reshape(x.shape), d


def dequantize_activations(q: jax.Array, d: jax.Array) -> jax.Array:
    """float32 ``[..., K]``: ``d * q`` per 32-value block (the values the ``act8`` path uses)."""
    k = q.shape[-1]
    qb = q.astype(jnp.float32).reshape(q.shape[:-1] + (k // 32, 32))
    return (qb * d[..., None]).reshape(q.shape)


def linear(x: jax.Array, w: PackedWeight, *, use_kernel: Optional[bool] = None,
           act8: bool = False, isa: str = "auto") -> jax.Array:
    """``x [..., K] @ W^T`` -> ``[..., N]`` in ``x``'s dtype (accumulated in float32).

    ``use_kernel``: None picks the C++ kernel when the default backend is the CPU and ``x`` has
    at most :data:`KERNEL_MAX_ROWS` rows (decode steps and verification; a prefill's GEMM is
    faster in XLA on the dequantised weights, measured in WORKSPACE), the
    reference (dequantise, then ``jnp.dot`` with operands in ``x``'s dtype and float32
    accumulation; int8: the int8 codes converted in the dot, the scale on its output) elsewhere;
    True / False force one.

    ``act8``: for weights in :data:`A8_FORMATS`, ``x`` is first rounded to 8 bits per 32-value
    block (:func:`quantize_activations`; llama.cpp's way: the kernel then multiplies integers);
    other formats ignore it. It changes the function (a different model), so it is a static
    choice of the whole model (``LlamaConfig.act8``), never a per-call speed switch.

    ``isa``: caps the kernel's instruction set (``"auto"``: the CPU's best; benchmarks compare
    ``"avx2"`` with ``"avx512"``); the result is the same up to float summation order.
    """
    if w.data.ndim != (2 if w.layer is None else 3):
        raise ValueError(f"linear takes one weight (data [N, R], or a stack's layer: "
                         f"PackedWeight.at), got data {w.data.shape}: slice the stacked layers "
                         "first")
    k, n = w.in_features, w.out_features
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight takes {k}")
    act8 = act8 and w.fmt in A8_FORMATS
    rows = math.prod(x.shape[:-1])
    if use_kernel is None:
        use_kernel = jax.default_backend() == "cpu" and rows <= KERNEL_MAX_ROWS
    if use_kernel:
        from specjax.kernels import cpu_matmul
        y = cpu_matmul.packed_matmul(x.reshape(-1, k).astype(jnp.float32), w.data, w.scale,
                                     w.fmt, act8=act8, isa=isa, layer=w.layer)
    else:  # operands in x's dtype (bf16 on accelerators), float32 accumulation
        w = w.resolved()
        x2 = x.reshape(-1, k)
        if act8:
            x2 = dequantize_activations(*quantize_activations(x2)).astype(x.dtype)
        if w.fmt == "i8":
            q = jax.lax.bitcast_convert_type(w.data, jnp.int8)
            y = jnp.dot(x2, q.T.astype(x.dtype), preferred_element_type=jnp.float32) * w.scale
        else:
            y = jnp.dot(x2, dequantize(w).T.astype(x.dtype), preferred_element_type=jnp.float32)
    return y.reshape(x.shape[:-1] + (n,)).astype(x.dtype)


def dense(x: jax.Array, w) -> jax.Array:
    """``x [..., K]`` times a weight given either as a float matrix ``[K, N]`` (``x @ w`` in
    ``x``'s dtype) or as a :class:`PackedWeight` of ``N`` rows (:func:`linear`): for modules
    whose matrices may be packed at load (e.g. a drafter's, ``drafters/drafter_packing.py``)."""
    if isinstance(w, PackedWeight):
        return linear(x, w)
    return x @ w.astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# Packing on the host (numpy).


def pack_int8(w: np.ndarray) -> PackedWeight:
    """Per-row (output channel) symmetric int8 of a float weight ``[..., N, K]``: ``scale =
    max |row| / 127`` (a zero row gets scale 1), ``q = round(w / scale)``."""
    w = np.asarray(w, np.float32)
    amax = np.max(np.abs(w), axis=-1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale[..., None]), -127, 127).astype(np.int8)
    return PackedWeight(q.view(np.uint8), scale, "i8", w.shape[-1])


def pack_f32(w: np.ndarray) -> PackedWeight:
    """A float weight ``[..., N, K]`` as ``f32`` rows (the kernel's unquantised format)."""
    w = np.ascontiguousarray(w, np.float32)
    data = w.view(np.uint8).reshape(w.shape[:-1] + (w.shape[-1] * 4,))
    return PackedWeight(data, np.zeros(w.shape[:-2] + (1,), np.float32), "f32", w.shape[-1])


def pack_gguf(w: np.ndarray, fmt: str) -> PackedWeight:
    """Quantises a float weight ``[..., N, K]`` into a GGUF block format with ``gguf``'s own
    quantiser (``q8_0``, ``q4_0``, ``q4_1``: the formats it can write)."""
    import gguf
    types = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0,
             "q4_1": gguf.GGMLQuantizationType.Q4_1}
    if fmt not in types:
        raise ValueError(f"pack_gguf writes {', '.join(types)}; got {fmt!r}")
    w = np.asarray(w, np.float32)
    row_bytes(fmt, w.shape[-1])  # validates K
    data = gguf.quants.quantize(w, types[fmt])
    return PackedWeight(np.ascontiguousarray(data), np.zeros(w.shape[:-2] + (1,), np.float32),
                        fmt, w.shape[-1])


# Formats whose every value is d * (integer in [-128, 127]) with Q8_0's f16 block scale d: they
# widen to Q8_0 exactly (widen_to_q8_0).
WIDENS_TO_Q8_0 = ("q8_0", "q4_0", "q5_0")


def widen_to_q8_0(w: PackedWeight) -> PackedWeight:
    """A ``q4_0`` / ``q5_0`` weight (numpy) rewritten as ``q8_0`` with the same values exactly:
    each block keeps its f16 scale ``d`` and its integers ``q - 8`` / ``q - 16`` become int8.
    Lets tensors of these formats share one format (a fused q / k / v group, a stack of layers)
    at 34 bytes per 32 values instead of float32's 128."""
    if w.fmt == "q8_0":
        return w
    if w.fmt not in WIDENS_TO_Q8_0:
        raise ValueError(f"{w.fmt} does not widen to q8_0 exactly")
    _, values, nbytes = FORMATS[w.fmt]
    data = np.asarray(w.data)
    blocks = data.reshape(data.shape[:-1] + (data.shape[-1] // nbytes, nbytes))
    if w.fmt == "q4_0":
        qs = blocks[..., 2:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int16) - 8
    else:  # q5_0: qh (uint32 LE) holds the fifth bit of value j at bit j
        qh = blocks[..., 2:6].copy().view("<u4")[..., 0].astype(np.uint32)
        qs = blocks[..., 6:]
        nib = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int16)
        bits = (qh[..., None] >> np.arange(32, dtype=np.uint32)) & 1
        q = (nib | (bits.astype(np.int16) << 4)) - 16
    out = np.concatenate([blocks[..., :2], q.astype(np.int8).view(np.uint8)], axis=-1)
    return PackedWeight(np.ascontiguousarray(out.reshape(data.shape[:-1] + (-1,))),
                        np.asarray(w.scale), "q8_0", w.in_features)


def stack(weights: list) -> PackedWeight:
    """Stacks equal-format :class:`PackedWeight` s (numpy) along a new leading axis."""
    fmts = {(w.fmt, w.in_features) for w in weights}
    if len(fmts) != 1:
        raise ValueError(f"cannot stack weights of different formats {sorted(fmts)}")
    fmt, k = fmts.pop()
    return PackedWeight(np.stack([w.data for w in weights]), np.stack([w.scale for w in weights]),
                        fmt, k)


def as_jax(tree, dtype) -> object:
    """``tree`` with float arrays as ``dtype`` jax arrays and :class:`PackedWeight` bytes / scales
    kept as they are (uint8 / float32)."""

    def convert(leaf):
        if isinstance(leaf, PackedWeight):
            return PackedWeight(jnp.asarray(leaf.data, jnp.uint8),
                                jnp.asarray(leaf.scale, jnp.float32), leaf.fmt, leaf.in_features)
        return jnp.asarray(leaf, dtype)

    return jax.tree.map(convert, tree, is_leaf=lambda a: isinstance(a, PackedWeight))


def is_packed(leaf) -> bool:
    return isinstance(leaf, PackedWeight)


__all__ = ["A8_FORMATS", "FORMATS", "GGUF_FORMATS", "dequantize_activations",
           "quantize_activations", "widen_to_q8_0", "WIDENS_TO_Q8_0", "PackedWeight", "dense", "dequantize", "linear", "pack_f32",
           "pack_gguf", "pack_int8", "row_bytes", "stack", "take_rows", "zeros", "as_jax",
           "is_packed"]
