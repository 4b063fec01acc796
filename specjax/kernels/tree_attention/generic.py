"""The generic ``pallas_call`` of the tree-attention kernel: Pallas interpret mode and Triton.

Grid ``(B, K, R / block_r, splits)``; ``lengths`` is an ordinary blocked operand (one scalar per
program) and every split's K/V block is loaded. Imports only the kernel body (``body.py``); the
public API (the package ``__init__``) imports this module. The Triton lowering is untested on GPU
hardware (no GPU in this project); the tests run this call in interpret mode on CPU, with the
default tiling and with the Triton tiling of :func:`body.plan`.
"""

from __future__ import annotations

from jax.experimental import pallas as pl

from specjax.kernels.tree_attention.body import BlockSizes, Plan, bind, kernel_body, split_results


def _generic_kernel(lengths_ref, *refs, **kw):
    kernel_body(lengths_ref[()], *refs, **kw)


def call_generic(lengths, q, k, v, kn, vn, vis, p: Plan, sizes: BlockSizes, scale: float,
                 interpret, backend: str):
    """``pallas_call`` for interpret mode and Triton: grid ``(B, K, R / block_r, splits)``.

    Args:
      lengths: ``int32[B]`` clipped to ``[0, S]``. q: ``[B, K, R, D]`` query rows.
      k, v: ``[B, K, padded_slots, D]`` the cache. kn, vn: ``[B, K, N, D]`` node keys / values.
      vis: ``int32[B, R, N]`` node visibility of each query row.
      p, sizes: the plan and the requested tiling (Triton reads its warps and stages).
      scale: the softmax scale. interpret: run in the Pallas interpreter.
      backend: ``"gpu"`` compiles with Triton's parameters (unless ``interpret``).
    Returns:
      ``(o, m, l)`` per split, shaped as :func:`body.split_results`.
    """
    b, kh, _, d = q.shape
    grid = (b, kh, p.rows // p.block_r, p.num_splits)
    params = None
    if backend == "gpu" and not interpret:
        from jax.experimental.pallas import triton as plgpu
        params = plgpu.CompilerParams(num_warps=sizes.num_warps, num_stages=sizes.num_stages)
    return pl.pallas_call(
        bind(_generic_kernel, p, scale, interpret),
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
        out_shape=split_results(b, kh, d, p),
        compiler_params=params,
        interpret=interpret,
        name="tree_attention",
    )(lengths, q, k, v, kn, vn, vis)
