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
split writes ``(o, m, l)``; the wrapper merges the splits (log-sum-exp) in plain jnp.

Backends: ``interpret=True`` (any backend, CPU tests), Triton on GPU, Mosaic on TPU (scalar
prefetch of ``lengths`` and no DMA of unused splits, see ``tree_attention_tpu.py``). On CPU
``impl="auto"`` means the reference. Only the interpret path has been run by this project's tests;
the GPU and TPU lowerings are written to their documented constraints but untested on hardware.

Axis glossary: B batch, T nodes, H query heads, K kv heads, G = H / K, D head dim, S cache slots,
R = padded T * G query rows of one kv head, N = padded T node keys.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from specjax import masks

IMPLS = ("auto", "pallas", "reference")
_NEG = float(jnp.finfo(jnp.float32).min)  # running-max floor: exp(-inf - _NEG) == 0, never NaN


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Static tiling. ``block_r`` query rows and ``block_k`` cache slots per step; the cache is
    cut into ``num_splits`` contiguous splits processed by separate programs (flash decoding).
    0 picks a backend default (see :func:`plan`)."""

    block_r: int = 0
    block_k: int = 0
    num_splits: int = 0
    num_warps: int = 4  # Triton only
    num_stages: int = 2  # Triton only


@dataclasses.dataclass(frozen=True)
class Plan:
    """Resolved static shapes of one call."""

    rows: int  # R, T*G rounded up to a multiple of block_r
    nodes: int  # N, node keys after padding
    block_r: int
    block_k: int
    num_splits: int
    split_size: int  # slots per split, a multiple of block_k
    padded_slots: int  # num_splits * split_size >= S (the cache is padded only if larger)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def plan(backend: str, batch: int, kv_heads: int, num_nodes: int, group: int, num_slots: int,
         sizes: BlockSizes = BlockSizes()) -> Plan:
    """Static tiling for ``backend`` in ``("interpret", "gpu", "tpu")``.

    Triton needs power-of-two tiles of at least 16 for its dots; Mosaic needs multiples of 8
    rows; interpret mode takes anything (multiples of 8 keep it close to the TPU shapes).
    """
    gpu = backend == "gpu"
    nodes = max(16, _pow2(num_nodes)) if gpu else _round_up(num_nodes, 8)
    rows = num_nodes * group
    default_r = min(64, max(16, _pow2(rows))) if gpu else min(256, _round_up(rows, 8))
    block_r = sizes.block_r or default_r
    if gpu and (block_r < 16 or block_r & (block_r - 1)):
        raise ValueError(f"on GPU block_r must be a power of two >= 16, got {block_r}")
    block_k = sizes.block_k or (64 if gpu else 128 if backend == "tpu" else
                                min(128, _round_up(num_slots, 8)))
    if gpu and (block_k < 16 or block_k & (block_k - 1)):
        raise ValueError(f"on GPU block_k must be a power of two >= 16, got {block_k}")
    num_blocks = -(-num_slots // block_k)
    row_blocks = -(-rows // block_r)
    if sizes.num_splits:
        splits = sizes.num_splits
    elif gpu:  # enough programs to fill ~132 SMs twice, with at least 4 key blocks per split
        splits = max(1, min(num_blocks // 4, -(-264 // (batch * kv_heads * row_blocks))))
    elif backend == "tpu":  # VMEM: one split of K and V, double-buffered, stays ~2 MiB
        splits = max(1, -(-num_blocks * block_k // 2048))
    else:
        splits = 1
    splits = min(splits, num_blocks)
    # Prefer a split count that divides the blocks evenly (then the cache needs no padding).
    splits = next((c for c in range(splits, min(2 * splits, num_blocks) + 1)
                   if num_blocks % c == 0), splits)
    per_split = -(-num_blocks // splits)
    splits = -(-num_blocks // per_split)
    return Plan(rows=_round_up(rows, block_r), nodes=nodes, block_r=block_r, block_k=block_k,
                num_splits=splits, split_size=per_split * block_k,
                padded_slots=splits * per_split * block_k)


def _dot_nt(a, b, precision, upcast=False):
    """``a[M, D] @ b[N, D].T`` accumulated in float32. ``upcast`` feeds float32 copies (exact for
    bf16 operands): XLA:CPU cannot run the bf16 x bf16 -> f32 dots of interpret mode."""
    if upcast:
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)


def _dot_nn(a, b, precision, upcast=False):
    """``a[M, N] @ b[N, D]`` accumulated in float32 (``upcast`` as in :func:`_dot_nt`)."""
    if upcast:
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)


def kernel_body(length, q_ref, k_ref, v_ref, kn_ref, vn_ref, vis_ref, o_ref, m_ref, l_ref, *,
                scale: float, block_k: int, split_size: int, split_axis: int,
                upcast: bool = False):
    """One program: ``block_r`` query rows of one (row, kv head) over one split of the cache.

    Args:
      length: scalar int32, ``lengths[b]`` clipped to ``[0, S]``.
      q_ref: ``[block_r, D]`` queries. k_ref, v_ref: ``[split_size, D]`` this split's cache.
      kn_ref, vn_ref: ``[N, D]`` node keys / values (zero where a node slot is outside the cache).
      vis_ref: ``int32[block_r, N]`` node visibility of each query row (0 = hidden).
      o_ref: ``float32[block_r, D]`` normalised output of this split.
      m_ref, l_ref: ``float32[block_r, 1]`` running max and softmax denominator of this split.
      upcast: compute the dots on float32 copies of the operands (interpret mode on CPU).
    """
    split = pl.program_id(split_axis)
    precision = jax.lax.Precision.HIGHEST if q_ref.dtype == jnp.float32 else None
    dot_nt = functools.partial(_dot_nt, precision=precision, upcast=upcast)
    dot_nn = functools.partial(_dot_nn, precision=precision, upcast=upcast)
    q = q_ref[...]

    # Node keys: seen by split 0 only (every split would otherwise count them again).
    s = dot_nt(q, kn_ref[...]) * scale  # [block_r, N]
    s = jnp.where((vis_ref[...] != 0) & (split == 0), s, -jnp.inf)
    m = jnp.maximum(jnp.max(s, axis=1, keepdims=True), _NEG)  # [block_r, 1]
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=1, keepdims=True)
    vn = vn_ref[...]
    acc = dot_nn(p.astype(vn.dtype), vn)  # [block_r, D] float32

    # Committed slots of this split: only blocks that start below `length` are visited.
    start = split * split_size
    remaining = jnp.maximum(length - start, 0)
    num_blocks = jnp.minimum((remaining + block_k - 1) // block_k, split_size // block_k)
    cols = jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
    col_rows = jax.lax.broadcasted_iota(jnp.int32, (block_k, 1), 0)

    def step(i, carry):
        acc, m, l = carry
        offset = pl.multiple_of(i * block_k, block_k)
        k = k_ref[pl.ds(offset, block_k), :]
        v = v_ref[pl.ds(offset, block_k), :]
        limit = length - start - offset  # slots of this block below it are committed
        s = dot_nt(q, k) * scale  # [block_r, block_k]
        s = jnp.where(cols < limit, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        correction = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new)
        # Scratch slots may hold anything (even NaN): zero them so 0 * NaN never happens.
        v = jnp.where(col_rows < limit, v, jnp.zeros_like(v))
        acc = correction * acc + dot_nn(p.astype(v.dtype), v)
        l = correction * l + jnp.sum(p, axis=1, keepdims=True)
        return acc, m_new, l

    acc, m, l = jax.lax.fori_loop(0, num_blocks, step, (acc, m, l))
    o_ref[...] = acc / jnp.where(l > 0, l, 1.0)
    m_ref[...] = m
    l_ref[...] = l


def _generic_kernel(lengths_ref, *refs, **kw):
    kernel_body(lengths_ref[()], *refs, **kw)


def _call_generic(lengths, q, k, v, kn, vn, vis, p: Plan, sizes: BlockSizes, scale: float,
                  interpret, backend: str):
    """``pallas_call`` for interpret mode and Triton: grid ``(B, K, R / block_r, splits)``."""
    b, kh, _, d = q.shape
    grid = (b, kh, p.rows // p.block_r, p.num_splits)
    kernel = functools.partial(_generic_kernel, scale=scale, block_k=p.block_k,
                               split_size=p.split_size, split_axis=3,
                               upcast=bool(interpret) and jax.default_backend() == "cpu")
    out_shape = [jax.ShapeDtypeStruct((b, kh, p.num_splits, p.rows, d), jnp.float32),
                 jax.ShapeDtypeStruct((b, kh, p.num_splits, p.rows, 1), jnp.float32),
                 jax.ShapeDtypeStruct((b, kh, p.num_splits, p.rows, 1), jnp.float32)]
    params = None
    if backend == "gpu" and not interpret:
        from jax.experimental.pallas import triton as plgpu
        params = plgpu.CompilerParams(num_warps=sizes.num_warps, num_stages=sizes.num_stages)
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[
            pl.BlockSpec((None,), lambda i, h, r, j: (i,)),
            pl.BlockSpec((None, None, p.block_r, d), lambda i, h, r, j: (i, h, r, 0)),
            pl.BlockSpec((None, None, p.split_size, d), lambda i, h, r, j: (i, h, j, 0)),
            pl.BlockSpec((None, None, p.split_size, d), lambda i, h, r, j: (i, h, j, 0)),
            pl.BlockSpec((None, None, p.nodes, d), lambda i, h, r, j: (i, h, 0, 0)),
            pl.BlockSpec((None, None, p.nodes, d), lambda i, h, r, j: (i, h, 0, 0)),
            pl.BlockSpec((None, p.block_r, p.nodes), lambda i, h, r, j: (i, r, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, p.block_r, d), lambda i, h, r, j: (i, h, j, r, 0)),
            pl.BlockSpec((None, None, None, p.block_r, 1), lambda i, h, r, j: (i, h, j, r, 0)),
            pl.BlockSpec((None, None, None, p.block_r, 1), lambda i, h, r, j: (i, h, j, r, 0)),
        ],
        out_shape=out_shape,
        compiler_params=params,
        interpret=interpret,
        name="tree_attention",
    )(lengths, q, k, v, kn, vn, vis)


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
        from specjax.kernels import tree_attention_tpu
        o, m, l = tree_attention_tpu.call(*args, interpret=interpret)
    else:
        o, m, l = _call_generic(*args, interpret=interpret, backend=target)
    return merge_splits(o, m, l)[:, :, :t * g].reshape(b, kv, t, g, d).transpose(
        0, 2, 1, 3, 4).reshape(b, t, h, d).astype(q.dtype)


def merge_splits(o: jax.Array, m: jax.Array, l: jax.Array) -> jax.Array:
    """Log-sum-exp merge of per-split results ``o [B, K, splits, R, D]``, ``m, l [.., R, 1]``
    into ``float32[B, K, R, D]`` (zero where no split saw a key)."""
    top = jnp.max(m, axis=2, keepdims=True)
    w = l * jnp.exp(m - top)  # [B, K, splits, R, 1]
    total = jnp.sum(w, axis=2)
    return jnp.sum(w * o, axis=2) / jnp.where(total > 0, total, 1.0)
