"""Tree-masked attention of candidate nodes over a row's cache: a Pallas kernel and its reference.

One tree-verification forward asks, for every row ``b``, kv head and query head of the group,
attention of the ``T`` candidate nodes over

* the row's committed cache, slots ``s < lengths[b]`` (every node sees all of them), and
* the nodes themselves, written by the layer at slots ``lengths[b] + j``: node ``t`` sees node
  ``j`` where ``visible[b, t, j]`` (ancestor-or-self for a tree) and the slot is inside the cache.

That is exactly ``specjax.masks.block_mask(lengths, visible, S)``; a query that sees no key at
all gets a zero output. The kernel never materialises the ``[B, T, S]`` mask: it compares slot
indices with ``lengths[b]`` and reads the ``[T, T]`` visibility block.

Kernel layout (flash-decoding): one program per (row ``b``, kv head, block of query rows, split of
the cache). Its query rows are the ``G = H / K`` query heads times the ``T`` nodes of that kv head
(row ``r = t * G + g``), so each key block is read once for the whole group. A program first
attends to the ``T`` node keys (split 0 only), then runs an online softmax over the key blocks of
its split that hold committed slots; blocks at or beyond ``lengths[b]`` are never visited. Each
split writes ``(o, m, l)``; :func:`tree_attention` merges the splits (log-sum-exp) in plain jnp.

Backends: ``interpret=True`` (any backend, CPU tests), Triton on GPU, Mosaic on TPU (scalar
prefetch of ``lengths`` and no DMA of unused splits). On CPU ``impl="auto"`` means the
reference. Only the interpret path has been run by this project's tests; the GPU and TPU
lowerings are written to their documented constraints but untested on hardware.

Modules, imported one way only (this API -> backends -> body; nothing imports this module back):

* this package ``__init__``: the public API, :func:`tree_attention` (input checks, backend and
  layout selection, operand packing, split merge) and :func:`tree_attention_reference`;
  re-exports :class:`BlockSizes`, :class:`Plan`, :func:`plan`, :func:`kernel_body` and
  :func:`call_generic`;
* ``generic.py``: the interpret / Triton ``pallas_call``; ``tpu.py``: the Mosaic one (imported
  on first use of the ``"tpu"`` layout); both import only ``body.py``;
* ``body.py``: tiling (:class:`BlockSizes`, :class:`Plan`, :func:`plan`) and the kernel body;
  imports no other kernel module.

Axis glossary: B batch, T nodes, H query heads, K kv heads, G = H / K, D head dim, S cache slots,
R = padded T * G query rows of one kv head, N = padded T node keys.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from specjax import masks
from specjax.kernels.tree_attention.body import BlockSizes, Plan, kernel_body, plan
from specjax.kernels.tree_attention.generic import call_generic

__all__ = ["IMPLS", "BlockSizes", "Plan", "call_generic", "kernel_body", "merge_splits", "plan",
           "tree_attention", "tree_attention_reference"]

IMPLS = ("auto", "pallas", "reference")


def _check(q, k_cache, v_cache, lengths, visible):
    if q.ndim != 4 or k_cache.ndim != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"expected q [B, T, H, D] and k_cache = v_cache [B, K, S, D], got "
                         f"{q.shape}, {k_cache.shape}, {v_cache.shape}")
    b, t, h, d = q.shape
    if k_cache.shape[0] != b or k_cache.shape[3] != d or h % k_cache.shape[1]:
        raise ValueError(f"q {q.shape} does not fit the cache {k_cache.shape}: batch and head "
                         f"dim must match and H must be a multiple of K")
    if lengths.shape != (b,):
        raise ValueError(f"lengths must be int32[{b}], got shape {lengths.shape}")
    if visible.shape not in ((t, t), (b, t, t)):
        raise ValueError(f"visible must be bool[{t}, {t}] or bool[{b}, {t}, {t}], got "
                         f"{visible.shape}")


def tree_attention_reference(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                             lengths: jax.Array, visible: jax.Array) -> jax.Array:
    """Pure-jnp tree attention: the definition the kernel is tested against (float32 math on
    the input values, output rounded to ``q.dtype``).

    Args:
      q: ``[B, T, H, D]`` queries of the nodes (rope applied).
      k_cache, v_cache: ``[B, K, S, D]`` one layer's cache, node entries written at
        ``lengths + t``. Slots the mask hides must be finite (the cache guarantees it).
      lengths: ``int32[B]``. visible: ``bool[T, T]`` or ``bool[B, T, T]``.
    Returns:
      ``[B, T, H, D]`` in ``q.dtype``; zero for a query that sees no slot.
    """
    _check(q, k_cache, v_cache, lengths, visible)
    b, t, h, d = q.shape
    kv = k_cache.shape[1]
    mask = masks.block_mask(lengths, visible, k_cache.shape[2])  # [B, T, S]
    # All math in float32 on the (exactly representable) input values.
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    hi = jax.lax.Precision.HIGHEST
    qg = f32(q).reshape(b, t, kv, h // kv, d)
    s = jnp.einsum("btkgd,bksd->bkgts", qg, f32(k_cache), precision=hi) / math.sqrt(d)
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
    denom = jnp.sum(p, axis=-1, keepdims=True)
    probs = p / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, f32(v_cache), precision=hi)
    return out.reshape(b, t, h, d).astype(q.dtype)


def _backend() -> str:
    platform = jax.default_backend()
    return "gpu" if platform in ("gpu", "cuda", "rocm") else platform


def tree_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array,
                   visible: jax.Array, *, impl: str = "auto", interpret: Optional[bool] = None,
                   block_sizes: BlockSizes = BlockSizes(),
                   layout: Optional[str] = None) -> jax.Array:
    """Attention of ``T`` tree nodes over their rows' caches (see the module docstring).

    Args:
      q, k_cache, v_cache, lengths, visible: as in :func:`tree_attention_reference`.
      impl: ``"pallas"`` the kernel, ``"reference"`` plain jnp, ``"auto"`` the kernel on GPU and
        TPU, the reference elsewhere.
      interpret: run the kernel in the Pallas interpreter; ``None`` means True on CPU.
      block_sizes: static tiling (0 fields pick defaults).
      layout: which ``pallas_call`` to build: ``"gpu"`` (Triton tiling), ``"tpu"`` (Mosaic, scalar
        prefetch) or ``"interpret"``; ``None`` follows the backend. With ``interpret=True`` any
        layout runs on any backend, which is how the CPU tests cover the GPU and TPU calls.
    Returns:
      ``[B, T, H, D]`` in ``q.dtype``.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    lengths = jnp.asarray(lengths, jnp.int32)
    visible = jnp.asarray(visible, bool)
    _check(q, k_cache, v_cache, lengths, visible)
    backend = _backend()
    if impl == "reference" or (impl == "auto" and backend not in ("gpu", "tpu")):
        return tree_attention_reference(q, k_cache, v_cache, lengths, visible)
    if interpret is None:
        interpret = backend not in ("gpu", "tpu")
    target = layout or (backend if backend in ("gpu", "tpu") else "interpret")
    if target not in ("interpret", "gpu", "tpu"):
        raise ValueError(f"layout must be 'gpu', 'tpu' or 'interpret', got {target!r}")
    if not interpret and target != backend:
        raise ValueError(f"the {target!r} kernel cannot be compiled on backend {backend!r}: "
                         f"pass interpret=True or impl='reference'")
    if target == "gpu" and q.shape[-1] & (q.shape[-1] - 1):
        raise ValueError(f"the Triton kernel needs a power-of-two head dim, got {q.shape[-1]}: "
                         f"use impl='reference'")

    b, t, h, d = q.shape
    kv, s_len = k_cache.shape[1], k_cache.shape[2]
    g = h // kv
    if visible.ndim == 2:
        visible = jnp.broadcast_to(visible[None], (b, t, t))
    p = plan(target, b, kv, t, g, s_len, block_sizes)
    lengths = jnp.clip(lengths, 0, s_len)

    # Node keys/values: slots lengths + j; a node whose slot is past the cache does not exist.
    node_slot = lengths[:, None] + jnp.arange(t, dtype=jnp.int32)  # [B, T]
    inside = node_slot < s_len
    idx = jnp.clip(node_slot, 0, s_len - 1)[:, None, :, None]
    zero = lambda x: jnp.where(inside[:, None, :, None], x, jnp.zeros_like(x))  # noqa: E731
    kn = zero(jnp.take_along_axis(k_cache, idx, axis=2))  # [B, K, T, D]
    vn = zero(jnp.take_along_axis(v_cache, idx, axis=2))
    pad_n = ((0, 0), (0, 0), (0, p.nodes - t), (0, 0))
    kn, vn = jnp.pad(kn, pad_n), jnp.pad(vn, pad_n)

    # Query rows r = t * G + g of each kv head, and each row's node visibility.
    qr = q.reshape(b, t, kv, g, d).transpose(0, 2, 1, 3, 4).reshape(b, kv, t * g, d)
    qr = jnp.pad(qr, ((0, 0), (0, 0), (0, p.rows - t * g), (0, 0)))
    vis = jnp.repeat(visible & inside[:, None, :], g, axis=1).astype(jnp.int32)  # [B, TG, T]
    vis = jnp.pad(vis, ((0, 0), (0, p.rows - t * g), (0, p.nodes - t)))

    if p.padded_slots > s_len:  # a copy: size caches to a multiple of block_k to avoid it
        pad_s = ((0, 0), (0, 0), (0, p.padded_slots - s_len), (0, 0))
        k_cache, v_cache = jnp.pad(k_cache, pad_s), jnp.pad(v_cache, pad_s)

    args = (lengths, qr, k_cache, v_cache, kn, vn, vis, p, block_sizes, 1.0 / math.sqrt(d))
    if target == "tpu":
        # Imported on first use: the Mosaic lowering takes ~0.2 s to import, and only this
        # layout needs it.
        from specjax.kernels.tree_attention.tpu import call_tpu
        o, m, l = call_tpu(*args, interpret=interpret)
    else:
        o, m, l = call_generic(*args, interpret=interpret, backend=target)
    return merge_splits(o, m, l)[:, :, :t * g].reshape(b, kv, t, g, d).transpose(
        0, 2, 1, 3, 4).reshape(b, t, h, d).astype(q.dtype)


def merge_splits(o: jax.Array, m: jax.Array, l: jax.Array) -> jax.Array:
    """Log-sum-exp merge of per-split results ``o [B, K, splits, R, D]``, ``m, l [.., R, 1]``
    into ``float32[B, K, R, D]`` (zero where no split saw a key)."""
    top = jnp.max(m, axis=2, keepdims=True)
    w = l * jnp.exp(m - top)  # [B, K, splits, R, 1]
    total = jnp.sum(w, axis=2)
    return jnp.sum(w * o, axis=2) / jnp.where(total > 0, total, 1.0)
