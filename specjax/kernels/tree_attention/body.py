"""The tree-attention kernel body and its static tiling: what every ``pallas_call`` runs.

Holds :class:`BlockSizes` (requested tiling), :class:`Plan` and :func:`plan` (the resolved
static shapes of one call) and :func:`kernel_body` (one program of the flash-decoding grid).
It imports no other kernel module: the backends (``generic.py``: interpret and Triton,
``tpu.py``: Mosaic) import it, and the public API (the package ``__init__``) imports all three.

Axis glossary: D head dim, S cache slots, R = padded T * G query rows of one kv head (T nodes,
G query heads per kv head), N = padded T node keys.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

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


def bind(kernel, p: Plan, scale: float, interpret) -> functools.partial:
    """``kernel`` (a backend's wrapper that reads ``length`` and calls :func:`kernel_body`) with
    the static options of ``p``; every backend puts the split on grid axis 3."""
    return functools.partial(kernel, scale=scale, block_k=p.block_k, split_size=p.split_size,
                             split_axis=3,
                             upcast=bool(interpret) and jax.default_backend() == "cpu")


def split_results(batch: int, kv_heads: int, head_dim: int, p: Plan) -> list:
    """Result shapes of every backend's call: ``o float32[B, K, splits, R, D]`` (normalised per
    split) and ``m, l float32[B, K, splits, R, 1]`` (running max, softmax denominator)."""
    lead = (batch, kv_heads, p.num_splits, p.rows)
    return [jax.ShapeDtypeStruct(lead + (head_dim,), jnp.float32),
            jax.ShapeDtypeStruct(lead + (1,), jnp.float32),
            jax.ShapeDtypeStruct(lead + (1,), jnp.float32)]
